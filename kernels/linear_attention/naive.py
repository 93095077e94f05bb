"""Step-by-step recurrence of gated linear attention in fp32: the ground truth the fast paths are tested against.

Per head, S_t = diag(exp(a_t)) S_{t-1} + k_t^T v_t and o_t = scale * q_t S_t (REFERENCES.md section 3).
"""

from __future__ import annotations

import torch


def expand_log_decay(log_decay: torch.Tensor, batch: int, time: int, heads: int, dk: int) -> torch.Tensor:
    """Broadcast any of the three log-decay forms, (H,), (B, T, H) or (B, T, H, K), to a (B, T, H, K) view."""
    if log_decay.dim() == 1:
        return log_decay.view(1, 1, heads, 1).expand(batch, time, heads, dk)
    if log_decay.dim() == 3:
        return log_decay.unsqueeze(-1).expand(batch, time, heads, dk)
    return log_decay


def linear_attention_naive(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_decay: torch.Tensor,
    scale: float,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run the recurrence one token at a time in fp32 (differentiable by autograd); o has v's dtype."""
    batch, time, heads, dk = q.shape
    dv = v.shape[-1]
    qf, kf, vf = q.float(), k.float(), v.float()
    decay = expand_log_decay(log_decay.float(), batch, time, heads, dk).exp()
    if initial_state is None:
        state = q.new_zeros(batch, heads, dk, dv, dtype=torch.float32)
    else:
        state = initial_state.float()
    outputs = []
    for t in range(time):
        state = decay[:, t, :, :, None] * state + kf[:, t, :, :, None] * vf[:, t, :, None, :]
        outputs.append(torch.einsum("bhk,bhkv->bhv", qf[:, t], state) * scale)
    o = torch.stack(outputs, dim=1).to(v.dtype)
    return o, (state if output_final_state else None)
