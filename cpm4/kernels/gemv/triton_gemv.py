"""y [M, N] = x [M, K] @ w [N, K].T for a few rows (decode steps), streaming w once.

Each program owns BLOCK_N rows of w and one of SPLIT slices of K. Products accumulate element-wise in a
[M, BLOCK_N, BLOCK_K] fp32 tile across the K loop and are reduced along K once at the end: no cross-thread
reduction per loaded tile (the first version of this kernel reduced every tile and reached 52-84% of the copy
bandwidth against cuBLAS's 63-84%). With SPLIT > 1 the slices' partial sums go to a workspace and the last slice to
arrive (an arrival counter per row block) adds them in slice order and stores: deterministic, and one kernel rather
than cuBLAS's split-K GEMV plus its reduce kernel. The counters are reset by that last program, so they stay zero
between calls (and between CUDA-graph replays); calls on one stream at a time."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

MAX_ROWS = 8
_MAX_SPLIT = 8
_COUNTERS: dict[torch.device, torch.Tensor] = {}
_MAX_BLOCKS = 1 << 16  # row blocks per call: N / BLOCK_N (the 8B lm head: 73448 / 8 = 9181)


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, y_ptr, part_ptr, cnt_ptr, M, N, K, stride_xm, stride_wn, stride_ym,
                 M_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT: tl.constexpr):
    pid_n = tl.program_id(0)
    sp = tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nm = rn < N
    rm = tl.arange(0, M_PAD)
    mm = rm < M
    k_per = tl.cdiv(tl.cdiv(K, SPLIT), BLOCK_K) * BLOCK_K
    k_lo = sp * k_per
    k_hi = tl.minimum(K, k_lo + k_per)
    acc = tl.zeros((M_PAD, BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        km = rk < k_hi
        w = tl.load(w_ptr + rn[:, None] * stride_wn + rk[None, :], mask=nm[:, None] & km[None, :], other=0.0)
        x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=mm[:, None] & km[None, :], other=0.0)
        acc += x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :]
    y = tl.sum(acc, axis=2)  # [M_PAD, BLOCK_N]
    out = y_ptr + rm[:, None] * stride_ym + rn[None, :]
    om = mm[:, None] & nm[None, :]
    if SPLIT == 1:
        tl.store(out, y.to(y_ptr.dtype.element_ty), mask=om)
    else:
        part = part_ptr + (sp * M_PAD + rm[:, None]) * N + rn[None, :]
        tl.store(part, y, mask=om)
        arrived = tl.atomic_add(cnt_ptr + pid_n, 1, sem="acq_rel")  # publishes the partial stored above
        if arrived == SPLIT - 1:  # the last slice: add every slice's partial in order, then reset the counter
            tot = tl.zeros((M_PAD, BLOCK_N), dtype=tl.float32)
            for s in tl.static_range(SPLIT):
                tot += tl.load(part_ptr + (s * M_PAD + rm[:, None]) * N + rn[None, :], mask=om, other=0.0)
            tl.store(out, tot.to(y_ptr.dtype.element_ty), mask=om)
            tl.atomic_xchg(cnt_ptr + pid_n, 0)


def _configs() -> list:
    if os.environ.get("TRITON_INTERPRET") == "1":
        return [triton.Config({"BLOCK_N": 16, "BLOCK_K": 64, "SPLIT": 1}, num_warps=4, num_stages=1)]
    # Small tiles and 8 slices as well: a small model's matrices (0.5B: 2-17 MB) need every SM streaming to beat
    # a kernel's latency; the 8B's are bandwidth-bound at any of these.
    return [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "SPLIT": s}, num_warps=w, num_stages=st)
            for bn, bk, w, st in ((4, 512, 2, 3), (4, 512, 4, 3), (4, 256, 4, 3), (8, 128, 4, 3), (8, 256, 4, 4),
                                  (16, 128, 4, 4), (16, 256, 4, 3), (32, 128, 4, 3), (32, 64, 4, 6), (64, 64, 8, 4))
            for s in (1, 2, 4, 8)]


def _prune(configs, named_args, **kwargs) -> list:
    """Drop tiles whose accumulator would not fit in registers for this many rows (4 warps: 64 fp32 a thread)."""
    m_pad = kwargs.get("M_PAD", named_args.get("M_PAD", 1))
    kept = [c for c in configs if m_pad * c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_K"] <= 64 * 32 * c.num_warps]
    return kept or configs[:1]


def _bench_in_graph(fn, quantiles=None):
    """The autotuner's timer: the kernel replayed from a CUDA graph. Timed by plain launches, a 2-5 µs kernel
    measures the host's launch cost (the same for every config), so the choice was arbitrary for small matrices."""
    return triton.testing.do_bench_cudagraph(fn, rep=5, quantiles=quantiles)


_gemv_tuned = triton.autotune(configs=_configs(), key=["N", "K", "M_PAD"], do_bench=_bench_in_graph,
                              prune_configs_by={"early_config_prune": _prune})(_gemv_kernel)


def _counters(device: torch.device) -> torch.Tensor:
    c = _COUNTERS.get(device)
    if c is None:  # allocated once (before any graph capture: the first call is a warm-up), zeroed, kept zero
        c = _COUNTERS[device] = torch.zeros(_MAX_BLOCKS, dtype=torch.int32, device=device)
    return c


def _check(x: torch.Tensor, w: torch.Tensor) -> None:
    if x.ndim != 2 or w.ndim != 2 or x.shape[1] != w.shape[1]:
        raise ValueError(f"gemv needs x [M, K] and w [N, K], got {tuple(x.shape)} and {tuple(w.shape)}")
    if not 1 <= x.shape[0] <= MAX_ROWS:
        raise ValueError(f"gemv takes 1 to {MAX_ROWS} rows, got {x.shape[0]}")
    if w.stride(1) != 1 or x.stride(1) != 1:
        raise ValueError("gemv needs rows of x and w contiguous along K")


def gemv(x: torch.Tensor, w: torch.Tensor, config: dict | None = None) -> torch.Tensor:
    """x [M, K] (M <= 8) @ w [N, K].T -> [M, N] in x's dtype. config: fixed BLOCK_N, BLOCK_K, SPLIT (and
    optionally num_warps) instead of the autotuned choice (tests)."""
    _check(x, w)
    m, k = x.shape
    n = w.shape[0]
    m_pad = triton.next_power_of_2(m)
    y = torch.empty((m, n), device=x.device, dtype=x.dtype)
    part = torch.empty((_MAX_SPLIT, m_pad, n), device=x.device, dtype=torch.float32)
    cnt = _counters(x.device)
    args = (x, w, y, part, cnt, m, n, k, x.stride(0), w.stride(0), y.stride(0))
    if config is not None:
        cfg = dict(config)
        warps = cfg.pop("num_warps", 4)
        if cfg["SPLIT"] > _MAX_SPLIT or triton.cdiv(n, cfg["BLOCK_N"]) > _MAX_BLOCKS:
            raise ValueError(f"gemv config {config} outside the workspace")
        _gemv_kernel[(triton.cdiv(n, cfg["BLOCK_N"]), cfg["SPLIT"])](*args, M_PAD=m_pad, num_warps=warps, **cfg)
    else:
        _gemv_tuned[lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), meta["SPLIT"])](*args, M_PAD=m_pad)
    return y
