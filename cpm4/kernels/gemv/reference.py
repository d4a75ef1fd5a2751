"""The definition the GEMV kernel is tested against."""

from __future__ import annotations

import torch


def gemv_reference(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [M, K] @ w [N, K].T in float64, returned in x's dtype (the kernel accumulates in float32)."""
    return (x.double() @ w.double().T).to(x.dtype)


def fused_gemv_reference(x: torch.Tensor, w: torch.Tensor, norm: tuple[torch.Tensor, float] | None = None,
                         glu: bool = False, residual: torch.Tensor | None = None, scale: float = 1.0,
                         rope: tuple[torch.Tensor, torch.Tensor, int, int] | None = None) -> torch.Tensor:
    """The fused GEMV's definition, in float64 with each intermediate rounded to x's dtype where the model's
    PyTorch ops round it: glu (x = [gate | up]) -> silu(gate), then times up; norm (weight, eps) -> x / rms(x),
    then times the weight; y = x @ w.T; residual -> y * scale, then residual + that; rope (cos, sin [M, d], n_rot,
    d) -> each head of d among y's first n_rot columns rotated: y * cos + rotate_half(y) * sin."""
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
    if rope is not None:
        cos, sin, n_rot, d = rope
        heads = y[:, :n_rot].double().view(y.shape[0], -1, d)
        x1, x2 = heads.chunk(2, dim=-1)
        rotated = heads * cos.double()[:, None] + torch.cat((-x2, x1), dim=-1) * sin.double()[:, None]
        y = torch.cat((rotated.reshape(y.shape[0], n_rot).to(dt), y[:, n_rot:]), dim=1)
    return y
