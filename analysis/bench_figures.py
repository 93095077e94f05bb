"""Figures of the benchmark tables that `slab bench train` and `slab bench pack` write (docs/bench/*.csv):
training speed and MFU per architecture, and packed against one-at-a-time sweep wall times."""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: benchmarks run on servers
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from analysis.report import OKABE_ITO, arch_colour  # noqa: E402

#: Issue 8's single-run target (fraction of the H100's 989 TFLOP/s bf16 dense peak).
MFU_TARGET = 0.5
#: Issue 8's packed-sweep target (packed at least this many times faster than one run at a time).
PACK_TARGET = 3.0
TRAIN_COLUMNS = ("arch", "seq_len", "tokens_per_s")
PACK_COLUMNS = ("serial_s", "packed_s", "speedup")


class BenchTableError(ValueError):
    """A CSV that is not a training or packing benchmark table."""


def train_figure(frame: pd.DataFrame, path: Path) -> Path:
    """Tokens/s against sequence length per architecture, beside MFU (of 989 TFLOP/s) with the 50% target."""
    _require(frame, TRAIN_COLUMNS, path)
    archs = list(dict.fromkeys(frame["arch"]))
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    lengths = sorted(frame["seq_len"].unique())
    if len(lengths) > 1:  # the seed study's claim: lightning stays flat with length, softmax falls
        for arch in archs:
            q = frame[frame["arch"] == arch].sort_values("seq_len")
            left.plot(q["seq_len"], q["tokens_per_s"] / 1e3, marker="o", color=arch_colour(arch, archs), label=arch)
        left.set_xscale("log", base=2)
        left.set_xticks(lengths, [f"{t:,}" for t in lengths])
        left.set_xlabel("sequence length (tokens)")
        left.legend(fontsize=8)
    else:
        bars = left.bar(range(len(frame)), frame["tokens_per_s"] / 1e3,
                        color=[arch_colour(a, archs) for a in frame["arch"]])
        left.bar_label(bars, fmt="%.0f", fontsize=8)
        left.set_xticks(range(len(frame)), list(frame["arch"]))
        left.set_xlabel(f"architecture (sequence length {lengths[0]:,})")
    left.set_ylabel("training throughput (k tokens/s)")
    left.set_ylim(bottom=0)
    left.grid(True, alpha=0.3)

    has_mfu = "mfu_989" in frame.columns and frame["mfu_989"].notna().any()
    if has_mfu:
        rows = frame.dropna(subset=["mfu_989"]).reset_index(drop=True)
        labels = [f"{r.arch}\n{_tokens(r.seq_len)}" for r in rows.itertuples()]
        bars = right.bar(range(len(rows)), rows["mfu_989"] * 100,
                         color=[arch_colour(a, archs) for a in rows["arch"]])
        right.bar_label(bars, fmt="%.1f%%", fontsize=8)
        right.axhline(MFU_TARGET * 100, ls="--", color="black", lw=1, label=f"target {MFU_TARGET:.0%}")
        right.set_xticks(range(len(rows)), labels, fontsize=7)
        right.set_ylabel("MFU (% of 989 TFLOP/s bf16)")
        right.set_ylim(0, max(MFU_TARGET * 100, float(rows["mfu_989"].max()) * 100) * 1.15)
        right.legend(fontsize=8)
    else:
        right.text(0.5, 0.5, "no MFU: measured without a GPU", ha="center", va="center", transform=right.transAxes)
        right.set_axis_off()
    sizes = ", ".join(dict.fromkeys(f"{p / 1e6:.0f}M" for p in frame["params"])) if "params" in frame.columns else ""
    fig.suptitle(f"single-run training speed{f' ({sizes} parameters)' if sizes else ''}", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def pack_figure(frame: pd.DataFrame, path: Path) -> Path:
    """Wall time of a plan's runs one at a time against packed, one pair of bars per measurement, with the speedup."""
    _require(frame, PACK_COLUMNS, path)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.6 * len(frame) + 2), 3.8))
    x = range(len(frame))
    w = 0.38
    serial = ax.bar([i - w / 2 for i in x], frame["serial_s"], w, color=OKABE_ITO[1], label="one at a time")
    packed = ax.bar([i + w / 2 for i in x], frame["packed_s"], w, color=OKABE_ITO[0], label="packed")
    ax.bar_label(serial, fmt="%.0f s", fontsize=8)
    ax.bar_label(packed, labels=[f"{s:.0f} s\n{r:.2f}x" for s, r in zip(frame["packed_s"], frame["speedup"])], fontsize=8)
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
    if all(c in frame.columns for c in PACK_COLUMNS):
        return pack_figure(frame, png)
    if all(c in frame.columns for c in TRAIN_COLUMNS):
        return train_figure(frame, png)
    raise BenchTableError(
        f"{csv_path}: neither a `slab bench pack` table (columns {', '.join(PACK_COLUMNS)}) nor a "
        f"`slab bench train` table (columns {', '.join(TRAIN_COLUMNS)}); it has {', '.join(map(str, frame.columns))}"
    )


def _tokens(t: int) -> str:
    return f"T {t // 1024}k" if t % 1024 == 0 else f"T {t}"


def _require(frame: pd.DataFrame, columns: tuple[str, ...], path: Path) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise BenchTableError(f"table for {path} is missing column(s) {', '.join(missing)}")
    bad = [c for c in columns[1:] if not pd.api.types.is_numeric_dtype(frame[c])]
    if bad:
        raise BenchTableError(f"table for {path}: column(s) {', '.join(bad)} must be numbers")


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
