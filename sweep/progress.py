"""Progress views: the status table, ``slab status --watch``, and the launcher's live view."""

from __future__ import annotations

import time

from rich.console import Console
from rich.live import Live
from rich.markup import escape
from rich.table import Table
from rich.text import Text
from sqlalchemy import Engine

from db.queries import NO_PLAN, status_counts
from db.schema import RUN_STATUSES
from sweep.plan import si


def status_table(engine: Engine, plan: str | None = None) -> Table:
    """A table of run counts: one row per plan, one column per status."""
    counts = status_counts(engine, plan)
    table = Table(title="runs by plan and status")
    table.add_column("plan")
    for s in RUN_STATUSES:
        table.add_column(s, justify="right")
    table.add_column("total", justify="right")
    for name, group in counts.groupby("plan", sort=True):
        by = dict(zip(group["status"], group["runs"]))
        table.add_row(Text(str(name)), *(str(by.get(s, 0)) for s in RUN_STATUSES), str(sum(by.values())))
    if counts.empty:
        table.caption = "no runs registered yet: slab add PLAN"
    elif (counts["plan"] == NO_PLAN).any():
        table.caption = f"{NO_PLAN}: runs in no plan (dropped when their plan was edited); list them: slab runs --plan {NO_PLAN}"
    return table


def watch_status(engine: Engine, console: Console, plan: str | None = None, interval: float = 2.0) -> None:
    """Redraw the status table until no run is pending or running (or Ctrl-C); piped, print it each time it changes."""

    def unfinished(counts) -> int:
        return int(counts[counts["status"].isin(["pending", "running"])]["runs"].sum())

    try:
        if not console.is_terminal:  # a log keeps every change, not only the last frame
            last = None
            while True:
                counts = status_counts(engine, plan)
                if (key := counts.to_csv()) != last:
                    console.print(status_table(engine, plan))
                    last = key
                if not unfinished(counts):
                    break
                time.sleep(interval)
            return
        with Live(status_table(engine, plan), console=console, auto_refresh=False) as live:
            while True:
                counts = status_counts(engine, plan)
                live.update(status_table(engine, plan), refresh=True)
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
        self.running: dict[str, dict] = {}
        self.t0 = time.monotonic()
        self.last_log = 0.0

    def log(self, message: str, markup: bool = False) -> None:
        """A line above the live view (or a plain log line); error texts are printed as they are."""
        self.console.print(message, highlight=False, soft_wrap=True, markup=markup)

    def begin(self, runs) -> None:
        """Start showing progress for these (spec, name) runs (a view reused for a second launch starts over)."""
        self.done = self.failed = 0
        self.tokens_done, self.running = {}, {}
        self.total = len(runs)
        self.total_tokens = sum(s.tokens for s, _ in runs)
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

    def run_started(self, run_id: str, spec, name: str | None, attempt: int) -> None:
        """A run was claimed and submitted."""
        shape = f"{spec.d_model}x{spec.n_layers}"
        self.running[run_id] = {"name": name or run_id, "arch": spec.arch, "shape": shape, "step": 0,
                                "steps": spec.steps, "loss": None, "tps": None, "attempt": attempt}
        if not self.live_enabled:
            self.log(f"start {name or run_id} ({spec.arch} {shape}, attempt {attempt})")

    def run_event(self, run_id: str, kind: str, payload: dict) -> None:
        """A training event arrived from a task."""
        info = self.running.get(run_id)
        if info is None or kind != "train":
            return
        info.update(step=payload["step"], loss=payload["loss"], tps=payload.get("tokens_per_s"))
        self.tokens_done[run_id] = int(payload["tokens"])

    def run_finished(self, run_id: str, status: str, detail: str) -> None:
        """A run ended (done, failed, diverged, or stopped)."""
        info = self.running.pop(run_id, {"name": run_id})
        if status == "done":
            self.done += 1
        elif status in ("failed", "diverged"):
            self.failed += 1
        colour = {"done": "green", "failed": "red", "diverged": "yellow"}.get(status, "cyan")
        self.log(f"[{colour}]{status}[/] {escape(str(info['name']))}: {escape(detail)}", markup=True)

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
        eta = ""
        if tokens and self.total_tokens > tokens:
            eta = f", ETA {(self.total_tokens - tokens) * elapsed / tokens / 60:.1f} min"
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

