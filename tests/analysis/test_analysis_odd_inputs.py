"""Odd but legal inputs to the fits, the report's figures and slab fit: each test failed before its fix."""

import warnings

import matplotlib
import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

matplotlib.use("Agg")

from analysis import fits, report  # noqa: E402
from analysis.fits import FitError  # noqa: E402
from analysis.synthetic import grid_runs, random_runs, runs_frame  # noqa: E402


def _steep_fit(n_bootstrap=0):
    """Ten noisy runs whose approach-3 fit has beta near 100: B = exp(b + beta mean(log D)) overflows to inf."""
    return fits.fit_approach3(random_runs(10, noise=0.1, seed=2, N_range=(1e5, 1e8)), n_starts=16,
                              n_bootstrap=n_bootstrap)


def test_bootstrap_replicates_whose_law_does_not_fall_fail_and_are_counted():
    # 12 noisy runs: 18 of 100 replicates fit alpha or beta <= 0. They had stayed in alpha's interval (down to -42)
    # while a, b and N_opt, NaN for them, were drawn from the other 82, and bootstrap_failed said 0.
    f = fits.fit_approach3(random_runs(12, noise=0.05, seed=2), n_starts=16, n_bootstrap=100, seed=0)
    s = f.samples
    assert f.details["bootstrap_failed"] > 0 and f.details["bootstrap_unusable"] > 0
    assert not ((s["alpha"] <= 0) | (s["beta"] <= 0)).any()
    assert s["alpha"].notna().sum() == s["a"].notna().sum() == 100 - f.details["bootstrap_failed"]
    assert f.interval("alpha")[0] > 0 and f.interval("beta")[0] > 0


def test_flops_per_token_that_do_not_grow_with_size_are_refused():
    # a flops column of 6 D x 1e20 / N (or 6 D x 1e7): approach 3 had printed a = 4.7 and every N_opt as nan
    runs = grid_runs(5, 5, seed=1)
    for flops in (6 * runs["tokens"] * 1e20 / runs["nonembed_params"], 6 * runs["tokens"] * 1e7):
        with pytest.raises(FitError, match="FLOPs per token .* not a training-compute count"):
            fits.fit_approach3(runs.assign(flops=flops), n_starts=8, n_bootstrap=0)
    # a small model's per-token compute is mostly its LM head, growing slowly with depth at one width: still taken
    N = 12 * np.arange(1, 5) * 128.0**2
    per_token = 6 * N + 6 * 128 * 32_000
    rule = fits.ComputeRule.fit(N, 1e9 * np.ones(4), per_token * 1e9)
    assert 0.05 < rule.g < 0.15


def test_an_overflowing_constant_gives_no_allocation_and_says_why():
    # B = inf had given N_opt = 0 and D_opt = inf, read as numbers, and the residuals NaN (inf x 0)
    f = _steep_fit()
    e = f.estimates
    assert np.isinf(e["B"]) and np.isfinite(e["a"]) and np.isfinite(e["b"])
    assert all(np.isnan(v) for k, v in e.items() if k.startswith(("N_opt@", "D_opt@", "tokens_per_param@")))
    assert np.isfinite(f.residuals).all() and np.isfinite(f.points["L_fit"]).all()
    assert "B overflows a float" in f.details["not_finite"]


def test_allocation_figure_skips_a_law_with_no_allocation_without_a_runtime_warning():
    f = _steep_fit()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # had raised: divide by zero encountered in divide (D_opt = C / (6 x 0))
        fig, why = report._fig_allocation({"approach3/softmax": f}, ["softmax"])
    assert fig is None and "a law constant overflows" in why


def test_slab_fit_says_why_its_table_holds_nan(runs_db):
    from sweep.cli import app

    url = runs_db(random_runs(10, noise=0.1, seed=2, N_range=(1e5, 1e8)))
    result = CliRunner().invoke(app, ["--db", url, "fit", "--method", "3", "--bootstrap", "20"])
    assert result.exit_code == 0, result.output
    assert "nan" in result.stdout
    assert "are not finite: B overflows a float" in result.stderr


def test_slab_fit_on_flops_that_fall_with_size_is_one_line(runs_db):
    from sweep.cli import app

    runs = grid_runs(5, 5, seed=1)
    url = runs_db(runs.assign(flops=6 * runs["tokens"] * 1e20 / runs["nonembed_params"]))
    result = CliRunner().invoke(app, ["--db", url, "fit", "--method", "3", "--bootstrap", "0"])
    assert result.exit_code == 2 and "nan" not in result.stdout
    assert "not a training-compute count" in result.stderr and "Traceback" not in result.output


def test_one_size_at_several_token_counts_has_no_frontier_from_final_points_either():
    # From curves one size was refused; its final points at 12 token counts had been fitted as a "frontier", and
    # slab compare printed a gap and compute multiplier for a one-size ablation.
    one = grid_runs(1, 12, seed=1)
    with pytest.raises(FitError, match="at least 2 model sizes, got 12 run\\(s\\) of one size"):
        fits.fit_loss_compute(one, n_bootstrap=0)
    # and a replicate that drew one size of two fails, as the data would (2 in 32 of five runs, one of them alone)
    N = np.array([1e7, 1e7, 1e7, 1e7, 4e7])
    D = np.array([1e8, 3e8, 1e9, 3e9, 2e9])
    two = runs_frame(N, D, fits.chinchilla_law(N, D, **{"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34,
                                                           "beta": 0.28}))
    f = fits.fit_loss_compute(two, form="power", n_bootstrap=300, seed=0)
    drew_one_size = f.samples["alpha"].isna().sum()
    assert drew_one_size >= 0.5 * 300 * (4 / 5) ** 5, f.details


def test_a_frontier_replicate_drawing_every_run_once_is_the_estimate():
    # Why a frontier interval may leave out its estimate (defect 4 of the audit): not resamples fitted another way --
    # the replicate that draws each run once reproduces the estimate exactly -- but a resample can only lose runs, so
    # its frontier (a minimum over runs) sits at or above the data's and the replicates lean one way.
    runs = random_runs(40, seed=4)
    f = fits.fit_loss_compute(runs, n_bootstrap=0, edges="keep")
    pts = fits._by_run(fits.prepare_points(runs))
    source = fits._FrontierSource(pts, None, 30, drop_edges=False)
    n = len(source.run_ids)
    C, L, w = source.envelope(np.arange(n), np.ones(n, int))
    theta, ok = fits._fit_frontier(C / f.details["C_ref"], L, "saturating", None)
    again, ok2 = fits._fit_frontier(C / f.details["C_ref"], L, "saturating", theta, w)
    assert ok and ok2 and np.allclose(again, theta, rtol=1e-9, atol=1e-12)
    half = source.envelope(np.arange(0, n, 2), np.ones(n, int))[1]
    assert half.min() >= L.min()  # fewer runs: a best loss no lower


def test_report_finding_calls_an_undefined_allocation_undefined():
    from analysis.compare import summary_findings

    lines = summary_findings(approach3={"softmax": _steep_fit()})
    line = next(s for s in lines if s.startswith("softmax: approach 3"))
    # it had quoted tokens per parameter as 'inf' (D_opt = C / (6 x 0))
    assert "undefined (" in line and ": inf" not in line and ": nan" not in line, line


def test_approach_1_and_2_replicates_whose_constant_overflows_fail_and_are_counted():
    """A replicate whose k_D = exp(intercept) overflows has no allocation: counted as failed, its other values out of
    the intervals. Approach 3's check alone had done this, so k_D's interval could read (x, inf)."""
    rng = np.random.default_rng(0)
    samples = pd.DataFrame({"k_N": rng.uniform(0.1, 0.2, 10), "a": rng.uniform(0.45, 0.55, 10),
                            "k_D": rng.uniform(5, 6, 10), "b": rng.uniform(0.45, 0.55, 10)})
    samples.loc[[2, 7], "k_D"] = np.inf
    samples.loc[[2, 7], "b"] = 9.0  # what an overflowing replicate's exponent looks like: far from the rest
    result = fits.FitResult("approach1", "", {"k_N": 0.15, "a": 0.5, "k_D": 5.5, "b": 0.5}, fits._intervals(samples),
                            np.zeros(3), pd.DataFrame(), 3, 10, True, samples=samples)
    checked = fits._check_bootstrap(result)
    assert checked.details["bootstrap_unusable"] == 2 and checked.details["bootstrap_failed"] == 2
    assert np.isfinite(checked.interval("k_D")[1]) and checked.interval("b")[1] < 0.56
    assert "intervals_unknown" not in checked.details
