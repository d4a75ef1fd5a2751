"""Compute kernels: each op as a plain-PyTorch `reference.py` beside its GPU implementation."""
