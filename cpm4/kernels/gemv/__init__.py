"""y = x @ w.T for a few rows of x (decode steps): a Triton kernel that streams w once (`triton_gemv.py`), beside
the plain-PyTorch reference. `linear(x, w)` is `F.linear` with the kernel where it applies (CUDA, 16-bit, at most
8 rows), registered as the custom op `cpm4::gemv` so torch.compile'd and graph-captured decode steps keep it whole;
`MiniCPM4ForCausalLM.use_gemv()` routes the decode projections through it. `fused_linear` is the same kernel with a
decode layer's element-wise neighbours inside (the RMS norm or SiLU·up before, the scaled residual after;
`cpm4::gemv_fused`, `fused_gemv_reference`), which `use_gemv(fuse=True)` runs a one-row layer with. The engine takes
them by `decode_plan` while `DECODE_GEMV` is on."""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from .reference import fused_gemv_reference, gemv_reference

__all__ = ["decode_plan", "fused_gemv_reference", "fused_linear", "fused_takes", "gemv_reference", "linear"]

MAX_ROWS = 8

# Decode steps through the GEMV (`LLMEngine(gemv=None)` takes `decode_plan` while DECODE_GEMV is on, with CUDA
# graphs and 16-bit weights): q/k/v, o and down at one row, any model size. On the H200 in a CUDA graph against
# cuBLAS, the 0.5B's (hidden 1,024) q/k/v 4.66 -> 3.3 µs, o 7.63 -> 3.1, down 6.89 -> 6.0; the 8B's q/k/v 14.0 ->
# 12.1, o 12.6 -> 11.5, down 36.2 -> 36.9 (the best tiles); gate/up and the head no faster at the 0.5B, and at four
# rows only o still won. The 8B's 32K decode step 5.71 -> 5.51 ms.
DECODE_GEMV = True
DECODE_PROJECTIONS = ("qkv", "o", "down")
DECODE_ROWS = 1  # the most rows a plan's projections take (more go to cuBLAS)
# A small model's one-row steps run each layer as four GEMVs with the norms, RoPE, SiLU·up and residual adds
# inside (`DecoderLayer._fused`). The 0.5B on the H200, batch-1 decode at 1K: cuBLAS 1.09 ms, the projections
# above 0.93, fused 0.83 (a layer's work around attention 30.4 -> 24.4 -> 22.1 µs).
FUSE_LAYERS = True
SMALL_MODEL_HIDDEN = 1024
# Larger models' layers fused too (with FUSE_LAYERS). Off: at the 8B's sizes the fused GEMVs' prologues (the norm
# each program recomputes, SiLU·up over all of K) cost more than the element-wise kernels they replace (a layer's
# work: the projections above 128.8 µs, fused 133.8; the 32K decode step 5.62 ms fused against 5.51).
FUSE_LARGE = False


@torch.library.custom_op("cpm4::gemv", mutates_args=())
def _gemv(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    from .triton_gemv import gemv

    return gemv(x, w)


@_gemv.register_fake
def _(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return x.new_empty((x.shape[0], w.shape[0]))


@torch.library.custom_op("cpm4::gemv_fused", mutates_args=())
def _gemv_fused(x: torch.Tensor, w: torch.Tensor, norm_weight: torch.Tensor | None, eps: float, glu: bool,
                residual: torch.Tensor | None, scale: float, cos: torch.Tensor | None, sin: torch.Tensor | None,
                n_rot: int, head_dim: int) -> torch.Tensor:
    from .triton_gemv import gemv

    return gemv(x, w, norm=(norm_weight, eps) if norm_weight is not None else None, glu=glu, residual=residual,
                scale=scale, rope=(cos, sin, n_rot, head_dim) if cos is not None else None)


@_gemv_fused.register_fake
def _(x, w, norm_weight, eps, glu, residual, scale, cos, sin, n_rot, head_dim):
    return x.new_empty((x.shape[0], w.shape[0]))


def _rows_ok(x: torch.Tensor, max_rows: int) -> bool:
    """x [..., K] holds 1 to max_rows rows."""
    k = x.shape[-1]
    return 1 <= (x.numel() // k if k else 0) <= max_rows


def _takes(x: torch.Tensor, w: torch.Tensor, max_rows: int, interpreted: bool = False) -> bool:
    """Whether the kernel runs x [..., K] against w: 1..max_rows rows of 16-bit CUDA tensors (with interpreted,
    any float tensors on the CPU under TRITON_INTERPRET=1 too), w of x's dtype with its rows contiguous."""
    on_gpu = x.is_cuda and x.dtype in (torch.float16, torch.bfloat16)
    interpreted = (interpreted and x.device.type == "cpu" and x.dtype.is_floating_point
                   and os.environ.get("TRITON_INTERPRET") == "1")
    return _rows_ok(x, max_rows) and (on_gpu or interpreted) and w.dtype == x.dtype and w.stride(-1) == 1


def linear(x: torch.Tensor, w: torch.Tensor, max_rows: int = MAX_ROWS) -> torch.Tensor:
    """F.linear(x, w) (no bias); with 1 to max_rows (at most MAX_ROWS) rows of 16-bit CUDA tensors, the Triton
    GEMV."""
    if _takes(x, w, max_rows):
        k = x.shape[-1]
        return torch.ops.cpm4.gemv(x.reshape(-1, k).contiguous(), w).view(*x.shape[:-1], w.shape[0])
    return F.linear(x, w)


def decode_plan(hidden_size: int, dtype: torch.dtype, device: torch.device
                ) -> tuple[tuple[str, ...], int, bool] | None:
    """`MiniCPM4ForCausalLM.use_gemv`'s only, max_rows and fuse for decode steps, or None (cuBLAS throughout), in
    16 bits on CUDA: the projections where the kernel won, and a small model's layers fused (FUSE_LAYERS; any
    model's with FUSE_LARGE too; above)."""
    if dtype not in (torch.float16, torch.bfloat16) or device.type != "cuda":
        return None
    fuse = FUSE_LAYERS and (hidden_size <= SMALL_MODEL_HIDDEN or FUSE_LARGE)
    return DECODE_PROJECTIONS, DECODE_ROWS, fuse


def fused_takes(x: torch.Tensor, w: torch.Tensor, max_rows: int) -> bool:
    """Whether `fused_linear` can run x [..., K] against w (`_takes`; on the CPU under the interpreter too, for
    tests: the fused path has no PyTorch fallback of its own, its caller's plain path is that)."""
    return _takes(x, w, max_rows, interpreted=True)


def fused_linear(x: torch.Tensor, w: torch.Tensor, norm: tuple[torch.Tensor, float] | None = None, glu: bool = False,
                 residual: torch.Tensor | None = None, scale: float = 1.0,
                 rope: tuple[torch.Tensor, torch.Tensor, int, int] | None = None) -> torch.Tensor:
    """The decode layer's GEMV with its element-wise neighbours in one kernel (`triton_gemv.gemv`): x [..., K]
    (glu: [..., 2K], gate and up) -> [..., N]; norm, glu, residual, scale as there (`fused_gemv_reference`);
    rope (cos, sin [..., head_dim] per row of x, n_rot, head_dim). For calls `fused_takes` accepts."""
    k_in = x.shape[-1]
    lead = x.shape[:-1]
    res = residual.reshape(-1, w.shape[0]) if residual is not None else None
    cos = sin = None
    n_rot = head_dim = 0
    if rope is not None:
        cos, sin, n_rot, head_dim = rope
        cos, sin = cos.reshape(-1, head_dim).contiguous(), sin.reshape(-1, head_dim).contiguous()
    y = torch.ops.cpm4.gemv_fused(x.reshape(-1, k_in).contiguous(), w, norm[0] if norm is not None else None,
                                  float(norm[1]) if norm is not None else 0.0, glu, res, float(scale), cos, sin,
                                  int(n_rot), int(head_dim))
    return y.view(*lead, y.shape[-1])
