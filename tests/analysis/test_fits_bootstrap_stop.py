"""The bootstraps stop once most replicates have failed (the intervals are then unknown whatever the rest give), without
changing any replicate; approach 3 says where an estimate sits at a bound of its parameterisation."""

import math

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from analysis import compare, fits, report
from analysis.synthetic import HOFFMANN, curves_for, grid_runs, random_runs, runs_frame


def _three_budgets():
    """Three runs at three budgets: a frontier replicate fits only when it draws all three (2 in 9 do)."""
    C = np.array([1.2e18, 1.08e19, 1.2e20])
    N = np.sqrt(C / 120)
    return runs_frame(N, C / (6 * N), np.array([3.1, 2.8, 2.6]))


def _overflowing():
    """Eight noisy runs whose approach-3 fit has A overflow (alpha near 120): nearly every replicate's does too."""
    return random_runs(8, noise=0.1, seed=2)


def _unstopped(monkeypatch):
    """Make every bootstrap run all its replicates: the rule never fires in the fits' loops, while `_check_bootstrap`
    still judges the intervals by it."""
    rule, check = fits._mostly_failed, fits._check_bootstrap
    never = lambda failed, total: False  # noqa: E731

    def judged(result):
        monkeypatch.setattr(fits, "_mostly_failed", rule)
        try:
            return check(result)
        finally:
            monkeypatch.setattr(fits, "_mostly_failed", never)

    monkeypatch.setattr(fits, "_mostly_failed", never)
    monkeypatch.setattr(fits, "_check_bootstrap", judged)


def _assert_stopped(f, n_bootstrap):
    stopped = f.details["bootstrap_stopped_after"]
    assert stopped < n_bootstrap and len(f.samples) == stopped and f.n_bootstrap == n_bootstrap
    assert 2 * f.details["bootstrap_failed"] > n_bootstrap
    assert all(math.isnan(lo) and math.isnan(hi) for lo, hi in f.intervals.values()), f.intervals
    note = f.details["intervals_unknown"]
    assert note.startswith(f"{f.details['bootstrap_failed']} of {stopped} bootstrap replicates could not be fitted")
    assert f"when the bootstrap stopped, {stopped} of the {n_bootstrap} asked for" in note
    return stopped


def test_frontier_bootstrap_stops_at_the_replicate_that_makes_most_fail(monkeypatch):
    calls = []
    f = fits.fit_loss_compute(_three_budgets(), n_bootstrap=200, seed=0, progress=lambda d, t: calls.append((d, t)))
    stopped = _assert_stopped(f, 200)
    # one replicate at a time: it stops at the 101st failure, counted in the loop as _check_bootstrap counts it
    assert f.details["bootstrap_failed"] == 101 and calls[-1] == (stopped, 200)
    _unstopped(monkeypatch)
    full = fits.fit_loss_compute(_three_budgets(), n_bootstrap=200, seed=0)
    # the same replicates as the bootstrap that runs them all, whose intervals are unknown too
    assert len(full.samples) == 200 and "bootstrap_stopped_after" not in full.details
    assert "intervals_unknown" in full.details and full.details["bootstrap_failed"] > 101
    pd.testing.assert_frame_equal(f.samples, full.samples.iloc[:stopped])


def test_approach1_bootstrap_stops_and_its_batches_change_no_replicate(monkeypatch):
    runs = grid_runs(5, 3, seed=1)
    metrics = curves_for(runs, seed=1)
    f = fits.fit_approach1(runs, metrics, n_bootstrap=400, seed=0)
    stopped = _assert_stopped(f, 400)
    assert f.details["bootstrap_failed"] == 201
    _unstopped(monkeypatch)
    full = fits.fit_approach1(runs, metrics, n_bootstrap=400, seed=0)
    assert "intervals_unknown" in full.details and len(full.samples) == 400
    pd.testing.assert_frame_equal(f.samples, full.samples.iloc[:stopped])
    # one replicate a batch: the envelopes, and so every replicate, are those of the batches the fit chose
    monkeypatch.setattr(fits, "_ENVELOPE_ELEMS", 1)
    one_by_one = fits.fit_approach1(runs, metrics, n_bootstrap=400, seed=0)
    pd.testing.assert_frame_equal(one_by_one.samples, full.samples)


def test_approach3_bootstrap_stops_once_most_replicates_have_failed(monkeypatch):
    f = fits.fit_approach3(_overflowing(), n_bootstrap=400, seed=0)
    stopped = _assert_stopped(f, 400)
    assert stopped < 300, stopped  # the replicates that fail finish with the others, well before the last
    assert f.details["bootstrap_unusable"] == f.details["bootstrap_failed"]
    assert "A overflows a float" in f.details["not_finite"]  # the other notes stand


def test_approach3_replicates_solved_before_a_stop_are_those_of_a_bootstrap_run_to_the_end(monkeypatch):
    seen = {}
    real = fits._bootstrap_approach3

    def spy(obj, theta, *args, **kwargs):
        seen.update(obj=obj, theta=theta)
        return real(obj, theta, *args, **kwargs)

    monkeypatch.setattr(fits, "_bootstrap_approach3", spy)
    fits.fit_approach3(_overflowing(), n_bootstrap=1)
    obj, theta = seen["obj"], seen["theta"]
    for max_elems in (100_000, 300):  # one batch of all 300 replicates; batches of 37
        out, solved, _ = real(obj, theta, 300, 2, 0, None, max_elems=max_elems)
        with monkeypatch.context() as m:
            _unstopped(m)
            full, all_solved, _ = real(obj, theta, 300, 2, 0, None, max_elems=max_elems)
        assert all_solved.all() and 0 < solved.sum() < 300, solved.sum()
        np.testing.assert_array_equal(out[solved], full[solved])
        assert np.isnan(out[~solved]).all()


def test_lbfgs_batch_told_of_each_problem_as_it_finishes_solves_them_alike():
    rng = np.random.default_rng(0)
    A = rng.normal(size=(40, 3))

    def fun(X, W):  # sum_i log cosh(x . a_i - t): smooth, convex, each problem its own t
        r = X @ A.T - np.arange(len(X))[:, None] / len(X)
        return np.log(np.cosh(r)).sum(1), np.tanh(r) @ A

    X0 = rng.normal(size=(25, 3))
    X0[3] = np.nan  # a start with no objective finishes at once
    seen = []
    X, F, conv = fits.lbfgs_batch(fun, X0, on_finish=lambda idx, X, F: seen.extend(idx) or False)
    X_ref, F_ref, conv_ref = fits.lbfgs_batch(fun, X0)
    np.testing.assert_array_equal(X, X_ref)
    np.testing.assert_array_equal(F, F_ref)
    assert sorted(seen) == list(range(25)) and seen[0] == 3
    # asked to stop, it returns at once: what finished is final, the rest not converged
    first = []

    def stop(idx, X, F):
        first.extend(idx)
        return len(first) >= 5

    X, F, conv = fits.lbfgs_batch(fun, X0, on_finish=stop)
    np.testing.assert_array_equal(X[first], X_ref[first])
    assert not conv[np.setdiff1d(np.arange(25), first)].any()


def test_a_bootstrap_that_does_not_stop_is_unchanged_and_says_nothing_of_stopping():
    f = fits.fit_loss_compute(grid_runs(5, 4, seed=0), n_bootstrap=100, seed=0)
    assert len(f.samples) == 100 and "bootstrap_stopped_after" not in f.details and "intervals_unknown" not in f.details
    # a majority failing at the very last replicate is no early stop: the note is the one of a full bootstrap
    s = pd.DataFrame({"E": [1.0, np.nan, np.nan], "A": [2.0, np.nan, np.nan], "alpha": [0.3, np.nan, np.nan]})
    r = fits._check_bootstrap(fits.FitResult("frontier", "", {"E": 1.0, "A": 2.0, "alpha": 0.3}, fits._intervals(s),
                                             np.zeros(3), pd.DataFrame(), 3, 3, True, samples=s))
    assert r.details["intervals_unknown"].startswith("2 of 3 bootstrap replicates could not be fitted")


def test_a_stopped_bootstrap_is_judged_against_the_replicates_asked_for():
    # 3 of 4 run replicates failed, of 5 asked for: more than half of the 5, so unknown
    s = pd.DataFrame({"k_N": [0.1, np.nan, np.nan, np.inf], "a": [0.5, np.nan, np.nan, 9.0],
                      "k_D": [5.0, np.nan, np.nan, 5.0], "b": [0.5, np.nan, np.nan, 0.5]})
    r = fits._check_bootstrap(fits.FitResult("approach1", "", {"k_N": 0.1, "a": 0.5, "k_D": 5.0, "b": 0.5},
                                             fits._intervals(s), np.zeros(3), pd.DataFrame(), 3, 5, True,
                                             details={"bootstrap_stopped_after": 4}, samples=s))
    assert r.details["bootstrap_failed"] == 3 and r.details["bootstrap_unusable"] == 1
    assert r.details["intervals_unknown"].startswith("3 of 4 bootstrap replicates could not be fitted")
    assert "when the bootstrap stopped, 4 of the 5 asked for" in r.details["intervals_unknown"]
    assert "1 of them with a law whose loss does not fall or whose constant overflows" in r.details["intervals_unknown"]


def test_the_report_table_says_a_bootstrap_stopped(monkeypatch):
    f = fits.fit_loss_compute(_three_budgets(), n_bootstrap=200, seed=0)
    table = report._fit_table({"frontier/softmax": f}, "frontier", ["softmax"])
    stopped = f.details["bootstrap_stopped_after"]
    assert table.loc[0, "bootstrap"] == f"200 (stopped after {stopped}: 101 failed; intervals unknown)"


def test_slab_fit_says_its_bootstrap_stopped(runs_db):
    from sweep.cli import app

    # five runs, as slab fit resamples no fewer: the three of _three_budgets and two it dominates (at more compute,
    # a higher loss), so that a replicate fits only when it draws all three (about 1 in 4 do)
    C = np.array([2e20, 2e20])
    N = np.array([1e9, 2e9])
    runs = pd.concat([_three_budgets(), runs_frame(N, C / (6 * N), np.array([3.0, 3.05]), prefix="dominated")],
                     ignore_index=True)
    url = runs_db(runs)
    result = CliRunner().invoke(app, ["--db", url, "fit", "--bootstrap", "200", "--json"])
    assert result.exit_code == 0, result.output
    assert "when the bootstrap stopped," in " ".join(result.stderr.split()), result.stderr


# ---------------------------------------------------------------------------------------------
# Approach 3's estimates at a bound


@pytest.mark.parametrize("law, flagged", [
    ({**HOFFMANN, "E": 0.0}, "E = "),  # no loss floor: E runs off towards 0 (3e-16)
    ({**HOFFMANN, "A": 1e-3}, "alpha = "),  # a size term too small to see: alpha flattens it into a constant
    ({**HOFFMANN, "beta": 3.0, "B": 1e20}, "beta = "),  # a data term gone within the runs: beta flattens as well
])
def test_approach3_says_which_estimate_sits_at_a_bound(law, flagged):
    f = fits.fit_approach3(random_runs(60, noise=0.01, seed=0, law=law), n_bootstrap=0)
    note = f.details["at_bound"]
    assert note.startswith(flagged) and "sits at its lower bound 0" in note, note
    assert note.count("sits at") == 1, note
    name = flagged.split()[0]
    assert f.estimates[name] < 1e-3, f.estimates[name]
    assert fits.FitResult.from_dict(f.to_dict()).details["at_bound"] == note


def test_approach3_within_its_bounds_says_nothing_of_them():
    for seed in range(2):
        f = fits.fit_approach3(random_runs(60, noise=0.01, seed=seed), n_bootstrap=0)
        assert "at_bound" not in f.details, f.details["at_bound"]


def test_the_findings_quote_an_estimate_at_a_bound():
    f = fits.fit_approach3(random_runs(60, noise=0.01, seed=0, law={**HOFFMANN, "E": 0.0}), n_bootstrap=0)
    [line] = [s for s in compare.summary_findings(approach3={"softmax": f}) if s.startswith("softmax: approach 3")]
    assert line.endswith(f"Note: {f.details['at_bound']}."), line
