"""Lightning attention (MiniMax-01, arXiv 2501.08313; TransNormerLLM, arXiv 2307.14995).

Linear attention with a constant decay per head that depends on depth: q, k, v = SiLU of one joint
projection, no softmax denominator and no other feature map, and a gated, normalised output
``wo(sigmoid(wgate x) * RMSNorm(attention))``.

Decay: MiniMax's released code uses ALiBi-style slopes ``s_{j,l} = 2^(-8j/H) * (1 - l/(L-1) + 1e-5)`` for
head ``j = 1..H`` at layer ``l = 0..L-1`` and decays each step by ``exp(-s)``: the first layer forgets
fastest, the last barely decays. We follow MiniMax, not flash-linear-attention's ``chunk_lightning_attn``
rule (linear in the head index, head 0 never decays). With a single layer (L = 1) ``l/(L-1)`` is taken as 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import kernels
from kernels.fused import gated_rms_norm
from kernels.gemm_epilogue import epilogues_usable, linear_silu
from models.config import ModelConfig


def lightning_slopes(n_heads: int, layer_idx: int, n_layers: int) -> torch.Tensor:
    """MiniMax's per-head decay rates ``s_{j,l}`` (positive; the log-decay is ``-s``), shape (H,)."""
    depth = layer_idx / (n_layers - 1) if n_layers > 1 else 0.0
    j = torch.arange(1, n_heads + 1, dtype=torch.float64)
    return (2.0 ** (-8.0 * j / n_heads) * (1.0 - depth + 1e-5)).float()


class GatedRMSNorm(nn.RMSNorm):
    """Lightning's output gate ``sigmoid(gate) * RMSNorm(x)``; its parameter is the RMSNorm's weight."""

    def forward(self, x: torch.Tensor, gate: torch.Tensor, backend: str = "auto") -> torch.Tensor:
        """(..., d) twice -> (..., d) in x's dtype; one fused kernel on CUDA (``kernels.fused.gated_rms_norm``)."""
        # Fused by hand: it sits between the linear attention and two matmuls, where torch.compile has nothing to
        # fuse it with, and compiled its backward to about 2.5x the time the bytes it moves need (135M, H200).
        return gated_rms_norm(x, gate, self.weight, self.eps, backend=backend)


class Lightning(nn.Module):
    """Gated linear attention with fixed per-head decay, computed by ``kernels.linear_attention``."""

    #: Which ``kernels.linear_attention`` backend to use; tests set "naive" or "torch" to compare them.
    backend = "auto"
    #: Whether the q, k, v SiLU runs in the projection's epilogue where it can (``kernels.gemm_epilogue``); the LM
    #: sets it for its "gemm" kernels.
    gemm_epilogues = False

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        d = config.d_model
        self.n_heads = config.n_heads
        self.wqkv = nn.Linear(d, 3 * d, bias=False)
        self.wgate = nn.Linear(d, d, bias=False)
        self.wo = nn.Linear(d, d, bias=False)
        self.norm = GatedRMSNorm(d, eps=1e-6)
        # A fixed property of the architecture, rebuilt from the config: kept out of the checkpoint.
        slopes = lightning_slopes(config.n_heads, layer_idx, config.n_layers)
        self.register_buffer("log_decay", -slopes, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Lightning attention over (B, T, d) -> (B, T, d)."""
        return self.wo(self.mix(x))

    def mix(self, x: torch.Tensor) -> torch.Tensor:
        """The gated, normalised attention output before ``wo`` (B, T, d), which a block may project itself."""
        b, t, d = x.shape
        # The joint projection's SiLU goes to the kernels as it is, (B, T, 3, H, Dh): they read q, k and v in place
        # and write their gradients in that layout, so that no copy splits q, k, v or stacks dq, dk, dv.
        if self.gemm_epilogues and epilogues_usable(x, 3 * d):
            qkv = linear_silu(x, self.wqkv.weight)
        else:
            qkv = F.silu(self.wqkv(x))
        qkv = qkv.view(b, t, 3, self.n_heads, d // self.n_heads)
        o, _ = kernels.linear_attention_packed(qkv, self.log_decay, backend=self.backend)
        backend = {"naive": "torch", "torch": "torch"}.get(self.backend, self.backend)
        return self.norm(o.reshape(b, t, d), self.wgate(x), backend=backend)
