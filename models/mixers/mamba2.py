"""Mamba2's selective state space layer (SSD; Dao & Gu 2024, arXiv 2405.21060) as linear attention.

``in_proj`` gives (z, x, B, C, dt) of widths (d_inner, d_inner, N, N, H); a short causal depthwise conv
(width 4) + SiLU runs over the concatenated (x, B, C); ``dt = softplus(dt + dt_bias)``, ``A = -exp(A_log)``
one scalar per head. In linear-attention terms q = C, k = B (one group shared by all heads),
v = dt * x (heads of width P = d_inner / H), log-decay ``dt * A`` per head and token, scale 1.
Then ``y = o + D * x``, ``y = RMSNorm(y * SiLU(z))`` over d_inner, and ``out_proj``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

import kernels
from models.config import MAMBA_D_CONV, ModelConfig

DT_MIN, DT_MAX = 1e-3, 1e-1


class Mamba2(nn.Module):
    """Mamba2 (SSD) token mixer with per-head data-dependent decay through ``kernels.linear_attention``."""

    #: Which ``kernels.linear_attention`` backend to use; tests set "naive" or "torch" to compare them.
    backend = "auto"

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        d, h = config.d_model, config.n_heads
        self.n_heads, self.d_inner, self.d_state = h, config.mamba_d_inner, config.mamba_d_state
        if self.d_inner % h:
            raise ValueError(f"mamba2 inner width {self.d_inner} is not divisible by n_heads {h}")
        conv = self.d_inner + 2 * self.d_state
        self.in_proj = nn.Linear(d, 2 * self.d_inner + 2 * self.d_state + h, bias=False)
        self.conv_weight = nn.Parameter(torch.empty(conv, 1, MAMBA_D_CONV))
        self.conv_bias = nn.Parameter(torch.empty(conv))
        self.dt_bias = nn.Parameter(torch.empty(h))
        self.A_log = nn.Parameter(torch.empty(h))
        self.D = nn.Parameter(torch.empty(h))
        self.norm = nn.RMSNorm(self.d_inner, eps=1e-6)
        self.out_proj = nn.Linear(self.d_inner, d, bias=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Mamba2's initialisation of the SSM parameters (the linear layers are initialised by the LM)."""
        bound = 1 / math.sqrt(MAMBA_D_CONV)  # nn.Conv1d's default for a depthwise filter of width 4
        self.conv_weight.uniform_(-bound, bound)
        self.conv_bias.uniform_(-bound, bound)
        self.A_log.copy_(torch.empty_like(self.A_log).uniform_(1, 16).log())
        self.D.fill_(1.0)
        # dt log-uniform in [DT_MIN, DT_MAX]; dt_bias is its inverse softplus, so softplus(dt_bias) = dt.
        dt = torch.exp(torch.empty_like(self.dt_bias).uniform_(math.log(DT_MIN), math.log(DT_MAX)))
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """SSD over (B, T, d) -> (B, T, d)."""
        b, t, _ = x.shape
        h, n, p = self.n_heads, self.d_state, self.d_inner // self.n_heads
        z, xbc, dt = self.in_proj(x).split([self.d_inner, self.d_inner + 2 * n, h], dim=-1)
        # Causal depthwise conv: pad on the left only by cutting the right overhang.
        xbc = F.conv1d(
            xbc.transpose(1, 2), self.conv_weight, self.conv_bias, padding=MAMBA_D_CONV - 1, groups=xbc.shape[-1]
        )
        xbc = F.silu(xbc[..., :t].transpose(1, 2))
        xs, bmat, cmat = xbc.split([self.d_inner, n, n], dim=-1)
        dt = F.softplus(dt.float() + self.dt_bias)  # (B, T, H)
        log_decay = dt * -torch.exp(self.A_log.float())
        xs = xs.reshape(b, t, h, p)
        q = cmat[:, :, None, :].expand(b, t, h, n).contiguous()
        k = bmat[:, :, None, :].expand(b, t, h, n).contiguous()
        v = xs * dt[..., None].to(xs.dtype)
        o, _ = kernels.linear_attention(q, k, v, log_decay, scale=1.0, backend=self.backend)
        y = o + self.D[:, None].to(xs.dtype) * xs
        y = y.reshape(b, t, self.d_inner) * F.silu(z)
        # At least fp32 into the norm (its weight's dtype: the fused RMSNorm under autocast), never below the weights'
        # dtype: a float64 or bf16 model outside autocast keeps its own dtype for out_proj.
        return self.out_proj(self.norm(y.to(torch.promote_types(y.dtype, self.norm.weight.dtype))))
