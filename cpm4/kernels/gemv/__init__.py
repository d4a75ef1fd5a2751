"""y = x @ w.T for a few rows of x (decode steps): a Triton kernel that streams w once, beside the plain-PyTorch
reference. Not wired into the model yet: `benchmarks/gemv.py` measures it against cuBLAS first."""

from __future__ import annotations

from .reference import gemv_reference

__all__ = ["gemv_reference"]
