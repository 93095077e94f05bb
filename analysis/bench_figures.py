"""Figures of the benchmark tables that `slab bench train`, `pack`, `spread` and `dp` write (docs/bench/*.csv):
training speed and MFU per architecture, packed against one-at-a-time sweep wall times, a launch on one GPU
against all of a host's, and data-parallel tokens/s with the loss curves overlaid."""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: benchmarks run on servers
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from analysis.compare import throughput_configs  # noqa: E402
from analysis.report import OKABE_ITO, SIZE_STYLES, arch_colour  # noqa: E402

#: Issue 8's single-run target (fraction of the H100's 989 TFLOP/s bf16 dense peak).
MFU_TARGET = 0.5
#: Issue 8's packed-sweep target (packed at least this many times faster than one run at a time).
PACK_TARGET = 3.0
#: Issue 10's targets: a launch on all of a host's GPUs in at most this share of its one-GPU wall time, and
#: data-parallel tokens/s at least these multiples of one GPU's.
SPREAD_TARGET = 0.6
DP_TARGETS = {2: 1.8, 4: 3.5}
TRAIN_COLUMNS = ("arch", "seq_len", "tokens_per_s")
#: Bar hatch per measured configuration of a training table, beside its line style and marker (report.SIZE_STYLES);
#: the first, none, is a one-configuration table's look.
CONFIG_HATCHES = ("", "//", "..", "xx")
PACK_COLUMNS = ("serial_s", "packed_s", "speedup")
SPREAD_COLUMNS = ("gpus", "wall_s", "runs")
DP_COLUMNS = ("gpus", "step", "loss", "tokens_per_s")
# In the order tables are told apart: a dp table also has a spread table's gpus column.
TABLE_KINDS = {"dp": DP_COLUMNS, "spread": SPREAD_COLUMNS, "pack": PACK_COLUMNS, "train": TRAIN_COLUMNS}
#: Columns a figure needs beyond those that tell its table apart: a dp table's curves are drawn per run.
FIGURE_COLUMNS = {"dp": ("run",)}
#: Columns a figure counts in whole numbers ("12/15 runs done"), every cell of which must hold one.
COUNT_COLUMNS = {"spread": ("runs", "done")}
#: Columns that name a row rather than measure it; every other column a table's kind needs holds numbers.
LABEL_COLUMNS = ("arch",)


class BenchTableError(ValueError):
    """A CSV that is not a training or packing benchmark table."""


def train_figure(frame: pd.DataFrame, path: Path) -> Path:
    """Tokens/s against sequence length per architecture and measured configuration (model size, compile, fused,
    device), beside MFU (of 989 TFLOP/s) with the 50% target."""
    _require(frame, TRAIN_COLUMNS, path)
    archs = list(dict.fromkeys(frame["arch"]))
    # two sizes (or compiled and eager rows) of one arch joined into one line drew a zigzag that mixed them
    codes, configs = throughput_configs(frame)
    several_configs = len(configs) > 1
    styles = [(*SIZE_STYLES[k % len(SIZE_STYLES)], CONFIG_HATCHES[k % len(CONFIG_HATCHES)]) for k in range(len(configs))]
    hatched = [Patch(facecolor="white", edgecolor="dimgray", hatch=styles[k][2], label=c)
               for k, c in enumerate(configs) if several_configs]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    lengths = sorted(frame["seq_len"].unique())
    if len(lengths) > 1:  # the seed study's claim: lightning stays flat with length, softmax falls
        for arch in archs:
            for k, config in enumerate(configs):
                q = frame[(frame["arch"] == arch).to_numpy() & (codes == k)].sort_values("seq_len")
                if q.empty:
                    continue
                ls, marker, _ = styles[k]
                left.plot(q["seq_len"], q["tokens_per_s"] / 1e3, ls=ls, marker=marker, color=arch_colour(arch, archs),
                          label=f"{arch}, {config}" if several_configs else arch)
        left.set_xscale("log", base=2)
        left.set_xticks(lengths, [f"{t:,}" for t in lengths])
        left.set_xlabel("sequence length (tokens)")
        left.legend(fontsize=8)
    else:
        bars = left.bar(range(len(frame)), frame["tokens_per_s"] / 1e3,
                        color=[arch_colour(a, archs) for a in frame["arch"]])
        _hatch(bars, codes, styles)
        left.bar_label(bars, fmt="%.0f", fontsize=8)
        left.set_xticks(range(len(frame)), list(frame["arch"]))
        left.set_xlabel(f"architecture (sequence length {lengths[0]:,})")
        if several_configs:
            left.legend(handles=hatched, fontsize=8)
    left.set_ylabel("training throughput (k tokens/s)")
    left.set_ylim(bottom=0)
    left.grid(True, alpha=0.3)

    has_mfu = "mfu_989" in frame.columns and frame["mfu_989"].notna().any()
    if has_mfu:
        measured = frame["mfu_989"].notna().to_numpy()
        rows = frame[measured].reset_index(drop=True)
        # Several lengths: the bars name their length and a legend the arch's colour (both names overlap at 9 bars).
        several = len(lengths) > 1
        labels = [_tokens(r.seq_len) if several else f"{r.arch}\n{_tokens(r.seq_len)}" for r in rows.itertuples()]
        bars = right.bar(range(len(rows)), rows["mfu_989"] * 100,
                         color=[arch_colour(a, archs) for a in rows["arch"]])
        _hatch(bars, codes[measured], styles)
        right.bar_label(bars, fmt="%.1f%%", fontsize=8)
        right.axhline(MFU_TARGET * 100, ls="--", color="black", lw=1, label=f"target {MFU_TARGET:.0%}")
        right.set_xticks(range(len(rows)), labels, fontsize=7)
        # models.config counts both n^2 attention products (MiniMax-01's convention); causal attention runs about
        # half, so at long lengths softmax's MFU counts work the GPU never did: the axis must say so
        full = " bf16;\nsoftmax attention not causally halved" if {"softmax", "hybrid"} & set(archs) else " bf16"
        right.set_ylabel(f"MFU (% of 989 TFLOP/s{full})")
        right.set_ylim(0, max(MFU_TARGET * 100, float(rows["mfu_989"].max()) * 100) * 1.15)
        handles = [Patch(color=arch_colour(a, archs), label=a) for a in archs if several]
        right.legend(handles=handles + hatched + right.get_legend_handles_labels()[0], fontsize=8)
    else:
        right.text(0.5, 0.5, "no MFU: measured without a GPU", ha="center", va="center", transform=right.transAxes)
        right.set_axis_off()
    sizes = ", ".join(dict.fromkeys(f"{p / 1e6:.0f}M" for p in frame["params"])) if "params" in frame.columns else ""
    fig.suptitle(f"single-run training speed{f' ({sizes} parameters)' if sizes else ''}", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def seconds(value: float) -> str:
    """A bar's wall time: whole seconds from 100 s up, three significant digits below (0.50 s and 0.55 s had both read
    "0 s" and "1 s" beside a speedup of 0.90x)."""
    return f"{value:.0f} s" if abs(value) >= 100 else f"{value:.3g} s"


def pack_figure(frame: pd.DataFrame, path: Path) -> Path:
    """Wall time of a plan's runs one at a time against packed, one pair of bars per measurement, with the speedup."""
    _require(frame, PACK_COLUMNS, path)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.6 * len(frame) + 2), 3.8))
    x = range(len(frame))
    w = 0.38
    serial = ax.bar([i - w / 2 for i in x], frame["serial_s"], w, color=OKABE_ITO[1], label="one at a time")
    packed = ax.bar([i + w / 2 for i in x], frame["packed_s"], w, color=OKABE_ITO[0], label="packed")
    ax.bar_label(serial, labels=[seconds(s) for s in frame["serial_s"]], fontsize=8)
    ax.bar_label(packed, labels=[f"{seconds(s)}\n{r:.2f}x" for s, r in zip(frame["packed_s"], frame["speedup"])], fontsize=8)
    labels = []
    for i, r in enumerate(frame.to_dict("records")):
        parts = [f"#{i + 1}"]
        if "runs" in r and pd.notna(r["runs"]):
            parts.append(f"{int(r['runs'])} runs")
        if "steps" in r and pd.notna(r["steps"]):
            parts.append(f"{int(r['steps'])} steps")
        labels.append("\n".join(parts))
    ax.set_xticks(list(x), labels, fontsize=8)
    ax.set_ylabel("wall time (s)")
    ax.set_ylim(0, float(frame[["serial_s", "packed_s"]].to_numpy().max()) * 1.25)
    device = frame["device"].dropna().iloc[-1] if "device" in frame.columns and frame["device"].notna().any() else "CPU"
    ax.set_title(f"packed sweep against one run at a time ({device}; target {PACK_TARGET:g}x)", fontsize=10)
    ax.legend(fontsize=8, loc="upper left")
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def data_parallel_summary(curves: "pd.DataFrame") -> "pd.DataFrame":
    """Per run and GPU count: median tokens/s and MFU over the second half of the steps (the first half
    holds the warm-up), the final loss, and the speed-up over the smallest count."""
    import pandas as pd

    rows = []
    for (run, gpus), c in curves.groupby(["run", "gpus"], sort=True):
        late = c[c["step"] > c["step"].max() / 2]
        rows.append({"run": run, "gpus": gpus, "steps": int(c["step"].max()), "tokens_per_s": float(late["tokens_per_s"].median()),
                     # A table without MFU (written by hand, say) is drawn all the same: the figure shows none.
                     "mfu": float(late["mfu"].median()) if "mfu" in late and late["mfu"].notna().any() else None,
                     "final_loss": float(c.sort_values("step")["loss"].iloc[-1])})
    frame = pd.DataFrame(rows)
    base = frame.groupby("run")["tokens_per_s"].transform("first")
    frame["speedup"] = frame["tokens_per_s"] / base
    return frame


def dp_figure(curves: pd.DataFrame, path: Path) -> Path:
    """Loss curves of each run at every GPU count overlaid, beside tokens/s per count against linear scaling."""
    _require(curves, DP_COLUMNS, path)
    summary = data_parallel_summary(curves)
    counts = sorted(curves["gpus"].unique())
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    for i, ((run, gpus), c) in enumerate(curves.groupby(["run", "gpus"], sort=True)):
        c = c.sort_values("step")
        left.plot(c["step"], c["loss"], color=OKABE_ITO[counts.index(gpus) % len(OKABE_ITO)], lw=1.2,
                  ls=["-", "--", ":", "-."][i % 4], label=f"{run}, {gpus:g} GPU{'s' if gpus > 1 else ''}")
    left.set_xlabel("optimizer step")
    left.set_ylabel("training loss")
    left.legend(fontsize=8)
    left.grid(True, alpha=0.3)
    first = summary.groupby("run").head(1).set_index("run")["tokens_per_s"]
    x = range(len(summary))
    bars = right.bar(x, summary["tokens_per_s"] / 1e3, color=[OKABE_ITO[counts.index(g) % len(OKABE_ITO)] for g in summary["gpus"]])
    right.bar_label(bars, labels=[f"{v / 1e3:.0f}k\n{s:.2f}x" for v, s in zip(summary["tokens_per_s"], summary["speedup"])], fontsize=8)
    base_count = summary.groupby("run")["gpus"].transform("first")
    ideal = [first[r] * g / b / 1e3 for r, g, b in zip(summary["run"], summary["gpus"], base_count)]
    right.scatter(list(x), ideal, marker="_", s=400, color="black", label="linear scaling")
    targets = [first[r] * DP_TARGETS[g] / 1e3 if b == 1 and g in DP_TARGETS else float("nan")
               for r, g, b in zip(summary["run"], summary["gpus"], base_count)]
    if any(t == t for t in targets):
        right.scatter(list(x), targets, marker="_", s=400, color=OKABE_ITO[5], label="target (1.8x on 2, 3.5x on 4)")
    on_cpu = "trained_on" in curves.columns and curves["trained_on"].fillna("").str.contains("CPU").any()
    unit = "CPU worker" if on_cpu else "GPU"
    right.set_xticks(list(x), [f"{g:g} {unit}{'s' if g > 1 else ''}" for g in summary["gpus"]], fontsize=8)
    right.set_ylabel("training throughput (k tokens/s)\n(median of the second half of the steps)")
    right.set_ylim(0, max(max(ideal), float(summary["tokens_per_s"].max()) / 1e3) * 1.25)
    right.legend(fontsize=8, loc="upper left")
    right.grid(True, axis="y", alpha=0.3)
    params = curves["params"].dropna() if "params" in curves.columns else ()
    size = f" ({params.iloc[0] / 1e6:.3g}M parameters)" if len(params) else ""
    device = curves["trained_on"].dropna().iloc[0] if "trained_on" in curves.columns and curves["trained_on"].notna().any() else ""
    fig.suptitle(f"data-parallel training through Ray Train{size}" + (f"; {device.split(' (')[0]}" if device else ""), fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def spread_figure(frame: pd.DataFrame, path: Path) -> Path:
    """Wall time of one launch of a plan per GPU count, with the ratio to one GPU and the 0.6 target."""
    _require(frame, SPREAD_COLUMNS, path)
    fig, ax = plt.subplots(figsize=(max(4.5, 1.3 * len(frame) + 2), 3.8))
    x = range(len(frame))
    bars = ax.bar(x, frame["wall_s"], color=[OKABE_ITO[i % len(OKABE_ITO)] for i in x])
    ratio = frame["wall_vs_1"] if "wall_vs_1" in frame.columns else [float("nan")] * len(frame)
    ax.bar_label(bars, labels=[seconds(w) + (f"\n{r:.2f}x" if r == r else "") for w, r in zip(frame["wall_s"], ratio)], fontsize=8)
    one = frame.loc[frame["gpus"] == 1, "wall_s"]
    if len(one):
        ax.axhline(float(one.iloc[-1]) * SPREAD_TARGET, ls="--", color="black", lw=1, label=f"target: {SPREAD_TARGET:g}x one GPU's")
        ax.legend(fontsize=8, loc="upper right")
    plans = ", ".join(dict.fromkeys(frame["plan"])) if "plan" in frame.columns else "plan"
    ax.set_xticks(list(x), [f"{g:g} GPU{'s' if g > 1 else ''}\n{int(d)}/{int(n)} runs done" if "done" in frame.columns else f"{g:g}"
                            for g, d, n in zip(frame["gpus"], frame.get("done", frame["runs"]), frame["runs"])], fontsize=8)
    ax.set_ylabel("launch wall time (s)")
    ax.set_ylim(0, float(frame["wall_s"].max()) * 1.3)
    device = frame["device"].dropna().iloc[-1] if "device" in frame.columns and frame["device"].notna().any() else ""
    ax.set_title(f"slab launch {plans}\non one GPU and on all{f' ({device})' if device else ''}", fontsize=10)
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def read_table(csv_path: Path) -> pd.DataFrame:
    """A benchmark table as a frame; a file that is not a readable CSV is a ``BenchTableError``."""
    try:
        return pd.read_csv(csv_path)
    except (OSError, ValueError) as exc:
        raise BenchTableError(f"{csv_path}: not a readable CSV table ({str(exc).splitlines()[0]})") from None


def bench_figure(csv_path: Path) -> Path:
    """Draw the PNG beside a benchmark CSV (``pack.csv`` -> ``pack.png``), its kind told by its columns."""
    csv_path = Path(csv_path)
    frame = read_table(csv_path)
    if frame.empty:
        raise BenchTableError(f"{csv_path}: the table has no rows")
    png = csv_path.with_suffix(".png")
    draw = {"dp": dp_figure, "spread": spread_figure, "pack": pack_figure, "train": train_figure}
    kind = table_kind(frame)
    if kind is None:
        raise BenchTableError(
            f"{csv_path}: not a table of "
            + ", ".join(f"`slab bench {k}` (columns {', '.join(TABLE_KINDS[k])})" for k in ("pack", "train", "spread", "dp"))
            + f"; it has {', '.join(map(str, frame.columns))}"
        )
    _check_cells(frame, kind, csv_path)
    return draw[kind](frame, png)


def _check_cells(frame: pd.DataFrame, kind: str, csv_path: Path) -> None:
    """Refuse, naming the file and column, a table of ``kind`` that lacks a column its figure needs or holds a cell
    it cannot count (a blank ``done``): the figure had failed with a KeyError or a NaN cast to int."""
    missing = [c for c in FIGURE_COLUMNS.get(kind, ()) if c not in frame.columns]
    if missing:
        raise BenchTableError(f"{csv_path}: a `slab bench {kind}` table needs column {', '.join(missing)}, which it "
                              f"lacks; it has {', '.join(map(str, frame.columns))}")
    for col in COUNT_COLUMNS.get(kind, ()):
        if col not in frame.columns:
            continue
        for row, value in enumerate(frame[col].tolist(), start=1):
            if pd.isna(value):
                raise BenchTableError(f"{csv_path}: column {col} has a blank cell (row {row}); it counts runs")
            number = pd.to_numeric(value, errors="coerce")
            if pd.isna(number) or number != int(number):
                raise BenchTableError(f"{csv_path}: column {col} must hold whole numbers, not {value!r} (row {row})")
    problem = _measurement_problem(frame, TABLE_KINDS[kind])
    if problem:
        raise BenchTableError(f"{csv_path}: {problem}")


def table_kind(frame: pd.DataFrame) -> str | None:
    """Which `slab bench` command wrote this table (dp, spread, pack or train), told by its columns; None if none."""
    for kind, columns in TABLE_KINDS.items():
        if all(c in frame.columns for c in columns):
            return kind
    return None


def _hatch(bars, codes: np.ndarray, styles: list[tuple[str, str, str]]) -> None:
    """Hatch each bar as its configuration's (code into ``styles``): two sizes at one arch and length read apart."""
    for bar, k in zip(bars, codes):
        if styles[k][2]:
            bar.set_hatch(styles[k][2])
            bar.set_edgecolor("white")  # the hatch is drawn in the edge colour: white reads on every arch's colour


def _tokens(t: int) -> str:
    return f"T {t // 1024}k" if t % 1024 == 0 else f"T {t}"


def _require(frame: pd.DataFrame, columns: tuple[str, ...], path: Path) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise BenchTableError(f"table for {path} is missing column(s) {', '.join(missing)}")
    problem = _measurement_problem(frame, columns)
    if problem:
        raise BenchTableError(f"table for {path}: {problem}")


def _measurement_problem(frame: pd.DataFrame, columns: tuple[str, ...]) -> str:
    """What is wrong with the measured columns among ``columns`` (every one but a label such as arch: a pack table's
    serial_s and a spread or dp table's gpus too), or "": text where a number belongs, or a blank or infinite cell."""
    measured = [c for c in columns if c not in LABEL_COLUMNS]
    bad = [c for c in measured if not pd.api.types.is_numeric_dtype(frame[c])]
    if bad:
        return f"column(s) {', '.join(bad)} must be numbers"
    for c in measured:
        values = frame[c].to_numpy(dtype=float)
        blank = ~np.isfinite(values)
        if blank.any():
            return f"column {c} has a blank or infinite cell (row {int(np.flatnonzero(blank)[0]) + 1})"
    return ""


def _save(fig, path: Path) -> Path:
    # Written beside and renamed, so an interrupted run never leaves a truncated figure in docs/.
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        fig.savefig(tmp, dpi=110, format="png")
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return path
