"""Approach 1 refuses training curves whose FLOPs are no training count; approaches 1 and 2 with extreme exponents
give a note, not an OverflowError or ZeroDivisionError."""

import math

import numpy as np
import pandas as pd
import pytest

from analysis import fits
from analysis.fits import FitError
from analysis.synthetic import curves_for, grid_runs, runs_frame


def _runs_and_curves():
    runs = grid_runs(8, 4, N_range=(1e7, 1e9), D_range=(1e9, 1e11), seed=1)
    return runs, curves_for(runs, n_steps=60, noise=0.002)


def _size_of(runs, metrics):
    return metrics["run_id"].map(dict(zip(runs["run_id"], runs["nonembed_params"])))


@pytest.mark.parametrize("broken", ["tokens squared", "constant per token", "falling with size"])
def test_approach1_refuses_curves_whose_flops_are_no_training_count(broken):
    # the runs' flops are 6ND, so ComputeRule.fit passed them; the curves' were used as they came, and with flops growing
    # as tokens^2 approach 1 had printed a = 0.27 and 4 tokens per parameter
    runs, m = _runs_and_curves()
    N, t = _size_of(runs, m), m["tokens"]
    flops = {"tokens squared": 6 * N * t**2 / 1e9, "constant per token": 1e6 * t, "falling with size": 1e15 / N * t}[broken]
    with pytest.raises(FitError, match=r"training curves' FLOPs .*not .*training-compute count \(check the metrics' "
                                       r"flops column\)"):
        fits.fit_approach1(runs, m.assign(flops=flops), n_bootstrap=5)


def test_approach1_takes_curves_whose_flops_agree_with_the_runs():
    runs, m = _runs_and_curves()
    N = _size_of(runs, m)
    # a training count that grows more slowly than 6N (the LM head of small models), in runs and curves alike
    f = fits.fit_approach1(runs.assign(flops=runs["tokens"] * 1e3 * runs["nonembed_params"] ** 0.6),
                           m.assign(flops=m["tokens"] * 1e3 * N**0.6), n_bootstrap=0)
    assert 0.2 < f.details["compute"]["g"] < 1 and f.n_points >= 2


def _steep_envelope(slope=-25.0, C0=1e20, span=1.06, n=6, steps=40):
    """Curves over one narrow compute range whose best size falls as C^slope (a = slope, far past any real law)."""
    N = 1e8 * 2.0 ** np.arange(n)
    Cs = np.geomspace(C0, C0 * span, steps)
    L = 2 + 0.05 * (np.log(N[:, None]) - np.log(1e9 * (Cs / C0) ** slope)[None, :]) ** 2
    runs = runs_frame(N, Cs[-1] / (6 * N), L[:, -1], prefix="steep")
    metrics = pd.DataFrame({"run_id": np.repeat(runs["run_id"].to_numpy(), steps), "step": np.tile(np.arange(steps), n),
                            "tokens": (Cs[None, :] / (6 * N[:, None])).ravel(), "flops": np.tile(Cs, n),
                            "loss": L.ravel()})
    return runs, metrics


def test_approach1_with_a_steep_envelope_notes_an_overflowing_constant():
    # k_N = e^1150 at a = -25: pass 1's e^c C^a had been inf x 0 = NaN, so "0 usable budgets"; past it, math.exp raised
    runs, m = _steep_envelope()
    with np.errstate(all="raise"):  # no numpy overflow passes unnoticed either
        f = fits.fit_approach1(runs, m, n_bootstrap=20)
    assert f.estimates["a"] < -20 and math.isinf(f.estimates["k_N"])
    assert "k_N overflows a float" in f.details["not_finite"]
    tpp = [k for k in f.estimates if k.startswith("tokens_per_param@")]
    assert tpp and all(math.isnan(f.estimates[k]) for k in tpp)


def _isoflop_csv(tmp_path, ratio):
    """Two IsoFLOP budgets 6% apart whose parabola minima differ by `ratio`: a = log(ratio) / log(1.06)."""
    rows = ["params,tokens,loss"]
    for C, nopt in ((1e20, 1e9), (1.06e20, 1e9 * ratio)):
        for f in (0.25, 0.5, 1, 2, 4):
            rows.append(f"{nopt * f:.6g},{C / (6 * nopt * f):.6g},{2 + 0.1 * math.log(f) ** 2:.6g}")
    path = tmp_path / "iso.csv"
    path.write_text("\n".join(rows) + "\n")
    return path


def test_approach2_with_a_steeply_falling_optimum_gives_its_tokens_per_parameter(tmp_path):
    # a = -8, so b - a = 17: C^17 had raised OverflowError for 10 rows of CSV; D_opt / N_opt is a float all the same
    runs = fits.load_csv(_isoflop_csv(tmp_path, 1 / 1.6))
    f = fits.fit_approach2(runs, params_col="params", n_bootstrap=20)
    e = f.estimates
    assert e["a"] == pytest.approx(math.log(1 / 1.6) / math.log(1.06), abs=0.01)
    for C in (1e20, 1e21):
        log_n = math.log(e["k_N"]) + e["a"] * math.log(C)
        assert e[f"tokens_per_param@{C:.3g}"] == pytest.approx(math.exp(math.log(C / 6) - 2 * log_n), rel=1e-6)
    assert e["tokens_per_param@1e+20"] == pytest.approx(1e20 / 6e9 / 1e9, rel=0.01)  # the minimum at 1e20 is 1e9


def test_approach2_with_a_steeply_rising_optimum_notes_the_overflow(tmp_path):
    # a = +25: k_N = e^-1130 underflowed to 0.0, and k_D / k_N had raised ZeroDivisionError
    runs = fits.load_csv(_isoflop_csv(tmp_path, 1.06**25))
    f = fits.fit_approach2(runs, params_col="params", n_bootstrap=20)
    assert f.estimates["a"] == pytest.approx(25, abs=0.01) and math.isinf(f.estimates["k_D"])
    tpp = [k for k in f.estimates if k.startswith("tokens_per_param@")]
    assert tpp and all(math.isnan(f.estimates[k]) for k in tpp)
    assert "k_D overflows a float" in f.details["not_finite"] and "tokens_per_param@1e+20" in f.details["not_finite"]


def test_tokens_per_param_stays_finite_where_its_factors_would_overflow():
    # k_D / k_N = 1e-300 and C^(b - a) = 1e320: the product, 1e20, is a float; the factors' product had raised
    est, _ = fits._with_tokens_per_param({"k_N": 1e150, "k_D": 1e-150, "a": -7.5, "b": 8.5}, None, [1e20])
    assert est["tokens_per_param@1e+20"] == pytest.approx(1e20, rel=1e-9)
