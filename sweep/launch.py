"""Launching runs on Ray: claim a run under a lease, train it as a Ray task, stream and write its results.

The driver is the only database writer. It claims runs one at a time as resources free up (an atomic
conditional UPDATE, so two launchers on one database never train a run twice), refreshes the leases of
the runs it trains, drains the tasks' events about once a second, retries failures with backoff,
resubmits out-of-memory runs with half the microbatch, and leaves diverged runs alone. A run whose
launcher died (its lease went stale, or its process is gone from this host) is reclaimed and resumes
from its newest checkpoint. A database away for less than a lease (locked, restarting) is waited out; one gone
for good ends the launch once its running runs have checkpointed and stopped (as on Ctrl-C), or a grace time passed.

Workers report each checkpoint they save, and the driver records the run's newest one (``runs.ckpt_step``): a launch
that cannot see a run's recorded checkpoint under its ``--ckpt-dir`` refuses it rather than train it again from step 0
(``--restart`` lets it start over).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import signal
import socket
import tempfile
import time
import traceback
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, select
from sqlalchemy.exc import OperationalError, SQLAlchemyError
from sqlalchemy.orm import Session

from db.engine import DatabaseError, _first_line, make_engine, open_db, reading, resolve_url, sqlite_path
from db.queries import ID_BATCH
from db.schema import Run, utcnow
from db.writer import claim_run, heartbeat, update_run, write_results
from models.config import hybrid_pattern
from sweep.pack import pack_gpus, plan_packs
from sweep.plan import CellError, Plan, PlannedRun, parse_number, resolve_data, warmup_steps
from sweep.progress import LEASE_S, LaunchView, launcher_gone, lease_lapsed, lease_of, lease_owner
from sweep.registry import add_plans, moved_warning
from sweep.spec import RunSpec
from sweep.task import WORKER_ENV, WORKER_SETUP_HOOK, checkpointed_runs, data_parallel_env, data_parallel_workers, lock_wait

log = logging.getLogger(__name__)

#: Environment variable with JSON {run name or run_id: fault} for fault-injection tests (see pretrain).
FAULTS_ENV = "SLAB_FAULTS"
#: Seconds a cluster's workers get to say which checkpoints they see before the launch goes on unchecked.
CKPT_CHECK_S = 60.0


class LaunchError(ValueError):
    """The launch cannot start: bad filter, no GPU without --cpu, a run larger than the cluster."""


@dataclass(frozen=True)
class LaunchOptions:
    """How to launch: where the database and cluster are, where checkpoints go, and retry policy."""

    db_url: str | None = None
    address: str | None = None  # None: a local Ray in this process; "auto" or "ray://host:port": join
    ckpt_dir: Path = Path(".slab/ckpt")
    max_attempts: int = 3
    cpu: bool = False
    where: tuple[tuple[str, str], ...] = ()
    limit: int | None = None
    cpus_per_run: int = 1
    num_cpus: int | None = None  # CPUs of the local Ray (default: all)
    num_gpus: int | None = None  # GPUs of the local Ray (default: all the host has)
    lease_timeout_s: float = LEASE_S
    heartbeat_s: float = 10.0
    backoff_s: float = 5.0
    poll_s: float = 0.5
    ckpt_every_steps: int = 1000
    ckpt_every_s: float = 600.0
    pack: int | None = None  # runs per pack: None = auto (GPUs only), 1 = off
    gpu_mem_gib: float = 80.0  # memory of one GPU, for automatic packing
    fsdp_min_params: float | None = None  # data-parallel runs this large shard with FSDP (None: by GPU memory)
    restart: bool = False  # train runs whose recorded checkpoints are not under ckpt_dir from step 0 (else refused)
    stop_grace_s: float = 60.0  # losing the database: how long running tasks get to checkpoint and stop before a cancel


@dataclass
class Flight:
    """A run this driver has claimed: its spec, attempt, Ray task and latest progress."""

    spec: RunSpec
    name: str | None
    attempt: int
    tries: int  # attempts made by this launch
    microbatch: int | None
    ref: Any = None
    started: float = field(default_factory=time.monotonic)
    not_before: float = 0.0
    from_step: int = 0  # the checkpoint its current attempt resumes from, as far as the driver can tell
    stepped: bool = False  # its current attempt reported a training step (or a checkpoint, validation, eval)


@dataclass
class Task:
    """A submitted Ray task: the runs it trains, what it reserved, and the GPU slot it shares (if any)."""

    run_ids: list[str]
    cpus: float
    gpus: float
    slot: "GpuSlot | None" = None
    work: float = 0.0  # estimated training FLOPs of its runs


@dataclass
class GpuSlot:
    """One GPU held for runs of a GPU or less (a placement group of one GPU), and the tasks sharing it."""

    group: Any
    share: float = 0.0  # GPU share its running tasks asked for
    work: float = 0.0  # their estimated training FLOPs


@dataclass
class LaunchResult:
    """What a launch ended with, per run of the selection."""

    rows: list[dict]
    interrupted: bool = False
    #: Selected runs that had diverged in an earlier launch, where this one found nothing to train.
    diverged_before: int = 0

    def count(self, status: str) -> int:
        """How many of the selected runs ended in ``status``."""
        return sum(1 for r in self.rows if r["status"] == status)

    @property
    def ok(self) -> bool:
        """True when every selected run is done."""
        return not self.diverged_before and all(r["status"] == "done" for r in self.rows)


#: ``--where`` names that are not RunSpec fields: the plan's column names for them, the plan's columns that
#: only imply spec fields (params, flops, tags), and the sizes and costs of ``RunSpec.derived()``.
_WHERE_ALIASES = {"vocab": "vocab_size"}
_WHERE_DERIVED = ("params", "nonembed_params", "flops", "flops_per_token")
_WHERE_TEXT = ("name", "run_id", "tags")


def where_fields() -> list[str]:
    """Every name ``--where`` accepts: RunSpec fields, the plan's column names, derived names, name and run_id."""
    return sorted({*RunSpec.__dataclass_fields__, *_WHERE_ALIASES, *_WHERE_DERIVED, *_WHERE_TEXT})


def _numeric(key: str) -> bool:
    key = _WHERE_ALIASES.get(key, key)
    spec_field = RunSpec.__dataclass_fields__.get(key)
    return key in _WHERE_DERIVED or (spec_field is not None and spec_field.type in ("int", "float"))


def parse_where(text: str | None) -> tuple[tuple[str, str], ...]:
    """Parse ``--where "arch=lightning,tokens=12k"`` into (name, value) pairs, numbers written as in a plan."""
    if not text:
        return ()
    fields = where_fields()
    out = []
    for part in text.split(","):
        key, sep, value = part.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key:
            raise LaunchError(f"--where expects field=value pairs separated by commas, got {part!r}")
        if key not in fields:
            raise LaunchError(f"--where: unknown field {key!r}; expected one of {', '.join(fields)}")
        if _numeric(key):
            try:
                parse_number(value)
            except CellError as exc:
                raise LaunchError(f"--where {key}={value}: {exc}") from None
        out.append((key, value))
    return tuple(out)


def _matches(run: PlannedRun, where: tuple[tuple[str, str], ...], plan_dir: Path | None = None) -> bool:
    """True when a plan's run (its spec, label, tags and params target) satisfies every ``--where`` pair; ``plan_dir``
    is the folder of the run's plan, which its relative data paths are relative to."""
    return all(_match_one(run, key, want, plan_dir) for key, want in where)


def _match_one(run: PlannedRun, key: str, want: str, plan_dir: Path | None = None) -> bool:
    spec, name, tags = run.spec, run.name, run.tags
    key = _WHERE_ALIASES.get(key, key)
    if key == "data":  # stored with absolute paths: a path as the plan writes it, or as the shell would, names it too
        return want == spec.data or any(resolve_data(want, folder) == spec.data for folder in (plan_dir, Path.cwd()) if folder)
    if key in ("evals", "tags"):  # lists: the run has every item asked for ("tags=v2" among others)
        have = set(spec.evals) if key == "evals" else {t for t in tags.split("|") if t}
        wanted = {w.strip() for w in want.split("|") if w.strip()}
        return wanted <= have if wanted else not have  # an empty value: runs with none
    if key == "hybrid":  # a plan's period (2) or pattern (LS) resolves per run to its layer pattern
        try:
            return want == spec.hybrid or hybrid_pattern(want, spec.n_layers) == spec.hybrid
        except ValueError:  # not a period or pattern: it names no run
            return False
    if not _numeric(key):
        return want == (name if key == "name" else spec.run_id if key == "run_id" else getattr(spec, key))
    value = parse_number(want)
    # Budgets and warmup are compared as the plan resolves them, so the run a plan cell made matches that cell. A budget
    # matches the run it trains (the same whole steps): a plan merges a budget within one step of an earlier one into
    # that run, which keeps the first budget, and slab runs shows the tokens trained, not the budget.
    if key == "tokens":
        return _trains(spec, round(value))
    if key == "warmup":
        return (value < 1 or value == int(value)) and warmup_steps(value, spec.steps) == spec.warmup
    derived = spec.derived() if key in _WHERE_DERIVED else {}
    if key == "flops":
        return _trains(spec, round(value / derived["flops_per_token"]))
    if key == "params":  # the plan row's target size, or the exact total count
        return value == derived["params"] or (run.params_target is not None and math.isclose(value, run.params_target, rel_tol=1e-9))
    have = derived[key] if derived else getattr(spec, key)
    if isinstance(have, int) and not isinstance(have, bool):
        # Whole numbers exactly: within a relative 1e-9, seed=2**60 had matched every seed within about 1e9 of it.
        return (int(want) if re.fullmatch(r"[+-]?\d+", want.strip()) else value) == have
    return math.isclose(value, have, rel_tol=1e-9)


def _trains(spec: RunSpec, budget: int) -> bool:
    """True when a token budget trains the run: at least one token, and the run's whole steps (RunSpec.steps)."""
    return budget >= 1 and dataclasses.replace(spec, tokens=budget).steps == spec.steps


def _chosen(plans: list[Plan], where: tuple[tuple[str, str], ...]) -> dict[str, tuple[RunSpec, str | None]]:
    """The plans' runs that match ``--where``, each once, by run_id."""
    chosen: dict[str, tuple[RunSpec, str | None]] = {}
    for plan in plans:
        for run in plan.runs:
            if run.spec.run_id not in chosen and _matches(run, where, plan.path.parent):
                chosen[run.spec.run_id] = (run.spec, run.name)
    return chosen


def _finished(engine: Engine, ids: list[str]) -> dict[str, str]:
    """The status of those of ``ids`` that are done or diverged."""
    finished: dict[str, str] = {}
    with reading(engine) as conn:  # as the frame readers read: deferred, and ID_BATCH ids a statement
        for i in range(0, len(ids), ID_BATCH):
            stmt = select(Run.run_id, Run.status).where(Run.run_id.in_(ids[i : i + ID_BATCH]), Run.status.in_(("done", "diverged")))
            finished.update({run_id: status for run_id, status in conn.execute(stmt)})
    return finished


def _held_elsewhere(engine: Engine, ids: list[str], lease_s: float) -> set[str]:
    """Those of ``ids`` that a live launcher trains now: running, under a lease that has not lapsed (each launcher's
    own, else ``lease_s``), by a launcher not known gone from this host."""
    rows = []
    with reading(engine) as conn:
        for i in range(0, len(ids), ID_BATCH):
            stmt = select(Run.run_id, Run.lease_owner, Run.heartbeat_at).where(
                Run.run_id.in_(ids[i : i + ID_BATCH]), Run.status == "running")
            rows.extend(conn.execute(stmt))
    now = utcnow()
    held = set()
    for run_id, owner, beat in rows:
        if beat is not None and not lease_lapsed(owner, beat, now, lease_s) and not launcher_gone(owner):
            held.add(run_id)
    return held


def _to_train(chosen: dict[str, tuple[RunSpec, str | None]], finished: dict[str, str],
              limit: int | None, held: set[str] = frozenset()) -> list[tuple[RunSpec, str | None]]:
    """The ``chosen`` runs not ``finished``, up to ``limit``; runs another launcher trains (``held``) come last, so that
    a limit takes runs this launch can train rather than wait on."""
    todo = [v for k, v in chosen.items() if k not in finished and k not in held]
    todo += [v for k, v in chosen.items() if k in held and k not in finished]
    return todo[:limit] if limit is not None else todo


@dataclass
class Selection:
    """What a launch trains of its plans, and what it leaves (select_runs)."""

    runs: list[tuple[RunSpec, str | None]]  # to train, each with its name
    why_none: str  # with no run to train, why in a line
    finished: dict[str, str]  # each selected run that is done or diverged: its status
    held: set[str]  # runs to train that another live launcher trains now: this one waits for them

    def summary(self) -> str:
        """The line a launch starts with: how many runs it trains, and how many of them it waits for."""
        n = len(self.runs)
        line = f"{n} run{'' if n == 1 else 's'} to train"
        if waiting := sum(spec.run_id in self.held for spec, _ in self.runs):
            # A second launcher of a plan had said "3 runs to train" of runs the first one trains.
            who = "" if n == 1 else "all " if waiting == n else f"{waiting} of them "
            line += (f", {who}trained now by another launcher (this one waits on {'it' if waiting == 1 else 'them'}, "
                     "and takes over any that launcher stops training)")
        return line


def select_runs(engine: Engine, plans: list[Plan], opts: LaunchOptions) -> Selection:
    """The plans' runs that match ``--where``, are not done or diverged, up to ``--limit`` (runs other live launchers
    train taken last)."""
    chosen = _chosen(plans, opts.where)
    finished = _finished(engine, list(chosen))
    held = _held_elsewhere(engine, [k for k in chosen if k not in finished], opts.lease_timeout_s)
    todo = _to_train(chosen, finished, opts.limit, held)
    return Selection(todo, "" if todo else _nothing_to_train(len(chosen), finished), finished, held)


def _nothing_to_train(selected: int, finished: dict[str, str]) -> str:
    """Why a launch has no run to train, in a line: all its ``selected`` runs are ``finished``, or none was selected."""
    if not selected or len(finished) < selected:  # none selected
        return "0 runs to train"
    counts = Counter(finished.values())
    runs = f"the {selected} selected run is" if selected == 1 else f"all {selected} selected runs are"
    if not counts["diverged"]:
        return f"nothing to train: {runs} done"
    return f"nothing to train: {runs} finished ({counts['done']} done, {counts['diverged']} diverged)"


def _checkpoints_on_workers(root: Path, run_ids: list[str]) -> set[str]:
    """Those of ``run_ids`` with a checkpoint under ``root`` as a worker of the joined cluster sees it."""
    import ray

    probe = ray.remote(num_cpus=0, max_retries=0)(checkpointed_runs)
    ref = probe.remote(str(root), run_ids)
    try:
        return set(ray.get(ref, timeout=CKPT_CHECK_S))
    except ray.exceptions.GetTimeoutError:
        ray.cancel(ref, force=True)
        raise TimeoutError(f"no worker answered in {CKPT_CHECK_S:.0f} s") from None


def check_checkpoints(engine: Engine, runs: list[tuple[RunSpec, str | None]], opts: LaunchOptions, view: LaunchView) -> set[str]:
    """Refuse runs with a recorded checkpoint that is not under ``opts.ckpt_dir`` (they would train again from step 0),
    unless ``opts.restart``; returns the runs that then start over."""
    ids = [spec.run_id for spec, _ in runs]
    recorded: dict[str, tuple[int, str | None]] = {}
    with reading(engine) as conn:  # as the frame readers read: deferred, and ID_BATCH ids a statement
        for i in range(0, len(ids), ID_BATCH):
            stmt = select(Run.run_id, Run.ckpt_step, Run.ckpt_dir).where(Run.run_id.in_(ids[i : i + ID_BATCH]), Run.ckpt_step > 0)
            recorded.update({run_id: (step, where) for run_id, step, where in conn.execute(stmt)})
    if not recorded:
        return set()
    root = opts.ckpt_dir.resolve()
    seen_by = ""
    if opts.address:
        # The driver's own view of the folder proves nothing there (its host may not mount it, or hold an empty folder of
        # that name): a worker looks. Should none answer, the launch goes on as launches did before this check.
        seen_by = " as the cluster's workers see it"
        try:
            found = _checkpoints_on_workers(root, list(recorded))
        except Exception as exc:
            view.log(f"warning: could not check which of the {len(recorded)} runs with recorded checkpoints have them under "
                     f"{root} on the cluster ({_first_line(exc)}); a run whose checkpoints are not there trains from step 0")
            return set()
    else:
        found = set(checkpointed_runs(str(root), list(recorded)))
    missing = {run_id: recorded[run_id] for run_id in recorded if run_id not in found}
    if not missing:
        return set()
    n, top = len(missing), max(step for step, _ in missing.values())
    runs_have = f"{n} runs have" if n > 1 else "1 run has"
    them = "them" if n > 1 else "it"
    head = f"{runs_have} checkpoints recorded up to step {top} but none under {root}/<run_id>/{seen_by}"
    if opts.restart:
        view.log(f"--restart: {head}; {them} train{'' if n > 1 else 's'} from step 0")
        return set(missing)
    elsewhere = sorted({where for _, where in missing.values() if where and where != str(root)})
    relative = "a relative --ckpt-dir, like the default .slab/ckpt, is relative to the working folder"
    if elsewhere:
        folders = " or ".join(f"--ckpt-dir {where}" for where in elsewhere[:3]) + (" (or others)" if len(elsewhere) > 3 else "")
        fix = f"relaunch with {folders}, where {'they were' if n > 1 else 'it was'} checkpointed ({relative})"
    else:
        fix = f"relaunch with the --ckpt-dir {'they were' if n > 1 else 'it was'} checkpointed in ({relative})"
    raise LaunchError(f"{head}: {fix}, or pass --restart to train {them} from step 0 (losing up to {top} steps)")


def _faults() -> dict[str, str]:
    text = os.environ.get(FAULTS_ENV)
    return json.loads(text) if text else {}


#: Words of the database errors that a wait may cure: SQLite locked past its busy timeout, a PostgreSQL server
#: restarting, or out of reach for a moment. Anything else (a missing table, a read-only file, a bad password) is not.
_TRANSIENT_TEXT = (
    "database is locked", "database table is locked", "connection refused", "could not connect",
    "server closed the connection", "terminating connection", "the database system is", "connection timed out",
    "timeout expired", "connection reset", "no route to host", "could not receive data", "could not send data",
    "connection is lost", "ssl syscall error",
)
#: PostgreSQL SQLSTATEs of the same: connection exceptions (class 08), shutdowns, too many connections,
#: serialization failures and deadlocks, which the same write succeeds on again, and a statement or lock wait cut
#: short by the URL's statement_timeout or lock_timeout (57014, 55P03): PostgreSQL's counterpart of SQLite's file
#: locked past its busy timeout, usually another session's lock, which the launch had taken for the database lost.
_TRANSIENT_STATES = ("08", "57P01", "57P02", "57P03", "53300", "40001", "40P01", "57014", "55P03")


def transient(exc: OperationalError) -> bool:
    """True for a database error that waiting may cure: a locked SQLite file, a dropped or refused PostgreSQL connection."""
    if exc.connection_invalidated:  # SQLAlchemy saw the connection drop
        return True
    orig = getattr(exc, "orig", None) or exc
    state = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None) or ""
    if state.startswith(_TRANSIENT_STATES):
        return True
    text = str(orig).lower()
    return any(words in text for words in _TRANSIENT_TEXT)


def cancel_unfinished(ray, refs: list) -> None:
    """Force-cancel the tasks of ``refs`` that have not finished. Ray 2.x aborts the whole driver ("Tried to complete
    task that was not pending") when a task is force-cancelled just after it finished, as the tasks asked to stop after
    the database was lost had: a reproduction cancelling tasks ``ray.wait`` had just returned crashed in 2 of 2 runs of
    40 pairs, and none when the finished ones were skipped."""
    if not refs:
        return
    finished = set(ray.wait(refs, num_returns=len(refs), timeout=0, fetch_local=False)[0])
    for ref in refs:
        if ref not in finished:
            ray.cancel(ref, force=True)


def _run_state(engine: Engine, run_id: str):
    """A run's status, lease owner and recorded checkpoint step as the database has them now."""
    with engine.connect() as conn:
        return conn.execute(select(Run.status, Run.lease_owner, Run.ckpt_step).where(Run.run_id == run_id)).one()


def _read_runs(engine: Engine, run_ids: list[str]) -> dict[str, Run]:
    """The rows of these runs, by id, read ID_BATCH ids a statement (a launch's every id in one IN list would pass
    PostgreSQL's 65,535 parameters, or SQLite's variable limit, in a study of that many runs)."""
    found: dict[str, Run] = {}
    with Session(engine) as s:
        for i in range(0, len(run_ids), ID_BATCH):
            found.update((r.run_id, r) for r in s.scalars(select(Run).where(Run.run_id.in_(run_ids[i : i + ID_BATCH]))))
    return found


#: Terminal colour codes, which Ray puts in a task's error text.
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _tail(exc: BaseException, lines: int = 12) -> str:
    """The last lines of an exception's traceback (a failed Ray task's from the worker: where training failed)."""
    from ray.exceptions import RayTaskError

    if isinstance(exc, RayTaskError):  # the cause arrives without its traceback; Ray keeps the worker's as text
        text = _ANSI.sub("", str(exc))
    else:
        text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    return "\n".join(text.strip().splitlines()[-lines:])


class Driver:
    """The launch loop: claims, submits, collects and records runs until none is left to do."""

    #: What asked the launch to stop, as its runs' errors name it: Ctrl-C, or SIGTERM (a scheduler's preemption).
    stopped_by = "Ctrl-C"
    #: The smallest GPU share a run of this launch asks for (a task needs at least it); 0 where none is known.
    least_gpus = 0.0

    def __init__(self, engine: Engine, opts: LaunchOptions, view: LaunchView, restarts: set[str] = frozenset()):
        import ray

        from sweep.task import EventSink, train_pack, train_run, train_run_dp

        self.ray = ray
        self.engine, self.opts, self.view = engine, opts, view
        self.owner = lease_owner(opts.lease_timeout_s)  # its lease in it: status and other launchers wait that long
        self.sink = EventSink.remote()
        self.task = ray.remote(train_run)
        # A fresh process per GPU run releases its CUDA memory for the next (max_calls is not an option()).
        self.gpu_task = ray.remote(max_calls=1)(train_run)
        # Data-parallel runs: a light coordinator task; Ray Train reserves the workers (a placement group).
        self.dp_task = ray.remote(num_cpus=0, num_gpus=0)(train_run_dp)
        self.pack_task = ray.remote(train_pack)
        self.gpu_pack_task = ray.remote(max_calls=1)(train_pack)
        self.queue: list[list[Flight]] = []  # units to start: one run, or a pack of same-shape runs
        self.flights: dict[str, Flight] = {}
        self.units: dict[Any, Task] = {}  # task ref -> what it trains and holds
        self.waiting: dict[str, Flight] = {}  # leased by another live launcher
        self.waited: set[str] = set()  # runs said to be waiting
        self.outcome: dict[str, str] = {}
        self.restarts = set(restarts)  # runs that start over without their recorded checkpoints (--restart)
        self.stopping = False
        self.faults = _faults()
        resources = ray.cluster_resources()
        self.total_cpus = float(resources.get("CPU", 1))
        self.total_gpus = float(resources.get("GPU", 0))
        # With several GPUs, Ray would put every share of a GPU on the first GPU with room (first fit), so the
        # largest runs, started first, would all share one GPU. Each GPU is held instead as a one-GPU placement
        # group, and a run goes to an idle GPU, else to the GPU with the least work that has room.
        self.spread = not opts.cpu and self.total_gpus >= 2
        self.slots: list[GpuSlot] = []
        # Several heartbeats per lease, or another launcher takes runs this one still trains.
        self.heartbeat_s = min(opts.heartbeat_s, opts.lease_timeout_s / 4)
        self.lock_wait_s = lock_wait(opts.lease_timeout_s, self.heartbeat_s)
        self.db_away_since: float | None = None  # when the database stopped answering (None: it answers)

    # ---------------------------------------------------------------- admission

    def check_fits(self, runs: list[tuple[RunSpec, str | None]]) -> None:
        """Refuse, before anything starts, runs that the cluster cannot hold (``check_capacity`` foresaw it before
        anything was written; this is the started Ray's own count)."""
        if why := unfit(runs, self.opts, self.total_cpus, self.total_gpus):
            raise LaunchError(why)

    def _needs(self, unit: list[Flight]) -> tuple[float, float]:
        """(CPUs, GPUs) a unit's task reserves."""
        cpus = self.opts.cpus_per_run * (data_parallel_workers(unit[0].spec.gpus) if len(unit) == 1 else 1)
        gpus = 0.0 if self.opts.cpu else pack_gpus([(f.spec, f.name) for f in unit])
        return cpus, gpus

    def _fits(self, cpus: float, gpus: float) -> bool:
        """Whether a task reserving ``cpus`` and ``gpus`` can start now."""
        if cpus > self._cpus_left():
            return False
        if self.opts.cpu:
            return True
        if not self.spread:
            return gpus + sum(t.gpus for t in self.units.values()) <= self.total_gpus + 1e-9
        if gpus > 1:  # a data-parallel run: whole GPUs that no slot holds, after letting idle slots go
            return self._free_gpus() + sum(1 for slot in self.slots if slot.share == 0) >= gpus
        return self._free_gpus() >= 1 or self._pick_slot(gpus) is not None

    def _free_gpus(self) -> float:
        """GPUs neither held by a slot nor taken by a data-parallel run."""
        multi = sum(t.gpus for t in self.units.values() if t.slot is None)
        return self.total_gpus - len(self.slots) - multi

    def _pick_slot(self, share: float) -> GpuSlot | None:
        """The slot with the least work among those with room for ``share``."""
        fits = [slot for slot in self.slots if slot.share + share <= 1 + 1e-9]
        return min(fits, key=lambda slot: slot.work) if fits else None

    def _slot_for(self, share: float) -> GpuSlot:
        """An idle GPU (held as a new slot) if there is one, else the least loaded slot with room."""
        if self._free_gpus() >= 1:
            from ray.util.placement_group import placement_group

            slot = GpuSlot(placement_group([{"GPU": 1}]))
            self.slots.append(slot)
            return slot
        slot = self._pick_slot(share)
        assert slot is not None, "_fits admitted a unit with no room for it"
        return slot

    def _release_idle_slots(self, gpus: float) -> None:
        """Give idle slots' GPUs back to Ray until ``gpus`` whole GPUs are free (for a data-parallel run)."""
        from ray.util.placement_group import remove_placement_group

        for slot in [s for s in self.slots if s.share == 0]:
            if self._free_gpus() >= gpus:
                break
            remove_placement_group(slot.group)
            self.slots.remove(slot)

    def _release_all_slots(self) -> None:
        from ray.util.placement_group import remove_placement_group

        for slot in self.slots:
            remove_placement_group(slot.group)
        self.slots.clear()

    # ---------------------------------------------------------------- the loop

    def run(self, runs: list[tuple[RunSpec, str | None]]) -> LaunchResult:
        """Train every selected run (or stop on Ctrl-C) and return how each ended."""
        packs = plan_packs(runs, self.opts.pack, cpu=self.opts.cpu, gpu_mem_bytes=self.opts.gpu_mem_gib * 2**30)
        if any(len(p) > 1 for p in packs):
            self.view.log(f"{len(runs)} runs in {len(packs)} tasks: same-shape runs train together as stacked models (--pack)")
        # Largest first (the classic longest-processing-time rule): the longest runs never start last and
        # leave the other GPUs idle at the end of a sweep; multi-GPU runs go before any share of a GPU is taken.
        packs = sorted(packs, key=_unit_order)
        self.least_gpus = 0.0 if self.opts.cpu else min((spec.gpus for spec, _ in runs), default=0.0)
        self.queue = [[Flight(spec=s, name=n, attempt=0, tries=0, microbatch=None) for s, n in p] for p in packs]
        order = [s.run_id for s, _ in runs]
        names = {s.run_id: n for s, n in runs}
        last_beat = 0.0
        # The sink's actor up before any run is claimed: the first drain waits for it, and on a loaded host that wait
        # (a worker process to start) had outlasted a short lease before the first heartbeat, losing the run.
        self.ray.get(self.sink.drain.remote())
        # SIGTERM (a scheduler's preemption, `timeout`, `kill`) stops as Ctrl-C does: runs checkpoint where they are.
        # Ray's own handler, which it replaces here, exited at once and lost every step since the last checkpoint.
        previous = {sig: signal.signal(sig, self._on_stop_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        interrupted = False
        try:
            while self.queue or self.flights or self.waiting:
                self._start_ready()
                self._collect()
                now = time.monotonic()
                if now - last_beat >= self.heartbeat_s:
                    for run_id in self._db(heartbeat, self.engine, self.owner, list(self.flights)):
                        self._lost(run_id)
                    self._retry_waiting()
                    last_beat = now
                if self.stopping and not self.flights:
                    break
                self.view.refresh()
        except KeyboardInterrupt:
            interrupted = True
            try:
                self._cancel_all(f"cancelled by {self.stopped_by}")
            except OperationalError as exc:  # not retried: a second Ctrl-C asks to stop now, and the leases lapse
                raise DatabaseError(
                    f"stopped by {self.stopped_by} while the database was unavailable ({_first_line(getattr(exc, 'orig', None) or exc)}); "
                    f"runs left leased resume from their checkpoints at the next slab launch (at once on this host, else "
                    f"after the {self.opts.lease_timeout_s:.0f} s lease)"
                ) from None
        except OperationalError as exc:  # the database went away for good (see _db), or failed as no wait cures
            retried = f" (retried for {self.opts.lease_timeout_s:.0f} s)" if self.db_away_since is not None else ""
            why = _first_line(getattr(exc, "orig", None) or exc)
            # Stopped as on Ctrl-C, not cancelled at once: a cancel loses every step since each run's last checkpoint.
            stopped = self._stop_running(f"lost the database ({why})")
            try:
                self._cancel_all("released after the launcher lost the database")
            except OperationalError:  # still away: the leases lapse, and a relaunch resumes the runs
                pass
            raise DatabaseError(
                f"lost the database: {why}{retried}{stopped}; a relaunch resumes the runs from their checkpoints (at "
                f"once on this host, else after the {self.opts.lease_timeout_s:.0f} s lease)"
            ) from None
        except BaseException:
            self._cancel_all("released after a launcher error")  # leave no run leased to a failed driver
            raise
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self._release_all_slots()
        return LaunchResult(rows=self._final_rows(order, names), interrupted=interrupted or self.stopping)

    def _db(self, fn, *args, **kwargs):
        """Call ``fn`` (a read or write of the database), riding out a short outage: transient errors are retried
        with backoff until the database has been away for one lease, after which the error ends the launch."""
        delay = 0.25
        while True:
            try:
                result = fn(*args, **kwargs)
            except OperationalError as exc:
                if not transient(exc):
                    raise
                now = time.monotonic()
                if self.db_away_since is None:
                    self.db_away_since = now
                    self.view.log(f"database unavailable ({_first_line(getattr(exc, 'orig', None) or exc)}); "
                                  f"retrying for up to {self.opts.lease_timeout_s:.0f} s")
                # Past one lease other launchers may have taken this one's runs: its view of them is stale.
                left = self.db_away_since + self.opts.lease_timeout_s - now
                if left <= 0:
                    raise
                time.sleep(min(delay, left))
                delay = min(2 * delay, 5.0)
                continue
            if self.db_away_since is not None:
                self.view.log(f"database back after {time.monotonic() - self.db_away_since:.0f} s")
                self.db_away_since = None
            return result

    def _on_stop_signal(self, signum, frame) -> None:
        """Ctrl-C or SIGTERM: the first stops starting runs and asks running ones to checkpoint; a second cancels."""
        self.stopped_by = "SIGTERM" if signum == signal.SIGTERM else "Ctrl-C"
        if self.stopping:
            raise KeyboardInterrupt
        self._request_stop()
        if signum == signal.SIGTERM:
            self.view.log("stopping on SIGTERM: no new runs; running ones checkpoint and stop (a second SIGTERM or "
                          "Ctrl-C cancels now)")
        else:
            self.view.log("stopping: no new runs; running ones checkpoint and stop (Ctrl-C again to cancel now)")

    def _request_stop(self) -> None:
        """Start no more runs, and ask running ones to checkpoint and stop (``pretrain``'s ``should_stop``)."""
        self.stopping = True
        self.sink.request_stop.remote()

    def _stop_running(self, why: str) -> str:
        """Ask the running tasks to checkpoint and stop, as the first Ctrl-C does, and wait up to ``stop_grace_s`` for
        them without the database (their events go unwritten); returns how that went, for the launch's error line."""
        if not self.units:
            return ""
        self._request_stop()
        runs = sum(run_id in self.flights for task in self.units.values() for run_id in task.run_ids)
        grace = self.opts.stop_grace_s
        self.view.log(f"{why}: asking the {runs} running run{'' if runs == 1 else 's'} to checkpoint and stop, for up "
                      f"to {grace:.0f} s (Ctrl-C cancels {'it' if runs == 1 else 'them'} now)")
        try:
            _, left = self.ray.wait(list(self.units), num_returns=len(self.units), timeout=grace)
        except KeyboardInterrupt:  # _request_stop set stopping, so a Ctrl-C raises here: cancel without waiting
            left = list(self.units)
        late = sum(run_id in self.flights for ref in left for run_id in self.units[ref].run_ids)
        if not late:
            return f"; the {runs} running run{'' if runs == 1 else 's'} checkpointed and stopped"
        return (f"; {runs - late} of the {runs} running runs checkpointed and stopped, {late} did not within {grace:.0f} s "
                f"and {'was' if late == 1 else 'were'} cancelled (losing the steps since {'its' if late == 1 else 'their'} "
                "last checkpoint)")

    def _start_ready(self) -> None:
        if self.stopping:
            return
        now = time.monotonic()
        # Needs (CPUs, GPUs) found not to fit in this pass: a pass only takes resources, so no later unit of the same
        # need fits either. Checking every queued unit against every running task, every poll, had cost a launch of
        # 12,000 runs 33 s of the launcher's time on 16 CPUs (162 s on quarter GPUs): quadratic in its runs.
        full: set[tuple[float, float]] = set()
        for unit in list(self.queue):
            if self.stopping:  # Ctrl-C or SIGTERM while this pass started units: start no more
                return
            if max(f.not_before for f in unit) > now:
                continue
            need = self._needs(unit)
            if need in full:
                continue
            if not self._fits(*need):
                full.add(need)
                if not self._fits(self.opts.cpus_per_run, self.least_gpus):
                    return  # not even the smallest task fits: nothing else in the queue starts in this pass
                continue
            self.queue.remove(unit)
            self._claim_and_submit(unit)

    def _cpus_left(self) -> float:
        """CPUs no running task reserves."""
        return self.total_cpus + 1e-9 - sum(t.cpus for t in self.units.values())

    def _claim(self, flight: Flight) -> bool:
        """Lease one run for this launcher; False when it is finished or leased by another live launcher."""
        run_id = flight.spec.run_id
        row = self._db(_run_state, self.engine, run_id)
        if row.status in ("done", "diverged"):
            # Finished by another launcher since this one selected it: the progress counts it as the summary will.
            self.outcome[run_id] = row.status
            self.view.run_finished(run_id, row.status, "finished by another launcher", name=flight.name)
            return False
        # The holder's lease, not this launcher's: a launch with a long --lease-timeout keeps its runs that long.
        stale = utcnow() - timedelta(seconds=lease_of(row.lease_owner) or self.opts.lease_timeout_s)
        if row.status == "running" and launcher_gone(row.lease_owner):
            stale = utcnow() + timedelta(days=1)  # its launcher is gone from this host: no need to wait
        # Taken only from the holder judged here: a launcher that took the run over since has a fresh heartbeat, which
        # the lease a day ahead (a holder gone from this host) would still count as stale.
        attempt = self._db(claim_run, self.engine, run_id, self.owner, stale, holder=row.lease_owner)
        if attempt is None:
            self.waiting[run_id] = flight
            if run_id not in self.waited:  # checked again at every heartbeat: said once
                self.waited.add(run_id)
                self.view.log(f"{flight.name or run_id}: leased by another launcher ({row.lease_owner}); waiting")
            return False
        flight.attempt, flight.tries, flight.started = attempt, flight.tries + 1, time.monotonic()
        flight.stepped = False
        self.flights[run_id] = flight  # on the books before its task starts: an interrupt until then still releases it
        if run_id in self.restarts:  # its recorded checkpoint is not there: the run records its new ones as it goes
            self.restarts.discard(run_id)
            self._db(update_run, self.engine, run_id, self.owner, ckpt_step=None, ckpt_dir=None)
            flight.from_step = 0
        else:
            flight.from_step = self._resume_step(run_id, row.ckpt_step)
        return True

    def _resume_step(self, run_id: str, recorded: int | None) -> int:
        """The step a run's next attempt resumes from: its newest checkpoint here, or on a cluster the one recorded."""
        if self.opts.address:  # the workers' folder may not be this host's
            return recorded or 0
        from models.train import checkpoint_steps

        return max(checkpoint_steps(self.opts.ckpt_dir.resolve() / run_id), default=0)

    def _claim_and_submit(self, unit: list[Flight]) -> None:
        unit = [f for f in unit if self._claim(f)]
        if not unit:
            return
        root = str(self.opts.ckpt_dir.resolve())
        faults = [self.faults.get(f.spec.run_id) or self.faults.get(f.name or "") for f in unit]
        cpus, gpus = self._needs(unit)
        # Per task, not only per job: a launch inside an already started Ray still sets them; children
        # (Ray Train's controller and workers) inherit them.
        env = {"env_vars": dict(WORKER_ENV)}
        options: dict[str, Any] = {"num_cpus": self.opts.cpus_per_run, "num_gpus": gpus, "max_retries": 0, "runtime_env": env}
        flight = unit[0]
        dp = len(unit) == 1 and data_parallel_workers(flight.spec.gpus) > 1
        slot = None
        if self.spread and dp:
            self._release_idle_slots(gpus)
        elif self.spread:
            from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

            slot = self._slot_for(gpus)
            # The slot holds the GPU alone; the driver counts CPUs, and the task is told its thread count.
            options.update(num_cpus=0, scheduling_strategy=PlacementGroupSchedulingStrategy(slot.group, 0))
        threads = {"threads": self.opts.cpus_per_run}
        if len(unit) > 1:
            task = self.pack_task if self.opts.cpu else self.gpu_pack_task
            ref = task.options(**options).remote(
                [f.spec.to_dict() for f in unit], self.sink, [f.attempt for f in unit], root, self.opts.cpu, None, faults,
                self.opts.ckpt_every_steps, self.opts.ckpt_every_s, gpus, **threads, lock_wait_s=self.lock_wait_s,
            )
        else:
            args = (flight.spec.to_dict(), self.sink, flight.attempt, root, self.opts.cpu, flight.microbatch, faults[0],
                    self.opts.ckpt_every_steps, self.opts.ckpt_every_s)
            if dp:
                ref = self.dp_task.options(max_retries=0, runtime_env={"env_vars": data_parallel_env()}).remote(
                    *args, self.opts.cpus_per_run, fsdp_min_params=self.opts.fsdp_min_params, lock_wait_s=self.lock_wait_s,
                )
            else:
                ref = (self.task if self.opts.cpu else self.gpu_task).options(**options).remote(
                    *args, **threads, lock_wait_s=self.lock_wait_s)
        work = _work([f.spec for f in unit])
        self.units[ref] = Task([f.spec.run_id for f in unit], cpus, gpus, slot, work)
        if slot is not None:
            slot.share += gpus
            slot.work += work
        for f in unit:
            f.ref = ref
            self.flights[f.spec.run_id] = f
            # from_step only when set: views written for the four-argument call still work for fresh runs
            resumes = {"from_step": f.from_step} if f.from_step else {}
            self.view.run_started(f.spec.run_id, f.spec, f.name, f.attempt, **resumes)

    def _retry_waiting(self) -> None:
        """Queue again the runs other launchers held: one whose lease is gone starts when it fits, as any run does."""
        for flight in self.waiting.values():
            self.queue.append([flight])
        self.waiting.clear()

    def _collect(self) -> None:
        ready = []
        if self.units:
            # Back as soon as a task ends, then take every other that has: waiting for all of them (or poll_s) had left
            # the CPU or GPU of a run that ended early idle until the poll was out (up to poll_s per run).
            ready, rest = self.ray.wait(list(self.units), num_returns=1, timeout=self.opts.poll_s)
            if ready and rest:
                ready += self.ray.wait(rest, num_returns=len(rest), timeout=0)[0]
        else:
            time.sleep(self.opts.poll_s)
        self._write_events(self.ray.get(self.sink.drain.remote()))
        for ref in ready:
            self._finish_unit(ref)

    def _write_events(self, events: list[tuple]) -> None:
        metrics, evals, runs = [], [], {}
        for run_id, attempt, kind, payload in events:
            flight = self.flights.get(run_id)
            if flight is None or attempt != flight.attempt:
                continue  # a straggler from an earlier attempt
            update = runs.setdefault(run_id, {})
            if kind in ("train", "val", "eval", "ckpt") and not payload.get("replayed"):
                flight.stepped = True
            if kind == "start":
                update.update(host=payload.get("host"), gpu=payload.get("gpu"), n_gpus=gpus_held(flight.spec, self.opts.cpu))
            elif kind == "train":
                metrics.append(
                    {
                        "run_id": run_id, "step": int(payload["step"]), "tokens": int(payload["tokens"]),
                        "flops": float(payload["flops"]), "loss": float(payload["loss"]), "lr": float(payload["lr"]),
                        "tokens_per_s": payload.get("tokens_per_s"), "mfu": payload.get("mfu"),
                    }
                )
                update["step"] = int(payload["step"])
            elif kind == "val":
                evals.append({"run_id": run_id, "step": int(payload["step"]), "name": "val_loss", "value": float(payload["val_loss"])})
                update["val_loss"] = float(payload["val_loss"])
            elif kind == "eval":
                evals.append({"run_id": run_id, "step": int(payload["step"]), "name": payload["name"], "value": float(payload["value"])})
            elif kind == "resume":
                update["resumed_from_step"] = int(payload["step"])
            elif kind == "ckpt":  # sent once the checkpoint is complete on disk
                # The run has trained to it: a stop checkpoints between logged steps, and the summary read the last one
                # logged. Saves are synchronous, so no logged step of this attempt is past it yet.
                update.update(step=int(payload["step"]), ckpt_step=int(payload["step"]),
                              ckpt_dir=str(self.opts.ckpt_dir.resolve()))
            self.view.run_event(run_id, kind, payload)
        runs = {k: v for k, v in runs.items() if v}
        if metrics or evals or runs:
            self._db(write_results, self.engine, metrics, evals, runs, owner=self.owner)

    def _release(self, ref) -> Task:
        """Take a finished or cancelled task off the books, freeing its share of its GPU."""
        task = self.units.pop(ref)
        if task.slot is not None:
            task.slot.share = max(0.0, task.slot.share - task.gpus)
            task.slot.work -= task.work
        return task

    def _finish_unit(self, ref) -> None:
        run_ids = self._release(ref).run_ids
        pack_failed = False  # the whole pack failed: what ended it may be any one member's
        try:
            result = self.ray.get(ref)
        except Exception as exc:  # the task failed: every run it trained failed with it
            results = [exc] * len(run_ids)
            if len(run_ids) > 1:
                pack_failed = True
                self.view.log(f"a pack of {len(run_ids)} runs failed ({type(getattr(exc, 'cause', None) or exc).__name__}); its runs retry alone")
        else:
            # A pack's task returns per member its summary or what ended that member alone (its own checkpoint refused,
            # its divergence): judged as a lone run's, so a member's own bad input is not retried.
            results = result if len(run_ids) > 1 else [result]
        for run_id, outcome in zip(run_ids, results):
            self._settle(run_id, outcome, packed=pack_failed)

    def _settle(self, run_id: str, outcome: Any, packed: bool = False) -> None:
        """Record how one run's task ended (a summary, or the exception that ended it) and retry if due; ``packed``: the
        exception ended the whole pack the run trained in."""
        flight = self.flights.get(run_id)
        if flight is None:  # lost to another launcher while its pack trained on: already said so
            return
        self._judge(flight, outcome, packed)
        # Off the books only once its end is written: a second Ctrl-C before then leaves it in flights, which the
        # interrupted launch releases, rather than running under this launcher's lease until a relaunch here.
        self.flights.pop(run_id, None)

    def _judge(self, flight: Flight, outcome: Any, packed: bool) -> None:
        """``_settle``'s verdict on one run of this launcher's books: record it, and queue the run again if due."""
        from models.train import CheckpointUnreadable, Diverged, Interrupted, OutOfMemory, Unlabelled

        run_id = flight.spec.run_id
        summary = outcome
        if isinstance(outcome, Exception):  # classify the failure by its cause
            exc = outcome
            cause = getattr(exc, "cause", None) or exc
            out_of_memory = isinstance(cause, OutOfMemory) or isinstance(exc, OutOfMemory)
            if isinstance(cause, Diverged) or isinstance(exc, Diverged):
                step, why = getattr(cause, "step", None), getattr(cause, "reason", cause)
                if self._record(flight, status="diverged", error=f"diverged at step {step}: {why}", step=step, lease_owner=None):
                    self._ended(run_id, "diverged", f"diverged at step {step}: {why}")
            elif isinstance(cause, Interrupted) or isinstance(exc, Interrupted):
                if self._record(flight, status="pending", error=f"stopped at step {cause.step} by {self.stopped_by}"):
                    self._ended(run_id, "pending", f"stopped at step {cause.step}; a relaunch with --ckpt-dir "
                                f"{self.opts.ckpt_dir.resolve()} resumes it")
            elif packed and out_of_memory:
                if self._record(flight, status="failed", error=f"out of memory at step {cause.step} in a pack; retrying alone"):
                    self.view.run_retrying(run_id)
                    self.queue.append([flight])
            elif out_of_memory and (cause.microbatch or 1) > 1:
                flight.microbatch = max(1, cause.microbatch // 2)
                if self._record(flight, status="failed", microbatch=flight.microbatch,
                                error=f"out of memory at step {cause.step} with microbatch {cause.microbatch}; retrying with {flight.microbatch}"):
                    self.view.log(f"{flight.name or run_id}: out of memory; retrying with microbatch {flight.microbatch}")
                    self.view.run_retrying(run_id)
                    self.queue.append([flight])
            else:
                error = _tail(exc)
                if not self._record(flight, status="failed", error=error):
                    return
                # unreadable checkpoints stay so until a person removes them, and data without a labelled token
                # until someone changes it: a retry would only fail again. So does a ValueError before the attempt
                # trained a step: the run's own data, checkpoint or batch is wrong (a corpus too short for seq_len, a
                # checkpoint of other data). A pack's may be one member's, so its runs still retry alone.
                before_training = isinstance(cause, ValueError) and not flight.stepped and not packed
                retryable = not (isinstance(cause, (CheckpointUnreadable, Unlabelled)) or before_training)
                # What ended a whole pack may be any one member's: each retries alone at least once, whatever
                # --max-attempts, so that none fails without having failed on its own. Retries train alone (their
                # crashes are never ``packed``), so a crash that comes back alone takes the usual rule, not a loop.
                if (packed or (retryable and flight.tries < self.opts.max_attempts)) and not self.stopping:
                    delay = self.opts.backoff_s * 2 ** (flight.tries - 1)
                    flight.not_before = time.monotonic() + delay
                    self.view.run_retrying(run_id)
                    self.queue.append([flight])
                    self.view.log(f"{flight.name or run_id}: attempt {flight.attempt} failed ({error.splitlines()[-1][:120]}); retrying in {delay:.0f} s")
                else:
                    self._ended(run_id, "failed", error.splitlines()[-1][:200])
            return
        values = summary if isinstance(summary, dict) else asdict(summary)
        # What was trained, in whole steps (up to a step more than the plan's budget), is what the fits read.
        trained = {k: values[k] for k in ("tokens", "flops") if values.get(k) is not None}
        if self._record(
            flight, status="done", error=None, **trained,
            final_loss=values.get("final_loss"), val_loss=values.get("val_loss"), wall_s=values.get("wall_s"),
            step=values.get("steps"), data_sha256=values.get("data_sha256"), microbatch=values.get("microbatch"),
            resumed_from_step=values.get("resumed_from_step"), lease_owner=None,
        ):
            self._ended(run_id, "done", f"loss {values.get('final_loss', float('nan')):.4f}")

    def _record(self, flight: Flight, **values) -> bool:
        """Write how a run of this launcher ended; False (and said) when another launcher has taken it since."""
        if self._db(update_run, self.engine, flight.spec.run_id, self.owner, **values):
            return True
        self._say_lost(flight, f"its {values.get('status')} result here was not recorded")
        return False

    def _lost(self, run_id: str) -> None:
        """A run this launcher trains was taken by another launcher (its lease lapsed): stop training it here."""
        flight = self.flights.pop(run_id, None)
        if flight is None:
            return
        self._say_lost(flight, "stopped training it here")
        # Its worker holds the run's checkpoint folder lock, on which the new owner's worker waits: end it now,
        # unless it trains other runs (a pack) that are still this launcher's.
        for ref, task in list(self.units.items()):
            if run_id in task.run_ids and not any(r in self.flights for r in task.run_ids):
                cancel_unfinished(self.ray, [ref])
                self._release(ref)

    def _say_lost(self, flight: Flight, what: str) -> None:
        """Log that another launcher holds a run this one trained, which counts neither done nor failed here."""
        run_id = flight.spec.run_id
        owner = self._db(_run_state, self.engine, run_id).lease_owner
        self.outcome[run_id] = "lost"
        self.view.run_finished(
            run_id, "lost", f"taken over by another launcher ({owner or 'none now'}) after no heartbeat from here for "
            f"{self.opts.lease_timeout_s:.0f} s (a host asleep or a stalled launcher?); {what}", name=flight.name)

    def _ended(self, run_id: str, status: str, detail: str) -> None:
        self.outcome[run_id] = status
        self.view.run_finished(run_id, status, detail)

    def _cancel_all(self, reason: str = "cancelled by Ctrl-C") -> None:
        cancel_unfinished(self.ray, list(self.units))
        for run_id in self.flights:
            update_run(self.engine, run_id, self.owner, status="pending", error=reason)
        self.flights.clear()
        self.units.clear()

    def _final_rows(self, order: list[str], names: dict[str, str | None]) -> list[dict]:
        rows = self._db(_read_runs, self.engine, order)
        out = []
        for run_id in order:
            r = rows[run_id]
            row = {
                "run_id": run_id, "name": names.get(run_id), "arch": r.arch, "status": r.status,
                "attempts": r.attempts, "step": r.step, "final_loss": r.final_loss, "val_loss": r.val_loss,
                "wall_s": r.wall_s, "error": r.error,
            }
            if self.outcome.get(run_id) == "lost":  # its row is the new owner's: nothing in it is this launch's result
                by = f" ({r.lease_owner})" if r.lease_owner else ""
                row.update(status="lost", step=None, final_loss=None, val_loss=None, wall_s=None,
                           error=f"lost to another launcher{by} after this launcher's lease lapsed; {r.status} there now")
            out.append(row)
        return out


def unfit(runs: list[tuple[RunSpec, str | None]], opts: LaunchOptions, cpus: float, gpus: float) -> str | None:
    """Why a cluster of ``cpus`` and ``gpus`` can never start one of ``runs`` (it would wait for it forever), or None."""
    if not runs:
        return None
    if not opts.cpu:
        for spec, name in runs:
            if spec.gpus > 1 and spec.gpus > gpus:
                return f"run {name or spec.run_id} asks for {spec.gpus:g} GPUs but the cluster has {gpus:g}"
        if gpus == 0:
            return "the Ray cluster has no GPU; pass --cpu to train on CPU"
    # On GPUs too: each task reserves --cpus-per-run CPUs per worker, and one that never fits was waited for forever.
    for spec, name in runs:
        need = opts.cpus_per_run * data_parallel_workers(spec.gpus)
        if need > cpus:
            return f"run {name or spec.run_id} needs {need} CPUs for its workers but the cluster has {cpus:g}"
    return None


def capacity(opts: LaunchOptions) -> tuple[float, float]:
    """(CPUs, GPUs) of the Ray a launch trains on: the running (or joined) one's, else what a local Ray will count."""
    if _ray_running():
        import ray

        resources = ray.cluster_resources()
        return float(resources.get("CPU", 1)), float(resources.get("GPU", 0))
    try:
        from ray._private.utils import get_num_cpus  # Ray's own count, within the host's cgroup limits
    except ImportError:  # another Ray: the cores this process may run on
        def get_num_cpus() -> int:
            return len(os.sched_getaffinity(0))
    cpus = opts.num_cpus or get_num_cpus()
    gpus = 0 if opts.cpu else opts.num_gpus if opts.num_gpus is not None else host_gpus()
    return float(cpus), float(gpus)


def check_capacity(plans: list[Plan], opts: LaunchOptions) -> None:
    """Refuse, before the database is written or a local Ray starts, a selected run that the cluster cannot hold;
    one the database (if there is one yet) holds finished needs nothing."""
    chosen = _chosen(plans, opts.where)
    cpus, gpus = capacity(opts)
    if not unfit(list(chosen.values()), opts, cpus, gpus):
        return
    todo = _to_train(chosen, _finished_so_far(opts.db_url, list(chosen)), opts.limit)
    if why := unfit(todo, opts, cpus, gpus):
        raise LaunchError(why)


def _finished_so_far(db_url: str | None, ids: list[str]) -> dict[str, str]:
    """``_finished`` of a database that may not exist yet, read without making or changing it."""
    url = resolve_url(db_url)
    path = sqlite_path(url)
    if path is not None and not path.is_file():  # connecting would create the file
        return {}
    engine = make_engine(url)
    try:
        return _finished(engine, ids)
    except SQLAlchemyError:  # no tables yet, or no connection: the launch's own open_db says why, if it must
        return {}
    finally:
        engine.dispose()


def gpus_held(spec: RunSpec, cpu: bool) -> float:
    """GPUs a run holds while it trains (``runs.n_gpus``): its plan's share or count, none with --cpu."""
    # With --cpu a data-parallel run (gpus > 1) trains on that many CPU workers, still no GPU.
    return 0.0 if cpu else spec.gpus


def _unit_order(unit: list[tuple[RunSpec, str | None]]) -> tuple[float, float]:
    """Sort key of a task to start: multi-GPU runs by GPU count, then everything by training FLOPs, largest first."""
    return (-max(1.0, pack_gpus(unit)), -_work([spec for spec, _ in unit]))


def _work(specs: list[RunSpec]) -> float:
    """Estimated work of a task: its runs' training FLOPs (what starts first, and how loaded a GPU is)."""
    return sum(spec.derived()["flops"] for spec in specs)


def init_ray(opts: LaunchOptions):
    """Start a local Ray in this process, or join ``opts.address``; workers get ``WORKER_ENV``."""
    import ray

    from sweep.task import WORKER_ENV

    if ray.is_initialized():
        return ray
    runtime_env = {"env_vars": dict(WORKER_ENV), "worker_process_setup_hook": WORKER_SETUP_HOOK}
    kwargs: dict[str, Any] = {"runtime_env": runtime_env, "logging_level": logging.WARNING, "log_to_driver": True}
    if opts.address:
        try:
            ray.init(address=opts.address, **kwargs)
        except (ConnectionError, ValueError) as exc:  # nothing listening there, or not a Ray address
            raise LaunchError(f"cannot join the Ray cluster at {opts.address}: {str(exc).splitlines()[0]}") from None
    else:
        if opts.cpu:
            kwargs["num_gpus"] = 0
        if opts.num_cpus:
            kwargs["num_cpus"] = opts.num_cpus
        if opts.num_gpus is not None and not opts.cpu:
            kwargs["num_gpus"] = opts.num_gpus  # Ray then hands tasks only GPUs 0..num_gpus-1
        # "local": a Ray of its own, as --help promises, even where another runs on this host (`ray start`, a test's
        # cluster): without it ray.init joined that one, and with num_cpus or num_gpus set refused to (a ValueError).
        # Ray 2.5x turns token authentication on for a local cluster and says so in a WARNING line amid the launch's
        # progress on every launch; the authentication stays on, its notice is not shown.
        notice = logging.getLogger("ray._private.authentication.authentication_token_setup")
        quiet = _DropMessage("Token authentication is enabled for this Ray cluster")
        notice.addFilter(quiet)
        try:
            ray.init(address="local", include_dashboard=False, **kwargs)
        except (OSError, RuntimeError, ConnectionError) as exc:  # its session folder on a full disk, ports it cannot take
            raise LaunchError(f"cannot start a local Ray: {_first_line(exc)}") from None
        finally:
            notice.removeFilter(quiet)
    return ray


class _DropMessage(logging.Filter):
    """A logging filter that drops the records whose message starts with ``prefix``."""

    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


def host_gpus() -> int:
    """How many GPUs this host's PyTorch sees (0 without CUDA)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Fail in seconds on a host:port where nothing listens; Ray itself retries such an address for minutes."""
    target = address
    if address == "auto" and os.environ.get("RAY_ADDRESS"):
        target = os.environ["RAY_ADDRESS"]  # what Ray joins for "auto"
        address = f"auto (RAY_ADDRESS={target})"
    host, sep, port = target.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit():
        return  # "auto" and the like: ray.init resolves them, and says at once when it finds no cluster
    try:
        conn = socket.create_connection((host, int(port)), timeout=timeout_s)
    except OSError as exc:
        raise LaunchError(f"cannot join the Ray cluster at {address}: nothing answers there ({exc})") from None
    with conn:
        # Ray's GCS and its client server speak gRPC; anything else there (a web server, a silent port) Ray
        # would retry for many minutes, deaf to SIGTERM. Under TLS the plain preface gets no answer: not probed.
        if os.environ.get("RAY_USE_TLS", "0").lower() in ("0", "false", "") and not _answers_grpc(conn, timeout_s):
            raise LaunchError(f"cannot join the Ray cluster at {address}: something answers there, but not a Ray "
                              "cluster (no gRPC reply); a head node's GCS listens on port 6379 by default")


#: The HTTP/2 client preface and an empty SETTINGS frame, to which every gRPC server replies with its SETTINGS.
_H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])


def _answers_grpc(conn: socket.socket, timeout_s: float) -> bool:
    """True when the server on ``conn`` answers the HTTP/2 preface with a SETTINGS frame, as gRPC servers do."""
    conn.settimeout(timeout_s)
    head = b""
    try:
        conn.sendall(_H2_PREFACE)
        while len(head) < 9:  # a frame header: 3 bytes of length, then the type (4 = SETTINGS)
            chunk = conn.recv(9 - len(head))
            if not chunk:
                break
            head += chunk
    except OSError:  # a timeout included: a silent port is no Ray either
        return False
    return len(head) == 9 and head[3] == 4


def check_ckpt_dir(path: Path, local: bool = False) -> None:
    """Refuse a --ckpt-dir that could not be made: it or a folder above it is a file, or the nearest existing folder
    above it cannot be written; with ``local`` (workers on this host), also an existing folder it cannot write in.
    Makes nothing itself; on a cluster an existing folder is taken as it is (the workers write it, as they see it)."""
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise LaunchError(f"--ckpt-dir {path}: {existing} is a file, not a folder")
    if existing != path and not os.access(existing, os.W_OK | os.X_OK):
        raise LaunchError(f"--ckpt-dir {path}: cannot create it, {existing} is not writable")
    if existing == path and local and not os.access(path, os.W_OK | os.X_OK):
        # Every run had failed --max-attempts times on a PermissionError in its worker, after the plans were registered.
        raise LaunchError(f"--ckpt-dir {path}: cannot write in it (a read-only mount, or another user's folder?)")
    if existing != path or local:
        # os.access answers yes to root for a read-only mount or /proc: a folder made and removed at once tells, before
        # the plans are registered (the launcher's own mkdir had failed after).
        try:
            os.rmdir(tempfile.mkdtemp(prefix=".slab-probe-", dir=existing))
        except OSError as exc:
            how = "create it" if existing != path else "write in it"
            raise LaunchError(f"--ckpt-dir {path}: cannot {how}: {exc.strerror or exc}") from None


def check_options(opts: LaunchOptions) -> None:
    """Refuse options that train nothing or contradict each other, before anything is written: --limit below 1, --cpu
    with --num-gpus above 0, --num-gpus with --address."""
    if opts.limit is not None and opts.limit < 1:
        # It had registered the plans and said "0 runs to train" (exit 0); slab add registers them.
        raise LaunchError(f"--limit {opts.limit} trains no run: give 1 or more (slab add PLAN registers a plan without "
                          "training it)")
    if opts.num_gpus is not None and opts.num_gpus < 1:
        # A local Ray of no GPU would leave GPU runs waiting for one forever; --cpu is how to train without.
        raise LaunchError(f"--num-gpus {opts.num_gpus}: give 1 or more (--cpu trains on no GPU)")
    if opts.cpu and opts.num_gpus is not None:
        raise LaunchError(f"--num-gpus {opts.num_gpus} with --cpu: --cpu trains on no GPU; leave one of them out")
    if opts.address and opts.num_gpus is not None:
        raise LaunchError("--num-gpus limits a local Ray; a cluster joined with --address has the GPUs it has")
    if not 0 < opts.lease_timeout_s <= 1e9:  # timedelta overflows on inf or 1e20: a traceback after the plans were added
        raise LaunchError(f"--lease-timeout must be a number of seconds up to 1e9, got {opts.lease_timeout_s:g}")


def launch(plans: list[Plan], opts: LaunchOptions, view: LaunchView) -> LaunchResult:
    """Register the plans, then train every selected run that is not done; returns per-run outcomes."""
    check_options(opts)
    # Before the database is written: the folder is made only once runs are known to train, and had then failed
    # with a traceback after the plans were registered.
    check_ckpt_dir(opts.ckpt_dir, local=not opts.address)
    if opts.num_gpus and not opts.cpu and not opts.address and opts.num_gpus > host_gpus():
        # Ray would believe the count and hand tasks GPUs that do not exist.
        raise LaunchError(f"--num-gpus {opts.num_gpus}: this host has {host_gpus()} GPU(s)")
    if not (opts.cpu or opts.address or opts.num_gpus or _ray_running()) and host_gpus() == 0:
        # A local Ray here would have no GPU: refused before the plans are written and Ray takes seconds to start.
        raise LaunchError("no GPU here: pass --cpu to train on CPU, or --address to join a Ray cluster with GPUs")
    if opts.where and not any(_matches(r, opts.where, p.path.parent) for p in plans for r in p.runs):
        # Most likely a misspelt value: say so before anything is written, rather than train nothing.
        shown = ",".join(f"{k}={v}" for k, v in opts.where)
        raise LaunchError(f"--where {shown}: no run of {', '.join(p.name for p in plans)} matches")
    if opts.address and not _ray_running():
        # Join before anything is written, so that a cluster that is not there ("auto" with none running)
        # leaves no plan registered; a local Ray still starts only when there is something to train.
        _check_reachable(opts.address)
        init_ray(opts)
    # A run larger than the cluster had been refused only after the plans were registered, the checkpoint folder made
    # and a local Ray started.
    check_capacity(plans, opts)
    engine = open_db(opts.db_url, create=True)
    try:
        for r in add_plans(engine, plans):
            if warning := moved_warning(r):
                view.log(f"warning: {warning}")
        selection = select_runs(engine, plans, opts)
        runs = selection.runs
        if not runs:
            view.log(selection.why_none)
            # A relaunch of a plan with a diverged run had exited 0 where the launch that saw it diverge exited 1.
            return LaunchResult(rows=[], diverged_before=sum(s == "diverged" for s in selection.finished.values()))
        # Before the folder is made and a local Ray starts: a wrong --ckpt-dir is refused in a moment.
        restarts = check_checkpoints(engine, runs, opts, view)
        view.log(selection.summary())
        try:
            opts.ckpt_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:  # what check_ckpt_dir cannot foresee: a full disk, a read-only mount, root's access
            raise LaunchError(f"--ckpt-dir {opts.ckpt_dir}: cannot create the folder: {exc.strerror or exc}") from None
        started_ray = not _ray_running()
        ray = init_ray(opts)
        try:
            driver = Driver(engine, opts, view, restarts)
            driver.check_fits(runs)
            view.begin(runs)
            try:
                return driver.run(runs)
            finally:
                view.end()
        finally:
            if started_ray and not opts.address:
                ray.shutdown()
    finally:
        engine.dispose()


def _ray_running() -> bool:
    import ray

    return ray.is_initialized()
