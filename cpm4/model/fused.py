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


def _token_dims_dynamic(fn: Callable, compiled_fn: Callable) -> Callable:
    """compiled_fn with the batch and token dimensions of its tensor arguments symbolic (the first two of a tensor
    of 3+ dimensions, the first of a matrix) and the feature dimensions constants in the generated kernels.
    Inside another compiled region (the compiled decode step) fn itself is traced, as the compiled one would be."""
    @functools.wraps(fn)
    def run(*args):
        if torch.compiler.is_compiling():
            return fn(*args)
        for a in args:
            if isinstance(a, torch.Tensor) and a.ndim >= 2:
                for d in range(min(2, a.ndim - 1)):
                    torch._dynamo.maybe_mark_dynamic(a, d)  # a size of 1 still specializes
        return compiled_fn(*args)
    return run


@functools.cache
def compiled(backend: str = "inductor", token_dim_only: bool = True) -> Ops:
    """The same functions through torch.compile (built once per process and backend, compiled on first
    use; the tests trace with "aot_eager", which generates no code). token_dim_only: only the batch and token
    dimensions symbolic (`_token_dims_dynamic`); False: every dimension, whose kernels divide by runtime sizes
    to index (1.5-3.7x slower on an H200 at the 8B shape: benchmarks/fused_ops.py)."""
    def c(fn):
        kw = {"options": {"emulate_precision_casts": True}} if backend == "inductor" else {"backend": backend}
        if token_dim_only:
            return _token_dims_dynamic(fn, torch.compile(fn, dynamic=None, **kw))
        return torch.compile(fn, dynamic=True, **kw)
    return Ops(*(c(f) for f in (rms_norm, add_scaled, add_rms_norm, silu_mul, rotary)))
