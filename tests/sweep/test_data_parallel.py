"""Data-parallel runs through Ray Train on CPU (gloo): same curve as one worker, worker death resumes."""

import json
import os
import shutil
from pathlib import Path

import pytest
from sqlalchemy import select

from db.engine import open_db
from db.schema import Metric, Run
from models.train import checkpoint_path, checkpoint_steps, checksum_path, pretrain
from sweep.launch import FAULTS_ENV, LaunchOptions, launch
from sweep.plan import load_plan
from sweep.progress import LaunchView

pytestmark = pytest.mark.slow

# 20 steps, global batch 8: two workers take 4 sequences each, one worker takes all 8.
# lr 1e-3: at 3e-3 an FSDP run on one machine's stdlib spiked at step 14 (grad norm 21 against 1.7 alone): the
# 1e-6 roundings of gloo's reduce-scatter grew to 0.008 apart, chaos of the trajectory, not a wrong step (equal without
# clipping, and the grad norms equal to 1e-5 until then); these tests compare trainings, so they train smoothly.
PLAN = "name,arch,d_model,n_layers,n_heads,seq_len,batch_size,tokens,lr,seed,warmup,gpus\n{name},lightning,32,2,2,64,8,10240,1e-3,0,2,{gpus}\n"


@pytest.fixture(scope="module")
def ray_local():
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=2, num_gpus=0, include_dashboard=False, logging_level="ERROR")
    yield
    ray.shutdown()


def quiet():
    from rich.console import Console

    return LaunchView(Console(file=open(os.devnull, "w")), live=False)


def train(tmp_path, tag, gpus, **kw):
    """Train the plan on `gpus` CPU workers, its database under tmp_path: the result, the run's row, its losses."""
    plan = tmp_path / f"{tag}.csv"
    plan.write_text(PLAN.format(name=f"dp-{tag}", gpus=gpus))
    db = f"sqlite:///{tmp_path}/{tag}.db"
    opts = LaunchOptions(db_url=db, cpu=True, ckpt_dir=tmp_path / f"ckpt-{tag}", backoff_s=0.2, heartbeat_s=1.0, **kw)
    result = launch([load_plan(plan)], opts, quiet())
    engine = open_db(db)
    with engine.connect() as conn:
        run = conn.execute(select(Run.__table__)).mappings().one()
        losses = [loss for (loss,) in conn.execute(select(Metric.loss).order_by(Metric.step))]
    engine.dispose()
    return result, run, losses


def train_here(spec, ckpt_dir):
    """``pretrain`` of ``spec`` on one worker in this process (no process group): its summary and losses by step."""
    losses = {}

    def report(kind, payload):
        if kind == "train":
            losses[payload["step"]] = payload["loss"]

    return pretrain(spec, report, ckpt_dir, device="cpu"), losses


@pytest.fixture(scope="module")
def one_worker(tmp_path_factory):
    """The plan trained on one worker, once for the module: the reference the data-parallel runs must match (its spec,
    summary and losses). In this process, not launched: the subject here is the data-parallel side, and a one-worker
    launch's Ray task spent 10-20 s starting a worker that imports torch, to train for 3."""
    root = tmp_path_factory.mktemp("one-worker")
    plan = root / "one.csv"
    plan.write_text(PLAN.format(name="dp-one", gpus=1))
    spec = load_plan(plan).runs[0].spec
    summary, losses = train_here(spec, root / "ckpt")
    return spec, summary, [losses[step] for step in sorted(losses)]


@pytest.fixture(scope="module")
def killed(ray_local, tmp_path_factory):
    """The plan trained on two workers, DDP (fsdp None) or FSDP (fsdp 1), each once for the module on first use; its
    last worker dies right after checkpointing step 10 and the launcher retries it from there. One launch serves the
    curve tests, the retry tests and (FSDP) the move to one worker (each had its own launch, and a Ray Train launch
    takes some 40 s on two cores): every step is trained on two workers, steps 1-10 without a break."""
    runs = {}

    def get(fsdp):
        if fsdp not in runs:
            tag = "ddp" if fsdp is None else "fsdp"
            with pytest.MonkeyPatch.context() as patch:  # the fault names this run alone
                patch.setenv(FAULTS_ENV, json.dumps({f"dp-{tag}": "exit@10"}))
                runs[fsdp] = train(tmp_path_factory.mktemp(f"{tag}-workers"), tag, 2, ckpt_every_steps=5,
                                   fsdp_min_params=fsdp)
        return runs[fsdp]

    return get


def test_two_workers_match_one_worker(one_worker, killed):
    spec1, one, curve1 = one_worker
    two, run2, curve2 = killed(None)
    assert two.ok, two.rows
    assert spec1.run_id == run2["run_id"]  # how many workers trained it (gpus 1 against 2) is not part of its identity
    assert run2["n_gpus"] == 0 and run2["gpu"] == "2 CPU workers (Ray Train, DDP)"  # CPU workers hold no GPU
    assert len(curve1) == len(curve2) == 20
    # Same sequences, same global batch; only the order of float sums differs (gloo all-reduce).
    assert max(abs(a - b) for a, b in zip(curve1, curve2)) < 2e-3
    assert abs(one.val_loss - run2["val_loss"]) < 2e-3


def test_fsdp_workers_match_one_worker(one_worker, killed):
    # fsdp_min_params=1 shards even this tiny model (on CPU the default never does).
    _, one, curve1 = one_worker
    two, run2, curve2 = killed(1)
    assert two.ok, two.rows
    assert run2["gpu"] == "2 CPU workers (Ray Train, FSDP)"
    assert len(curve2) == 20
    assert max(abs(a - b) for a, b in zip(curve1, curve2)) < 2e-3
    assert abs(one.val_loss - run2["val_loss"]) < 2e-3


@pytest.mark.parametrize("fsdp", [None, 1], ids=["ddp", "fsdp"])
def test_killed_worker_is_retried_from_the_checkpoint(one_worker, killed, fsdp):
    _, _, reference = one_worker
    result, run, curve = killed(fsdp)
    assert result.ok, result.rows
    assert run["attempts"] == 2 and run["resumed_from_step"] == 10
    assert len(curve) == 20
    # The resumed run restored weights and AdamW state (gathered whole under FSDP): it goes on as if never killed,
    # on the curve of one worker that never was.
    assert max(abs(a - b) for a, b in zip(curve[10:], reference[10:])) < 2e-3


def test_fsdp_checkpoint_resumes_without_fsdp(one_worker, killed, tmp_path):
    """The checkpoint of a sharded run has an unsharded run's format: it resumes on one worker, which goes on as the
    sharded run did."""
    spec, _, _ = one_worker  # gpus 1: the same run, trained by one worker without a process group
    _, run, curve = killed(1)
    # Step 15's checkpoint, written by the two FSDP workers of the retried attempt (gathered whole), alone in a folder.
    # The module's FSDP run serves, not a launch of this test's own: that took some 40 s, nearly all Ray Train
    # starting its workers.
    saved = Path(run["ckpt_dir"]) / run["run_id"]
    assert 15 in checkpoint_steps(saved)
    for path in (checkpoint_path(saved, 15), checksum_path(checkpoint_path(saved, 15))):
        shutil.copy(path, tmp_path / path.name)
    summary, losses = train_here(spec, tmp_path)
    assert summary.resumed_from_step == 15 and sorted(losses) == list(range(16, 21))
    # From the same weights and AdamW state, the two trainings differ only by the order of gloo's float sums (5e-7
    # apart when measured, against a tolerance set well below any lost state): resumed without the optimizer's state
    # the losses ended 5e-3 apart, with its second moments flattened 2e-3, without the weights 0.5.
    assert max(abs(losses[step] - curve[step - 1]) for step in losses) < 1e-4
    assert abs(summary.val_loss - run["val_loss"]) < 1e-4


def test_too_many_workers_for_the_cluster_is_refused(ray_local, tmp_path):
    from sweep.launch import LaunchError

    with pytest.raises(LaunchError, match="needs 4 CPUs"):
        train(tmp_path, "big", 4)


def test_ray_train_settings_reach_its_controller_through_the_task_environment(ray_local, monkeypatch):
    """Ray Train's controller polled its workers every 2 s: each attempt's end waited up to that long to be seen. Ours
    ride in a data-parallel task's runtime environment, from which Ray Train hands them to its controller and workers;
    a value set where the launcher runs wins."""
    import ray
    from ray.train.v2._internal.constants import get_env_vars_to_propagate

    from sweep.task import RAY_TRAIN_ENV, WORKER_ENV, data_parallel_env

    key = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
    assert float(RAY_TRAIN_ENV[key]) < 2.0

    @ray.remote(num_cpus=0)
    def propagated():
        return get_env_vars_to_propagate().get(key), {k: os.environ.get(k) for k in WORKER_ENV}

    monkeypatch.delenv(key, raising=False)
    assert ray.get(propagated.options(runtime_env={"env_vars": data_parallel_env()}).remote()) == (RAY_TRAIN_ENV[key], WORKER_ENV)
    monkeypatch.setenv(key, "3")
    assert data_parallel_env()[key] == "3"


def test_workers_refuse_to_start_without_nccl_settings(monkeypatch):
    from sweep.task import WORKER_ENV, check_worker_env

    for key, value in WORKER_ENV.items():
        monkeypatch.setenv(key, value)
    check_worker_env()
    monkeypatch.delenv("NCCL_NVLS_ENABLE")
    with pytest.raises(RuntimeError, match="NCCL_NVLS_ENABLE=0"):
        check_worker_env()



#: One of two gloo ranks training a tiny run (argv: rank, port, checkpoint folder). Rank 1's clock runs 1000 s ahead at
#: every reading, so that rank alone finds a timed checkpoint due, as a rank does now and then when the time passes
#: between two ranks' reads. A script, not a function: a spawned child would import this module and Ray with it.
FAST_CLOCK_RANK = """
import os, sys, time
from datetime import timedelta
from types import SimpleNamespace
import torch.distributed as dist
import models.train as train
from sweep.spec import RunSpec
rank, port, ckpt_dir = int(sys.argv[1]), sys.argv[2], sys.argv[3]
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=5))
if rank == 1:
    readings = iter(range(10**9))
    train.time = SimpleNamespace(perf_counter=lambda: time.perf_counter() + 1000.0 * next(readings))
run = RunSpec(arch="lightning", d_model=32, n_layers=2, n_heads=2, hybrid="", vocab_size=260, seq_len=32, batch_size=4,
              tokens=4 * 32 * 3, lr=3e-3, warmup=1, schedule="cosine", min_lr_ratio=0.1, weight_decay=0.1, grad_clip=1.0,
              seed=0, data="stdlib")
train.pretrain(run, lambda kind, payload: None, ckpt_dir, device="cpu", ckpt_every_steps=0, ckpt_every_s=60.0)
dist.destroy_process_group()
"""


def test_ranks_agree_on_a_timed_checkpoint(tmp_path):
    """Each rank had decided a timed checkpoint on its own clock: ranks that disagreed entered different collectives
    and hung (a long data-parallel run, checkpointed every 10 minutes)."""
    import socket
    import subprocess
    import sys
    from pathlib import Path

    from models.train import checkpoint_steps

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", FAST_CLOCK_RANK, str(rank), str(port), str(tmp_path)], cwd=root,
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for rank in range(2)]
    errors = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errors
    assert checkpoint_steps(tmp_path) == [3]  # rank 0's decision: no timed checkpoint before the last step
