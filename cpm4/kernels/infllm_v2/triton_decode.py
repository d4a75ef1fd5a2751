"""Decode attention in Triton: one query token per sequence against a paged KV cache.

Pages hold `page` tokens (= the InfLLM v2 block size, 64), so a selected block is a page. With `blocks`
(logical page ids per sequence and KV head, -1 padded) the kernel attends to those pages only (InfLLM v2);
with `blocks=None` it attends to every page of the sequence (the dense paged decode used below dense_len).
Work is split along the page list (flash-decoding) so that one sequence still fills the GPU; partial
results are merged by their log-sum-exp.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_select import num_sms, softmax_step


@triton.jit
def _decode_kernel(q_ptr, kc_ptr, vc_ptr, table_ptr, lens_ptr, blk_ptr, o_ptr, m_ptr, n_list, per_split, sm_scale,
                   stride_qb, stride_qh, stride_kp, stride_kt, stride_kh, stride_vp, stride_vt, stride_vh,
                   stride_tb, stride_bb, stride_bh, stride_ob, stride_oh, stride_os, stride_mb, stride_mh,
                   G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, PAGE: tl.constexpr, DENSE: tl.constexpr):
    bi = tl.program_id(0)
    g = tl.program_id(1)
    sp = tl.program_id(2)
    seq_len = tl.load(lens_ptr + bi)
    r = tl.arange(0, G_PAD)
    hm = r < G
    h = g * G + r
    dd = tl.arange(0, D)
    q = tl.load(q_ptr + bi * stride_qb + h[:, None] * stride_qh + dd[None, :], mask=hm[:, None], other=0.0)
    qk_scale = sm_scale * 1.4426950408889634
    m_i = tl.full((G_PAD,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((G_PAD,), dtype=tl.float32)
    acc = tl.zeros((G_PAD, D), dtype=tl.float32)
    tt = tl.arange(0, PAGE)
    start = sp * per_split
    end = tl.minimum(start + per_split, n_list)
    for i in range(start, end):
        if DENSE:
            b = i
        else:
            b = tl.load(blk_ptr + bi * stride_bb + g * stride_bh + i)
        if (b >= 0) & (b * PAGE < seq_len):
            page = tl.load(table_ptr + bi * stride_tb + b)
            kk = b * PAGE + tt
            km = kk < seq_len
            base = page.to(tl.int64) * stride_kp
            k = tl.load(kc_ptr + base + tt[:, None] * stride_kt + g * stride_kh + dd[None, :], mask=km[:, None],
                        other=0.0)
            v = tl.load(vc_ptr + page.to(tl.int64) * stride_vp + tt[:, None] * stride_vt + g * stride_vh + dd[None, :],
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


def paged_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
                 seq_lens: torch.Tensor, blocks: torch.Tensor | None = None, scale: float | None = None,
                 splits: int | None = None) -> torch.Tensor:
    """q [B, hq, d]; k/v cache [pages, page, hkv, d]; block_table [B, max_pages] int32; seq_lens [B] (tokens
    in the cache, the current one included); blocks [B, hkv, nsel] logical pages or None (all) -> [B, hq, d]."""
    b, hq, d = q.shape
    _, page, hkv, dk = k_cache.shape
    if dk != d or hq % hkv or v_cache.shape != k_cache.shape:
        raise ValueError(f"q {tuple(q.shape)} does not fit cache {tuple(k_cache.shape)} / {tuple(v_cache.shape)}")
    if block_table.shape[0] != b or seq_lens.shape[0] != b:
        raise ValueError(f"block_table {tuple(block_table.shape)} and seq_lens {tuple(seq_lens.shape)} need {b} rows")
    g = hq // hkv
    g_pad = max(16, triton.next_power_of_2(g))
    scale = d ** -0.5 if scale is None else scale
    if blocks is None:
        n_list = block_table.shape[1]
        blk = block_table  # unused placeholder pointer
        stride_bb = stride_bh = 0
    else:
        if blocks.shape[:2] != (b, hkv):
            raise ValueError(f"blocks must be [B, hkv, nsel] = [{b}, {hkv}, *], got {tuple(blocks.shape)}")
        blk = blocks.to(torch.int32).contiguous()
        n_list = blk.shape[2]
        stride_bb, stride_bh = blk.stride(0), blk.stride(1)
    if splits is None:
        # Enough programs for ~2 waves over the SMs, at least 2 pages each.
        sms = num_sms(q.device)
        splits = max(1, min(triton.cdiv(2 * sms, b * hkv), triton.cdiv(n_list, 2)))
    per_split = triton.cdiv(n_list, splits)
    splits = triton.cdiv(n_list, per_split)
    o_part = torch.empty((b, hq, splits, d), device=q.device, dtype=torch.float32)
    m_part = torch.empty((b, hq, splits), device=q.device, dtype=torch.float32)
    table = block_table.to(torch.int32)
    lens = seq_lens.to(device=q.device, dtype=torch.int32)
    _decode_kernel[(b, hkv, splits)](
        q, k_cache, v_cache, table, lens, blk, o_part, m_part, n_list, per_split, scale,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0),
        v_cache.stride(1), v_cache.stride(2), table.stride(0), stride_bb, stride_bh, o_part.stride(0),
        o_part.stride(1), o_part.stride(2), m_part.stride(0), m_part.stride(1),
        G=g, G_PAD=g_pad, D=d, PAGE=page, DENSE=blocks is None)
    out = torch.empty_like(q)
    _combine_kernel[(b, hq)](o_part, m_part, out, o_part.stride(0), o_part.stride(1), o_part.stride(2),
                             m_part.stride(0), m_part.stride(1), out.stride(0), out.stride(1), SPLITS=splits,
                             SPLITS_PAD=triton.next_power_of_2(splits), D=d)
    return out
