"""y [M, N] = x [M, K] @ w [N, K].T for a few rows (decode steps), streaming w once.

Each program owns BLOCK_N rows of w and one of SPLIT slices of K. Products accumulate element-wise in a
[M, BLOCK_N, BLOCK_K] fp32 tile across the K loop and are reduced along K once at the end: no cross-thread
reduction per loaded tile (the first version of this kernel reduced every tile and reached 52-84% of the copy
bandwidth against cuBLAS's 63-84%). With SPLIT > 1 the slices' partial sums go to a workspace and the last slice to
arrive (an arrival counter per row block) adds them in slice order and stores: deterministic, and one kernel rather
than cuBLAS's split-K GEMV plus its reduce kernel. The counters are reset by that last program, so they stay zero
between calls (and between CUDA-graph replays); calls on one stream at a time.

Flags fuse a decode layer's element-wise neighbours in (`gemv(norm=..., glu=..., residual=...)`): NORM, the RMS
norm of x before (each program first sums its rows' squares); GLU, x = [gate | up] and silu(gate) * up goes in;
RES, the output is residual + y * scale (stored by the program that stores y); ROPE, the q/k columns rotated,
each program's tile half a head's first-half columns and half their partners.

Measured and dropped (RESULTS.md, thirty-fifth GPU pass; the code is in the history): SiLU·up in gate/up's
epilogue instead of down's prologue (each tile gate rows and the up rows they pair with): the 0.5B's fused layer
22.1 -> 23.7 µs, its decode 0.82 -> 0.86 ms; and, launched as a programmatic dependent, each program pulling its
weight slice toward L2 before its wait: the 8B's 32K decode 5.6 -> 6.6 ms, no gain on the 0.5B."""

from __future__ import annotations

import inspect
import math
import os

import torch
import triton
import triton.language as tl

from cpm4.kernels import pdl as pdl_launch

MAX_ROWS = 8
# Programmatic dependent launches (Hopper+, `cpm4.kernels.pdl`): the GEMV may start while the kernel before it
# runs. None: inside `pdl.ours()` (the engine's fused one-row decode steps).
PDL: bool | None = None
_MAX_SPLIT = 8
_COUNTERS: dict[torch.device, torch.Tensor] = {}
_MAX_BLOCKS = 1 << 16  # row blocks per call: N / BLOCK_N (the 8B lm head: 73448 / 8 = 9181)


@triton.jit
def _halves(y, dt, M_PAD: tl.constexpr, BLOCK_N: tl.constexpr):
    """A paired tile's two halves (its first BLOCK_N / 2 columns and their partners), each rounded to dt and back
    to fp32 as the stored output would be: [M_PAD, BLOCK_N / 2] twice."""
    y3 = tl.reshape(y.to(dt).to(tl.float32), (M_PAD, 2, BLOCK_N // 2))
    first = (tl.arange(0, 2) == 0)[None, :, None]
    return tl.sum(tl.where(first, y3, 0.0), axis=1), tl.sum(tl.where(first, 0.0, y3), axis=1)


@triton.jit
def _store_out(y_ptr, y, r_ptr, c_ptr, s_ptr, rm, rn, rn_a, mm, stride_ym, stride_rm, stride_cm, scale, N, N_ROT,
               M_PAD: tl.constexpr, BLOCK_N: tl.constexpr, RES: tl.constexpr, ROPE: tl.constexpr,
               HEAD_DIM: tl.constexpr):
    """y (fp32 sums over the columns rn) rounded to the output's dtype and stored; with RES, residual + y * scale
    rounded as PyTorch rounds it (the product, then the sum, each to the dtype); with ROPE (rn: the columns rn_a
    of one head's first half, then their partners HEAD_DIM / 2 on), each pair of the first N_ROT columns rotated
    (`cpm4.model.fused.rotary`: the rounded output in fp32 times the row's cos/sin tables, rounded)."""
    dt = y_ptr.dtype.element_ty
    if ROPE:
        ya, yb = _halves(y, dt, M_PAD, BLOCK_N)
        rn_b = rn_a + HEAD_DIM // 2
        da = rn_a % HEAD_DIM
        om = mm[:, None] & (rn_a < N)[None, :]
        tab = rm[:, None] * stride_cm
        ca = tl.load(c_ptr + tab + da[None, :], mask=om, other=0.0)
        sa = tl.load(s_ptr + tab + da[None, :], mask=om, other=0.0)
        cb = tl.load(c_ptr + tab + (da + HEAD_DIM // 2)[None, :], mask=om, other=0.0)
        sb = tl.load(s_ptr + tab + (da + HEAD_DIM // 2)[None, :], mask=om, other=0.0)
        rot = (rn_a < N_ROT)[None, :]
        oa = tl.where(rot, ya * ca - yb * sa, ya).to(dt)
        ob = tl.where(rot, yb * cb + ya * sb, yb).to(dt)
        tl.store(y_ptr + rm[:, None] * stride_ym + rn_a[None, :], oa, mask=om)
        tl.store(y_ptr + rm[:, None] * stride_ym + rn_b[None, :], ob, mask=om)
    else:
        om = mm[:, None] & (rn < N)[None, :]
        yb = y.to(dt)
        if RES:
            r = tl.load(r_ptr + rm[:, None] * stride_rm + rn[None, :], mask=om, other=0.0)
            t = (yb.to(tl.float32) * scale).to(dt)
            yb = (r.to(tl.float32) + t.to(tl.float32)).to(dt)
        tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], yb, mask=om)


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, y_ptr, part_ptr, cnt_ptr, g_ptr, r_ptr, c_ptr, s_ptr, M, N, K, N_ROT, stride_xm,
                 stride_wn, stride_ym, stride_rm, stride_cm, eps, scale, M_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr, SPLIT: tl.constexpr, NORM: tl.constexpr, GLU: tl.constexpr,
                 RES: tl.constexpr, ROPE: tl.constexpr, HEAD_DIM: tl.constexpr, NORM_BLOCK: tl.constexpr,
                 PDL: tl.constexpr = False):
    pid_n = tl.program_id(0)
    sp = tl.program_id(1)
    if ROPE:  # half the tile from a head's first half, half their partners HEAD_DIM / 2 on
        HALF: tl.constexpr = BLOCK_N // 2
        per_head: tl.constexpr = HEAD_DIM // BLOCK_N
        rn_a = (pid_n // per_head) * HEAD_DIM + (pid_n % per_head) * HALF + tl.arange(0, HALF)
        j = tl.arange(0, BLOCK_N)
        rn = (pid_n // per_head) * HEAD_DIM + (pid_n % per_head) * HALF + j % HALF + (j // HALF) * (HEAD_DIM // 2)
    else:
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rn_a = rn  # (unused)
    nm = rn < N
    rm = tl.arange(0, M_PAD)
    mm = rm < M
    k_per = tl.cdiv(tl.cdiv(K, SPLIT), BLOCK_K) * BLOCK_K
    k_lo = sp * k_per
    k_hi = tl.minimum(K, k_lo + k_per)
    pdl_launch.enter(PDL)
    rstd = tl.zeros((M_PAD,), dtype=tl.float32)
    if NORM:  # each program reads its rows whole first for their RMS: in one load or a few (NORM_BLOCK wide),
        # not BLOCK_K at a time (32 dependent loads a program at the 8B's width)
        ss = tl.zeros((M_PAD,), dtype=tl.float32)
        for k0 in range(0, K, NORM_BLOCK):
            rk = k0 + tl.arange(0, NORM_BLOCK)
            xs = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=mm[:, None] & (rk < K)[None, :],
                         other=0.0).to(tl.float32)
            ss += tl.sum(xs * xs, axis=1)
        rstd = tl.math.rsqrt(ss / K + eps)
    acc = tl.zeros((M_PAD, BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        km = rk < k_hi
        xm = mm[:, None] & km[None, :]
        w = tl.load(w_ptr + rn[:, None] * stride_wn + rk[None, :], mask=nm[:, None] & km[None, :], other=0.0)
        x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=xm, other=0.0)
        if GLU:  # x holds [gate | up]: silu(gate) * up, each rounded to the dtype as PyTorch's ops round
            up = tl.load(x_ptr + rm[:, None] * stride_xm + K + rk[None, :], mask=xm, other=0.0)
            gf = x.to(tl.float32)
            act = (gf / (1.0 + tl.exp(-gf))).to(x.dtype)
            x = (act.to(tl.float32) * up.to(tl.float32)).to(x.dtype)
        if NORM:  # the RMS norm's order: normalised in fp32, rounded, then times the weight, rounded
            g = tl.load(g_ptr + rk, mask=km, other=0.0)
            xn = (x.to(tl.float32) * rstd[:, None]).to(x.dtype)
            x = (xn.to(tl.float32) * g.to(tl.float32)[None, :]).to(x.dtype)
        acc += x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :]
    y = tl.sum(acc, axis=2)  # [M_PAD, BLOCK_N]
    om = mm[:, None] & nm[None, :]
    if SPLIT == 1:
        _store_out(y_ptr, y, r_ptr, c_ptr, s_ptr, rm, rn, rn_a, mm, stride_ym, stride_rm, stride_cm, scale, N, N_ROT,
                   M_PAD, BLOCK_N, RES, ROPE, HEAD_DIM)
    else:
        part = part_ptr + (sp * M_PAD + rm[:, None]) * N + rn[None, :]
        tl.store(part, y, mask=om)
        arrived = tl.atomic_add(cnt_ptr + pid_n, 1, sem="acq_rel")  # publishes the partial stored above
        if arrived == SPLIT - 1:  # the last slice: add every slice's partial in order, then reset the counter
            tot = tl.zeros((M_PAD, BLOCK_N), dtype=tl.float32)
            for s in tl.static_range(SPLIT):
                tot += tl.load(part_ptr + (s * M_PAD + rm[:, None]) * N + rn[None, :], mask=om, other=0.0)
            _store_out(y_ptr, tot, r_ptr, c_ptr, s_ptr, rm, rn, rn_a, mm, stride_ym, stride_rm, stride_cm, scale, N,
                       N_ROT, M_PAD, BLOCK_N, RES, ROPE, HEAD_DIM)
            tl.atomic_xchg(cnt_ptr + pid_n, 0)


def _configs() -> list:
    if os.environ.get("TRITON_INTERPRET") == "1":
        # One tile (the autotuner prunes nothing then): 16 divides any head_dim a rope call has; wide K, few steps.
        return [triton.Config({"BLOCK_N": 16, "BLOCK_K": 256, "SPLIT": 1}, num_warps=4, num_stages=1)]
    # Small tiles and 8 slices as well: a small model's matrices (0.5B: 2-17 MB) need every SM streaming to beat
    # a kernel's latency; the 8B's are bandwidth-bound at any of these.
    return [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "SPLIT": s}, num_warps=w, num_stages=st)
            for bn, bk, w, st in ((4, 512, 2, 3), (4, 512, 4, 3), (4, 256, 4, 3), (8, 128, 4, 3), (8, 256, 4, 4),
                                  (16, 128, 4, 4), (16, 256, 4, 3), (32, 128, 4, 3), (32, 64, 4, 6), (64, 64, 8, 4))
            for s in (1, 2, 4, 8)]


# Matrices up to this many bytes tune over the narrow tiles only (BLOCK_N <= 8: the 0.5B's best, the sweep in
# RESULTS.md), larger ones over BLOCK_N <= 16 in at most 2 slices (the 8B's sweep: 4 x 512, one slice, was best for
# every matrix, 1.16x cuBLAS on q/k/v; wider tiles and more slices never): fewer compilations and timings either way.
SMALL_BYTES = 32 << 20


def _prune(configs, named_args, **kwargs) -> list:
    """Drop tiles whose accumulator would not fit in registers for this many rows (4 warps: 64 fp32 a thread), and
    the tile widths that do not suit the matrix's size (`SMALL_BYTES`)."""
    m_pad = kwargs.get("M_PAD", named_args.get("M_PAD", 1))
    kept = [c for c in configs if m_pad * c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_K"] <= 64 * 32 * c.num_warps]
    if kwargs.get("ROPE", named_args.get("ROPE", False)):  # a tile is one head's pairs: BLOCK_N divides head_dim
        hd = kwargs.get("HEAD_DIM", named_args.get("HEAD_DIM", 2))
        kept = [c if hd % c.kwargs["BLOCK_N"] == 0 else
                triton.Config({**c.kwargs, "BLOCK_N": math.gcd(c.kwargs["BLOCK_N"], hd)}, num_warps=c.num_warps,
                              num_stages=c.num_stages) for c in kept]
    n, k = named_args.get("N"), named_args.get("K")
    if n is not None and k is not None:
        if 2 * n * k <= SMALL_BYTES:
            kept = [c for c in kept if c.kwargs["BLOCK_N"] <= 8] or kept
        else:
            kept = [c for c in kept if c.kwargs["BLOCK_N"] <= 16 and c.kwargs["SPLIT"] <= 2] or kept
    return kept or configs[:1]


def _bench_in_graph(fn, quantiles=None):
    """The autotuner's timer: the kernel replayed from a CUDA graph. Timed by plain launches, a 2-5 µs kernel
    measures the host's launch cost (the same for every config), so the choice was arbitrary for small matrices."""
    return triton.testing.do_bench_cudagraph(fn, rep=5, quantiles=quantiles)


# TUNING_CACHE: the choice kept in Triton's on-disk cache (keyed by the arch, this source and the shape) where this
# Triton can, so an engine's start skips timing ~20 tiles for each of a model's matrices. Read at import; off until
# it has run on the GPU (the GEMV is on every engine's default decode path).
TUNING_CACHE = False
_CACHE = ({"cache_results": True} if TUNING_CACHE and "cache_results" in inspect.signature(triton.autotune).parameters
          else {})
_gemv_tuned = triton.autotune(configs=_configs(), key=["N", "K", "M_PAD", "NORM", "GLU", "RES", "ROPE", "HEAD_DIM"],
                              do_bench=_bench_in_graph, prune_configs_by={"early_config_prune": _prune},
                              **_CACHE)(_gemv_kernel)


def _counters(device: torch.device) -> torch.Tensor:
    c = _COUNTERS.get(device)
    if c is None:  # allocated once (before any graph capture: the first call is a warm-up), zeroed, kept zero
        c = _COUNTERS[device] = torch.zeros(_MAX_BLOCKS, dtype=torch.int32, device=device)
    return c


def _check(x: torch.Tensor, w: torch.Tensor, glu: bool = False) -> None:
    k_in = 2 * w.shape[-1] if glu else w.shape[-1]
    if x.ndim != 2 or w.ndim != 2 or x.shape[1] != k_in:
        want = "x [M, 2K] ([gate | up]) and w [N, K]" if glu else "x [M, K] and w [N, K]"
        raise ValueError(f"gemv needs {want}, got {tuple(x.shape)} and {tuple(w.shape)}")
    if not 1 <= x.shape[0] <= MAX_ROWS:
        raise ValueError(f"gemv takes 1 to {MAX_ROWS} rows, got {x.shape[0]}")
    if w.stride(1) != 1 or x.stride(1) != 1:
        raise ValueError("gemv needs rows of x and w contiguous along K")


def gemv(x: torch.Tensor, w: torch.Tensor, config: dict | None = None, norm: tuple[torch.Tensor, float] | None = None,
         glu: bool = False, residual: torch.Tensor | None = None, scale: float = 1.0,
         rope: tuple[torch.Tensor, torch.Tensor, int, int] | None = None, pdl: bool | None = None) -> torch.Tensor:
    """x [M, K] (M <= 8) @ w [N, K].T -> [M, N] in x's dtype, with the decode layer's element-wise work around it:
    norm=(weight [K], eps): x through the RMS norm first (`cpm4.model.fused.rms_norm`'s roundings); glu: x is
    [M, 2K], gate and up side by side, and silu(gate) * up goes in; residual [M, N]: the result is
    residual + y * scale; rope=(cos, sin [M, head_dim], n_rot, head_dim): the first n_rot output columns, heads of
    head_dim, rotated by each row's tables (`cpm4.model.fused.rotary`). config: fixed BLOCK_N, BLOCK_K, SPLIT (and
    optionally num_warps, num_stages) instead of the autotuned choice (tests). pdl: a programmatic dependent
    launch (`PDL`, None: that; Hopper+ only)."""
    _check(x, w, glu)
    if norm is not None and glu:
        raise ValueError("gemv takes norm or glu, not both")
    if rope is not None and (glu or residual is not None):
        raise ValueError("gemv's rope goes with a plain or normed input and no residual (the q/k/v projection)")
    m = x.shape[0]
    n, k = w.shape
    if rope is not None:
        cos, sin, n_rot, hd = rope
        if hd < 2 or hd % 2 or n % hd or n_rot % hd or not 0 <= n_rot <= n:
            raise ValueError(f"gemv's rope needs an even head_dim dividing N = {n} and n_rot, n_rot <= N; got "
                             f"head_dim {hd}, n_rot {n_rot}")
        if cos.shape != (m, hd) or sin.shape != cos.shape or cos.stride() != sin.stride() or cos.stride(1) != 1 \
                or sin.dtype != cos.dtype:
            raise ValueError(f"gemv's rope tables must be [{m}, {hd}] each, alike and contiguous along head_dim; "
                             f"got {tuple(cos.shape)} and {tuple(sin.shape)}")
    if norm is not None and (norm[0].shape != (k,) or norm[0].dtype != x.dtype):
        raise ValueError(f"gemv's norm weight must be [{k}] in {x.dtype}, got {tuple(norm[0].shape)} "
                         f"in {norm[0].dtype}")
    if residual is not None and (residual.shape != (m, n) or residual.stride(1) != 1 or residual.dtype != x.dtype):
        raise ValueError(f"gemv's residual must be [{m}, {n}] in {x.dtype}, contiguous along N, got "
                         f"{tuple(residual.shape)} in {residual.dtype}")
    m_pad = triton.next_power_of_2(m)
    y = torch.empty((m, n), device=x.device, dtype=x.dtype)
    part = torch.empty((_MAX_SPLIT, m_pad, n), device=x.device, dtype=torch.float32)
    cnt = _counters(x.device)
    g = norm[0] if norm is not None else y  # (unread without NORM / RES / ROPE)
    r = residual if residual is not None else y
    c, sn, n_rot, hd = rope if rope is not None else (y, y, 0, 2)
    args = (x, w, y, part, cnt, g, r, c, sn, m, n, k, n_rot, x.stride(0), w.stride(0), y.stride(0), r.stride(0),
            c.stride(0), float(norm[1]) if norm is not None else 0.0, float(scale))
    # The norm's first pass: up to 8,192 elements at a time over all rows (32 fp32 registers a thread at 4 warps)
    pdl = pdl_launch.enabled(x.device, PDL if pdl is None else pdl)
    flags = dict(NORM=norm is not None, GLU=glu, RES=residual is not None, ROPE=rope is not None, HEAD_DIM=hd,
                 NORM_BLOCK=min(triton.next_power_of_2(k), max(16, 8192 // m_pad)), PDL=pdl, **pdl_launch.launch(pdl))
    if config is not None:
        cfg = dict(config)
        launch = {"num_warps": cfg.pop("num_warps", 4)}
        if "num_stages" in cfg:
            launch["num_stages"] = cfg.pop("num_stages")
        if cfg["SPLIT"] > _MAX_SPLIT or triton.cdiv(n, cfg["BLOCK_N"]) > _MAX_BLOCKS:
            raise ValueError(f"gemv config {config} outside the workspace")
        if rope is not None and (hd % cfg["BLOCK_N"] or cfg["BLOCK_N"] < 2):
            raise ValueError(f"gemv's rope needs an even BLOCK_N dividing {hd}, got {cfg['BLOCK_N']}")
        _gemv_kernel[(triton.cdiv(n, cfg["BLOCK_N"]), cfg["SPLIT"])](*args, M_PAD=m_pad, **launch, **flags, **cfg)
    else:
        _gemv_tuned[lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), meta["SPLIT"])](*args, M_PAD=m_pad, **flags)
    return y
