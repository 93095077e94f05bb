"""Defects found in an audit of analysis/: each test failed before its fix."""

import math

import numpy as np
import pandas as pd
import pytest

from analysis import fits
from analysis.fits import FitError
from analysis.synthetic import isoflop_runs, random_runs


def _shuffled(frame: pd.DataFrame, seed: int = 3) -> pd.DataFrame:
    return frame.sample(frac=1, random_state=seed)


@pytest.mark.parametrize("which", ["frontier", "approach2", "approach3"])
def test_bootstrap_intervals_do_not_depend_on_row_order(which):
    """The same runs in another row order (a database query without ORDER BY, a sorted CSV) and the same seed give
    the same intervals: the bootstrap draws runs, not row positions."""
    if which == "frontier":
        runs = random_runs(30, seed=1)
        fit = lambda r: fits.fit_loss_compute(r, n_bootstrap=60, edges="keep", seed=5)  # noqa: E731
    elif which == "approach2":
        runs = isoflop_runs(budgets=(1e18, 1e19, 1e20), n_sizes=7, seed=2)
        fit = lambda r: fits.fit_approach2(r, n_bootstrap=60, seed=5)  # noqa: E731
    else:
        runs = random_runs(30, seed=1)
        fit = lambda r: fits.fit_approach3(r, n_bootstrap=12, n_starts=4, seed=5)  # noqa: E731
    a, b = fit(runs), fit(_shuffled(runs))
    assert a.n_bootstrap and set(a.intervals) == set(b.intervals)
    for k in ("alpha", "a"):
        if k in a.intervals:
            assert np.allclose(a.interval(k), b.interval(k), rtol=1e-6), (k, a.interval(k), b.interval(k))


PACK_TABLE = "runs,serial_s,packed_s,speedup\n64,73.5,45.9,1.6\n64,279.6,78.1,3.58\n"
SPREAD_TABLE = "plan,gpus,device,runs,done,wall_s\nsmoke,2,H200,15,15,213.8\nsmoke,1,H200,15,15,276.0\n"
DP_TABLE = "run,gpus,step,loss,tokens_per_s\ndp,1,1,5.0,1000\ndp,1,2,4.0,1100\ndp,2,1,5.0,1900\ndp,2,2,4.0,2100\n"


@pytest.mark.parametrize("text, match", [
    # the first measured column of a pack, spread or dp table went unchecked: TypeError or ValueError tracebacks
    (PACK_TABLE.replace("64,73.5", "64,73.5 s"), r"t\.csv.*serial_s must be numbers"),
    (SPREAD_TABLE.replace("smoke,1,", "smoke,one,"), r"t\.csv.*gpus must be numbers"),
    (DP_TABLE.replace("dp,2,1,", "dp,two,1,"), r"t\.csv.*gpus must be numbers"),
    # a blank measurement: "Axis limits cannot be NaN or Inf", or a figure with a bar silently missing
    (PACK_TABLE.replace("64,279.6", "64,"), r"t\.csv: column serial_s has a blank or infinite cell \(row 2\)"),
    ("arch,seq_len,tokens_per_s\nsoftmax,2048,3e5\nlightning,,2.8e5\n",
     r"t\.csv: column seq_len has a blank or infinite cell \(row 2\)"),
])
def test_bench_tables_with_bad_measurements_are_refused(tmp_path, text, match):
    """slab bench plot redraws hand-edited tables: a bad cell is named (file, column, row), not a traceback."""
    from analysis.bench_figures import BenchTableError, bench_figure

    csv = tmp_path / "t.csv"
    csv.write_text(text)
    with pytest.raises(BenchTableError, match=match):
        bench_figure(csv)
    assert not (tmp_path / "t.png").exists()


def test_approach2_refuses_a_budget_cell_that_is_not_a_number():
    """A run whose budget cell is not a number had its label turned into NaN, and groupby dropped it: the fit went on
    without that run and said nothing."""
    runs = isoflop_runs(budgets=(1e18, 1e19, 1e20), n_sizes=7, seed=2)
    runs["budget"] = runs["budget"].astype(object)
    bad_id = runs.loc[4, "run_id"]
    runs.loc[4, "budget"] = "1e19x"
    with pytest.raises(FitError, match=f"budget.*{bad_id}"):
        fits.fit_approach2(runs, n_bootstrap=0)


@pytest.mark.parametrize("which", ["frontier", "approach1", "approach2", "approach3"])
def test_negative_bootstrap_count_is_a_fit_error(which):
    """n_bootstrap=-1 was a ValueError traceback from numpy (approaches 2 and 3) or taken as 0 (frontier, approach 1)."""
    runs = isoflop_runs(budgets=(1e18, 1e19, 1e20), n_sizes=7, seed=2)
    call = {
        "frontier": lambda: fits.fit_loss_compute(runs, n_bootstrap=-1),
        "approach1": lambda: fits.fit_approach1(runs, pd.DataFrame(), n_bootstrap=-1),
        "approach2": lambda: fits.fit_approach2(runs, n_bootstrap=-1),
        "approach3": lambda: fits.fit_approach3(runs, n_bootstrap=-1, n_starts=4),
    }[which]
    with pytest.raises(FitError, match="n_bootstrap"):
        call()


@pytest.mark.parametrize("delta", [0.0, -1e-3, math.nan])
def test_approach3_refuses_a_huber_delta_that_is_not_positive(delta):
    """delta=0 raised ZeroDivisionError; a negative delta returned a 'fit' with alpha ~ 0 and G = inf."""
    with pytest.raises(FitError, match="delta"):
        fits.fit_approach3(random_runs(30, seed=1), delta=delta, n_bootstrap=0, n_starts=4)


@pytest.mark.parametrize("which", ["approach2", "approach3"])
@pytest.mark.parametrize("budget", [-1.0, 0.0, math.nan, math.inf])
def test_allocation_budgets_must_be_positive_numbers(which, budget):
    """A budget of -1 or NaN gave estimates named 'N_opt@-1' / 'tokens_per_param@nan' holding NaN, silently."""
    if which == "approach2":
        call = lambda: fits.fit_approach2(isoflop_runs(seed=2), budgets=[1e21, budget], n_bootstrap=0)  # noqa: E731
    else:
        call = lambda: fits.fit_approach3(random_runs(30, seed=1), budgets=[1e21, budget], n_bootstrap=0,  # noqa: E731
                                          n_starts=4)
    with pytest.raises(FitError, match="budgets"):
        call()


def test_frontier_refuses_fewer_than_one_bin():
    from analysis.synthetic import curves_for

    runs = random_runs(20, seed=1)
    with pytest.raises(FitError, match="n_bins"):
        fits.fit_loss_compute(runs, metrics=curves_for(runs), n_bins=0, n_bootstrap=0)


def test_infinite_flops_are_refused_not_replaced_by_6ND():
    """flops = inf (an overflowed counter) was silently replaced by 6 N D, a second FLOP convention in one fit."""
    runs = random_runs(20, seed=1)
    runs["flops"] = runs["flops"].astype(float)
    runs.loc[3, "flops"] = math.inf
    with pytest.raises(FitError, match=f"flops.*{runs.loc[3, 'run_id']}"):
        fits.prepare_points(runs)


@pytest.mark.parametrize("where", ["compare", "report"])
def test_a_run_without_an_arch_is_named_not_a_type_error(tmp_path, where):
    """Under pandas 3, astype(str) keeps a missing arch missing, and sorting the archs raised "'<' not supported
    between instances of 'str' and 'float'"."""
    from analysis.compare import fit_per_arch
    from analysis.report import write_report

    runs = random_runs(12, seed=1)
    runs["arch"] = runs["arch"].astype(object)
    runs.loc[2, "arch"] = None
    with pytest.raises(FitError, match=f"no arch.*{runs.loc[2, 'run_id']}"):
        if where == "compare":
            fit_per_arch(runs, n_bootstrap=0)
        else:
            write_report(runs, None, None, tmp_path / "r", bootstrap=0)
    assert not (tmp_path / "r").exists()


def test_a_fit_from_curves_says_which_runs_had_none(caplog):
    # runs without a curve point had been left out of a curves fit in silence
    from analysis.synthetic import curves_for

    runs = random_runs(40, seed=1)
    curves = curves_for(runs)
    lacking = runs["run_id"].iloc[:3].tolist()
    with caplog.at_level("WARNING", logger="analysis.fits"):
        fits.fit_loss_compute(runs, metrics=curves[~curves["run_id"].isin(lacking)], n_bootstrap=0)
    assert "left out 3 of 40 run(s) with no training-curve point" in caplog.text
    assert lacking[0] in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="analysis.fits"):
        fits.fit_loss_compute(runs, metrics=curves, n_bootstrap=0)
    assert "training-curve point" not in caplog.text
