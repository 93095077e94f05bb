"""`slab launch` as driver processes of their own: killed, stopped by Ctrl-C or SIGTERM, two at once, exit codes.

Apart from test_launch.py so that pytest-xdist's workers, which take whole files, share the launch tests' time."""

import json
import signal
import time

import pytest
from sqlalchemy import func, select

from db.engine import open_db
from db.schema import Metric
from models.train import checkpoint_steps
from sweep.launch import FAULTS_ENV
from tests.sweep.test_launch import HEADER, SQLITE_ONLY, env, ray_address, run_launch, runs_by_name, slab  # noqa: F401 (fixtures)

pytestmark = pytest.mark.slow


@SQLITE_ONLY
def test_driver_sigkill_then_relaunch_resumes(env, write_plan):
    """A driver killed outright leaves its runs running under its lease: a relaunch on this host takes them at once,
    resumes each from its newest checkpoint and records every step exactly once (the journal fills the gap).
    SQLite alone (its PostgreSQL run took 40-60 s of CI's two cores): the statements a takeover runs are checked on
    both databases in process (test_a_run_held_by_a_launcher_gone_from_this_host_is_taken_at_once, and the claims of
    test_db), and this test's subject is the killed process and the journal it leaves."""
    # 120 steps, killed past step 40: the relaunch trains the 80 or so left of each (of 200 steps, it had been 150 and
    # more). Three runs on two CPUs: the third has not started when the driver dies, and trains once.
    plan = write_plan(HEADER + "k-{arch},softmax|lightning|hgrn2,32,2,2,64,4,30720,3e-3,0,2\n")
    proc = slab(env, plan, "--ckpt-every", "20")
    engine = open_db(env["db"])
    deadline = time.time() + 120
    killed_at = None
    while time.time() < deadline:
        with engine.connect() as conn:
            top = conn.execute(select(func.max(Metric.step))).scalar()
        if top is not None and top >= 40:  # past its second checkpoint, far from its last step
            proc.send_signal(signal.SIGKILL)
            killed_at = top
            break
        time.sleep(0.2)
    proc.wait(timeout=30)
    assert killed_at is not None, proc.stdout.read()
    before = runs_by_name(env, plan)
    assert any(r["status"] == "running" for r in before.values())
    # a run that started late may have had no checkpoint yet when the driver died: it restarts from 0
    saved = {name: max(checkpoint_steps(env["tmp"] / "ckpt" / r["run_id"]), default=0) for name, r in before.items()}
    result = run_launch(env, plan, ckpt_every_steps=20)
    assert result.ok
    after = runs_by_name(env, plan)
    for name, r in after.items():
        assert r["status"] == "done", name
        assert r["steps"] == list(range(1, 121)), name  # no duplicate or missing metric row
        if before[name]["status"] == "running":
            assert r["attempts"] == 2 and (r["resumed_from_step"] or 0) >= saved[name], (name, saved)
        else:  # finished before the kill: untouched; never started: trained once
            assert r["attempts"] == max(1, before[name]["attempts"]), name
    assert max(r["resumed_from_step"] or 0 for r in after.values()) >= 20
    engine.dispose()


def test_two_concurrent_launches_train_each_run_once(env, write_plan):
    """Two launchers of one plan at once, each claiming what the other may claim: every run trains once, in full."""
    # 20 steps a run: the two race as they register and claim, at their start, not over the runs' length.
    plan = write_plan(HEADER + "c-{arch}-{seed},softmax|lightning,32,2,2,64,4,5120,3e-3,0|1,2\n")
    procs = [slab(env, plan), slab(env, plan)]
    outs = [p.communicate(timeout=240)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    runs = runs_by_name(env, plan)
    assert len(runs) == 4
    for name, r in runs.items():
        assert r["status"] == "done" and r["attempts"] == 1, (name, outs)
        assert r["steps"] == list(range(1, 21)), name


@SQLITE_ONLY
def test_cli_exit_codes(env, write_plan):
    """`slab launch` exits 2 on a bad plan and on a run larger than the cluster, 1 when a run diverged."""
    bad = write_plan(HEADER + "x,softmax,32,2,3,64,4,5120,3e-3,0,2\n", "bad.csv")
    big = write_plan("name,arch,d_model,n_layers,n_heads,seq_len,batch_size,tokens,gpus\nb,softmax,32,2,2,64,4,5120,4\n", "big.csv")
    plan = write_plan(HEADER + "n,softmax,32,2,2,64,4,5120,3e-3,0,2\n")
    # Three drivers at once, not one after another: most of each one's time is its start-up (imports, joining Ray), and
    # the two refused ones write nothing to the database the third trains in.
    procs = [slab(env, bad), slab(env, big), slab(env, plan, extra_env={FAULTS_ENV: json.dumps({"n": "nan@2"})})]
    (bad_out, big_out, out) = [proc.communicate(timeout=120)[0] for proc in procs]
    assert procs[0].returncode == 2 and "bad.csv:2:n_heads" in bad_out, bad_out
    assert procs[1].returncode == 2 and "needs 4 CPUs" in big_out, big_out
    assert procs[2].returncode == 1, out
    assert "diverged" in out


def wait_for_step(env, step: int, timeout_s: float = 120) -> None:
    """Wait until some run of the launch has recorded ``step`` (or ``timeout_s`` passed)."""
    engine = open_db(env["db"])
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        with engine.connect() as conn:
            top = conn.execute(select(func.max(Metric.step))).scalar()
        if top is not None and top >= step:
            break
        time.sleep(0.2)
    engine.dispose()


@SQLITE_ONLY
def test_ctrl_c_stops_gracefully_then_relaunch_finishes(env, write_plan):
    """Ctrl-C mid-training stops the launch gracefully: each running run checkpoints where it got to and is pending
    again, and a relaunch continues it from there to its last step."""
    # 500 steps each (every step reported): the stop asked for after step 30 reaches the workers within about 3 s (the
    # driver's write, this poll, the workers' next flush), by step 150 or so where a run trains 40 steps a second; with
    # 200 steps a fast machine had finished both runs before it landed. The relaunch trains what is left, not 500 more.
    plan = write_plan(HEADER + "s-{arch},softmax|lightning,32,2,2,64,4,128000,3e-3,0,2\n")
    proc = slab(env, plan, "--ckpt-every", "1000")
    wait_for_step(env, 30)
    proc.send_signal(signal.SIGINT)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 1, out
    assert "stopping" in out and "stopped early" in out
    stopped = runs_by_name(env, plan)
    assert {r["status"] for r in stopped.values()} <= {"pending", "done"}
    assert any(r["status"] == "pending" and "Ctrl-C" in (r["error"] or "") for r in stopped.values())
    result = run_launch(env, plan)
    assert result.ok
    after = runs_by_name(env, plan)
    for name, r in after.items():
        assert r["steps"] == list(range(1, 501)), name
        # The stop checkpointed where each run had got to and the relaunch went on from there. The wait above is for
        # one run's step 30; on a loaded machine the other may not have reported a step yet, and then starts over.
        reported = max(stopped[name]["steps"], default=0)
        if stopped[name]["status"] == "pending" and reported:
            assert r["resumed_from_step"] >= reported, name
    assert any(r["resumed_from_step"] >= 30 for r in after.values())


@SQLITE_ONLY
def test_sigterm_stops_gracefully_like_ctrl_c(env, write_plan):
    """A scheduler (Slurm, Kubernetes, timeout) ends the launcher with SIGTERM. It had ended the launch at once
    through Ray's handler: runs released as after "a launcher error", without a checkpoint, every step since the
    last one lost. Now it stops as Ctrl-C does: each run checkpoints where it got to and is pending again."""
    plan = write_plan(HEADER + "t-{arch},softmax|lightning,32,2,2,64,4,256000,3e-3,0,2\n")  # 1,000 steps each
    proc = slab(env, plan, "--ckpt-every", "1000")
    wait_for_step(env, 30)
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 1, out
    assert "stopping" in out and "SIGTERM" in out and "stopped early" in out, out
    stopped = runs_by_name(env, plan)
    assert {r["status"] for r in stopped.values()} <= {"pending", "done"}, stopped
    pending = [r for r in stopped.values() if r["status"] == "pending"]
    assert pending and all("SIGTERM" in (r["error"] or "") for r in pending), [r["error"] for r in pending]
    # the stop checkpointed: at least one run kept the 30-odd steps it had trained, with no checkpoint due before 1,000
    assert any((r["ckpt_step"] or 0) >= 30 for r in pending), [(r["ckpt_step"], r["steps"][-1:]) for r in pending]
