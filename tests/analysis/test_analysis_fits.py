"""Fits recover known laws from synthetic data, their intervals cover the truth, bad input is refused."""

import json
import math

import numpy as np
import pandas as pd
import pytest

from analysis import fits
from analysis.fits import FitError, FitResult
from analysis.synthetic import HOFFMANN, curves_for, grid_runs, isoflop_runs, random_runs, runs_frame, study

TRUE_A = HOFFMANN["beta"] / (HOFFMANN["alpha"] + HOFFMANN["beta"])  # N_opt exponent, 0.4516
TRUE_GAMMA = HOFFMANN["alpha"] * HOFFMANN["beta"] / (HOFFMANN["alpha"] + HOFFMANN["beta"])  # L*(C) exponent


def inside(fit: FitResult, name: str, value: float) -> bool:
    lo, hi = fit.interval(name)
    return lo <= value <= hi


# ---------------------------------------------------------------------------------------------
# Approach 3


def test_approach3_recovers_hoffmann_and_intervals_cover_truth():
    covered = {k: 0 for k in ("E", "alpha", "beta", "A", "B")}
    for seed in range(10):
        runs = grid_runs(20, 10, noise=0.01, seed=seed)
        f = fits.fit_approach3(runs, n_bootstrap=200, seed=seed)
        assert f.converged, f.details
        assert f.n_points == 200 and f.n_bootstrap == 200
        e = f.estimates
        assert abs(e["E"] - 1.69) < 0.05
        assert abs(e["alpha"] - 0.34) < 0.03
        assert abs(e["beta"] - 0.28) < 0.015
        assert abs(math.log(e["A"] / 406.4)) < 0.5 and abs(math.log(e["B"] / 410.7)) < 0.3
        for k in covered:
            covered[k] += inside(f, k, HOFFMANN[k])
    assert covered["E"] >= 7 and covered["alpha"] >= 7 and covered["beta"] >= 7, covered


def test_approach3_derived_quantities_follow_from_the_parameters():
    f = fits.fit_approach3(random_runs(120, seed=3), n_bootstrap=50, budgets=[1e21, 5.76e23])
    e = f.estimates
    al, be = e["alpha"], e["beta"]
    assert e["a"] == pytest.approx(be / (al + be)) and e["b"] == pytest.approx(al / (al + be))
    assert e["G"] == pytest.approx((al * e["A"] / (be * e["B"])) ** (1 / (al + be)))
    for C in (1e21, 5.76e23):
        N, D = e[f"N_opt@{C:.3g}"], e[f"D_opt@{C:.3g}"]
        assert 6 * N * D == pytest.approx(C, rel=1e-9)
        assert e[f"tokens_per_param@{C:.3g}"] == pytest.approx(D / N)
        # the optimum of L(N, C / 6N) really is at N_opt
        Ns = N * np.array([0.8, 1.0, 1.25])
        L = fits.chinchilla_law(Ns, C / (6 * Ns), e["E"], e["A"], e["B"], al, be)
        assert L[1] < L[0] and L[1] < L[2]
    for k, (lo, hi) in f.intervals.items():
        assert lo <= hi, k
    # Chinchilla's rule of thumb: about 20 tokens per parameter at its budget
    assert 10 < e["tokens_per_param@5.76e+23"] < 120


def test_batched_lbfgs_matches_scipy_on_bootstrap_replicates():
    pts = fits.prepare_points(random_runs(150, seed=1))
    obj = fits._Approach3Objective(np.log(pts["N"].to_numpy()), np.log(pts["D"].to_numpy()),
                                   np.log(pts["L"].to_numpy()), fits.HUBER_DELTA)
    theta = obj.minimize(np.array([0.0, 0.0, 0.5, 0.3, 0.3])).x
    rng = np.random.default_rng(0)
    W = rng.multinomial(150, np.full(150, 1 / 150), size=12).astype(float)
    starts = theta + np.array([1.0, 1.0, 0.3, 0.1, 0.1]) * rng.standard_normal((12, 5))
    X, F, conv = fits.lbfgs_batch(obj.batch, starts, W)
    assert conv.all()
    for i in range(12):
        ref = obj.minimize(starts[i], W[i])
        assert F[i] <= ref.fun * (1 + 1e-9) + 1e-9
        np.testing.assert_allclose(X[i], ref.x, atol=2e-5)


def test_approach3_gradient_is_exact():
    pts = fits.prepare_points(random_runs(40, seed=2))
    obj = fits._Approach3Objective(np.log(pts["N"].to_numpy()), np.log(pts["D"].to_numpy()),
                                   np.log(pts["L"].to_numpy()), 0.05)  # wide delta: both Huber branches
    th = np.array([1.0, 2.0, 0.4, 0.35, 0.3])
    f0, g = obj(th)
    num = np.array([(obj(th + h)[0] - obj(th - h)[0]) / 2e-6 for h in np.eye(5) * 1e-6])
    np.testing.assert_allclose(g, num, rtol=1e-4, atol=1e-6)


def test_approach3_batch_equals_its_plain_reference_and_keeps_few_temporaries():
    """The grid screen evaluates 4,500 x 64 arrays hundreds of times per fit: a fresh temporary per operation (about
    a dozen alive at once) made allocation a good part of approach 3 at paper scale. The in-place objective must give
    exactly the plain one's numbers, with weights and in both Huber branches."""
    import tracemalloc

    pts = fits.prepare_points(random_runs(64, seed=4))
    obj = fits._Approach3Objective(np.log(pts["N"].to_numpy()), np.log(pts["D"].to_numpy()),
                                   np.log(pts["L"].to_numpy()), 0.05)
    TH = obj.grid_starts()[::4]  # 1,125 starts, far from and near the optimum
    W = np.random.default_rng(0).multinomial(64, np.full(64, 1 / 64), size=len(TH)).astype(float)
    for weights in (None, W):
        F, G = obj.batch(TH, weights)
        F_ref, G_ref = obj._batch_reference(TH, weights)
        assert np.array_equal(F, F_ref, equal_nan=True) and np.array_equal(G, G_ref, equal_nan=True)
    tracemalloc.start()
    obj.batch(TH, W)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 8.5 * TH.shape[0] * 64 * 8  # (k, n) float arrays alive at once: the plain objective holds 14


# ---------------------------------------------------------------------------------------------
# Loss against compute


def known_frontier_runs(seed=0, noise=0.002):
    """Runs on L(C) = 1.8 + 3000 C^-0.18 plus dominated runs 5% above it."""
    rng = np.random.default_rng(seed)
    C = np.geomspace(1e17, 1e22, 15)
    L = 1.8 + 3000 * C**-0.18
    N = np.sqrt(C / 120)
    D = C / (6 * N)
    losses = np.r_[L * np.exp(noise * rng.standard_normal(15)), L * 1.05]
    return runs_frame(np.r_[N, N * 2], np.r_[D, D / 2], losses)


def test_frontier_fit_recovers_a_known_law_and_ignores_dominated_runs():
    f = fits.fit_loss_compute(known_frontier_runs(), n_bootstrap=300, seed=0)
    assert f.method == "frontier" and f.n_points == 15
    assert f.estimates["E"] == pytest.approx(1.8, abs=0.1)
    assert f.estimates["alpha"] == pytest.approx(0.18, abs=0.02)
    assert inside(f, "alpha", 0.18) and inside(f, "E", 1.8)
    assert np.abs(f.residuals).max() < 0.01


def test_pure_power_frontier_is_exact_on_exact_data():
    C = np.geomspace(1e18, 1e22, 8)
    runs = runs_frame(np.sqrt(C / 120), C / (6 * np.sqrt(C / 120)), 5.0 * C**-0.05)
    f = fits.fit_loss_compute(runs, form="power", n_bootstrap=20)
    assert f.estimates["A"] == pytest.approx(5.0, rel=1e-6)
    assert f.estimates["alpha"] == pytest.approx(0.05, rel=1e-6)


def test_frontier_bootstrap_counts_a_run_drawn_twice():
    # On final points the power law is least squares in log space, so the bootstrap spread of alpha must match
    # the slope's standard error. Fitting each replicate's distinct runs once (a run drawn twice counted once)
    # refits on ~63% of the points and gave intervals about 20% too narrow.
    ratios = []
    for seed in range(20):
        rng = np.random.default_rng(seed)
        C = np.geomspace(1e17, 1e21, 30)
        N = np.sqrt(C / 120)
        L = 5.0 * C**-0.05 * np.exp(0.002 * rng.standard_normal(30))
        f = fits.fit_loss_compute(runs_frame(N, C / (6 * N), L, prefix=f"p{seed}"), form="power", n_bootstrap=400,
                                  seed=seed)
        x, y = np.log(f.points["C"].to_numpy()), np.log(f.points["L"].to_numpy())
        X = np.column_stack([np.ones_like(x), x])
        _, rss, *_ = np.linalg.lstsq(X, y, rcond=None)
        se = math.sqrt(rss[0] / (len(x) - 2) * np.linalg.inv(X.T @ X)[1, 1])
        ratios.append(f.samples["alpha"].std() / se)
    assert 0.9 < np.mean(ratios) < 1.15, np.mean(ratios)


def test_frontier_from_curves_recovers_the_compute_optimal_law():
    N = np.geomspace(1e7, 1e10, 24)
    runs = runs_frame(N, 200 * N, fits.chinchilla_law(N, 200 * N, **HOFFMANN))
    metrics = curves_for(runs, n_steps=200, noise=0.002)
    f = fits.fit_loss_compute(runs, metrics=metrics, n_bootstrap=100)
    assert f.details["source"] == "curves"
    # L*(C) = E + K C^-(alpha beta / (alpha + beta)) for C = 6 N D
    assert f.estimates["E"] == pytest.approx(1.69, abs=0.03)
    assert f.estimates["alpha"] == pytest.approx(TRUE_GAMMA, abs=0.01)
    env = fits.curve_envelope(metrics, runs)
    assert np.all(np.diff(env["L"]) < 0) and np.all(np.diff(env["C"]) > 0)


def test_frontier_from_curves_drops_points_where_the_smallest_covering_size_wins():
    # In the synthetic study the smallest models train for many tokens, so the lowest compute bins are
    # covered only by the early training of larger models: those points bound the frontier, they are not on it.
    s = study(300, seed=0)
    runs = s.runs[s.runs["arch"] == "softmax"]
    f = fits.fit_loss_compute(runs, metrics=s.metrics[s.metrics["run_id"].isin(runs["run_id"])], n_bootstrap=100)
    assert f.estimates["E"] == pytest.approx(1.69, abs=0.05)
    assert f.estimates["alpha"] == pytest.approx(TRUE_GAMMA, abs=0.01)
    assert inside(f, "alpha", TRUE_GAMMA) and inside(f, "E", 1.69)


def test_final_point_frontier_takes_one_point_per_isoflop_budget():
    runs = isoflop_runs((1e18, 1e19, 1e20, 1e21), 9, seed=1)
    # compute as a database records it: tokens rounded, so one budget's runs differ in the last digits
    runs["flops"] = runs["budget"] * (1 + 1e-5 * np.arange(len(runs)) % 3)
    f = fits.fit_loss_compute(runs, n_bootstrap=0)
    assert f.n_points == 4
    best = runs.loc[runs.groupby("budget")["val_loss"].idxmin(), "val_loss"].to_numpy()
    np.testing.assert_allclose(f.points["L"].to_numpy(), np.sort(best)[::-1])


def test_frontier_of_one_budget_or_one_size_is_refused():
    with pytest.raises(FitError, match="at least 3 frontier points, got 1"):
        fits.fit_loss_compute(isoflop_runs((1e19,), 12, seed=1), n_bootstrap=0)
    one = grid_runs(1, 12, seed=1)
    with pytest.raises(FitError, match="at least 2 model sizes"):
        fits.fit_loss_compute(one, metrics=curves_for(one, seed=1), n_bootstrap=0)
    # nor is a replicate that drew one size only (1 in 9 of three runs'): it had fitted that model's training curve
    N = np.array([2e6, 6e6, 1.4e7])
    three = runs_frame(N, 3 * N, fits.chinchilla_law(N, 3 * N, **HOFFMANN))
    f = fits.fit_loss_compute(three, metrics=curves_for(three, seed=1), edges="keep", n_bootstrap=450, seed=0)
    assert 30 <= f.details["bootstrap_failed"] <= 70, f.details


# ---------------------------------------------------------------------------------------------
# Approaches 1 and 2


def test_approach1_recovers_the_allocation_exponents():
    N = np.geomspace(1e7, 1e10, 24)
    runs = runs_frame(N, 200 * N, fits.chinchilla_law(N, 200 * N, **HOFFMANN))
    f = fits.fit_approach1(runs, curves_for(runs, n_steps=200, noise=0.002), n_bootstrap=300)
    assert f.estimates["a"] == pytest.approx(TRUE_A, abs=0.03)
    assert f.estimates["b"] == pytest.approx(1 - TRUE_A, abs=0.03)
    assert inside(f, "a", TRUE_A)
    assert f.n_points >= 10
    # each envelope point is the lowest curve at its budget: it sits on the true IsoFLOP optimum's side
    assert set(f.points.columns) >= {"C", "N_opt", "D_opt", "L", "run_id"}


@pytest.mark.parametrize("budget_column", [True, False])
def test_approach2_recovers_the_exponent_on_an_isoflop_grid(budget_column):
    runs = isoflop_runs((1e18, 1e19, 1e20, 1e21, 1e22), 9, noise=0.003, seed=4, budget_column=budget_column)
    f = fits.fit_approach2(runs, n_bootstrap=500)
    assert len(f.details["minima"]) == 5
    assert f.estimates["a"] == pytest.approx(TRUE_A, abs=0.02)
    assert f.estimates["a"] + f.estimates["b"] == pytest.approx(1.0)
    assert inside(f, "a", TRUE_A)
    for m in f.details["minima"]:
        n_true, _ = fits.optimal_allocation(m["C"], HOFFMANN["A"], HOFFMANN["B"], HOFFMANN["alpha"], HOFFMANN["beta"])
        assert m["N_opt"] == pytest.approx(n_true, rel=0.25)


@pytest.mark.parametrize("spread, low, high", [(2.0, 1.002, 1.005), (4.0, 1.012, 1.016), (8.0, 1.03, 1.036),
                                               (16.0, 1.055, 1.064)])
def test_approach2_parabola_bias(spread, low, high):
    # the README's figures: an IsoFLOP curve is not a parabola in ln N, so approach 2 puts N_opt high, the more
    # so the wider the sizes spread around the optimum (the exponent a is not affected: a shift at every budget)
    f = fits.fit_approach2(isoflop_runs((1e18, 1e19, 1e20, 1e21), 9, spread=spread, noise=0.0, seed=0), n_bootstrap=0)
    law = [HOFFMANN[k] for k in ("A", "B", "alpha", "beta")]
    ratios = [m["N_opt"] / fits.optimal_allocation(m["C"], *law)[0] for m in f.details["minima"]]
    assert len(ratios) == 4 and all(low < r < high for r in ratios), ratios
    assert f.estimates["a"] == pytest.approx(TRUE_A, abs=0.003)


# Compute counted as the project counts it (LM head, attention): per token k N^g rather than 6 N.
RULE = fits.ComputeRule(k=2.5, g=1.06)


def true_allocation(C, rule=RULE):
    """N_opt, D_opt minimising Hoffmann's law over N at compute C under `rule`, by brute force."""
    N = np.geomspace(1e6, 1e12, 200_001)
    D = rule.tokens(C, N)
    i = np.argmin(fits.chinchilla_law(N, D, **HOFFMANN))
    return N[i], D[i]


def test_compute_rule_is_chinchillas_on_6nd_data_and_recovers_another():
    N, D = np.geomspace(1e7, 1e9, 6), np.geomspace(1e9, 1e11, 6)
    assert fits.ComputeRule.fit(N, D, 6 * N * D) == fits.ComputeRule()
    got = fits.ComputeRule.fit(N, D, RULE.k * N**RULE.g * D)
    assert got.k == pytest.approx(RULE.k, rel=1e-9) and got.g == pytest.approx(RULE.g, rel=1e-9)


@pytest.mark.parametrize("C", [1e18, 1e21])
def test_optimal_allocation_minimises_the_law_under_a_compute_rule(C):
    N, D = fits.optimal_allocation(C, HOFFMANN["A"], HOFFMANN["B"], HOFFMANN["alpha"], HOFFMANN["beta"], RULE)
    assert RULE.k * N**RULE.g * D == pytest.approx(C, rel=1e-12)
    n_true, _ = true_allocation(C)
    assert N == pytest.approx(n_true, rel=1e-3)


def test_approaches_2_and_3_allocate_in_the_runs_own_compute():
    # IsoFLOP runs whose flops are k N^g D: D_opt must be what the budget buys at N_opt, not C / 6 N_opt
    rows = []
    for C in (1e18, 1e19, 1e20, 1e21):
        n_opt, _ = true_allocation(C)
        N = n_opt * np.geomspace(1 / 8, 8, 9)
        rows.append(pd.DataFrame({"N": N, "D": RULE.tokens(C, N), "C": C}))
    grid = pd.concat(rows, ignore_index=True)
    L = fits.chinchilla_law(grid["N"], grid["D"], **HOFFMANN).to_numpy()
    runs = runs_frame(grid["N"].to_numpy(), grid["D"].to_numpy(), L, extra={"flops": grid["C"].to_numpy()})
    f2 = fits.fit_approach2(runs, n_bootstrap=0, budgets=[1e20])
    assert f2.details["compute"] == pytest.approx({"k": RULE.k, "g": RULE.g}, rel=1e-9)
    for m in f2.details["minima"]:
        assert RULE.k * m["N_opt"] ** RULE.g * m["D_opt"] == pytest.approx(m["C"], rel=1e-9)
    n_true, d_true = true_allocation(1e20)
    assert f2.estimates["tokens_per_param@1e+20"] == pytest.approx(d_true / n_true, rel=0.1)
    f3 = fits.fit_approach3(runs, n_bootstrap=0, budgets=[1e20])
    assert f3.estimates["N_opt@1e+20"] == pytest.approx(n_true, rel=0.01)
    assert f3.estimates["D_opt@1e+20"] == pytest.approx(d_true, rel=0.01)


def test_isoflop_groups_cluster_runs_within_tolerance():
    pts = pd.DataFrame({"C": [1e18, 1.03e18, 0.99e18, 1e19, 1.04e19, 3e19]})
    labels = fits.isoflop_groups(pts)
    assert labels[0] == labels[1] == labels[2]
    assert labels[3] == labels[4] != labels[5]


# ---------------------------------------------------------------------------------------------
# Bad input


def _runs(n=8, **over):
    r = random_runs(n, seed=0)
    for k, v in over.items():
        r[k] = v
    return r


@pytest.mark.parametrize(
    "make, call, message",
    [
        (lambda: _runs(4), fits.fit_approach3, "needs at least 5 runs"),
        (lambda: _runs(2), lambda r: fits.fit_loss_compute(r, n_bootstrap=0), "at least 3 frontier points"),
        (lambda: _runs(20, nonembed_params=1e8), fits.fit_approach3, "at least 3 distinct model sizes"),
        (lambda: _runs(20, nonembed_params=1e8), fits.fit_approach2, "at least 2 FLOP budgets"),
        (lambda: _runs(8, val_loss=np.nan, final_loss=np.nan), fits.fit_approach3, "no finite loss"),
        (lambda: _runs(8, val_loss=-1.0), fits.fit_approach3, "loss <= 0"),
        (lambda: _runs(8, nonembed_params=0.0), fits.fit_approach3, "non-positive nonembed_params"),
        (lambda: _runs(8, tokens=-5.0), fits.fit_approach3, "non-positive tokens"),
        (lambda: _runs(8).drop(columns=["tokens"]), fits.fit_approach3, "missing column(s) 'tokens'"),
        (lambda: _runs(8).drop(columns=["nonembed_params"]), fits.fit_approach3, "choose another params_col"),
        (lambda: _runs(8).iloc[:0], fits.fit_approach3, "empty"),
    ],
)
def test_bad_input_raises_fit_error_saying_what_is_wrong(make, call, message):
    with pytest.raises(FitError) as info:
        call(make())
    assert message in str(info.value)
    assert isinstance(info.value, ValueError)


def test_one_size_only_is_refused_by_approach1():
    runs = runs_frame(np.full(5, 1e8), np.geomspace(1e9, 1e10, 5), np.full(5, 3.0))
    with pytest.raises(FitError, match="at least 3 model sizes"):
        fits.fit_approach1(runs, curves_for(runs, n_steps=5))


def test_approach1_needs_two_sizes_among_the_envelope_winners():
    # Four sizes on one token budget: the budgets approach 1 keeps are all won by one run, so N_opt is flat and
    # the "exponent" was a = 1.5e-14 with a zero-width interval [1.5e-14, 1.5e-14] (181 of 200 replicates
    # failed, the rest equal), printed as a fit. A replicate whose budgets one size wins is likewise a failure.
    N = np.geomspace(5e7, 2e9, 4)
    runs = runs_frame(N, np.full(4, 1e11), fits.chinchilla_law(N, 1e11, **HOFFMANN))
    with pytest.raises(FitError, match="one size wins"):
        fits.fit_approach1(runs, curves_for(runs, n_steps=80, noise=0.002), n_bootstrap=200)


def test_val_loss_falls_back_to_final_loss():
    r = _runs(6)
    r.loc[2, "val_loss"] = np.nan
    pts = fits.prepare_points(r)
    assert pts.loc[2, "L"] == r.loc[2, "final_loss"]


# ---------------------------------------------------------------------------------------------
# External CSV


def test_external_csv_in_besiroglu_format_is_loaded_and_fitted(tmp_path):
    runs = grid_runs(12, 8, noise=0.005, seed=5)
    path = tmp_path / "chinchilla.csv"
    pd.DataFrame({"Model Size": runs["nonembed_params"], "Training FLOP": runs["flops"], "loss": runs["val_loss"]}).to_csv(
        path, index=False
    )
    frame = fits.load_csv(path, params_col="Model Size", flops_col="Training FLOP")
    assert list(frame.columns) == ["run_id", "params", "tokens", "flops", "loss"]
    np.testing.assert_allclose(frame["tokens"], runs["tokens"], rtol=1e-12)
    f = fits.fit_approach3(frame, params_col="params", n_bootstrap=50)
    assert f.estimates["alpha"] == pytest.approx(0.34, abs=0.03)
    assert f.estimates["E"] == pytest.approx(1.69, abs=0.05)


def test_external_csv_errors_name_the_file_and_column(tmp_path):
    with pytest.raises(FitError, match="no such file"):
        fits.load_csv(tmp_path / "absent.csv")
    with pytest.raises(FitError, match="a folder, not a CSV file"):  # it had said "no such file"
        fits.load_csv(tmp_path)
    path = tmp_path / "bad.csv"
    path.write_text("params,loss\n1e8,3.0\n")
    with pytest.raises(FitError) as info:
        fits.load_csv(path)
    assert "bad.csv" in str(info.value) and "tokens (or flops)" in str(info.value)
    path.write_text("params,tokens,loss\n1e8,1e9,3.0\n2e8,oops,3.1\n")
    with pytest.raises(FitError, match="'tokens' must be a positive number; bad on line\\(s\\) 3"):
        fits.load_csv(path)
    # every bad column in one message, not the first alone
    path.write_text("params,tokens,loss\n1e8,1e9,3.0\n-2,1e9,abc\n2e8,x,3.1\n")
    with pytest.raises(FitError) as info:
        fits.load_csv(path)
    for col, line in (("params", 3), ("tokens", 4), ("loss", 3)):
        assert f"column '{col}' must be a positive number; bad on line(s) {line}" in str(info.value)
    # a column named by the caller must exist: it had fallen back to flops / 6N without a word
    path.write_text("params,tokens,loss,flops\n1e8,1e9,3.0,6e17\n")
    for named in ({"tokens_col": "nope"}, {"flops_col": "nope"}):
        with pytest.raises(FitError, match="missing column\\(s\\) 'nope'"):
            fits.load_csv(path, **named)


def test_external_csv_notes_repeated_rows_and_flops_off_6nd(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("params,tokens,loss,flops\n1e8,1e9,3.0,6e17\n2e8,1e9,2.9,1.2e18\n1e8,1e9,3.0,6e17\n")
    notes = fits.load_csv(path).attrs["notes"]
    assert len(notes) == 1 and notes[0].startswith("1 row(s) repeat an earlier row exactly")
    path.write_text("params,tokens,loss,flops\n1e8,1e9,3.0,6e18\n2e8,1e9,2.9,1.2e19\n")
    notes = fits.load_csv(path).attrs["notes"]
    assert len(notes) == 1 and "'flops' is 10x 6 x params x tokens" in notes[0]
    path.write_text("params,tokens,loss\n1e8,1e9,3.0\n2e8,1e9,2.9\n")
    assert fits.load_csv(path).attrs["notes"] == []


def test_external_csv_with_blank_flops_cells_says_where_c_comes_from(tmp_path):
    """A flops column with a blank cell was noted as "'flops' is nanx 6 x params x tokens", hiding both its convention
    (here 10x) and that the blank rows' C is 6 N D, another convention mixed into the same fit."""
    path = tmp_path / "d.csv"
    path.write_text("params,tokens,loss,flops\n1e8,1e9,3.0,6e18\n2e8,1e9,2.9,\n4e8,1e9,2.8,2.4e19\n")
    notes = fits.load_csv(path).attrs["notes"]
    assert not any("nan" in n for n in notes), notes
    assert any("'flops' is 10x 6 x params x tokens" in n for n in notes), notes
    assert any(n.startswith("1 row(s) have no 'flops' (line(s) 3)") for n in notes), notes
    assert fits.prepare_points(fits.load_csv(path), "params")["C"].tolist() == [6e18, 1.2e18, 2.4e19]
    path.write_text("params,tokens,loss,flops\n1e8,1e9,3.0,6e17\n2e8,1e9,2.9,\n")  # the 6 N D convention
    notes = fits.load_csv(path).attrs["notes"]
    assert len(notes) == 1 and notes[0].startswith("1 row(s) have no 'flops'"), notes


# ---------------------------------------------------------------------------------------------
# Results


@pytest.fixture(scope="module")
def every_fit():
    runs = isoflop_runs((1e18, 1e19, 1e20), 7, seed=1)
    metrics = curves_for(runs, n_steps=30)
    return [
        fits.fit_approach3(runs, n_bootstrap=20),
        fits.fit_approach2(runs, n_bootstrap=20),
        fits.fit_loss_compute(runs, metrics=metrics, n_bootstrap=20),
        fits.fit_loss_compute(runs, form="power", n_bootstrap=20),
        fits.fit_approach1(runs, metrics, n_bootstrap=20),
    ]


def test_to_dict_round_trips_through_json(every_fit):
    for f in every_fit:
        d = f.to_dict()
        text = json.dumps(d, allow_nan=False)
        assert json.loads(text) == d
        back = FitResult.from_dict(json.loads(text))
        assert back.method == f.method and back.n_points == f.n_points
        assert back.estimates == pytest.approx(f.estimates)
        assert set(back.intervals) == set(f.intervals)
        assert len(back.points) == len(f.points)


def test_every_result_has_intervals_for_every_estimate(every_fit):
    for f in every_fit:
        assert set(f.intervals) == set(f.estimates), f.method
        assert len(f.residuals) > 0 and f.n_points == len(f.points)


def test_intervals_resting_on_a_minority_of_replicates_are_unknown(caplog):
    # Three runs at three budgets: a replicate fits only when it draws all three (2 in 9 do), i.e. the data
    # itself, so the "95% interval" was [E, E], zero width, from the replicates that happened to work.
    C = np.array([1.2e18, 1.08e19, 1.2e20])
    N = np.sqrt(C / 120)
    runs = runs_frame(N, C / (6 * N), np.array([3.1, 2.8, 2.6]))
    with caplog.at_level("INFO", logger="analysis.fits"):
        f = fits.fit_loss_compute(runs, n_bootstrap=200, seed=0)
    assert f.details["bootstrap_failed"] > 100
    assert all(math.isnan(lo) and math.isnan(hi) for lo, hi in f.intervals.values()), f.intervals
    assert "intervals_unknown" in f.details and "bootstrap replicates" in caplog.text
    from analysis.compare import compare_archs

    both = pd.concat([runs.assign(arch="softmax"), runs.assign(arch="lightning", val_loss=runs["val_loss"] * 1.01,
                                                              run_id=runs["run_id"] + "x")])
    gaps = compare_archs(both, n_bootstrap=200).gaps  # nor is a gap drawn from those replicates known
    assert gaps["rel_gap"].notna().all() and gaps["rel_gap_lo"].isna().all()
    # most replicates fitted: the interval stands, with the failures counted
    g = fits.fit_approach2(isoflop_runs((1e18, 1e19, 1e20), 4, spread=3, seed=1), n_bootstrap=200, seed=0)
    assert 0 < g.details["bootstrap_failed"] < 100 and np.isfinite(g.interval("a")).all()
    assert "intervals_unknown" not in g.details


def test_bootstrap_is_seeded_and_reports_progress():
    runs = random_runs(60, seed=7)
    calls = []
    a = fits.fit_approach3(runs, n_bootstrap=40, seed=1, progress=lambda d, t: calls.append((d, t)))
    b = fits.fit_approach3(runs, n_bootstrap=40, seed=1)
    c = fits.fit_approach3(runs, n_bootstrap=40, seed=2)
    assert a.intervals == b.intervals and a.intervals != c.intervals
    assert calls and calls[-1] == (40, 40)
    assert all(d1 <= d2 for (d1, _), (d2, _) in zip(calls, calls[1:]))


def test_approach3_reports_unconfirmed_convergence_with_a_single_start():
    runs = random_runs(80, seed=4)
    one = fits.fit_approach3(runs, n_starts=1, n_bootstrap=0)
    many = fits.fit_approach3(runs, n_bootstrap=0)
    assert not one.converged and one.details["n_starts_agreeing"] == 1
    assert many.converged and many.details["n_starts_agreeing"] >= 2
    assert many.details["scipy_check_gain"] <= 1e-8 * many.details["objective"]
    assert many.intervals == {} and many.samples is None


def test_compute_needed_keeps_failed_replicates_missing():
    out = fits.compute_needed(np.array([2.5, np.nan, 1.0]), 1.9, 2000.0, 0.17)
    assert np.isfinite(out[0]) and np.isnan(out[1]) and np.isinf(out[2])

def test_allocation_of_a_fit_with_a_negative_exponent_is_nan_not_an_error():
    """A noisy approach-3 fit can end with alpha < 0 (the demo's did): derived allocations are NaN."""
    import math

    from analysis.fits import _with_allocation

    est = {"E": 1.0, "A": 2.0, "B": 3.0, "alpha": -0.2, "beta": 0.3}
    out, _ = _with_allocation(est, None, [1e15])
    assert math.isnan(out["G"]) and math.isnan(out["N_opt@1e+15"])
    ok, _ = _with_allocation({**est, "alpha": 0.3}, None, [1e15])
    assert math.isfinite(ok["G"]) and ok["N_opt@1e+15"] > 0


def test_approach3_refuses_designs_that_cannot_identify_it():
    with pytest.raises(FitError, match="at least 3 distinct token counts"):
        fits.fit_approach3(grid_runs(10, 2, seed=1), n_bootstrap=0)
    with pytest.raises(FitError, match="N and D move together"):
        fits.fit_approach3(isoflop_runs((1e19,), 12, seed=1), n_bootstrap=0)


def test_runs_not_done_are_left_out_and_repeated_ids_refused(caplog):
    r = _runs(8)
    r["status"] = ["done"] * 6 + ["diverged", "running"]
    with caplog.at_level("WARNING"):
        pts = fits.prepare_points(r)
    assert list(pts["run_id"]) == list(r["run_id"][:6]) and "left out 2 run(s) not done" in caplog.text
    with pytest.raises(FitError, match="appear more than once"):
        fits.prepare_points(pd.concat([_runs(4), _runs(4).iloc[:1]]))


def test_approach1_budgets_are_chosen_by_design_not_by_where_the_winner_landed():
    # Sizes trained to 1,000 tokens per parameter, curves from 2% of each run: the budgets near the data's edge
    # survived the old rule only where noise had put the winner on the larger side, and the intervals of
    # tokens per parameter missed the truth (50) in 30 of 30 replications (68 +- 8).
    C = 1e21
    n_true, d_true = fits.optimal_allocation(C, HOFFMANN["A"], HOFFMANN["B"], HOFFMANN["alpha"], HOFFMANN["beta"])
    N = np.geomspace(1e7, 1e10, 31)
    for seed in range(3):
        runs = runs_frame(N, 1000 * N, fits.chinchilla_law(N, 1000 * N, **HOFFMANN), prefix=f"a1{seed}")
        f = fits.fit_approach1(runs, curves_for(runs, n_steps=60, noise=0.003, seed=300 + seed), n_bootstrap=200,
                               seed=seed, budgets=[C])
        assert inside(f, "tokens_per_param@1e+21", d_true / n_true), f.interval("tokens_per_param@1e+21")
        assert inside(f, "a", TRUE_A)


def test_approach1_budgets_count_sizes_not_runs():
    """A second seed of every run (here with the same curve) is no new size: approach 1 uses the same budgets. Its
    rule counted runs, so two runs of the smallest size made it the "second smallest size" too, and 2 budgets
    became 31, edge budgets among them."""
    N = np.geomspace(1e7, 1e10, 12)
    runs = [runs_frame(N, 1000 * N, fits.chinchilla_law(N, 1000 * N, **HOFFMANN), prefix=p) for p in ("s0", "s1")]
    curves = [curves_for(r, n_steps=40, noise=0.003, seed=5) for r in runs]
    one = fits.fit_approach1(runs[0], curves[0], n_bootstrap=0)
    two = fits.fit_approach1(pd.concat(runs, ignore_index=True), pd.concat(curves, ignore_index=True), n_bootstrap=0)
    assert one.n_points >= 2
    pd.testing.assert_frame_equal(one.points.drop(columns="run_id"), two.points.drop(columns="run_id"))
    assert one.estimates == pytest.approx(two.estimates)


def test_the_shipped_isoflop_plan_centres_each_budget_so_approach2_recovers_a():
    # plans/isoflop.csv with losses from Hoffmann's law on its runs' own sizes, tokens and FLOPs: approach 2 finds a
    # within 0.01 of the true exponent (the old fixed 5M-160M grid for every budget gave 0.430 against 0.468)
    from pathlib import Path

    from sweep.plan import load_plan

    plan = load_plan(Path(__file__).resolve().parents[2] / "plans" / "isoflop.csv")
    rows = [dict(run_id=r.spec.run_id, arch=r.spec.arch, nonembed_params=r.spec.derived()["nonembed_params"],
                 tokens=r.spec.tokens, flops=r.spec.derived()["flops"]) for r in plan.runs]
    runs = pd.DataFrame(rows)
    runs["val_loss"] = fits.chinchilla_law(runs["nonembed_params"], runs["tokens"], **HOFFMANN)
    for arch, sub in runs.groupby("arch"):
        f = fits.fit_approach2(sub, n_bootstrap=0)
        rule = fits.ComputeRule.fit(sub["nonembed_params"], sub["tokens"], sub["flops"])
        N = np.geomspace(1e6, 1e10, 40_001)
        n_true = [N[np.argmin(fits.chinchilla_law(N, rule.tokens(C, N), **HOFFMANN))] for C in (1e17, 1e18)]
        a_true = math.log(n_true[1] / n_true[0]) / math.log(10)
        assert len(f.details["minima"]) == 3 and f.estimates["a"] == pytest.approx(a_true, abs=0.01), arch


def test_a_frontier_cut_short_by_a_loss_that_stops_falling_says_so():
    """Equal losses at six budgets leave one frontier point: the error had asked for more compute budgets."""
    runs = isoflop_runs((1e18, 1e19, 1e20, 1e21, 1e22, 1e23), 3, seed=1).assign(val_loss=3.0)
    with pytest.raises(FitError, match=r"got 1 from 18 run\(s\) at 6 compute budgets: the loss stops falling") as info:
        fits.fit_loss_compute(runs, n_bootstrap=0)
    assert "add runs at more compute budgets" not in str(info.value)
