"""Launching on a local Ray: runs finish once, relaunch is a no-op, crashes resume, faults are classified."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from sqlalchemy import func, select

from models.train import checkpoint_steps
from db.engine import open_db
from db.schema import Metric, Run
from sweep.launch import FAULTS_ENV, LaunchOptions, launch
from sweep.plan import load_plan
from sweep.progress import LaunchView

pytestmark = pytest.mark.slow

HEADER = "name,arch,d_model,n_layers,n_heads,seq_len,batch_size,tokens,lr,seed,warmup\n"
# 20 steps of a 2-layer, 32-wide model on 64-token windows: about a second each on one core.
SIX = HEADER + "t-{arch}-{seed},softmax|lightning|hgrn2,32,2,2,64,4,5120,3e-3,0|1,2\n"
# For tests whose subject is the launcher's processes (signals, exit codes, packs, file locks, heartbeat timing, its
# handling of database errors injected as exceptions, the --ckpt-dir check), not the database: the statements they run
# are the ones the tests on both databases run (launch and relaunch, retries and resumes, claims, takeovers, the release
# on Ctrl-C, the recorded checkpoint), so they take SQLite alone (PostgreSQL doubled their minutes in CI, whose suite
# must stay under 15).
SQLITE_ONLY = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)


@pytest.fixture(scope="module")
def ray_address():
    """One local Ray (2 CPUs, no GPU) shared by the tests of this file; subprocess drivers join it."""
    import ray

    ctx = ray.init(address="local", num_cpus=2, num_gpus=0, include_dashboard=False, logging_level="ERROR")
    yield ctx.address_info["gcs_address"]
    ray.shutdown()


@pytest.fixture
def env(tmp_path, ray_address, monkeypatch, db_url):
    """Each launch test runs on a fresh SQLite file and, where CI provides one, a PostgreSQL database (teams
    share one: the concurrent-launch races differ between the two)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(FAULTS_ENV, raising=False)
    return {"db": db_url, "tmp": tmp_path, "address": ray_address}


class Quiet(LaunchView):
    def __init__(self):
        from rich.console import Console

        super().__init__(Console(file=open(os.devnull, "w")), live=False)


def run_launch(env, plan_path, view=None, **kw):
    opts = LaunchOptions(db_url=env["db"], cpu=True, ckpt_dir=env["tmp"] / "ckpt", backoff_s=0.2, heartbeat_s=1.0, **kw)
    return launch([load_plan(plan_path)], opts, view or Quiet())


def runs_by_name(env, plan_path):
    engine = open_db(env["db"])
    names = {r.spec.run_id: r.name for r in load_plan(plan_path).runs}
    with engine.connect() as conn:
        rows = conn.execute(select(Run.__table__).where(Run.run_id.in_(list(names)))).mappings().all()
        metric_counts = dict(conn.execute(select(Metric.run_id, func.count()).group_by(Metric.run_id)).all())
        steps = {rid: [s for (s,) in conn.execute(select(Metric.step).where(Metric.run_id == rid).order_by(Metric.step))] for rid in names}
    engine.dispose()
    return {names[r["run_id"]]: {**r, "n_metrics": metric_counts.get(r["run_id"], 0), "steps": steps[r["run_id"]]} for r in rows}


def slab(env, *args, extra_env=None):
    """Start `slab launch` as a separate driver process joined to the test's Ray."""
    cmd = [sys.executable, "-m", "sweep.cli", "--db", env["db"], "launch", *map(str, args), "--cpu", "--address", env["address"],
           "--ckpt-dir", str(env["tmp"] / "ckpt"), "--lease-timeout", "600"]
    return subprocess.Popen(cmd, cwd=env["tmp"], env={**os.environ, **(extra_env or {})}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_six_runs_finish_once_and_relaunch_is_a_noop(env, write_plan):
    plan = write_plan(SIX)
    result = run_launch(env, plan)
    assert result.ok and len(result.rows) == 6
    runs = runs_by_name(env, plan)
    assert len(runs) == 6
    for name, r in runs.items():
        assert r["status"] == "done" and r["attempts"] == 1, name
        assert r["steps"] == list(range(1, 21)), name  # contiguous, each step once
        assert r["val_loss"] is not None and r["final_loss"] < 5.6  # below uniform over 260 tokens
    again = run_launch(env, plan)
    assert again.rows == []
    assert all(r["attempts"] == 1 for r in runs_by_name(env, plan).values())

    overlap = write_plan(HEADER + "u-{arch}-{seed},softmax|mamba2,32,2,2,64,4,5120,3e-3,0|1,2\n", "overlap.csv")
    second = run_launch(env, overlap)
    assert len(second.rows) == 2 and second.ok  # the two softmax runs were already done
    assert {r["arch"] for r in second.rows} == {"mamba2"}
    assert all(r["attempts"] == 1 for r in runs_by_name(env, plan).values())


def test_faults_nan_diverges_and_worker_exit_is_retried(env, write_plan, monkeypatch):
    plan = write_plan(HEADER + "f-{seed},lightning,32,2,2,64,4,5120,3e-3,0|1|2,2\n")
    monkeypatch.setenv(FAULTS_ENV, json.dumps({"f-0": "nan@3", "f-1": "exit@5"}))
    result = run_launch(env, plan, ckpt_every_steps=5)
    assert not result.ok
    runs = runs_by_name(env, plan)
    assert runs["f-0"]["status"] == "diverged" and runs["f-0"]["attempts"] == 1
    assert "step 3" in runs["f-0"]["error"]
    assert runs["f-1"]["status"] == "done" and runs["f-1"]["attempts"] == 2
    assert runs["f-1"]["resumed_from_step"] == 5  # resumed from its checkpoint, not from step 0
    assert runs["f-1"]["steps"] == list(range(1, 21))
    assert runs["f-2"]["status"] == "done" and runs["f-2"]["attempts"] == 1
    # Each run's newest checkpoint and its folder are recorded (what a relaunch checks its --ckpt-dir against): asserted
    # here on both databases, as the relaunch test that reads them runs on SQLite alone.
    assert {(r["ckpt_step"], r["ckpt_dir"]) for n, r in runs.items() if n != "f-0"} == {(20, str((env["tmp"] / "ckpt").resolve()))}
    # a diverged run is not retried by a relaunch
    monkeypatch.delenv(FAULTS_ENV)
    assert run_launch(env, plan).rows == []


def test_failures_retry_up_to_max_attempts(env, write_plan, monkeypatch):
    plan = write_plan(HEADER + "g,softmax,32,2,2,64,4,5120,3e-3,0,2\n")
    monkeypatch.setenv(FAULTS_ENV, json.dumps({"g": "raise@2"}))
    result = run_launch(env, plan, max_attempts=2)
    [row] = result.rows
    assert row["status"] == "failed" and row["attempts"] == 2
    assert "RuntimeError" in row["error"] and "injected" in row["error"]
    # The worker's traceback, not the bare message: where in training it failed.
    assert 'models/train.py", line' in row["error"] and row["error"].splitlines()[-1] == "RuntimeError: injected failure at step 2"


def test_a_run_held_by_a_launcher_gone_from_this_host_is_taken_at_once(env, write_plan):
    """A run left "running" by a launcher killed outright (its process gone from this host, its heartbeat fresh) is
    taken by a relaunch at once, not after the lease, and counted a second attempt. On both databases: the SIGKILL test
    in test_launch_stops, which checks the same with a real driver, runs on SQLite alone."""
    import socket

    from db.schema import utcnow
    from db.writer import claim_run
    from sweep.registry import add_plans

    plan = write_plan(HEADER + "g,softmax,32,2,2,64,4,1280,3e-3,0,2\n")  # 5 steps
    loaded = load_plan(plan)
    [run] = loaded.runs
    engine = open_db(env["db"])
    add_plans(engine, [loaded])
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    # Its lease in its name, 30 s: a launcher that did not see the holder gone would say it waits, wait that out and
    # then take the run.
    assert claim_run(engine, run.spec.run_id, f"{socket.gethostname()}:{int(dead.stdout)}:dead0001:30", utcnow()) == 1
    engine.dispose()
    view = Logged()
    assert run_launch(env, plan, view=view).ok
    assert not any("leased by another launcher" in line for line in view.lines), view.lines  # it did not wait
    [row] = runs_by_name(env, plan).values()
    assert row["status"] == "done" and row["attempts"] == 2 and row["steps"] == list(range(1, 6)), row


def test_a_run_with_only_unreadable_checkpoints_fails_once_without_retrying(env, write_plan):
    # retries could only fail the same way (the set-aside files stay), spending attempts and backoff
    from models.train import checkpoint_path

    plan = write_plan(HEADER + "c,softmax,32,2,2,64,4,5120,3e-3,0,2\n")
    [run] = load_plan(plan).runs
    path = checkpoint_path(env["tmp"] / "ckpt" / run.spec.run_id, 10)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not a checkpoint")
    result = run_launch(env, plan, max_attempts=3)
    [row] = result.rows
    assert row["status"] == "failed" and row["attempts"] == 1, row
    assert "no readable checkpoint" in row["error"] and "ckpt-000000010.pt.corrupt" in row["error"]


def test_status_watch_returns_when_nothing_is_left(env, write_plan):
    from typer.testing import CliRunner

    from sweep.cli import app

    plan = write_plan(HEADER + "w,softmax,32,2,2,64,4,5120,3e-3,0,2\n")
    run_launch(env, plan)
    result = CliRunner().invoke(app, ["--db", env["db"], "status", "--watch", "--interval", "0.1"])
    assert result.exit_code == 0 and "done" in result.output


PACKED = (HEADER + "a-{seed},lightning,32,2,2,64,4,5120,3e-3,0|1|2,2\n"
          "b-{seed},lightning,32,2,2,64,4,5120,1e-3,0|1|2,2\n"
          "c,softmax,32,2,2,64,4,5120,3e-3,0,2\n")


@SQLITE_ONLY
def test_packed_launch_divergence_and_a_dying_pack(env, write_plan, monkeypatch):
    """Same-shape runs train as packs of three; a member diverges alone; a pack whose worker dies has its
    runs retried alone, each resuming from the checkpoint the pack wrote."""
    plan = write_plan(PACKED)
    monkeypatch.setenv(FAULTS_ENV, json.dumps({"a-1": "nan@3", "b-0": "exit@5"}))
    result = run_launch(env, plan, pack=3, ckpt_every_steps=5)
    runs = runs_by_name(env, plan)
    assert len(runs) == 7
    assert runs["a-1"]["status"] == "diverged" and runs["a-1"]["error"] == (
        "diverged at step 3: the loss, the gradients or the validation loss became NaN or inf")
    for name in ("a-0", "a-2", "c"):  # a-1's pack-mates and the lone softmax run: one attempt each
        assert runs[name]["status"] == "done" and runs[name]["attempts"] == 1, name
        assert runs[name]["steps"] == list(range(1, 21)), name
    for name in ("b-0", "b-1", "b-2"):  # the pack that died at step 5: retried alone, from step 5
        assert runs[name]["status"] == "done" and runs[name]["attempts"] == 2, name
        assert runs[name]["resumed_from_step"] == 5, name
        assert runs[name]["steps"] == list(range(1, 21)), name
    assert result.count("done") == 6 and result.count("diverged") == 1
    # the members really trained apart: different seeds and learning rates end at different losses
    assert len({round(runs[n]["final_loss"], 5) for n in ("a-0", "a-2", "b-0", "b-1", "b-2")}) == 5


class Logged(Quiet):
    """A quiet view that keeps its log lines."""

    def __init__(self):
        super().__init__()
        self.lines: list[str] = []

    def log(self, message, markup=False):
        self.lines.append(message)


def test_a_run_another_launcher_held_starts_only_when_it_fits(env, write_plan):
    """A run leased by another launcher is waited on (said once, not at every heartbeat); once that lease is
    gone, it starts like any other run, when there is room for it (on several GPUs, no room crashed the driver)."""
    from db.schema import utcnow
    from db.writer import claim_run, update_run
    from sweep.launch import Driver, Flight, Task
    from sweep.registry import add_plans

    plan = load_plan(write_plan(HEADER + "w,softmax,32,2,2,64,4,5120,3e-3,0,2\n"))
    engine = open_db(env["db"], create=True)
    add_plans(engine, [plan])
    [run] = plan.runs
    run_id = run.spec.run_id
    other = "elsewhere:1:abc"  # a live launcher on another host
    assert claim_run(engine, run_id, other, utcnow()) == 1
    view = Logged()
    view.begin([(run.spec, run.name)])
    driver = Driver(engine, LaunchOptions(db_url=env["db"], cpu=True, ckpt_dir=env["tmp"] / "ckpt"), view)
    driver._claim_and_submit([Flight(spec=run.spec, name=run.name, attempt=0, tries=0, microbatch=None)])
    for _ in range(3):  # heartbeats while the other launcher still trains it
        driver._retry_waiting()
        driver._start_ready()
    assert run_id in driver.waiting and not driver.flights
    assert sum("leased by another launcher" in line for line in view.lines) == 1, view.lines

    update_run(engine, run_id, other, status="pending", error="stopped by Ctrl-C")  # the other launcher let it go
    driver.units["busy"] = Task(["x"], cpus=driver.total_cpus, gpus=0.0)  # every CPU taken by a running task
    driver._retry_waiting()
    driver._start_ready()
    assert not driver.flights and [f.spec.run_id for unit in driver.queue for f in unit] == [run_id]
    with engine.connect() as conn:
        assert conn.execute(select(Run.status, Run.lease_owner).where(Run.run_id == run_id)).one() == ("pending", None)

    # The other launcher trained it after all: this one's progress counts it done, as its summary will.
    assert claim_run(engine, run_id, other, utcnow()) == 2
    update_run(engine, run_id, other, status="done")
    del driver.units["busy"]
    driver._start_ready()
    assert not driver.queue and not driver.waiting and not driver.flights
    assert view.done == 1 and view.tokens_done[run_id] == run.spec.trained_tokens
    assert "w: finished by another launcher" in view.lines[-1], view.lines
    engine.dispose()


@SQLITE_ONLY
def test_a_short_lease_is_kept_alive_while_the_run_trains(env, write_plan, monkeypatch):
    """--lease-timeout shorter than the default heartbeat (10 s): the launcher heartbeats often enough that
    another launcher, polling as it would, never takes the run it is training, even when the event sink's actor is
    slower to start than the lease (the first heartbeat had waited for it, after the run was claimed)."""
    import threading

    import sweep.launch

    select_runs = sweep.launch.select_runs

    def slow_select(*args, **kwargs):  # the window between registering and claiming, widened as load widens it
        time.sleep(0.6)
        return select_runs(*args, **kwargs)

    monkeypatch.setattr(sweep.launch, "select_runs", slow_select)

    class SlowFirstGet:  # the sink's actor slow to start, as on a loaded host: the driver's first ray.get waits 4 s
        def __init__(self, ray):
            self.ray, self.waited = ray, False

        def __getattr__(self, name):
            return getattr(self.ray, name)

        def get(self, *args, **kwargs):
            if not self.waited:
                self.waited = True
                time.sleep(4.0)
            return self.ray.get(*args, **kwargs)

    driver_init = sweep.launch.Driver.__init__

    def init(self, *args, **kwargs):
        driver_init(self, *args, **kwargs)
        self.ray = SlowFirstGet(self.ray)

    monkeypatch.setattr(sweep.launch.Driver, "__init__", init)

    from db.schema import utcnow
    from db.writer import claim_run
    from datetime import timedelta

    plan_path = write_plan(HEADER + "l,softmax,32,2,2,64,4,102400,3e-3,0,2\n")  # 400 steps: longer than the lease
    run_id = load_plan(plan_path).runs[0].spec.run_id
    engine = open_db(env["db"], create=True)
    stolen, done = [], threading.Event()

    def other_launcher():
        while not done.is_set() and not stolen:
            try:
                with engine.connect() as conn:
                    status = conn.scalar(select(Run.status).where(Run.run_id == run_id))
                # Only a run this launcher trains: a pending one, between its registration and its claim, is any
                # launcher's to take (and under load the poll had landed in that window)
                if status == "running" and claim_run(engine, run_id, "elsewhere:1:abc",
                                                     utcnow() - timedelta(seconds=3)) is not None:
                    stolen.append(utcnow())
            except Exception:  # not registered yet
                pass
            time.sleep(0.2)

    thread = threading.Thread(target=other_launcher)
    thread.start()
    try:
        opts = LaunchOptions(db_url=env["db"], cpu=True, ckpt_dir=env["tmp"] / "ckpt", lease_timeout_s=3.0)
        result = launch([load_plan(plan_path)], opts, Quiet())
    finally:
        done.set()
        thread.join()
        engine.dispose()
    assert not stolen, "another launcher took a run this one was training"
    assert result.ok and result.rows[0]["attempts"] == 1


def _taken_over(engine, run_id):
    """Another launcher takes the run, as it would once this launcher's lease lapsed (its host slept)."""
    from datetime import timedelta

    from db.schema import utcnow
    from db.writer import claim_run

    return claim_run(engine, run_id, "elsewhere:1:abc", utcnow() + timedelta(days=1))


def _driver_of_one_run(env, write_plan, row, view=None, **options):
    """A Driver for the one run of a plan row (registered, not yet claimed), with its engine and the run."""
    from sweep.launch import Driver
    from sweep.registry import add_plans

    plan = load_plan(write_plan(HEADER + row))
    engine = open_db(env["db"], create=True)
    add_plans(engine, [plan])
    [run] = plan.runs
    if view is not None:
        view.begin([(run.spec, run.name)])
    opts = LaunchOptions(db_url=env["db"], cpu=True, ckpt_dir=env["tmp"] / "ckpt", **options)
    return Driver(engine, opts, view or Logged()), engine, run


def test_a_run_taken_over_while_it_trained_is_said_lost_not_done(env, write_plan):
    """The launcher whose lease lapsed while its worker trained on says it lost the run, counts it neither
    done nor failed, and leaves the new owner's row alone (its final write used to be dropped in silence)."""
    from sweep.launch import Flight

    view = Logged()
    driver, engine, run = _driver_of_one_run(env, write_plan, "t,softmax,32,2,2,64,4,5120,3e-3,0,2\n", view)
    run_id = run.spec.run_id
    driver._claim_and_submit([Flight(spec=run.spec, name=run.name, attempt=0, tries=0, microbatch=None)])
    assert run_id in driver.flights
    assert _taken_over(engine, run_id) == 2
    deadline = time.monotonic() + 60
    while driver.units and time.monotonic() < deadline:  # no heartbeat: the worker's end is what it sees first
        driver._collect()
    assert not driver.units and not driver.flights and not driver.queue
    assert driver.outcome[run_id] == "lost" and view.done == 0 and view.failed == 0
    assert any("taken over by another launcher (elsewhere:1:abc)" in line for line in view.lines), view.lines
    with engine.connect() as conn:
        row = conn.execute(select(Run.status, Run.lease_owner, Run.attempts).where(Run.run_id == run_id)).one()
    assert tuple(row) == ("running", "elsewhere:1:abc", 2)
    engine.dispose()


def test_a_launcher_that_lost_a_run_stops_its_worker_and_frees_the_checkpoint_lock(env, write_plan):
    """At its next heartbeat a launcher finds a run taken over, stops the worker still training it (whose
    checkpoint-folder lock the new owner's worker waits on), and ends without counting it done."""
    import threading

    from sweep.task import run_lock

    view = Logged()
    driver, engine, run = _driver_of_one_run(  # 4000 steps: far longer than the test
        env, write_plan, "h,softmax,32,2,2,64,4,1024000,3e-3,0,2\n", view, lease_timeout_s=2.0, poll_s=0.2)
    run_id = run.spec.run_id
    taken = []

    def other_launcher():
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # once the worker holds the lock and trains
            with engine.connect() as conn:
                training = conn.scalar(select(func.count()).select_from(Metric).where(Metric.run_id == run_id))
            if training:
                taken.append((_taken_over(engine, run_id), time.monotonic()))
                return
            time.sleep(0.1)

    thread = threading.Thread(target=other_launcher)
    thread.start()
    result = driver.run([(run.spec, run.name)])
    ended = time.monotonic()
    thread.join()
    assert taken and taken[0][0] == 2
    assert ended - taken[0][1] < 5, "the launcher kept training a run another launcher holds"
    assert driver.outcome[run_id] == "lost" and view.done == 0 and view.failed == 0
    assert any("stopped training it here" in line for line in view.lines), view.lines
    # The summary says so too, rather than show the new owner's state as this launcher's result.
    [row] = result.rows
    assert row["status"] == "lost" and "elsewhere:1:abc" in row["error"] and row["final_loss"] is None, row
    assert not result.ok and result.count("done") == 0
    with run_lock(env["tmp"] / "ckpt" / run_id, timeout_s=10):  # the new owner's worker gets it in seconds
        pass
    with engine.connect() as conn:
        assert conn.execute(select(Run.lease_owner).where(Run.run_id == run_id)).scalar() == "elsewhere:1:abc"
    engine.dispose()


@SQLITE_ONLY
def test_losing_the_database_mid_launch_is_a_clear_error(env, write_plan, monkeypatch):
    """A database that stays away while runs train (a server restart that does not come back) is retried for
    about one lease, then ends the launch with a one-line DatabaseError that says how to resume, not a page of
    driver tracebacks; an error that no wait cures ends it at once."""
    from sqlalchemy.exc import OperationalError

    import sweep.launch
    from db.engine import DatabaseError

    driver, engine, run = _driver_of_one_run(env, write_plan, "g,softmax,32,2,2,64,4,5120,3e-3,0,2\n", lease_timeout_s=2.0)

    def refused(*args, **kwargs):
        raise OperationalError("INSERT", {}, ConnectionRefusedError("connection refused"))

    monkeypatch.setattr(sweep.launch, "write_results", refused)
    t0 = time.monotonic()
    with pytest.raises(DatabaseError, match="lost the database: connection refused .retried for 2 s.; .*a relaunch resumes the runs from their checkpoints"):
        driver.run([(run.spec, run.name)])
    assert time.monotonic() - t0 >= 2.0
    with engine.connect() as conn:  # the database answered again for the release: the run is free at once
        assert conn.execute(select(Run.status, Run.lease_owner).where(Run.run_id == run.spec.run_id)).one() == ("pending", None)

    def broken(*args, **kwargs):
        raise OperationalError("INSERT", {}, Exception("no such table: metrics"))

    monkeypatch.setattr(sweep.launch, "write_results", broken)
    driver = sweep.launch.Driver(engine, LaunchOptions(db_url=env["db"], cpu=True, ckpt_dir=env["tmp"] / "ckpt"), Logged())
    t0 = time.monotonic()
    with pytest.raises(DatabaseError, match="lost the database: no such table: metrics;"):
        driver.run([(run.spec, run.name)])
    assert time.monotonic() - t0 < 60, "an error no wait cures was retried for the 120 s lease"
    engine.dispose()


@SQLITE_ONLY
def test_losing_the_database_lets_running_runs_checkpoint_before_the_launch_ends(env, write_plan, monkeypatch):
    """The database gone for good while a run trains: its worker had been cancelled at once, losing every step since its
    last checkpoint. It is asked to stop as on Ctrl-C (it checkpoints where it got to) and given a bounded time to, and
    the launch ends in one line saying the database was lost and that a relaunch resumes from the checkpoints."""
    from sqlalchemy.exc import OperationalError

    import sweep.launch
    from db.engine import DatabaseError

    # 4,000 steps, far longer than the test, and no checkpoint due before the last one: only a stop writes one.
    driver, engine, run = _driver_of_one_run(env, write_plan, "d,softmax,32,2,2,64,4,1024000,3e-3,0,2\n",
                                             lease_timeout_s=2.0, heartbeat_s=0.5, poll_s=0.2, ckpt_every_steps=100000)
    folder = env["tmp"] / "ckpt" / run.spec.run_id
    gone = []

    def until_gone(name):
        real = getattr(sweep.launch, name)

        def call(*args, **kwargs):
            if gone:
                raise OperationalError("UPDATE runs", {}, ConnectionRefusedError("connection refused"))
            if name == "write_results" and any(m["step"] >= 20 for m in args[1]):
                gone.append(1)  # the server goes away once the run has trained a while
            return real(*args, **kwargs)

        return call

    for name in ("write_results", "heartbeat", "update_run"):
        monkeypatch.setattr(sweep.launch, name, until_gone(name))
    with pytest.raises(DatabaseError) as caught:
        driver.run([(run.spec, run.name)])
    assert max(checkpoint_steps(folder), default=0) >= 20, "the worker was cancelled without a checkpoint"
    message = str(caught.value)
    assert "\n" not in message and message.startswith("lost the database: connection refused"), message
    assert "1 running run checkpointed and stopped; a relaunch resumes the runs from their checkpoints" in message, message
    engine.dispose()


def test_a_second_ctrl_c_as_a_result_is_written_leaves_no_run_leased_here(env, write_plan, monkeypatch):
    """Ctrl-C twice just as a run's result was about to be written: the run, already off the launcher's books, stayed
    running under this launcher's lease (for other hosts until the lease lapsed). It is released like the others."""
    import sweep.launch

    driver, engine, run = _driver_of_one_run(env, write_plan, "r,softmax,32,2,2,64,4,5120,3e-3,0,2\n", poll_s=0.2)
    real = sweep.launch.update_run

    def pressed(*args, **kwargs):
        if kwargs.get("status") == "done":
            signal.raise_signal(signal.SIGINT)
            signal.raise_signal(signal.SIGINT)
        return real(*args, **kwargs)

    monkeypatch.setattr(sweep.launch, "update_run", pressed)
    result = driver.run([(run.spec, run.name)])
    assert result.interrupted
    with engine.connect() as conn:
        row = conn.execute(select(Run.status, Run.lease_owner, Run.error).where(Run.run_id == run.spec.run_id)).one()
    assert tuple(row) == ("pending", None, "cancelled by Ctrl-C"), tuple(row)
    engine.dispose()


@SQLITE_ONLY
def test_a_short_database_outage_does_not_end_the_launch(env, write_plan, monkeypatch):
    """SQLite locked past its busy timeout, or a PostgreSQL connection dropped for a moment, is waited out: the
    launcher's writes and heartbeats are retried with backoff, and the run finishes as if nothing happened."""
    import sqlite3

    from sqlalchemy.exc import OperationalError

    import sweep.launch

    view = Logged()
    driver, engine, run = _driver_of_one_run(env, write_plan, "o,softmax,32,2,2,64,4,5120,3e-3,0,2\n", view,
                                             lease_timeout_s=30.0, heartbeat_s=0.5)
    failures = {"write_results": 3, "heartbeat": 2, "update_run": 1}
    errors = {
        "write_results": OperationalError("INSERT", {}, sqlite3.OperationalError("database is locked")),
        "heartbeat": OperationalError("UPDATE", {}, Exception("server closed the connection unexpectedly"),
                                      connection_invalidated=True),
        "update_run": OperationalError("UPDATE", {}, Exception(
            'connection failed: connection to server at "10.0.0.5", port 5432 failed: Connection refused')),
    }

    def flaky(name):
        real = getattr(sweep.launch, name)

        def call(*args, **kwargs):
            if failures[name]:
                failures[name] -= 1
                raise errors[name]
            return real(*args, **kwargs)

        return call

    for name in failures:
        monkeypatch.setattr(sweep.launch, name, flaky(name))
    result = driver.run([(run.spec, run.name)])
    assert failures == {"write_results": 0, "heartbeat": 0, "update_run": 0}
    assert result.ok and result.rows[0]["attempts"] == 1, result.rows
    assert any("database" in line and "retrying" in line for line in view.lines), view.lines
    assert runs_by_name(env, env["tmp"] / "plan.csv")["o"]["steps"] == list(range(1, 21))
    engine.dispose()


@SQLITE_ONLY
def test_a_checkpoint_folder_lock_is_waited_on_for_about_one_lease(env, write_plan, monkeypatch):
    """A worker whose run's checkpoint folder is locked (an orphaned worker of a launcher whose lease lapsed, which
    that launcher stops within about a lease) waits about one lease for it, not a fixed 120 s: longer than a short
    lease needs, and shorter than a long one."""
    import fcntl

    from sweep.launch import Driver, Flight

    view = Logged()
    with monkeypatch.context() as patch:
        # The margin a worker waits beyond the lease and a heartbeat (10 s, for the lost launcher to end its orphan) is
        # not what this proves: 1 s keeps the wait about one lease, in a third of the time.
        patch.setattr("sweep.task.LOCK_MARGIN_S", 1.0)
        driver, engine, run = _driver_of_one_run(env, write_plan, "k,softmax,32,2,2,64,4,5120,3e-3,0,2\n", view,
                                                 lease_timeout_s=2.0, max_attempts=1, poll_s=0.2)
    assert driver.lock_wait_s == 2.0 + 0.5 + 1.0  # the lease, a heartbeat (a quarter of it), the margin
    run_id = run.spec.run_id
    folder = env["tmp"] / "ckpt" / run_id
    folder.mkdir(parents=True)
    with open(folder / ".lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # an orphan that never lets go
        t0 = time.monotonic()
        driver._claim_and_submit([Flight(spec=run.spec, name=run.name, attempt=0, tries=0, microbatch=None)])
        while driver.units and time.monotonic() - t0 < 40:
            driver._collect()
        waited = time.monotonic() - t0
    assert driver.outcome.get(run_id) == "failed", (driver.outcome, view.lines)
    assert driver.lock_wait_s <= waited < 30, waited  # the whole wait it was told, not a fixed 120 s
    with engine.connect() as conn:
        error = conn.scalar(select(Run.error).where(Run.run_id == run_id))
    assert "is still locked" in error.splitlines()[-1], error

    # A long lease: the worker is told to wait longer than it, where 120 s had been too short.
    sent = []

    class Recorder:
        def options(self, **options):
            return self

        def remote(self, *args, **kwargs):
            sent.append(kwargs)
            return object()

    long = Driver(engine, LaunchOptions(db_url=env["db"], cpu=True, ckpt_dir=env["tmp"] / "ckpt", lease_timeout_s=600.0), view)
    long.task = Recorder()
    long._claim_and_submit([Flight(spec=run.spec, name=run.name, attempt=0, tries=0, microbatch=None)])
    assert 600 < sent[0]["lock_wait_s"] < 700, sent
    engine.dispose()


def _silent_for(engine, run_id, seconds):
    """Its launcher has not heartbeated for ``seconds`` (a host asleep, a stalled launcher)."""
    from datetime import timedelta

    from sqlalchemy import update

    from db.schema import utcnow

    with engine.begin() as conn:
        conn.execute(update(Run).where(Run.run_id == run_id).values(heartbeat_at=utcnow() - timedelta(seconds=seconds)))


def test_status_and_other_launchers_follow_the_lease_the_runs_launcher_used(env, write_plan):
    """A run of a launch with --lease-timeout 600 is neither called abandoned by slab status nor taken by a launcher
    of the default 120 s lease after 200 s without a heartbeat; after 700 s it is both."""
    from sweep.launch import Driver, Flight
    from sweep.progress import status_table

    driver, engine, run = _driver_of_one_run(env, write_plan, "v,softmax,32,2,2,64,4,5120,3e-3,0,2\n", lease_timeout_s=600.0)
    run_id = run.spec.run_id
    assert driver._claim(Flight(spec=run.spec, name=run.name, attempt=0, tries=0, microbatch=None))
    other = Driver(engine, LaunchOptions(db_url=env["db"], cpu=True, ckpt_dir=env["tmp"] / "ckpt"), Logged())
    _silent_for(engine, run_id, 200)
    assert "no live launcher" not in str(status_table(engine).caption)
    assert not other._claim(Flight(spec=run.spec, name=run.name, attempt=0, tries=0, microbatch=None))
    _silent_for(engine, run_id, 700)
    assert "1 running run has no live launcher" in str(status_table(engine).caption)
    assert other._claim(Flight(spec=run.spec, name=run.name, attempt=0, tries=0, microbatch=None))
    with engine.connect() as conn:
        assert conn.execute(select(Run.lease_owner, Run.attempts).where(Run.run_id == run_id)).one() == (other.owner, 2)
    engine.dispose()


def test_a_claim_whose_reply_was_lost_counts_as_claimed_once(env, write_plan, monkeypatch):
    """The claim's commit went through but the connection dropped before its reply: the retried claim finds the run
    leased to this launcher and takes it as claimed (attempt 1), rather than wait out its own lease."""
    from sqlalchemy.exc import OperationalError

    import sweep.launch
    from sweep.launch import Flight

    view = Logged()
    driver, engine, run = _driver_of_one_run(env, write_plan, "q,softmax,32,2,2,64,4,5120,3e-3,0,2\n", view)
    real, calls = sweep.launch.claim_run, []

    def claim_then_drop(*args, **kwargs):
        calls.append(real(*args, **kwargs))
        if len(calls) == 1:
            raise OperationalError("UPDATE runs", {}, Exception("server closed the connection unexpectedly"),
                                   connection_invalidated=True)
        return calls[-1]

    monkeypatch.setattr(sweep.launch, "claim_run", claim_then_drop)
    flight = Flight(spec=run.spec, name=run.name, attempt=0, tries=0, microbatch=None)
    assert driver._claim(flight), view.lines
    assert calls == [1, 1] and flight.attempt == 1 and flight.tries == 1
    assert not driver.waiting and not any("leased by another launcher" in line for line in view.lines), view.lines
    with engine.connect() as conn:
        assert conn.execute(select(Run.status, Run.lease_owner, Run.attempts).where(Run.run_id == run.spec.run_id)).one() == (
            "running", driver.owner, 1)
    engine.dispose()


@SQLITE_ONLY
def test_a_second_ctrl_c_while_the_database_is_away_ends_with_one_line(env, write_plan, monkeypatch):
    """Ctrl-C twice while the database is away: the release of the runs cannot be written, and the launch ends with
    one line saying they resume at the next launch (a traceback of the failed release had ended it)."""
    from sqlalchemy.exc import OperationalError

    import sweep.launch
    from db.engine import DatabaseError

    driver, engine, run = _driver_of_one_run(env, write_plan, "z,softmax,32,2,2,64,4,102400,3e-3,0,2\n",
                                             lease_timeout_s=30.0, heartbeat_s=0.5)
    calls = []

    def away(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the database has been away for a retry: the user presses Ctrl-C twice
            signal.raise_signal(signal.SIGINT)
            signal.raise_signal(signal.SIGINT)
        raise OperationalError("UPDATE runs", {}, ConnectionRefusedError("connection refused"))

    monkeypatch.setattr(sweep.launch, "heartbeat", away)
    monkeypatch.setattr(sweep.launch, "update_run", away)
    with pytest.raises(DatabaseError) as caught:
        driver.run([(run.spec, run.name)])
    message = str(caught.value)
    assert "\n" not in message and "connection refused" in message, message
    assert "resume" in message and "next slab launch" in message, message
    from ray.exceptions import TaskCancelledError

    [ref] = driver.units  # its worker was stopped all the same
    with pytest.raises(TaskCancelledError):
        driver.ray.get(ref, timeout=60)
    engine.dispose()


@SQLITE_ONLY
def test_a_relaunch_that_cannot_see_the_checkpoints_refuses_then_resumes_or_restarts(env, write_plan, monkeypatch):
    """Runs checkpointed under one --ckpt-dir, relaunched with another (the default, from another folder), had trained
    again from step 0 without a word. The database records each run's newest checkpoint step; a launch that sees none
    of it refuses (locally, and on a cluster as its workers see the folder); --restart trains from step 0."""
    from pathlib import Path

    from sweep.launch import LaunchError

    plan = write_plan(HEADER + "c-{seed},lightning,32,2,2,64,4,5120,3e-3,0|1|2,2\n")  # 20 steps each
    # Each fails at a step after checkpointing the one before: raised, not a worker's exit, whose replacement processes
    # (a Ray worker importing torch for each) had cost seconds that have nothing to do with the --ckpt-dir check.
    monkeypatch.setenv(FAULTS_ENV, json.dumps({"c-0": "raise@6", "c-1": "raise@9", "c-2": "raise@7"}))
    assert not run_launch(env, plan, max_attempts=1, ckpt_every_steps=1).ok
    runs = runs_by_name(env, plan)
    assert {n: (r["status"], r["ckpt_step"]) for n, r in runs.items()} == {"c-0": ("failed", 5), "c-1": ("failed", 8), "c-2": ("failed", 6)}
    assert {r["ckpt_dir"] for r in runs.values()} == {str((env["tmp"] / "ckpt").resolve())}
    monkeypatch.delenv(FAULTS_ENV)

    def opts(**kw):
        return LaunchOptions(db_url=env["db"], cpu=True, backoff_s=0.2, heartbeat_s=1.0, **{"ckpt_dir": Path("other"), **kw})

    for address in (None, env["address"]):  # the cluster's check runs on a worker
        with pytest.raises(LaunchError) as refused:
            launch([load_plan(plan)], opts(address=address), Quiet())
        message = str(refused.value)
        assert message.startswith(f"3 runs have checkpoints recorded up to step 8 but none under {(env['tmp'] / 'other').resolve()}/<run_id>/"), message
        assert f"--ckpt-dir {(env['tmp'] / 'ckpt').resolve()}" in message and "--restart" in message, message
    assert runs_by_name(env, plan)["c-0"]["attempts"] == 1  # nothing claimed

    view = Logged()
    assert launch([load_plan(plan)], opts(where=(("name", "c-2"),), restart=True), view).ok
    restarted = runs_by_name(env, plan)["c-2"]
    assert restarted["resumed_from_step"] == 0 and restarted["ckpt_step"] == 20
    assert restarted["ckpt_dir"] == str((env["tmp"] / "other").resolve())
    assert any("--restart" in line and "step 6" in line for line in view.lines), view.lines

    view = Logged()
    assert launch([load_plan(plan)], opts(ckpt_dir=env["tmp"] / "ckpt"), view).ok
    after = runs_by_name(env, plan)
    assert {n: r["resumed_from_step"] for n, r in after.items()} == {"c-0": 5, "c-1": 8, "c-2": 0}
    assert {n: r["steps"] for n, r in after.items()} == {n: list(range(1, 21)) for n in after}
    starts = sorted(line for line in view.lines if line.startswith("start "))
    assert len(starts) == 2 and "resumes from step 5)" in starts[0] and "resumes from step 8)" in starts[1], starts
    view = Logged()
    assert launch([load_plan(plan)], opts(), view).rows == []
    assert "nothing to train: all 3 selected runs are done" in view.lines, view.lines
