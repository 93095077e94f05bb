"""Benchmarks of the sweep layer: expanding and registering a big plan."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from db.engine import open_db
from sweep.plan import load_plan
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
