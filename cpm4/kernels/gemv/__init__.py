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

__all__ = ["decode_plan", "gemv_reference", "linear"]

MAX_ROWS = 8

# A small model's batch-1 decode through the GEMV (`LLMEngine(gemv=None)` takes it while SMALL_MODELS is on, with
# CUDA graphs and 16-bit weights; `decode_plan`). H200, 0.5B (hidden 1,024), one row, in a CUDA graph against
# cuBLAS: q/k/v 4.66 -> 3.3 µs, o 7.63 -> 3.1, down 6.89 -> 6.0 (its best tiles); gate/up and the head no faster, and
# at four rows only o still won. The 0.5B's decode step 1.06 -> 0.92 ms. Off until the engine's GPU tests have run
# with it.
SMALL_MODELS = False
SMALL_MODEL_HIDDEN = 1024
SMALL_MODEL_PROJECTIONS = ("qkv", "o", "down")
SMALL_MODEL_ROWS = 1


@torch.library.custom_op("cpm4::gemv", mutates_args=())
def _gemv(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    from .triton_gemv import gemv

    return gemv(x, w)


@_gemv.register_fake
def _(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return x.new_empty((x.shape[0], w.shape[0]))


def _rows_ok(x: torch.Tensor, max_rows: int) -> bool:
    """x [..., K] holds 1 to max_rows rows."""
    k = x.shape[-1]
    return 1 <= (x.numel() // k if k else 0) <= max_rows


def _takes(x: torch.Tensor, w: torch.Tensor, max_rows: int) -> bool:
    """Whether the kernel runs F.linear(x, w): 1..max_rows rows of 16-bit CUDA tensors, w's rows contiguous."""
    return (_rows_ok(x, max_rows) and x.is_cuda and x.dtype in (torch.float16, torch.bfloat16) and w.dtype == x.dtype
            and w.stride(-1) == 1)


def linear(x: torch.Tensor, w: torch.Tensor, max_rows: int = MAX_ROWS) -> torch.Tensor:
    """F.linear(x, w) (no bias); with 1 to max_rows (at most MAX_ROWS) rows of 16-bit CUDA tensors, the Triton
    GEMV."""
    if _takes(x, w, max_rows):
        k = x.shape[-1]
        return torch.ops.cpm4.gemv(x.reshape(-1, k).contiguous(), w).view(*x.shape[:-1], w.shape[0])
    return F.linear(x, w)


def decode_plan(hidden_size: int, dtype: torch.dtype, device: torch.device) -> tuple[tuple[str, ...], int] | None:
    """The projections (`MiniCPM4ForCausalLM.GEMV_PROJECTIONS` names) a decode step runs through the GEMV and at
    most how many rows, or None (cuBLAS throughout): a small model's in 16 bits on CUDA, as measured above."""
    if hidden_size > SMALL_MODEL_HIDDEN or dtype not in (torch.float16, torch.bfloat16) or device.type != "cuda":
        return None
    return SMALL_MODEL_PROJECTIONS, SMALL_MODEL_ROWS
