"""Registering plans in the database: every run of a plan becomes a pending row, once."""

from __future__ import annotations

from sqlalchemy import Engine

from db.writer import PlanRows, Registered, RunRow, register_plans
from sweep.plan import Plan


def plan_rows(plan: Plan) -> list[RunRow]:
    """The plan's runs as rows for the database, with their derived sizes and costs."""
    rows = []
    for run in plan.runs:
        spec = run.spec
        derived = spec.derived()
        rows.append(
            RunRow(
                run_id=spec.run_id,
                spec=spec.to_dict(),
                params=derived["params"],
                nonembed_params=derived["nonembed_params"],
                tokens=spec.trained_tokens,
                flops=derived["flops"],
                row=run.row,
                name=run.name,
                tags=run.tags or None,
            )
        )
    return rows


def add_plans(engine: Engine, plans: list[Plan]) -> list[Registered]:
    """Register the plans and their runs in one transaction (all or none); idempotent, and a run shared by two plans
    is stored once."""
    # the absolute path: a plan added from two working directories is one file, two files of one name are not
    return register_plans(engine, [PlanRows(p.name, str(p.path.resolve()), p.sha256, plan_rows(p)) for p in plans])


def moved_warning(registered: Registered) -> str | None:
    """The warning for a plan that another file of the same name registered before, or None."""
    if not registered.moved_from:
        return None
    return (f"plan {registered.plan} was registered from {registered.moved_from}; it now holds this file's runs "
            "(plans are named by their file's stem: rename one file to keep both)")
