"""Tokens/s and MFU of a run, one worker and data parallel: the global tokens over all the time of its steps.

On CUDA the host only queues a step. Data parallel, ``_agree`` reads a broadcast back after every step, which waits
for the GPU to finish that step; the step's clock was read before it, so that tail was in no step's time (2.78x
on two H200s against one). Here a sleep in ``_agree`` stands in for that wait.
"""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import models.train as train
from sweep.spec import RunSpec

ROOT = Path(__file__).resolve().parents[2]
WAIT_S = 0.1  # what _agree's read-back waits for the GPU, per step: far above a tiny CPU step

# MQAR: no corpus to read in each rank (seconds); the final validation loss still beats a uniform guess (4.08 < 4.16).
RUN = dict(arch="softmax", d_model=32, n_layers=2, n_heads=2, hybrid="", vocab_size=64, seq_len=32, batch_size=8,
           tokens=8 * 32 * 4, lr=1e-2, warmup=1, schedule="cosine", min_lr_ratio=0.1, weight_decay=0.1, grad_clip=1.0,
           seed=0, data="mqar", evals=(), eval_every=0)


def _check_windows(reports: list[tuple[float, dict]], tokens_per_step: int, summary_tps: float) -> None:
    """Each step's tokens/s against the time from the report before it to its own (all of it the steps'), and the
    Summary's against the windows'."""
    assert [p["step"] for _, p in reports] == list(range(1, len(reports) + 1))
    for (t_before, _), (t, p) in zip(reports, reports[1:]):
        interval = t - t_before
        # It was 2.3 before: the wait was outside every window.
        assert 0.8 <= p["tokens_per_s"] * interval / tokens_per_step <= 1.25, (p["step"], p["tokens_per_s"], interval)
    train_s = sum(tokens_per_step / p["tokens_per_s"] for _, p in reports)
    assert summary_tps == pytest.approx(len(reports) * tokens_per_step / train_s, rel=1e-9)


@pytest.fixture
def one_thread():
    """Single-threaded, as the gloo ranks are: two threads on a busy two-core host made a step take seconds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_one_worker_counts_the_time_between_its_steps(tmp_path, monkeypatch, one_thread):
    """Alone, the time between steps too is the step's: the GPU runs the queued step while the host is there."""
    agree = train._agree

    def waiting(*args):
        time.sleep(WAIT_S)
        return agree(*args)

    monkeypatch.setattr(train, "_agree", waiting)
    run = RunSpec(**RUN)
    reports = []

    def report(kind, payload):
        if kind == "train":
            reports.append((time.perf_counter(), payload))

    summary = train.pretrain(run, report, tmp_path, device="cpu", microbatch=2)
    _check_windows(reports, run.batch_size * run.seq_len, summary.tokens_per_s)


#: One of two gloo ranks training RUN (argv: rank, port, checkpoint folder, the spec's JSON, WAIT_S); rank 0 prints its
#: train reports with the time each came, and its Summary's tokens/s.
WAITING_RANK = """
import json, os, sys, time
from datetime import timedelta
import torch, torch.distributed as dist
import models.train as train
from sweep.spec import RunSpec
torch.set_num_threads(1)
rank, port, ckpt_dir, spec = int(sys.argv[1]), sys.argv[2], sys.argv[3], RunSpec.from_json(sys.argv[4])
wait_s = float(sys.argv[5])
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=30))
agree = train._agree
def waiting(*args):
    time.sleep(wait_s)
    return agree(*args)
train._agree = waiting
reports = []
def report(kind, payload):
    if kind == "train": reports.append((time.perf_counter(), payload))
summary = train.pretrain(spec, report, ckpt_dir, device="cpu", microbatch=2)
if rank == 0:
    print("REPORTS " + json.dumps({"reports": reports, "tokens_per_s": summary.tokens_per_s}))
dist.destroy_process_group()
"""


def test_two_workers_count_the_global_batch_over_the_whole_step(tmp_path):
    """Rank 0 counts the global batch (each rank trains half of it, in the same step) over the step's whole time."""
    run = RunSpec(**RUN)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", WAITING_RANK, str(rank), str(port), str(tmp_path),
                               run.canonical_json(), str(WAIT_S)], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outs]
    [line] = [x for x in outs[0][0].splitlines() if x.startswith("REPORTS ")]
    got = json.loads(line[len("REPORTS "):])
    _check_windows([tuple(r) for r in got["reports"]], run.batch_size * run.seq_len, got["tokens_per_s"])


@pytest.mark.parametrize("world", [1, 2, 4])
def test_mfu_is_of_every_gpu_the_run_trains_on(world):
    """A data-parallel run's MFU was its global FLOP/s over one GPU's peak: 112% on two H200s."""
    assert train.peak_flops(torch.device("cuda", 0), world) == world * train.PEAK_FLOPS_CUDA
    assert train.peak_flops(torch.device("cpu"), world) is None
