"""RMSNorm in Triton: one pass forward (storing each row's rstd), one pass backward for dx and dweight.

Rows are processed ROWS at a time as (ROWS, BLOCK_D) tiles, BLOCK_D the whole row rounded up to a power of two
and masked, so a d of 768 needs no second pass. The backward runs a fixed number of programs, each striding
over row tiles and summing dy * x_hat for its rows in fp32; torch sums those few partial rows into dweight.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

#: Elements per (ROWS, BLOCK_D) tile: a row of 768 (1024 padded) gives 4 rows a program.
TILE = 4096
MAX_ROWS = 16
#: The backward's programs per SM: the rows split evenly, and the partial sums (programs x d, fp32) stay small.
PROGRAMS_PER_SM = 2


def _tiles(d: int) -> tuple[int, int]:
    block_d = triton.next_power_of_2(d)
    return block_d, max(1, min(MAX_ROWS, TILE // block_d))


@triton.jit
def _rms_norm_fwd_kernel(x_ptr, w_ptr, y_ptr, rstd_ptr, M, D, eps, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    row0 = tl.program_id(0).to(tl.int64) * ROWS
    rows = tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_D)
    mask = (row0 + rows < M)[:, None] & (cols < D)[None, :]
    # An int64 base and int32 offsets within the tile: rows * D may pass 2^31 for long inputs, tiles never do.
    offs = rows[:, None] * D + cols[None, :]
    x = tl.load(x_ptr + row0 * D + offs, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=cols < D, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=1) / D + eps)
    tl.store(y_ptr + row0 * D + offs, (x * rstd[:, None] * w[None, :]).to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + row0 + rows, rstd, mask=row0 + rows < M)


@triton.jit
def _rms_norm_bwd_kernel(dy_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, dw_ptr, M, D, ROWS: tl.constexpr,
                         BLOCK_D: tl.constexpr):
    """dx = rstd (w dy - x_hat mean(x_hat w dy)); this program's share of dweight = sum over rows of dy x_hat."""
    pid = tl.program_id(0)
    rows = tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_D)
    offs = rows[:, None] * D + cols[None, :]
    w = tl.load(w_ptr + cols, mask=cols < D, other=0.0).to(tl.float32)
    dw = tl.zeros([ROWS, BLOCK_D], dtype=tl.float32)
    # An int64 start makes the loop's row index int64 (tiles of a long input pass 2^31 elements).
    for row0 in range(pid.to(tl.int64) * ROWS, M, tl.num_programs(0) * ROWS):
        mask = (row0 + rows < M)[:, None] & (cols < D)[None, :]
        x = tl.load(x_ptr + row0 * D + offs, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + row0 * D + offs, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + row0 + rows, mask=row0 + rows < M, other=0.0)
        x_hat = x * rstd[:, None]
        wdy = w[None, :] * dy
        c = tl.sum(x_hat * wdy, axis=1) / D
        dx = (wdy - x_hat * c[:, None]) * rstd[:, None]
        tl.store(dx_ptr + row0 * D + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        dw += dy * x_hat
    tl.store(dw_ptr + pid * D + cols, tl.sum(dw, axis=0), mask=cols < D)


def _num_warps(tile: int, backward: bool) -> int:
    # The backward keeps about six fp32 tiles live: at 8 elements a thread it needs ~120 registers (sm_90,
    # d 768); at 16 it needs 221, and at 32 it spills.
    return min(16, max(4, tile // (256 if backward else 512)))


# Custom ops rather than an autograd.Function: torch.compile keeps them in its graph as opaque calls
# instead of breaking the graph around them (and never traces into the kernels).
@torch.library.custom_op("slab::rms_norm_fwd", mutates_args=())
def _rms_norm_fwd(x2: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    M, d = x2.shape
    block_d, rows = _tiles(d)
    y = torch.empty_like(x2)
    rstd = torch.empty(M, device=x2.device, dtype=torch.float32)
    _rms_norm_fwd_kernel[(triton.cdiv(M, rows),)](x2, weight, y, rstd, M, d, eps, ROWS=rows, BLOCK_D=block_d,
                                                   num_warps=_num_warps(block_d * rows, False))
    return y, rstd


@torch.library.custom_op("slab::rms_norm_bwd", mutates_args=())
def _rms_norm_bwd(dy: torch.Tensor, x2: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    M, d = x2.shape
    block_d, rows = _tiles(d)
    # The interpreter gets two programs, so that tests with three tiles cover a program striding over two.
    sms = torch.cuda.get_device_properties(x2.device).multi_processor_count if x2.is_cuda else 1
    programs = max(1, min(triton.cdiv(M, rows), PROGRAMS_PER_SM * sms))
    dx = torch.empty_like(x2)
    dw = torch.empty(programs, d, device=x2.device, dtype=torch.float32)
    _rms_norm_bwd_kernel[(programs,)](dy.contiguous(), x2, weight, rstd, dx, dw, M, d, ROWS=rows,
                                      BLOCK_D=block_d, num_warps=_num_warps(block_d * rows, True))
    return dx, dw.sum(dim=0).to(weight.dtype)


@_rms_norm_fwd.register_fake
def _(x2, weight, eps):
    return torch.empty_like(x2), x2.new_empty(x2.shape[0], dtype=torch.float32)


@_rms_norm_bwd.register_fake
def _(dy, x2, weight, rstd):
    return torch.empty_like(x2), torch.empty_like(weight)


def _setup(ctx, inputs, output):
    x2, weight, _ = inputs
    ctx.save_for_backward(x2, weight, output[1])


def _backward(ctx, dy, _drstd):
    dx, dweight = _rms_norm_bwd(dy, *ctx.saved_tensors)
    return dx, dweight, None


_rms_norm_fwd.register_autograd(_backward, setup_context=_setup)


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Triton RMSNorm over the last dim (autograd backward included); output in x's dtype."""
    y, _ = _rms_norm_fwd(x.contiguous().view(-1, x.shape[-1]), weight.contiguous(), float(eps))
    return y.view(x.shape)
