"""More launch checks without Ray: an unwritable --ckpt-dir, a pack member's own bad input, a stop while runs start,
and progress counts and ETA that leave out what no longer trains."""

import io
import os
import re
import time

import pytest
from rich.console import Console
from sqlalchemy import select

from db.engine import open_db
from db.schema import Run, utcnow
from db.writer import claim_run
from sweep.launch import Driver, Flight, LaunchError, LaunchOptions, launch
from sweep.plan import load_plan
from sweep.progress import LaunchView
from sweep.registry import add_plans
# A quiet view that keeps its log lines, and Ray that raises RayStarted once a launch is past its checks.
from tests.sweep.test_launch_options import RayStarted, Said, no_ray  # noqa: F401 (no_ray: a fixture)

HEADER = "name,arch,d_model,n_layers,n_heads,seq_len,batch_size,tokens,lr,seed,warmup\n"
# Three same-shape runs (a pack's members), 20 steps of 1,024 tokens each.
THREE = HEADER + "p-{seed},lightning,32,2,2,64,4,5120,3e-3,0|1|2,2\n"



def _bare_driver(engine, tmp_path, view, **options) -> Driver:
    """A Driver for settling outcomes and starting units, without Ray."""
    driver = Driver.__new__(Driver)
    driver.engine, driver.owner, driver.view, driver.outcome = engine, "me", view, {}
    driver.opts = LaunchOptions(cpu=True, ckpt_dir=tmp_path / "ck", **options)
    driver.db_away_since, driver.stopping = None, False
    driver.queue, driver.flights, driver.units, driver.waiting, driver.waited = [], {}, {}, {}, set()
    driver.restarts, driver.faults, driver.slots, driver.spread = set(), {}, [], False
    driver.total_cpus, driver.total_gpus = 2.0, 0.0
    return driver


def _pack_in_flight(plan_path, tmp_path):
    """A database with the plan's runs claimed by "me", and a Driver holding them in flight as one pack's members."""
    plan = load_plan(plan_path)
    engine = open_db(f"sqlite:///{tmp_path}/slab.db")
    add_plans(engine, [plan])
    specs = [r.spec for r in plan.runs]
    for s in specs:
        claim_run(engine, s.run_id, "me", utcnow())
    driver = _bare_driver(engine, tmp_path, Said(), max_attempts=3)
    for s, r in zip(specs, plan.runs):
        driver.flights[s.run_id] = Flight(spec=s, name=r.name, attempt=1, tries=1, microbatch=None)
    return engine, driver, specs


def _finish_pack(driver: Driver, specs, result) -> None:
    """Have ``driver`` settle a pack task of ``specs`` whose ray.get gives ``result()`` (a list, or it raises)."""
    from sweep.launch import Task

    class Ray:
        @staticmethod
        def get(ref):
            return result()

    driver.ray = Ray()
    driver.units["pack"] = Task([s.run_id for s in specs], cpus=1, gpus=0.0)
    driver._finish_unit("pack")


def _raise(exc: Exception):
    """A result that raises ``exc``, as ray.get does for a task that failed."""
    def result():
        raise exc
    return result


def test_an_existing_ckpt_dir_that_cannot_be_written_is_refused_before_anything_is_written(write_plan, tmp_path, no_ray,
                                                                                            monkeypatch):
    """A --ckpt-dir that exists but cannot be written (a read-only mount, another user's folder) was taken as it is:
    the plans were registered, Ray started, and every run failed --max-attempts times on a PermissionError in its
    worker. Locally the workers are this host's processes, so it is refused in one line first."""
    folder = tmp_path / "ro"
    folder.mkdir()
    real = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, *a, **k: False if os.fspath(path) == str(folder) else real(path, mode, *a, **k))
    db = tmp_path / "slab.db"
    plan = load_plan(write_plan(THREE))
    with pytest.raises(LaunchError, match=rf"^--ckpt-dir {re.escape(str(folder))}: cannot write in it"):
        launch([plan], LaunchOptions(db_url=f"sqlite:///{db}", cpu=True, ckpt_dir=folder), Said())
    assert not db.exists()
    # a writable one gets past the check (to Ray, which this test does not start)
    monkeypatch.setattr(os, "access", real)
    with pytest.raises(RayStarted):
        launch([plan], LaunchOptions(db_url=f"sqlite:///{db}", cpu=True, ckpt_dir=folder), Said())


def test_a_ckpt_dir_that_os_access_calls_writable_but_cannot_be_made_is_refused_before_anything_is_written(
        write_plan, tmp_path, no_ray, monkeypatch):
    """As root, os.access answers yes for a read-only mount or /proc: the plans were registered, then the launcher's
    mkdir failed ('cannot create the folder', exit 2, with slab.db written). A folder made and removed tells first."""
    import tempfile

    def refuse(*args, **kwargs):
        raise PermissionError(1, "Operation not permitted")

    db, plan = tmp_path / "slab.db", load_plan(write_plan(THREE))
    with monkeypatch.context() as m:
        m.setattr(tempfile, "mkdtemp", refuse)
        for folder, how in ((tmp_path / "new" / "ck", "create it"), (tmp_path, "write in it")):
            with pytest.raises(LaunchError, match=rf"^--ckpt-dir {re.escape(str(folder))}: cannot {how}: Operation not permitted$"):
                launch([plan], LaunchOptions(db_url=f"sqlite:///{db}", cpu=True, ckpt_dir=folder), Said())
    assert not db.exists() and not (tmp_path / "new").exists()
    with pytest.raises(RayStarted):  # the probe leaves nothing behind
        launch([plan], LaunchOptions(db_url=f"sqlite:///{db}", cpu=True, ckpt_dir=tmp_path / "ck"), Said())
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".slab-probe-")]


def test_a_relaunch_with_nothing_to_train_counts_the_runs_that_had_diverged(write_plan, tmp_path, no_ray):
    """The launch that saw a run diverge exited 1, a relaunch of the plan 0 ('nothing to train ... 1 diverged'): a
    script's `slab launch P && slab report` went on the second time."""
    from sqlalchemy import update

    from db.engine import session

    db, plan = f"sqlite:///{tmp_path / 'slab.db'}", load_plan(write_plan(THREE))
    engine = open_db(db, create=True)
    add_plans(engine, [plan])
    ids = sorted(plan.unique_specs())
    for run_id, status in zip(ids, ("done", "diverged", "done")):
        with session(engine) as s:
            s.execute(update(Run).where(Run.run_id == run_id).values(status=status))
    said = Said()
    result = launch([plan], LaunchOptions(db_url=db, cpu=True, ckpt_dir=tmp_path / "ck"), said)
    assert (result.rows, result.diverged_before, result.ok) == ([], 1, False)
    assert said.lines[-1] == "nothing to train: all 3 selected runs are finished (2 done, 1 diverged)"
    with session(engine) as s:
        s.execute(update(Run).where(Run.run_id == ids[1]).values(status="done"))
    result = launch([plan], LaunchOptions(db_url=db, cpu=True, ckpt_dir=tmp_path / "ck"), said)
    assert (result.diverged_before, result.ok) == (0, True)
    engine.dispose()


def test_a_pack_members_own_refused_checkpoint_is_not_retried_and_its_mates_finish(write_plan, tmp_path):
    """A pack's task returned, per member, a summary or what stopped that member alone: a ValueError before it trained
    a step is that member's own input (a checkpoint of another run or other data), which a lone retry refuses the same
    way. It had been retried alone, waiting out a backoff for a certain failure."""
    from models.train import Summary

    engine, driver, specs = _pack_in_flight(write_plan(THREE), tmp_path)
    done = {"final_loss": 4.0, "val_loss": 4.1, "wall_s": 1.0, "steps": 20, "tokens": 5120, "flops": 1e9}
    assert set(done) <= {f.name for f in __import__("dataclasses").fields(Summary)}
    refused = ValueError("checkpoint of another run")
    driver._write_events([(s.run_id, 1, "start", {"host": "h"}) for s in specs])

    _finish_pack(driver, specs, lambda: [done, refused, done])
    assert driver.queue == [], "a member's own refused checkpoint was queued for a lone retry"
    assert driver.outcome == {specs[0].run_id: "done", specs[1].run_id: "failed", specs[2].run_id: "done"}
    with engine.connect() as conn:
        status = dict(conn.execute(select(Run.run_id, Run.status)).all())
    engine.dispose()
    assert [status[s.run_id] for s in specs] == ["done", "failed", "done"]


def test_a_whole_pack_failing_on_a_value_error_still_retries_its_runs_alone(write_plan, tmp_path):
    """The other side: a ValueError that ended the whole pack may be one member's, so every member retries alone."""
    engine, driver, specs = _pack_in_flight(write_plan(THREE), tmp_path)

    _finish_pack(driver, specs, _raise(ValueError("microbatch 3 does not divide the batch 4")))
    assert sorted(f.spec.run_id for unit in driver.queue for f in unit) == sorted(s.run_id for s in specs)
    engine.dispose()


def _run_alone(engine, driver: Driver) -> list[Flight]:
    """Claim each queued unit again, as the launcher does before its next attempt; returns the flights now in flight."""
    flights = []
    for unit in driver.queue:
        assert len(unit) == 1, "a retry trains alone"
        [flight] = unit
        assert driver._claim(flight)
        driver.flights[flight.spec.run_id] = flight
        flights.append(flight)
    driver.queue = []
    return flights


def test_a_whole_pack_crash_retries_each_member_alone_once_even_with_max_attempts_1(write_plan, tmp_path):
    """`--max-attempts 1`: a pack whose task died as a whole (its worker crashed) had failed all its members, none of
    them tried alone. Each is retried alone; a member fails only once it has failed on its own, and a crash that comes
    back the same alone ends it rather than loop."""
    import dataclasses

    engine, driver, specs = _pack_in_flight(write_plan(THREE), tmp_path)
    driver.opts = dataclasses.replace(driver.opts, max_attempts=1)
    ids = sorted(s.run_id for s in specs)

    _finish_pack(driver, specs, _raise(RuntimeError("the pack's worker died")))
    assert sorted(f.spec.run_id for unit in driver.queue for f in unit) == ids, driver.outcome
    assert driver.outcome == {}
    for flight in _run_alone(engine, driver):
        driver._settle(flight.spec.run_id, RuntimeError("the same crash, alone"))
    assert driver.queue == [] and driver.outcome == {run_id: "failed" for run_id in ids}
    with engine.connect() as conn:
        rows = {r.run_id: (r.status, r.attempts) for r in conn.execute(select(Run.run_id, Run.status, Run.attempts))}
    engine.dispose()
    assert rows == {run_id: ("failed", 2) for run_id in ids}


def test_a_pack_out_of_memory_still_retries_its_members_alone_at_once(write_plan, tmp_path):
    """Unchanged by the above: a pack out of memory retries each member alone, with no backoff, whatever --max-attempts."""
    import dataclasses

    from models.train import OutOfMemory

    engine, driver, specs = _pack_in_flight(write_plan(THREE), tmp_path)
    driver.opts = dataclasses.replace(driver.opts, max_attempts=1, backoff_s=60.0)
    _finish_pack(driver, specs, _raise(OutOfMemory(7, 4)))
    engine.dispose()
    assert sorted(f.spec.run_id for unit in driver.queue for f in unit) == sorted(s.run_id for s in specs)
    assert all(len(unit) == 1 and unit[0].not_before == 0.0 for unit in driver.queue)


def test_a_stop_while_units_start_claims_no_further_run(write_plan, tmp_path):
    """Ctrl-C (or SIGTERM) landing while the launcher started the units that fit: it went on claiming and submitting
    the rest of them in that pass, each a task that started only to stop, its run claimed (attempts + 1)."""
    plan = load_plan(write_plan(THREE))
    driver = _bare_driver(None, tmp_path, Said())
    driver.queue = [[Flight(spec=r.spec, name=r.name, attempt=0, tries=0, microbatch=None)] for r in plan.runs]
    started = []

    def claim_and_submit(unit):
        started.append(unit)
        driver.stopping = True  # the signal handler ran while this unit started

    driver._claim_and_submit = claim_and_submit
    driver._start_ready()
    assert len(started) == 1, f"{len(started)} units started after the stop"
    assert len(driver.queue) == 2


def _view_of_two(write_plan):
    plan = load_plan(write_plan(HEADER + "e-{seed},softmax,32,2,2,64,4,5120,3e-3,0|1,2\n"))
    (a, _), (b, _) = runs = [(r.spec, r.name) for r in plan.runs]
    view = LaunchView(Console(file=io.StringIO()), live=False)
    view.begin(runs)
    return view, a, b


def _train(view, spec, step):
    view.run_event(spec.run_id, "train", {"step": step, "tokens": 256 * step, "loss": 3.0, "tokens_per_s": 100.0})


def test_the_eta_leaves_out_runs_that_ended_without_finishing(write_plan):
    """A run that failed (or diverged, or was stopped) trains no more in this launch: its remaining tokens had stayed in
    the ETA, which then never reached zero and, with a run failed early, said several times the real time left."""
    view, a, b = _view_of_two(write_plan)  # 20 steps of 256 tokens each
    view.run_started(a.run_id, a, "e-0", 1)
    view.run_started(b.run_id, b, "e-1", 1)
    view.t0 = time.monotonic() - 10
    for step in range(1, 11):  # a: half its steps in 10 s
        _train(view, a, step)
    _train(view, b, 1)
    view.run_finished(b.run_id, "failed", "RuntimeError: boom")
    # 11 steps in 10 s, 10 steps left (a's): about 9 s, 0.2 min; counting b's 19 untrainable steps said 0.4 min
    assert "ETA 0.2 min" in view._line(), view._line()
    for step in range(11, 21):
        _train(view, a, step)
    view.run_finished(a.run_id, "done", "loss 3.0")
    assert "ETA" not in view._line(), view._line()


def test_a_run_waiting_to_retry_is_not_counted_running(write_plan, tmp_path):
    """A run whose attempt failed waits out its backoff (seconds to minutes) before its next attempt: the progress line
    had counted it among the running ones, with the failed attempt's step in the live table."""
    plan = load_plan(write_plan(HEADER + "e-{seed},softmax,32,2,2,64,4,5120,3e-3,0|1,2\n"))
    (a, _), (b, _) = runs = [(r.spec, r.name) for r in plan.runs]
    engine = open_db(f"sqlite:///{tmp_path}/slab.db")
    add_plans(engine, [plan])
    view = Said()
    view.begin(runs)
    driver = _bare_driver(engine, tmp_path, view, max_attempts=3)
    for s, name in runs:
        claim_run(engine, s.run_id, "me", utcnow())
        driver.flights[s.run_id] = Flight(spec=s, name=name, attempt=1, tries=1, microbatch=None)
        view.run_started(s.run_id, s, name, 1)
    driver._settle(b.run_id, RuntimeError("a worker died"))
    engine.dispose()
    assert [f.spec.run_id for unit in driver.queue for f in unit] == [b.run_id]  # retried after its backoff
    assert "0 failed, 1 running" in view._line() and b.run_id not in view.running, view._line()
    view.run_started(b.run_id, b, "e-1", 2)
    assert "0 failed, 2 running" in view._line(), view._line()


def test_limit_picks_runs_no_live_launcher_holds(write_plan, tmp_path):
    """`--limit 1` on a second machine, while another launcher trains the plan's first run: the limit had taken that run
    (not done, so selected), and the launch waited on it and trained nothing. It takes a run it can train."""
    from datetime import timedelta

    from sweep.launch import select_runs

    plan = load_plan(write_plan(THREE))
    engine = open_db(f"sqlite:///{tmp_path}/slab.db")
    add_plans(engine, [plan])
    first, second, third = (r.spec.run_id for r in plan.runs)
    assert claim_run(engine, first, "elsewhere:1:abc:120", utcnow()) == 1  # live: heartbeat just now
    todo = select_runs(engine, [plan], LaunchOptions(limit=1)).runs
    assert [s.run_id for s, _ in todo] == [second]
    todo = select_runs(engine, [plan], LaunchOptions(limit=3)).runs  # the held one still comes, last
    assert [s.run_id for s, _ in todo] == [second, third, first]
    # without a limit too; and the launch says so where it had said "3 runs to train" of a run it waits on
    selection = select_runs(engine, [plan], LaunchOptions())
    assert [s.run_id for s, _ in selection.runs] == [second, third, first]
    assert selection.summary() == ("3 runs to train, 1 of them trained now by another launcher (this one waits on it, "
                                   "and takes over any that launcher stops training)")
    only_first = select_runs(engine, [plan], LaunchOptions(where=(("seed", "0"),)))
    assert only_first.summary().startswith("1 run to train, trained now by another launcher (this one waits on it,")
    # a lease that lapsed (its launcher silent for longer than its 120 s) is this launcher's to take, in plan order
    from sqlalchemy import update

    with engine.begin() as conn:
        conn.execute(update(Run).where(Run.run_id == first).values(heartbeat_at=utcnow() - timedelta(seconds=300)))
    todo = select_runs(engine, [plan], LaunchOptions(limit=1)).runs
    assert [s.run_id for s, _ in todo] == [first]
    engine.dispose()


@pytest.mark.parametrize("options,message", [
    ({"limit": 0}, "--limit 0 trains no run"),
    ({"num_gpus": 2}, "--num-gpus 2 with --cpu"),
    ({"num_gpus": 0}, "--num-gpus 0: give 1 or more"),  # it had passed with --cpu, against the README's word
])
def test_options_that_make_no_sense_together_are_refused_before_anything_is_written(write_plan, tmp_path, no_ray, options,
                                                                                     message):
    """--limit 0 had registered the plans and said "0 runs to train" with exit 0; --cpu with --num-gpus 2 had dropped
    the GPUs without a word. Each is one line (exit 2 from the CLI) before the database is made."""
    db = tmp_path / "slab.db"
    plan = load_plan(write_plan(THREE))
    with pytest.raises(LaunchError, match=re.escape(message)) as refused:
        launch([plan], LaunchOptions(db_url=f"sqlite:///{db}", cpu=True, ckpt_dir=tmp_path / "ck", **options), Said())
    assert "\n" not in str(refused.value)
    assert not db.exists() and not (tmp_path / "ck").exists()


def test_limit_zero_from_the_cli_exits_2_in_one_line(write_plan, tmp_path):
    from typer.testing import CliRunner

    from sweep.cli import app

    db = tmp_path / "slab.db"
    result = CliRunner().invoke(app, ["--db", f"sqlite:///{db}", "launch", str(write_plan(THREE)), "--cpu", "--limit", "0",
                                      "--ckpt-dir", str(tmp_path / "ck")])
    assert result.exit_code == 2, result.output
    assert "--limit 0 trains no run" in result.output and not db.exists()


def test_a_local_ray_that_cannot_start_is_one_line(write_plan, tmp_path, monkeypatch):
    """A local Ray that fails to start (its session folder on a full disk) had ended the launch in Ray's traceback."""
    import ray

    import sweep.launch

    def init(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ray, "init", init)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(sweep.launch, "capacity", lambda opts: (2.0, 0.0))
    db = tmp_path / "slab.db"
    with pytest.raises(LaunchError, match=r"^cannot start a local Ray: \[Errno 28\] No space left on device$"):
        launch([load_plan(write_plan(THREE))], LaunchOptions(db_url=f"sqlite:///{db}", cpu=True, ckpt_dir=tmp_path / "ck"),
               Said())


@pytest.mark.parametrize("lease", [float("inf"), 1e20, float("nan"), 0.0])
def test_a_lease_that_cannot_be_kept_is_refused_by_the_library_too(write_plan, tmp_path, lease):
    # only the CLI had checked it: a library launch registered the plan, then timedelta overflowed in _claim
    db = f"sqlite:///{tmp_path / 'x.db'}"
    opts = LaunchOptions(db_url=db, ckpt_dir=tmp_path / "ckpt", cpu=True, lease_timeout_s=lease)
    with pytest.raises(LaunchError, match="--lease-timeout must be a number of seconds"):
        launch([load_plan(write_plan(THREE))], opts, Said())
    assert not (tmp_path / "x.db").exists() and not (tmp_path / "ckpt").exists()
