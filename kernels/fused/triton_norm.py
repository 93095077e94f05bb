"""RMSNorm in Triton: one pass forward (storing each row's rstd), one pass backward for dx and dweight.

With GATED the same kernels compute lightning's output gate, sigmoid(g) * RMSNorm(x), and its gradient for g.

Rows are processed ROWS at a time as (ROWS, BLOCK_D) tiles, BLOCK_D the whole row rounded up to a power of two
and masked, so a d of 768 needs no second pass. The backward runs a fixed number of programs, each striding
over row tiles and summing dy * x_hat for its rows in fp32; torch sums those few partial rows into dweight.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ..dispatch import eager_or_op

#: Elements per (ROWS, BLOCK_D) tile of the forward (16 a thread): a row of 768 (1024 padded) gives 2 rows a program.
TILE = 2048
MAX_ROWS = 16


class _Launch(NamedTuple):
    """How a norm kernel is launched over rows of d: tile width and rows, warps, and (backward) programs per SM."""

    block_d: int
    rows: int
    warps: int
    per_sm: int = 0


@triton.jit
def _rms_norm_fwd_kernel(x_ptr, g_ptr, w_ptr, y_ptr, rstd_ptr, M, D, eps, ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
                         GATED: tl.constexpr):
    row0 = tl.program_id(0).to(tl.int64) * ROWS
    rows = tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_D)
    mask = (row0 + rows < M)[:, None] & (cols < D)[None, :]
    # An int64 base and int32 offsets within the tile: rows * D may pass 2^31 for long inputs, tiles never do.
    offs = rows[:, None] * D + cols[None, :]
    x = tl.load(x_ptr + row0 * D + offs, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=cols < D, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=1) / D + eps)
    y = x * rstd[:, None] * w[None, :]
    if GATED:
        y *= tl.sigmoid(tl.load(g_ptr + row0 * D + offs, mask=mask, other=0.0).to(tl.float32))
    tl.store(y_ptr + row0 * D + offs, y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + row0 + rows, rstd, mask=row0 + rows < M)


@triton.jit
def _bwd_tiles(dy_ptr, x_ptr, g_ptr, rstd_ptr, row0, M, D, rows, cols, offs, GATED: tl.constexpr):
    """The backward's inputs for the rows from row0, as stored (masked past M)."""
    mask = (row0 + rows < M)[:, None] & (cols < D)[None, :]
    x = tl.load(x_ptr + row0 * D + offs, mask=mask, other=0.0)
    dy = tl.load(dy_ptr + row0 * D + offs, mask=mask, other=0.0)
    g = tl.load(g_ptr + row0 * D + offs, mask=mask, other=0.0) if GATED else x
    rstd = tl.load(rstd_ptr + row0 + rows, mask=row0 + rows < M, other=0.0)
    return x, dy, g, rstd


@triton.jit
def _rms_norm_bwd_kernel(dy_ptr, x_ptr, g_ptr, w_ptr, rstd_ptr, dx_ptr, dg_ptr, dw_ptr, M, D, ROWS: tl.constexpr,
                         BLOCK_D: tl.constexpr, GATED: tl.constexpr):
    """dx = rstd (w dy - x_hat mean(x_hat w dy)); this program's share of dweight = sum over rows of dy x_hat.

    GATED: y = sigmoid(g) n with n the norm's output, so dg = dy n s (1 - s) and the norm's dy is dy s.
    """
    pid = tl.program_id(0)
    rows = tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_D)
    offs = rows[:, None] * D + cols[None, :]
    w = tl.load(w_ptr + cols, mask=cols < D, other=0.0).to(tl.float32)
    dw = tl.zeros([ROWS, BLOCK_D], dtype=tl.float32)
    # An int64 start makes the loop's row index int64 (tiles of a long input pass 2^31 elements).
    start, step = pid.to(tl.int64) * ROWS, tl.num_programs(0) * ROWS
    x_n, dy_n, g_n, rstd_n = _bwd_tiles(dy_ptr, x_ptr, g_ptr, rstd_ptr, start, M, D, rows, cols, offs, GATED)
    for row0 in range(start, M, step):
        x, dy, g, rstd = x_n, dy_n, g_n, rstd_n
        # The next tiles' loads go out before this one is reduced, as Triton's pipeliner does not take loads that
        # feed no dot: without, the loop waited on memory once a tile (about 2x the bytes' time, H200).
        x_n, dy_n, g_n, rstd_n = _bwd_tiles(dy_ptr, x_ptr, g_ptr, rstd_ptr, row0 + step, M, D, rows, cols, offs, GATED)
        mask = (row0 + rows < M)[:, None] & (cols < D)[None, :]
        x_hat = x.to(tl.float32) * rstd[:, None]
        dy = dy.to(tl.float32)
        if GATED:
            sig = tl.sigmoid(g.to(tl.float32))
            dg = dy * x_hat * w[None, :] * sig * (1.0 - sig)
            tl.store(dg_ptr + row0 * D + offs, dg.to(dg_ptr.dtype.element_ty), mask=mask)
            dy *= sig
        wdy = w[None, :] * dy
        c = tl.sum(x_hat * wdy, axis=1) / D
        dx = (wdy - x_hat * c[:, None]) * rstd[:, None]
        tl.store(dx_ptr + row0 * D + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        dw += dy * x_hat
    tl.store(dw_ptr + pid * D + cols, tl.sum(dw, axis=0), mask=cols < D)


def _launch(d: int, backward: bool, gated: bool = False) -> _Launch:
    """The launch of a kernel over rows of d (measured at d 768, 131072 rows, bf16, H200: docs/bench/train_study.py
    norm)."""
    block_d = triton.next_power_of_2(d)
    if backward:
        # One row a program, 8 elements a thread, several programs an SM: more rows' loads in flight than 2-row tiles
        # at 2 programs an SM. At d 768: plain 159 us at 8 an SM against 213; gated 266 us at 6 an SM against 304
        # (at 8 an SM, 315: past what its registers let be resident at once).
        per_thread = 4 if gated and block_d > 2048 else 8  # the gated kernel spills at 8 a thread for d 4096 (sm_90)
        warps = min(32, max(4, block_d // (32 * per_thread)))
        return _Launch(block_d, 1, warps, max(1, (24 if gated else 32) // warps))
    # The forward's tiles of 2 rows at 4 warps took 156 us gated, against 170 for 4 rows at 8 warps.
    rows = max(1, min(MAX_ROWS, TILE // block_d))
    return _Launch(block_d, rows, min(32, max(4, block_d * rows // (32 * 16))))


# A gate of None is the plain RMSNorm; its kernels then take x as a stand-in pointer they never read.
def _forward(x2: torch.Tensor, weight: torch.Tensor, gate: torch.Tensor | None, eps: float
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """y and the rows' rstd."""
    M, d = x2.shape
    gated = gate is not None
    block_d, rows, warps, _ = _launch(d, False)
    y = torch.empty_like(x2)
    rstd = torch.empty(M, device=x2.device, dtype=torch.float32)
    _rms_norm_fwd_kernel[(triton.cdiv(M, rows),)](x2, gate if gated else x2, weight, y, rstd, M, d, eps, ROWS=rows,
                                                   BLOCK_D=block_d, GATED=gated, num_warps=warps)
    return y, rstd


def _backward_kernels(dy: torch.Tensor, x2: torch.Tensor, weight: torch.Tensor, gate: torch.Tensor | None,
                      rstd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dx, dweight and dgate (empty without a gate)."""
    M, d = x2.shape
    gated = gate is not None
    block_d, rows, warps, per_sm = _launch(d, True, gated)
    # The interpreter gets two programs, so that tests with several tiles cover a program striding over two.
    programs_cap = per_sm * torch.cuda.get_device_properties(x2.device).multi_processor_count if x2.is_cuda else 2
    programs = max(1, min(triton.cdiv(M, rows), programs_cap))
    dx = torch.empty_like(x2)
    dg = torch.empty_like(gate) if gated else x2.new_empty(0)
    dw = torch.empty(programs, d, device=x2.device, dtype=torch.float32)
    _rms_norm_bwd_kernel[(programs,)](dy.contiguous(), x2, gate if gated else x2, weight, rstd, dx,
                                      dg if gated else dx, dw, M, d, ROWS=rows, BLOCK_D=block_d, GATED=gated,
                                      num_warps=warps)
    return dx, dw.sum(dim=0).to(weight.dtype), dg


# Custom ops for torch.compile, which keeps them in its graph as opaque calls instead of breaking the graph around
# them (and never traces into the kernels); eager calls take `_Eager` (`kernels.dispatch`).
@torch.library.custom_op("slab::rms_norm_fwd", mutates_args=())
def _rms_norm_fwd(x2: torch.Tensor, weight: torch.Tensor, gate: torch.Tensor | None, eps: float
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    return _forward(x2, weight, gate, eps)


@torch.library.custom_op("slab::rms_norm_bwd", mutates_args=())
def _rms_norm_bwd(dy: torch.Tensor, x2: torch.Tensor, weight: torch.Tensor, gate: torch.Tensor | None,
                  rstd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _backward_kernels(dy, x2, weight, gate, rstd)


@_rms_norm_fwd.register_fake
def _(x2, weight, gate, eps):
    return torch.empty_like(x2), x2.new_empty(x2.shape[0], dtype=torch.float32)


@_rms_norm_bwd.register_fake
def _(dy, x2, weight, gate, rstd):
    return torch.empty_like(x2), torch.empty_like(weight), torch.empty_like(gate) if gate is not None else x2.new_empty(0)


def _setup(ctx, inputs, output):
    x2, weight, gate, _ = inputs
    ctx.save_for_backward(x2, weight, gate, output[1])


def _backward(ctx, dy, _drstd, run=_rms_norm_bwd):
    x2, weight, gate, rstd = ctx.saved_tensors
    dx, dweight, dgate = run(dy, x2, weight, gate, rstd)
    return dx, dweight, dgate if gate is not None else None, None


_rms_norm_fwd.register_autograd(_backward, setup_context=_setup)


class _Eager(torch.autograd.Function):
    """The custom ops' forward and backward outside torch.compile and functorch, without their dispatch."""

    @staticmethod
    def forward(ctx, x2, weight, gate, eps):
        y, rstd = _forward(x2, weight, gate, eps)
        _setup(ctx, (x2, weight, gate, eps), (y, rstd))
        ctx.mark_non_differentiable(rstd)
        return y, rstd

    @staticmethod
    @torch.autograd.function.once_differentiable  # a second derivative would silently be 0: raise instead
    def backward(ctx, dy, drstd):
        return _backward(ctx, dy, drstd, run=_backward_kernels)


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Triton RMSNorm over the last dim (autograd backward included); output in x's dtype."""
    y, _ = eager_or_op(_rms_norm_fwd, _Eager, x.contiguous().view(-1, x.shape[-1]), weight.contiguous(), None,
                       float(eps))
    return y.view(x.shape)


def gated_rms_norm_triton(x: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """sigmoid(gate) * RMSNorm(x) over the last dim in one pass (autograd backward included); output in x's dtype."""
    d = x.shape[-1]
    y, _ = eager_or_op(_rms_norm_fwd, _Eager, x.contiguous().view(-1, d), weight.contiguous(),
                       gate.contiguous().view(-1, d), float(eps))
    return y.view(x.shape)
