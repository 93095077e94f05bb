"""Causal softmax attention with rotary position embeddings (RoPE, base 10,000, on the full head)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kernels.flash_attention import flash4_attention, flash4_takes, flash4_usable
from models.config import ModelConfig

ROPE_BASE = 10_000.0


class _StackedCausalSDPA(torch.autograd.Function):
    """Causal SDPA for ``torch.func.vmap`` over stacked models (packed training): torch has no batching rule
    for the fused attention kernels and would loop over members, so fold the members into the batch."""

    @staticmethod
    def forward(q, k, v):
        """Causal SDPA over (B, H, T, D), as outside vmap."""
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    @staticmethod
    def setup_context(ctx, inputs, output):
        """Nothing to save: only reached through vmap (see below)."""
        pass  # only reached through vmap, whose rule records the fused kernel's own backward

    @staticmethod
    def vmap(info, in_dims, q, k, v):
        """Fold the vmapped members into SDPA's batch axis: one fused call for all of them."""
        n = info.batch_size
        q, k, v = (x.movedim(d, 0) if d is not None else x.expand(n, *x.shape) for x, d in zip((q, k, v), in_dims))
        y = F.scaled_dot_product_attention(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), is_causal=True)
        return y.unflatten(0, (n, -1)), 0


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal attention over (B, H, T, D): FlashAttention 4 where installed and usable (a Hopper GPU), else SDPA;
    one fused SDPA call for all members when vmapped over stacked models."""
    if torch._C._functorch.is_batchedtensor(q):
        return _StackedCausalSDPA.apply(q, k, v)
    if flash4_usable(q):
        return flash4_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def attention_backend(device: str | torch.device, dtype: torch.dtype = torch.bfloat16, head_dim: int = 64) -> str:
    """Which kernels ``causal_attention`` runs on for queries of this device, dtype and head width: fa4 or sdpa."""
    return "fa4" if flash4_takes(torch.device(device), dtype, head_dim) else "sdpa"


@torch.library.custom_op("slab::rope_table", mutates_args=())
def rope_table(t: int, dim: int, base: float, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin, (t, dim / 2) in fp32, of RoPE's angles: position x base^(-2i / dim)."""
    # An opaque op on purpose: inlined, torch.compile recomputed pow, cos and sin (of angles up to T radians,
    # the slow path of range reduction) for every element of q and k, 1.3 ms per layer in fwd+bwd at 135M,
    # T 2048 on an H100 (18% of the step); as a table the kernels only load it.
    inv_freq = base ** (-torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim)
    angles = torch.arange(t, device=device, dtype=torch.float32)[:, None] * inv_freq
    return angles.cos(), angles.sin()


@rope_table.register_fake
def _(t, dim, base, device):
    return torch.empty(t, dim // 2, device=device), torch.empty(t, dim // 2, device=device)


def rotary(x: torch.Tensor, base: float = ROPE_BASE) -> torch.Tensor:
    """Rotate channel pairs (i, i + D/2) of ``x`` (B, T, H, D) by position-dependent angles (RoPE)."""
    cos, sin = rope_table(x.shape[1], x.shape[-1], base, x.device)  # (T, D/2) each
    cos, sin = cos[:, None], sin[:, None]  # the same angles for every head
    # Rotate in fp32 so positions far into a long context keep their precision under bf16 autocast.
    x1, x2 = x.float().chunk(2, dim=-1)
    out = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return out.type_as(x)


class Softmax(nn.Module):
    """Multi-head causal self-attention: fused q/k/v projection, RoPE, SDPA, output projection."""

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        d = config.d_model
        self.n_heads = config.n_heads
        self.wqkv = nn.Linear(d, 3 * d, bias=False)
        self.wo = nn.Linear(d, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Causal attention over (B, T, d) -> (B, T, d)."""
        return self.wo(self.mix(x))

    def mix(self, x: torch.Tensor) -> torch.Tensor:
        """The attention's heads joined, before ``wo`` (B, T, d), which a block may project itself."""
        b, t, d = x.shape
        q, k, v = self.wqkv(x).view(b, t, 3, self.n_heads, d // self.n_heads).unbind(2)
        q, k = rotary(q), rotary(k)
        # Kept in (B, T, H, Dh) memory and handed to SDPA as transposed views, which its fused kernels read as
        # they are: laid out (B, H, T, Dh), q, k, v and the output were each copied once more, forward and
        # backward (1.5% of the 135M step on an H100).
        y = causal_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))  # (B, H, T, Dh)
        return y.transpose(1, 2).reshape(b, t, d)
