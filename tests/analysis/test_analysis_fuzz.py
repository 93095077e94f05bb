"""Awkward data a demanding user may bring: each gives a clear error or a sane result, never a traceback or a
silently meaningless number."""

import math

import numpy as np
import pandas as pd
import pytest

from analysis import fits
from analysis.fits import FitError
from analysis.report import write_report
from analysis.synthetic import grid_runs


def test_approach3_on_equal_losses_is_a_fit_error():
    # every loss 3.0 fitted alpha = -3e-18 and came back as a fit with NaN allocations (from a CSV, alpha = beta = 0
    # raised ZeroDivisionError: the CLI test below)
    runs = grid_runs(5, 4, seed=0).assign(val_loss=3.0, final_loss=3.0)
    with pytest.raises(FitError, match="loss does not fall as model size"):
        fits.fit_approach3(runs, n_bootstrap=0)


def test_approach3_on_losses_rising_with_compute_is_refused_not_given_an_allocation():
    # losses ranked with compute fitted alpha = -0.22, beta = -0.17, printed as converged with N_opt, D_opt and
    # 81 tokens per parameter, an allocation for a law whose loss grows with size and data
    runs = grid_runs(5, 4, seed=0)
    runs["val_loss"] = 2.0 + 0.1 * runs["flops"].rank().to_numpy()
    runs["final_loss"] = runs["val_loss"]
    with pytest.raises(FitError, match=r"alpha = -[\d.]+ and beta = -[\d.]+"):
        fits.fit_approach3(runs, n_bootstrap=0)


def test_allocation_of_a_fit_with_both_exponents_negative_is_nan():
    from analysis.fits import _with_allocation

    est = {"E": 1.0, "A": 2.0, "B": 3.0, "alpha": -0.2, "beta": -0.3}
    out, samples = _with_allocation(est, pd.DataFrame([est, {**est, "alpha": 0.3, "beta": 0.3}]), [1e15])
    for k in ("a", "b", "G", "N_opt@1e+15", "tokens_per_param@1e+15"):
        assert math.isnan(out[k]), k
    assert samples["a"].isna().tolist() == [True, False]
    zero, _ = _with_allocation({**est, "alpha": 0.0, "beta": 0.0}, None, [1e15])  # no ZeroDivisionError
    assert math.isnan(zero["a"])


def test_slab_fit_csv_of_equal_losses_exits_2_with_one_line(tmp_path):
    from typer.testing import CliRunner

    from sweep.cli import app

    r = grid_runs(5, 4, seed=0)
    path = tmp_path / "flat.csv"
    pd.DataFrame({"params": r["nonembed_params"], "tokens": r["tokens"], "loss": 3.0}).to_csv(path, index=False)
    res = CliRunner().invoke(app, ["fit", "--csv", str(path), "--method", "3", "--bootstrap", "0"])
    assert res.exit_code == 2 and "Traceback" not in res.output, res.output
    assert res.output.strip().startswith("error: approach 3's best fit has alpha = 0 and beta = 0")


def test_markdown_shows_odd_arch_names_literally(tmp_path):
    # the HTML escaped them, but report.md carried <script>alert(1)</script> raw (HTML to any renderer that
    # passes it through) and *a* as emphasis
    weird = "<script>alert(1)</script> |*a*|/../x ü"
    a, b = grid_runs(4, 3, seed=0, arch="soft max"), grid_runs(4, 3, seed=1, arch=weird)
    rf = write_report(pd.concat([a, b], ignore_index=True), None, None, tmp_path / "r", bootstrap=0,
                      baseline="soft max")
    md = rf.report_md.read_text()
    assert "<script>" not in md and "*a*" not in md
    assert "&lt;script&gt;alert(1)&lt;/script&gt; \\|\\*a\\*\\|/../x ü" in md  # a table cell
    assert "&lt;script&gt;alert(1)&lt;/script&gt; |\\*a\\*|/../x ü" in md  # prose
    assert "<script>" not in rf.index_html.read_text()
    assert sorted(p.name for p in (tmp_path / "r" / "figures").iterdir()) == sorted(
        f"{n}.{ext}" for n in ("loss_vs_compute", "optimal_allocation", "residuals") for ext in ("png", "svg"))


def test_flops_that_do_not_grow_with_tokens_are_refused_not_turned_into_an_allocation():
    # FLOPs of 1e30 for every run: the compute rule fitted C / D ~ N^0, and the report's finding read "compute-optimal
    # tokens per parameter at C=1e+30 FLOPs: 1.98e-43" with no caveat
    runs = grid_runs(4, 3, seed=0).assign(flops=1e30)
    with pytest.raises(FitError, match=r"FLOPs grow as tokens\^0.00 at a given size"):
        fits.fit_approach3(runs, n_bootstrap=0)
    ok = grid_runs(4, 3, seed=0)
    ok["flops"] *= 1.3 * (ok["nonembed_params"] / 1e7) ** -0.05  # a per-token count other than 6 N: still fine
    assert fits.fit_approach3(ok, n_bootstrap=0).details["compute"]["g"] == pytest.approx(0.95)
