"""The elementwise parts of a decoder layer as pure functions, run eagerly or compiled by torch.compile.

Eagerly each op is its own kernel over the whole activation, in float32 where the reference computes in
float32: at a 128K-token prefill of the 8B shape the norms, RoPE, SiLU·up and residual adds move ~150 GB
per layer (1.2 s of a 7.4 s prefill, measured). torch.compile fuses each function below into one or two
kernels. The functions take weights as arguments, so one compiled graph serves every layer (no
recompilation per layer), and shapes are dynamic (one graph for every prefill length).
`emulate_precision_casts` keeps eager's roundings (a bf16 intermediate is rounded where eager rounds it),
so the compiled ops give eager's values up to the order of float32 reductions.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cpm4.numerics import upcast


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Reference op order: statistics in fp32, normalised value rounded to x's dtype, then the weight.
    var = upcast(x).pow(2).mean(-1, keepdim=True)
    return (x * torch.rsqrt(var + eps)).to(x.dtype) * weight


def add_scaled(x: torch.Tensor, y: torch.Tensor, scale: float) -> torch.Tensor:
    """The residual update x + y * scale."""
    return x + y * scale


def add_rms_norm(x: torch.Tensor, y: torch.Tensor, scale: float, weight: torch.Tensor, eps: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """The residual update and the norm of its result: (x + y * scale, rms_norm(that))."""
    x = add_scaled(x, y, scale)
    return x, rms_norm(x, weight, eps)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, T, H, d]; cos/sin: [B, T, d]. Rotation in float32, result in x's dtype."""
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    xf = upcast(x)
    return (xf * cos + rotate_half(xf) * sin).to(x.dtype)


@dataclass(frozen=True)
class Ops:
    rms_norm: Callable
    add_scaled: Callable
    add_rms_norm: Callable
    silu_mul: Callable
    rotary: Callable


EAGER = Ops(rms_norm, add_scaled, add_rms_norm, silu_mul, rotary)


@functools.cache
def compiled(backend: str = "inductor") -> Ops:
    """The same functions through torch.compile (built once per process and backend, compiled on first
    use; the tests trace with "aot_eager", which generates no code)."""
    def c(fn):
        if backend == "inductor":
            return torch.compile(fn, dynamic=True, options={"emulate_precision_casts": True})
        return torch.compile(fn, dynamic=True, backend=backend)
    return Ops(*(c(f) for f in (rms_norm, add_scaled, add_rms_norm, silu_mul, rotary)))
