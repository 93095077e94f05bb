"""Triton kernels beside their naive PyTorch references; knows nothing of models."""

from .linear_attention import linear_attention

__all__ = ["linear_attention"]
