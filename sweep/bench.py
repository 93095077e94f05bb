"""Benchmarks of the sweep layer: expanding and registering a big plan, packed against one-at-a-time
training, a whole launch on one GPU against all of a host's, and data-parallel scaling of one run."""

from __future__ import annotations

import dataclasses
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from db.engine import open_db
from sweep.plan import Plan, load_plan
from sweep.registry import add_plans

if TYPE_CHECKING:
    import pandas as pd


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


def append_csv(rows: dict | list[dict], path: Path) -> None:
    """Add a row (or several, in one write) to the results table at ``path``, widening it when they bring new columns;
    the file is replaced whole (temp file, rename), so an interrupted write leaves the old table, never a torn one."""
    import pandas as pd

    path = Path(path)
    # Several rows of one measurement (a spread's launch and its 1-GPU baseline) go in together or not at all.
    frame = pd.DataFrame(rows if isinstance(rows, list) else [rows])
    if path.exists():
        # Read as text: the rows already there are written back as they were (pandas 2's float parser moved last digits).
        frame = pd.concat([pd.read_csv(path, dtype=str, keep_default_na=False), frame], ignore_index=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        frame.to_csv(tmp, index=False)
        tmp.replace(path)
    finally:  # interrupted mid-write: no half-written temp file left beside the table
        tmp.unlink(missing_ok=True)


def bench_pack(plan: Plan, *, steps: int | None = None, pack: int | None = None, device: str | None = None,
               progress=None) -> dict:
    """Train ``plan``'s runs (cut to ``steps`` steps each when given), one at a time and then packed
    (``--pack``), in this process; returns both wall times, aggregate tokens/s and MFU, and how far their
    losses differ."""
    import torch

    from models.packed import pretrain_pack
    from models.train import Diverged, peak_flops, pretrain
    from sweep.pack import plan_packs

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    on_cuda = device.startswith("cuda")

    def shorten(spec, n):  # the plan's runs, cut to n steps; evals off so both modes do the same work
        tokens = n * spec.batch_size * spec.seq_len if n else spec.tokens
        return dataclasses.replace(spec, tokens=tokens, evals=(), eval_every=0)

    # Two rows may ask for the same run: it is trained once (as a launch does), not twice into one checkpoint folder.
    first = {}
    for r in plan.runs:
        first.setdefault(r.spec.run_id, r)
    runs = [(shorten(r.spec, steps), r.name or r.spec.run_id) for r in first.values()]  # a row without a name: its id
    packs = plan_packs(runs, pack, cpu=not on_cuda, gpu_mem_bytes=(torch.cuda.get_device_properties(0).total_memory if on_cuda else 80 * 2**30))
    quiet = lambda kind, payload: None  # noqa: E731
    tokens = sum(s.steps * s.batch_size * s.seq_len for s, _ in runs)
    work = sum(s.derived()["flops"] for s, _ in runs)

    def sync():
        if on_cuda:
            torch.cuda.synchronize()

    def serial(items, root, warm_up=False):
        out = []
        for spec, name in items:
            try:
                out.append(pretrain(spec, quiet, root / spec.run_id, device=device))
            except Diverged as exc:
                # A warm-up of two steps has compiled and warmed what it had to; its loss, which may not yet beat a
                # uniform guess (the end-of-run rule), does not count. (A pack reports its members' instead.)
                if not warm_up:
                    raise
                out.append(exc)
            if progress:
                progress(f"alone: {name} done")
        return out

    def packed(groups, root, warm_up=False):
        out = []
        for group in groups:
            specs = [s for s, _ in group]
            done = pretrain_pack(specs, [quiet] * len(specs), [root / s.run_id for s in specs], device=device,
                                 share=1.0)
            # A member that ended early (diverged, say) comes back as its error, not a Summary: the pack then did not
            # train every run, so there is no comparison; it is raised as a lone run's would be.
            failed = next((r for r in done if isinstance(r, Exception)), None)
            if failed is not None and not warm_up:
                raise failed
            out += done
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
        serial([g[0] for g in warm], root / "warm-alone", warm_up=True)
        packed(warm, root / "warm-pack", warm_up=True)
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
    peak = peak_flops(torch.device(device))
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


def _launch_fresh(plans: list[Plan], root: Path, tag: str, view, **options):
    """Launch ``plans`` into a fresh SQLite file and checkpoint folder under ``root``; returns the launch's
    result, its wall seconds and the database URL."""
    from sweep.launch import LaunchOptions, launch

    db = f"sqlite:///{root / tag}.db"
    opts = LaunchOptions(db_url=db, ckpt_dir=root / f"{tag}-ckpt", **options)
    t0 = time.perf_counter()
    result = launch(plans, opts, view)
    return result, time.perf_counter() - t0, db


def _check_counts(counts: list[int], cpu: bool, what: str) -> None:
    from sweep.launch import host_gpus

    if not counts or any(c < 1 for c in counts):
        raise ValueError(f"{what}: give one or more counts of 1 or more")
    if not cpu:
        have = host_gpus()
        if have == 0:
            raise ValueError("no GPU here (pass --cpu to measure with CPU workers instead)")
        if max(counts) > have:
            raise ValueError(f"{what} {max(counts)}: this host has {have} GPU(s)")


def bench_spread(plan: Plan, gpu_counts: list[int], *, view, cpu: bool = False, progress=None) -> list[dict]:
    """Launch all of ``plan`` once per count in ``gpu_counts``, each time on that many of the host's GPUs
    (CPUs with ``cpu``) and into a fresh database; returns per launch its wall time and runs done."""
    _check_counts(gpu_counts, cpu, "--gpus")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in gpu_counts:
            limit = {"cpu": True, "num_cpus": n} if cpu else {"num_gpus": n}
            result, wall, _ = _launch_fresh([plan], Path(tmp), f"spread-{n}", view, **limit)
            done = sum(r["status"] == "done" for r in result.rows)
            rows.append({"plan": plan.path.name, "gpus": n, "device": "cpu" if cpu else _gpu_name(),
                         "runs": len(result.rows), "done": done, "wall_s": wall})
            if progress:
                progress(f"{plan.path.name} on {n} {'CPU' if cpu else 'GPU'}(s): {done}/{len(result.rows)} runs in {wall:.1f} s")
    base = next((r["wall_s"] for r in rows if r["gpus"] == 1), None)
    for r in rows:
        r["wall_vs_1"] = r["wall_s"] / base if base else None
    return rows


def bench_data_parallel(plan: Plan, gpu_counts: list[int], *, steps: int | None = None, view, cpu: bool = False,
                        progress=None) -> tuple["pd.DataFrame", list[dict]]:
    """Train each of ``plan``'s runs with its ``gpus`` set to every count in ``gpu_counts`` (data-parallel
    through Ray Train above 1), through ``launch`` into fresh databases; returns every step's loss and
    tokens/s, and per (run, count) how it ended."""
    import pandas as pd
    from sqlalchemy import select

    from db.schema import Metric, Run

    _check_counts(gpu_counts, cpu, "--gpus")
    frames, outcomes = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for n in gpu_counts:
            runs = []
            for r in plan.runs:
                tokens = steps * r.spec.batch_size * r.spec.seq_len if steps else r.spec.tokens
                runs.append(dataclasses.replace(r, spec=dataclasses.replace(r.spec, gpus=float(n), tokens=tokens)))
            variant = dataclasses.replace(plan, runs=runs)
            result, wall, db = _launch_fresh([variant], Path(tmp), f"dp-{n}", view, cpu=cpu)
            engine = open_db(db)
            with engine.connect() as conn:
                for row in result.rows:
                    run = conn.execute(select(Run.gpu, Run.params).where(Run.run_id == row["run_id"])).one()
                    curve = pd.DataFrame(
                        conn.execute(select(Metric.step, Metric.loss, Metric.tokens_per_s, Metric.mfu)
                                     .where(Metric.run_id == row["run_id"]).order_by(Metric.step)).all(),
                        columns=["step", "loss", "tokens_per_s", "mfu"],
                    )
                    curve.insert(0, "run", row["name"] or row["run_id"])
                    curve.insert(1, "gpus", n)
                    curve.insert(2, "params", run.params)
                    curve["status"] = row["status"]
                    # A lone run on the CPU records no device: said here, or its figure labels the CPU a GPU.
                    curve["trained_on"] = run.gpu if run.gpu or not cpu else "CPU"
                    curve["launch_wall_s"] = wall
                    frames.append(curve)
                    outcomes.append({"run": row["name"] or row["run_id"], "gpus": n, "status": row["status"], "error": row["error"]})
                    if progress:
                        progress(f"{row['name'] or row['run_id']} on {n} {'CPU worker' if cpu else 'GPU'}(s): "
                                 f"{row['status']}, {len(curve)} steps, launch {wall:.1f} s")
            engine.dispose()
    return pd.concat(frames, ignore_index=True), outcomes


def _gpu_name() -> str:
    import torch

    return torch.cuda.get_device_name(0)
