"""The launcher's progress view (counts, tokens and an ETA that stay sane when runs resume) and its lease owners."""

import io
import json
import os
import time

from rich.console import Console

from sweep import task
from sweep.plan import load_plan, si
from sweep.progress import LaunchView

HEADER = "name,arch,d_model,n_layers,n_heads,seq_len,batch_size,tokens,lr,seed,warmup\n"


def test_a_resumed_run_replays_its_journal_as_earlier_work(tmp_path, monkeypatch):
    """A resumed run first replays its journal (steps the launch before it trained); the ETA is the rate of this
    launch's own training, not of the replay, which arrives in an instant."""
    sent = []

    class Sink:
        class put:
            @staticmethod
            def remote(events):
                sent.extend(events)
                return False

    monkeypatch.setattr(task.ray, "get", lambda value: value)
    journal = tmp_path / "events.jsonl"
    journal.write_text("".join(json.dumps(["train", {"step": s, "tokens": 256 * s, "loss": 2.0}]) + "\n" for s in (2, 90)))
    assert task.Reporter(Sink(), "r1", 2, journal=journal).replay() == 2
    assert [payload.get("replayed") for *_, payload in sent] == [True, True]

    plan = tmp_path / "p.csv"
    plan.write_text(HEADER + "r,softmax,32,2,2,64,4,25000,3e-3,0,2\n")  # 98 steps of 256 tokens
    spec = load_plan(plan).runs[0].spec
    view = LaunchView(Console(file=io.StringIO()), live=False)
    view.begin([(spec, "r")])
    view.run_started(spec.run_id, spec, "r", 2)
    for *_, kind, payload in sent:  # the previous launch got to step 90; its newest checkpoint was step 80
        view.run_event(spec.run_id, kind, payload)
    view.t0 = time.monotonic() - 10  # this launch has run 10 s
    for step in (81, 82):
        view.run_event(spec.run_id, "train", {"step": step, "tokens": 256 * step, "loss": 2.0, "tokens_per_s": 51.2})
    line = view._line()
    # 2 steps in 10 s, 16 left (the whole steps it trains, 25,088 tokens): 80 s; replayed steps taken as this
    # launch's work said 2 s.
    assert f"/{si(spec.trained_tokens)} tokens" in line and "ETA 1.3 min" in line, line
    assert view.running[spec.run_id]["step"] == 82


#: A hostname as long as DNS allows (253 characters), as Kubernetes pod FQDNs come close to.
LONG_HOST = ".".join(["a" * 63, "b" * 63, "c" * 63, "d" * 61])


def _dead_pid() -> int:
    """The id of a process that has exited."""
    import subprocess
    import sys

    return int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout)


def test_a_long_hostname_gives_a_lease_owner_that_fits_its_column(db_url, write_plan, monkeypatch):
    """A launcher on a host of a 253-character name had crashed on PostgreSQL (value too long for varchar(200)) and
    stored an over-long owner on SQLite: the owner fits, still names the host, and still carries its lease."""
    import socket

    from sqlalchemy import select

    from db.engine import open_db
    from db.queries import runs_frame
    from db.schema import Run, utcnow
    from db.writer import claim_run, heartbeat
    from sweep.progress import launcher_gone, lease_of, lease_owner
    from sweep.registry import add_plans

    monkeypatch.setattr(socket, "gethostname", lambda: LONG_HOST)
    owner = lease_owner(600.0)
    engine = open_db(db_url)
    add_plans(engine, [load_plan(write_plan(HEADER + "r,softmax,32,2,2,64,4,25000,3e-3,0,2\n"))])
    run_id = runs_frame(engine)["run_id"][0]
    assert claim_run(engine, run_id, owner, utcnow()) == 1  # the launcher's first write of its owner
    assert heartbeat(engine, owner, [run_id]) == []
    with engine.connect() as conn:
        assert conn.execute(select(Run.lease_owner).where(Run.run_id == run_id)).scalar() == owner
    engine.dispose()

    host = owner.split(":")[0]
    assert len(owner) <= Run.__table__.c.lease_owner.type.length, len(owner)
    assert lease_of(owner) == 600.0 and len(owner.split(":")) == 4
    assert host.startswith(LONG_HOST[:100]) and host != LONG_HOST
    other = LONG_HOST[:-1] + "e"  # another host of the same long prefix
    monkeypatch.setattr(socket, "gethostname", lambda: other)
    assert lease_owner(600.0).split(":")[0] != host
    monkeypatch.setattr(socket, "gethostname", lambda: LONG_HOST)

    dead_pid = _dead_pid()
    with monkeypatch.context() as m:  # a launcher of this host that was killed
        m.setattr(os, "getpid", lambda: dead_pid)
        dead = lease_owner(600.0)
    assert launcher_gone(dead) and not launcher_gone(owner)
    assert launcher_gone(f"{LONG_HOST}:{dead_pid}:abcdef01:120")  # as an older version wrote it on SQLite


def test_an_ordinary_hostname_gives_the_lease_owner_older_launchers_read(monkeypatch):
    """Launchers of an older version read each other's owners as ``host:pid:nonce:lease``: unchanged for a usual name."""
    import re
    import socket

    from sweep.progress import lease_owner

    monkeypatch.setattr(socket, "gethostname", lambda: "gpu-node-17.cluster.example.org")
    monkeypatch.setattr(os, "getpid", lambda: 4242)
    assert re.fullmatch(r"gpu-node-17\.cluster\.example\.org:4242:[0-9a-f]{8}:120", lease_owner(120.0))


def test_status_fits_a_narrow_terminal_without_cutting_plan_names():
    """At 60 columns rich had cut plan names alike to "minim…": statuses no run has are left out (and said so) first."""
    import pandas as pd

    from sweep.progress import status_table

    names = ["demo", "hybrid-ratio", "minimax01", "minimax01-paper"]
    counts = pd.DataFrame([(n, s, k) for n in names for s, k in (("pending", 30), ("done", 2))],
                          columns=["plan", "status", "runs"])

    def render(width):
        console = Console(file=io.StringIO(), width=width)
        console.print(status_table(None, counts=counts, width=width))
        return console.file.getvalue()

    narrow = render(60)
    assert max(len(line) for line in narrow.splitlines()) <= 60
    assert all(f" {n} " in narrow for n in names) and "…" not in narrow
    header = next(line for line in narrow.splitlines() if "┃ plan " in line)
    assert [w for w in header.split() if w.isalpha()] == ["plan", "pending", "done", "total"]
    assert "no run in them: running, failed, diverged" in " ".join(narrow.split())
    wide = render(100)
    assert all(s in wide for s in ("running", "failed", "diverged")) and "left out" not in wide
