"""Progress views: the status table, ``slab status --watch``, and the launcher's live view."""

from __future__ import annotations

import math
import os
import socket
import time
import uuid
from datetime import timedelta

from rich.console import Console
from rich.live import Live
from rich.markup import escape
from rich.table import Table
from rich.text import Text
from sqlalchemy import Engine, select

from db.engine import reading
from db.queries import status_counts
from db.schema import RUN_STATUSES, Plan, PlanRun, Run, fit_text, utcnow
from sweep.plan import NO_PLAN, si

#: Seconds without a heartbeat after which a running run's launcher counts as gone: launch's default lease, and the
#: lease of a run whose owner does not record its own (written before leases were recorded).
LEASE_S = 120.0


#: Characters of runs.lease_owner left to the host name: the rest holds ``:pid:nonce:lease``, at most 55 (a 20-digit
#: pid, 8 hex digits, a float as ``.15g`` writes it in 22), so a host name cut to this always fits the column.
OWNER_HOST_MAX = Run.__table__.c.lease_owner.type.length - 64


def owner_host() -> str:
    """This host as lease owners name it: its name, or for a name too long for the column a prefix and a hash of it."""
    # A usual name (Linux allows 64 characters) is kept whole, so launchers of older versions still read the owners.
    return fit_text(socket.gethostname(), OWNER_HOST_MAX)


def lease_owner(lease_s: float) -> str:
    """A lease owner for a launcher of this process: ``host:pid:nonce:lease`` (the lease in seconds, which status
    and other launchers wait out before calling its runs abandoned)."""
    return f"{owner_host()}:{os.getpid()}:{uuid.uuid4().hex[:8]}:{lease_s:.15g}"


def lease_of(owner: str | None) -> float | None:
    """The lease (seconds without a heartbeat) a launcher recorded in its lease owner; None where it has none."""
    parts = (owner or "").split(":")
    try:
        lease = float(parts[3]) if len(parts) == 4 else math.nan
    except ValueError:
        return None
    return lease if math.isfinite(lease) and lease > 0 else None


def launcher_gone(owner: str | None) -> bool:
    """True when a lease belongs to a launcher process on this host that no longer exists."""
    if not owner:
        return False
    host, _, rest = owner.partition(":")
    pid = rest.partition(":")[0]
    # The whole name too: an older version wrote it so (on SQLite, which does not hold it to the column's length).
    if host not in (owner_host(), socket.gethostname()) or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def lease_lapsed(owner: str | None, beat, now, default_s: float = LEASE_S) -> bool:
    """Whether a running run's heartbeat ``beat`` is older than its launcher's own lease (else ``default_s``) at
    ``now``; no heartbeat is not a lapse."""
    # Each launcher's own lease: one launched with a long --lease-timeout is not gone after the default's 120 s.
    return beat is not None and now - beat > timedelta(seconds=lease_of(owner) or default_s)


def orphaned_runs(engine: Engine, plan: str | None = None) -> int:
    """Runs marked running whose launcher is gone: its process is not on this host, or no heartbeat for its lease."""
    stmt = select(Run.run_id, Run.lease_owner, Run.heartbeat_at).where(Run.status == "running")
    if plan:  # as status_counts selects a plan's runs
        stmt = stmt.outerjoin(PlanRun, PlanRun.run_id == Run.run_id).outerjoin(Plan, Plan.id == PlanRun.plan_id)
        stmt = stmt.where(Plan.name.is_(None) if plan == NO_PLAN else Plan.name == plan)
    with reading(engine) as conn:
        rows = conn.execute(stmt).all()
    now = utcnow()
    gone: dict[str | None, bool] = {}  # one look per launcher, however many runs it held
    orphans = set()
    for run_id, owner, beat in rows:
        if owner not in gone:
            gone[owner] = launcher_gone(owner)
        if gone[owner] or lease_lapsed(owner, beat, now):
            orphans.add(run_id)
    return len(orphans)


def status_table(engine: Engine, plan: str | None = None, counts=None, width: int | None = None) -> Table:
    """A table of run counts (``counts``, else read): one row per plan, one column per status, fitted to ``width``."""
    counts = status_counts(engine, plan) if counts is None else counts
    rows = []
    for name, group in counts.groupby("plan", sort=True):
        by = dict(zip(group["status"], group["runs"]))
        rows.append((str(name), [by.get(s, 0) for s in RUN_STATUSES], sum(by.values())))
    statuses = list(RUN_STATUSES)
    notes = []
    # Squeezed into a narrow terminal, rich cut the plan names ("minim…" for two plans alike) and the headers: a
    # status no plan has goes first, then the names fold onto more lines, but none is cut.
    if width is not None and _table_width(rows, statuses) > width:
        empty = [s for i, s in enumerate(statuses) if not any(r[1][i] for r in rows)]
        if empty:
            statuses = [s for s in statuses if s not in empty]
            notes.append(f"columns left out to fit the terminal, no run in them: {', '.join(empty)}")
    table = Table(title="runs by plan and status")
    table.add_column("plan", overflow="fold")
    for s in statuses:
        table.add_column(s, justify="right", no_wrap=True, min_width=len(s))
    table.add_column("total", justify="right", no_wrap=True, min_width=len("total"))
    for name, by, total in rows:
        table.add_row(Text(name), *(str(by[RUN_STATUSES.index(s)]) for s in statuses), str(total))
    if counts.empty and plan == NO_PLAN:  # the database may hold runs, all of them in plans
        notes.append("no runs outside a plan: every run belongs to one")
    elif counts.empty:
        notes.append("no runs registered yet: slab add PLAN")
    elif (counts["plan"] == NO_PLAN).any():
        notes.append(f"{NO_PLAN}: runs in no plan (dropped when their plan was edited); list them: slab runs --plan {NO_PLAN}")
    # A killed launcher leaves its runs "running" until a launch takes them over: say so, or they look alive.
    if (counts["status"] == "running").any() and (orphans := orphaned_runs(engine, plan)):
        notes.append(f"{orphans} running run{' has' if orphans == 1 else 's have'} no live launcher (a process gone from "
                     f"this host, or no heartbeat for its lease: {LEASE_S:.0f} s unless launched with --lease-timeout): "
                     "slab launch PLAN resumes them")
    if notes:
        table.caption = "\n".join(notes)
    return table


def _table_width(rows, statuses) -> int:
    """Characters a status table of these rows and statuses needs on one line each (rich's heavy box, padding 1)."""
    widths = [max([len("plan")] + [len(r[0]) for r in rows])]
    widths += [max([len(s)] + [len(str(r[1][RUN_STATUSES.index(s)])) for r in rows]) for s in statuses]
    widths.append(max([len("total")] + [len(str(r[2])) for r in rows]))
    return sum(widths) + 3 * len(widths) + 1


def watch_status(engine: Engine, console: Console, plan: str | None = None, interval: float = 2.0) -> None:
    """Redraw the status table until no run is pending or running (or Ctrl-C); piped, print it each time it changes."""

    def unfinished(counts) -> int:
        return int(counts[counts["status"].isin(["pending", "running"])]["runs"].sum())

    try:
        if not console.is_terminal:  # a log keeps every change, not only the last frame
            last = None
            while True:
                counts = status_counts(engine, plan)
                table = status_table(engine, plan, counts, console.width)
                if (key := counts.to_csv() + str(table.caption)) != last:  # a launcher found gone is a change too
                    console.print(table)
                    last = key
                if not unfinished(counts):
                    break
                time.sleep(interval)
            return
        with Live(status_table(engine, plan, width=console.width), console=console, auto_refresh=False) as live:
            while True:
                counts = status_counts(engine, plan)
                live.update(status_table(engine, plan, counts, console.width), refresh=True)
                if not unfinished(counts):
                    break
                time.sleep(interval)
    except KeyboardInterrupt:
        pass


class LaunchView:
    """The launcher's progress: a rich live view on a terminal, plain log lines otherwise."""

    def __init__(self, console: Console, live: bool | None = None, log_every_s: float = 10.0):
        self.console = console
        self.live_enabled = console.is_terminal if live is None else live
        self.log_every_s = log_every_s
        self.live: Live | None = None
        self.total = self.done = self.failed = 0
        self.total_tokens = 0
        self.tokens_done: dict[str, int] = {}
        self.trained = 0  # tokens trained by this launch (not replayed from a run's journal): the ETA's rate
        self.last_tokens: dict[str, int] = {}  # per run, the tokens of its attempt's latest live report
        self.run_tokens: dict[str, int] = {}  # per run, the tokens it trains
        self.running: dict[str, dict] = {}
        self.ended: set[str] = set()  # runs that train no more in this launch (done, failed, diverged, stopped, lost)
        self.t0 = time.monotonic()
        self.last_log = 0.0

    def log(self, message: str, markup: bool = False) -> None:
        """A line above the live view (or a plain log line); error texts are printed as they are."""
        self.console.print(message, highlight=False, soft_wrap=True, markup=markup)

    def begin(self, runs) -> None:
        """Start showing progress for these (spec, name) runs (a view reused for a second launch starts over)."""
        self.done = self.failed = self.trained = 0
        self.tokens_done, self.running, self.last_tokens, self.ended = {}, {}, {}, set()
        self.total = len(runs)
        self.run_tokens = {s.run_id: s.trained_tokens for s, _ in runs}  # whole steps, as the runs report them
        self.total_tokens = sum(self.run_tokens.values())
        self.t0 = time.monotonic()
        if self.live_enabled:
            self.live = Live(self._render(), console=self.console, auto_refresh=False, transient=False)
            self.live.start()

    def end(self) -> None:
        """Stop the live view."""
        if self.live is not None:
            self.live.update(self._render(), refresh=True)
            self.live.stop()
            self.live = None

    def run_started(self, run_id: str, spec, name: str | None, attempt: int, from_step: int = 0) -> None:
        """A run was claimed and submitted; ``from_step`` is the checkpoint it resumes from (0: a fresh start)."""
        shape = f"{spec.d_model}x{spec.n_layers}"
        self.running[run_id] = {"name": name or run_id, "arch": spec.arch, "shape": shape, "step": from_step,
                                "steps": spec.steps, "loss": None, "tps": None, "attempt": attempt,
                                "step_tokens": spec.batch_size * spec.seq_len}
        self.last_tokens.pop(run_id, None)
        if not self.live_enabled:
            resumes = f", resumes from step {from_step}" if from_step else ""
            self.log(f"start {name or run_id} ({spec.arch} {shape}, attempt {attempt}{resumes})")

    def run_event(self, run_id: str, kind: str, payload: dict) -> None:
        """A training event arrived from a task."""
        info = self.running.get(run_id)
        if info is None or kind != "train":
            return
        tokens = int(payload["tokens"])
        self.tokens_done[run_id] = tokens
        if payload.get("replayed"):  # trained before this attempt: done, but no measure of this launch's speed
            return
        # An attempt's first report is one step past where it started (0, or its checkpoint).
        self.trained += max(0, tokens - self.last_tokens.get(run_id, tokens - info["step_tokens"]))
        self.last_tokens[run_id] = tokens
        info.update(step=payload["step"], loss=payload["loss"], tps=payload.get("tokens_per_s"))

    def run_finished(self, run_id: str, status: str, detail: str, name: str | None = None) -> None:
        """A run ended (done, failed, diverged, or stopped; ``name`` for one this launch never started)."""
        info = self.running.pop(run_id, {"name": name or run_id})
        self.ended.add(run_id)
        if status == "done":
            self.done += 1
            # Also a run another launcher trained, which reported nothing here.
            self.tokens_done[run_id] = self.run_tokens.get(run_id, self.tokens_done.get(run_id, 0))
        elif status in ("failed", "diverged"):
            self.failed += 1
        colour = {"done": "green", "failed": "red", "diverged": "yellow"}.get(status, "cyan")
        self.log(f"[{colour}]{status}[/] {escape(str(info['name']))}: {escape(detail)}", markup=True)

    def run_retrying(self, run_id: str) -> None:
        """A run's attempt failed and the run waits to be started again: it no longer counts as running."""
        self.running.pop(run_id, None)

    def refresh(self) -> None:
        """Redraw the live view, or write a progress line every ``log_every_s`` seconds."""
        if self.live is not None:
            self.live.update(self._render(), refresh=True)
        elif time.monotonic() - self.last_log >= self.log_every_s and self.total:
            self.last_log = time.monotonic()
            self.log(self._line())

    def _line(self) -> str:
        tokens = sum(self.tokens_done.values())
        elapsed = time.monotonic() - self.t0
        # What is left is what the runs still to end will train: a failed, diverged or stopped run trains no more here.
        left = sum(max(0, n - self.tokens_done.get(run_id, 0)) for run_id, n in self.run_tokens.items() if run_id not in self.ended)
        eta = ""
        if self.trained and left:
            eta = f", ETA {left * elapsed / self.trained / 60:.1f} min"
        return (f"{self.done}/{self.total} runs done, {self.failed} failed, {len(self.running)} running, "
                f"{si(tokens)}/{si(self.total_tokens)} tokens, {elapsed:.0f} s{eta}")

    def _render(self) -> Table:
        table = Table(title=self._line(), title_justify="left", expand=False)
        for col in ("run", "arch", "shape", "step", "loss", "tokens/s"):
            table.add_column(col, justify="right" if col in ("step", "loss", "tokens/s") else "left")
        for info in list(self.running.values())[:20]:
            loss = f"{info['loss']:.4f}" if info["loss"] is not None else ""
            tps = f"{info['tps']:,.0f}" if info["tps"] else ""
            table.add_row(Text(str(info["name"])), info["arch"], info["shape"], f"{info['step']}/{info['steps']}", loss, tps)
        return table

