"""No bootstrap for a fit whose runs are too few to resample; the frontier fit's estimates at a bound are noted."""

import math

import numpy as np
import pandas as pd
import pytest

from analysis import compare
from analysis.fits import _note_frontier_at_bound, fit_loss_compute
from analysis.synthetic import runs_frame


def frontier_runs(arch, seed, n=14, E=1.9):
    """Final points on L(C) = E + 2000 C^-0.17 plus dominated runs (as test_analysis_compare's)."""
    rng = np.random.default_rng(seed)
    C = np.geomspace(1e17, 1e21, n)
    L = E + 2000 * C ** -0.17
    N = np.sqrt(C / 120)
    L_all = np.r_[L * np.exp(0.002 * rng.standard_normal(n)), L * 1.04]
    return runs_frame(np.r_[N, N / 2], np.r_[C / (6 * N), 2 * C / (6 * N)], L_all, arch=arch, prefix=arch)


def test_fit_on_runs_runs_no_bootstrap_for_too_few_runs_and_says_so():
    runs = frontier_runs("softmax", 0).iloc[:4]
    asked = []

    def fit(nb):
        asked.append(nb)
        return fit_loss_compute(runs, n_bootstrap=nb, seed=0)

    result = compare.fit_on_runs(fit, 200, len(runs))
    assert asked == [0]  # the replicates whose intervals would be discarded are not run
    assert result.n_bootstrap == 0 and result.samples is None and result.details["bootstrap_skipped"] == 200
    assert set(result.intervals) == set(result.estimates)
    assert all(math.isnan(x) for lo_hi in result.intervals.values() for x in lo_hi)
    assert "rests on 4 runs, too few to resample (at least 5 are needed)" in result.details["intervals_unknown"]
    # as unknown as a bootstrap's discarded intervals, and the estimates are the same
    ran = compare.unknown_on_few_runs(fit_loss_compute(runs, n_bootstrap=200, seed=0), len(runs))
    assert ran.estimates == result.estimates and ran.details["intervals_unknown"] == result.details["intervals_unknown"]
    assert compare.unknown_on_few_runs(result, len(runs)) is result
    d = result.to_dict()
    assert d["n_bootstrap"] == 0 and all(v == [None, None] for v in d["intervals"].values())
    # no bootstrap asked for: nothing skipped, nothing unknown
    none = compare.fit_on_runs(lambda nb: fit_loss_compute(runs, n_bootstrap=nb), 0, len(runs))
    assert none.intervals == {} and "bootstrap_skipped" not in none.details


def test_fit_on_runs_leaves_fits_on_enough_runs_as_they_were():
    runs = frontier_runs("softmax", 0).iloc[:5]
    got = compare.fit_on_runs(lambda nb: fit_loss_compute(runs, n_bootstrap=nb, seed=3), 50, len(runs))
    direct = fit_loss_compute(runs, n_bootstrap=50, seed=3)
    assert got.to_dict() == direct.to_dict() and got.n_bootstrap == 50
    pd.testing.assert_frame_equal(got.samples, direct.samples)


def test_compare_skips_the_bootstrap_of_an_arch_on_few_runs_only():
    runs = pd.concat([frontier_runs("softmax", 0), frontier_runs("lightning", 1).iloc[:4]], ignore_index=True)
    calls = []
    c = compare.compare_archs(runs, budgets=[1e19], n_bootstrap=100, seed=0,
                              progress=lambda done, total: calls.append(done))
    few, many = c.fits["lightning"], c.fits["softmax"]
    assert few.n_bootstrap == 0 and few.details["bootstrap_skipped"] == 100 and few.samples is None
    assert "too few to resample" in few.details["intervals_unknown"]
    assert many.n_bootstrap == 100 and len(many.samples) == 100 and "bootstrap_skipped" not in many.details
    assert len(calls) == 100  # softmax's replicates alone
    assert c.gaps[["gap_lo", "gap_hi"]].isna().all().all() and c.gaps["gap"].notna().all()
    assert compare.gap_summary(c)["gap % [95%]"].str.endswith(" [unknown]").all()


def test_frontier_fit_notes_E_at_its_lower_bound():
    # three runs whose loss falls as a pure power: no floor, so E runs to 0
    runs = runs_frame(np.array([1e6, 2e6, 4e6]), np.array([2e7, 4e7, 8e7]), np.array([3.1, 2.9, 2.7]))
    fit = fit_loss_compute(runs, n_bootstrap=0)
    assert fit.estimates["E"] < 1e-6
    note = fit.details["at_bound"]
    assert note.startswith("E = ") and "sits at its lower bound 0 (under 0.1% of the fitted loss at every frontier " \
        "point): the fit found no floor under the loss, so E is pinned there, not estimated" in note
    # a law with a floor the runs identify has none
    assert "at_bound" not in fit_loss_compute(frontier_runs("softmax", 0), n_bootstrap=0).details


def test_frontier_fit_notes_a_flat_alpha():
    C = np.geomspace(1e17, 1e20, 6)
    N = np.sqrt(C / 120)
    runs = runs_frame(N, C / (6 * N), 3.0 * C ** -0.002)  # C^-alpha changes by 1.4% over these budgets
    power = fit_loss_compute(runs, form="power", n_bootstrap=0)
    assert power.estimates["alpha"] == pytest.approx(0.002, rel=1e-3)
    assert "alpha = 0.002 sits at its lower bound 0 (C^-alpha changes by 1.37% across the frontier's compute): " \
        "A C^-alpha is a constant: the law is flat, so alpha and the gaps" in power.details["at_bound"]
    # the saturating form's wording names E beside it (by the helper its fit calls)
    L = np.full(6, 2.5)
    note = _note_frontier_at_bound({"E": 1.5, "A": 1.0, "alpha": 0.001}, C, L)["at_bound"]
    assert note.startswith("alpha = 0.001 sits at its lower bound 0") and "a second constant beside E" in note
    assert _note_frontier_at_bound({"E": 1.5, "A": 1e4, "alpha": 0.2}, C, L) == {}


def test_approach3_at_bound_wording_is_unchanged_by_the_shared_helpers():
    # the helpers now shared with the frontier fit write approach 3's notes as before
    from analysis.fits import _flat_at_bound, _floor_at_bound

    assert _floor_at_bound(1e-9, 1e-6, "every run") == [
        "E = 1e-09 sits at its lower bound 0 (under 0.1% of the fitted loss at every run): the fit found no floor "
        "under the loss, so E is pinned there, not estimated"]
    assert _flat_at_bound("beta", 0.001, 2.0, "D", "the runs' token counts", "B / D^beta",
                          "a second constant beside E", "the allocation that follows from it (a, b, N_opt)") == [
        "beta = 0.001 sits at its lower bound 0 (D^-beta changes by 0.20% across the runs' token counts): B / D^beta "
        "is a second constant beside E, so beta and the allocation that follows from it (a, b, N_opt) are not "
        "estimated"]


def test_findings_note_a_frontier_estimate_at_its_bound():
    runs = runs_frame(np.array([1e6, 2e6, 4e6]), np.array([2e7, 4e7, 8e7]), np.array([3.1, 2.9, 2.7]), arch="softmax")
    fit = fit_loss_compute(runs, n_bootstrap=0)
    lines = compare.summary_findings(frontier={"softmax": fit})
    assert lines == [f"softmax's frontier law (L = E + A * C^-alpha): {fit.details['at_bound']}."]
    both = pd.concat([frontier_runs("lightning", 1), runs], ignore_index=True)
    c = compare.compare_archs(both, baseline="softmax", budgets=[1e15], n_bootstrap=0)
    assert any(line.startswith("softmax's frontier law") for line in compare.summary_findings(c))
