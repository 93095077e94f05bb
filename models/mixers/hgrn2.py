"""HGRN2 (Qin et al. 2024, arXiv 2404.07904): a gated linear RNN with state expansion.

Per head: forget gate ``f_t = gamma_l + (1 - gamma_l) * sigmoid(wf x_t)`` per key channel, key
``k_t = 1 - f_t``, query ``q_t = SiLU(wq x_t)``, input ``v_t = wi x_t``;
``S_t = Diag(f_t) S_{t-1} + k_t^T v_t``, ``o_t = q_t S_t`` (no scale, as in the paper); then RMSNorm and
the output projection. The state expansion (key width per head) is the head width d / n_heads.

Simplification: HGRN2 learns its lower bounds (a parameter Gamma of shape (L, d); gamma = cumsum of a
softmax over layers, minus the first). We fix ``gamma_l = l / n_layers`` instead: 0 in the first layer,
rising with depth as the learned bounds do, so deeper layers remember longer, with no extra parameters.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

import kernels
from models.config import ModelConfig


class HGRN2(nn.Module):
    """HGRN2 token mixer: per-channel data-dependent decay through ``kernels.linear_attention``."""

    #: Which ``kernels.linear_attention`` backend to use; tests set "naive" or "torch" to compare them.
    backend = "auto"

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        d = config.d_model
        self.n_heads = config.n_heads
        self.gamma = layer_idx / config.n_layers  # forget-gate lower bound of this layer
        self.wq = nn.Linear(d, d, bias=False)
        self.wf = nn.Linear(d, d, bias=False)
        self.wi = nn.Linear(d, d, bias=False)
        self.wo = nn.Linear(d, d, bias=False)
        self.norm = nn.RMSNorm(d, eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """HGRN2 recurrence over (B, T, d) -> (B, T, d)."""
        b, t, d = x.shape
        heads = (b, t, self.n_heads, d // self.n_heads)
        g = self.wf(x).float()
        # log f = log(gamma + (1 - gamma) sigmoid(g)), in log space so strong decays stay exact.
        log_f = F.logsigmoid(g)
        if self.gamma > 0:
            log_f = torch.logaddexp(torch.full_like(g, math.log(self.gamma)), math.log1p(-self.gamma) + log_f)
        k = (1.0 - self.gamma) * torch.sigmoid(-g)  # 1 - f, without cancellation near f = 1
        q = F.silu(self.wq(x))
        v = self.wi(x)
        o, _ = kernels.linear_attention(
            q.view(heads), k.to(q.dtype).view(heads), v.view(heads), log_f.view(heads), scale=1.0, backend=self.backend
        )
        # At least fp32 into the norm (its weight's dtype: the fused RMSNorm under autocast), never below the weights'
        # dtype: a float64 or bf16 model outside autocast keeps its own dtype for wo.
        o = o.reshape(b, t, d)
        return self.wo(self.norm(o.to(torch.promote_types(o.dtype, self.norm.weight.dtype))))
