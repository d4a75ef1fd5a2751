"""y = x @ w.T for a few rows of x (decode steps): a Triton kernel that streams w once (`triton_gemv.py`), beside
the plain-PyTorch reference. Not wired into the model: `benchmarks/gemv.py` measures it against cuBLAS first
(a first version lost to cuBLAS everywhere, 0.71-0.97x; this one accumulates across K and splits K)."""

from __future__ import annotations

from .reference import gemv_reference

__all__ = ["gemv_reference"]
