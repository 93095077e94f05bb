"""Fused kernels for the LM's training step: RMSNorm, lightning's gated RMSNorm, SwiGLU's gate and the head +
cross-entropy loss.

Each op takes backend = "torch" (the plain PyTorch reference in naive.py, what the model computes today),
"triton" (the fused kernels; CUDA tensors, or CPU ones under TRITON_INTERPRET=1) or "auto" (triton on CUDA
tensors, torch elsewhere), as kernels.linear_attention does.
"""

from __future__ import annotations

import os

import torch

BACKENDS = ("auto", "triton", "torch")


def _backend(backend: str, *tensors: torch.Tensor) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    if len({t.device for t in tensors}) > 1:
        raise ValueError(f"inputs must be on one device; got {', '.join(str(t.device) for t in tensors)}")
    on_cuda = tensors[0].is_cuda
    if backend == "auto":
        return "triton" if on_cuda else "torch"
    if backend == "triton" and not on_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("the triton backend needs CUDA tensors (or TRITON_INTERPRET=1 to run on CPU)")
    return backend


def _check_float(name: str, t) -> None:
    if not isinstance(t, torch.Tensor) or not t.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor; got {getattr(t, 'dtype', type(t).__name__)}")


def _check_norm(x, weight) -> None:
    _check_float("x", x)
    _check_float("weight", weight)
    if x.dim() < 1 or x.shape[-1] < 1 or weight.shape != (x.shape[-1],):
        raise ValueError(
            f"weight must have shape (d,) for x (..., d); got x {tuple(x.shape)}, weight {tuple(weight.shape)}"
        )
    if x.shape[-1] > 65536:
        raise ValueError(f"d must be at most 65536 (one row is one tile); got {x.shape[-1]}")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, *, backend: str = "auto") -> torch.Tensor:
    """RMSNorm of x (..., d) with weight (d,), as F.rms_norm(x, (d,), weight, eps); fp32 math, output in x's dtype."""
    _check_norm(x, weight)
    if _backend(backend, x, weight) == "torch":
        from .naive import rms_norm_naive as run
    else:
        # Imported here so that `import kernels.fused` never pulls in triton.
        from .triton_norm import rms_norm_triton as run
    return run(x, weight, eps)


def gated_rms_norm(
    x: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, *, backend: str = "auto"
) -> torch.Tensor:
    """sigmoid(gate) * RMSNorm(x) * weight for x and gate (..., d) of one shape (lightning's output gate) in one pass;
    fp32 math, output in x's dtype."""
    _check_norm(x, weight)
    _check_float("gate", gate)
    if gate.shape != x.shape:
        raise ValueError(f"gate must have x's shape {tuple(x.shape)}; got {tuple(gate.shape)}")
    if _backend(backend, x, gate, weight) == "torch":
        from .naive import gated_rms_norm_naive as run
    else:
        from .triton_norm import gated_rms_norm_triton as run
    return run(x, gate, weight, eps)


def swiglu(a: torch.Tensor, b: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """silu(a) * b for a and b of one shape and dtype (the gate of a SwiGLU MLP); output in their dtype."""
    _check_float("a", a)
    _check_float("b", b)
    if a.shape != b.shape or a.dtype != b.dtype:
        raise ValueError(
            f"a and b must share one shape and dtype; got {tuple(a.shape)} {a.dtype} and {tuple(b.shape)} {b.dtype}"
        )
    if _backend(backend, a, b) == "torch":
        from .naive import swiglu_naive as run
    else:
        from .triton_swiglu import swiglu_triton as run
    return run(a, b)


def linear_cross_entropy(
    x: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = -100,
    chunk_tokens: int | None = None,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """Mean cross-entropy (fp32 scalar) of logits x @ weight.T, x (..., d), weight (V, d), targets x.shape[:-1].

    Targets equal to ignore_index count in neither the sum nor the mean; others must lie in [0, V) (the triton
    backend, which does not sync to check, returns NaN for one outside it). The triton backend never materialises
    the (N, V) logits (chunk_tokens per chunk; None picks default_chunk_tokens).
    Under autocast x and weight are cast to the autocast dtype first, as a Linear head would be.
    """
    _check_float("x", x)
    _check_float("weight", weight)
    if not isinstance(targets, torch.Tensor) or targets.dtype != torch.int64:
        raise ValueError(f"targets must be an int64 tensor of class indices; got {getattr(targets, 'dtype', targets)}")
    if x.dim() < 2 or weight.dim() != 2 or weight.shape[1] != x.shape[-1]:
        raise ValueError(f"x must be (..., d) and weight (V, d); got x {tuple(x.shape)}, weight {tuple(weight.shape)}")
    if targets.shape != x.shape[:-1]:
        raise ValueError(f"targets must have shape x.shape[:-1] = {tuple(x.shape[:-1])}; got {tuple(targets.shape)}")
    if x.numel() == 0 or weight.numel() == 0:
        raise ValueError(
            f"need at least one token, one class and d >= 1; got x {tuple(x.shape)}, weight {tuple(weight.shape)}"
        )
    if chunk_tokens is not None and (not isinstance(chunk_tokens, int) or chunk_tokens < 1):
        raise ValueError(f"chunk_tokens must be a positive int or None; got {chunk_tokens!r}")
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        x, weight = x.to(dtype), weight.to(dtype)
    if x.dtype != weight.dtype:
        raise ValueError(f"x and weight must share one dtype (or run under autocast); got {x.dtype} and {weight.dtype}")
    name = _backend(backend, x, weight, targets)
    x2, t1 = x.reshape(-1, x.shape[-1]), targets.reshape(-1)
    with torch.autocast(device_type, enabled=False):
        if name == "torch":
            from .naive import linear_cross_entropy_naive

            return linear_cross_entropy_naive(x2, weight, t1, ignore_index)
        from .triton_ce import linear_cross_entropy_triton

        return linear_cross_entropy_triton(x2, weight, t1, ignore_index, chunk_tokens)


__all__ = ["BACKENDS", "gated_rms_norm", "linear_cross_entropy", "rms_norm", "swiglu"]
