"""Registering plans in the database: every run of a plan becomes a pending row, once."""

from __future__ import annotations

from sqlalchemy import Engine

from db.writer import Registered, RunRow, register_plan
from sweep.plan import Plan, counts_cached, flops_per_token_cached


def plan_rows(plan: Plan) -> list[RunRow]:
    """The plan's runs as rows for the database, with their derived sizes and costs."""
    rows = []
    for run in plan.runs:
        spec = run.spec
        cfg = spec.model_config()
        counts = counts_cached(cfg)
        rows.append(
            RunRow(
                run_id=spec.run_id,
                spec=spec.to_dict(),
                params=counts.total,
                nonembed_params=counts.nonembed,
                tokens=spec.tokens,
                flops=float(flops_per_token_cached(cfg, spec.seq_len)) * spec.tokens,
                row=run.row,
                name=run.name,
                tags=run.tags or None,
            )
        )
    return rows


def add_plans(engine: Engine, plans: list[Plan]) -> list[Registered]:
    """Register each plan and its runs; idempotent, and a run shared by two plans is stored once."""
    return [register_plan(engine, p.name, str(p.path), p.sha256, plan_rows(p)) for p in plans]
