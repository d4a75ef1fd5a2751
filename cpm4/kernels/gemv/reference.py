"""The definition the GEMV kernel is tested against."""

from __future__ import annotations

import torch


def gemv_reference(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [M, K] @ w [N, K].T in float64, returned in x's dtype (the kernel accumulates in float32)."""
    return (x.double() @ w.double().T).to(x.dtype)


def fused_gemv_reference(x: torch.Tensor, w: torch.Tensor, norm: tuple[torch.Tensor, float] | None = None,
                         glu: bool = False, residual: torch.Tensor | None = None, scale: float = 1.0) -> torch.Tensor:
    """The fused GEMV's definition, in float64 with each intermediate rounded to x's dtype where the model's
    PyTorch ops round it: glu (x = [gate | up]) -> silu(gate), then times up; norm (weight, eps) -> x / rms(x),
    then times the weight; y = x @ w.T; residual -> y * scale, then residual + that."""
    dt = x.dtype
    if glu:
        gate, up = x.double().chunk(2, dim=-1)
        act = (gate / (1 + torch.exp(-gate))).to(dt)
        x = (act.double() * up).to(dt)
    if norm is not None:
        g, eps = norm
        xd = x.double()
        xn = (xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + eps)).to(dt)
        x = (xn.double() * g.double()).to(dt)
    y = (x.double() @ w.double().T).to(dt)
    if residual is not None:
        t = (y.double() * scale).to(dt)
        y = (residual.double() + t.double()).to(dt)
    return y
