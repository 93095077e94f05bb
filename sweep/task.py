"""What runs inside a Ray worker: one run's training, streaming its events to the driver's sink.

The worker never touches the database: it batches ``(run_id, attempt, kind, payload)`` events to the
``EventSink`` actor about once a second, and the driver (the one writer) drains and writes them.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import ray

#: Seconds between event flushes from a worker to the sink.
FLUSH_S = 1.0
#: Environment variables every worker gets (NVLink multicast off: see the device notes and issue 10).
WORKER_ENV = {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}


@ray.remote(num_cpus=0)
class EventSink:
    """Collects events from every running task; the driver drains it. Also carries the stop request."""

    def __init__(self) -> None:
        self.events: list[tuple] = []
        self.stop = False

    def put(self, events: list[tuple]) -> bool:
        """Append a batch of events; returns whether the driver asked runs to stop."""
        self.events.extend(events)
        return self.stop

    def drain(self) -> list[tuple]:
        """Hand over (and forget) everything collected so far."""
        events, self.events = self.events, []
        return events

    def request_stop(self) -> None:
        """Ask running tasks to checkpoint and stop at their next step."""
        self.stop = True


#: Event kinds kept in a run's journal and replayed when it resumes.
JOURNALED = ("train", "val", "eval")


class Reporter:
    """The ``reporter(kind, payload)`` callback given to ``pretrain``: batches events to the sink.

    Every result event is also appended (and flushed) to ``journal``, a JSON-lines file beside the run's
    checkpoints, before training moves on. A run resumed after its launcher died replays the journal, so
    the steps that the dead launcher never received (between its last drain and the newest checkpoint)
    still reach the database.
    """

    def __init__(self, sink, run_id: str, attempt: int, journal: Path | None = None):
        self.sink, self.run_id, self.attempt = sink, run_id, attempt
        self.buffer: list[tuple] = []
        self.last_flush = time.monotonic()
        self.stop_requested = False
        self.journal = journal

    def replay(self) -> int:
        """Send the journal's events of earlier attempts again (the writer upserts them); returns how many."""
        if self.journal is None or not self.journal.exists():
            return 0
        count = 0
        with open(self.journal) as fh:
            for line in fh:
                try:
                    kind, payload = json.loads(line)
                except ValueError:
                    continue  # a line cut short by a kill
                self.buffer.append((self.run_id, self.attempt, kind, payload))
                count += 1
                if len(self.buffer) >= 1000:
                    self.flush()
        self.flush()
        return count

    def __call__(self, kind: str, payload: dict) -> None:
        if self.journal is not None and kind in JOURNALED:
            with open(self.journal, "a") as fh:
                fh.write(json.dumps([kind, payload]) + "\n")
        self.buffer.append((self.run_id, self.attempt, kind, payload))
        if time.monotonic() - self.last_flush >= FLUSH_S or kind in ("ckpt", "val"):
            self.flush()

    def flush(self) -> None:
        """Send what is buffered (synchronously, so nothing is lost if the task ends next)."""
        if self.buffer:
            self.stop_requested = ray.get(self.sink.put.remote(self.buffer)) or self.stop_requested
            self.buffer = []
        self.last_flush = time.monotonic()

    def should_stop(self) -> bool:
        """True once the driver asked for a graceful stop (polled by ``pretrain`` every step)."""
        if time.monotonic() - self.last_flush >= FLUSH_S:
            self.flush()
        return self.stop_requested


@contextmanager
def run_lock(ckpt_dir: Path, timeout_s: float = 120.0) -> Iterator[None]:
    """Hold an exclusive lock on a run's checkpoint folder, so an orphaned worker of a dead driver and its
    replacement never write checkpoints of the same run at once."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    with open(ckpt_dir / ".lock", "w") as fh:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"checkpoint folder {ckpt_dir} is locked by another process") from None
                time.sleep(0.5)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _device(cpu: bool) -> tuple[str, str | None]:
    if cpu:
        return "cpu", None
    import torch

    if not torch.cuda.is_available():
        return "cpu", None
    ids = ray.get_gpu_ids()
    name = torch.cuda.get_device_name(0)
    return "cuda", f"{name} (gpu {','.join(str(i) for i in ids)})" if ids else name


def train_run(
    spec_dict: dict, sink, attempt: int, ckpt_root: str, cpu: bool, microbatch: int | None, fault: str | None,
    ckpt_every_steps: int, ckpt_every_s: float,
) -> dict:
    """Train one run to completion inside a worker and return its summary as a dict."""
    import torch

    from models.train import pretrain
    from sweep.spec import RunSpec

    spec = RunSpec.from_dict(spec_dict)
    threads = int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1)) or 1
    torch.set_num_threads(max(1, threads))
    device, gpu = _device(cpu)
    ckpt_dir = Path(ckpt_root) / spec.run_id
    reporter = Reporter(sink, spec.run_id, attempt, journal=ckpt_dir / "events.jsonl")
    reporter("start", {"host": socket.gethostname(), "gpu": gpu, "pid": os.getpid()})
    try:
        with run_lock(ckpt_dir):
            reporter.replay()
            summary = pretrain(
                spec, reporter, ckpt_dir, device=device, microbatch=microbatch,
                should_stop=reporter.should_stop, fault=fault,
                ckpt_every_steps=ckpt_every_steps, ckpt_every_s=ckpt_every_s,
            )
    finally:
        reporter.flush()
    return dataclasses.asdict(summary)
