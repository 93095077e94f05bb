"""The training loop: ``pretrain(spec, reporter, ckpt_dir)`` trains one run, resumably.

``spec`` is any object with the ``RunSpec`` attributes (arch, d_model, n_layers, n_heads, hybrid,
vocab_size, seq_len, batch_size, tokens, lr, warmup, schedule, min_lr_ratio, weight_decay, grad_clip,
seed, data, evals, eval_every, and ``steps``); ``models`` never imports ``sweep``.

Optimiser: AdamW, betas (0.9, 0.95), fused on CUDA. Weight decay applies to matrices and the conv filter
(parameters with 2+ dimensions) except the token embedding; norms, biases, the Mamba2 SSM scalars
(A_log, D, dt_bias) and the embedding are not decayed. Learning rate: linear warmup over ``warmup`` steps,
then ``cosine`` to ``min_lr_ratio * lr``, ``wsd`` (constant, then a linear decay to ``min_lr_ratio * lr``
over the last 20% of steps) or ``constant``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from models.config import ModelConfig, count_params, flops_per_token
from models.data import Batches, open_data
from models.evals import EVALS, autocast, check_evals, run_evals, validation_loss
from models.lm import LM

log = logging.getLogger(__name__)

BETAS = (0.9, 0.95)
#: Peak dense bf16 FLOP/s used for MFU on CUDA (H100 SXM datasheet; about 785e12 is reached in practice).
PEAK_FLOPS_CUDA = 989e12
#: Microbatch cap on CPU.
CPU_MICROBATCH = 16
WSD_DECAY_FRACTION = 0.2
#: Bytes of activations kept for the backward pass per token, per layer, per unit of d_model, under bf16
#: autocast: about 1.3x what a forward+backward peaked at on an H100 (softmax 55, lightning 63, HGRN2 80,
#: Mamba2 77; d 768-1024, T 2048-4096, measured with torch.cuda.max_memory_allocated), for the default microbatch.
ACT_BYTES_PER_D = {"S": 70, "L": 80, "H": 100, "M": 100}
#: Train reports per run at most about this many points (plus the first and last step).
MAX_TRAIN_REPORTS = 1000

#: Inductor settings every torch.compile of training takes, where this torch has them (a key it lacks is left out).
INDUCTOR_OPTIONS = {
    # The norms' backward, which inductor makes one mixed-order reduction (dx along each row, dweight down the rows),
    # with its loads pipelined: off by default in torch 2.11, on in later ones. Lightning 135M on an H200, alternated
    # in two calls: 697.8k / 699.5k tokens/s against 692.2k / 692.7k without, and 698.8k / 700.3k against 688.4k /
    # 690.1k (docs/bench/kernels.md); softmax unchanged.
    "triton.mix_order_reduction_allow_multi_stages": True,
}

_CKPT = re.compile(r"^ckpt-(\d{9})\.pt$")
#: The file in a run's folder that records its divergence (``record_divergence``).
DIVERGED_FILE = "diverged.json"


class TrainingError(Exception):
    """A run stopped before its last step; ``step`` is the step it was at."""

    def __init__(self, step: int, *args):
        super().__init__(step, *args)
        self.step = step


class Diverged(TrainingError):
    """The run blew up at ``step``: a NaN/inf loss, gradient or validation loss, or it ended having learned nothing."""

    def __init__(self, step: int, reason: str = "the loss, the gradients or the validation loss became NaN or inf"):
        super().__init__(step, reason)
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.reason} at step {self.step}"


def rejected_validation(val_loss: float | None, vocab_size: int, final: bool) -> str | None:
    """Why a validation loss makes the run diverged (NaN/inf; at the end, no better than ln V), or None.

    A ``val_loss`` of None (no labelled validation token: nothing was scored) rejects nothing."""
    if val_loss is None:
        return None
    if not math.isfinite(val_loss):
        return "the validation loss became NaN or inf"
    uniform = math.log(vocab_size)
    if final and val_loss >= uniform:
        # A uniform guess scores ln V. A run may blow up and recover (on the tiny test models, lr 3 spent half its
        # steps above 2 ln V and still ended near lr 0.1's loss), so only the end decides that nothing was learned.
        return f"the final validation loss {val_loss:.4g} is no better than a uniform guess's (ln {vocab_size} = {uniform:.4g})"
    return None


class OutOfMemory(TrainingError):
    """CUDA ran out of memory at ``step`` with ``microbatch`` sequences per forward pass."""

    def __init__(self, step: int, microbatch: int):
        super().__init__(step, microbatch)
        self.microbatch = microbatch

    def __str__(self) -> str:
        return f"CUDA out of memory at step {self.step} with microbatch {self.microbatch}"


class CheckpointUnreadable(RuntimeError):
    """A run's folder holds checkpoints, but none loads: the run neither resumes nor silently starts over."""


class Unlabelled(ValueError):
    """No training step of the run had a labelled token (every target -100): it learned nothing and has no loss."""

    @classmethod
    def of_run(cls, data: str, total_steps: int) -> Unlabelled:
        """The error for a run on ``data`` whose ``total_steps`` steps held no labelled token (lone or packed)."""
        return cls(f"no training step of the run had a labelled token (every target -100 in all {total_steps} "
                   f"steps): it learned nothing and has no loss; check the data {data!r}")


class Interrupted(TrainingError):
    """``should_stop()`` asked the run to stop; it checkpointed at ``step`` first."""

    def __str__(self) -> str:
        return f"interrupted at step {self.step} (checkpoint written)"


@dataclass(frozen=True)
class Summary:
    """What a finished run reports. ``wall_s`` adds up every attempt; ``tokens_per_s`` is this attempt's."""

    steps: int
    tokens: int
    flops: float
    final_loss: float
    val_loss: float | None  # None where no validation sequence holds a labelled token
    params: int
    nonembed_params: int
    wall_s: float
    tokens_per_s: float
    data_sha256: str
    microbatch: int
    resumed_from_step: int  # 0 for a fresh start


def model_config(spec) -> ModelConfig:
    """The ``ModelConfig`` of a spec-like object."""
    return ModelConfig(spec.arch, spec.d_model, spec.n_layers, spec.n_heads, spec.vocab_size, spec.hybrid)


def lr_at(step: int, spec) -> float:
    """Learning rate for optimizer step ``step`` (1-based) under the spec's warmup and schedule."""
    total, warmup, peak = spec.steps, spec.warmup, spec.lr
    low = peak * spec.min_lr_ratio
    if step <= warmup:
        return peak * step / warmup
    if spec.schedule == "constant":
        return peak
    if spec.schedule == "cosine":
        progress = (step - warmup) / max(1, total - warmup)
        return low + 0.5 * (peak - low) * (1 + math.cos(math.pi * min(1.0, progress)))
    if spec.schedule == "wsd":
        # at least one decaying step, so that a short run ends at min_lr as cosine does (2 steps: round(0.4) = 0)
        decay_start = max(warmup, total - max(1, round(WSD_DECAY_FRACTION * total)))
        if step <= decay_start:
            return peak
        return low + (peak - low) * max(0, total - step) / (total - decay_start)
    raise ValueError(f"unknown schedule {spec.schedule!r}: expected cosine, wsd or constant")


SCHEDULES = ("cosine", "wsd", "constant")


def check_spec(spec) -> None:
    """Fail now, not at the first eval or after the warmup, on an unknown eval or schedule, or an optimisation
    setting no run can train with (a learning rate or warmup that is not a number of its range, and the like)."""
    for name in spec.evals:
        if name not in EVALS:
            raise ValueError(f"unknown eval {name!r}: expected one of {', '.join(EVALS)}")
    # Asked of the spec itself: lr_at(1) returns during the warmup before it looks at the schedule.
    if spec.schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {spec.schedule!r}: expected cosine, wsd or constant")
    ranges = (
        ("lr", spec.lr, lambda v: 0 < v < math.inf, "a positive finite number"),
        ("warmup", spec.warmup, lambda v: 0 <= v < math.inf, "a number of steps >= 0"),
        ("min_lr_ratio", spec.min_lr_ratio, lambda v: 0 <= v <= 1, "a number in [0, 1]"),
        ("weight_decay", spec.weight_decay, lambda v: 0 <= v < math.inf, "a finite number >= 0"),
        ("grad_clip", spec.grad_clip, lambda v: v >= 0, "a number >= 0 (0: no clipping)"),
        ("eval_every", spec.eval_every, lambda v: v >= 0, "a number of steps >= 0 (0: at the end only)"),
    )
    for name, value, ok, expected in ranges:
        if not ok(value):  # NaN fails every comparison
            raise ValueError(f"{name} must be {expected}, got {value!r}")
    lr_at(1, spec)


def default_kernels(compiled: bool) -> str:
    """The LM kernels that measured fastest on an H100: "auto" (every fused kernel) in eager mode; compiled, "gemm"
    (the head + loss, and the MLP and lightning's q, k, v SiLU in quack's GEMM epilogues where it is installed)."""
    # Compiled, the fused norms cost more than they save (inductor can no longer fuse them with the adds); the
    # epilogue GEMMs gained 3-6% on 2026-12-07 (softmax, lightning, hybrid; docs/bench/kernels.md).
    return "gemm" if compiled else "auto"


def build_model(cfg: ModelConfig, seed: int, device: torch.device, kernels: str = "torch") -> LM:
    """A freshly initialised model for a run of ``seed``, built on ``device``.

    Initialising on the GPU takes milliseconds where the host's generator takes about 0.1 s per 10M
    parameters, a cost a pack of 16 paid 16 times; the weights then depend on the device type, as they do anyway.
    """
    torch.manual_seed(seed)
    with torch.device(device):
        return LM(cfg, kernels=kernels)


def largest_divisor_at_most(n: int, cap: int) -> int:
    """The largest divisor of ``n`` that is <= ``cap`` (at least 1)."""
    return next(k for k in range(max(1, min(n, cap)), 0, -1) if n % k == 0)


def default_microbatch(
    spec, cfg: ModelConfig, device: torch.device, batch_size: int | None = None, *, members: int = 1,
    share: float | None = None,
) -> int:
    """Sequences per forward pass (a divisor of ``batch_size``, default the spec's): on CUDA from a memory
    estimate for ``members`` stacked copies of the model on a ``share`` of the GPU (default the spec's
    ``gpus``), on CPU at most ``CPU_MICROBATCH``."""
    batch_size = batch_size or spec.batch_size
    if device.type != "cuda":
        return largest_divisor_at_most(batch_size, CPU_MICROBATCH)
    free, total = torch.cuda.mem_get_info(device)
    # A run packed on a GPU share (gpus < 1) plans for its share of the card, not for what is free now.
    share = min(1.0, float(share or getattr(spec, "gpus", 1.0) or 1.0))
    budget = 0.85 * min(free, share * total) - members * state_bytes(cfg)
    per_seq = members * activation_bytes_per_seq(cfg, spec.seq_len)
    return largest_divisor_at_most(batch_size, max(1, int(budget // per_seq)))


def state_bytes(cfg: ModelConfig) -> int:
    """GPU bytes of a model's training state: fp32 weights, gradients and AdamW's two moments."""
    return 16 * count_params(cfg).total


def activation_bytes_per_seq(cfg: ModelConfig, seq_len: int) -> int:
    """Estimated GPU bytes one training sequence needs for its activations, logits included (bf16 autocast)."""
    per_token = sum(ACT_BYTES_PER_D[kind] * cfg.d_model for kind in cfg.layer_kinds)
    return seq_len * (per_token + 14 * cfg.vocab_size)  # + bf16 logits, their fp32 copy and gradient


def decayed(name: str, ndim: int) -> bool:
    """Whether AdamW decays the parameter ``name`` of ``ndim`` dimensions (matrices and filters, not the embedding)."""
    return ndim >= 2 and name != "embed.weight"


def _param_groups(model: LM, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if decayed(name, p.dim()) else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


#: A data-parallel run shards its model with FSDP when its training state (``state_bytes``) would take more
#: than this share of one GPU's memory, leaving too little for activations; below it, DDP is faster.
FSDP_STATE_SHARE = 0.5


def use_fsdp(cfg: ModelConfig, device: torch.device, min_params: float | None = None) -> bool:
    """Whether a data-parallel run of ``cfg`` shards with FSDP: at ``min_params`` parameters or more when given,
    else when its training state passes ``FSDP_STATE_SHARE`` of the GPU's memory (never by default on CPU)."""
    params = count_params(cfg).total
    if min_params is not None:
        return params >= min_params
    if device.type != "cuda":
        return False
    return state_bytes(cfg) > FSDP_STATE_SHARE * torch.cuda.get_device_properties(device).total_memory


def _fully_shard(model: LM) -> None:
    """FSDP2: each block its own unit (gathered just for its forward and backward), the rest in the root."""
    from torch.distributed.fsdp import fully_shard

    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)


def _training_state(model: LM, optimizer: torch.optim.Optimizer, sharded: bool) -> tuple[dict, dict]:
    """The model's and optimizer's state dicts, whole, in the format of an unsharded run's checkpoint (so a run
    may resume on another number of GPUs). Under FSDP this gathers, and every rank must call it."""
    if not sharded:
        return model.state_dict(), optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    whole = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state = get_model_state_dict(model, options=whole)
    by_name = get_optimizer_state_dict(model, optimizer, options=whole)
    if not by_name:  # gathered to CPU on rank 0 alone, which is the rank that writes
        return model_state, {}
    # By name -> by position in the param groups, as torch.optim.Optimizer.state_dict() numbers them.
    names = [name for group in by_name["param_groups"] for name in group["params"]]
    index = {name: i for i, name in enumerate(names)}
    groups, offset = [], 0
    for group in by_name["param_groups"]:
        n = len(group["params"])
        groups.append({**group, "params": list(range(offset, offset + n))})
        offset += n
    return model_state, {"state": {index[k]: v for k, v in by_name["state"].items()}, "param_groups": groups}


def _load_training_state(model: LM, optimizer: torch.optim.Optimizer, state: dict, sharded: bool) -> None:
    """Restore a checkpoint's model and optimizer state (written by ``_training_state``) into this run."""
    if not sharded:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    whole = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, state["model"], options=whole)
    param_name = {id(p): name for name, p in model.named_parameters()}
    names = [param_name[id(p)] for group in optimizer.param_groups for p in group["params"]]
    saved = state["optimizer"]
    by_name = {
        "state": {names[i]: v for i, v in saved["state"].items()},
        "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in saved["param_groups"]],
    }
    set_optimizer_state_dict(model, optimizer, by_name, options=whole)


def _no_report(kind: str, payload: dict) -> None:
    """The reporter of data-parallel ranks other than 0."""


def peak_flops(device: torch.device, world: int = 1) -> float | None:
    """Peak bf16 FLOP/s of the ``world`` GPUs a run trains on (MFU's denominator); None off CUDA."""
    return PEAK_FLOPS_CUDA * world if device.type == "cuda" else None


def _dist_rank_world() -> tuple[int, int]:
    """(rank, world size) of an initialised torch.distributed group, else (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _agree(flags: list[bool], world: int, device: torch.device) -> list[bool]:
    """Rank 0's decisions, shared with every rank in one broadcast (so all stop, or checkpoint, at the same step)."""
    if world == 1:
        return flags
    t = torch.tensor([int(f) for f in flags], device=device)
    torch.distributed.broadcast(t, 0)
    return [bool(v) for v in t.tolist()]


def _parse_fault(fault: str | None) -> tuple[str, int] | None:
    if not fault:
        return None
    m = re.fullmatch(r"(nan|nangrad|exit|raise)@(\d+)", fault)
    if not m:
        raise ValueError(f"fault must be 'nan@K', 'nangrad@K', 'exit@K' or 'raise@K', got {fault!r}")
    return m.group(1), int(m.group(2))


# ---------------------------------------------------------------------------------------------------
# Checkpoints


def checkpoint_steps(ckpt_dir: Path) -> list[int]:
    """Steps of the checkpoint files in ``ckpt_dir``, oldest first (complete or not)."""
    if not Path(ckpt_dir).is_dir():
        return []
    return sorted(int(m.group(1)) for f in os.listdir(ckpt_dir) if (m := _CKPT.match(f)))


def checkpoint_path(ckpt_dir: Path, step: int) -> Path:
    """Where the checkpoint of ``step`` lives."""
    return Path(ckpt_dir) / f"ckpt-{step:09d}.pt"


def checksum_path(path: Path) -> Path:
    """The file beside checkpoint ``path`` that holds its sha256 (hex), written once the checkpoint is complete."""
    return Path(path).with_name(Path(path).name + ".sha256")


class _HashingWriter:
    """A binary file that hashes the bytes written to it: a checkpoint's checksum costs no second read."""

    def __init__(self, file):
        self.file, self.sha256 = file, hashlib.sha256()

    def write(self, data) -> int:
        self.sha256.update(data)
        return self.file.write(data)

    def flush(self) -> None:
        self.file.flush()


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(folder: Path) -> None:
    """Make the renames into ``folder`` durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(ckpt_dir: Path, step: int, state: dict, keep: int = 2) -> Path:
    """Write ``state`` atomically (temp file, fsync, rename, fsync dir) with its sha256 beside it (``checksum_path``);
    keep the newest ``keep``."""
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    path = checkpoint_path(ckpt_dir, step)
    side = checksum_path(path)
    tmp = ckpt_dir / f".{path.name}.{os.getpid()}.tmp"
    side_tmp = ckpt_dir / f".{side.name}.{os.getpid()}.tmp"
    for stale in ckpt_dir.glob(".ckpt-*.tmp"):  # left by a writer killed mid-save (one writer per run: its lease)
        stale.unlink(missing_ok=True)
    try:
        with open(tmp, "wb") as f:
            out = _HashingWriter(f)
            torch.save(state, out)
            f.flush()
            os.fsync(f.fileno())
        _write_synced(side_tmp, out.sha256.hexdigest().encode())
    except BaseException:
        # A failed write (a full disk, mostly): its partial file would hold the space until the next save.
        tmp.unlink(missing_ok=True)
        side_tmp.unlink(missing_ok=True)
        raise
    # A checksum of an earlier save of this step must never stand beside the new file; killed between the two
    # renames, the checkpoint is left without a checksum, and loads unchecked as older ones do.
    side.unlink(missing_ok=True)
    os.replace(tmp, path)
    os.replace(side_tmp, side)
    _fsync_dir(ckpt_dir)
    for old in checkpoint_steps(ckpt_dir)[:-keep]:
        checkpoint_path(ckpt_dir, old).unlink(missing_ok=True)
        checksum_path(checkpoint_path(ckpt_dir, old)).unlink(missing_ok=True)
    return path


def verify_checkpoint(path: Path) -> bool:
    """Raise ``CheckpointUnreadable`` naming ``path`` when its bytes are not those its checksum file recorded (a
    truncated or bit-flipped file, which torch.load may read without a complaint); no checksum file, no check (False)."""
    path = Path(path)
    side = checksum_path(path)
    try:
        recorded = side.read_text().strip()
    except FileNotFoundError:  # written before checkpoints carried a checksum
        return False
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    if h.hexdigest() != recorded:
        raise CheckpointUnreadable(f"{path}: its sha256 is {h.hexdigest()[:16]}, not the {recorded[:16]} recorded in "
                                   f"{side.name} when it was written: the file is truncated or corrupt")
    return True


def load_checkpoint(ckpt_dir: Path) -> dict | None:
    """The newest checkpoint that loads completely (and matches its checksum, where it has one), or None where the run
    has none. A corrupt newer one is renamed ``*.corrupt`` (kept, logged, no longer counted among the checkpoints);
    when no checkpoint loads but some were set aside, ``CheckpointUnreadable``; an I/O or memory error is raised, not
    taken for corruption, and so is a failure to load a file that matches its checksum (``CheckpointUnreadable``: its
    bytes are those written, so it is kept where it is)."""
    for step in reversed(checkpoint_steps(ckpt_dir)):
        path = checkpoint_path(ckpt_dir, step)
        verified = False
        try:
            verified = verify_checkpoint(path)
            state = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(state, dict) or state.get("step") != step or "model" not in state:
                raise ValueError("missing fields")
            return state
        except (OSError, MemoryError):  # a shared filesystem's hiccup, a full host: fail this attempt, keep every file
            raise
        except Exception as e:
            if verified:
                # Its bytes are those written: it is not corrupt, and setting it aside would lose a good checkpoint
                # (this host's memory, or a torch that cannot read it, is what failed). Keep it; say why.
                raise CheckpointUnreadable(f"{path} matches the sha256 recorded when it was written, but does not load "
                                           f"here: {type(e).__name__}: {e}; it is kept as it is") from e
            # a truncated or corrupt file: fall back to the previous checkpoint
            log.warning("ignoring unreadable checkpoint %s (renamed *.corrupt): %s", path, e)
            path.replace(path.with_name(path.name + ".corrupt"))
            checksum_path(path).unlink(missing_ok=True)
    # Checkpoints were written but none loads: training from step 0 would quietly spend again every step they held
    # (and a retry, no longer counting the set-aside files, would do so too), so say so and let a person decide.
    set_aside = sorted(p.name for p in Path(ckpt_dir).glob("ckpt-*.pt.corrupt")) if Path(ckpt_dir).is_dir() else []
    if set_aside:
        raise CheckpointUnreadable(f"{ckpt_dir} holds no readable checkpoint, only {', '.join(set_aside)}: remove "
                                   "those files to train the run again from step 0")
    return None


def record_divergence(ckpt_dir: Path, spec, exc: Diverged) -> None:
    """Write durably into the run's folder that it diverged (``recorded_divergence`` reads it back); a failed write is
    logged, not raised. Written when it diverges: a pack that crashes later returns no verdict, and its members are
    retried alone."""
    ckpt_dir = Path(ckpt_dir)
    record = {"run": _run_key(spec), "step": exc.step, "reason": exc.reason}
    tmp = ckpt_dir / f".{DIVERGED_FILE}.{os.getpid()}.{threading.get_ident()}.tmp"
    try:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        _write_synced(tmp, json.dumps(record).encode())
        os.replace(tmp, ckpt_dir / DIVERGED_FILE)
        _fsync_dir(ckpt_dir)
    except OSError as e:
        # The verdict still reaches the launcher with this attempt's Diverged; an OSError in its place (a full disk)
        # would have the run retried as a crash.
        tmp.unlink(missing_ok=True)
        log.warning("could not record the divergence of %s at step %d: %s", ckpt_dir, exc.step, e)


def recorded_divergence(ckpt_dir: Path, spec) -> Diverged | None:
    """The ``Diverged`` recorded in the run's folder (``record_divergence``), or None; ``ValueError`` where the record
    is another run's."""
    path = Path(ckpt_dir) / DIVERGED_FILE
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except ValueError as e:  # written by rename, so never cut short: some other program's file
        raise ValueError(f"{path} is not a divergence record ({e}): remove it to train the run") from None
    if record.get("run") != _run_key(spec):
        raise ValueError(f"{ckpt_dir} holds the divergence of another run ({record.get('run', 'one naming no run')})")
    # Resuming would train on from the last checkpoint before the blow-up, and could get past it (another GPU's
    # rounding, a pack's against a lone run's): the verdict stands until a person removes the record.
    log.warning("%s diverged at step %d in an earlier attempt (%s); remove %s to train it again",
                ckpt_dir, record["step"], record["reason"], path)
    return Diverged(record["step"], record["reason"])


def check_resumable(state: dict, spec, data, ckpt_dir) -> None:
    """Refuse a checkpoint of another run, or one trained on other data than this host's (older ones carry no hash)."""
    # .get: a file of a checkpoint's name without the key (another program's) is not this run's either
    if state.get("run") != _run_key(spec):
        raise ValueError(f"{ckpt_dir} holds checkpoints of another run ({state.get('run', 'one naming no run')})")
    # Older checkpoints hashed the data with its files' paths: one at this path is this data as well.
    if state.get("data_sha256", data.sha256) not in (data.sha256, data.sha256_by_path()):
        raise ValueError(f"{ckpt_dir}: its checkpoint trained on data {state['data_sha256'][:12]}, this host's "
                         f"{spec.data!r} is {data.sha256[:12]} (another Python's stdlib, a changed file, or a folder "
                         "read before its files were joined with newlines): "
                         "resuming would train on other data")


def _run_key(spec) -> str:
    """Identifies the run a checkpoint belongs to (``run_id`` when the spec has one)."""
    run_id = getattr(spec, "run_id", None)
    if run_id:
        return str(run_id)
    fields = ("arch", "d_model", "n_layers", "n_heads", "hybrid", "vocab_size", "seq_len", "batch_size",
              "tokens", "lr", "warmup", "schedule", "min_lr_ratio", "weight_decay", "grad_clip", "seed", "data")
    return repr(tuple(getattr(spec, f) for f in fields))


def compile_model(model: torch.nn.Module, mode: str | None = None) -> torch.nn.Module:
    """torch.compile(model, mode=mode) (None: the default mode) with the INDUCTOR_OPTIONS this torch knows."""
    import torch._inductor
    import torch._inductor.config as inductor_config

    known = inductor_config.get_config_copy()
    # A mode is a named set of options, and torch.compile takes one or the other: the mode's own options are merged.
    options = dict(torch._inductor.list_mode_options(mode or "default"))
    options.update({key: value for key, value in INDUCTOR_OPTIONS.items() if key in known})
    return torch.compile(model, options=options)


# ---------------------------------------------------------------------------------------------------
# The loop


def pretrain(
    spec,
    reporter: Callable[[str, dict], None],
    ckpt_dir: str | os.PathLike,
    *,
    device: str | torch.device | None = None,
    microbatch: int | None = None,
    compile: bool | str = False,
    should_stop: Callable[[], bool] | None = None,
    fault: str | None = None,
    ckpt_every_steps: int = 1000,
    ckpt_every_s: float = 1800.0,
    kernels: str | None = None,
    overlap_readback: bool | None = None,
    fsdp_min_params: float | None = None,
) -> Summary:
    """Train the run ``spec`` describes, resuming from the newest complete checkpoint in ``ckpt_dir``.

    ``reporter(kind, payload)`` gets "resume" {step} first when it resumes, then "train" {step, tokens, flops, loss,
    lr, tokens_per_s, mfu} (``mfu`` None off CUDA), "val" {step, tokens, flops, val_loss}, "eval" {step, name, value}
    and "ckpt" {step}. Checkpoints: every ``ckpt_every_steps`` steps or ``ckpt_every_s`` seconds, on a stop,
    and at the end (the newest two are kept). Raises ``Diverged`` on a NaN/inf loss, gradient or validation
    loss, or a final validation loss no better than a uniform guess's (``rejected_validation``), ``OutOfMemory``
    on CUDA OOM, and ``Interrupted`` (after checkpointing) when ``should_stop()`` returns True. A divergence is
    recorded in ``ckpt_dir`` (``record_divergence``): a later attempt raises the same ``Diverged`` without training.

    A step whose global batch holds no labelled token (every target -100) leaves the weights and the optimizer as
    they were and reports no "train" loss; a data-parallel rank holding none contributes a zero gradient. A run
    none of whose steps had one raises ``Unlabelled`` at the end. Validation text without a labelled token gives
    no "val" report and a ``val_loss`` of None.

    ``fault`` is a test hook: "nan@K" makes the loss of step K NaN, "nangrad@K" its gradients (the loss stays
    finite); "exit@K" ends the process with ``os._exit(1)`` right after checkpointing step K, unless
    ``ckpt_dir`` already held a checkpoint at or beyond K when the run started (so a retry goes on);
    "raise@K" raises a RuntimeError at step K.
    ``kernels``: which parts of the LM shell run fused on CUDA (models.lm.KERNELS); None: ``default_kernels``.
    ``compile``: True for torch.compile's default mode, or a mode by name ("reduce-overhead" replays CUDA graphs).
    ``overlap_readback`` (default: on CUDA) reads each step's loss back only once the next step is queued, so
    the GPU never waits for the CPU; its "train" report, and a ``Diverged``, then come one step later.
    Data parallel (torch.distributed initialised): DDP, or FSDP (``use_fsdp``) for models of at least
    ``fsdp_min_params`` parameters (default: whose training state would fill half a GPU); tokens/s counts the
    global batch, and MFU is of all the workers' GPUs.
    """
    t_start = time.perf_counter()
    ckpt_dir = Path(ckpt_dir)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    on_cuda = device.type == "cuda"
    if on_cuda and device.index is not None:
        # A data-parallel worker trains on cuda:<local rank>; events and streams made without a device (the
        # loss read-back's) must be on that GPU too.
        torch.cuda.set_device(device)
    overlap_readback = on_cuda if overlap_readback is None else overlap_readback
    fault_kind = _parse_fault(fault)
    check_spec(spec)
    earlier = recorded_divergence(ckpt_dir, spec)
    if earlier is not None:
        raise earlier

    cfg = model_config(spec)
    counts = count_params(cfg)
    fpt = flops_per_token(cfg, spec.seq_len)
    total_steps = spec.steps
    tokens_per_step = spec.batch_size * spec.seq_len
    data = open_data(spec.data, spec.vocab_size)
    data.check(spec.seq_len)
    check_evals(spec.evals, data, spec.seq_len, spec.vocab_size)

    # Data parallel (torch.distributed already initialised, e.g. by Ray Train): each rank trains its slice
    # of every global batch; DDP averages the gradients, so the update equals one worker's on the whole batch.
    rank, world = _dist_rank_world()
    if spec.batch_size % world:
        raise ValueError(f"batch_size {spec.batch_size} is not divisible by {world} data-parallel workers")
    local_batch = spec.batch_size // world
    microbatch = microbatch or default_microbatch(spec, cfg, device, batch_size=local_batch)
    if local_batch % microbatch:
        raise ValueError(f"microbatch {microbatch} does not divide the per-worker batch {local_batch}")
    n_micro = local_batch // microbatch
    if rank != 0:
        reporter = _no_report  # rank 0 speaks for the run

    kernels = default_kernels(bool(compile)) if kernels is None else kernels
    model = build_model(cfg, spec.seed, device, kernels)
    sharded = world > 1 and use_fsdp(cfg, device, fsdp_min_params)
    if sharded:  # before the optimizer: fully_shard turns the parameters into shards in place
        _fully_shard(model)
    optimizer = torch.optim.AdamW(
        _param_groups(model, spec.weight_decay), lr=spec.lr, betas=BETAS, fused=True if on_cuda and not sharded else None
    )
    batches = Batches(data, spec.seq_len, microbatch, seed=spec.seed)

    state = load_checkpoint(ckpt_dir)
    start, prior_wall, last_loss = 0, 0.0, float("nan")
    if state is not None:
        check_resumable(state, spec, data, ckpt_dir)
        _load_training_state(model, optimizer, state, sharded)
        batches.load_state_dict(state["data"])
        torch.set_rng_state(state["rng"]["torch"])
        if on_cuda and state["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(state["rng"]["cuda"], device)
        start, prior_wall, last_loss = state["step"], state["wall_s"], state["loss"]
        log.info("resuming %s from step %d", ckpt_dir, start)
        reporter("resume", {"step": start})  # the run's row says so while it trains, not only once it is done
    exit_at = None
    if fault_kind and fault_kind[0] == "exit" and max(checkpoint_steps(ckpt_dir), default=0) < fault_kind[1]:
        exit_at = fault_kind[1]

    step_model, ddp = model, None
    if world > 1 and not sharded:
        from torch.nn.parallel import DistributedDataParallel

        step_model = ddp = DistributedDataParallel(model, device_ids=[device.index] if on_cuda else None)
    mode = compile if isinstance(compile, str) else None
    step_model = compile_model(step_model, mode) if compile else step_model
    cuda_graphs = mode in ("reduce-overhead", "max-autotune")
    report_every = max(1, total_steps // MAX_TRAIN_REPORTS)
    peak = peak_flops(device, world)

    def checkpoint(step: int) -> None:
        model_state, optimizer_state = _training_state(model, optimizer, sharded)  # under FSDP, every rank gathers
        if rank == 0:  # every rank holds the same weights; one writes, all restore from the shared folder
            rng = {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if on_cuda else None}
            save_checkpoint(ckpt_dir, step, {
                "step": step, "run": _run_key(spec), "model": model_state, "optimizer": optimizer_state,
                "data": batches.state_dict(), "rng": rng, "loss": last_loss,
                "wall_s": prior_wall + time.perf_counter() - t_start, "microbatch": microbatch,
                "data_sha256": data.sha256,
            })
            reporter("ckpt", {"step": step})
        if world > 1:
            torch.distributed.barrier()

    def diverged(step: int, *reason: str) -> Diverged:
        """The run's ``Diverged`` at ``step``, recorded in its folder first (by rank 0, as checkpoints are)."""
        exc = Diverged(step, *reason)
        if rank == 0:
            record_divergence(ckpt_dir, spec, exc)
        return exc

    def evaluate(step: int) -> float | None:
        try:
            val = validation_loss(model, data, spec.seq_len, device=device, batch=microbatch)
        except torch.OutOfMemoryError:
            raise OutOfMemory(step, microbatch) from None
        # A model whose loss is finite on its batches but not on held-out text, or that ends no better than a
        # uniform guess, has no result worth fitting.
        reason = rejected_validation(val, spec.vocab_size, final=step == total_steps)
        if reason and not math.isfinite(val):
            raise diverged(step, reason)
        tokens = step * tokens_per_step
        if val is not None:  # None: no labelled validation token, so no loss to record
            reporter("val", {"step": step, "tokens": tokens, "flops": float(fpt) * tokens, "val_loss": val})
        try:  # after the val report: a failing eval loses no loss
            results = run_evals(spec.evals, model, data, spec.seq_len, device=device)
        except torch.OutOfMemoryError:
            raise OutOfMemory(step, microbatch) from None
        for name, value in results.items():
            reporter("eval", {"step": step, "name": name, "value": value})
        if reason:  # no better than a uniform guess at the end: its loss and evals are recorded, then it is diverged
            raise diverged(step, reason)
        return val

    model.train()
    train_time, trained_steps = 0.0, 0
    window_t, window_tokens = 0.0, 0
    last_ckpt_t = time.perf_counter()
    # The step whose loss is not read back yet: (step, its loss's read-back or None where it had no labelled token, lr,
    # tokens/s to report or None).
    # Reading a loss waits for its step to finish on the GPU, so it is read after the next step's work is
    # queued; at once, it left the GPU idle while the CPU queued the next step (9% of the 135M step on an H100).
    pending: tuple[int, Callable[[], float] | None, float, float | None] | None = None

    def settle() -> None:
        """Read back the pending step's loss, stop on a non-finite one, and send its report if one is due."""
        nonlocal pending, last_loss
        if pending is None:
            return
        done, loss, lr_done, tps = pending
        pending = None
        if loss is None:  # a step without a labelled token: no loss, no report
            return
        last_loss = loss()
        if not math.isfinite(last_loss):
            raise diverged(done)
        if tps is not None:
            tokens = done * tokens_per_step
            reporter("train", {
                "step": done, "tokens": tokens, "flops": float(fpt) * tokens, "loss": last_loss, "lr": lr_done,
                "tokens_per_s": tps, "mfu": fpt * tps / peak if peak else None,
            })

    def to_device(t: torch.Tensor) -> torch.Tensor:
        # From pinned memory the copy is queued behind the GPU's work instead of waiting for it.
        return t.pin_memory().to(device, non_blocking=True) if on_cuda else t.to(device)

    # A step's time runs from the previous step's clock reading to its own, with all between. On CUDA the host only
    # queues a step, and data parallel _agree's read-back then waits for the GPU to finish it: a window from the
    # top of the loop to the reading left that tail out of every step (2.78x on two GPUs against one).
    clock = time.perf_counter()
    for step in range(start + 1, total_steps + 1):
        t0 = clock
        lr = lr_at(step, spec)
        for group in optimizer.param_groups:
            group["lr"] = lr
        # The stream position is global: this rank's slice of step `step` (the same sequences at any world size).
        batches.position = (step - 1) * spec.batch_size + rank * local_batch
        micro = [batches.next() for _ in range(n_micro)]
        batches.position = step * spec.batch_size
        labels = [int((y != -100).sum()) for _, y in micro]  # per microbatch
        n_valid = sum(labels)
        rank_weight, global_valid = None, lambda: n_valid
        if world > 1:
            # Ranks may hold different numbers of labelled tokens (MQAR labels a few positions, text all), so a rank's
            # mean counts by its share of the global count, times world as DDP and FSDP average the ranks. Kept on the
            # device (and copied there without blocking): a read-back would make the CPU wait for the previous step.
            labelled = to_device(torch.tensor(n_valid))
            torch.distributed.all_reduce(labelled)
            # A global batch without a labelled token (fully masked data) would make it 0 / 0 = NaN on every rank.
            rank_weight = world * n_valid / labelled.clamp(min=1)
            # Waited for only before the update, by when the GPU is long past this all-reduce.
            global_valid = _read_back(labelled)
        # The microbatches that run: alone, those holding a labelled token. Data parallel, every one on every rank, at
        # weight 0 where it holds none: FSDP gathers the weights in each forward and backward, and the step's
        # gradient reduction waits for every rank, so ranks that skipped different microbatches would wait for each
        # other (or, over gloo, pair the wrong collectives: FSDP's losses drifted from one worker's by 7e-4).
        running = list(range(n_micro)) if world > 1 else [i for i, n in enumerate(labels) if n]
        last = running[-1] if running else -1
        try:
            if cuda_graphs:  # a new step: the CUDA graphs may reuse the last step's outputs (all used by now)
                torch.compiler.cudagraph_mark_step_begin()
            loss_sum = torch.zeros((), device=device)
            for i in running:
                x, y = micro[i]
                if not labels[i]:
                    # The mean over no target is 0 / 0 = NaN, and NaN * 0 is NaN: any valid target at weight 0 gives
                    # the zero gradient exactly.
                    y = torch.zeros_like(y)
                x, y = to_device(x), to_device(y)
                # Data parallel: gradients are reduced once, in the step's last backward, not per microbatch.
                if sharded:
                    model.set_requires_gradient_sync(i == last)
                with ddp.no_sync() if ddp is not None and i < last else nullcontext():
                    with autocast(device):
                        _, loss = step_model(x, y)
                    # Weight each microbatch by its labelled tokens so the step loss is the mean over the batch.
                    share = labels[i] / max(n_valid, 1)
                    weight = share if rank_weight is None else rank_weight * share
                    (loss * weight).backward()
                loss_sum += loss.detach() * weight
            if world > 1:
                torch.distributed.all_reduce(loss_sum)
                loss_sum /= world
            if fault_kind == ("nan", step):
                loss_sum = loss_sum * float("nan")
            if fault_kind == ("raise", step):
                raise RuntimeError(f"injected failure at step {step}")
            if fault_kind == ("nangrad", step):
                next(p for p in model.parameters() if p.grad is not None).grad.fill_(float("nan"))
            grad_norm = _grad_norm(model, spec.grad_clip)
            # A NaN or inf gradient under a finite loss (the usual first sign of a blow-up) makes this update
            # poison every weight: read back with the loss (x + 0 * norm is x, or NaN), it stops the run here.
            step_loss = _read_back(loss_sum + 0.0 * grad_norm)
            # A batch without a labelled token has nothing to learn from: AdamW would still move the weights (by its
            # momentum and the weight decay), so the update is skipped, and the step has no loss to report.
            unlabelled = global_valid() == 0
            if unlabelled:
                step_loss = None
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            settle()  # the previous step's loss, while this step runs
        except torch.OutOfMemoryError:
            optimizer.zero_grad(set_to_none=True)
            raise OutOfMemory(step, microbatch) from None
        clock = time.perf_counter()
        dt = clock - t0
        train_time += dt
        trained_steps += 1
        window_t += dt
        window_tokens += tokens_per_step
        tps = None
        # An unlabelled step reports nothing; its time counts in the next report's throughput.
        if not unlabelled and (step % report_every == 0 or step in (start + 1, total_steps)):
            tps = window_tokens / window_t
            window_t, window_tokens = 0.0, 0
        pending = (step, step_loss, lr, tps)
        if not overlap_readback:
            settle()

        # A timed checkpoint too is rank 0's call: each rank's own clock could find it due a step apart from another's,
        # and ranks that disagree enter different collectives (the checkpoint's barrier, the next step's all-reduce).
        stopping, timed = _agree([should_stop is not None and should_stop(),
                                  time.perf_counter() - last_ckpt_t >= ckpt_every_s], world, device)
        due = timed or (step % ckpt_every_steps == 0 if ckpt_every_steps else False)
        evals_due = spec.eval_every and step % spec.eval_every == 0 and step != total_steps
        saving = step == total_steps or due or stopping or step == exit_at
        if saving or evals_due:
            settle()  # nothing is evaluated or saved before its step's loss is known to be finite
        # Evaluate before a possible stop, so that a resumed run never skips an eval it was due.
        if evals_due:
            evaluate(step)
        if saving:
            checkpoint(step)
            last_ckpt_t = time.perf_counter()
        if saving or evals_due:  # evaluating and checkpointing is not training
            clock = time.perf_counter()
        if step == exit_at and rank == world - 1:  # with several workers, one of them dies
            logging.shutdown()
            os._exit(1)
        if stopping:
            raise Interrupted(step)

    if math.isnan(last_loss):
        # Every finite loss read back is kept (a non-finite one raised Diverged), in checkpoints too: NaN here means
        # that no step of any attempt had a labelled token.
        raise Unlabelled.of_run(spec.data, total_steps)
    val = evaluate(total_steps)
    return summarize(spec, counts, fpt, val_loss=val, final_loss=last_loss, wall_s=prior_wall + time.perf_counter() - t_start,
                     train_time=train_time, trained_steps=trained_steps, start=start, data_sha256=data.sha256,
                     microbatch=microbatch)


def _grad_norm(model: torch.nn.Module, grad_clip: float) -> torch.Tensor:
    """The gradients' total norm (a device scalar), clipping them to ``grad_clip`` when it is positive."""
    if grad_clip > 0:
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP: a DTensor, the same on every rank


def _read_back(value: torch.Tensor) -> Callable[[], float]:
    """Start copying a device scalar to the host now; the returned function waits for that copy alone."""
    if not value.is_cuda:
        return value.item
    # A plain .item() later would queue its copy behind all the work queued by then (the whole next step), so
    # the CPU would wait for that step to end and the GPU would idle while the CPU queued the one after it
    # (about 2.5 ms at every step boundary at 135M on an H100, in a profiler trace). So the copy is queued
    # now, and only its own event is waited for.
    host = torch.empty((), dtype=value.dtype, pin_memory=True)
    host.copy_(value, non_blocking=True)
    copied = torch.cuda.Event()
    copied.record()

    def wait() -> float:
        copied.synchronize()
        return host.item()

    return wait


def summarize(spec, counts, fpt: int, *, val_loss: float | None, final_loss: float, wall_s: float, train_time: float,
              trained_steps: int, start: int, data_sha256: str, microbatch: int) -> Summary:
    """The ``Summary`` of a finished run; tokens/s counts this attempt's ``trained_steps`` over ``train_time``."""
    tokens_per_step = spec.batch_size * spec.seq_len
    return Summary(
        steps=spec.steps, tokens=spec.steps * tokens_per_step, flops=float(fpt) * spec.steps * tokens_per_step,
        final_loss=final_loss, val_loss=val_loss, params=counts.total, nonembed_params=counts.nonembed, wall_s=wall_s,
        tokens_per_s=trained_steps * tokens_per_step / train_time if train_time else 0.0,
        data_sha256=data_sha256, microbatch=microbatch, resumed_from_step=start,
    )
