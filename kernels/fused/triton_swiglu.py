"""SwiGLU's gate, silu(a) * b, in Triton: one elementwise pass each way, fp32 math.

The backward recomputes sigmoid(a) from a instead of saving silu(a): one more exp per element is cheaper than
storing and reloading a tensor the size of the MLP's hidden activations.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..dispatch import eager_or_op

BLOCK = 2048
NUM_WARPS = 8


@triton.jit
def _swiglu_fwd_kernel(a_ptr, b_ptr, c_ptr, n, BLOCK: tl.constexpr):
    start = tl.program_id(0).to(tl.int64) * BLOCK
    offs = tl.arange(0, BLOCK)
    mask = start + offs < n
    a = tl.load(a_ptr + start + offs, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + start + offs, mask=mask, other=0.0).to(tl.float32)
    c = a * tl.sigmoid(a) * b
    tl.store(c_ptr + start + offs, c.to(c_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(dc_ptr, a_ptr, b_ptr, da_ptr, db_ptr, n, BLOCK: tl.constexpr):
    """db = dc silu(a); da = dc b silu'(a), silu'(a) = s (1 + a (1 - s)) with s = sigmoid(a)."""
    start = tl.program_id(0).to(tl.int64) * BLOCK
    offs = tl.arange(0, BLOCK)
    mask = start + offs < n
    dc = tl.load(dc_ptr + start + offs, mask=mask, other=0.0).to(tl.float32)
    a = tl.load(a_ptr + start + offs, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + start + offs, mask=mask, other=0.0).to(tl.float32)
    s = tl.sigmoid(a)
    tl.store(db_ptr + start + offs, (dc * a * s).to(db_ptr.dtype.element_ty), mask=mask)
    tl.store(da_ptr + start + offs, (dc * b * s * (1.0 + a * (1.0 - s))).to(da_ptr.dtype.element_ty), mask=mask)


def _forward(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """silu(a) * b."""
    c = torch.empty_like(a)
    n = a.numel()
    _swiglu_fwd_kernel[(triton.cdiv(n, BLOCK),)](a, b, c, n, BLOCK=BLOCK, num_warps=NUM_WARPS)
    return c


def _backward_kernel(dc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """da and db."""
    da, db = torch.empty_like(a), torch.empty_like(b)
    n = a.numel()
    _swiglu_bwd_kernel[(triton.cdiv(n, BLOCK),)](dc.contiguous(), a, b, da, db, n, BLOCK=BLOCK, num_warps=NUM_WARPS)
    return da, db


# Custom ops for torch.compile, which keeps them in its graph as opaque calls instead of breaking the graph around
# them; eager calls take `_Eager` (`kernels.dispatch`).
@torch.library.custom_op("slab::swiglu_fwd", mutates_args=())
def _swiglu_fwd(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return _forward(a, b)


@torch.library.custom_op("slab::swiglu_bwd", mutates_args=())
def _swiglu_bwd(dc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _backward_kernel(dc, a, b)


@_swiglu_fwd.register_fake
def _(a, b):
    return torch.empty_like(a)


@_swiglu_bwd.register_fake
def _(dc, a, b):
    return torch.empty_like(a), torch.empty_like(b)


def _setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, dc, run=_swiglu_bwd):
    return run(dc, *ctx.saved_tensors)


_swiglu_fwd.register_autograd(_backward, setup_context=_setup)


class _Eager(torch.autograd.Function):
    """The custom ops' forward and backward outside torch.compile and functorch, without their dispatch."""

    @staticmethod
    def forward(ctx, a, b):
        c = _forward(a, b)
        _setup(ctx, (a, b), c)
        return c

    @staticmethod
    @torch.autograd.function.once_differentiable  # a second derivative would silently be 0: raise instead
    def backward(ctx, dc):
        return _backward(ctx, dc, run=_backward_kernel)


def swiglu_triton(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Triton silu(a) * b (autograd backward included), same shape and dtype as a."""
    return eager_or_op(_swiglu_fwd, _Eager, a.contiguous(), b.contiguous())
