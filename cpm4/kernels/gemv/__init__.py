"""y = x @ w.T for a few rows of x (decode steps): a Triton kernel that streams w once (`triton_gemv.py`), beside
the plain-PyTorch reference. `linear(x, w)` is `F.linear` with the kernel where it applies (CUDA, 16-bit, at most
8 rows), registered as the custom op `cpm4::gemv` so torch.compile'd and graph-captured decode steps keep it whole;
`MiniCPM4ForCausalLM.use_gemv()` routes the decode projections through it. Off by default: `benchmarks/gemv.py`
measures it against cuBLAS first (a first version lost everywhere, 0.71-0.97x; this one accumulates across K
and splits K)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .reference import gemv_reference

__all__ = ["gemv_reference", "linear"]

MAX_ROWS = 8


@torch.library.custom_op("cpm4::gemv", mutates_args=())
def _gemv(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    from .triton_gemv import gemv

    return gemv(x, w)


@_gemv.register_fake
def _(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return x.new_empty((x.shape[0], w.shape[0]))


def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """F.linear(x, w) (no bias); with at most MAX_ROWS rows of 16-bit CUDA tensors, the Triton GEMV."""
    k = x.shape[-1]
    rows = x.numel() // k if k else 0
    if (1 <= rows <= MAX_ROWS and x.is_cuda and x.dtype in (torch.float16, torch.bfloat16) and w.dtype == x.dtype
            and w.stride(-1) == 1):
        return torch.ops.cpm4.gemv(x.reshape(rows, k).contiguous(), w).view(*x.shape[:-1], w.shape[0])
    return F.linear(x, w)
