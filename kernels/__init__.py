"""Triton kernels beside their naive PyTorch references; knows nothing of models."""
