"""Plain PyTorch references for the fused kernels: the ground truth they are tested against and the "torch" backend.

Each is what the LM computes today (nn.RMSNorm, lightning's sigmoid(g) * RMSNorm(o), SwiGLU's silu(w1 x) * w3 x,
a Linear head then F.cross_entropy on fp32 logits), so the benchmark times the fused kernels against the model's own path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm_naive(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) * weight over the last dim, fp32 math, output in x's dtype."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps) * weight.float()
    return y.to(x.dtype)


def gated_rms_norm_naive(x: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """sigmoid(gate) * RMSNorm(x) * weight over the last dim (lightning's output gate), fp32 math, in x's dtype."""
    return (torch.sigmoid(gate.float()) * rms_norm_naive(x.float(), weight, eps)).to(x.dtype)


def swiglu_naive(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """silu(a) * b, the gated unit of a SwiGLU MLP."""
    return F.silu(a) * b


def linear_cross_entropy_naive(
    x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int
) -> torch.Tensor:
    """Mean cross-entropy of the materialised logits x @ weight.T (input dtype), taken in fp32 as the LM does."""
    logits = x @ weight.T
    return F.cross_entropy(logits.float(), targets, ignore_index=ignore_index)
