"""What runs inside a Ray worker: one run's training, streaming its events to the driver's sink.

The worker never touches the database: it batches ``(run_id, attempt, kind, payload)`` events to the
``EventSink`` actor about once a second, and the driver (the one writer) drains and writes them.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import logging
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
                # Marked, so that the progress view counts it as earlier work, not as this attempt's speed.
                self.buffer.append((self.run_id, self.attempt, kind, {**payload, "replayed": True}))
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


#: Seconds beyond a lease and a heartbeat that a worker waits for its run's checkpoint folder: time for the
#: launcher that lost the run to force-stop the orphaned worker holding the folder, and for that worker to end.
LOCK_MARGIN_S = 10.0


def lock_wait(lease_s: float, heartbeat_s: float) -> float:
    """Seconds a worker waits for its run's checkpoint folder: a launcher that lost the run stops the worker holding
    it at its first heartbeat after the lease lapsed (or, the database away, after retrying for one lease)."""
    return lease_s + heartbeat_s + LOCK_MARGIN_S


@contextmanager
def run_lock(ckpt_dir: Path, timeout_s: float) -> Iterator[None]:
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
                    raise TimeoutError(
                        f"checkpoint folder {ckpt_dir} is still locked after {timeout_s:.0f} s: a worker of another "
                        "launcher still trains this run") from None
                time.sleep(min(0.5, timeout_s / 4))
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def checkpointed_runs(ckpt_root: str, run_ids: list[str]) -> list[str]:
    """Those of ``run_ids`` whose folder under ``ckpt_root`` holds a checkpoint file. Run by the driver, or as a Ray
    task where only the cluster's workers see the folder."""
    from models.train import checkpoint_steps

    root = Path(ckpt_root)
    # A folder of checkpoints all set aside as corrupt counts: training refuses it with its own clear error.
    return [r for r in run_ids if checkpoint_steps(root / r) or any((root / r).glob("ckpt-*.pt.corrupt"))]


def check_worker_env() -> None:
    """Refuse to train in a worker that did not get ``WORKER_ENV`` through Ray's runtime environment."""
    missing = {k: v for k, v in WORKER_ENV.items() if os.environ.get(k) != v}
    if missing:
        raise RuntimeError(f"worker started without its runtime environment: {', '.join(f'{k}={v}' for k, v in missing.items())}")


def _prepare_worker(cpu: bool, threads: int | None = None) -> tuple[str, str | None]:
    """Check the worker's environment, use ``threads`` (default: the CPUs Ray assigned), and pick the device
    (and its GPU label)."""
    import torch

    check_worker_env()
    threads = threads or int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1)) or 1
    torch.set_num_threads(max(1, threads))
    return _device(cpu)


def _gpu_ids() -> list[str]:
    """The GPUs Ray gave this task (as it numbers them), also where no CUDA is present."""
    return [str(i) for i in ray.get_gpu_ids()]


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
    ckpt_every_steps: int, ckpt_every_s: float, threads: int | None = None, *, lock_wait_s: float,
) -> dict:
    """Train one run to completion inside a worker and return its summary as a dict."""
    from models.train import pretrain
    from sweep.spec import RunSpec

    spec = RunSpec.from_dict(spec_dict)
    device, gpu = _prepare_worker(cpu, threads)
    ckpt_dir = Path(ckpt_root) / spec.run_id
    reporter = Reporter(sink, spec.run_id, attempt, journal=ckpt_dir / "events.jsonl")
    reporter("start", {"host": socket.gethostname(), "gpu": gpu, "gpu_ids": _gpu_ids(), "pid": os.getpid()})
    try:
        with run_lock(ckpt_dir, lock_wait_s):
            reporter.replay()
            summary = pretrain(
                spec, reporter, ckpt_dir, device=device, microbatch=microbatch,
                should_stop=reporter.should_stop, fault=fault,
                ckpt_every_steps=ckpt_every_steps, ckpt_every_s=ckpt_every_s,
            )
    finally:
        reporter.flush()
    return dataclasses.asdict(summary)


def train_pack(
    spec_dicts: list[dict], sink, attempts: list[int], ckpt_root: str, cpu: bool, microbatch: int | None,
    faults: list[str | None], ckpt_every_steps: int, ckpt_every_s: float, share: float, threads: int | None = None,
    *, lock_wait_s: float,
) -> list:
    """Train several same-shape runs as one stacked model (``models.packed``) inside a worker; returns per
    run its summary dict, or the ``Diverged`` / ``Interrupted`` that ended it."""
    from contextlib import ExitStack

    from models.packed import pretrain_pack
    from sweep.spec import RunSpec

    specs = [RunSpec.from_dict(d) for d in spec_dicts]
    device, gpu = _prepare_worker(cpu, threads)
    dirs = [Path(ckpt_root) / s.run_id for s in specs]
    reporters = [Reporter(sink, s.run_id, a, journal=d / "events.jsonl") for s, a, d in zip(specs, attempts, dirs)]
    for r in reporters:
        r("start", {"host": socket.gethostname(), "gpu": gpu, "gpu_ids": _gpu_ids(), "pid": os.getpid(), "pack": len(specs)})
    stop = reporters[0].should_stop
    try:
        with ExitStack() as locks:
            for d in dirs:
                locks.enter_context(run_lock(d, lock_wait_s))
            for r in reporters:
                r.replay()
            results = pretrain_pack(
                specs, reporters, dirs, device=device, microbatch=microbatch, share=share,
                should_stop=lambda: stop() or any(r.stop_requested for r in reporters), faults=faults,
                ckpt_every_steps=ckpt_every_steps, ckpt_every_s=ckpt_every_s,
            )
    finally:
        for r in reporters:
            r.flush()
    return [r if isinstance(r, Exception) else dataclasses.asdict(r) for r in results]


#: Ray Train settings for a data-parallel run's task, unless the launching shell sets them: Ray Train hands them on from
#: the task to its controller and workers. Its controller polled the workers every 2 s, so each attempt's end or failure
#: waited that long to be seen (hangs keep Ray's own 10-minute timeout).
RAY_TRAIN_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}


def data_parallel_env() -> dict[str, str]:
    """Environment variables of a data-parallel run's task: ``WORKER_ENV`` and ``RAY_TRAIN_ENV``, a value this
    process's environment sets for the latter winning."""
    return {**WORKER_ENV, **{key: os.environ.get(key, value) for key, value in RAY_TRAIN_ENV.items()}}


#: The logger of Ray Train's placement-group cleaner. Without Ray's dashboard (ray is installed without its [default]
#: extra, and local Rays start without one) it cannot reach Ray's state API, and warned so about once a second for a
#: data-parallel run's whole length: 9 to 11 lines in a 33 s CPU run.
PG_CLEANER_LOGGER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"


def quiet_ray_train_logs() -> None:
    """Silence Ray Train's placement-group cleaner below errors: Ray runs this in each worker process of a launch's job
    as it starts (``WORKER_SETUP_HOOK``), Ray Train's included."""
    logging.getLogger(PG_CLEANER_LOGGER).setLevel(logging.ERROR)


#: ``ray.init``'s worker_process_setup_hook for a launch (a hook given to one task's runtime environment is not run).
WORKER_SETUP_HOOK = "sweep.task.quiet_ray_train_logs"


def data_parallel_workers(spec_gpus: float) -> int:
    """How many workers a run trains on: an integer ``gpus`` above 1 means that many data-parallel workers."""
    return int(spec_gpus) if spec_gpus > 1 else 1


def _dp_worker(config: dict) -> None:
    """One Ray Train worker of a data-parallel run: the same ``pretrain``, rank 0 reporting for the run."""
    import ray.train
    import torch

    from models.train import pretrain
    from sweep.spec import RunSpec

    check_worker_env()  # NCCL settings reach every data-parallel worker, or it does not train
    spec = RunSpec.from_dict(config["spec"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(config["threads"])
    if config["cpu"] or not torch.cuda.is_available():
        device = "cpu"
    else:
        import ray.train.torch

        device = str(ray.train.torch.get_device())
    reporter = Reporter(config["sink"], spec.run_id, config["attempt"], journal=Path(config["ckpt_dir"]) / "events.jsonl")
    if rank == 0:  # the run's record says how it was trained: how many workers, and DDP or FSDP
        from models.train import use_fsdp

        how = "FSDP" if use_fsdp(spec.model_config(), torch.device(device), config["fsdp_min_params"]) else "DDP"
        where = "CPU workers" if device == "cpu" else f"x {torch.cuda.get_device_name(device)}"
        reporter("start", {"host": socket.gethostname(), "gpu": f"{world} {where} (Ray Train, {how})", "pid": os.getpid()})
    summary = pretrain(
        spec, reporter, config["ckpt_dir"], device=device, microbatch=config["microbatch"],
        should_stop=reporter.should_stop, fault=config["fault"] if rank == world - 1 else None,
        ckpt_every_steps=config["ckpt_every_steps"], ckpt_every_s=config["ckpt_every_s"],
        fsdp_min_params=config["fsdp_min_params"],
    )
    if rank == 0:
        reporter.flush()
        # The coordinator reads the summary from the run's folder (Ray Train's result carries no metrics
        # unless a checkpoint goes with them, and ours are our own).
        path = Path(config["ckpt_dir"]) / "summary.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(dataclasses.asdict(summary)))
        tmp.replace(path)
    ray.train.report({"step": summary.steps})


def train_run_dp(
    spec_dict: dict, sink, attempt: int, ckpt_root: str, cpu: bool, microbatch: int | None, fault: str | None,
    ckpt_every_steps: int, ckpt_every_s: float, cpus_per_worker: int = 1, fsdp_min_params: float | None = None,
    *, lock_wait_s: float,
) -> dict:
    """Train one run data-parallel on ``gpus`` workers with Ray Train (DDP, or FSDP for large models; gloo on
    CPU, NCCL on GPUs).

    Runs as a light Ray task that drives a ``TorchTrainer``; worker failures surface as the first worker's
    exception, so the launcher classifies them (diverged, out of memory, crash) as for one-GPU runs.
    """
    from ray.train import FailureConfig, RunConfig, ScalingConfig, TrainingFailedError
    from ray.train.torch import TorchConfig, TorchTrainer

    from sweep.spec import RunSpec

    spec = RunSpec.from_dict(spec_dict)
    workers = data_parallel_workers(spec.gpus)
    ckpt_dir = Path(ckpt_root) / spec.run_id
    coordinator = Reporter(sink, spec.run_id, attempt, journal=ckpt_dir / "events.jsonl")
    coordinator("start", {"host": socket.gethostname(), "gpu": f"{workers} {'CPU workers' if cpu else 'GPUs'} (Ray Train)", "pid": os.getpid()})
    coordinator.flush()  # now, so that rank 0's own "start" (saying DDP or FSDP) comes after it
    config = {
        "spec": spec_dict, "sink": sink, "attempt": attempt, "ckpt_dir": str(ckpt_dir), "cpu": cpu,
        "microbatch": microbatch, "fault": fault, "ckpt_every_steps": ckpt_every_steps, "ckpt_every_s": ckpt_every_s,
        "threads": cpus_per_worker, "fsdp_min_params": fsdp_min_params,
    }
    trainer = TorchTrainer(
        _dp_worker,
        train_loop_config=config,
        torch_config=TorchConfig(backend="gloo" if cpu else "nccl"),
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=not cpu, resources_per_worker={"CPU": cpus_per_worker}),
        run_config=RunConfig(
            name=f"{spec.run_id}-attempt{attempt}", storage_path=str(Path(ckpt_root).resolve() / ".ray_train"),
            failure_config=FailureConfig(max_failures=0),  # the launcher retries, from our own checkpoints
        ),
    )
    with run_lock(ckpt_dir, lock_wait_s):
        coordinator.replay()
        (ckpt_dir / "summary.json").unlink(missing_ok=True)
        try:
            trainer.fit()
        except TrainingFailedError as exc:
            failures = getattr(exc, "worker_failures", None) or {}
            if failures:
                raise failures[min(failures)] from None
            raise
    coordinator.flush()
    return json.loads((ckpt_dir / "summary.json").read_text())
