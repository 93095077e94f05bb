"""Progress views: the status table, ``slab status --watch``, and the launcher's live view."""

from __future__ import annotations

import time

from rich.console import Console
from rich.live import Live
from rich.table import Table
from sqlalchemy import Engine

from db.queries import status_counts
from db.schema import RUN_STATUSES


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
        table.add_row(str(name), *(str(by.get(s, 0)) for s in RUN_STATUSES), str(sum(by.values())))
    if counts.empty:
        table.caption = "no runs registered yet: slab add PLAN"
    return table


def watch_status(engine: Engine, console: Console, plan: str | None = None, interval: float = 2.0) -> None:
    """Redraw the status table until no run is pending or running (or Ctrl-C)."""
    try:
        with Live(status_table(engine, plan), console=console, auto_refresh=False) as live:
            while True:
                counts = status_counts(engine, plan)
                live.update(status_table(engine, plan), refresh=True)
                if not counts[counts["status"].isin(["pending", "running"])]["runs"].sum():
                    break
                time.sleep(interval)
    except KeyboardInterrupt:
        pass
