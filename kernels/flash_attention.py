"""Causal softmax attention on FlashAttention 4's kernels (the optional flash-attn-4 package, written in CuTe DSL),
for the softmax mixer where they apply: a Hopper GPU, bf16 or fp16, heads of 64 or 128.

On an H100 its forward + backward at the 135M model's shape (64 sequences of 2048, 12 heads of 64) took 3.85-3.97 ms
against 4.35-4.44 ms for cuDNN's through SDPA, and the model trained 2% faster (docs/bench/kernels.md). Installed with
``pip install 'scalinglab[fa4]'``; without it, or where ``flash4_usable`` is False, the mixer calls SDPA.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
import warnings

import torch

from kernels.dispatch import eager_or_op

log = logging.getLogger(__name__)

#: GPUs (compute capability) where FA4 is taken: measured against cuDNN on Hopper only.
CAPABILITIES = ((9, 0),)
#: Head widths FA4 is taken for: its tuned Hopper sizes (64 measured, docs/bench/kernels.md); others stay on SDPA.
HEAD_DIMS = (64, 128)


@functools.cache
def _interface():
    """FA4's interface module, or None where flash-attn-4 or what it needs does not import."""
    try:  # flash_attn alone may be FlashAttention 2, which has no cute module: not installed, as far as FA4 goes
        installed = importlib.util.find_spec("flash_attn.cute") is not None
    except Exception:  # its parent package failed to import
        installed = False
    if not installed:
        return None
    # FA4 compiles its kernels when a process first meets a shape (about 35 s for the 135M model's forward and
    # backward on an H100): its disk cache, off by default, lets every later process (each run of a sweep) load them.
    os.environ.setdefault("FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED", "1")
    try:
        from flash_attn.cute import interface
    except Exception as exc:  # a beta package: any import failure falls back to SDPA rather than failing training
        # Installed but broken (another CUDA, a missing library): said once, since it costs the user its speed.
        log.warning("flash-attn-4 is installed but does not import (%s: %s); softmax attention runs on SDPA",
                    type(exc).__name__, exc)
        return None
    # The CuTe DSL warns, twice per machine as it first compiles FA4's kernels, that it cannot take FA4's aux_data (the
    # score and mask modifiers' tensors, empty for the plain causal attention asked here) as a JIT argument: harmless
    # here (the outputs matched SDPA's on an H100), and it would read as a fault in the user's first training run.
    warnings.filterwarnings("ignore", category=UserWarning,
                            message=r"Argument aux_data \(position \d+\) cannot be converted to a JitArgument")
    return interface


@torch.compiler.assume_constant_result
def _ready(device_index: int) -> bool:
    """Whether FA4 is installed and the GPU is one it is taken on (a constant to torch.compile)."""
    return torch.cuda.get_device_capability(device_index) in CAPABILITIES and _interface() is not None


def flash4_takes(device: torch.device, dtype: torch.dtype, head_dim: int) -> bool:
    """Whether FA4 takes queries of this device, dtype and head width: CUDA, bf16 or fp16, HEAD_DIMS, FA4 installed."""
    return (device.type == "cuda" and dtype in (torch.bfloat16, torch.float16) and head_dim in HEAD_DIMS
            and _ready(device.index if device.index is not None else torch.cuda.current_device()))


def flash4_usable(q: torch.Tensor) -> bool:
    """Whether ``flash4_attention`` takes this query (``flash4_takes`` of its device, dtype and head width)."""
    return flash4_takes(q.device, q.dtype, q.shape[-1])


def _forward(q, k, v):
    out, lse, *_ = _interface()._flash_attn_fwd(q, k, v, causal=True, return_lse=True)
    return out, lse


def _backward(q, k, v, out, lse, dout):
    dq, dk, dv = _interface()._flash_attn_bwd(q, k, v, out, dout.contiguous(), lse, causal=True)
    return dq, dk, dv


@torch.library.custom_op("slab::flash4_forward", mutates_args=())
def flash4_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention over contiguous (B, T, H, D): the output and each row's log-sum-exp, (B, H, T) fp32."""
    return _forward(q, k, v)


@flash4_forward.register_fake
def _(q, k, v):
    return torch.empty_like(q), q.new_empty(q.shape[0], q.shape[2], q.shape[1], dtype=torch.float32)


@torch.library.custom_op("slab::flash4_backward", mutates_args=())
def flash4_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                    dout: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv of ``flash4_forward``."""
    return _backward(q, k, v, out, lse, dout)


@flash4_backward.register_fake
def _(q, k, v, out, lse, dout):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _save(ctx, inputs, output):
    ctx.save_for_backward(*inputs, *output)


def _op_backward(ctx, dout, dlse):
    return flash4_backward(*ctx.saved_tensors, dout)


flash4_forward.register_autograd(_op_backward, setup_context=_save)


class _Flash4(torch.autograd.Function):
    """The same forward and backward as the custom ops, without their dispatch cost (eager training)."""

    @staticmethod
    def forward(ctx, q, k, v):
        out, lse = _forward(q, k, v)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        return _backward(*ctx.saved_tensors, dout)


def _op(q, k, v):
    return flash4_forward(q, k, v)[0]


def flash4_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal attention over (B, T, H, D) tensors (any strides) on FA4; (B, T, H, D) out."""
    # FA4 takes contiguous rows; the mixer's q and k are (RoPE writes them), its v is a view of the joint projection.
    return eager_or_op(_op, _Flash4, q.contiguous(), k.contiguous(), v.contiguous())
