"""The definition the GEMV kernel is tested against."""

from __future__ import annotations

import torch


def gemv_reference(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [M, K] @ w [N, K].T in float64, returned in x's dtype (the kernel accumulates in float32)."""
    return (x.double() @ w.double().T).to(x.dtype)
