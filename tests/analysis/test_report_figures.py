"""What a reader of the report's figures and tables would get wrong: intervals the text calls unknown, lengths beyond
the training context, extrapolated allocations, archs dropped from a figure, labels cut off, unmatched comparisons."""

import re
import shutil
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from matplotlib.collections import PolyCollection

import analysis.report as report
from analysis import compare
from analysis.fits import allocation_budgets, fit_approach3
from analysis.synthetic import study

SMOKE_DB = Path(__file__).parents[2] / "docs" / "smoke" / "smoke.db"


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """The committed smoke study (5 archs x 3 runs, NIAH at 512 = seq_len and 1024), reported from a copy, with
    every figure kept for inspection."""
    from db.engine import open_db
    from db.queries import evals_frame, metrics_frame, runs_frame as db_runs

    tmp = tmp_path_factory.mktemp("smoke")
    shutil.copy(SMOKE_DB, tmp / "smoke.db")
    engine = open_db(f"sqlite:///{tmp / 'smoke.db'}")
    runs = db_runs(engine, plan="smoke-h100", status="done")
    ids = runs["run_id"].tolist()
    metrics, evals = metrics_frame(engine, ids), evals_frame(engine, ids)
    engine.dispose()
    figs = {}

    def keep(fig, stem):  # kept to inspect, not rendered: drawing PNGs and SVGs is most of a report's time
        figs[stem.name] = fig
        paths = {"png": stem.with_suffix(".png"), "svg": stem.with_suffix(".svg")}
        for path in paths.values():
            path.write_bytes(b"")
        return paths

    mp = pytest.MonkeyPatch()
    mp.setattr(report, "_save", keep)
    try:
        rf = report.write_report(runs, metrics, evals, tmp / "report", bootstrap=20)
    finally:
        mp.undo()
    yield rf, figs
    for fig in figs.values():
        plt.close(fig)


@pytest.fixture(scope="module")
def syn():
    return study(120, n_steps=8, seed=3)


def _table(md: str, heading: str) -> list[str]:
    """The rows of the Markdown table under ``heading``."""
    part = md.split(heading, 1)[1].split("\n\n")
    return [line for line in next(p for p in part if p.startswith("|")).splitlines()[2:]]


def test_intervals_the_report_calls_unknown_are_neither_tabulated_nor_drawn(smoke):
    """The smoke report said 'the intervals of ... rest on 3 runs each ...: read them as unknown', then printed
    'hgrn2 | 3.8e+15 | 0.5569 [0.547, 0.5569] | ... | -0.05706 [-0.1238, -0.05706]' (a gap excluding zero) and drew
    a 95% band around every law."""
    rf, figs = smoke
    md = rf.report_md.read_text()
    assert "rest on 3 runs each" in md
    for heading in ("### Loss vs compute on the frontier: L = E", "### Architectures against softmax"):
        rows = _table(md, heading)
        assert rows and not any("[" in r for r in rows), rows
    frontier = _table(md, "### Loss vs compute on the frontier: L = E")
    assert all("skipped (3 runs: too few to resample)" in r for r in frontier)  # no bootstrap run for them
    ax = figs["loss_vs_compute"].axes[0]
    assert not [c for c in ax.collections if isinstance(c, PolyCollection)]  # no bootstrap band
    assert "no band" in md


def test_niah_marks_the_lengths_beyond_the_training_context(smoke, syn):
    """The smoke NIAH figure showed softmax 100 at 512 and 0 at 1024 with nothing to say that 1024 is twice the
    training context (seq_len 512), where RoPE softmax fails by construction: it read as a retrieval failure."""
    rf, figs = smoke
    ax = next(a for a in figs["niah"].axes if a.get_title().startswith("softmax"))
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert "beyond" not in labels[0] and "beyond" in labels[1], labels
    md = rf.report_md.read_text()
    assert re.search(r"\| variant \| depth \| len 512 \| len 1024 \(beyond[^|]*\) \|", md)
    fig = figs["niah"]  # two rows of two-line tick labels: the bottom row's x label stays inside the image
    with plt.rc_context(report._RC):
        fig.canvas.draw()
        assert min(a.xaxis.label.get_window_extent().y0 for a in fig.axes if a.get_xlabel()) >= 0
    # every cell's number is readable at the size shown, and hybrids come in ratio order, not string order
    fig, _ = report._fig_niah(compare.niah_table(syn.runs, syn.evals))
    titles = [a.get_title().split(" (")[0] for a in fig.axes if a.get_title()]
    hybrids = [t for t in titles if t.startswith("hybrid")]
    assert hybrids == sorted(hybrids, key=lambda t: float(t.split()[1].split(":")[0])), hybrids
    assert min(t.get_fontsize() for a in fig.axes for t in a.texts) >= 7
    plt.close(fig)


def test_a_single_panel_figure_keeps_its_y_label_inside_the_image(syn):
    """With one arch the loss-vs-tokens, IsoFLOP and NIAH panels had their y label ('training loss (nats)', 'loss
    (nats)', 'needle depth (fraction)') cut off at the left edge of the image."""
    one = syn.runs[syn.runs["arch"] == "softmax"]
    niah = compare.niah_table(one, syn.evals)
    for fig, _ in (report._fig_loss_vs_tokens(one, syn.metrics, "nonembed_params"), report._fig_niah(niah)):
        with plt.rc_context(report._RC):
            fig.canvas.draw()
            renderer = fig.canvas.get_renderer()
            label = fig.axes[0].yaxis.label
            assert label.get_text()
            assert label.get_window_extent(renderer).x0 >= 0, label.get_text()
        plt.close(fig)


def test_allocations_beyond_the_data_are_marked_as_extrapolated():
    """Approach 3's N_opt and D_opt were drawn, in the same dashed line, to ten times the largest run's compute, and the
    tables' tokens_per_param@<10x> column read as a measurement."""
    runs = study(60, archs=("softmax",), n_steps=4, seed=5).runs
    top = float(runs["flops"].max())
    fit = fit_approach3(runs, budgets=allocation_budgets(runs["flops"]), n_starts=4, n_bootstrap=0)
    fits = {"approach3/softmax": fit}
    fig, caption = report._fig_allocation(fits, ["softmax"])
    assert "extrapolated" in caption
    for ax in fig.axes:
        for line in ax.get_lines():
            x = np.asarray(line.get_xdata(), float)
            if x.size and x.max() > 1.5 * top:  # a line reaching past the data is drawn apart
                assert (line.get_alpha() or 1.0) < 1.0 and x.min() >= top * 0.99
    plt.close(fig)
    t = report._fit_table(fits, "approach3", ["softmax"])
    inside, beyond = sorted((c for c in t.columns if c.startswith("tokens_per_param@")), key=lambda c: float(c[17:]))
    assert not t[inside].iloc[0].endswith("†") and t[beyond].iloc[0].endswith("†")


def test_mqar_figure_names_the_archs_it_cannot_place(syn):
    """hgrn2 and mamba2 runs have no softmax:lightning ratio: the MQAR figure dropped them without a word."""
    fig, caption = report._fig_mqar(compare.mqar_table(syn.runs, syn.evals))
    plt.close(fig)
    assert "hgrn2" in caption and "mamba2" in caption


def test_mqar_figure_draws_each_sizes_mean_accuracy_by_ratio(syn):
    """One grouping serves every size's line (a grouping per size took longer than its line took to draw): each line
    is still the mean accuracy of that size's runs at each ratio, ratios in order, exactly as a grouping per size."""
    t = compare.mqar_table(syn.runs, syn.evals)
    fig, _ = report._fig_mqar(t)
    lines = fig.axes[0].get_lines()
    plt.close(fig)
    placed = t[np.isfinite(t["ratio"]) | np.isinf(t["ratio"])]
    ratios = sorted(placed["ratio"].unique())
    sizes = sorted(placed["params"].unique())
    assert len(lines) == len(sizes) > 1
    for line, size in zip(lines, sizes):
        q = placed[placed["params"] == size].groupby("ratio")["accuracy"].mean()
        assert list(line.get_xdata()) == [ratios.index(r) for r in q.index]
        assert np.array_equal(line.get_ydata(), q.to_numpy())


def test_held_out_caveat_compares_runs_of_matched_compute():
    """A large synthetic study said 'Held-out loss disagrees: lightning's best validation loss is -0.2% from
    softmax's' only because lightning's best run had 1.7x softmax's largest compute (there val = training loss)."""
    C = np.array([1e18, 1e19, 1e18, 1e19, 1e20])
    runs = pd.DataFrame({"arch": ["softmax", "softmax", "hybrid", "hybrid", "hybrid"], "flops": C,
                         "val_loss": [3.0, 2.6, 3.05, 2.65, 2.3]})
    gaps = compare.ArchComparison("softmax", {}, pd.DataFrame([{
        "arch": "hybrid", "C": 1e19, "rel_gap": 0.015, "rel_gap_lo": 0.01, "rel_gap_hi": 0.02,
        "multiplier": 1.2, "multiplier_lo": 1.1, "multiplier_hi": 1.3}]))
    [line] = compare.summary_findings(gaps, runs=runs)
    assert "Held-out" not in line
    # a real disagreement at matched compute is still flagged, saying at what compute
    [line] = compare.summary_findings(gaps, runs=runs.assign(val_loss=[3.0, 2.6, 2.9, 2.5, 2.3]))
    assert "Held-out loss disagrees: hybrid's best validation loss is -3.8% from softmax's" in line
    assert "1e+19 FLOPs" in line


def test_findings_say_when_one_arch_pools_several_hybrid_ratios():
    """The synthetic study's 'hybrid' holds 1:1, 3:1, 7:1 and 15:1 runs: one law and one gap were fitted over all
    of them under the name 'hybrid', while the NIAH lines kept the ratios apart."""
    from analysis.fits import FitResult

    runs = pd.DataFrame({"arch": ["softmax", "hybrid", "hybrid", "hybrid"], "val_loss": [2.0, 2.1, 2.1, 2.2],
                         "hybrid": ["", "LLLLLLLS", "LLLS", "LLLLLLLS"]})
    fit = FitResult("frontier", "", {}, {}, np.array([]), pd.DataFrame(), 0, 0, True)
    fitted = compare.ArchComparison("softmax", {"softmax": fit, "hybrid": fit}, pd.DataFrame())
    [line] = compare.summary_findings(fitted, runs=runs)
    assert "hybrid" in line and "3:1, 7:1" in line and "pool" in line
    assert not compare.summary_findings(fitted, runs=runs.assign(hybrid=["", "LLLS", "LLLS", "LLLS"]))
    assert not compare.summary_findings(runs=runs)  # no law fitted (a one-size ablation): losses are by variant


def test_throughput_figure_names_the_benchmark_model_size():
    """The smoke report's throughput figure (a 134M benchmark) sat beside 1.6M-14M runs, its caption saying only 'a
    benchmark of its own model size': a reader could not tell the size its 91% and 37% belong to."""
    raw = compare.load_throughput(Path(__file__).parents[2] / "docs" / "smoke" / "throughput.csv")
    fig, caption = report._fig_throughput(compare.throughput_table(raw), raw)
    plt.close(fig)
    assert "134M parameters" in caption


def test_residual_axes_say_which_logarithm():
    """'log L_fit - log L' left the base open: a residual of 0.01 is 1% in ln and 2.3% in log10."""
    from analysis.fits import fit_loss_compute

    runs = study(40, archs=("softmax",), n_steps=4, seed=6).runs
    fig, caption = report._fig_residuals({"frontier/softmax": fit_loss_compute(runs, n_bootstrap=0)}, ["softmax"])
    plt.close(fig)
    assert all("ln L_fit - ln L" in ax.get_ylabel() for ax in fig.axes)
    assert "natural log" in caption
