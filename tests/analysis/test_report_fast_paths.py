"""The report's fast paths give what the slow ones gave: batched envelopes, column-wise JSON records, curves drawn in
log coordinates, and the bootstrap of approach 3 started from the estimate's curvature."""
import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from matplotlib.collections import LineCollection  # noqa: E402

from analysis import fits, report  # noqa: E402
from analysis.compare import arch_names  # noqa: E402
from analysis.synthetic import random_runs, study  # noqa: E402


@pytest.fixture(scope="module")
def syn():
    return study(160, archs=("softmax", "lightning", "hybrid"), n_steps=12, seed=3)


def test_batched_approach1_envelopes_equal_the_envelope_of_each_selection(syn):
    runs = syn.runs[syn.runs["arch"] == "softmax"]
    curves = fits._curves(syn.metrics, runs, "nonembed_params")
    pts = fits.prepare_points(runs)
    Cgrid = np.logspace(np.log10(curves["C"].min()), np.log10(curves["C"].max()), 42)[1:-1]
    rule = fits.ComputeRule.fit(pts["N"], pts["D"], pts["C"])
    _, Lmat, Dmat, Nrun = fits._interpolate_curves(curves, Cgrid, rule)
    rng = np.random.default_rng(0)
    R = len(Nrun)
    masks = np.stack([np.bincount(rng.integers(0, R, R), minlength=R) > 0 for _ in range(30)] + [np.ones(R, bool)])
    batched = fits._approach1_envelopes(masks, Lmat, Dmat, Nrun, Cgrid)
    assert sum(len(f["C"]) for f in batched) > 0
    for mask, got in zip(masks, batched):
        want = fits._approach1_envelope(np.flatnonzero(mask), Lmat, Dmat, Nrun, Cgrid)
        assert want.keys() == got.keys()
        for k in want:
            np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_frame_records_equal_the_value_by_value_conversion():
    df = pd.DataFrame({
        "run_id": pd.array(["a", "b", None, "d"], dtype="str"),
        "N": [1.5, np.nan, np.inf, -2.0],
        "n": np.array([1, 2, 3, 4], dtype=np.int64),
        "u": np.array([1, 2, 3, 4], dtype=np.uint32),
        "ok": [True, False, True, False],
        "mixed": [1, "x", None, 2.5],
        "f32": np.array([0.1, np.nan, 3, 4], dtype=np.float32),
        "nullable": pd.array([1, None, 3, 4], dtype="Int64"),
    })
    want = [{str(k): fits._json_clean(v) for k, v in row.items()} for row in df.to_dict(orient="records")]
    got = fits._frame_records(df)
    assert json.dumps(got) == json.dumps(want)
    assert got[1]["N"] is None and got[2]["N"] is None and isinstance(got[0]["n"], int)
    assert fits._frame_records(df.iloc[:0]) == []


def _loss_vs_tokens_in_data_coordinates(runs, metrics, params_col):
    """The figure as it was drawn before: one path per run in data coordinates, under the axes' log scales."""
    size = dict(zip(runs["run_id"].astype(str), pd.to_numeric(runs[params_col], errors="coerce")))
    arch_of = dict(zip(runs["run_id"].astype(str), runs["arch"]))
    m = metrics[["run_id", "tokens", "loss"]].copy()
    m["run_id"] = m["run_id"].astype(str)
    m = m[m["run_id"].isin(size) & (m["tokens"] > 0) & (m["loss"] > 0)].sort_values(["run_id", "tokens"],
                                                                                        kind="mergesort")
    archs = sorted(set(arch_of[r] for r in m["run_id"].unique()))
    sizes = np.array([size[r] for r in m["run_id"].unique()], float)
    norm = report.LogNorm(vmin=np.nanmin(sizes), vmax=max(np.nanmax(sizes), np.nanmin(sizes) * 1.01))
    fig, axes = report._panels(len(archs))
    ids = m["run_id"].to_numpy()
    x, y = m["tokens"].to_numpy(float), m["loss"].to_numpy(float)
    starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])
    ends = np.r_[starts[1:], len(ids)]
    for ax, arch in zip(axes, archs):
        segs, cols = [], []
        for s, e in zip(starts, ends):
            if arch_of[ids[s]] == arch:
                segs.append(np.column_stack([x[s:e], y[s:e]]))
                cols.append(size[ids[s]])
        lc = LineCollection(segs, cmap=report.SEQUENTIAL, norm=norm, linewidths=0.8, alpha=0.7)
        lc.set_array(np.array(cols))
        lc.set_rasterized(True)
        ax.add_collection(lc)
        report._log_axes(ax, "wide", "narrow")
        ax.autoscale()
        ax.set_title(f"{arch} ({len(segs)} runs)")
        ax.set_xlabel("training tokens")
        ax.grid(True, which="major", alpha=0.3)
    axes[0].set_ylabel("training loss (nats)")
    fig.colorbar(plt.cm.ScalarMappable(norm=norm, cmap=report.SEQUENTIAL), ax=axes, label=f"parameters ({params_col})")
    return fig


def test_curves_drawn_in_log_coordinates_give_the_same_limits_and_pixels(syn):
    runs = syn.runs.assign(arch=arch_names(syn.runs))
    fig, _ = report._fig_loss_vs_tokens(runs, syn.metrics, "nonembed_params")
    ref = _loss_vs_tokens_in_data_coordinates(runs, syn.metrics, "nonembed_params")
    try:
        assert len(fig.axes) == len(ref.axes) == 4  # three panels and the colour bar
        for a, b in zip(fig.axes[:3], ref.axes[:3]):
            np.testing.assert_array_equal(a.dataLim.get_points(), b.dataLim.get_points())
            assert a.get_xlim() == b.get_xlim() and a.get_ylim() == b.get_ylim()
            assert a.get_title() == b.get_title()
        with plt.rc_context(report._RC):
            fig.canvas.draw()
            ref.canvas.draw()
        np.testing.assert_array_equal(np.asarray(fig.canvas.buffer_rgba()), np.asarray(ref.canvas.buffer_rgba()))
    finally:
        plt.close(fig)
        plt.close(ref)


def test_approach3_bootstrap_from_the_estimate_curvature_agrees_with_the_scalar_start(monkeypatch):
    """The replicates are started with the point estimate's inverse Hessian; started as before (a scalar matrix) they
    reach the same optima, to the optimiser's tolerance, so the intervals agree."""
    runs = random_runs(150, seed=4)
    calls = []
    inverse_hessian = fits._inverse_hessian
    monkeypatch.setattr(fits, "_inverse_hessian", lambda *a: calls.append(inverse_hessian(*a)) or calls[-1])
    fast = fits.fit_approach3(runs, n_starts=64, n_bootstrap=60, bootstrap_starts=1, seed=2)
    assert len(calls) == 1 and calls[0] is not None  # the fast start was taken
    assert np.all(np.linalg.eigvalsh(calls[0]) > 0)
    monkeypatch.setattr(fits, "_inverse_hessian", lambda *a: None)
    plain = fits.fit_approach3(runs, n_starts=64, n_bootstrap=60, bootstrap_starts=1, seed=2)
    assert fast.estimates == plain.estimates
    assert fast.details["bootstrap_converged"] == plain.details["bootstrap_converged"] == 60
    for k in ("E", "A", "B", "alpha", "beta"):
        np.testing.assert_allclose(fast.samples[k], plain.samples[k], rtol=1e-4)
        np.testing.assert_allclose(fast.intervals[k], plain.intervals[k], rtol=1e-5)
