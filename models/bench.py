"""Single-run training speed: tokens/s and MFU of the real training loop (``pretrain``) on synthetic specs."""

from __future__ import annotations

import contextlib
import math
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from models.config import ModelConfig, flops_per_token, hybrid_pattern, shape_for_params

#: Named sizes with the shapes the literature gives them (d_model, n_layers, n_heads, vocab).
PRESETS = {
    "135M": (768, 12, 12, 32000),  # SmolLM/GPT-2-small-like; the 50%-MFU target shape
    "350M": (1024, 24, 16, 32000),
}
#: Measured dense bf16 matmul peak of the H100 we use (8192^3), beside the 989 TFLOP/s datasheet figure.
H100_MEASURED_PEAK = 785e12
H100_DATASHEET_PEAK = 989e12


@dataclass(frozen=True)
class BenchSpec:
    """The RunSpec fields ``pretrain`` reads, for a synthetic benchmark run."""

    arch: str
    d_model: int
    n_layers: int
    n_heads: int
    hybrid: str
    vocab_size: int
    seq_len: int
    batch_size: int
    tokens: int
    lr: float = 3e-4
    warmup: int = 5
    schedule: str = "constant"
    min_lr_ratio: float = 1.0
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    data: str = "stdlib"
    evals: tuple = ()
    eval_every: int = 0
    gpus: float = 1.0

    @property
    def steps(self) -> int:
        """Optimizer steps."""
        return max(1, -(-self.tokens // (self.batch_size * self.seq_len)))


def bench_spec(arch: str, params: str, seq_len: int, batch_size: int, steps: int, vocab: int | None = None) -> BenchSpec:
    """A benchmark spec for ``arch`` at a named size (``PRESETS``) or a non-embedding target like ``30M``; at least two
    ``steps``, since the first (compilation, warm-up) is never the one timed."""
    if steps < 2:
        raise ValueError(f"--steps {steps}: give 2 or more (the first step is warm-up, not timed)")
    if params in PRESETS:
        d, layers, heads, v = PRESETS[params]
    else:
        scale = {"k": 1e3, "K": 1e3, "M": 1e6, "B": 1e9}.get(params[-1:], 1.0)
        try:
            target = float(params.rstrip("kKMB")) * scale
        except ValueError:
            target = math.nan
        if not (math.isfinite(target) and target > 0):  # inf had raised an OverflowError out of shape_for_params
            raise ValueError(f"--params {params!r}: expected {' or '.join(PRESETS)} or a positive count like 30M, 500k, 1.2B")
        d, layers, heads = shape_for_params(target)
        v = 32000
    vocab = vocab or v
    # The shape is fixed (135M: 12 layers), so not whole periods: softmax at layer 8, the seed study's spacing (1:11
    # at 12 layers, not its 1:7).
    hybrid = hybrid_pattern(8 if layers >= 8 else layers, layers) if arch == "hybrid" else ""
    ModelConfig(arch, d, layers, heads, vocab, hybrid)  # raises ValueError on an unknown arch, before any training
    return BenchSpec(arch, d, layers, heads, hybrid, vocab, seq_len, batch_size, steps * batch_size * seq_len)


@dataclass
class ClockSampler:
    """The GPU's SM clock and power draw, sampled by ``nvidia-smi`` while a run trains (a context manager).

    A GPU at its power cap lowers its clock, and with it the matmuls' ceiling: this is what makes the same code's
    MFU differ between hosts. ``summary()`` counts the samples taken between ``mark()`` and the last ``stop()``
    (not compile and warm-up before, nor the final evaluation and checkpoint after); each is placed by
    nvidia-smi's own timestamp, since its output may reach us in bursts (buffered in a pipe).
    Without nvidia-smi, or for a GPU it cannot name, there are no samples and ``summary()`` gives Nones.
    """

    gpu: str | None
    interval_ms: int = 200
    samples: list[tuple[float, float, float]] = field(default_factory=list)
    _since: float = 0.0
    _until: float | None = None
    _proc: subprocess.Popen | None = None
    _reader: threading.Thread | None = None

    def __enter__(self) -> "ClockSampler":
        exe = shutil.which("nvidia-smi")
        if exe and self.gpu:
            cmd = [exe, "--query-gpu=timestamp,clocks.sm,power.draw", "--format=csv,noheader,nounits",
                   f"-lms={self.interval_ms}", f"--id={self.gpu}"]
            self._proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            self._reader = threading.Thread(target=self._read, daemon=True)
            self._reader.start()
        return self

    def _read(self) -> None:
        for line in self._proc.stdout:
            try:
                stamp, clock, power = (v.strip() for v in line.split(","))
                # nvidia-smi prints the host's local time, which datetime reads as local time too.
                at = datetime.strptime(stamp, "%Y/%m/%d %H:%M:%S.%f").timestamp()
                self.samples.append((at, float(clock), float(power)))
            except ValueError:  # a header, or "[N/A]" where the GPU does not report power
                continue

    def mark(self) -> None:
        """Count samples taken from now on (until a later ``stop()``)."""
        self._since, self._until = time.time(), None

    def stop(self) -> None:
        """Count no samples taken after now; a later call moves the end."""
        self._until = time.time()

    def __exit__(self, *exc) -> None:
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait(timeout=10)
            self._reader.join(timeout=10)

    def summary(self) -> dict:
        """Mean SM clock (MHz) and power draw (W) over the samples from ``mark()`` to ``stop()``; Nones without."""
        until = math.inf if self._until is None else self._until
        kept = [(c, p) for t, c, p in self.samples if self._since <= t <= until]
        if not kept:
            return {"sm_clock_mhz": None, "power_w": None}
        return {"sm_clock_mhz": statistics.fmean(c for c, _ in kept), "power_w": statistics.fmean(p for _, p in kept)}


def _gpu_id(device: str) -> str | None:
    """The nvidia-smi id (GPU-<uuid>) of a torch CUDA device, which holds under CUDA_VISIBLE_DEVICES; None off CUDA."""
    import torch

    if not device.startswith("cuda") or not torch.cuda.is_available():
        return None
    uuid = getattr(torch.cuda.get_device_properties(torch.device(device)), "uuid", None)
    return f"GPU-{uuid}" if uuid is not None else None


def bench_kernels(fused: bool, kernels: str | None) -> str | None:
    """The LM kernels a training benchmark asks for: ``kernels`` by name (models.lm.KERNELS), "auto" for ``fused``, or
    None for training's default; a ValueError for an unknown name or both asked at once."""
    from models.lm import KERNELS

    if kernels is not None and kernels not in KERNELS:
        raise ValueError(f"--kernels {kernels!r}: expected one of {', '.join(KERNELS)}")
    if fused and kernels not in (None, "auto"):
        raise ValueError(f"--fused runs the auto kernels; it cannot go with --kernels {kernels}")
    return "auto" if fused else kernels


def bench_train(spec: BenchSpec, *, compile: bool | str = False, microbatch: int | None = None, device: str = "cuda",
                profile: Path | None = None, fused: bool = False, kernels: str | None = None) -> dict:
    """Train ``spec`` with ``pretrain`` and report the median tokens/s of the second half of the steps and MFU;
    with ``profile``, also write torch.profiler's table of the ops that took the most time over three steps
    of the second half there. ``fused`` runs all the LM shell's fused Triton kernels (norms, SwiGLU, head +
    loss) even when compiled; ``kernels`` names the LM's kernels outright (models.lm.KERNELS; None: training's
    default, ``default_kernels``, which the result names). On a GPU, also the mean SM clock and power draw over those
    steps (``ClockSampler``; Nones where nvidia-smi cannot tell)."""
    import torch

    from kernels.gemm_epilogue import epilogues_ready, loss_ready
    from models.lm import LM
    from models.mixers.softmax import attention_backend
    from models.train import default_kernels, pretrain

    kernels = bench_kernels(fused, kernels)
    if kernels is None:  # named in the result as training resolves it
        kernels = default_kernels(bool(compile))

    rates: list[float] = []
    profiler = _step_profiler(spec.steps, device) if profile else contextlib.nullcontext()
    clock = ClockSampler(_gpu_id(device))

    def reporter(kind: str, payload: dict) -> None:
        if kind == "train" and payload.get("tokens_per_s"):
            rates.append((payload["step"], payload["tokens_per_s"]))
            if payload["step"] <= spec.steps // 2:  # the steps whose median is reported come after the last such
                clock.mark()
            else:
                clock.stop()
        if kind == "train" and profile:
            profiler.step()

    with tempfile.TemporaryDirectory() as ckpt, profiler, clock:
        summary = pretrain(spec, reporter, ckpt, device=device, microbatch=microbatch, compile=compile,
                           ckpt_every_steps=10**9, ckpt_every_s=1e9, kernels=kernels)
    if profile:
        key = "self_cuda_time_total" if device.startswith("cuda") else "self_cpu_time_total"
        Path(profile).parent.mkdir(parents=True, exist_ok=True)
        Path(profile).write_text(profiler.key_averages().table(sort_by=key, row_limit=40, max_name_column_width=70) + "\n")
    half = [r for step, r in rates if step > spec.steps // 2] or [r for _, r in rates]
    tps = statistics.median(half)
    cfg = ModelConfig(spec.arch, spec.d_model, spec.n_layers, spec.n_heads, spec.vocab_size, spec.hybrid)
    fpt = flops_per_token(cfg, spec.seq_len)
    return {
        "arch": spec.arch, "d_model": spec.d_model, "n_layers": spec.n_layers, "vocab": spec.vocab_size,
        "params": summary.params, "seq_len": spec.seq_len, "batch_size": spec.batch_size,
        "microbatch": summary.microbatch, "compile": compile, "fused": kernels == "auto", "tokens_per_s": tps, "flops_per_token": fpt,
        # MFU against an H100's peaks means nothing off the GPU
        "mfu_989": fpt * tps / H100_DATASHEET_PEAK if device.startswith("cuda") else None,
        "mfu_785": fpt * tps / H100_MEASURED_PEAK if device.startswith("cuda") else None,
        **clock.summary(),
        "final_loss": summary.final_loss,
        # Which kernels the softmax layers ran on (fa4 where flash-attn-4 is installed on a Hopper GPU, else sdpa).
        "attention": attention_backend(device, head_dim=cfg.head_dim) if "S" in cfg.layer_kinds else None,
        "kernels": kernels,
        # Whether the MLP (and lightning's q, k, v SiLU) ran in GEMM epilogues: "gemm" kernels with quack usable.
        "epilogues": (epilogues := kernels == "gemm" and device.startswith("cuda")
                      and epilogues_ready(torch.device(device))),
        # Whether the head + loss ran on quack's scaled-exp pipeline (models.lm.LM.epilogue_loss) too.
        "epilogue_loss": bool(epilogues and LM.epilogue_loss and loss_ready(torch.device(device), spec.vocab_size)),
        "device": torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu",
    }


def _step_profiler(steps: int, device: str):
    """A torch.profiler that records three training steps after the first half (reports step it)."""
    from torch.profiler import ProfilerActivity, profile, schedule

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    wait = max(0, steps // 2 - 1)
    return profile(activities=activities, schedule=schedule(wait=wait, warmup=1, active=min(3, max(1, steps - wait - 1))))
