"""Braid: Mixture-of-Experts training on PyTorch, with expert parallelism and overlap."""

__version__ = "0.1.0"
