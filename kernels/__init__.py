"""Triton kernels beside their naive PyTorch references, and the wrapper of FlashAttention 4's (flash_attention.py);
knows nothing of models."""

from .linear_attention import linear_attention, linear_attention_packed

__all__ = ["linear_attention", "linear_attention_packed"]
