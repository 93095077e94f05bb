"""Registering plans in the database: every run of a plan becomes a pending row, once."""

from __future__ import annotations

import dataclasses

from sqlalchemy import Engine

from db.queries import runs_training
from db.schema import Run
from db.writer import PlanRows, Registered, RunRow, register_plans
from sweep.plan import Plan
from sweep.spec import RunSpec


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


def adopt_registered_budgets(engine: Engine, plans: list[Plan]) -> int:
    """Give each planned run the database does not hold, where it holds one that trains the same whole steps (a budget
    rounded up alike), that run's budget and so its id; returns how many took one. A plan's own load does so among its
    rows (the first budget stands for all): across loads, `slab add A; slab add B` had made two runs of one."""
    planned = [run for plan in plans for run in plan.runs]
    held = {run_id for (run_id,) in runs_training(engine, {run.spec.trained_tokens for run in planned}, Run.run_id)}
    unheld = {run.spec.trained_tokens for run in planned if run.spec.run_id not in held}
    if not unheld:  # a plan registered before: its runs' specs are not read back
        return 0
    # Where two registered runs train alike (registered before budgets were matched), a finished one stands for both.
    stand_in: dict[str, RunSpec] = {}
    rows = runs_training(engine, unheld, Run.run_id, Run.status, Run.spec)
    for _, _, data in sorted(rows, key=lambda row: (row[1] not in ("done", "diverged"), row[0])):
        spec = RunSpec.from_dict(data)
        stand_in.setdefault(spec.trained_id, spec)
    adopted = 0
    for plan in plans:
        for i, run in enumerate(plan.runs):
            if run.spec.run_id not in held and (other := stand_in.get(run.spec.trained_id)) is not None:
                # the budget alone: the plan's placement (gpus, where its corpus lies) stays its own
                plan.runs[i] = dataclasses.replace(run, spec=dataclasses.replace(run.spec, tokens=other.tokens))
                adopted += 1
    return adopted


def add_plans(engine: Engine, plans: list[Plan]) -> list[Registered]:
    """Register the plans and their runs in one transaction (all or none); idempotent, and a run shared by two plans,
    or asked for by budgets that train the same whole steps, is stored once."""
    adopt_registered_budgets(engine, plans)
    # the absolute path: a plan added from two working directories is one file, two files of one name are not
    return register_plans(engine, [PlanRows(p.name, str(p.path.resolve()), p.sha256, plan_rows(p)) for p in plans])


def moved_warning(registered: Registered) -> str | None:
    """The warning for a plan that another file of the same name registered before, or None."""
    if not registered.moved_from:
        return None
    return (f"plan {registered.plan} was registered from {registered.moved_from}; it now holds this file's runs "
            "(plans are named by their file's stem: rename one file to keep both)")
