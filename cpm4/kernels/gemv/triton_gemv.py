"""y [M, N] = x [M, K] @ w [N, K].T for M <= 8 rows: each program owns BLOCK_N rows of w and streams them once
along K, every row of x applied to each loaded tile (fp32 accumulation). No split over K, so no second
reduction kernel: N / BLOCK_N programs are enough to fill the GPU at the 8B shape's sizes (N >= 4096)."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

MAX_ROWS = 8


def _configs() -> list:
    if os.environ.get("TRITON_INTERPRET") == "1":
        return [triton.Config({"BLOCK_N": 16, "BLOCK_K": 64}, num_warps=4, num_stages=1)]
    return [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
            for bn, bk, w, s in ((8, 512, 4, 4), (16, 256, 4, 4), (16, 512, 4, 3), (32, 256, 4, 4),
                                 (32, 128, 4, 6), (64, 128, 8, 4))]


@triton.autotune(configs=_configs(), key=["N", "K", "M_PAD"])
@triton.jit
def _gemv_kernel(x_ptr, w_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_ym,
                 M_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    nm = rn < N
    acc = tl.zeros((M_PAD, BLOCK_N), dtype=tl.float32)
    rm = tl.arange(0, M_PAD)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        km = rk < K
        w = tl.load(w_ptr + rn[:, None] * stride_wn + rk[None, :], mask=nm[:, None] & km[None, :], other=0.0)
        x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=(rm < M)[:, None] & km[None, :], other=0.0)
        # [M_PAD, 1, BLOCK_K] * [1, BLOCK_N, BLOCK_K] summed over K
        acc += tl.sum(x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :], axis=2)
    tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=(rm < M)[:, None] & nm[None, :])


def gemv(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [M, K] (M <= 8) @ w [N, K].T -> [M, N] in x's dtype; w's rows contiguous."""
    if x.ndim != 2 or w.ndim != 2 or x.shape[1] != w.shape[1]:
        raise ValueError(f"gemv needs x [M, K] and w [N, K], got {tuple(x.shape)} and {tuple(w.shape)}")
    m, k = x.shape
    if not 1 <= m <= MAX_ROWS:
        raise ValueError(f"gemv takes 1 to {MAX_ROWS} rows, got {m}")
    if w.stride(1) != 1 or x.stride(1) != 1:
        raise ValueError("gemv needs rows of x and w contiguous along K")
    n = w.shape[0]
    y = torch.empty((m, n), device=x.device, dtype=x.dtype)
    _gemv_kernel[lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)](
        x, w, y, m, n, k, x.stride(0), w.stride(0), y.stride(0), M_PAD=triton.next_power_of_2(m))
    return y
