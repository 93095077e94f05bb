"""Chunked gated linear attention in plain PyTorch: the CPU training path, differentiable by autograd.

Lightning Attention-2 (arXiv 2401.04658) tiling: inside a chunk, a masked decayed attention matrix; across
chunks, a state passed from chunk to chunk. Decays are always taken relative to a later position of the
same chunk (b_i - b_j with i >= j, b the in-chunk cumulative log decay), so no exp of a positive number
appears however strong the decay.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

#: Chunk length for scalar decays (constant or per token): the intra-chunk mask is a (C, C) matrix.
SCALAR_CHUNK = 64
#: Chunk length for per-channel decays: the intra-chunk decay is a (C, C, K) tensor, so keep C small.
CHANNEL_CHUNK = 16
#: Log decays below this are taken as this (the Triton backend does the same): e^-30
#: is 1e-13, a reset of the state as far as fp32 can tell, while far stronger values (-1e4, or -inf, log(0), a
#: document boundary) put running sums of ~1e5 or -inf - -inf = NaN into the chunk's differences b_i - b_j.
LOG_DECAY_FLOOR = -30.0


def linear_attention_chunked(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_decay: torch.Tensor,
    scale: float,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunked forward in fp32 for any of the three log-decay forms; o has v's dtype, the state is fp32."""
    batch, time, heads, dk = q.shape
    dv = v.shape[-1]
    log_decay = log_decay.clamp_min(LOG_DECAY_FLOOR)  # NaN stays NaN; below the floor the gradient is 0, as e^a's is
    per_channel = log_decay.dim() == 4
    size = chunk_size or (CHANNEL_CHUNK if per_channel else SCALAR_CHUNK)
    n_chunks = -(-time // size)
    pad = n_chunks * size - time

    # (B, T, H, D) -> (B, H, N, C, D); zero padding at the end changes neither outputs nor the final state
    # (k = 0 adds nothing, log decay 0 keeps the state).
    def chunks(x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x.float(), (0, 0, 0, 0, 0, pad))
        return x.view(batch, n_chunks, size, heads, x.shape[-1]).permute(0, 3, 1, 2, 4)

    if log_decay.dim() == 1:
        a = log_decay.float().view(1, 1, heads, 1).expand(batch, time, heads, 1)
    elif log_decay.dim() == 3:
        a = log_decay.unsqueeze(-1)
    else:
        a = log_decay
    qc, kc, vc, b = chunks(q) * scale, chunks(k), chunks(v), chunks(a).cumsum(dim=3)
    b_last = b[:, :, :, -1:, :]  # (B, H, N, 1, Kd): log decay over the whole chunk

    causal = torch.ones(size, size, dtype=torch.bool, device=q.device).tril()
    diff = b[:, :, :, :, None, :] - b[:, :, :, None, :, :]  # (B, H, N, C, C, Kd): b_i - b_j
    # Fill the upper triangle before exp: there b_i - b_j > 0 and could overflow.
    decay = diff.masked_fill(~causal[:, :, None], float("-inf")).exp()
    if per_channel:
        attn = torch.einsum("bhnik,bhnjk,bhnijk->bhnij", qc, kc, decay)
    else:
        attn = (qc @ kc.transpose(-1, -2)) * decay[..., 0]
    o = attn @ vc

    # Each chunk's own contribution to the state it hands on, then a cheap sequential pass over chunks.
    contrib = (kc * (b_last - b).exp()).transpose(-1, -2) @ vc  # (B, H, N, K, V)
    chunk_decay = b_last[:, :, :, 0, :].exp()[..., None]  # (B, H, N, Kd, 1)
    state = q.new_zeros(batch, heads, dk, dv, dtype=torch.float32) if initial_state is None else initial_state.float()
    entering = []
    for n in range(n_chunks):
        entering.append(state)
        state = chunk_decay[:, :, n] * state + contrib[:, :, n]
    o = o + (qc * b.exp()) @ torch.stack(entering, dim=2)

    o = o.permute(0, 2, 3, 1, 4).reshape(batch, n_chunks * size, heads, dv)[:, :time]
    return o.to(v.dtype), (state if output_final_state else None)
