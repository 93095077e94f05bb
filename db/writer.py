"""The single writer: every change to the database goes through these functions (plans, claims, results)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import Engine, bindparam, delete, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DatabaseError as SADatabaseError
from sqlalchemy.orm import Session

from db.engine import PG_REGISTER_LOCK, DatabaseError, explain, serialize, session, write_errors
from db.schema import Eval, Fit, Metric, Plan, PlanRun, Run, fit_text, utcnow

#: Rows per executemany batch (SQLite caps bound parameters per statement).
BATCH = 500


@dataclass(frozen=True)
class RunRow:
    """A run to register: its id, spec as a dict, derived sizes, and the plan row that asked for it."""

    run_id: str
    spec: dict
    params: int
    nonembed_params: int
    tokens: int
    flops: float
    row: int
    name: str | None = None
    tags: str | None = None


@dataclass(frozen=True)
class Registered:
    """What registering a plan did: runs new to the database, runs it already knew, and runs the plan held
    before and no longer does (its file changed; they stay in the database)."""

    plan: str
    new: int
    known: int
    dropped: int = 0
    #: The file the plan was registered from before, where another file of the same name registers it now.
    moved_from: str | None = None


#: Columns of runs a worker describes itself in (socket.gethostname(), the GPU's name), cut to fit where longer.
FITTED_RUN_COLUMNS = ("host", "gpu")


def _fitted(values: dict) -> dict:
    """A run's field values with the worker's own descriptions cut to their columns' lengths."""
    # A pod's FQDN can pass String(200): PostgreSQL refuses it (and with it the launch), SQLite would keep it whole.
    fitted = dict(values)
    for name in FITTED_RUN_COLUMNS:
        if isinstance(fitted.get(name), str):
            fitted[name] = fit_text(fitted[name], Run.__table__.c[name].type.length)
    return fitted


def insert_ignore(engine: Engine, table):
    """An INSERT that skips rows whose key exists (so concurrent registrations are idempotent)."""
    dialect = {"postgresql": postgresql, "sqlite": sqlite}.get(engine.dialect.name)
    if dialect is None:  # make_engine refuses other databases
        raise NotImplementedError(f"inserts that skip known rows are not implemented for {engine.dialect.name}")
    return dialect.insert(table).on_conflict_do_nothing()


@dataclass(frozen=True)
class PlanRows:
    """A plan to register: its name, resolved path, the digest of its text and its runs."""

    name: str
    path: str
    sha256: str
    runs: Sequence[RunRow]


#: How many plan names an error about registering several plans lists before counting the rest.
SHOWN_PLANS = 5


def register_plan(engine: Engine, name: str, path: str, sha256: str, runs: Sequence[RunRow]) -> Registered:
    """Record a plan and its runs (pending unless known); re-registering is a no-op, an edited plan is relinked."""
    [registered] = register_plans(engine, [PlanRows(name, path, sha256, runs)])
    return registered


def register_plans(engine: Engine, plans: Sequence[PlanRows]) -> list[Registered]:
    """Record several plans as register_plan does, in one transaction: all of them or, where one fails, none (the
    DatabaseError raised then says so)."""
    if not plans:
        return []
    if len(plans) == 1:
        # A command's own write: a file locked past the busy timeout, or damaged, is one line for it, not a traceback.
        with write_errors(engine, f"register plan {plans[0].name}"):
            return _register_all(engine, plans, [])
    at: list[str] = []  # the plan being registered when an error came; empty once all were (the commit failed)
    try:
        return _register_all(engine, plans, at)
    except (SADatabaseError, DatabaseError) as exc:
        # Statement errors too (a row the database refuses): the earlier plans went with the rollback, and the driver's
        # error alone would leave the user to think them registered.
        why = explain(exc, engine.url) if isinstance(exc, SADatabaseError) else str(exc)
        shown = ", ".join(p.name for p in plans[:SHOWN_PLANS])
        if len(plans) > SHOWN_PLANS:
            shown += f" and {len(plans) - SHOWN_PLANS} more"
        what = f"plan {at[0]}" if at else f"the {len(plans)} plans"
        raise DatabaseError(f"cannot register {what}: {why}; none of the {len(plans)} plans ({shown}) was registered "
                            "(they are registered together or not at all)") from None


def _register_all(engine: Engine, plans: Sequence[PlanRows], at: list[str]) -> list[Registered]:
    """Record the plans in one transaction, keeping in ``at`` the name of the one being recorded until all are."""
    with session(engine) as s:
        # Two launches of one plan at once would both insert it (PostgreSQL reads committed data only).
        serialize(s, PG_REGISTER_LOCK)
        registered = []
        for entry in plans:
            at[:] = [entry.name]
            registered.append(_register(engine, s, entry))
        at.clear()
    return registered


def _register(engine: Engine, s: Session, entry: PlanRows) -> Registered:
    """Record one plan and its runs in the session's transaction (see register_plan)."""
    name, path, sha256, runs = entry.name, entry.path, entry.sha256, entry.runs
    ids = list(dict.fromkeys(r.run_id for r in runs))
    known: set[str] = set()
    for i in range(0, len(ids), BATCH):
        chunk = ids[i : i + BATCH]
        known.update(s.scalars(select(Run.run_id).where(Run.run_id.in_(chunk))))
    plan = s.scalars(select(Plan).where(Plan.name == name)).one_or_none()
    dropped, moved_from = 0, None
    if plan is None:
        plan = Plan(name=name, path=path, sha256=sha256)
        s.add(plan)
        s.flush()
    else:
        if plan.path != path:
            moved_from = plan.path
        plan.path, plan.sha256 = path, sha256
        before = set(s.scalars(select(PlanRun.run_id).where(PlanRun.plan_id == plan.id)))
        dropped = len(before - set(ids))
        s.execute(delete(PlanRun).where(PlanRun.plan_id == plan.id))
    seen: set[str] = set()
    new_rows, links = [], []
    for r in runs:
        if r.run_id in seen:
            continue
        seen.add(r.run_id)
        links.append({"plan_id": plan.id, "run_id": r.run_id, "row": r.row, "name": r.name, "tags": r.tags})
        if r.run_id not in known:
            new_rows.append(
                {
                    "run_id": r.run_id,
                    "arch": r.spec["arch"],
                    "status": "pending",
                    "attempts": 0,
                    "params": r.params,
                    "nonembed_params": r.nonembed_params,
                    "tokens": r.tokens,
                    "flops": r.flops,
                    "spec": r.spec,
                }
            )
    for rows, table in ((new_rows, Run), (links, PlanRun)):
        stmt = insert_ignore(engine, table)
        for i in range(0, len(rows), BATCH):
            s.execute(stmt, rows[i : i + BATCH])
    return Registered(plan=name, new=len(new_rows), known=len(ids) - len(new_rows), dropped=dropped, moved_from=moved_from)


def upsert(engine: Engine, table, keys: Sequence[str]):
    """An INSERT that overwrites the row with the same ``keys`` (a resumed run's step replaces the old one)."""
    dialect = {"postgresql": postgresql, "sqlite": sqlite}.get(engine.dialect.name)
    if dialect is None:
        raise NotImplementedError(f"upserts are not implemented for {engine.dialect.name}")
    stmt = dialect.insert(table)
    cols = [c.name for c in table.__table__.columns if c.name not in keys and not c.primary_key]
    return stmt.on_conflict_do_update(index_elements=list(keys), set_={c: stmt.excluded[c] for c in cols})


#: ``claim_run``'s holder when none is named: a running run whose lease is stale is taken from whoever holds it.
ANY_HOLDER = object()


def claim_run(engine: Engine, run_id: str, owner: str, stale_before, retry_failed: bool = True,
              holder=ANY_HOLDER) -> int | None:
    """Atomically take a run that is pending (or failed, or running under a stale lease); returns its attempt.
    A run this owner already holds (a claim whose commit went through but whose reply was lost) returns its attempt
    as it is, not counted again. With ``holder`` (a lease owner, or None), a running run is taken only from that holder:
    the one whose lease ``stale_before`` was judged by, not a launcher that took the run over since."""
    now = utcnow()
    # A run this owner holds is never taken again, however stale: a retried claim would count a second attempt.
    not_mine = or_(Run.lease_owner.is_(None), Run.lease_owner != owner)
    running = (Run.status == "running") & (Run.heartbeat_at < stale_before) & not_mine
    if holder is not ANY_HOLDER:
        # A launcher that saw the holder gone from its host claims with a lease far in the future: a live launcher that
        # took the run in between has a fresh heartbeat that such a lease still counts as stale.
        running &= Run.lease_owner.is_(None) if holder is None else Run.lease_owner == holder
    claimable = [Run.status == "pending", running]
    if retry_failed:
        claimable.append(Run.status == "failed")
    with session(engine) as s:
        result = s.execute(
            update(Run)
            .where(Run.run_id == run_id, or_(*claimable))
            .values(
                status="running", attempts=Run.attempts + 1, lease_owner=owner, heartbeat_at=now,
                started_at=now, finished_at=None, error=None,
            )
        )
        if result.rowcount != 1:  # held by another owner, finished, or already this owner's
            return s.scalar(select(Run.attempts).where(Run.run_id == run_id, Run.status == "running", Run.lease_owner == owner))
        return s.scalar(select(Run.attempts).where(Run.run_id == run_id))


def heartbeat(engine: Engine, owner: str, run_ids: Sequence[str]) -> list[str]:
    """Refresh the lease of the runs this owner is training; returns those of ``run_ids`` it no longer holds
    (another launcher took them after this one's lease lapsed)."""
    if not run_ids:
        return []
    ids = list(run_ids)
    with session(engine) as s:
        s.execute(
            update(Run).where(Run.lease_owner == owner, Run.status == "running", Run.run_id.in_(ids))
            .values(heartbeat_at=utcnow())
        )
        held = set(s.scalars(select(Run.run_id).where(Run.lease_owner == owner, Run.status == "running", Run.run_id.in_(ids))))
    return [run_id for run_id in ids if run_id not in held]


def update_run(engine: Engine, run_id: str, owner: str, **values) -> bool:
    """Set fields of a run this owner holds (status, results, host, error...); False if the lease was lost."""
    if values.get("status") in ("done", "failed", "diverged", "pending"):
        values.setdefault("finished_at", utcnow())
        if values["status"] == "pending":
            values.update(lease_owner=None, heartbeat_at=None)
    with session(engine) as s:
        result = s.execute(update(Run).where(Run.run_id == run_id, Run.lease_owner == owner).values(**_fitted(values)))
        return result.rowcount == 1


def write_results(engine: Engine, metrics: Sequence[dict], evals: Sequence[dict], runs: dict[str, dict],
                  owner: str | None = None) -> None:
    """Write a batch of metric rows, eval rows and per-run field updates in one transaction; with ``owner``, only
    the rows and fields of runs it holds are written."""
    with session(engine) as s:
        if owner is not None:
            # A launcher that lost a run (its lease lapsed and another took it over) must not overwrite its new owner's
            # curve, evals, host or step with what it still held. Locked on PostgreSQL, so that a claim of one of these
            # runs waits for this batch instead of landing between the check and the writes (SQLite's BEGIN IMMEDIATE
            # already holds every writer off).
            ids = sorted({r["run_id"] for r in (*metrics, *evals)} | set(runs))
            held: set[str] = set()
            for i in range(0, len(ids), BATCH):
                stmt = select(Run.run_id).where(Run.run_id.in_(ids[i : i + BATCH]), Run.lease_owner == owner)
                held.update(s.scalars(stmt.order_by(Run.run_id).with_for_update()))
            metrics = [m for m in metrics if m["run_id"] in held]
            evals = [e for e in evals if e["run_id"] in held]
            runs = {run_id: values for run_id, values in runs.items() if run_id in held}
        if metrics:
            s.execute(upsert(engine, Metric, ("run_id", "step")), list(metrics))
        if evals:
            s.execute(upsert(engine, Eval, ("run_id", "step", "name")), list(evals))
        # One executemany per set of fields, not a statement per run: a batch of a launcher training hundreds of runs
        # at once had spent a round trip per run (about 0.7 s a batch of 200 runs on PostgreSQL).
        groups: dict[tuple[str, ...], list[dict]] = {}
        for run_id, values in runs.items():
            fitted = _fitted(values)
            if fitted:  # nothing to set (an UPDATE without SET is an error)
                row = {"w_run_id": run_id, **{f"v_{name}": value for name, value in fitted.items()}}
                groups.setdefault(tuple(sorted(fitted)), []).append(row)
        table = Run.__table__
        for names, rows in groups.items():
            stmt = update(table).where(table.c.run_id == bindparam("w_run_id"))
            if owner is not None:  # checked above and locked; kept so the update says what it may touch
                stmt = stmt.where(table.c.lease_owner == owner)
            s.execute(stmt.values({name: bindparam(f"v_{name}") for name in names}), rows)


def save_fit(engine: Engine, *, method: str, source: str, n_points: int, result: dict, plan: str | None = None, arch: str | None = None) -> int:
    """Store a fit (its ``to_dict()``) and return its id."""
    with write_errors(engine, "store the fit"), session(engine) as s:
        fit = Fit(plan=plan, arch=arch, method=method, source=source, n_points=n_points, result=result)
        s.add(fit)
        s.flush()
        return fit.id
