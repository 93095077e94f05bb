"""Triton kernels beside their naive PyTorch references; knows nothing of models."""

from .linear_attention import linear_attention, linear_attention_packed

__all__ = ["linear_attention", "linear_attention_packed"]
