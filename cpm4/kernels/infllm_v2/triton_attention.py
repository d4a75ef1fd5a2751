"""InfLLM v2 stage 4 in Triton: block-sparse attention over selected blocks, forward and backward.

One sequence: q [Tq, hq, d] are the last Tq of Tk tokens, k/v [Tk, hkv, d], blocks [hkv, Tq, NSEL] int32
(-1 = unused slot, anywhere in the row). A query attends to keys t <= its position in its blocks.

Forward and dq: one program per (query token, KV head) whose tile is the G heads of the group (padded
to a power of two >= 16) against one key block at a time, flash-attention style.
dk/dv: the selection is inverted (which tokens chose key block b of head g) and one program per
(key block, KV head) walks its tokens in tiles, so every dk/dv block has one writer and needs no atomics
(with DKDV_CHUNK a block's tokens are cut into pieces whose partials a second kernel adds in order).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import triton_union
from .triton_select import (
    Rows,
    dq_step,
    group_pad,
    group_rows,
    own_range,
    padded_empty,
    row_params,
    shared_block,
    softmax_step,
    tile_shape,
)
from .triton_select import autotune_configs as _configs


@triton.jit
def shared_kv(k_ptr, v_ptr, kk, tk, g, dd, stride_kt, stride_kh, stride_vt, stride_vh, EDGE: tl.constexpr = True):
    """Keys and values of one shared block (rows kk of KV head g), rows past the sequence end zeroed; also
    the row indices and their in-range mask. EDGE False: a block before the query block, inside the sequence,
    loaded without a mask (with tk a runtime value, not known divisible by 16, a per-row mask cost the forward's
    shared kernel 11 % at 128K, H200)."""
    k_ptrs = k_ptr + kk[:, None] * stride_kt + g * stride_kh + dd[None, :]
    v_ptrs = v_ptr + kk[:, None] * stride_vt + g * stride_vh + dd[None, :]
    if EDGE:
        km = kk < tk
        k = tl.load(k_ptrs, mask=km[:, None], other=0.0)
        v = tl.load(v_ptrs, mask=km[:, None], other=0.0)
    else:
        km = tl.full(kk.shape, 1, tl.int1)
        k = tl.load(k_ptrs)
        v = tl.load(v_ptrs)
    return kk, km, k, v


# SHARED_HEADS: query heads of one KV group per program of the shared-blocks forward and dq (its tile: that many
# x BLOCK rows against each shared key block, loaded once for them). 1: a 64-row tile per head; 2: 128 rows, half the
# K/V loads and larger MMAs. At 128K the shared part does 4.7 TFLOP in ≈ 11.6 ms (≈ 400 TFLOP/s, H200). Measured
# with 2 (H200, 8B shape; attention.py rows prefill.stage2_attention.shared_heads2, backward.shared_heads2): stage 2
# 70.2 -> 69.5 ms at 128K, 15.4 -> 15.0 at 32K, the backward unchanged; left at 1 for now.
SHARED_HEADS = 1


def shared_heads_for(g: int, heads: int | None = None) -> int:
    """Heads per shared-blocks tile for a group of g (None: SHARED_HEADS); 1 where that does not divide g."""
    heads = SHARED_HEADS if heads is None else heads
    return heads if g % heads == 0 else 1


@triton.autotune(configs=_configs(), key=["D", "BLOCK", "INIT", "HP", "ROWS"])
@triton.jit(do_not_specialize=["tq", "q_start", "tk", "n_rows", "n_programs"])  # see triton_select._lse_kernel
def _fwd_shared_kernel(q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, tq, q_start, tk, window, sm_scale,
                       stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
                       stride_lt, rows_ptr, n_rows, n_programs, stride_qb, stride_kb, stride_vb, stride_ob, stride_lb,
                       G: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr, INIT: tl.constexpr,
                       HP: tl.constexpr, ROWS: tl.constexpr):
    """The blocks every query of a query block attends to (initial blocks and the local window
    qb-window .. qb): one flash-attention tile of BLOCK tokens x HP heads of one group. Writes the partial
    result (normalised, fp32) and its log-sum-exp in log2 units. Only the last block (the query block's own)
    needs the causal mask: every earlier one lies before all of the tile's positions.
    ROWS: several sequences (triton_select.Rows), the second grid axis (row, head program)."""
    pid = tl.program_id(1)
    if ROWS:
        b, pid, tq, q_start, tk = row_params(rows_ptr, n_rows, pid, n_programs, 2)
        if tl.program_id(0) + q_start // BLOCK <= (tk - 1) // BLOCK:  # past a shorter row's blocks: nothing
            _fwd_shared_edges(q_ptr + b * stride_qb, k_ptr + b * stride_kb, v_ptr + b * stride_vb,
                              o_ptr + b * stride_ob, lse_ptr + b * stride_lb, pid, q_start, tk, window, sm_scale,
                              stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
                              stride_lt, G, D, BLOCK, INIT, HP)
    else:
        _fwd_shared_edges(q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, pid, q_start, tk, window, sm_scale, stride_qt,
                          stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh, stride_lt, G, D,
                          BLOCK, INIT, HP)


@triton.jit
def _fwd_shared_edges(q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, pid, q_start, tk, window, sm_scale,
                      stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
                      stride_lt, G: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr, INIT: tl.constexpr,
                      HP: tl.constexpr):
    """`_fwd_shared_tile` without masks for a query block inside [q_start, tk) (all but a prompt's first and last
    blocks), with them otherwise: with tk a runtime value those masks made the kernel 12.8 ms at 128K, unmasked
    inside 12.2, as fast as with every length specialized (H200, `device_session.sh sharedargs`)."""
    qb = tl.program_id(0) + q_start // BLOCK
    if (qb * BLOCK >= q_start) & ((qb + 1) * BLOCK <= tk):
        _fwd_shared_tile(q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, pid, q_start, tk, window, sm_scale, stride_qt,
                         stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh, stride_lt, G, D,
                         BLOCK, INIT, HP, False)
    else:
        _fwd_shared_tile(q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, pid, q_start, tk, window, sm_scale, stride_qt,
                         stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh, stride_lt, G, D,
                         BLOCK, INIT, HP, True)


@triton.jit
def _fwd_shared_tile(q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, pid, q_start, tk, window, sm_scale,
                     stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
                     stride_lt, G: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr, INIT: tl.constexpr,
                     HP: tl.constexpr, EDGE: tl.constexpr):
    qb = tl.program_id(0) + q_start // BLOCK
    r = tl.arange(0, HP * BLOCK)
    h = pid * HP + r // BLOCK  # HP divides G: one KV group per program
    g = pid * HP // G
    pos = qb * BLOCK + r % BLOCK
    rm = (pos >= q_start) & (pos < tk) if EDGE else tl.full(pos.shape, 1, tl.int1)
    t = pos - q_start
    dd = tl.arange(0, D)
    if EDGE:
        q = tl.load(q_ptr + t[:, None] * stride_qt + h[:, None] * stride_qh + dd[None, :], mask=rm[:, None],
                    other=0.0)
    else:
        q = tl.load(q_ptr + t[:, None] * stride_qt + h[:, None] * stride_qh + dd[None, :])
    qk_scale = sm_scale * 1.4426950408889634
    m_i = tl.full((HP * BLOCK,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((HP * BLOCK,), dtype=tl.float32)
    acc = tl.zeros((HP * BLOCK, D), dtype=tl.float32)
    kk0 = tl.arange(0, BLOCK)
    _, n = shared_block(0, qb, window, INIT)
    for i in tl.range(0, n - 1):
        b, _ = shared_block(i, qb, window, INIT)
        kk, km, k, v = shared_kv(k_ptr, v_ptr, b * BLOCK + kk0, tk, g, dd, stride_kt, stride_kh, stride_vt, stride_vh,
                                 EDGE=False)
        m_i, l_i, acc = softmax_step(q, k, v, km[None, :], m_i, l_i, acc, qk_scale)
    kk, km, k, v = shared_kv(k_ptr, v_ptr, qb * BLOCK + kk0, tk, g, dd, stride_kt, stride_kh, stride_vt, stride_vh,
                             EDGE=EDGE)
    m_i, l_i, acc = softmax_step(q, k, v, km[None, :] & (kk[None, :] <= pos[:, None]), m_i, l_i, acc, qk_scale)
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    o_ptrs = o_ptr + t[:, None] * stride_ot + h[:, None] * stride_oh + dd[None, :]
    lse = tl.where(l_i > 0, m_i + tl.log2(l_safe), float("-inf"))
    if EDGE:
        tl.store(o_ptrs, acc / l_safe[:, None], mask=rm[:, None])
        tl.store(lse_ptr + t * stride_lt + h, lse, mask=rm)
    else:
        tl.store(o_ptrs, acc / l_safe[:, None])
        tl.store(lse_ptr + t * stride_lt + h, lse)


@triton.autotune(configs=_configs(warps=(1, 2, 4)), key=["D", "G_PAD", "BLOCK", "NSEL_PAD", "ROWS"],
                 **triton_union.TUNING_HOOKS)
@triton.jit(do_not_specialize=["q_start", "tk", "n_rows", "nsel"])  # see triton_select._lse_kernel
def _fwd_token_kernel(q_ptr, k_ptr, v_ptr, blk_ptr, os_ptr, ls_ptr, o_ptr, lse_ptr, q_start, tk, window, sm_scale,
                      stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_bh, stride_bt,
                      stride_ot, stride_oh, stride_lt, rows_ptr, n_rows, n_groups, stride_qb, stride_kb, stride_vb,
                      stride_bb, stride_osb, stride_lsb, stride_ob, stride_lb, un_ptr, max_share,
                      G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr,
                      nsel, NSEL_PAD: tl.constexpr, INIT: tl.constexpr, ROWS: tl.constexpr, UNION: tl.constexpr):
    """Continues the shared part's softmax state with the query's own selected blocks (those outside the
    shared set: init <= b < qb - window). The selection is sorted ascending with -1 last, so those blocks
    are one contiguous run of it: the loop has no branches and pipelines its loads.
    ROWS: several sequences (triton_select.Rows), the second grid axis (row, KV head).
    UNION: a `triton_union.Plan`'s stats (un_ptr) and share: nothing where they pass (the union kernel's call)."""
    if UNION:
        if triton_union._taken(un_ptr, max_share):
            return
    t = tl.program_id(0)
    g = tl.program_id(1)
    if ROWS:
        b, g, tq, q_start, tk = row_params(rows_ptr, n_rows, g, n_groups, 2)
        if t < tq:  # past a shorter row's queries: nothing
            _fwd_token_query(q_ptr + b * stride_qb, k_ptr + b * stride_kb, v_ptr + b * stride_vb,
                             blk_ptr + b * stride_bb, os_ptr + b * stride_osb, ls_ptr + b * stride_lsb,
                             o_ptr + b * stride_ob, lse_ptr + b * stride_lb, t, g, q_start, window, sm_scale,
                             stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_bh, stride_bt,
                             stride_ot, stride_oh, stride_lt, G, G_PAD, D, BLOCK, nsel, NSEL_PAD, INIT)
    else:
        _fwd_token_query(q_ptr, k_ptr, v_ptr, blk_ptr, os_ptr, ls_ptr, o_ptr, lse_ptr, t, g, q_start, window, sm_scale,
                         stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_bh, stride_bt,
                         stride_ot, stride_oh, stride_lt, G, G_PAD, D, BLOCK, nsel, NSEL_PAD, INIT)


@triton.jit
def _fwd_token_query(q_ptr, k_ptr, v_ptr, blk_ptr, os_ptr, ls_ptr, o_ptr, lse_ptr, t, g, q_start, window, sm_scale,
                     stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_bh, stride_bt,
                     stride_ot, stride_oh, stride_lt, G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr,
                     BLOCK: tl.constexpr, nsel, NSEL_PAD: tl.constexpr, INIT: tl.constexpr):
    pos = q_start + t
    qb = pos // BLOCK
    h, hm, qoff = group_rows(t, g, stride_qt, stride_qh, G, G_PAD, D)
    dd = tl.arange(0, D)
    q = tl.load(q_ptr + qoff, mask=hm[:, None], other=0.0)
    row = blk_ptr + g * stride_bh + t * stride_bt
    n_lo, n_hi = own_range(row, qb, window, nsel, NSEL_PAD, INIT)
    # Start from the shared part: (m, l, acc) = (its lse, 1, its normalised output).
    acc = tl.load(os_ptr + qoff, mask=hm[:, None], other=0.0)
    m_i = tl.load(ls_ptr + t * stride_lt + h, mask=hm, other=float("-inf"))
    l_i = tl.where(m_i > float("-inf"), 1.0, 0.0)
    qk_scale = sm_scale * 1.4426950408889634
    kk0 = tl.arange(0, BLOCK)
    for i in tl.range(n_lo, n_hi):
        b = tl.load(row + i)
        kk = b * BLOCK + kk0
        k = tl.load(k_ptr + kk[:, None] * stride_kt + g * stride_kh + dd[None, :])
        v = tl.load(v_ptr + kk[:, None] * stride_vt + g * stride_vh + dd[None, :])
        # Blocks before qb - window are fully visible: no mask.
        m_i, l_i, acc = softmax_step(q, k, v, (kk0 >= 0)[None, :], m_i, l_i, acc, qk_scale)
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    out = (acc / l_safe[:, None]).to(o_ptr.dtype.element_ty)
    tl.store(o_ptr + t * stride_ot + h[:, None] * stride_oh + dd[None, :], out, mask=hm[:, None])
    lse = tl.where(l_i > 0, (m_i + tl.log2(l_safe)) / 1.4426950408889634, float("-inf"))
    tl.store(lse_ptr + t * stride_lt + h, lse, mask=hm)


@triton.autotune(configs=_configs(), key=["D", "BLOCK", "INIT", "HP"])
@triton.jit(do_not_specialize=["tq", "q_start", "tk"])  # see triton_select._lse_kernel (training: packed documents)
def _bwd_dq_shared_kernel(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, tq, q_start, tk, window, sm_scale,
                          stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_lt,
                          G: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr, INIT: tl.constexpr,
                          HP: tl.constexpr):
    """dq over the shared blocks: a flash-attention backward tile of BLOCK tokens x HP heads of one group (fp32
    out); the causal mask on the last block only, as in the forward."""
    qb = tl.program_id(0) + q_start // BLOCK
    r = tl.arange(0, HP * BLOCK)
    h = tl.program_id(1) * HP + r // BLOCK
    g = tl.program_id(1) * HP // G
    pos = qb * BLOCK + r % BLOCK
    rm = (pos >= q_start) & (pos < tk)
    t = pos - q_start
    dd = tl.arange(0, D)
    qoff = t[:, None] * stride_qt + h[:, None] * stride_qh + dd[None, :]
    q = tl.load(q_ptr + qoff, mask=rm[:, None], other=0.0)
    do = tl.load(do_ptr + qoff, mask=rm[:, None], other=0.0)
    # Rows outside the queries: lse +inf, so their p is 0 in every block.
    lse = tl.load(lse_ptr + t * stride_lt + h, mask=rm, other=float("inf")) * 1.4426950408889634
    delta = tl.load(delta_ptr + t * stride_lt + h, mask=rm, other=0.0)
    qk_scale = sm_scale * 1.4426950408889634
    dq = tl.zeros((HP * BLOCK, D), dtype=tl.float32)
    kk0 = tl.arange(0, BLOCK)
    _, n = shared_block(0, qb, window, INIT)
    for i in tl.range(0, n - 1):
        b, _ = shared_block(i, qb, window, INIT)
        kk, km, k, v = shared_kv(k_ptr, v_ptr, b * BLOCK + kk0, tk, g, dd, stride_kt, stride_kh, stride_vt, stride_vh,
                                 EDGE=False)
        dq = dq_step(q, do, k, v, None, lse, delta, dq, qk_scale)
    kk, km, k, v = shared_kv(k_ptr, v_ptr, qb * BLOCK + kk0, tk, g, dd, stride_kt, stride_kh, stride_vt, stride_vh)
    dq = dq_step(q, do, k, v, km[None, :] & (kk[None, :] <= pos[:, None]), lse, delta, dq, qk_scale)
    tl.store(dq_ptr + qoff, dq * sm_scale, mask=rm[:, None])


@triton.autotune(configs=_configs(warps=(1, 2, 4)), key=["D", "G_PAD", "BLOCK", "NSEL_PAD"],
                 **triton_union.TUNING_HOOKS)
@triton.jit(do_not_specialize=["q_start", "nsel"])  # see _bwd_dq_shared_kernel
def _bwd_dq_token_kernel(q_ptr, k_ptr, v_ptr, blk_ptr, do_ptr, lse_ptr, delta_ptr, dqs_ptr, dq_ptr, q_start, window,
                         sm_scale, stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_bh,
                         stride_bt, stride_lt, un_ptr, max_share,
                         G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr,
                         nsel, NSEL_PAD: tl.constexpr, INIT: tl.constexpr, UNION: tl.constexpr):
    """Adds the query's own selected blocks (outside the shared set) to the shared part's dq. UNION: as
    `_fwd_token_kernel`'s."""
    if UNION:
        if triton_union._taken(un_ptr, max_share):
            return
    t = tl.program_id(0)
    g = tl.program_id(1)
    pos = q_start + t
    qb = pos // BLOCK
    h, hm, qoff = group_rows(t, g, stride_qt, stride_qh, G, G_PAD, D)
    dd = tl.arange(0, D)
    q = tl.load(q_ptr + qoff, mask=hm[:, None], other=0.0)
    do = tl.load(do_ptr + qoff, mask=hm[:, None], other=0.0)
    lse = tl.load(lse_ptr + t * stride_lt + h, mask=hm, other=float("inf")) * 1.4426950408889634
    delta = tl.load(delta_ptr + t * stride_lt + h, mask=hm, other=0.0)
    row = blk_ptr + g * stride_bh + t * stride_bt
    n_lo, n_hi = own_range(row, qb, window, nsel, NSEL_PAD, INIT)
    qk_scale = sm_scale * 1.4426950408889634
    dq = tl.zeros((G_PAD, D), dtype=tl.float32)
    kk0 = tl.arange(0, BLOCK)
    for i in tl.range(n_lo, n_hi):
        b = tl.load(row + i)
        kk = b * BLOCK + kk0
        k = tl.load(k_ptr + kk[:, None] * stride_kt + g * stride_kh + dd[None, :])
        v = tl.load(v_ptr + kk[:, None] * stride_vt + g * stride_vh + dd[None, :])
        s = tl.dot(q, tl.trans(k)) * qk_scale
        p = tl.exp2(s - lse[:, None])
        dp = tl.dot(do, tl.trans(v))
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k)
    dq = dq * sm_scale + tl.load(dqs_ptr + qoff, mask=hm[:, None], other=0.0)
    tl.store(dq_ptr + qoff, dq.to(dq_ptr.dtype.element_ty), mask=hm[:, None])


@triton.jit(do_not_specialize=["q_start", "tk", "n_blocks"])  # see _bwd_dq_shared_kernel
def _bwd_dkdv_kernel(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, tok_ptr, item_ptr, ws_ptr,
                     q_start, tk, n_blocks, sm_scale,
                     stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_lt,
                     G: tl.constexpr, G_PAD: tl.constexpr, TOK: tl.constexpr, D: tl.constexpr,
                     BLOCK: tl.constexpr, KEYS_FIRST: tl.constexpr):
    # One work item: (KV head g, key block b, its tokens start..end of the inverted list, workspace slot). Slot -1:
    # the item holds all of the block's tokens and stores dk/dv; otherwise its fp32 partial goes to the workspace
    # and `_bwd_dkdv_sum_kernel` adds the block's partials.
    it = item_ptr + tl.program_id(0) * 4
    gb = tl.load(it)
    g = gb // n_blocks
    b = gb % n_blocks
    start = tl.load(it + 1)
    end = tl.load(it + 2)
    slot = tl.load(it + 3)
    kk = b * BLOCK + tl.arange(0, BLOCK)
    km = kk < tk
    dd = tl.arange(0, D)
    koff = kk[:, None] * stride_kt + g * stride_kh + dd[None, :]
    k = tl.load(k_ptr + koff, mask=km[:, None], other=0.0)
    v = tl.load(v_ptr + kk[:, None] * stride_vt + g * stride_vh + dd[None, :], mask=km[:, None], other=0.0)
    dk = tl.zeros((BLOCK, D), dtype=tl.float32)
    dv = tl.zeros((BLOCK, D), dtype=tl.float32)
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
        if KEYS_FIRST:  # scores as [keys, rows]: p and ds feed their dots as they are, no transposes
            st = tl.dot(k, tl.trans(q)) * qk_scale
            okt = jm[None, :] & (kk[:, None] <= pos[None, :]) & km[:, None]
            pt = tl.where(okt, tl.exp2(st - lse[None, :]), 0.0)
            dv += tl.dot(pt.to(do.dtype), do)
            dpt = tl.dot(v, tl.trans(do))
            dst = pt * (dpt - delta[None, :])
            dk += tl.dot(dst.to(q.dtype), q)
        else:
            s = tl.dot(q, tl.trans(k)) * qk_scale
            ok = jm[:, None] & (kk[None, :] <= pos[:, None]) & km[None, :]
            p = tl.where(ok, tl.exp2(s - lse[:, None]), 0.0)
            dv += tl.dot(tl.trans(p.to(do.dtype)), do)
            dp = tl.dot(do, tl.trans(v))
            ds = p * (dp - delta[:, None])
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q)
    if slot < 0:
        tl.store(dk_ptr + koff, (dk * sm_scale).to(dk_ptr.dtype.element_ty), mask=km[:, None])
        tl.store(dv_ptr + kk[:, None] * stride_vt + g * stride_vh + dd[None, :], dv.to(dv_ptr.dtype.element_ty),
                 mask=km[:, None])
    else:
        woff = slot.to(tl.int64) * (2 * BLOCK * D) + tl.arange(0, BLOCK)[:, None] * D + dd[None, :]
        tl.store(ws_ptr + woff, dk * sm_scale)
        tl.store(ws_ptr + woff + BLOCK * D, dv)


@triton.jit(do_not_specialize=["tk", "n_blocks"])  # see _bwd_dq_shared_kernel
def _bwd_dkdv_sum_kernel(ws_ptr, sums_ptr, dk_ptr, dv_ptr, tk, n_blocks, stride_kt, stride_kh, stride_vt, stride_vh,
                         D: tl.constexpr, BLOCK: tl.constexpr):
    # One key block whose tokens were split over several items: add its partials (slots first..first+count-1, in
    # order: the same sum on every run) and store dk/dv.
    it = sums_ptr + tl.program_id(0) * 3
    gb = tl.load(it)
    first = tl.load(it + 1)
    count = tl.load(it + 2)
    g = gb // n_blocks
    b = gb % n_blocks
    kk = b * BLOCK + tl.arange(0, BLOCK)
    km = kk < tk
    dd = tl.arange(0, D)
    dk = tl.zeros((BLOCK, D), dtype=tl.float32)
    dv = tl.zeros((BLOCK, D), dtype=tl.float32)
    for i in range(count):
        woff = (first + i).to(tl.int64) * (2 * BLOCK * D) + tl.arange(0, BLOCK)[:, None] * D + dd[None, :]
        dk += tl.load(ws_ptr + woff)
        dv += tl.load(ws_ptr + woff + BLOCK * D)
    tl.store(dk_ptr + kk[:, None] * stride_kt + g * stride_kh + dd[None, :], dk.to(dk_ptr.dtype.element_ty),
             mask=km[:, None])
    tl.store(dv_ptr + kk[:, None] * stride_vt + g * stride_vh + dd[None, :], dv.to(dv_ptr.dtype.element_ty),
             mask=km[:, None])


@triton.jit(do_not_specialize=["n_rows"])  # see _bwd_dq_shared_kernel
def _delta_kernel(o_ptr, do_ptr, out_ptr, n_rows, D: tl.constexpr, ROWS: tl.constexpr):
    r = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    rm = r < n_rows
    off = r.to(tl.int64)[:, None] * D + tl.arange(0, D)[None, :]
    o = tl.load(o_ptr + off, mask=rm[:, None], other=0.0).to(tl.float32)
    do = tl.load(do_ptr + off, mask=rm[:, None], other=0.0).to(tl.float32)
    tl.store(out_ptr + r, tl.sum(o * do, 1), mask=rm)


def row_dot(o: torch.Tensor, do: torch.Tensor) -> torch.Tensor:
    """(o * do).sum(-1) in float32 for contiguous [..., d] tensors, in one pass over their input dtype (the
    backward's delta: PyTorch's float copies, product and sum took ≈ 6 ms at 128K for ≈ 0.5 ms of reading)."""
    if o.shape != do.shape or not (o.is_contiguous() and do.is_contiguous()):
        raise ValueError(f"row_dot: o and do must be contiguous and of one shape, got {tuple(o.shape)}, "
                         f"{tuple(do.shape)}")
    d = o.shape[-1]
    out = torch.empty(o.shape[:-1], device=o.device, dtype=torch.float32)
    n = out.numel()
    rows = max(1, 4096 // d)
    _delta_kernel[(triton.cdiv(n, rows),)](o, do, out, n, D=d, ROWS=rows)
    return out


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


def sparse_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, idx: torch.Tensor, block_size: int, scale: float,
               init_blocks: int, window: int, shared_heads: int | None = None, rows: Rows | None = None,
               union: tuple | None | str = "decide") -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over the shared blocks (b < init_blocks or qb - window <= b <= qb) plus the selected blocks
    `idx` [hkv, Tq, K] (sorted ascending, -1 last; entries inside the shared set are ignored).
    Returns out [Tq, hq, d] and lse [Tq, hq] (natural log). shared_heads: see SHARED_HEADS (None: that).
    rows: several sequences (q [R, T, hq, d], k/v [R, S, hkv, d], idx [R, hkv, T, K]; see triton_select.Rows)
    -> out [R, T, hq, d] (zero past each sequence's queries) and lse [R, T, hq] (set for its queries only).
    union: `triton_union.choose`'s answer when the caller already has it ("decide": ask here)."""
    if rows is None:
        _check(q, k, v, idx)
        q, k, v, idx = q[None], k[None], v[None], idx[None]
        q_start, tk = k.shape[1] - q.shape[1], k.shape[1]
        n_qblocks = (tk - 1) // block_size - q_start // block_size + 1
    else:
        _check(q[0], k[0], v[0], idx[0])
        q_start = tk = 0  # per sequence, from rows.table
        n_qblocks = max((kl - 1) // block_size - s // block_size + 1 for s, kl in zip(rows.q_start, rows.kv_lens))
    q, k, v, idx = _contig(q), _contig(k), _contig(v), _contig(idx.to(torch.int32))
    r, tq, hq, d = q.shape
    if q.stride(1) != hq * d or q.stride(2) != d:  # the token kernel reads o_shared with q's offsets
        q = q.contiguous()
    hkv = k.shape[2]
    g = hq // hkv
    g_pad = group_pad(g)
    # Same layout as q (the token kernel reads both with q's offsets); written and read for each row's queries only.
    o_shared = torch.empty((r, tq, hq, d), device=q.device, dtype=torch.float32)
    lse_shared = padded_empty(r, tq, hq, dtype=torch.float32, device=q.device)
    alloc = torch.zeros if rows is not None else torch.empty  # the result: zero where a shorter row stops
    hp = shared_heads_for(g, shared_heads)
    table = q if rows is None else rows.table  # read only with ROWS
    _fwd_shared_kernel[(n_qblocks, hq // hp * r)](q, k, v, o_shared, lse_shared, tq, q_start, tk, window, scale,
                                                  q.stride(1), q.stride(2), k.stride(1), k.stride(2), v.stride(1),
                                                  v.stride(2), o_shared.stride(1), o_shared.stride(2),
                                                  lse_shared.stride(1), table, r, hq // hp, q.stride(0), k.stride(0),
                                                  v.stride(0), o_shared.stride(0), lse_shared.stride(0), G=g, D=d,
                                                  BLOCK=block_size, INIT=init_blocks, HP=hp, ROWS=rows is not None)
    o = alloc(q.shape, device=q.device, dtype=q.dtype)
    lse = padded_empty(r, tq, hq, dtype=torch.float32, device=q.device)
    # Neighbours' own blocks once for all of them, where they overlap (`triton_union`; on by default): with a plan
    # both kernels are launched and one of them returns at once (the decision stays on the device).
    plan = union if union != "decide" else triton_union.choose(idx, tq, q_start, rows.table if rows is not None
                                                               else None, block_size, init_blocks, window)
    if plan is not None:
        triton_union.fwd_union(q, k, v, idx, plan, o_shared, lse_shared, o, lse, block_size, scale, init_blocks,
                               window)
    nsel = idx.shape[3]
    _fwd_token_kernel[(tq, hkv * r)](q, k, v, idx, o_shared, lse_shared, o, lse, q_start, tk, window, scale,
                                     q.stride(1), q.stride(2), k.stride(1), k.stride(2), v.stride(1), v.stride(2),
                                     idx.stride(1), idx.stride(2), o.stride(1),
                                     o.stride(2), lse.stride(1), table, r, hkv, q.stride(0), k.stride(0), v.stride(0),
                                     idx.stride(0), o_shared.stride(0), lse_shared.stride(0), o.stride(0),
                                     lse.stride(0), table if plan is None else plan.stats,
                                     0.0 if plan is None else plan.max_share, G=g, G_PAD=g_pad, D=d,
                                     BLOCK=block_size, nsel=nsel, NSEL_PAD=triton.next_power_of_2(max(nsel, 1)),
                                     INIT=init_blocks, ROWS=rows is not None, UNION=plan is not None)
    return (o, lse) if rows is not None else (o[0], lse[0])


def full_block_list(idx: torch.Tensor, q_pos: torch.Tensor, block_size: int, init_blocks: int, window: int
                    ) -> torch.Tensor:
    """Every block a query reads: its selection outside the shared set, plus the shared set itself
    (b < init_blocks, qb - window <= b <= qb) -> [hkv, Tq, n] int32, -1 padded (for the backward)."""
    qb = (q_pos // block_size)[None, :, None]
    own = (idx >= init_blocks) & (idx < qb - window)
    sel = torch.where(own, idx, -1)
    init = torch.arange(init_blocks, device=idx.device)[None, None, :].expand(idx.shape[0], idx.shape[1], -1)
    init = torch.where(init <= qb, init, -1)
    local = qb - torch.arange(window, -1, -1, device=idx.device)[None, None, :]
    local = torch.where(local >= init_blocks, local, -1).expand(idx.shape[0], -1, -1)
    return torch.cat([init, sel, local], -1).to(torch.int32)


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


# DKDV_CHUNK: the dk/dv kernel walks a key block's tokens in items of at most this many (None: one item a block).
# Every query attends to the initial block, so without a split one program walks all Tq tokens of it (at 128K,
# 32,768 tiles against ≈ 1,500 for an average block): it was the kernel's tail. Split blocks add their items' fp32
# partials in a second kernel, in a fixed order (deterministic). Measured (H200, 128K, dk/dv alone): unsplit 82.2
# ms, 8192 65.0, 4096 66.9, 2048 67.3; without the initial block's tokens at all 65.3. The items run block-major
# (the former grid (blocks, heads) started head 1's initial block only after all of head 0's blocks: 111 ms).
DKDV_CHUNK: int | None = 8192
# The dk/dv tile: rows (tokens x padded group; 64 = 4 tokens of a 16-head group) and warps (None: Triton's 4).
# Measured unsplit at 128K: 8 warps 132 ms, 128 rows out of shared memory, 128 rows + 8 warps 75.7 (vs 82.2).
DKDV_ROWS = 64
DKDV_WARPS: int | None = None
# DKDV_KEYS_FIRST: the scores computed as [keys, rows] (K Q^T, as flash-attention's dk/dv pass) so that P and dS
# enter the dV and dK dots as they are, instead of [rows, keys] and a transpose of each. Same values up to
# rounding; measured slower (unsplit 85.0 vs 82.2 ms at 128K, split 4096 68.1 vs 66.9).
DKDV_KEYS_FIRST = False


def dkdv_items(offsets: torch.Tensor, n_blocks: int, chunk: int | None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The dk/dv kernel's work items from the inverted selection's CSR offsets [hkv * n_blocks + 1]: rows (g *
    n_blocks + b, start, end, slot) int32, each at most `chunk` tokens (None: one a block, all slots -1);
    blocks of more than one item get consecutive workspace slots and a row (g * n_blocks + b, first slot,
    items) of the second array. Items run block-major (block 0 of every head first: the initial block, which
    every query attends to, is the longest work and should start first). Returns (items, sums, slots)."""
    dev = offsets.device
    nb = offsets.numel() - 1
    perm = torch.arange(nb, device=dev).view(nb // n_blocks, n_blocks).t().reshape(-1)  # block-major order
    starts, stops = offsets[:-1].long()[perm], offsets[1:].long()[perm]
    if chunk is None:
        items = torch.stack([perm, starts, stops, torch.full_like(perm, -1)], 1)
        return items.to(torch.int32).contiguous(), torch.zeros((0, 3), dtype=torch.int32, device=dev), 0
    if chunk < 1:
        raise ValueError(f"dk/dv chunk must be a positive token count, got {chunk}")
    nch = torch.clamp((stops - starts + chunk - 1) // chunk, min=1)  # a block nobody chose still writes zeros
    split = nch > 1
    slots_per = torch.where(split, nch, 0)
    n_items, n_slots = (int(x) for x in torch.stack([nch.sum(), slots_per.sum()]).tolist())
    ends = torch.cumsum(nch, 0)
    i = torch.arange(n_items, device=dev)
    owner = torch.searchsorted(ends, i, right=True)  # position in the block-major order
    j = i - (ends - nch)[owner]
    start = starts[owner] + j * chunk
    end = torch.minimum(start + chunk, stops[owner])
    first = torch.cumsum(slots_per, 0) - slots_per
    slot = torch.where(split[owner], first[owner] + j, -1)
    items = torch.stack([perm[owner], start, end, slot], 1).to(torch.int32).contiguous()
    sb = split.nonzero().squeeze(1)
    sums = torch.stack([perm[sb], first[sb], nch[sb]], 1).to(torch.int32).contiguous()
    return items, sums, n_slots


def bwd_dkdv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, do: torch.Tensor, lse: torch.Tensor,
             delta: torch.Tensor, tokens: torch.Tensor, offsets: torch.Tensor, scale: float, block_size: int,
             chunk: int | None = None, rows: int | None = None, num_warps: int | None = None,
             keys_first: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """dk, dv over the inverted selection (`invert_blocks`). chunk: tokens per work item (0: one item a block);
    rows: tile rows (tokens x padded group); num_warps; keys_first (None each: DKDV_CHUNK, DKDV_ROWS, DKDV_WARPS,
    DKDV_KEYS_FIRST)."""
    tq, hq, d = q.shape
    tk, hkv, _ = k.shape
    g = hq // hkv
    n_blocks = triton.cdiv(tk, block_size)
    chunk = DKDV_CHUNK if chunk is None else chunk
    items, sums, n_slots = dkdv_items(offsets, n_blocks, chunk or None)
    ws = torch.empty((max(n_slots, 1), 2, block_size, d), device=q.device, dtype=torch.float32)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    tok, g_pad = tile_shape(g, DKDV_ROWS if rows is None else rows)
    num_warps = DKDV_WARPS if num_warps is None else num_warps
    extra = {} if num_warps is None else {"num_warps": num_warps}
    _bwd_dkdv_kernel[(items.shape[0],)](q, k, v, do, lse, delta, dk, dv, tokens, items, ws, tk - tq, tk, n_blocks,
                                        scale, q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0),
                                        v.stride(1), lse.stride(0), G=g, G_PAD=g_pad, TOK=tok, D=d, BLOCK=block_size,
                                        KEYS_FIRST=DKDV_KEYS_FIRST if keys_first is None else keys_first, **extra)
    if sums.shape[0]:
        _bwd_dkdv_sum_kernel[(sums.shape[0],)](ws, sums, dk, dv, tk, n_blocks, k.stride(0), k.stride(1), v.stride(0),
                                               v.stride(1), D=d, BLOCK=block_size)
    return dk, dv


def sparse_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
               lse: torch.Tensor, idx: torch.Tensor, block_size: int, scale: float, init_blocks: int, window: int,
               union: tuple | None | str = "decide") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of sparse_fwd: dq as the forward (shared tile + per-token blocks), dk/dv per key block over
    the inverted selection. union: the forward's `triton_union.choose` answer ("decide": ask again)."""
    q, k, v, o, do = _contig(q), _contig(k), _contig(v), _contig(o), _contig(do)
    idx = _contig(idx.to(torch.int32))
    tq, hq, d = q.shape
    tk, hkv, _ = k.shape
    g = hq // hkv
    g_pad = group_pad(g)
    q_start = tk - tq
    delta = row_dot(o, do)  # [Tq, hq]
    if lse.stride() != delta.stride():  # the forward's is padded (padded_empty); the kernels read both alike
        lse = torch.empty_like(delta).copy_(lse)
    dq_shared = torch.empty((tq, hq, d), device=q.device, dtype=torch.float32)
    n_qblocks = (tk - 1) // block_size - q_start // block_size + 1
    hp = shared_heads_for(g)
    _bwd_dq_shared_kernel[(n_qblocks, hq // hp)](q, k, v, do, lse, delta, dq_shared, tq, q_start, tk, window, scale,
                                                 q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0),
                                                 v.stride(1), lse.stride(0), G=g, D=d, BLOCK=block_size,
                                                 INIT=init_blocks, HP=hp)
    dq = torch.empty_like(q)
    plan = union if union != "decide" else triton_union.choose(idx[None], tq, q_start, None, block_size, init_blocks,
                                                               window)
    if plan is not None:
        triton_union.bwd_dq_union(q, k, v, idx, plan, do, lse, delta, dq_shared, dq, block_size, scale, init_blocks,
                                  window)
    nsel = idx.shape[2]
    _bwd_dq_token_kernel[(tq, hkv)](q, k, v, idx, do, lse, delta, dq_shared, dq, q_start, window, scale,
                                    q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                                    idx.stride(0), idx.stride(1), lse.stride(0), q if plan is None else plan.stats,
                                    0.0 if plan is None else plan.max_share, G=g, G_PAD=g_pad, D=d, BLOCK=block_size,
                                    nsel=nsel, NSEL_PAD=triton.next_power_of_2(max(nsel, 1)), INIT=init_blocks,
                                    UNION=plan is not None)
    pos = torch.arange(q_start, tk, device=q.device)
    blocks = full_block_list(idx, pos, block_size, init_blocks, window)
    n_blocks = triton.cdiv(tk, block_size)
    tokens, offsets = invert_blocks(blocks, n_blocks)
    dk, dv = bwd_dkdv(q, k, v, do, lse, delta, tokens, offsets, scale, block_size)
    return dq, dk, dv


class SparseAttentionFn(torch.autograd.Function):
    """Block-sparse attention with gradients to q, k, v (none through the block choice)."""

    @staticmethod
    def forward(ctx, q, k, v, idx, block_size: int, scale: float, init_blocks: int, window: int):
        # The union question asked once for both passes (its sample and counts are not repeated).
        ctx.union = triton_union.choose(idx.to(torch.int32)[None], q.shape[0], k.shape[0] - q.shape[0], None,
                                        block_size, init_blocks, window)
        o, lse = sparse_fwd(q, k, v, idx, block_size, scale, init_blocks, window, union=ctx.union)
        ctx.save_for_backward(q, k, v, o, lse, idx)
        ctx.cfg = (block_size, scale, init_blocks, window)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, idx = ctx.saved_tensors
        dq, dk, dv = sparse_bwd(do, q, k, v, o, lse, idx, *ctx.cfg, union=ctx.union)
        return dq, dk, dv, None, None, None, None, None


def block_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, idx: torch.Tensor, block_size: int,
                           scale: float, init_blocks: int, window: int) -> torch.Tensor:
    """Differentiable InfLLM v2 stage 4 -> [Tq, hq, d]: each query attends to the shared blocks
    (initial ones and the local window qb-window .. qb) and to its selected blocks `idx`."""
    return SparseAttentionFn.apply(q, k, v, idx, block_size, scale, init_blocks, window)
