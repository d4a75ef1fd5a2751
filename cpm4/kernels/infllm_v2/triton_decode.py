"""Decode in Triton: one query token per sequence against a paged KV cache, dense or InfLLM v2.

Pages hold `page` tokens (= the InfLLM v2 block size, 64), so a block is a page. The semantic-kernel keys
live beside the pages (layout: `reference.kernel_page_slots`): the key of kernel j is stored in the page
that holds the kernel's last token, so a page's kernel keys depend only on tokens up to the page's end and
pages shared between sequences with the same prefix share them too.

A decode step is launch- and latency-bound at batch 1 (a few MB moved per layer), so it runs as few kernels
as it can, with no host synchronisation and shapes fixed by the batch size and block-table width (so it can
be captured in a CUDA graph):
0. `append_kv`: stores the new keys/values and pools the fine and coarse kernel keys the token completes;
1. `_lse_kernel`: each query head's partial log-sum-exp over its split of the coarse (Gen-B) or fine (Gen-A)
   kernel keys;
2. `_score_kernel`: merges those, scores each fine kernel, sums over the group's heads, max-pools onto
   blocks (float32 [B, hkv, blocks]); the last program of a (sequence, KV head) to finish (an arrival
   counter) picks the top-k blocks once (`topk_mask`, as prefill selection) and writes the attended list;
3. `_attend_kernel`: each program attends to its share of the listed blocks (flash-decoding split); the last
   one to finish merges the splits by their log-sum-exp. Rows shorter than `dense_len` attend to all pages.
`paged_decode` runs step 3 alone: all pages (dense) or an explicit block list per sequence and KV head.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from cpm4.kernels import pdl as pdl_launch
from cpm4.model.config import SparseConfig

from . import triton_select
from .reference import kernel_slots
from .triton_select import (
    complete_kernels,
    group_pad,
    lse_step,
    lse_value,
    merge_lse,
    num_sms,
    score_shift,
    softmax_step,
    topk_mask,
)


@triton.jit
def _kernel_addr(j, valid, table_row, stride_kp, stride_ks, KSIZE: tl.constexpr, KSTRIDE: tl.constexpr,
                 PAGE: tl.constexpr):
    """Offset of kernel j's key in a kernel-key page pool (layout: reference.kernel_page_slots)."""
    end = j * KSTRIDE + KSIZE - 1
    page = tl.load(table_row + end // PAGE, mask=valid, other=0)
    return page.to(tl.int64) * stride_kp + ((end % PAGE) // KSTRIDE) * stride_ks


@triton.jit
def _kernel_mean(kc_ptr, row, j, g, stride_kp, stride_kt, stride_kh, new_key, D: tl.constexpr, PAGE: tl.constexpr,
                 KSIZE: tl.constexpr, KPAD: tl.constexpr, KSTRIDE: tl.constexpr, NEW: tl.constexpr):
    """Kernel j's key in float32: the mean of the keys [j*stride, j*stride + size) of KV head g, read through
    the block-table row; with NEW its last key is `new_key` [D] (the token being appended, maybe not stored
    yet). Every caller sums the same tile the same way, so a kernel key computed twice is the same bits."""
    u = tl.arange(0, KPAD)
    t = j * KSTRIDE + u
    if NEW:
        um = u < KSIZE - 1
    else:
        um = u < KSIZE
    pages = tl.load(row + t // PAGE, mask=um, other=0).to(tl.int64)
    dd = tl.arange(0, D)
    k = tl.load(kc_ptr + pages[:, None] * stride_kp + (t % PAGE)[:, None] * stride_kt + g * stride_kh + dd[None, :],
                mask=um[:, None], other=0.0).to(tl.float32)
    if NEW:
        k = tl.where((u == KSIZE - 1)[:, None], new_key.to(tl.float32)[None, :], k)
    return tl.sum(k, 0) / KSIZE


@triton.jit
def _store_kernel_mean(kc_ptr, row, out_ptr, j, g, stride_kp, stride_kt, stride_kh, stride_op, stride_os, stride_oh,
                       D: tl.constexpr, PAGE: tl.constexpr, KSIZE: tl.constexpr, KPAD: tl.constexpr,
                       KSTRIDE: tl.constexpr):
    """Kernel j's key (`_kernel_mean`) into its slot of the kernel-key pages."""
    dd = tl.arange(0, D)
    mean = _kernel_mean(kc_ptr, row, j, g, stride_kp, stride_kt, stride_kh, dd, D, PAGE, KSIZE, KPAD, KSTRIDE, False)
    base = _kernel_addr(j, True, row, stride_op, stride_os, KSIZE, KSTRIDE, PAGE)
    tl.store(out_ptr + base + g * stride_oh + dd, mean.to(out_ptr.dtype.element_ty))


# stride_tb: the step's block-table width, another number each prefill step (see triton_select._lse_kernel).
@triton.jit(do_not_specialize=["stride_tb"])
def _pool_kernel(kc_ptr, table_ptr, start_ptr, end_ptr, out_ptr, stride_kp, stride_kt, stride_kh, stride_tb,
                 stride_op, stride_os, stride_oh, D: tl.constexpr, PAGE: tl.constexpr, KSIZE: tl.constexpr,
                 KPAD: tl.constexpr, KSTRIDE: tl.constexpr):
    """Kernel key = mean of the keys [j*stride, j*stride + size), for the n-th kernel ending among the new
    tokens [start, end) of sequence bi (nothing if there is none)."""
    bi = tl.program_id(0)
    g = tl.program_id(1)
    n = tl.program_id(2)
    start = tl.load(start_ptr + bi)
    end = tl.load(end_ptr + bi)
    # First kernel ending at or after `start`: j*S + K - 1 >= start.
    j0 = tl.maximum(start - (KSIZE - 1) + KSTRIDE - 1, 0) // KSTRIDE
    j = j0 + n
    if j * KSTRIDE + KSIZE - 1 < end:
        _store_kernel_mean(kc_ptr, table_ptr + bi * stride_tb, out_ptr, j, g, stride_kp, stride_kt, stride_kh,
                           stride_op, stride_os, stride_oh, D, PAGE, KSIZE, KPAD, KSTRIDE)


@triton.jit
def _kernel_ending_at(pos, KSIZE: tl.constexpr, KSTRIDE: tl.constexpr):
    """Index of the kernel whose last token is pos, or -1."""
    first = pos - (KSIZE - 1)
    return tl.where((first >= 0) & (first % KSTRIDE == 0), first // KSTRIDE, -1)


@triton.jit
def _pool_last(kc_ptr, row, out_ptr, pos, g, new_key, stride_kp, stride_kt, stride_kh, stride_op, stride_os,
               stride_oh, D: tl.constexpr, PAGE: tl.constexpr, KSIZE: tl.constexpr, KPAD: tl.constexpr,
               KSTRIDE: tl.constexpr):
    """Pool the kernel that ends at token pos (whose key is new_key), if one does."""
    j = _kernel_ending_at(pos, KSIZE, KSTRIDE)
    if j >= 0:
        mean = _kernel_mean(kc_ptr, row, j, g, stride_kp, stride_kt, stride_kh, new_key, D, PAGE, KSIZE, KPAD,
                            KSTRIDE, True)
        base = _kernel_addr(j, True, row, stride_op, stride_os, KSIZE, KSTRIDE, PAGE)
        tl.store(out_ptr + base + g * stride_oh + tl.arange(0, D), mean.to(out_ptr.dtype.element_ty))


@triton.jit
def _append_row(k_ptr, v_ptr, kc_ptr, vc_ptr, slots_ptr, table_ptr, ends_ptr, f_ptr, c_ptr, bi, g,
                stride_kb, stride_kh, stride_vb, stride_vh, stride_cp, stride_ct, stride_ch,
                stride_dp, stride_dt, stride_dh, stride_tb, stride_fp, stride_fs, stride_fh,
                stride_gp, stride_gs, stride_gh,
                D: tl.constexpr, PAGE: tl.constexpr, FSIZE: tl.constexpr, FPAD: tl.constexpr,
                FSTRIDE: tl.constexpr, CSIZE: tl.constexpr, CPAD: tl.constexpr, CSTRIDE: tl.constexpr,
                POOL: tl.constexpr, COARSE: tl.constexpr):
    """Store row bi's new key/value of KV head g at its slot, then pool the fine (and coarse) kernel that the
    token completes (its earlier keys read through the block table, its last one the new key)."""
    dd = tl.arange(0, D)
    slot = tl.load(slots_ptr + bi).to(tl.int64)
    page, t = slot // PAGE, slot % PAGE
    k = tl.load(k_ptr + bi * stride_kb + g * stride_kh + dd)
    tl.store(kc_ptr + page * stride_cp + t * stride_ct + g * stride_ch + dd, k)
    tl.store(vc_ptr + page * stride_dp + t * stride_dt + g * stride_dh + dd,
             tl.load(v_ptr + bi * stride_vb + g * stride_vh + dd))
    if POOL:
        pos = tl.load(ends_ptr + bi) - 1
        row = table_ptr + bi * stride_tb
        _pool_last(kc_ptr, row, f_ptr, pos, g, k, stride_cp, stride_ct, stride_ch, stride_fp, stride_fs, stride_fh,
                   D, PAGE, FSIZE, FPAD, FSTRIDE)
        if COARSE:
            _pool_last(kc_ptr, row, c_ptr, pos, g, k, stride_cp, stride_ct, stride_ch, stride_gp, stride_gs,
                       stride_gh, D, PAGE, CSIZE, CPAD, CSTRIDE)


@triton.jit
def _append_kernel(k_ptr, v_ptr, kc_ptr, vc_ptr, slots_ptr, table_ptr, ends_ptr, f_ptr, c_ptr,
                   stride_kb, stride_kh, stride_vb, stride_vh, stride_cp, stride_ct, stride_ch,
                   stride_dp, stride_dt, stride_dh, stride_tb, stride_fp, stride_fs, stride_fh,
                   stride_gp, stride_gs, stride_gh,
                   D: tl.constexpr, PAGE: tl.constexpr, FSIZE: tl.constexpr, FPAD: tl.constexpr,
                   FSTRIDE: tl.constexpr, CSIZE: tl.constexpr, CPAD: tl.constexpr, CSTRIDE: tl.constexpr,
                   POOL: tl.constexpr, COARSE: tl.constexpr, PDL: tl.constexpr = False):
    """One program per (row, KV head): `_append_row`."""
    pdl_launch.enter(PDL)
    _append_row(k_ptr, v_ptr, kc_ptr, vc_ptr, slots_ptr, table_ptr, ends_ptr, f_ptr, c_ptr, tl.program_id(0),
                tl.program_id(1), stride_kb, stride_kh, stride_vb, stride_vh, stride_cp, stride_ct, stride_ch,
                stride_dp, stride_dt, stride_dh, stride_tb, stride_fp, stride_fs, stride_fh, stride_gp, stride_gs,
                stride_gh, D, PAGE, FSIZE, FPAD, FSTRIDE, CSIZE, CPAD, CSTRIDE, POOL, COARSE)


def append_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
              block_table: torch.Tensor, ends: torch.Tensor, fine: torch.Tensor | None = None,
              coarse: torch.Tensor | None = None, cfg: SparseConfig | None = None, pdl: bool | None = None) -> None:
    """One decode token per row: k/v [B, hkv, d] stored at flat cache slots [B] (page * page_size + offset) of
    k/v cache [pages, page, hkv, d]; with `fine` (and `coarse`) kernel-key pages and `cfg`, also pools the
    kernels each token completes (the token is the last of ends[b] tokens, reached through block_table).
    One launch instead of two scatters and two pooling kernels. pdl: see `PDL` (None: that)."""
    args, meta = _append_args(k, v, k_cache, v_cache, slots, block_table, ends, fine, coarse, cfg)
    pdl = _use_pdl(k.device, pdl)
    _append_kernel[(k.shape[0], k.shape[1])](*args, **meta, PDL=pdl, num_warps=4, **_pdl_launch(pdl))


def _append_args(k, v, k_cache, v_cache, slots, block_table, ends, fine, coarse, cfg) -> tuple[tuple, dict]:
    """Checked arguments of `_append_row` (positional, then constexprs) for `append_kv` and the fused LSE."""
    b, hkv, d = k.shape
    _, page, chkv, cd = k_cache.shape
    if (chkv, cd) != (hkv, d) or v.shape != k.shape or v_cache.shape != k_cache.shape:
        raise ValueError(f"k {tuple(k.shape)} / v {tuple(v.shape)} do not fit cache {tuple(k_cache.shape)}")
    if slots.shape != (b,) or ends.shape != (b,) or block_table.shape[0] != b:
        raise ValueError(f"slots {tuple(slots.shape)}, ends {tuple(ends.shape)}, block_table "
                         f"{tuple(block_table.shape)} need {b} rows")
    if k.stride(2) != 1 or v.stride(2) != 1:
        k, v = k.contiguous(), v.contiguous()
    pool = fine is not None and cfg is not None
    has_coarse = pool and coarse is not None
    f = fine if pool else k_cache
    c = coarse if has_coarse else f
    for name, t, stride in (("fine", fine if pool else None, cfg.kernel_stride if pool else 1),
                            ("coarse", coarse if has_coarse else None, cfg.coarse_kernel_stride if pool else 1)):
        if t is not None and t.shape != (k_cache.shape[0], kernel_slots(page, stride), hkv, d):
            raise ValueError(f"{name} kernel-key pages {tuple(t.shape)} do not fit the cache {tuple(k_cache.shape)}")
    fs, fst = (cfg.kernel_size, cfg.kernel_stride) if pool else (1, 1)
    cs, cst = (cfg.coarse_kernel_size, cfg.coarse_kernel_stride) if has_coarse else (1, 1)
    args = (k, v, k_cache, v_cache, slots, block_table, ends, f, c, k.stride(0), k.stride(1), v.stride(0),
            v.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0),
            v_cache.stride(1), v_cache.stride(2), block_table.stride(0), f.stride(0), f.stride(1), f.stride(2),
            c.stride(0), c.stride(1), c.stride(2))
    meta = dict(D=d, PAGE=page, FSIZE=fs, FPAD=triton.next_power_of_2(fs), FSTRIDE=fst, CSIZE=cs,
                CPAD=triton.next_power_of_2(cs), CSTRIDE=cst, POOL=pool, COARSE=has_coarse)
    return args, meta


def pool_kernel_keys(k_cache: torch.Tensor, table: torch.Tensor, starts: torch.Tensor, ends: torch.Tensor,
                     out: torch.Tensor, kernel_size: int, kernel_stride: int, max_new_tokens: int) -> None:
    """Pool every kernel that ends among tokens [starts[b], ends[b]) of each sequence into `out`
    [pages, page // stride, hkv, d] (layout: `reference.kernel_page_slots`). max_new_tokens bounds ends - starts."""
    b = table.shape[0]
    _, page, hkv, d = k_cache.shape
    if out.shape != (k_cache.shape[0], kernel_slots(page, kernel_stride), hkv, d):
        raise ValueError(f"kernel-key pages {tuple(out.shape)} do not fit the cache {tuple(k_cache.shape)}")
    n_max = triton.cdiv(max_new_tokens, kernel_stride) + 1
    _pool_kernel[(b, hkv, n_max)](k_cache, table, starts, ends, out, k_cache.stride(0), k_cache.stride(1),
                                  k_cache.stride(2), table.stride(0), out.stride(0), out.stride(1), out.stride(2),
                                  D=d, PAGE=page, KSIZE=kernel_size, KPAD=triton.next_power_of_2(kernel_size),
                                  KSTRIDE=kernel_stride)


@triton.jit
def _split_range(n, sp, SPLITS: tl.constexpr, TILE: tl.constexpr):
    """[lo, hi) of split sp of n items cut into SPLITS parts of whole tiles."""
    per = tl.cdiv(tl.cdiv(n, SPLITS), TILE) * TILE
    lo = sp * per
    return lo, tl.minimum(lo + per, n)


@triton.jit
def _row_state(lens_ptr, bi, DENSE_LEN: tl.constexpr):
    """(tokens in the cache, position of the query, whether the row takes the sparse path)."""
    seq_len = tl.load(lens_ptr + bi)
    sparse = seq_len > 0
    if DENSE_LEN >= 0:
        sparse = sparse & (seq_len >= DENSE_LEN)
    return seq_len, seq_len - 1, sparse


@triton.jit
def _group_q(q_ptr, bi, g, stride_qb, stride_qh, G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr):
    r = tl.arange(0, G_PAD)
    hm = r < G
    h = g * G + r
    q = tl.load(q_ptr + bi * stride_qb + h[:, None] * stride_qh + tl.arange(0, D)[None, :], mask=hm[:, None],
                other=0.0)
    return q, h, hm


@triton.jit
def _lse_kernel(q_ptr, kk_ptr, table_ptr, lens_ptr, lse_ptr, sm_scale, stride_qb, stride_qh, stride_kp, stride_ks,
                stride_kh, stride_tb, stride_lb, stride_lh,
                k_ptr, v_ptr, kc_ptr, vc_ptr, slots_ptr, a_table_ptr, ends_ptr, f_ptr, c_ptr,
                stride_nb, stride_nh, stride_vb, stride_vh, stride_cp, stride_ct, stride_ch,
                stride_dp, stride_dt, stride_dh, stride_atb, stride_fp, stride_fs, stride_fh,
                stride_gp, stride_gs, stride_gh,
                G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, PAGE: tl.constexpr, BLOCK_N: tl.constexpr,
                KSIZE: tl.constexpr, KPAD: tl.constexpr, KSTRIDE: tl.constexpr, SPLITS: tl.constexpr,
                DENSE_LEN: tl.constexpr, APPEND: tl.constexpr, FSIZE: tl.constexpr, FPAD: tl.constexpr,
                FSTRIDE: tl.constexpr, CSIZE: tl.constexpr, CPAD: tl.constexpr, CSTRIDE: tl.constexpr,
                POOL: tl.constexpr, COARSE: tl.constexpr, PDL: tl.constexpr = False, PEEL: tl.constexpr = False):
    """Partial log-sum-exp (log2 units) of each query head of group g over split sp of the kernels its
    query can see; -inf for an empty split or a dense row. With APPEND, program 0 of each (row, KV head)
    also stores the new token (`_append_row`: one launch less per step), and the split that holds the kernel
    the token completes computes that key itself (`_kernel_mean`, the same bits program 0 stores): it may
    not be stored yet. It is swapped into its tile, or with PEEL (`STORE_PEEL`) left out of the tiles and its
    score added after the loop, so no select sits between the tiles' loads and dots."""
    pdl_launch.enter(PDL)
    bi = tl.program_id(0)
    g = tl.program_id(1)
    sp = tl.program_id(2)
    if APPEND:
        if sp == 0:
            _append_row(k_ptr, v_ptr, kc_ptr, vc_ptr, slots_ptr, a_table_ptr, ends_ptr, f_ptr, c_ptr, bi, g,
                        stride_nb, stride_nh, stride_vb, stride_vh, stride_cp, stride_ct, stride_ch,
                        stride_dp, stride_dt, stride_dh, stride_atb, stride_fp, stride_fs, stride_fh,
                        stride_gp, stride_gs, stride_gh, D, PAGE, FSIZE, FPAD, FSTRIDE, CSIZE, CPAD, CSTRIDE,
                        POOL, COARSE)
    seq_len, pos, sparse = _row_state(lens_ptr, bi, DENSE_LEN)
    q, h, hm = _group_q(q_ptr, bi, g, stride_qb, stride_qh, G, G_PAD, D)
    m_i = tl.full((G_PAD,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((G_PAD,), dtype=tl.float32)
    if sparse:
        n = complete_kernels(pos, KSIZE, KSTRIDE)
        lo, hi = _split_range(n, sp, SPLITS, BLOCK_N)
        row = table_ptr + bi * stride_tb
        dd = tl.arange(0, D)
        j_new = -1
        new_key = tl.zeros((D,), dtype=tl.float32)
        if APPEND:
            j_new = _kernel_ending_at(pos, KSIZE, KSTRIDE)
            if (j_new >= lo) & (j_new < hi):
                # Rounded as stored (both branches of this runtime `if` keep new_key float32).
                new_key = _kernel_mean(kc_ptr, row, j_new, g, stride_cp, stride_ct, stride_ch,
                                       tl.load(k_ptr + bi * stride_nb + g * stride_nh + dd), D, PAGE, KSIZE, KPAD,
                                       KSTRIDE, True).to(kk_ptr.dtype.element_ty).to(tl.float32)
        for j0 in range(lo, hi, BLOCK_N):
            j = j0 + tl.arange(0, BLOCK_N)
            jm = j < hi
            if PEEL:
                jm = jm & (j != j_new)
            base = _kernel_addr(j, jm, row, stride_kp, stride_ks, KSIZE, KSTRIDE, PAGE)
            kt = tl.load(kk_ptr + base[None, :] + g * stride_kh + dd[:, None], mask=jm[None, :], other=0.0)
            if APPEND and not PEEL:
                kt = tl.where((j == j_new)[None, :], new_key.to(kt.dtype)[:, None], kt)
            s = tl.dot(q, kt) * (sm_scale * 1.4426950408889634)
            m_i, l_i = lse_step(tl.where(jm[None, :], s, float("-inf")), m_i, l_i)
        if PEEL:
            if (j_new >= lo) & (j_new < hi):  # the key the new token completes, kept out of the tiles
                s_new = tl.sum(q.to(tl.float32) * new_key[None, :], 1) * (sm_scale * 1.4426950408889634)
                m_i, l_i = lse_step(s_new[:, None], m_i, l_i)
    tl.store(lse_ptr + bi * stride_lb + h * stride_lh + sp, lse_value(m_i, l_i), mask=hm)


@triton.jit
def _group_scores(q, k1_ptr, c, ok, row, g, has, lse, sm_scale, stride_kp, stride_ks, stride_kh, D: tl.constexpr,
                  KSIZE: tl.constexpr, KSTRIDE: tl.constexpr, PAGE: tl.constexpr):
    """sum over the group's heads of exp(q_h.k_c * scale - lse_h) for fine kernels c (0 where not ok), rounded to
    q's dtype as stage 1 stores it."""
    base = _kernel_addr(c, ok, row, stride_kp, stride_ks, KSIZE, KSTRIDE, PAGE)
    kt = tl.load(k1_ptr + base[None, :] + g * stride_kh + tl.arange(0, D)[:, None], mask=ok[None, :], other=0.0)
    s = tl.dot(q, kt) * (sm_scale * 1.4426950408889634)
    p = tl.where(ok[None, :] & has[:, None], tl.exp2(s - lse[:, None]), 0.0)
    return tl.sum(p, 0).to(q.dtype).to(tl.float32)


@triton.jit
def _lanes_fit(qb, N: tl.constexpr, LOCAL: tl.constexpr, GEN_B: tl.constexpr):
    """Whether a selection over blocks [0, N) is the whole one for a query in block qb: every block past them is
    a local block (Gen-B: forced in; Gen-A: attended besides the selection)."""
    if GEN_B:
        return qb - LOCAL <= N
    else:
        return qb - LOCAL < N


@triton.jit
def _select_lists(s_row, e_row, a_row, n_row, qb, N: tl.constexpr, K: tl.constexpr, K_PAD: tl.constexpr,
                  INIT: tl.constexpr, LOCAL: tl.constexpr, GEN_B: tl.constexpr, SHIFT: tl.constexpr,
                  NARROW: tl.constexpr, SAVE_SEL: tl.constexpr):
    """The selection from a row's pooled scores over lanes [0, N), blocks [N, qb] (if any) being local blocks
    (`_lanes_fit`): the attended list (ascending; Gen-A adds its window), its length and, with SAVE_SEL, the
    selection (-1 padded to K)."""
    bvec = tl.arange(0, N)
    # .cg: read the other programs' scores from L2, not from a stale L1 line.
    sc = tl.load(s_row + bvec, mask=bvec <= qb, other=0.0, cache_modifier=".cg")
    n_out = tl.maximum(qb - N + 1, 0)  # local blocks past the lanes, in order after them
    sel = topk_mask(sc, bvec, qb, K, INIT, LOCAL, GEN_B, SHIFT, NARROW, n_out if GEN_B else 0)
    n_sel = tl.sum(sel.to(tl.int32), 0)
    if SAVE_SEL:
        tl.store(e_row + tl.cumsum(sel.to(tl.int32), 0) - 1, bvec, mask=sel)
        if GEN_B:  # the forced local blocks past the lanes
            tl.store(e_row + n_sel + bvec, N + bvec, mask=bvec < n_out)
            n_sel += n_out
        kk = tl.arange(0, K_PAD)
        tl.store(e_row + kk, tl.full((K_PAD,), -1, dtype=tl.int32), mask=(kk >= n_sel) & (kk < K))
    attend = sel
    if not GEN_B:  # Gen-A attends to its local window besides the selection
        attend = attend | ((bvec > qb - LOCAL) & (bvec <= qb))
    n_att = tl.sum(attend.to(tl.int32), 0)
    tl.store(a_row + tl.cumsum(attend.to(tl.int32), 0) - 1, bvec, mask=attend)
    tl.store(a_row + n_att + bvec, N + bvec, mask=bvec < n_out)
    tl.store(n_row, n_att + n_out)


@triton.jit
def page_kv(kc_ptr, vc_ptr, page, tt, g, dd, km, stride_kp, stride_kt, stride_kh, stride_vp, stride_vt, stride_vh):
    """Keys and values [rows, D] of KV head g: row i is token tt[i] of page page[i] (int64), zero where km is
    False."""
    k = tl.load(kc_ptr + page[:, None] * stride_kp + tt[:, None] * stride_kt + g * stride_kh + dd[None, :],
                mask=km[:, None], other=0.0)
    v = tl.load(vc_ptr + page[:, None] * stride_vp + tt[:, None] * stride_vt + g * stride_vh + dd[None, :],
                mask=km[:, None], other=0.0)
    return k, v


@triton.jit
def _step_program(PDL: tl.constexpr):
    """(row, KV group, split, KV groups) of a decode-step program over grid (rows, groups, splits); with PDL
    (a programmatic dependent launch) first lets the next kernel launch, then waits for the previous one."""
    pdl_launch.enter(PDL)
    return tl.program_id(0), tl.program_id(1), tl.program_id(2), tl.num_programs(1)


@triton.jit
def _score_kernel(q_ptr, k1_ptr, table_ptr, lens_ptr, lse_ptr, s_ptr, cnt_ptr, att_ptr, natt_ptr, sel_ptr, sm_scale,
                  stride_qb, stride_qh, stride_kp, stride_ks, stride_kh, stride_tb, stride_lb, stride_lh, stride_sb,
                  stride_sh, stride_ab, stride_ah, stride_eb, stride_eh,
                  G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, PAGE: tl.constexpr, NBT: tl.constexpr,
                  KSIZE: tl.constexpr, KSTRIDE: tl.constexpr, PER_BLOCK: tl.constexpr, PAD: tl.constexpr,
                  WIDTH: tl.constexpr, SPLITS: tl.constexpr, LSE_SPLITS: tl.constexpr, LSE_PAD: tl.constexpr,
                  DENSE_LEN: tl.constexpr, SELECT: tl.constexpr, NB_PAD: tl.constexpr, K: tl.constexpr,
                  K_PAD: tl.constexpr, INIT: tl.constexpr, LOCAL: tl.constexpr, GEN_B: tl.constexpr,
                  SHIFT: tl.constexpr, SAVE_SEL: tl.constexpr, PDL: tl.constexpr, NARROW: tl.constexpr):
    """Pooled block scores of split sp of the blocks up to the query's: max over the fine kernels
    overlapping each block of sum_h exp(q_h.k_j * scale - lse_h), rounded to q's dtype as stage 1 stores it.
    With SELECT, the last split to finish (arrival counter cnt[bi, g], left at 0 again for the next call)
    selects the blocks from all of them and writes the attended list att[bi, g, :natt] (ascending; Gen-A adds
    its sliding window) and, with SAVE_SEL, the selection sel[bi, g, :K] (-1 padded). PDL: launched as a
    programmatic dependent of the LSE kernel (everything read after waiting for it)."""
    # Every program waits, dense rows too: the attention kernel after this one waits only for this one, and reads
    # what the LSE kernel stored (the new token).
    bi, g, sp, n_g = _step_program(PDL)
    seq_len, pos, sparse = _row_state(lens_ptr, bi, DENSE_LEN)
    if sparse:
        q, h, hm = _group_q(q_ptr, bi, g, stride_qb, stride_qh, G, G_PAD, D)
        ss = tl.arange(0, LSE_PAD)
        parts = tl.load(lse_ptr + bi * stride_lb + h[:, None] * stride_lh + ss[None, :],
                        mask=hm[:, None] & (ss < LSE_SPLITS)[None, :], other=float("-inf"))
        lse = merge_lse(parts)
        has = lse > float("-inf")
        lse = tl.where(has, lse, 0.0)
        n1 = complete_kernels(pos, KSIZE, KSTRIDE)
        nb = pos // PAGE + 1
        lo, hi = _split_range(nb, sp, SPLITS, NBT)
        row = table_ptr + bi * stride_tb
        for b0 in range(lo, hi, NBT):
            blk = b0 + tl.arange(0, NBT)
            pooled = tl.zeros((NBT,), dtype=tl.float32)
            for w in range(WIDTH):
                c = blk * PER_BLOCK - PAD + w
                ok = (c >= 0) & (c < n1) & (blk < hi)
                grp = _group_scores(q, k1_ptr, c, ok, row, g, has, lse, sm_scale, stride_kp, stride_ks, stride_kh,
                                    D, KSIZE, KSTRIDE, PAGE)
                pooled = tl.maximum(pooled, grp)
            tl.store(s_ptr + bi * stride_sb + g * stride_sh + blk, pooled, mask=blk < hi)
        if SELECT:
            tl.debug_barrier()  # every thread's scores are stored before the arrival is counted
            if tl.atomic_add(cnt_ptr + bi * n_g + g, 1) == SPLITS - 1:
                qb = pos // PAGE
                s_row = s_ptr + bi * stride_sb + g * stride_sh
                e_row = sel_ptr + bi * stride_eb + g * stride_eh
                a_row = att_ptr + bi * stride_ab + g * stride_ah
                n_row = natt_ptr + bi * n_g + g
                # The selection's lanes: a quarter or half of NB_PAD when the query's blocks fit, or all but their
                # local blocks do (a short sequence in a wide table; 2,049 blocks in 4,096 lanes).
                Q: tl.constexpr = NB_PAD // 4
                H: tl.constexpr = NB_PAD // 2
                TAIL: tl.constexpr = (INIT + LOCAL + 1 <= K) or not GEN_B  # forced blocks all fit in K
                if (NB_PAD >= 64) and TAIL and (Q >= K_PAD):
                    if _lanes_fit(qb, Q, LOCAL, GEN_B):
                        _select_lists(s_row, e_row, a_row, n_row, qb, Q, K, K_PAD, INIT, LOCAL, GEN_B, SHIFT, NARROW,
                                      SAVE_SEL)
                    elif _lanes_fit(qb, H, LOCAL, GEN_B):
                        _select_lists(s_row, e_row, a_row, n_row, qb, H, K, K_PAD, INIT, LOCAL, GEN_B, SHIFT, NARROW,
                                      SAVE_SEL)
                    else:
                        _select_lists(s_row, e_row, a_row, n_row, qb, NB_PAD, K, K_PAD, INIT, LOCAL, GEN_B, SHIFT,
                                      NARROW, SAVE_SEL)
                else:
                    _select_lists(s_row, e_row, a_row, n_row, qb, NB_PAD, K, K_PAD, INIT, LOCAL, GEN_B, SHIFT, NARROW,
                                  SAVE_SEL)
                tl.store(cnt_ptr + bi * n_g + g, 0)  # every split has arrived: reusable


@triton.jit
def _attend_kernel(q_ptr, kc_ptr, vc_ptr, table_ptr, lens_ptr, blk_ptr, nblk_ptr, o_ptr, m_ptr, out_ptr, cnt_ptr,
                   member_ptr, nsh_ptr, n_list, sm_scale, stride_qb, stride_qh, stride_kp, stride_kt, stride_kh,
                   stride_vp, stride_vt, stride_vh, stride_tb, stride_bb, stride_bh, stride_ob, stride_oh, stride_os,
                   stride_mb, stride_mh, stride_rb, stride_rh,
                   nk_ptr, nv_ptr, a_kc_ptr, a_vc_ptr, slots_ptr, a_table_ptr, a_ends_ptr, f_ptr, c_ptr,
                   stride_nb, stride_nh, stride_nvb, stride_nvh, stride_cp, stride_ct, stride_ch,
                   stride_dp, stride_dt, stride_dh, stride_atb, stride_fp, stride_fs, stride_fh,
                   stride_gp, stride_gs, stride_gh,
                   G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, PAGE: tl.constexpr,
                   SPLITS: tl.constexpr, SPLITS_PAD: tl.constexpr, CHUNK: tl.constexpr, MODE: tl.constexpr,
                   DENSE_LEN: tl.constexpr, TILE_PAGES: tl.constexpr, PDL: tl.constexpr,
                   MERGE: tl.constexpr, SKIP: tl.constexpr, STORE: tl.constexpr = False, FSIZE: tl.constexpr = 1,
                   FPAD: tl.constexpr = 1, FSTRIDE: tl.constexpr = 1, CSIZE: tl.constexpr = 1,
                   CPAD: tl.constexpr = 1, CSTRIDE: tl.constexpr = 1, POOL: tl.constexpr = False,
                   COARSE: tl.constexpr = False, PEEL: tl.constexpr = False):
    """Split sp of one (sequence, KV group)'s attended pages. MODE 0: every page of the sequence; 1: the
    explicit list blk[bi, g, :n_list] (-1 unused); 2: the list blk[bi, g, :nblk[bi, g]] written by the
    selection (rows below dense_len: every page). With several splits, each writes its partial output and
    log-sum-exp (log2) and the last to finish (arrival counter cnt[bi, g], left at 0 again) merges them into
    out; without MERGE, `_merge_kernel` does, launched after this one. PDL: launched as a programmatic
    dependent of the kernel before it (everything read after waiting for it). SKIP (MODE 0, and MODE 2's dense
    rows; cascade decode): a row with member[bi] = k + 1 starts after the nsh[k] pages of its group, which
    `triton_cascade` attends for it; the partials are always written (merged by `_merge_kernel` with the cascade's).
    STORE: the row's new key/value (nk, nv [B, hkv, D]; its token the last of seq_len) are stored at its flat
    cache slot by split 0 (`_append_row`, with POOL the kernel keys it completes pooled too: the `append_kv`
    arguments after rh) and taken from nk/nv, not the cache, wherever a tile holds that token (the store may
    not have landed): `append_kv`'s launch saved. PEEL (STORE, MODE 0): the tiles leave that token out and split 0
    adds it after its loop from nk/nv, so the tiles' loads feed the dots directly (no select between them, which
    kept Triton from pipelining the loads: see `STORE_PEEL`)."""
    bi, g, sp, n_g = _step_program(PDL)
    seq_len, pos, sparse = _row_state(lens_ptr, bi, DENSE_LEN)
    q, h, hm = _group_q(q_ptr, bi, g, stride_qb, stride_qh, G, G_PAD, D)
    dd = tl.arange(0, D)
    nk = tl.zeros((D,), dtype=kc_ptr.dtype.element_ty)
    nv = tl.zeros((D,), dtype=vc_ptr.dtype.element_ty)
    seen = seq_len  # the tokens the tiles attend (all but the current one with PEEL)
    if PEEL:
        seen = seq_len - 1
    if STORE:
        if not PEEL:
            nk = tl.load(nk_ptr + bi * stride_nb + g * stride_nh + dd)
            nv = tl.load(nv_ptr + bi * stride_nvb + g * stride_nvh + dd)
        if sp == 0:
            _append_row(nk_ptr, nv_ptr, a_kc_ptr, a_vc_ptr, slots_ptr, a_table_ptr, a_ends_ptr, f_ptr, c_ptr, bi, g,
                        stride_nb, stride_nh, stride_nvb, stride_nvh, stride_cp, stride_ct, stride_ch, stride_dp,
                        stride_dt, stride_dh, stride_atb, stride_fp, stride_fs, stride_fh, stride_gp, stride_gs,
                        stride_gh, D, PAGE, FSIZE, FPAD, FSTRIDE, CSIZE, CPAD, CSTRIDE, POOL, COARSE)
    qk_scale = sm_scale * 1.4426950408889634
    n_att = tl.cdiv(seq_len, PAGE)  # MODE 0 and dense rows: page i is block i
    listed = MODE == 1
    if MODE == 1:
        n_att = n_list
    if MODE == 2:
        if sparse:
            n_att = tl.load(nblk_ptr + bi * n_g + g)
            listed = True
    m_i = tl.full((G_PAD,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((G_PAD,), dtype=tl.float32)
    acc = tl.zeros((G_PAD, D), dtype=tl.float32)
    first = 0
    if SKIP:
        grp = tl.load(member_ptr + bi)  # k + 1: the row starts after group k's nsh[k] pages; 0: no group
        first = tl.where(grp > 0, tl.load(nsh_ptr + tl.maximum(grp - 1, 0)), 0)
        if MODE == 2:
            first = tl.where(sparse, 0, first)  # a sparse row's list never holds the shared pages for it
    per = tl.cdiv(n_att - first, SPLITS)
    lo = first + sp * per
    hi = tl.minimum(lo + per, n_att)
    if TILE_PAGES == 1:
        tt = tl.arange(0, PAGE)
        for i in range(lo, hi):
            b = i
            if listed:
                b = tl.load(blk_ptr + bi * stride_bb + g * stride_bh + i)
            if (b >= 0) & (b * PAGE < seen):
                page = tl.load(table_ptr + bi * stride_tb + b).to(tl.int64)
                km = b * PAGE + tt < seen
                k = tl.load(kc_ptr + page * stride_kp + tt[:, None] * stride_kt + g * stride_kh + dd[None, :],
                            mask=km[:, None], other=0.0)
                v = tl.load(vc_ptr + page * stride_vp + tt[:, None] * stride_vt + g * stride_vh + dd[None, :],
                            mask=km[:, None], other=0.0)
                if STORE and not PEEL:
                    cur = (b * PAGE + tt == seq_len - 1)[:, None]
                    k, v = tl.where(cur, nk[None, :], k), tl.where(cur, nv[None, :], v)
                m_i, l_i, acc = softmax_step(q, k, v, km[None, :], m_i, l_i, acc, qk_scale)
    else:
        # TILE_PAGES pages per step as one gathered tile (each row's page looked up): more bytes in flight
        # per program than a page at a time.
        rr = tl.arange(0, TILE_PAGES * PAGE)
        tt = rr % PAGE
        for i0 in range(lo, hi, TILE_PAGES):
            j = i0 + rr // PAGE
            b = j
            if listed:
                b = tl.load(blk_ptr + bi * stride_bb + g * stride_bh + j, mask=j < hi, other=-1)
            km = (j < hi) & (b >= 0) & (b * PAGE + tt < seen)
            page = tl.load(table_ptr + bi * stride_tb + b, mask=km, other=0).to(tl.int64)
            k, v = page_kv(kc_ptr, vc_ptr, page, tt, g, dd, km, stride_kp, stride_kt, stride_kh, stride_vp,
                           stride_vt, stride_vh)
            if STORE and not PEEL:
                cur = (km & (b * PAGE + tt == seq_len - 1))[:, None]
                k, v = tl.where(cur, nk[None, :], k), tl.where(cur, nv[None, :], v)
            m_i, l_i, acc = softmax_step(q, k, v, km[None, :], m_i, l_i, acc, qk_scale)
    if PEEL:
        if (sp == 0) & (seq_len > 0):  # the current token, from nk/nv (split 0 stored it above)
            nk = tl.load(nk_ptr + bi * stride_nb + g * stride_nh + dd)
            nv = tl.load(nv_ptr + bi * stride_nvb + g * stride_nvh + dd)
            s_cur = tl.sum(q.to(tl.float32) * nk.to(tl.float32)[None, :], 1) * qk_scale
            m_new = tl.maximum(m_i, s_cur)
            alpha = tl.exp2(m_i - m_new)
            p_cur = tl.exp2(s_cur - m_new)
            l_i = l_i * alpha + p_cur
            acc = acc * alpha[:, None] + p_cur[:, None] * nv.to(tl.float32)[None, :]
            m_i = m_new
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    out_rows = out_ptr + bi * stride_rb + h[:, None] * stride_rh + dd[None, :]
    if SPLITS + SKIP == 1:  # one split and no cascade partials to merge: the output directly
        tl.store(out_rows, (acc / l_safe[:, None]).to(out_ptr.dtype.element_ty), mask=hm[:, None])
    else:
        tl.store(o_ptr + bi * stride_ob + h[:, None] * stride_oh + sp * stride_os + dd[None, :],
                 acc / l_safe[:, None], mask=hm[:, None])
        # Partial log-sum-exp in log2 units; -inf for an empty split.
        tl.store(m_ptr + bi * stride_mb + h * stride_mh + sp, tl.where(l_i > 0, m_i + tl.log2(l_safe), float("-inf")),
                 mask=hm)
        if MERGE:
            tl.debug_barrier()  # every thread's partials are stored before the arrival is counted
            if tl.atomic_add(cnt_ptr + bi * n_g + g, 1) == SPLITS - 1:
                # The last split merges all of them (.cg: the other programs' partials from L2, not a stale L1).
                ss = tl.arange(0, SPLITS_PAD)
                m = tl.load(m_ptr + bi * stride_mb + h[:, None] * stride_mh + ss[None, :],
                            mask=hm[:, None] & (ss < SPLITS)[None, :], other=float("-inf"), cache_modifier=".cg")
                mx = tl.max(m, 1)
                mx = tl.where(mx > float("-inf"), mx, 0.0)
                tot = tl.sum(tl.exp2(m - mx[:, None]), 1)
                res = tl.zeros((G_PAD, D), dtype=tl.float32)
                for c0 in range(0, SPLITS, CHUNK):
                    cc = c0 + tl.arange(0, CHUNK)
                    cm = hm[:, None] & (cc < SPLITS)[None, :]
                    mc = tl.load(m_ptr + bi * stride_mb + h[:, None] * stride_mh + cc[None, :], mask=cm,
                                 other=float("-inf"), cache_modifier=".cg")
                    o = tl.load(o_ptr + bi * stride_ob + h[:, None, None] * stride_oh + cc[None, :, None] * stride_os
                                + dd[None, None, :], mask=cm[:, :, None], other=0.0, cache_modifier=".cg")
                    res += tl.sum(o * tl.exp2(mc - mx[:, None])[:, :, None], 1)
                tl.store(out_rows, (res / tl.where(tot > 0, tot, 1.0)[:, None]).to(out_ptr.dtype.element_ty),
                         mask=hm[:, None])
                tl.store(cnt_ptr + bi * n_g + g, 0)  # every split has arrived: reusable


@triton.jit
def _merge_kernel(o_ptr, m_ptr, out_ptr, stride_ob, stride_oh, stride_os, stride_mb, stride_mh, stride_rb, stride_rh,
                  SPLITS: tl.constexpr, SPLITS_PAD: tl.constexpr, DC: tl.constexpr, PDL: tl.constexpr = False):
    """out[bi, h, chunk dc of DC dims] from the SPLITS partial outputs and log-sum-exps (log2) of `_attend_kernel`
    (run without MERGE): every (row, head, chunk) in its own program, where the in-kernel merge leaves all of a
    KV group's partials to one program."""
    pdl_launch.enter(PDL)
    bi = tl.program_id(0)
    h = tl.program_id(1)
    dd = tl.program_id(2) * DC + tl.arange(0, DC)
    ss = tl.arange(0, SPLITS_PAD)
    sm = ss < SPLITS
    m = tl.load(m_ptr + bi * stride_mb + h * stride_mh + ss, mask=sm, other=float("-inf"))
    mx = tl.max(m, 0)
    w = tl.exp2(m - tl.where(mx > float("-inf"), mx, 0.0))  # 0 for empty splits (and padding)
    tot = tl.sum(w, 0)
    o = tl.load(o_ptr + bi * stride_ob + h * stride_oh + ss[:, None] * stride_os + dd[None, :], mask=sm[:, None],
                other=0.0)
    res = tl.sum(o * w[:, None], 0) / tl.where(tot > 0, tot, 1.0)
    tl.store(out_ptr + bi * stride_rb + h * stride_rh + dd, res.to(out_ptr.dtype.element_ty))


def _check(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
           seq_lens: torch.Tensor) -> tuple[int, int, int, int]:
    b, hq, d = q.shape
    _, page, hkv, dk = k_cache.shape
    if dk != d or hq % hkv or v_cache.shape != k_cache.shape:
        raise ValueError(f"q {tuple(q.shape)} does not fit cache {tuple(k_cache.shape)} / {tuple(v_cache.shape)}")
    if block_table.shape[0] != b or seq_lens.shape[0] != b:
        raise ValueError(f"block_table {tuple(block_table.shape)} and seq_lens {tuple(seq_lens.shape)} need {b} rows")
    return b, hq, hkv, d


# SPLITS_POW2: default split counts rounded down to a power of two. Each stage's consumer loads its partials padded
# to the next power of two (LSE_PAD, SPLITS_PAD), so 129 or 132 splits (an H200's 2 x 132 SMs over 2 KV heads, a
# table past 2,048 blocks) cost a 256-wide merge. Measured by benchmarks/decode_width.py (rows .pow2).
SPLITS_POW2 = True


def _default_splits(device: torch.device, programs: int, most: int) -> int:
    # Enough programs for ~2 waves over the SMs.
    n = max(1, min(triton.cdiv(2 * num_sms(device), programs), most))
    return 1 << (n.bit_length() - 1) if SPLITS_POW2 else n


# Pages per step of the paged attention loop (`_attend_kernel`'s TILE_PAGES); benchmarks/attention.py times
# the alternatives (decode.*.tile<N> rows). H200, CUDA graphs, 8K/32K/128K: two pages per step equal one at
# 8K and are faster beyond (dense paged 128K 59 vs 68 µs, InfLLM v2 41 vs 42 µs); four are slower.
TILE_PAGES = 2

# Measured (benchmarks/attention.py rows decode.cuda_graph.persistent_counters / .pdl / .pdl_persistent, H200,
# CUDA graphs, 32K / 128K): 35.4 / 39.2 µs without either, 34.1 / 37.9 with persistent counters, 35.0 / 39.2 with
# PDL, 34.0 / 38.3 with both. So persistent counters on; PDL None (auto: only inside `pdl.ours()`, the engine's
# decode steps whose kernels are all ours, where it gained: see cpm4/kernels/pdl.py).
# - PERSISTENT_COUNTERS: the arrival counters of the score and attention kernels come from one zeroed buffer per
#   device that the kernels leave at zero (the last split resets its counter), instead of a zero-fill node per
#   step. Assumes one decode at a time per device (the engine's single stream).
# - PDL: on Hopper and later, the score and attention kernels are launched as programmatic dependents of the
#   kernel before them, so their launch and first loads (lengths, q) overlap its tail.
PERSISTENT_COUNTERS = True
PDL: bool | None = None
# FUSE_DENSE_STORE_ROWS: decode steps of up to this many rows through the dense paged decode (no sparse config)
# store the step's new keys/values inside its attention launch (`paged_decode(new_kv=...)`) rather than by
# `append_kv` before it: one launch a layer fewer. H200, 0.5B (compiled): batch 1 0.77 / 0.84-0.85 ms a token at
# 1K / 4K -> 0.75 / 0.82 (thirty-sixth pass). With the token swapped into its tile, steps of 128-256 rows were
# 10-15 % slower (nano-vllm's 256-request row 57.2K -> 51.4K tok/s, forty-seventh pass), so the limit was 32.
# Peeled (STORE_PEEL), one layer's launch (benchmarks/batched_decode.py, forty-eighth pass) beats the store apart
# at 1-128 rows (0.5B 128 rows x 512 / 2048 tokens: 20.3 / 49.4 µs against 22.0 / 51.5; 8B 16 x 4K: 29.4 against
# 31.8) but not at 256 (32.0 against 28.9 µs: one split a row there). 0: never; large: always.
FUSE_DENSE_STORE_ROWS = 128
# STORE_PEEL: with the store in the launch, the current token is left out of the tiles and added by split 0 after
# its loop, rather than swapped into its tile (a select on every K and V tile, between the loads and the dots, that
# kept Triton from pipelining them); so too the kernel key it completes in the sparse step's log-sum-exp launch.
# batched_decode.py fused.peel against fused: 8B batch 1 x 4K 8.9 against 10.4 µs, 16 x 4K 29.4 against 43.1,
# 64 x 4K 81.0 against 130.2. On.
STORE_PEEL = True
# The paged attention launch's warps and pipeline stages (None: Triton's default), tuned at batch 1 over long
# contexts; steps of many short rows may want others (`benchmarks/batched_decode.py` sweeps them: w<N>, s<N> rows).
ATTEND_WARPS = 4
ATTEND_STAGES: int | None = None
# SEPARATE_MERGE: the paged attention's split outputs merged by `_merge_kernel` (one program per row, head and 32
# dims) after the attention launch, instead of by the last split alone (a serial loop over every split's [heads, d]
# partial: ≈ 1 MB at the dense paged decode's 132 splits). Measured on the H200 (attention.py, rows *.fused_merge
# are the old way): InfLLM v2 decode step 30 -> 27 µs at 32K, 35 -> 32 µs at 128K; dense paged decode 30 -> 19 µs
# at 32K, 58 -> 48 µs at 128K. On.
SEPARATE_MERGE = True
# Measured and dropped (RESULTS.md; the code is in the history): for the decode selection's threshold search 2^w
# counts a step (w = 2..5) and two histogram passes (SELECT_RADIX: 0.55 ms a token slower inside the 8B engine at
# 128K, its shared-memory atomics serialising on a model's crowded scores); the score kernel's one-tile loads
# (SCORE_WIDE: faster on random inputs, not inside the 8B engine); scores, selection and attention in one launch
# with spin-waits (FUSE_ATTEND: 32.0 -> 33.9 µs at 128K, the waiting programs hold SMs the score programs need).
_COUNTERS: dict[torch.device, list[torch.Tensor]] = {}


def _zeroed_counters(device: torch.device, shape: tuple[int, ...], persistent: bool | None = None) -> torch.Tensor:
    """int32 zeros of `shape` for the kernels' arrival counters (see PERSISTENT_COUNTERS). Persistent buffers
    are never freed: a captured CUDA graph keeps pointing at the one it was captured with."""
    if not (PERSISTENT_COUNTERS if persistent is None else persistent):
        return torch.zeros(shape, device=device, dtype=torch.int32)
    n = math.prod(shape)
    bufs = _COUNTERS.setdefault(device, [])
    buf = next((b for b in bufs if b.numel() >= n), None)
    if buf is None:
        buf = torch.zeros(max(n, 4096), device=device, dtype=torch.int32)
        bufs.append(buf)
    return buf[:n].view(shape)


def _use_pdl(device: torch.device, pdl: bool | None) -> bool:
    return pdl_launch.enabled(device, PDL if pdl is None else pdl)


_pdl_launch = pdl_launch.launch


def _attend(q, k_cache, v_cache, table, lens, splits, mode, blk=None, nblk=None, dense_len=-1, scale=None,
            counters=None, tile_pages=None, pdl=False, separate_merge=None, shared=None, append=None):
    """`_attend_kernel` (and `_merge_kernel` after it when the splits are merged separately) -> [B, hq, d].
    shared: `triton_cascade.SharedPrefix` (MODE 0): its pages attended once for its member rows, the rest per row.
    append: `append_kv`'s arguments (k, v [B, hkv, d] of each row's current token, ..., fine, coarse, cfg) for
    the same launch to store it (and pool its kernel keys)."""
    b, hq, hkv, d = _check(q, k_cache, v_cache, table, lens)
    page = k_cache.shape[1]
    g = hq // hkv
    scale = d ** -0.5 if scale is None else scale
    out = torch.empty_like(q)
    if shared is not None and mode == 1:
        raise ValueError("a shared prefix needs the dense paged decode (every page of each row) or the InfLLM v2 "
                         "step's dense rows")
    extra = shared.splits(q.device, b, hkv, g) if shared is not None else 0
    separate = splits + extra > 1 and (shared is not None or (SEPARATE_MERGE if separate_merge is None
                                                                 else separate_merge))
    if splits + extra > 1:
        o_part = torch.empty((b, hq, splits + extra, d), device=q.device, dtype=torch.float32)
        m_part = torch.empty((b, hq, splits + extra), device=q.device, dtype=torch.float32)
        if separate:
            counters = out  # unused
        elif counters is None:
            counters = _zeroed_counters(q.device, (b, hkv))
    else:
        o_part = m_part = counters = out  # unused
    member, nsh = (shared.member, shared.count) if shared is not None else (lens, lens)  # unused without
    n_list = blk.shape[2] if mode == 1 else 0
    blk_t = blk if blk is not None else table
    g_pad = group_pad(g)
    if append is not None:
        nk, nv, slots = append[0], append[1], append[4]
        if nk.shape != (b, hkv, d) or nv.shape != nk.shape or slots.shape != (b,):
            raise ValueError(f"new_kv: k and v must be [{b}, {hkv}, {d}] and slots [{b}], got {tuple(nk.shape)}, "
                             f"{tuple(nv.shape)}, {tuple(slots.shape)}")
        store_args, store_meta = _append_args(*append)
        store_meta.pop("D")
        store_meta.pop("PAGE")
    else:  # unused pointers and strides (STORE=False)
        store_args, store_meta = (q,) * 9 + (0,) * 17, {}
    _attend_kernel[(b, hkv, splits)](
        q, k_cache, v_cache, table, lens, blk_t, nblk if nblk is not None else table, o_part, m_part, out,
        counters, member, nsh, n_list, scale, q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1),
        k_cache.stride(2), v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), table.stride(0),
        blk.stride(0) if blk is not None else 0, blk.stride(1) if blk is not None else 0,
        o_part.stride(0) if o_part is not out else 0, o_part.stride(1) if o_part is not out else 0,
        o_part.stride(2) if o_part is not out else 0, m_part.stride(0) if m_part is not out else 0,
        m_part.stride(1) if m_part is not out else 0, out.stride(0), out.stride(1), *store_args,
        G=g, G_PAD=g_pad, D=d, PAGE=page, SPLITS=splits, SPLITS_PAD=triton.next_power_of_2(splits),
        CHUNK=min(triton.next_power_of_2(splits), max(1, 16384 // (g_pad * d))), MODE=mode, DENSE_LEN=dense_len,
        TILE_PAGES=tile_pages or TILE_PAGES, PDL=pdl, MERGE=not separate, SKIP=shared is not None,
        STORE=append is not None, PEEL=STORE_PEEL and append is not None and mode == 0, **store_meta,
        num_warps=ATTEND_WARPS, **({"num_stages": ATTEND_STAGES} if ATTEND_STAGES else {}), **_pdl_launch(pdl))
    if shared is not None:  # its partials after the rows' own (splits on)
        shared.attend(q, k_cache, v_cache, o_part, m_part, splits, scale, tile_pages or TILE_PAGES, lens,
                      dense_len if mode == 2 else None)
    if separate:
        n = splits + extra
        dc = min(32, d)
        _merge_kernel[(b, hq, d // dc)](o_part, m_part, out, o_part.stride(0), o_part.stride(1), o_part.stride(2),
                                        m_part.stride(0), m_part.stride(1), out.stride(0), out.stride(1),
                                        SPLITS=n, SPLITS_PAD=triton.next_power_of_2(n), DC=dc, PDL=pdl,
                                        num_warps=4, **_pdl_launch(pdl))
    return out


def paged_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
                 seq_lens: torch.Tensor, blocks: torch.Tensor | None = None, scale: float | None = None,
                 splits: int | None = None, tile_pages: int | None = None,
                 separate_merge: bool | None = None, shared=None, pdl: bool | None = None,
                 new_kv: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                 kernel_keys: tuple[torch.Tensor, torch.Tensor | None, SparseConfig] | None = None) -> torch.Tensor:
    """q [B, hq, d]; k/v cache [pages, page, hkv, d]; block_table [B, max_pages] int32; seq_lens [B] int32
    (tokens in the cache, the current one included); blocks [B, hkv, nsel] logical pages (-1 unused) or None
    (all pages) -> [B, hq, d]. tile_pages: pages per loop step (default `TILE_PAGES`); separate_merge: see
    `SEPARATE_MERGE` (None: that). shared: a `triton_cascade.SharedPrefix` (blocks None): the leading pages its
    member rows share, read once for all of them (cascade decode). pdl: see `PDL` (None: that). new_kv: (k, v
    [B, hkv, d], flat cache slots [B]) of the rows' current tokens (the last of seq_lens), stored by the same launch
    instead of `append_kv` before it; kernel_keys: (fine, coarse, cfg) of an InfLLM v2 cache whose rows are all
    dense this step, the kernels each token completes pooled by the same launch too."""
    b, _, hkv, _ = _check(q, k_cache, v_cache, block_table, seq_lens)
    block_table, seq_lens = block_table.to(torch.int32), seq_lens.to(torch.int32)  # no copy when int32 already
    if blocks is not None:
        if blocks.shape[:2] != (b, hkv):
            raise ValueError(f"blocks must be [B, hkv, nsel] = [{b}, {hkv}, *], got {tuple(blocks.shape)}")
        blocks = blocks.to(torch.int32).contiguous()
    most = triton.cdiv(blocks.shape[2] if blocks is not None else block_table.shape[1], 2)
    splits = splits or (shared.own_splits if shared is not None else None) or _default_splits(q.device, b * hkv,
                                                                                             most)
    return _attend(q, k_cache, v_cache, block_table, seq_lens, splits, 0 if blocks is None else 1, blk=blocks,
                   scale=scale, tile_pages=tile_pages, separate_merge=separate_merge, shared=shared,
                   pdl=_use_pdl(q.device, pdl),
                   append=(*new_kv[:2], k_cache, v_cache, new_kv[2], block_table, seq_lens,
                           *(kernel_keys or (None, None, None))) if new_kv is not None else None)


def paged_sparse_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
                        seq_lens: torch.Tensor, fine: torch.Tensor, coarse: torch.Tensor | None, cfg: SparseConfig,
                        scale: float | None = None, splits: int | None = None,
                        return_selection: bool = False, tile_pages: int | None = None,
                        new_kv: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                        pdl: bool | None = None, persistent_counters: bool | None = None,
                        separate_merge: bool | None = None, narrow: bool | None = None, shared=None):
    """One InfLLM v2 decode step per sequence (rows with fewer than cfg.dense_len tokens: dense).

    q [B, hq, d]; caches [pages, page, hkv, d] with page == cfg.block_size; fine / coarse kernel-key pages
    [pages, page // stride, hkv, d] (coarse: Gen-B only); block_table [B, W] covering every row's pages;
    seq_lens [B] (int32 for graph capture: no conversion) including the current token, whose key/value and
    kernel keys are already stored (`append_kv`), or new_kv = (k, v, slots) of the current tokens (k/v
    [B, hkv, d], flat cache slots [B]) to store them in the step's first launch. Returns [B, hq, d] (with
    return_selection also the blocks picked, int32 [B, hkv, num_selected], -1 padded, for sparse rows).
    tile_pages: see `paged_decode`; pdl, persistent_counters, separate_merge, narrow: see `PDL`,
    `PERSISTENT_COUNTERS`, `SEPARATE_MERGE`, `triton_select.SELECT_NARROW` (None: those). shared: a
    `triton_cascade.SharedPrefix` whose members are dense rows (below dense_len): their shared leading pages
    read once for all of them. No host synchronisation: graph-capturable."""
    b, hq, hkv, d = _check(q, k_cache, v_cache, block_table, seq_lens)
    block_table, seq_lens = block_table.to(torch.int32), seq_lens.to(torch.int32)  # no copy when int32 already
    page = k_cache.shape[1]
    if page != cfg.block_size:
        raise ValueError(f"pages of {page} tokens, but InfLLM v2 blocks of {cfg.block_size}")
    scale = d ** -0.5 if scale is None else scale
    gen_b = cfg.variant == "gen-b" and coarse is not None
    norm, nsize, nstride = (coarse, cfg.coarse_kernel_size, cfg.coarse_kernel_stride) if gen_b else (
        fine, cfg.kernel_size, cfg.kernel_stride)
    counters = _zeroed_counters(q.device, (2, b, hkv), persistent_counters)  # arrivals: selection, merge
    pdl = _use_pdl(q.device, pdl)
    append = None
    if new_kv is not None:
        append = (new_kv[0], new_kv[1], k_cache, v_cache, new_kv[2], block_table, seq_lens, fine, coarse, cfg)
    lse = decode_lse(q, norm, block_table, seq_lens, cfg, nsize, nstride, scale, splits, append, pdl)
    sel = torch.full((b, hkv, cfg.num_selected), -1, device=q.device, dtype=torch.int32) if return_selection else None
    _, att, natt = _score_select(q, fine, block_table, seq_lens, lse, cfg, scale, splits, counters[0], sel, pdl,
                                 narrow)
    attend_splits = splits or (shared.own_splits if shared is not None else None) or _default_splits(
        q.device, b * hkv, max(triton.cdiv(att.shape[2], 2), 1))
    out = _attend(q, k_cache, v_cache, block_table, seq_lens, attend_splits, 2, blk=att, nblk=natt,
                  dense_len=cfg.dense_len, scale=scale, counters=counters[1], tile_pages=tile_pages, pdl=pdl,
                  separate_merge=separate_merge, shared=shared)
    return (out, sel) if return_selection else out


def decode_lse(q: torch.Tensor, norm: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor,
               cfg: SparseConfig, size: int, stride: int, scale: float, splits: int | None = None,
               append: tuple | None = None, pdl: bool = False) -> torch.Tensor:
    """Stage 1a of `paged_sparse_decode`: partial log-sum-exps [B, hq, splits] over the normalising kernel
    keys `norm` (kernel size/stride: coarse for Gen-B, fine for Gen-A). append: `append_kv`'s arguments
    (k, v, k_cache, v_cache, slots, block_table, ends, fine, coarse, cfg) to store the new tokens in the
    same launch. pdl: a programmatic dependent launch (see `PDL`)."""
    b, hq, d = q.shape
    hkv = norm.shape[2]
    g = hq // hkv
    n_norm = block_table.shape[1] * norm.shape[1]  # kernels in the widest row, at most (slots per page)
    block_n = 16
    # One key tile per split at most: measured (attention.py stage1_lse.splits<N>, H200) 7.1 -> 4.3 µs at 32K
    # (8 -> 32 splits), 7.5 -> 5.0 at 128K (32 -> 64); the step pays it on its critical path.
    splits = splits or _default_splits(q.device, b * hkv, triton.cdiv(n_norm, block_n))
    lse = torch.empty((b, hq, splits), device=q.device, dtype=torch.float32)
    if append is not None:
        args, meta = _append_args(*append)
    else:  # unused pointers and strides (APPEND=False)
        args, meta = (q,) * 9 + (0,) * 17, dict(FSIZE=1, FPAD=1, FSTRIDE=1, CSIZE=1, CPAD=1, CSTRIDE=1, POOL=False,
                                                COARSE=False)
    meta.pop("D", None)
    meta.pop("PAGE", None)
    _lse_kernel[(b, hkv, splits)](
        q, norm, block_table, seq_lens, lse, scale, q.stride(0), q.stride(1), norm.stride(0), norm.stride(1),
        norm.stride(2), block_table.stride(0), lse.stride(0), lse.stride(1), *args, G=g,
        G_PAD=group_pad(g), D=d, PAGE=cfg.block_size, BLOCK_N=block_n, KSIZE=size,
        KPAD=triton.next_power_of_2(size), KSTRIDE=stride, SPLITS=splits, DENSE_LEN=cfg.dense_len,
        APPEND=append is not None, **meta, PDL=pdl, PEEL=STORE_PEEL and append is not None, num_warps=4,
        **_pdl_launch(pdl))
    return lse


def decode_block_scores(q: torch.Tensor, fine: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor,
                        lse: torch.Tensor, cfg: SparseConfig, scale: float, splits: int | None = None) -> torch.Tensor:
    """Stage 1b of `paged_sparse_decode`: pooled block scores float32 [B, hkv, W] (written up to each sparse
    row's query block)."""
    return _score_select(q, fine, block_table, seq_lens, lse, cfg, scale, splits)[0]


def _score_select(q, fine, block_table, seq_lens, lse, cfg, scale, splits=None, counters=None, sel=None, pdl=False,
                  narrow=None):
    """Pooled block scores and, with `counters` (zeroed int32 [B, hkv]), the attended block lists
    int32 [B, hkv, n] with their lengths [B, hkv] (and the selection into `sel` when given)."""
    b, hq, d = q.shape
    hkv = fine.shape[2]
    g = hq // hkv
    width = block_table.shape[1]
    page = cfg.block_size
    nbt = 16
    splits = splits or _default_splits(q.device, b * hkv, triton.cdiv(width, nbt))
    # Rows 16-aligned (a multiple of 16 floats) whatever the table's width: Triton vectorises the loads only for
    # strides divisible by 16 (measured at 128K with a 2,049-column table: 36.9 µs a step, 33.0 with 4,096).
    scores = torch.empty((b, hkv, -(-width // 16) * 16), device=q.device, dtype=torch.float32)[..., :width]
    k = cfg.num_selected
    gen_b = cfg.variant == "gen-b"
    select = counters is not None
    n_att = min(k + (0 if gen_b else cfg.local_blocks), width)
    att = torch.empty((b, hkv, n_att), device=q.device, dtype=torch.int32) if select else None
    natt = torch.empty((b, hkv), device=q.device, dtype=torch.int32) if select else None
    s = cfg.kernel_stride
    _score_kernel[(b, hkv, splits)](
        q, fine, block_table, seq_lens, lse, scores, counters if select else scores, att if select else scores,
        natt if select else scores, sel if sel is not None else scores, scale, q.stride(0), q.stride(1),
        fine.stride(0), fine.stride(1), fine.stride(2), block_table.stride(0), lse.stride(0), lse.stride(1),
        scores.stride(0), scores.stride(1), att.stride(0) if select else 0, att.stride(1) if select else 0,
        sel.stride(0) if sel is not None else 0, sel.stride(1) if sel is not None else 0,
        G=g, G_PAD=group_pad(g), D=d, PAGE=page, NBT=nbt, KSIZE=cfg.kernel_size,
        KSTRIDE=s, PER_BLOCK=page // s, PAD=cfg.kernel_size // s - 1,
        WIDTH=page // s + cfg.kernel_size // s - 1,  # fine kernels overlapping a block
        SPLITS=splits, LSE_SPLITS=lse.shape[2], LSE_PAD=triton.next_power_of_2(lse.shape[2]),
        DENSE_LEN=cfg.dense_len, SELECT=select, NB_PAD=triton.next_power_of_2(width), K=k,
        K_PAD=triton.next_power_of_2(k), INIT=cfg.init_blocks, LOCAL=cfg.local_blocks, GEN_B=gen_b,
        SHIFT=score_shift(q.dtype), SAVE_SEL=sel is not None, PDL=pdl,
        NARROW=triton_select.SELECT_NARROW if narrow is None else narrow, num_warps=4, **_pdl_launch(pdl))
    return scores, att, natt
