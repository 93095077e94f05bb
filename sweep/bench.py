"""Benchmarks of the sweep layer: expanding and registering a big plan, and packed against one-at-a-time training."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

from db.engine import open_db
from sweep.plan import Plan, load_plan
from sweep.registry import add_plans


def bench_plan(plan_file: Path) -> dict:
    """Seconds to expand ``plan_file`` and to register it into a fresh SQLite file."""
    t0 = time.perf_counter()
    plan = load_plan(plan_file)
    expand_s = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        engine = open_db(f"sqlite:///{tmp}/bench.db")
        add_plans(engine, [plan])
        register_s = time.perf_counter() - t0
        engine.dispose()
    return {"runs": len(plan.unique_specs()), "expand_s": expand_s, "register_s": register_s}


def append_csv(row: dict, path: Path) -> None:
    """Add ``row`` to the results table at ``path``, widening it when the row brings new columns; the file is
    replaced whole (temp file, rename), so an interrupted write leaves the old table, never a torn one."""
    import pandas as pd

    path = Path(path)
    frame = pd.DataFrame([row])
    if path.exists():
        frame = pd.concat([pd.read_csv(path), frame], ignore_index=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    frame.to_csv(tmp, index=False)
    tmp.replace(path)


def bench_pack(plan: Plan, *, steps: int | None = None, pack: int | None = None, device: str | None = None,
               progress=None) -> dict:
    """Train ``plan``'s runs (cut to ``steps`` steps each when given), one at a time and then packed
    (``--pack``), in this process; returns both wall times, aggregate tokens/s and MFU, and how far their
    losses differ."""
    import dataclasses

    import torch

    from models.packed import pretrain_pack
    from models.train import PEAK_FLOPS_CUDA, pretrain
    from sweep.pack import plan_packs

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    on_cuda = device.startswith("cuda")

    def shorten(spec, n):  # the plan's runs, cut to n steps; evals off so both modes do the same work
        tokens = n * spec.batch_size * spec.seq_len if n else spec.tokens
        return dataclasses.replace(spec, tokens=tokens, evals=(), eval_every=0)

    runs = [(shorten(r.spec, steps), r.name) for r in plan.runs]
    packs = plan_packs(runs, pack, cpu=not on_cuda, gpu_mem_bytes=(torch.cuda.get_device_properties(0).total_memory if on_cuda else 80 * 2**30))
    quiet = lambda kind, payload: None  # noqa: E731
    tokens = sum(s.steps * s.batch_size * s.seq_len for s, _ in runs)
    work = sum(s.derived()["flops"] for s, _ in runs)

    def sync():
        if on_cuda:
            torch.cuda.synchronize()

    def serial(items, root):
        out = []
        for spec, name in items:
            out.append(pretrain(spec, quiet, root / spec.run_id, device=device))
            if progress:
                progress(f"alone: {name} done")
        return out

    def packed(groups, root):
        out = []
        for group in groups:
            specs = [s for s, _ in group]
            out += pretrain_pack(specs, [quiet] * len(specs), [root / s.run_id for s in specs], device=device,
                                 share=1.0)
            if progress:
                progress(f"pack of {len(group)}")
        return out

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        # Warm up both paths on every shape (kernel compilation, autotuning, allocator) before timing.
        shapes = {}
        for group in packs:
            shapes.setdefault(group[0][0].model_config(), group)
        warm = [[(shorten(s, 2), n) for s, n in g] for g in shapes.values()]
        serial([g[0] for g in warm], root / "warm-alone")
        packed(warm, root / "warm-pack")
        sync()
        t0 = time.perf_counter()
        together = packed(packs, root / "pack")
        sync()
        packed_s = time.perf_counter() - t0
        if progress:
            progress(f"packed: {len(runs)} runs in {packed_s:.1f} s")
        t0 = time.perf_counter()
        alone = serial(runs, root / "alone")
        sync()
        serial_s = time.perf_counter() - t0
        # The same runs either way: how far apart their final losses end (bf16 autocast on a GPU rounds
        # differently). The run furthest apart is trained alone once more: how far two lone trainings of it
        # end apart is the noise floor that packing's difference compares with.
        by_run = dict(zip((s.run_id for g in packs for s, _ in g), together))
        diffs = [abs(getattr(by_run[s.run_id], "final_loss", float("nan")) / solo.final_loss - 1)
                 for (s, _), solo in zip(runs, alone)]
        worst = max(range(len(runs)), key=lambda i: diffs[i])
        again = serial([runs[worst]], root / "again")[0]
        repeat = abs(again.final_loss / alone[worst].final_loss - 1)
    peak = PEAK_FLOPS_CUDA if on_cuda else None
    return {
        "runs": len(runs), "tasks_packed": len(packs), "largest_pack": max(len(g) for g in packs),
        "steps": max(s.steps for s, _ in runs),
        "device": torch.cuda.get_device_name(0) if on_cuda else "cpu",
        "serial_s": serial_s, "packed_s": packed_s, "speedup": serial_s / packed_s,
        "serial_tokens_per_s": tokens / serial_s, "packed_tokens_per_s": tokens / packed_s,
        "serial_mfu": work / serial_s / peak if peak else None,
        "packed_mfu": work / packed_s / peak if peak else None,
        "max_rel_loss_diff": diffs[worst], "median_rel_loss_diff": float(np.median(diffs)),
        "worst_run": runs[worst][1], "worst_run_alone_twice_rel_diff": repeat,
    }
