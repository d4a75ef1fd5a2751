"""Decode in Triton: one query token per sequence against a paged KV cache, dense or InfLLM v2.

Pages hold `page` tokens (= the InfLLM v2 block size, 64), so a block is a page. The semantic-kernel keys
live beside the pages (layout: `reference.kernel_page_slots`): the key of kernel j is stored in the page
that holds the kernel's last token, so a page's kernel keys depend only on tokens up to the page's end and
pages shared between sequences with the same prefix share them too.

`paged_sparse_decode` is the whole InfLLM v2 decode step for a batch, with no host synchronisation and
shapes fixed by the batch size and block-table width (so it can be captured in a CUDA graph):
1. `_lse_kernel`: each query head's partial log-sum-exp over its split of the coarse (Gen-B) or fine (Gen-A)
   kernel keys;
2. `_score_kernel`: merges those, scores each fine kernel, sums over the group's heads, max-pools onto
   blocks (written as float32 [B, hkv, blocks]);
3. `_attend_kernel`: every program picks the top-k blocks from the pooled scores (the same `topk_mask` as
   prefill selection) and attends to its share of them (flash-decoding split); rows shorter than
   `dense_len` attend to all their pages instead;
4. `_combine_kernel`: merges the splits by their log-sum-exp.
`paged_decode` runs step 3 alone: all pages (dense) or an explicit block list per sequence and KV head.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from cpm4.model.config import SparseConfig

from .reference import kernel_slots
from .triton_select import complete_kernels, lse_step, lse_value, merge_lse, num_sms, softmax_step, topk_mask


@triton.jit
def _kernel_addr(j, valid, table_row, stride_kp, stride_ks, KSIZE: tl.constexpr, KSTRIDE: tl.constexpr,
                 PAGE: tl.constexpr):
    """Offset of kernel j's key in a kernel-key page pool (layout: reference.kernel_page_slots)."""
    end = j * KSTRIDE + KSIZE - 1
    page = tl.load(table_row + end // PAGE, mask=valid, other=0)
    return page.to(tl.int64) * stride_kp + ((end % PAGE) // KSTRIDE) * stride_ks


@triton.jit
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
    last = j * KSTRIDE + KSIZE - 1
    if last < end:
        row = table_ptr + bi * stride_tb
        u = tl.arange(0, KPAD)
        t = j * KSTRIDE + u
        um = u < KSIZE
        pages = tl.load(row + t // PAGE, mask=um, other=0).to(tl.int64)
        dd = tl.arange(0, D)
        k = tl.load(kc_ptr + pages[:, None] * stride_kp + (t % PAGE)[:, None] * stride_kt + g * stride_kh + dd[None, :],
                    mask=um[:, None], other=0.0).to(tl.float32)
        mean = tl.sum(k, 0) / KSIZE
        base = _kernel_addr(j, True, row, stride_op, stride_os, KSIZE, KSTRIDE, PAGE)
        tl.store(out_ptr + base + g * stride_oh + dd, mean.to(out_ptr.dtype.element_ty))


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
                G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, PAGE: tl.constexpr, BLOCK_N: tl.constexpr,
                KSIZE: tl.constexpr, KSTRIDE: tl.constexpr, SPLITS: tl.constexpr, DENSE_LEN: tl.constexpr):
    """Partial log-sum-exp (log2 units) of each query head of group g over split sp of the kernels its
    query can see; -inf for an empty split or a dense row."""
    bi = tl.program_id(0)
    g = tl.program_id(1)
    sp = tl.program_id(2)
    seq_len, pos, sparse = _row_state(lens_ptr, bi, DENSE_LEN)
    q, h, hm = _group_q(q_ptr, bi, g, stride_qb, stride_qh, G, G_PAD, D)
    m_i = tl.full((G_PAD,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((G_PAD,), dtype=tl.float32)
    if sparse:
        n = complete_kernels(pos, KSIZE, KSTRIDE)
        lo, hi = _split_range(n, sp, SPLITS, BLOCK_N)
        row = table_ptr + bi * stride_tb
        dd = tl.arange(0, D)
        for j0 in range(lo, hi, BLOCK_N):
            j = j0 + tl.arange(0, BLOCK_N)
            jm = j < hi
            base = _kernel_addr(j, jm, row, stride_kp, stride_ks, KSIZE, KSTRIDE, PAGE)
            kt = tl.load(kk_ptr + base[None, :] + g * stride_kh + dd[:, None], mask=jm[None, :], other=0.0)
            s = tl.dot(q, kt) * (sm_scale * 1.4426950408889634)
            m_i, l_i = lse_step(tl.where(jm[None, :], s, float("-inf")), m_i, l_i)
    tl.store(lse_ptr + bi * stride_lb + h * stride_lh + sp, lse_value(m_i, l_i), mask=hm)


@triton.jit
def _score_kernel(q_ptr, k1_ptr, table_ptr, lens_ptr, lse_ptr, s_ptr, sm_scale, stride_qb, stride_qh, stride_kp,
                  stride_ks, stride_kh, stride_tb, stride_lb, stride_lh, stride_sb, stride_sh,
                  G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, PAGE: tl.constexpr, NBT: tl.constexpr,
                  KSIZE: tl.constexpr, KSTRIDE: tl.constexpr, PER_BLOCK: tl.constexpr, PAD: tl.constexpr,
                  WIDTH: tl.constexpr, SPLITS: tl.constexpr, LSE_SPLITS: tl.constexpr, LSE_PAD: tl.constexpr,
                  DENSE_LEN: tl.constexpr):
    """Pooled block scores of split sp of the blocks up to the query's: max over the fine kernels
    overlapping each block of sum_h exp(q_h.k_j * scale - lse_h), rounded to q's dtype as stage 1 stores it."""
    bi = tl.program_id(0)
    g = tl.program_id(1)
    sp = tl.program_id(2)
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
        dd = tl.arange(0, D)
        for b0 in range(lo, hi, NBT):
            blk = b0 + tl.arange(0, NBT)
            pooled = tl.zeros((NBT,), dtype=tl.float32)
            for w in range(WIDTH):
                c = blk * PER_BLOCK - PAD + w
                ok = (c >= 0) & (c < n1) & (blk < hi)
                base = _kernel_addr(c, ok, row, stride_kp, stride_ks, KSIZE, KSTRIDE, PAGE)
                kt = tl.load(k1_ptr + base[None, :] + g * stride_kh + dd[:, None], mask=ok[None, :], other=0.0)
                s = tl.dot(q, kt) * (sm_scale * 1.4426950408889634)
                p = tl.where(ok[None, :] & has[:, None], tl.exp2(s - lse[:, None]), 0.0)
                grp = tl.sum(p, 0).to(q_ptr.dtype.element_ty).to(tl.float32)
                pooled = tl.maximum(pooled, grp)
            tl.store(s_ptr + bi * stride_sb + g * stride_sh + blk, pooled, mask=blk < hi)


@triton.jit
def _attend_kernel(q_ptr, kc_ptr, vc_ptr, table_ptr, lens_ptr, blk_ptr, s_ptr, sel_ptr, o_ptr, m_ptr, n_list,
                   sm_scale, stride_qb, stride_qh, stride_kp, stride_kt, stride_kh, stride_vp, stride_vt, stride_vh,
                   stride_tb, stride_bb, stride_bh, stride_sb, stride_sh, stride_eb, stride_eh,
                   stride_ob, stride_oh, stride_os, stride_mb, stride_mh,
                   G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, PAGE: tl.constexpr, NB_PAD: tl.constexpr,
                   SPLITS: tl.constexpr, MODE: tl.constexpr, DENSE_LEN: tl.constexpr, K: tl.constexpr,
                   K_PAD: tl.constexpr, INIT: tl.constexpr, LOCAL: tl.constexpr, GEN_B: tl.constexpr,
                   SAVE_SEL: tl.constexpr):
    """Split sp of one (sequence, KV group)'s attended pages. MODE 0: every page of the sequence; 1: the
    explicit list blk[bi, g, :n_list] (-1 unused); 2: top-k from the pooled scores (rows below dense_len:
    every page). Writes partial outputs and log-sum-exps (log2) for `_combine_kernel`."""
    bi = tl.program_id(0)
    g = tl.program_id(1)
    sp = tl.program_id(2)
    seq_len, pos, sparse = _row_state(lens_ptr, bi, DENSE_LEN)
    q, h, hm = _group_q(q_ptr, bi, g, stride_qb, stride_qh, G, G_PAD, D)
    qk_scale = sm_scale * 1.4426950408889634
    bvec = tl.arange(0, NB_PAD)
    n_att = tl.cdiv(seq_len, PAGE)  # MODE 0 and dense rows: page i is block i
    slot = bvec
    if MODE == 1:
        n_att = n_list
    if MODE == 2:
        if sparse:
            qb = pos // PAGE
            pooled = tl.load(s_ptr + bi * stride_sb + g * stride_sh + bvec, mask=bvec <= qb, other=0.0)
            sel = topk_mask(pooled, bvec, qb, K, INIT, LOCAL, GEN_B)
            if SAVE_SEL:
                if sp == 0:
                    base = sel_ptr + bi * stride_eb + g * stride_eh
                    tl.store(base + tl.cumsum(sel.to(tl.int32), 0) - 1, bvec, mask=sel)
                    kk = tl.arange(0, K_PAD)
                    tl.store(base + kk, tl.full((K_PAD,), -1, dtype=tl.int32),
                             mask=(kk >= tl.sum(sel.to(tl.int32), 0)) & (kk < K))
            attend = sel
            if not GEN_B:  # Gen-A attends to its local window besides the selection
                attend = attend | ((bvec > qb - LOCAL) & (bvec <= qb))
            n_att = tl.sum(attend.to(tl.int32), 0)
            slot = tl.where(attend, tl.cumsum(attend.to(tl.int32), 0) - 1, -1)
    m_i = tl.full((G_PAD,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((G_PAD,), dtype=tl.float32)
    acc = tl.zeros((G_PAD, D), dtype=tl.float32)
    tt = tl.arange(0, PAGE)
    dd = tl.arange(0, D)
    per = tl.cdiv(n_att, SPLITS)
    for i in range(sp * per, tl.minimum(sp * per + per, n_att)):
        b = i
        if MODE == 1:
            b = tl.load(blk_ptr + bi * stride_bb + g * stride_bh + i)
        if MODE == 2:
            if sparse:  # the i-th attended block
                b = tl.sum(tl.where(slot == i, bvec, 0), 0)
        if (b >= 0) & (b * PAGE < seq_len):
            page = tl.load(table_ptr + bi * stride_tb + b).to(tl.int64)
            km = b * PAGE + tt < seq_len
            k = tl.load(kc_ptr + page * stride_kp + tt[:, None] * stride_kt + g * stride_kh + dd[None, :],
                        mask=km[:, None], other=0.0)
            v = tl.load(vc_ptr + page * stride_vp + tt[:, None] * stride_vt + g * stride_vh + dd[None, :],
                        mask=km[:, None], other=0.0)
            m_i, l_i, acc = softmax_step(q, k, v, km[None, :], m_i, l_i, acc, qk_scale)
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    tl.store(o_ptr + bi * stride_ob + h[:, None] * stride_oh + sp * stride_os + dd[None, :], acc / l_safe[:, None],
             mask=hm[:, None])
    # Partial log-sum-exp in log2 units; -inf for an empty split.
    lse2 = tl.where(l_i > 0, m_i + tl.log2(l_safe), float("-inf"))
    tl.store(m_ptr + bi * stride_mb + h * stride_mh + sp, lse2, mask=hm)


@triton.jit
def _combine_kernel(o_ptr, m_ptr, out_ptr, stride_ob, stride_oh, stride_os, stride_mb, stride_mh, stride_rb, stride_rh,
                    SPLITS: tl.constexpr, SPLITS_PAD: tl.constexpr, D: tl.constexpr):
    """Merge the splits of one (sequence, head) by their log-sum-exp (log2 units)."""
    bi = tl.program_id(0)
    h = tl.program_id(1)
    ss = tl.arange(0, SPLITS_PAD)
    sm = ss < SPLITS
    m = tl.load(m_ptr + bi * stride_mb + h * stride_mh + ss, mask=sm, other=float("-inf"))
    mx = tl.max(m, 0)
    w = tl.where(m > float("-inf"), tl.exp2(m - tl.where(mx > float("-inf"), mx, 0.0)), 0.0)
    dd = tl.arange(0, D)
    o = tl.load(o_ptr + bi * stride_ob + h * stride_oh + ss[:, None] * stride_os + dd[None, :], mask=sm[:, None],
                other=0.0)
    tot = tl.sum(w, 0)
    out = tl.sum(o * w[:, None], 0) / tl.where(tot > 0, tot, 1.0)
    tl.store(out_ptr + bi * stride_rb + h * stride_rh + dd, out.to(out_ptr.dtype.element_ty))


def _check(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
           seq_lens: torch.Tensor) -> tuple[int, int, int, int]:
    b, hq, d = q.shape
    _, page, hkv, dk = k_cache.shape
    if dk != d or hq % hkv or v_cache.shape != k_cache.shape:
        raise ValueError(f"q {tuple(q.shape)} does not fit cache {tuple(k_cache.shape)} / {tuple(v_cache.shape)}")
    if block_table.shape[0] != b or seq_lens.shape[0] != b:
        raise ValueError(f"block_table {tuple(block_table.shape)} and seq_lens {tuple(seq_lens.shape)} need {b} rows")
    return b, hq, hkv, d


def _default_splits(device: torch.device, programs: int, most: int) -> int:
    # Enough programs for ~2 waves over the SMs.
    return max(1, min(triton.cdiv(2 * num_sms(device), programs), most))


def _attend(q, k_cache, v_cache, table, lens, splits, mode, blk=None, scores=None, sel=None, cfg=None,
            dense_len=-1, scale=None):
    b, hq, hkv, d = _check(q, k_cache, v_cache, table, lens)
    page = k_cache.shape[1]
    g = hq // hkv
    scale = d ** -0.5 if scale is None else scale
    o_part = torch.empty((b, hq, splits, d), device=q.device, dtype=torch.float32)
    m_part = torch.empty((b, hq, splits), device=q.device, dtype=torch.float32)
    n_list = blk.shape[2] if blk is not None else 0
    blk_t = blk if blk is not None else table
    s_t = scores if scores is not None else o_part
    sel_t = sel if sel is not None else table
    k = cfg.num_selected if cfg is not None else 1
    _attend_kernel[(b, hkv, splits)](
        q, k_cache, v_cache, table, lens, blk_t, s_t, sel_t, o_part, m_part, n_list, scale,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0),
        v_cache.stride(1), v_cache.stride(2), table.stride(0),
        blk.stride(0) if blk is not None else 0, blk.stride(1) if blk is not None else 0,
        scores.stride(0) if scores is not None else 0, scores.stride(1) if scores is not None else 0,
        sel.stride(0) if sel is not None else 0, sel.stride(1) if sel is not None else 0,
        o_part.stride(0), o_part.stride(1), o_part.stride(2), m_part.stride(0), m_part.stride(1),
        G=g, G_PAD=max(16, triton.next_power_of_2(g)), D=d, PAGE=page,
        NB_PAD=triton.next_power_of_2(table.shape[1]), SPLITS=splits, MODE=mode, DENSE_LEN=dense_len, K=k,
        K_PAD=triton.next_power_of_2(k), INIT=cfg.init_blocks if cfg else 0, LOCAL=cfg.local_blocks if cfg else 0,
        GEN_B=cfg is None or cfg.variant == "gen-b", SAVE_SEL=sel is not None, num_warps=4)
    out = torch.empty_like(q)
    _combine_kernel[(b, hq)](o_part, m_part, out, o_part.stride(0), o_part.stride(1), o_part.stride(2),
                             m_part.stride(0), m_part.stride(1), out.stride(0), out.stride(1), SPLITS=splits,
                             SPLITS_PAD=triton.next_power_of_2(splits), D=d)
    return out


def paged_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
                 seq_lens: torch.Tensor, blocks: torch.Tensor | None = None, scale: float | None = None,
                 splits: int | None = None) -> torch.Tensor:
    """q [B, hq, d]; k/v cache [pages, page, hkv, d]; block_table [B, max_pages] int32; seq_lens [B] int32
    (tokens in the cache, the current one included); blocks [B, hkv, nsel] logical pages (-1 unused) or None
    (all pages) -> [B, hq, d]."""
    b, _, hkv, _ = _check(q, k_cache, v_cache, block_table, seq_lens)
    block_table, seq_lens = block_table.to(torch.int32), seq_lens.to(torch.int32)  # no copy when int32 already
    if blocks is not None:
        if blocks.shape[:2] != (b, hkv):
            raise ValueError(f"blocks must be [B, hkv, nsel] = [{b}, {hkv}, *], got {tuple(blocks.shape)}")
        blocks = blocks.to(torch.int32).contiguous()
    most = triton.cdiv(blocks.shape[2] if blocks is not None else block_table.shape[1], 2)
    splits = splits or _default_splits(q.device, b * hkv, most)
    return _attend(q, k_cache, v_cache, block_table, seq_lens, splits, 0 if blocks is None else 1, blk=blocks,
                   scale=scale)


def paged_sparse_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
                        seq_lens: torch.Tensor, fine: torch.Tensor, coarse: torch.Tensor | None, cfg: SparseConfig,
                        scale: float | None = None, splits: int | None = None,
                        return_selection: bool = False):
    """One InfLLM v2 decode step per sequence (rows with fewer than cfg.dense_len tokens: dense).

    q [B, hq, d]; caches [pages, page, hkv, d] with page == cfg.block_size; fine / coarse kernel-key pages
    [pages, page // stride, hkv, d] (coarse: Gen-B only); block_table [B, W] covering every row's pages;
    seq_lens [B] (int32 for graph capture: no conversion) including the current token, whose key and
    kernel keys are already stored. Returns [B, hq, d] (with return_selection also the blocks picked,
    int32 [B, hkv, num_selected], -1 padded, for sparse rows). No host synchronisation: graph-capturable."""
    b, hq, hkv, d = _check(q, k_cache, v_cache, block_table, seq_lens)
    block_table, seq_lens = block_table.to(torch.int32), seq_lens.to(torch.int32)  # no copy when int32 already
    page = k_cache.shape[1]
    if page != cfg.block_size:
        raise ValueError(f"pages of {page} tokens, but InfLLM v2 blocks of {cfg.block_size}")
    scale = d ** -0.5 if scale is None else scale
    gen_b = cfg.variant == "gen-b" and coarse is not None
    norm, nsize, nstride = (coarse, cfg.coarse_kernel_size, cfg.coarse_kernel_stride) if gen_b else (
        fine, cfg.kernel_size, cfg.kernel_stride)
    lse = decode_lse(q, norm, block_table, seq_lens, cfg, nsize, nstride, scale, splits)
    scores = decode_block_scores(q, fine, block_table, seq_lens, lse, cfg, scale, splits)
    sel = torch.full((b, hkv, cfg.num_selected), -1, device=q.device, dtype=torch.int32) if return_selection else None
    most = max(triton.cdiv(cfg.num_selected, 2), 1)
    attend_splits = splits or _default_splits(q.device, b * hkv, most)
    out = _attend(q, k_cache, v_cache, block_table, seq_lens, attend_splits, 2, scores=scores, sel=sel, cfg=cfg,
                  dense_len=cfg.dense_len, scale=scale)
    return (out, sel) if return_selection else out


def decode_lse(q: torch.Tensor, norm: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor,
               cfg: SparseConfig, size: int, stride: int, scale: float, splits: int | None = None) -> torch.Tensor:
    """Stage 1a of `paged_sparse_decode`: partial log-sum-exps [B, hq, splits] over the normalising kernel
    keys `norm` (kernel size/stride: coarse for Gen-B, fine for Gen-A)."""
    b, hq, d = q.shape
    hkv = norm.shape[2]
    g = hq // hkv
    n_norm = block_table.shape[1] * norm.shape[1]  # kernels in the widest row, at most (slots per page)
    block_n = 16
    splits = splits or _default_splits(q.device, b * hkv, triton.cdiv(n_norm, 4 * block_n))
    lse = torch.empty((b, hq, splits), device=q.device, dtype=torch.float32)
    _lse_kernel[(b, hkv, splits)](
        q, norm, block_table, seq_lens, lse, scale, q.stride(0), q.stride(1), norm.stride(0), norm.stride(1),
        norm.stride(2), block_table.stride(0), lse.stride(0), lse.stride(1), G=g,
        G_PAD=max(16, triton.next_power_of_2(g)), D=d, PAGE=cfg.block_size, BLOCK_N=block_n, KSIZE=size,
        KSTRIDE=stride, SPLITS=splits, DENSE_LEN=cfg.dense_len, num_warps=4)
    return lse


def decode_block_scores(q: torch.Tensor, fine: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor,
                        lse: torch.Tensor, cfg: SparseConfig, scale: float, splits: int | None = None) -> torch.Tensor:
    """Stage 1b of `paged_sparse_decode`: pooled block scores float32 [B, hkv, W] (written up to each sparse
    row's query block)."""
    b, hq, d = q.shape
    hkv = fine.shape[2]
    g = hq // hkv
    width = block_table.shape[1]
    page = cfg.block_size
    nbt = 16
    splits = splits or _default_splits(q.device, b * hkv, triton.cdiv(width, nbt))
    scores = torch.empty((b, hkv, width), device=q.device, dtype=torch.float32)
    s = cfg.kernel_stride
    _score_kernel[(b, hkv, splits)](
        q, fine, block_table, seq_lens, lse, scores, scale, q.stride(0), q.stride(1), fine.stride(0), fine.stride(1),
        fine.stride(2), block_table.stride(0), lse.stride(0), lse.stride(1), scores.stride(0), scores.stride(1),
        G=g, G_PAD=max(16, triton.next_power_of_2(g)), D=d, PAGE=page, NBT=nbt, KSIZE=cfg.kernel_size, KSTRIDE=s,
        PER_BLOCK=page // s, PAD=cfg.kernel_size // s - 1, WIDTH=page // s + cfg.kernel_size // s - 1,
        SPLITS=splits, LSE_SPLITS=lse.shape[2], LSE_PAD=triton.next_power_of_2(lse.shape[2]),
        DENSE_LEN=cfg.dense_len, num_warps=4)
    return scores
