"""InfLLM v2 stage 4 in Triton: block-sparse attention over selected blocks, forward and backward.

One sequence: q [Tq, hq, d] are the last Tq of Tk tokens, k/v [Tk, hkv, d], blocks [hkv, Tq, NSEL] int32
(-1 = unused slot, anywhere in the row). A query attends to keys t <= its position in its blocks.

Forward and dq: one program per (query token, KV head) whose tile is the G heads of the group (padded
to a power of two >= 16) against one key block at a time, flash-attention style.
dk/dv: the selection is inverted (which tokens chose key block b of head g) and one program per
(key block, KV head) walks its tokens in tiles, so every dk/dv block has one writer and needs no atomics.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_select import tile_shape


@triton.jit
def _fwd_kernel(q_ptr, k_ptr, v_ptr, blk_ptr, o_ptr, lse_ptr, q_start, tk, sm_scale,
                stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_bh, stride_bt,
                stride_ot, stride_oh, stride_lt,
                G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr, NSEL: tl.constexpr):
    t = tl.program_id(0)
    g = tl.program_id(1)
    pos = q_start + t
    r = tl.arange(0, G_PAD)
    hm = r < G
    h = g * G + r
    dd = tl.arange(0, D)
    q = tl.load(q_ptr + t * stride_qt + h[:, None] * stride_qh + dd[None, :], mask=hm[:, None], other=0.0)
    qk_scale = sm_scale * 1.4426950408889634
    m_i = tl.full((G_PAD,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((G_PAD,), dtype=tl.float32)
    acc = tl.zeros((G_PAD, D), dtype=tl.float32)
    kk0 = tl.arange(0, BLOCK)
    for i in range(NSEL):
        b = tl.load(blk_ptr + g * stride_bh + t * stride_bt + i)
        if b >= 0:
            kk = b * BLOCK + kk0
            km = (kk <= pos) & (kk < tk)
            k = tl.load(k_ptr + kk[:, None] * stride_kt + g * stride_kh + dd[None, :], mask=km[:, None], other=0.0)
            v = tl.load(v_ptr + kk[:, None] * stride_vt + g * stride_vh + dd[None, :], mask=km[:, None], other=0.0)
            s = tl.dot(q, tl.trans(k)) * qk_scale
            s = tl.where(km[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp2(s - m_safe[:, None])
            alpha = tl.exp2(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    out = acc / l_safe[:, None]
    tl.store(o_ptr + t * stride_ot + h[:, None] * stride_oh + dd[None, :], out.to(o_ptr.dtype.element_ty),
             mask=hm[:, None])
    lse = tl.where(l_i > 0, (m_i + tl.log2(l_safe)) / 1.4426950408889634, float("-inf"))
    tl.store(lse_ptr + t * stride_lt + h, lse, mask=hm)


@triton.jit
def _bwd_dq_kernel(q_ptr, k_ptr, v_ptr, blk_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, q_start, tk, sm_scale,
                   stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_bh, stride_bt,
                   stride_lt,
                   G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr, NSEL: tl.constexpr):
    t = tl.program_id(0)
    g = tl.program_id(1)
    pos = q_start + t
    r = tl.arange(0, G_PAD)
    hm = r < G
    h = g * G + r
    dd = tl.arange(0, D)
    qoff = t * stride_qt + h[:, None] * stride_qh + dd[None, :]
    q = tl.load(q_ptr + qoff, mask=hm[:, None], other=0.0)
    do = tl.load(do_ptr + qoff, mask=hm[:, None], other=0.0)
    lse = tl.load(lse_ptr + t * stride_lt + h, mask=hm, other=float("-inf")) * 1.4426950408889634
    lse = tl.where(lse > float("-inf"), lse, float("inf"))  # rows that saw nothing get p = 0
    delta = tl.load(delta_ptr + t * stride_lt + h, mask=hm, other=0.0)
    qk_scale = sm_scale * 1.4426950408889634
    dq = tl.zeros((G_PAD, D), dtype=tl.float32)
    kk0 = tl.arange(0, BLOCK)
    for i in range(NSEL):
        b = tl.load(blk_ptr + g * stride_bh + t * stride_bt + i)
        if b >= 0:
            kk = b * BLOCK + kk0
            km = (kk <= pos) & (kk < tk)
            k = tl.load(k_ptr + kk[:, None] * stride_kt + g * stride_kh + dd[None, :], mask=km[:, None], other=0.0)
            v = tl.load(v_ptr + kk[:, None] * stride_vt + g * stride_vh + dd[None, :], mask=km[:, None], other=0.0)
            s = tl.dot(q, tl.trans(k)) * qk_scale
            p = tl.where(km[None, :], tl.exp2(s - lse[:, None]), 0.0)
            dp = tl.dot(do, tl.trans(v))
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(k.dtype), k)
    tl.store(dq_ptr + qoff, (dq * sm_scale).to(dq_ptr.dtype.element_ty), mask=hm[:, None])


@triton.jit
def _bwd_dkdv_kernel(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, tok_ptr, off_ptr,
                     q_start, tk, n_blocks, sm_scale,
                     stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_lt,
                     G: tl.constexpr, G_PAD: tl.constexpr, TOK: tl.constexpr, D: tl.constexpr,
                     BLOCK: tl.constexpr):
    b = tl.program_id(0)
    g = tl.program_id(1)
    kk = b * BLOCK + tl.arange(0, BLOCK)
    km = kk < tk
    dd = tl.arange(0, D)
    koff = kk[:, None] * stride_kt + g * stride_kh + dd[None, :]
    k = tl.load(k_ptr + koff, mask=km[:, None], other=0.0)
    v = tl.load(v_ptr + kk[:, None] * stride_vt + g * stride_vh + dd[None, :], mask=km[:, None], other=0.0)
    dk = tl.zeros((BLOCK, D), dtype=tl.float32)
    dv = tl.zeros((BLOCK, D), dtype=tl.float32)
    start = tl.load(off_ptr + g * n_blocks + b)
    end = tl.load(off_ptr + g * n_blocks + b + 1)
    qk_scale = sm_scale * 1.4426950408889634
    M: tl.constexpr = TOK * G_PAD
    r = tl.arange(0, M)
    hm = (r % G_PAD) < G
    h = g * G + r % G_PAD
    for j0 in range(start, end, TOK):
        j = j0 + r // G_PAD
        jm = (j < end) & hm
        t = tl.load(tok_ptr + j, mask=jm, other=0)  # query index (0-based among the Tq queries)
        pos = q_start + t
        qoff = t[:, None] * stride_qt + h[:, None] * stride_qh + dd[None, :]
        q = tl.load(q_ptr + qoff, mask=jm[:, None], other=0.0)
        do = tl.load(do_ptr + qoff, mask=jm[:, None], other=0.0)
        lse = tl.load(lse_ptr + t * stride_lt + h, mask=jm, other=float("-inf")) * 1.4426950408889634
        lse = tl.where(lse > float("-inf"), lse, float("inf"))
        delta = tl.load(delta_ptr + t * stride_lt + h, mask=jm, other=0.0)
        s = tl.dot(q, tl.trans(k)) * qk_scale
        ok = jm[:, None] & (kk[None, :] <= pos[:, None]) & km[None, :]
        p = tl.where(ok, tl.exp2(s - lse[:, None]), 0.0)
        dv += tl.dot(tl.trans(p.to(do.dtype)), do)
        dp = tl.dot(do, tl.trans(v))
        ds = p * (dp - delta[:, None])
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q)
    tl.store(dk_ptr + koff, (dk * sm_scale).to(dk_ptr.dtype.element_ty), mask=km[:, None])
    tl.store(dv_ptr + kk[:, None] * stride_vt + g * stride_vh + dd[None, :], dv.to(dv_ptr.dtype.element_ty),
             mask=km[:, None])


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, blocks: torch.Tensor) -> None:
    if q.dim() != 3 or k.dim() != 3 or k.shape != v.shape:
        raise ValueError(f"expected q [Tq, hq, d], k/v [Tk, hkv, d]; got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if q.shape[1] % k.shape[1] or q.shape[2] != k.shape[2]:
        raise ValueError(f"q {tuple(q.shape)} does not fit k {tuple(k.shape)}: query heads must be a multiple of "
                         "KV heads and head dims equal")
    if blocks.shape[:2] != (k.shape[1], q.shape[0]):
        raise ValueError(f"blocks must be [hkv, Tq, nsel] = [{k.shape[1]}, {q.shape[0]}, *], got {tuple(blocks.shape)}")
    if q.shape[2] not in (16, 32, 64, 128, 256):
        raise ValueError(f"head dim {q.shape[2]} unsupported (16, 32, 64, 128 or 256)")


def _contig(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def sparse_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, blocks: torch.Tensor, block_size: int,
               scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    _check(q, k, v, blocks)
    q, k, v, blocks = _contig(q), _contig(k), _contig(v), _contig(blocks.to(torch.int32))
    tq, hq, d = q.shape
    tk, hkv, _ = k.shape
    g = hq // hkv
    g_pad = max(16, triton.next_power_of_2(g))
    o = torch.empty_like(q)
    lse = torch.empty((tq, hq), device=q.device, dtype=torch.float32)
    _fwd_kernel[(tq, hkv)](q, k, v, blocks, o, lse, tk - tq, tk, scale, q.stride(0), q.stride(1), k.stride(0),
                           k.stride(1), v.stride(0), v.stride(1), blocks.stride(0), blocks.stride(1), o.stride(0),
                           o.stride(1), lse.stride(0), G=g, G_PAD=g_pad, D=d, BLOCK=block_size,
                           NSEL=blocks.shape[2])
    return o, lse


def invert_blocks(blocks: torch.Tensor, n_blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For each (KV head g, key block b): the query indices that selected it, as a CSR list
    (tokens, offsets[g * n_blocks + b : + 1])."""
    hkv, tq, _ = blocks.shape
    valid = blocks >= 0
    g_idx, t_idx, _ = valid.nonzero(as_tuple=True)
    key = g_idx * n_blocks + blocks[valid].long()
    order = torch.argsort(key, stable=True)
    tokens = t_idx[order].to(torch.int32)
    counts = torch.bincount(key, minlength=hkv * n_blocks)
    offsets = torch.zeros(hkv * n_blocks + 1, device=blocks.device, dtype=torch.int32)
    offsets[1:] = torch.cumsum(counts, 0)
    return tokens, offsets


def sparse_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
               lse: torch.Tensor, blocks: torch.Tensor, block_size: int, scale: float
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q, k, v, o, do = _contig(q), _contig(k), _contig(v), _contig(o), _contig(do)
    blocks = _contig(blocks.to(torch.int32))
    tq, hq, d = q.shape
    tk, hkv, _ = k.shape
    g = hq // hkv
    g_pad = max(16, triton.next_power_of_2(g))
    delta = (o.float() * do.float()).sum(-1)  # [Tq, hq]
    dq = torch.empty_like(q)
    _bwd_dq_kernel[(tq, hkv)](q, k, v, blocks, do, lse, delta, dq, tk - tq, tk, scale, q.stride(0), q.stride(1),
                              k.stride(0), k.stride(1), v.stride(0), v.stride(1), blocks.stride(0), blocks.stride(1),
                              lse.stride(0), G=g, G_PAD=g_pad, D=d, BLOCK=block_size, NSEL=blocks.shape[2])
    n_blocks = triton.cdiv(tk, block_size)
    tokens, offsets = invert_blocks(blocks, n_blocks)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    tok, g_pad2 = tile_shape(g)
    _bwd_dkdv_kernel[(n_blocks, hkv)](q, k, v, do, lse, delta, dk, dv, tokens, offsets, tk - tq, tk, n_blocks, scale,
                                      q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                                      lse.stride(0), G=g, G_PAD=g_pad2, TOK=tok, D=d, BLOCK=block_size)
    return dq, dk, dv


class SparseAttentionFn(torch.autograd.Function):
    """Block-sparse attention with gradients to q, k, v (none through the block choice)."""

    @staticmethod
    def forward(ctx, q, k, v, blocks, block_size: int, scale: float):
        o, lse = sparse_fwd(q, k, v, blocks, block_size, scale)
        ctx.save_for_backward(q, k, v, o, lse, blocks)
        ctx.block_size, ctx.scale = block_size, scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, blocks = ctx.saved_tensors
        dq, dk, dv = sparse_bwd(do, q, k, v, o, lse, blocks, ctx.block_size, ctx.scale)
        return dq, dk, dv, None, None, None


def block_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, blocks: torch.Tensor,
                           block_size: int, scale: float) -> torch.Tensor:
    """Differentiable block-sparse attention (see module docstring) -> [Tq, hq, d]."""
    return SparseAttentionFn.apply(q, k, v, blocks, block_size, scale)
