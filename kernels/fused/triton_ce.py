"""Linear layer + cross-entropy without the (N, V) logits: chunks of tokens, gradients computed in the forward.

Per chunk of n tokens: logits = x_c @ W^T in the input dtype (a tensor-core GEMM), then `_ce_kernel`, one
program per row, overwrites the logits in place with the gradient of the row's loss, softmax - onehot, zero on ignored
rows, and stores the row's loss. A row of up to ONE_PASS_MAX_V classes is read once into registers; a wider one
twice, an online max / sum-exp pass for the logsumexp (and the target's logit), then the gradient pass.
grad_x_c = dlogits @ W and grad_W += dlogits^T x_c follow at once, so the chunk's logits die before the next
chunk starts; backward only scales the stored gradients by grad_output / n_valid, in fp32 (the approach of
Liger-Kernel's fused linear cross-entropy). Divided by n_valid before they are stored, gradients of ~1 / n_valid would
be rounded into the input dtype: subnormal or zero in fp16 at a training step's token counts. Extra memory: one chunk
of logits, grad_x, and grad_W in fp32.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

#: Widest slice of a logits row one loop step loads.
MAX_BLOCK_V = 4096
NUM_WARPS = 8
#: Rows up to this many classes (rounded up to a power of two) are read once and held in registers, 16 to 32
#: fp32 values a thread (wider rows spill on sm_90).
ONE_PASS_MAX_V = 32768
#: A one-pass row of 16-bit logits is held at 16 bits (NARROW), 64 values a thread rather than 32 (16 warps for a
#: row of 32000): 63 registers on sm_90, so two rows are in flight per SM rather than one, for a second exp an
#: element. One chunk of the 135M model's loss (4096 x 32000 bf16, H200): 152 us against 174 us.
NARROW_ROWS = True
#: Fewest tokens a default chunk takes (below N): see default_chunk_tokens.
MIN_CHUNK_TOKENS = 4096


def default_chunk_tokens(n: int, vocab: int, d: int) -> int:
    """Tokens per chunk: ceil(N / ceil(V / d)) (chunk logits about the size of x), but at least MIN_CHUNK_TOKENS.

    Memory grows with the chunk; time grows with the number of chunks, since each adds its (V, d) product into
    the fp32 grad_W: about 8 V d bytes of traffic a chunk against 6 V d FLOPs of GEMMs a token, an overhead
    near 270 / chunk on an H100 (3 TB/s, ~600 TFLOP/s bf16; an estimate, not a measurement). At 8 x 2048
    tokens, V 32000 and d 768 the first rule alone gives 391-token chunks (~+70%); 4096 tokens cost ~7% and
    262 MB of bf16 logits, against the several GB of fp32 logits and their gradients the unfused loss keeps.
    """
    return min(n, max(math.ceil(n / math.ceil(vocab / d)), MIN_CHUNK_TOKENS))


@triton.jit
def _widen(z):
    """z (16-bit) as fp32, for bf16 by moving its bits: an op of its own, which the compiler does not merge with
    another conversion of z, so that z stays held at 16 bits rather than as a converted copy."""
    if z.dtype == tl.bfloat16:
        return (z.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    return z.to(tl.float32)


@triton.jit
def _imax(a, b):
    return tl.maximum(a, b)


@triton.jit
def _max16(z):
    """Max of a 16-bit float row, reduced at 16 bits: by an integer key that orders the floats' bit patterns.

    Not tl.max, which widens the row to fp32 and keeps that copy; not tl.maximum on bf16, which Triton's
    interpreter orders by bit pattern (as unsigned integers: every negative above every positive).
    """
    bits = z.to(tl.int16, bitcast=True)
    # Sign and magnitude to two's complement order: a negative float's magnitude bits are flipped.
    key = bits ^ ((bits >> 15) & 0x7FFF).to(tl.int16)
    best = tl.reduce(key, 0, _imax)  # not tl.max, which would widen the keys to int32
    best = best ^ ((best >> 15) & 0x7FFF).to(tl.int16)
    return best.to(z.dtype, bitcast=True).to(tl.float32)


@triton.jit
def _ce_kernel(logits_ptr, targets_ptr, loss_ptr, V, ignore_index, BLOCK_V: tl.constexpr,
               WRITE_GRAD: tl.constexpr, ONE_PASS: tl.constexpr, NARROW: tl.constexpr = False):
    row = tl.program_id(0).to(tl.int64)
    ptr = logits_ptr + row * V
    target = tl.load(targets_ptr + row)
    valid = target != ignore_index
    # A target outside [0, V) cannot be refused without a host sync; it makes the row's loss and gradient NaN
    # instead, so that the mean loss shows it, rather than the logsumexp alone passing for a loss.
    poison = tl.where(valid & ((target < 0) | (target >= V)), float("nan"), 0.0)
    cols = tl.arange(0, BLOCK_V)
    # The row's own gradient: the mean's 1 / n_valid is applied in fp32 by the backward.
    scale = tl.where(valid, 1.0, 0.0) + poison
    if ONE_PASS:
        # The whole row in registers: one read, and the gradient written from it. The target's logit is loaded on
        # its own and its gradient stored last, so that no (BLOCK_V,) comparison with the target is held: with it
        # the kernel spills (sm_90, V 32000).
        mask = cols < V
        has_target = valid & (target >= 0) & (target < V)
        z_target = tl.load(ptr + target, mask=has_target, other=0.0).to(tl.float32)
        if NARROW:
            # The row held as loaded (16-bit), half the registers of fp32, so that more rows are in flight per SM;
            # the exps are taken twice, once for the sum and once for the gradient.
            z16 = tl.load(ptr + cols, mask=mask, other=-float("inf"))
            m = _max16(z16)
            s = tl.sum(tl.exp(z16.to(tl.float32) - m), axis=0)
            lse = m + tl.log(s)
            tl.store(loss_ptr + row, tl.where(valid, lse - z_target, 0.0) + poison)
            if WRITE_GRAD:
                g = tl.exp(_widen(z16) - lse) * scale
                tl.store(ptr + cols, g.to(logits_ptr.dtype.element_ty), mask=mask)
        else:
            z = tl.load(ptr + cols, mask=mask, other=-float("inf")).to(tl.float32)
            m = tl.max(z, axis=0)
            p = tl.exp(z - m)
            s = tl.sum(p, axis=0)
            tl.store(loss_ptr + row, tl.where(valid, m + tl.log(s) - z_target, 0.0) + poison)
            if WRITE_GRAD:
                tl.store(ptr + cols, (p * (scale / s)).to(logits_ptr.dtype.element_ty), mask=mask)
        if WRITE_GRAD:
            # Every thread's store of the row lands before the target's entry is overwritten.
            tl.debug_barrier()
            g_target = (tl.exp(z_target - m) / s - 1.0) * scale
            tl.store(ptr + target, g_target.to(logits_ptr.dtype.element_ty), mask=has_target)
    else:
        m = -float("inf")
        s = 0.0
        z_target = 0.0
        for v0 in range(0, V, BLOCK_V):
            z = tl.load(ptr + v0 + cols, mask=v0 + cols < V, other=-float("inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(z, axis=0))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
            m = m_new
            # Picked out of the loaded slice rather than loaded on its own: no scalar gather, no access past V.
            z_target += tl.sum(tl.where(v0 + cols == target, z, 0.0), axis=0)
        lse = m + tl.log(s)
        tl.store(loss_ptr + row, tl.where(valid, lse - z_target, 0.0) + poison)
        if WRITE_GRAD:
            for v0 in range(0, V, BLOCK_V):
                mask = v0 + cols < V
                z = tl.load(ptr + v0 + cols, mask=mask, other=0.0).to(tl.float32)
                g = (tl.exp(z - lse) - tl.where(v0 + cols == target, 1.0, 0.0)) * scale
                tl.store(ptr + v0 + cols, g.to(logits_ptr.dtype.element_ty), mask=mask)


def _ce_launch(V: int, dtype: torch.dtype) -> tuple[int, bool, bool, int]:
    """(BLOCK_V, ONE_PASS, NARROW, num_warps) of `_ce_kernel` for rows of V classes in `dtype`."""
    width = triton.next_power_of_2(V)
    if width <= ONE_PASS_MAX_V:
        narrow = NARROW_ROWS and dtype in (torch.bfloat16, torch.float16)
        return width, True, narrow, min(32, max(NUM_WARPS, width // (2048 if narrow else 1024)))
    return MAX_BLOCK_V, False, False, NUM_WARPS


# Custom ops rather than an autograd.Function: torch.compile keeps them in its graph as opaque calls
# instead of breaking the graph around them. A gradient that is not needed comes back as an empty tensor.
@torch.library.custom_op("slab::linear_ce_fwd", mutates_args=())
def _linear_ce_fwd(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int, chunk: int,
                   need_dx: bool, need_dw: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The mean loss, dx and dW of the summed (not mean) loss, and n_valid (a device tensor: no host sync)."""
    N, d = x.shape
    V = weight.shape[0]
    block_v, one_pass, narrow, warps = _ce_launch(V, x.dtype)
    n_valid = (targets != ignore_index).sum().float()
    loss_rows = torch.empty(N, device=x.device, dtype=torch.float32)
    dx = torch.empty_like(x) if need_dx else x.new_empty(0)
    dw = torch.zeros(V, d, device=x.device, dtype=torch.float32) if need_dw else x.new_empty(0, dtype=torch.float32)
    for start in range(0, N, chunk):
        end = min(start + chunk, N)
        xc = x[start:end]
        logits = xc @ weight.T
        _ce_kernel[(end - start,)](logits, targets[start:end], loss_rows[start:end], V, ignore_index,
                                   BLOCK_V=block_v, WRITE_GRAD=need_dx or need_dw, ONE_PASS=one_pass,
                                   NARROW=narrow, num_warps=warps)
        if need_dx:
            torch.mm(logits, weight, out=dx[start:end])
        if need_dw:
            _add_product(dw, logits.T, xc)
    return loss_rows.sum() / n_valid, dx, dw, n_valid


def _add_product(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b, with acc fp32 and a, b in the input dtype: the product is summed into acc in fp32, never rounded.

    On CUDA one GEMM adds into acc (cuBLAS's beta = 1) where torch's addmm takes an fp32 accumulator for bf16 / fp16
    operands. Before, each chunk's (V, d) product came out in bf16 and a separate pass added it into acc: 0.72 ms of
    a 50.6 ms 135M lightning step at 32k tokens (8 chunks) on an H200.
    """
    if not acc.is_cuda or a.dtype == acc.dtype:
        acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))
    elif _addmm_into_fp32(acc.device):
        torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
    else:
        acc += a @ b  # the product rounded to the input dtype, then added


@functools.lru_cache(maxsize=None)
def _addmm_into_fp32(device: torch.device) -> bool:
    """Whether this torch's addmm on `device` adds a bf16 product into an fp32 tensor (newer torch; older ones refuse
    an accumulator whose dtype is not the operands')."""
    acc = torch.zeros(16, 16, device=device)
    a = torch.zeros(16, 16, device=device, dtype=torch.bfloat16)
    try:
        torch.addmm(acc, a, a, out_dtype=torch.float32, out=acc)
    except (RuntimeError, TypeError):
        return False
    return True


@_linear_ce_fwd.register_fake
def _(x, weight, targets, ignore_index, chunk, need_dx, need_dw):
    dx = torch.empty_like(x) if need_dx else x.new_empty(0)
    dw = weight.new_empty(weight.shape, dtype=torch.float32) if need_dw else x.new_empty(0, dtype=torch.float32)
    return x.new_empty((), dtype=torch.float32), dx, dw, x.new_empty((), dtype=torch.float32)


def _setup(ctx, inputs, output):
    x, weight, *_, need_dx, need_dw = inputs
    ctx.save_for_backward(output[1], output[2], output[3])
    ctx.need, ctx.weight_dtype = (need_dx, need_dw), weight.dtype


def _backward(ctx, grad_loss, _gdx, _gdw, _gn):
    dx, dw, n_valid = ctx.saved_tensors
    # The mean's 1 / n_valid; with every row ignored, dx and dw are zero and stay so.
    scale = grad_loss.float() / n_valid.clamp_min(1.0)
    grad_x = None
    if ctx.need[0]:
        # fp16 tops out at 65504, below GradScaler's usual loss scale 65536: scale in fp32, then round
        grad_x = (dx.float() * scale).to(dx.dtype) if dx.dtype == torch.float16 else dx * scale.to(dx.dtype)
    grad_w = (dw * scale).to(ctx.weight_dtype) if ctx.need[1] else None
    return grad_x, grad_w, None, None, None, None, None


_linear_ce_fwd.register_autograd(_backward, setup_context=_setup)


def linear_cross_entropy_triton(
    x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int, chunk_tokens: int | None
) -> torch.Tensor:
    """Chunked mean cross-entropy of x (N, d) @ weight (V, d)^T against targets (N,); scalar fp32 (autograd ready)."""
    N, d = x.shape
    chunk = chunk_tokens or default_chunk_tokens(N, weight.shape[0], d)
    need = torch.is_grad_enabled()
    loss, *_ = _linear_ce_fwd(
        x, weight, targets.contiguous(), int(ignore_index), int(chunk), need and x.requires_grad,
        need and weight.requires_grad,
    )
    return loss
