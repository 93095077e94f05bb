"""Lightning's mixer as one op under "gemm" kernels, from its input to its gated output: the joint q, k, v projection
with its SiLU (quack's epilogue GEMM, ``kernels.gemm_epilogue``), the gate's projection, the linear attention's packed
kernels and the gated RMSNorm, with a backward of its own.

Why one op: as separate ops, the gate's gradient (from the norm's backward) and the q, k, v pre-activation's (the
SiLU's backward of the walks' gradient) reach two projections, each with its input-gradient GEMM, whose two (M, d)
outputs the block's norm then reads and adds, and its weight-gradient GEMM, each reading the input. Here the norm's
backward and the SiLU's write their gradients side by side into one (M, 4d) buffer, so the input's gradient and the
weights' are one GEMM each: two (M, d) passes and one read of the input fewer a layer (about 0.6 GB at the 135M model's
131,072 tokens). Taken where ``Lightning.one_op`` is set and ``mixer_usable`` holds; the plain path computes the same.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import kernels.gemm_epilogue as ge
from kernels.fused.triton_norm import gated_rms_norm_backward, gated_rms_norm_forward
from kernels.linear_attention.triton_chunk import MAX_BATCH_HEADS, packed_backward, packed_forward


def mixer_usable(x: torch.Tensor, log_decay: torch.Tensor) -> bool:
    """Whether ``lightning_mix`` takes x (B, T, d): the epilogue GEMMs usable for it (``epilogues_usable``), a decay
    per head, and at most the packed kernels' batch x heads in one launch."""
    return (x.dim() == 3 and log_decay.dim() == 1 and x.shape[0] * log_decay.shape[0] <= MAX_BATCH_HEADS
            and ge.epilogues_usable(x, 3 * x.shape[-1]))


def _forward(x, wqkv, wgate, norm_w, log_decay, scale: float, eps: float):
    b, t, d = x.shape
    heads = log_decay.shape[0]
    x2 = x.view(-1, d)
    # quack's module and pinned tiles read through gemm_epilogue at each call (tests stand a fake in for quack there).
    pre, post = ge._quack().gemm_act(x2, wqkv.T, activation="silu", store_preact=True, tuned=False,
                                     config=ge._config("silu"))
    gate = x2 @ wgate.T
    o = packed_forward(post.view(b, t, 3, heads, d // heads), log_decay, scale).view(-1, d)
    out, rstd = gated_rms_norm_forward(o, gate, norm_w, eps)
    return out.view(x.shape), pre, post, gate, o, rstd


def _backward(x, wqkv, wgate, norm_w, log_decay, pre, post, gate, o, rstd, dout, scale: float):
    b, t, d = x.shape
    heads = log_decay.shape[0]
    # The q, k, v pre-activation's gradient in the first 3d columns, the gate's in the last d: as the rows of the
    # weights stacked (wqkv over wgate), so one GEMM makes the input's gradient and one the weights'.
    grad = torch.empty(b * t, 4 * d, dtype=x.dtype, device=x.device)
    do, dnorm_w = gated_rms_norm_backward(dout.view(-1, d), o, gate, norm_w, rstd, grad[:, 3 * d:])
    dpost = packed_backward(post.view(b, t, 3, heads, d // heads), log_decay, do.view(b, t, heads, d // heads), scale)
    torch.ops.aten.silu_backward.grad_input(dpost.view(-1, 3 * d), pre, grad_input=grad[:, :3 * d])
    dx = grad @ torch.cat((wqkv, wgate))
    return dx.view(x.shape), grad.T @ x.view(-1, d), dnorm_w


@torch.library.custom_op("slab::lightning_mix", mutates_args=())
def lightning_mix_op(x: torch.Tensor, wqkv: torch.Tensor, wgate: torch.Tensor, norm_w: torch.Tensor,
                     log_decay: torch.Tensor, scale: float, eps: float
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """sigmoid(x wgate^T) * RMSNorm(LA(SiLU(x wqkv^T))) * norm_w for x (B, T, d) contiguous, in x's shape, LA the linear
    attention with one log decay per head; also what the backward reads: the projection before and after its SiLU
    (M, 3d), the gate (M, d), the attention's output (M, d) and the norm's rstd (M,)."""
    return _forward(x, wqkv, wgate, norm_w, log_decay, scale, eps)


@lightning_mix_op.register_fake
def _(x, wqkv, wgate, norm_w, log_decay, scale, eps):
    m, d = x.shape[0] * x.shape[1], x.shape[-1]
    return (torch.empty_like(x), x.new_empty(m, 3 * d), x.new_empty(m, 3 * d), x.new_empty(m, d), x.new_empty(m, d),
            x.new_empty(m, dtype=torch.float32))


@torch.library.custom_op("slab::lightning_mix_backward", mutates_args=())
def lightning_mix_backward_op(x: torch.Tensor, wqkv: torch.Tensor, wgate: torch.Tensor, norm_w: torch.Tensor,
                              log_decay: torch.Tensor, pre: torch.Tensor, post: torch.Tensor, gate: torch.Tensor,
                              o: torch.Tensor, rstd: torch.Tensor, dout: torch.Tensor, scale: float
                              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dx, the stacked weights' gradient (4d, d: wqkv's rows, then wgate's) and dnorm_w of ``lightning_mix_op``."""
    return _backward(x, wqkv, wgate, norm_w, log_decay, pre, post, gate, o, rstd, dout, scale)


@lightning_mix_backward_op.register_fake
def _(x, wqkv, wgate, norm_w, log_decay, pre, post, gate, o, rstd, dout, scale):
    d = x.shape[-1]
    return torch.empty_like(x), x.new_empty(4 * d, d), torch.empty_like(norm_w)


def _save(ctx, inputs, output):
    x, wqkv, wgate, norm_w, log_decay, scale, _ = inputs
    _, pre, post, gate, o, rstd = output
    ctx.save_for_backward(x, wqkv, wgate, norm_w, log_decay, pre, post, gate, o, rstd)
    ctx.mark_non_differentiable(pre, post, gate, o, rstd)  # the backward's own reads, not results
    ctx.set_materialize_grads(False)
    ctx.scale = scale


def _op_backward(ctx, dout, *_unused):
    if dout is None:
        return (None,) * 7
    dx, dw, dnorm_w = lightning_mix_backward_op(*ctx.saved_tensors, dout.contiguous(), ctx.scale)
    d = dx.shape[-1]
    return dx, dw[:3 * d], dw[3 * d:], dnorm_w, None, None, None


lightning_mix_op.register_autograd(_op_backward, setup_context=_save)


def lightning_mix(x: torch.Tensor, wqkv: torch.Tensor, wgate: torch.Tensor, norm_w: torch.Tensor,
                  log_decay: torch.Tensor, eps: float) -> torch.Tensor:
    """Lightning's gated attention output before its output projection, (B, T, d) in x's dtype, as one op (callers
    check ``mixer_usable`` first); the scale is the mixer's, 1 / sqrt(head dim)."""
    d = x.shape[-1]
    scale = (d // log_decay.shape[0]) ** -0.5
    out, *_ = lightning_mix_op(x.contiguous(), wqkv.to(x.dtype), wgate.to(x.dtype), norm_w, log_decay, scale,
                               float(eps))
    return out


def lightning_mix_reference(x: torch.Tensor, wqkv: torch.Tensor, wgate: torch.Tensor, norm_w: torch.Tensor,
                            log_decay: torch.Tensor, eps: float, backend: str = "naive") -> torch.Tensor:
    """What ``lightning_mix`` computes, in plain PyTorch (the linear attention on ``backend``: the naive recurrence,
    or "torch", chunked)."""
    from kernels.linear_attention import linear_attention_packed

    b, t, d = x.shape
    qkv = F.silu(F.linear(x, wqkv)).view(b, t, 3, log_decay.shape[0], -1)
    o, _ = linear_attention_packed(qkv, log_decay, backend=backend)
    return torch.sigmoid(F.linear(x, wgate)) * F.rms_norm(o.reshape(b, t, d), (d,), norm_w, eps)
