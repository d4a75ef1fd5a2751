"""InfLLM v2 stage 2's per-token part for several neighbouring tokens at once (`UNION_TOKENS`; off by default).

`_fwd_token_kernel` reads each (token, KV head)'s own selected blocks for that token alone: at 128K about 62 blocks
of 32 KB per token and head, ≈ 520 GB from L2 a layer, its limit (RESULTS.md, "What holds the unmet targets").
A trained model's neighbouring tokens choose overlapping blocks (the "vertical" keys many queries attend to). Here
one program takes T consecutive tokens — T x G query rows, a larger MMA tile — and walks the union of their own
blocks in ascending order, each block loaded once, every row masked to the blocks its own token chose. A row's
result is the token kernel's: the same blocks in the same order through the same online softmax (a block its
token did not choose changes neither its running max nor its sums).

With disjoint selections (random inputs) the union is T times a token's list, so the loads are the token kernel's
and the scores are computed for T times the rows: `sparse_fwd` takes this path only when the tiles' unions hold at
most UNION_MAX_SHARE of the tokens' own blocks. It asks `likely` first — the same share over a sample of the tiles
(`sample_counts`: one small kernel, ≈ 0.1 ms at the 8B's 32K and 128K) — then `union_blocks` for every tile (one
count read back to the host each). Calls of fewer than UNION_MIN_QUERIES queries never ask. One sequence or several
(`Rows`) in one launch alike: a sequence is a row of one."""

from __future__ import annotations

import os
from collections.abc import Mapping
from contextlib import contextmanager

import torch
import triton
import triton.language as tl

from .triton_select import autotune_configs, dq_step, query_tile, row_params, softmax_step

# Tokens per program (2, 4 or 8); 0: every call takes the token kernel. Measured on the H200 (RESULTS.md,
# thirty-sixth pass; 8B shape, drawn selections, union_blocks included): T = 4 gains 1.40x / 1.65x at 32K / 128K
# where neighbours choose the same blocks (share 0.25), 1.04-1.14x at share 0.39-0.48, 0.86-1.00x at 0.58-0.63;
# T = 8 wins more at small shares (1.53x / 1.77x) but breaks even near 0.3; T = 2 at best 1.01x. Off: random-weight
# checkpoints (our benchmarks) draw independent blocks (share 0.63-0.85 at T = 4), where the path is never taken and
# the question is a pure cost (thirty-seventh pass: a declined call 0.98x, the 8B's 128K prefill 0.7-1.3 % slower);
# a trained model's "vertical" keys are what it is for (UNION_TOKENS = 4). Set for a process (and the engine
# processes it starts) by CPM4_UNION_TOKENS.


def tokens_from_env(environ: Mapping[str, str] = os.environ) -> int:
    """UNION_TOKENS as the environment gives it: CPM4_UNION_TOKENS = 0 (or unset: off), 2, 4 or 8."""
    raw = environ.get("CPM4_UNION_TOKENS", "").strip()
    if raw not in ("", "0", "2", "4", "8"):
        raise ValueError(f"CPM4_UNION_TOKENS must be 0, 2, 4 or 8 (tokens a program), got {raw!r}")
    return int(raw or 0)


UNION_TOKENS = tokens_from_env()
# The union path is taken when the tiles' union lists sum to at most this share of the tokens' own blocks (T = 4's
# break-even above, 0.48 -> 1.04x, 0.58 -> 1.00x).
UNION_MAX_SHARE = 0.5
# `likely`'s sample: every UNION_SAMPLE-th tile, at most UNION_SAMPLE_TILES of them a sequence and KV group. Calls
# of fewer queries than UNION_MIN_QUERIES take the token kernel without a host read (the path is for long prefills;
# its gains were measured at 32K and 128K).
UNION_SAMPLE = 16
UNION_SAMPLE_TILES = 256
UNION_MIN_QUERIES = 1024


@contextmanager
def forced():
    """Inside, `sparse_fwd` takes the union path whenever UNION_TOKENS is set and the tokens have own blocks, however
    few its queries (warm-up: random inputs' unions are large, so the kernel would otherwise first compile inside a
    request; benchmarks)."""
    global UNION_MAX_SHARE, UNION_MIN_QUERIES, UNION_SAMPLE
    before = UNION_MAX_SHARE, UNION_MIN_QUERIES, UNION_SAMPLE
    UNION_MAX_SHARE, UNION_MIN_QUERIES, UNION_SAMPLE = float("inf"), 0, 1
    try:
        yield
    finally:
        UNION_MAX_SHARE, UNION_MIN_QUERIES, UNION_SAMPLE = before


def union_blocks(idx: torch.Tensor, table: torch.Tensor, block_size: int, init_blocks: int, window: int,
                 tokens: int) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """The union of each tile's own blocks. idx [R, hkv, Tq, K] (sorted ascending, -1 padded); table int32 [>= 2, R]
    on idx's device: each sequence's queries (its first rows of idx; the rest never read) and its first query's
    position (`Rows.table`'s first two rows); a token's own blocks are init_blocks <= b < its block - window.
    Tiles are `tokens` consecutive queries from query 0. Returns (union [R, hkv, tiles, W] int32, each row ascending
    then -1; counts [R, hkv, tiles] int32; the unions' blocks in all; the tokens' own blocks in all): one launch of
    `_union_kernel` and one read back to the host."""
    _check_tokens(tokens)
    r, hkv, tq, nsel = idx.shape
    tiles = triton.cdiv(tq, tokens)
    nsel_pad = triton.next_power_of_2(max(nsel, 1))
    rows = torch.empty(r, hkv, tiles, tokens * nsel_pad, dtype=torch.int32, device=idx.device)
    counts = torch.empty(r, hkv, tiles, dtype=torch.int32, device=idx.device)
    stats = torch.zeros(3, dtype=torch.int64, device=idx.device)
    if tiles:
        _union_kernel[(tiles, hkv * r)](
            idx, table, rows, counts, stats, r, hkv, window, idx.stride(0), idx.stride(1), idx.stride(2),
            rows.stride(0), rows.stride(1), rows.stride(2), counts.stride(0), counts.stride(1), nsel,
            NSEL_PAD=nsel_pad, INIT=init_blocks, BLOCK=block_size, T=tokens)
    width, total, own = stats.tolist()
    return rows[..., :max(width, 1)].contiguous(), counts, total, own


@triton.jit(do_not_specialize=["n_rows", "window", "nsel"])
def _union_kernel(blk_ptr, rows_ptr, un_ptr, cnt_ptr, stats_ptr, n_rows, n_groups, window, stride_bb, stride_bh,
                  stride_bt, stride_ub, stride_uh, stride_ut, stride_cb, stride_ch, nsel, NSEL_PAD: tl.constexpr,
                  INIT: tl.constexpr, BLOCK: tl.constexpr, T: tl.constexpr):
    """Tile program_id(0) of sequence b, KV group g (grid axis 1): its T tokens' own blocks sorted (one list of
    T x NSEL_PAD), each block's repeats dropped (the sorted list stored, then read one place back), the rest
    compacted to the front of its union row and -1 after; its count; stats += (max count, counts, own blocks)."""
    pid = tl.program_id(0)
    b, g, tq, q_start, _ = row_params(rows_ptr, n_rows, tl.program_id(1), n_groups, 1)
    tt = pid * T + tl.arange(0, T)
    kk = tl.arange(0, NSEL_PAD)
    sel = tl.load(blk_ptr + b * stride_bb + g * stride_bh + tt[:, None] * stride_bt + kk[None, :],
                  mask=(tt < tq)[:, None] & (kk < nsel)[None, :], other=-1)
    sel = _own(sel, (q_start + tt)[:, None], window, INIT, BLOCK)
    n_own = tl.sum(tl.sum((sel >= 0).to(tl.int64), 1), 0)
    N: tl.constexpr = T * NSEL_PAD
    big = 2147483647
    v = tl.sort(tl.reshape(tl.where(sel >= 0, sel, big), [N]))
    i = tl.arange(0, N)
    row = un_ptr + b * stride_ub + g * stride_uh + pid * stride_ut
    tl.store(row + i, v)
    tl.debug_barrier()  # the sorted list visible to every thread of the program
    prev = tl.load(row + i - 1, mask=i > 0, other=-1)
    tl.debug_barrier()  # every thread has read it before the row is rewritten
    keep = (v != prev) & (v != big)
    n_u = tl.sum(keep.to(tl.int32), 0)
    tl.store(row + tl.cumsum(keep.to(tl.int32), 0) - 1, v, mask=keep)
    tl.store(row + i, tl.full((N,), -1, dtype=tl.int32), mask=i >= n_u)
    tl.store(cnt_ptr + b * stride_cb + g * stride_ch + pid, n_u)
    tl.atomic_max(stats_ptr, n_u.to(tl.int64))
    tl.atomic_add(stats_ptr + 1, n_u.to(tl.int64))
    tl.atomic_add(stats_ptr + 2, n_own)


def likely(idx: torch.Tensor, table: torch.Tensor, block_size: int, init_blocks: int, window: int, tokens: int,
           every: int | None = None) -> bool:
    """`take_union` over every `every`-th tile only (default `sample_every`; 1: exactly `union_blocks`'s
    decision): whether the whole count is worth making."""
    every = every or sample_every(idx.shape[2], tokens)
    return take_union(*sample_counts(idx, table, block_size, init_blocks, window, tokens, every))


def sample_every(tq: int, tokens: int) -> int:
    """`likely`'s stride over the tiles of tq queries: every UNION_SAMPLE-th tile, at most UNION_SAMPLE_TILES of a
    sequence's KV group (the sample's cost grows with its tiles: on the H200, 8B shape, 0.15 ms for 512 at 32K,
    0.40 ms for 2,048 at 128K)."""
    return max(UNION_SAMPLE, triton.cdiv(triton.cdiv(tq, tokens), UNION_SAMPLE_TILES))


def sample_counts(idx: torch.Tensor, table: torch.Tensor, block_size: int, init_blocks: int, window: int,
                  tokens: int, every: int) -> tuple[int, int]:
    """`union_blocks`'s (the unions' blocks in all, the tokens' own blocks in all) over tiles 0, every, 2 every, ...
    only: one launch of `_count_kernel` (no sort; only those tiles' selections read) and one read back to the host
    (measured on the H200 at 32K, 8B shape: the torch sorts it replaces took 0.41 ms for a sixteenth). Its own
    kernel rather than `_union_kernel` over a stride: the sample needs only the counts, so no sort and no stores."""
    _check_tokens(tokens)
    r, hkv, tq, nsel = idx.shape
    out = torch.zeros(2, dtype=torch.int64, device=idx.device)
    _count_kernel[(triton.cdiv(triton.cdiv(tq, tokens), every), hkv * r)](
        idx, table, out, r, hkv, window, every, idx.stride(0), idx.stride(1), idx.stride(2), nsel,
        NSEL_PAD=triton.next_power_of_2(max(nsel, 1)), INIT=init_blocks, BLOCK=block_size, T=tokens)
    total, own = out.tolist()
    return total, own


def _check_tokens(tokens: int) -> None:
    if tokens not in (2, 4, 8):  # (16 x 16 query rows would not fit a program's registers)
        raise ValueError(f"UNION_TOKENS must be 2, 4 or 8 (tokens a program), got {tokens}")


@triton.jit
def _own(sel, pos, window, INIT: tl.constexpr, BLOCK: tl.constexpr):
    """Selected blocks `sel` of the query at `pos` (broadcast to sel) kept where they are its own blocks
    (init <= b < its block - window), -2 (matching no block) elsewhere."""
    return tl.where((sel >= INIT) & (sel < pos // BLOCK - window), sel, -2)


@triton.jit
def _own_row(blk_row, t, tq, q_start, window, nsel, kk, stride_bt, INIT: tl.constexpr, BLOCK: tl.constexpr):
    """Token t's own blocks (`_own`; a token past the sequence's: none)."""
    sel = tl.load(blk_row + t * stride_bt + kk, mask=(kk < nsel) & (t + kk * 0 < tq), other=-1)
    return _own(sel, q_start + t, window, INIT, BLOCK)


@triton.jit(do_not_specialize=["n_rows", "window", "every", "nsel"])
def _count_kernel(blk_ptr, rows_ptr, out_ptr, n_rows, n_groups, window, every, stride_bb, stride_bh, stride_bt, nsel,
                  NSEL_PAD: tl.constexpr, INIT: tl.constexpr, BLOCK: tl.constexpr, T: tl.constexpr):
    """Tile program_id(0) x every of sequence b, KV group g (grid axis 1): its union's size — each token's own
    blocks that no earlier token of the tile chose (a token's list holds a block once) — and its tokens' own blocks
    in all, added to out[0] and out[1]."""
    b, g, tq, q_start, _ = row_params(rows_ptr, n_rows, tl.program_id(1), n_groups, 1)
    blk_row = blk_ptr + b * stride_bb + g * stride_bh
    t0 = tl.program_id(0) * every * T
    kk = tl.arange(0, NSEL_PAD)
    union = tl.zeros((), dtype=tl.int64)
    own = tl.zeros((), dtype=tl.int64)
    for i in tl.static_range(T):
        sel = _own_row(blk_row, t0 + i, tq, q_start, window, nsel, kk, stride_bt, INIT, BLOCK)
        first = sel >= 0
        own += tl.sum(first.to(tl.int64))
        for j in tl.static_range(i):
            seen = _own_row(blk_row, t0 + j, tq, q_start, window, nsel, kk, stride_bt, INIT, BLOCK)
            first = first & (tl.max((sel[:, None] == seen[None, :]).to(tl.int32), 1) == 0)
        union += tl.sum(first.to(tl.int64))
    tl.atomic_add(out_ptr, union)
    tl.atomic_add(out_ptr + 1, own)


def choose(idx: torch.Tensor, tq: int, q_start: int, table: torch.Tensor | None, block_size: int, init_blocks: int,
           window: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """The union path's decision for a call of stage 2 (forward or dq): None (the token kernel) unless UNION_TOKENS
    is set, the call has UNION_MIN_QUERIES queries, `likely` accepts and the whole count passes `take_union`; else
    (union, counts, table) for `fwd_union` / `bwd_dq_union`. idx [R, hkv, Tq, K]; table: `Rows.table` or None (one
    sequence of tq queries from q_start)."""
    tokens = UNION_TOKENS
    if not tokens or tq < UNION_MIN_QUERIES:
        return None
    if table is None:
        table = torch.tensor([[tq], [q_start]], dtype=torch.int32).to(idx.device)
    if UNION_SAMPLE > 1 and not likely(idx, table, block_size, init_blocks, window, tokens):  # (1: the count decides)
        return None
    union, counts, total, own = union_blocks(idx, table, block_size, init_blocks, window, tokens)
    return (union, counts, table) if take_union(total, own) else None


def take_union(total: int, own: int) -> bool:
    """Whether the tiles' unions (total blocks) are small enough against the tokens' own blocks
    (`UNION_MAX_SHARE`)."""
    return own > 0 and total <= UNION_MAX_SHARE * own


@triton.jit
def _tile_bits(blk_row, stride_bt, row, bits_row, n_u, pid, tq, q_start, window, nsel, NSEL_PAD: tl.constexpr,
               INIT: tl.constexpr, BLOCK: tl.constexpr, T: tl.constexpr):
    """For each of the tile's n_u union blocks (row), which of its T tokens chose it, as bits (bit i: token i) into
    bits_row: the loops over the union test each query row's bit in the tile's own layout (a [T] vector broadcast
    to the rows there would be a layout conversion every block). blk_row: the KV group's selections [Tq, K]."""
    # The T tokens' own blocks (the others -2, matching no block).
    tt = pid * T + tl.arange(0, T)
    kk = tl.arange(0, NSEL_PAD)
    sel = tl.load(blk_row + tt[:, None] * stride_bt + kk[None, :], mask=(tt < tq)[:, None] & (kk < nsel)[None, :],
                  other=-1)
    sel = _own(sel, (q_start + tt)[:, None], window, INIT, BLOCK)
    for u in range(0, n_u):
        blk = tl.load(row + u)
        chose = tl.max((sel == blk).to(tl.int32), 1)
        tl.store(bits_row + u, tl.sum(chose << tl.arange(0, T), 0))
    tl.debug_barrier()  # the bits stored above, visible to every thread of the program


@triton.jit
def _union_block(row, bits_row, u, lane, k_ptr, v_ptr, g, dd, kk0, stride_kt, stride_kh, stride_vt, stride_vh,
                 BLOCK: tl.constexpr):
    """The tile's u-th union block: (each query row's mask — its own token chose the block; own blocks lie before
    the window, so no causal mask —, keys, values) of KV group g."""
    keys = tl.load(row + u) * BLOCK + kk0
    mine = ((tl.load(bits_row + u) >> lane) & 1) > 0
    k = tl.load(k_ptr + keys[:, None] * stride_kt + g * stride_kh + dd[None, :])
    v = tl.load(v_ptr + keys[:, None] * stride_vt + g * stride_vh + dd[None, :])
    return mine[:, None] & (kk0 >= 0)[None, :], k, v


@triton.autotune(configs=autotune_configs(warps=(4, 8), stages=(2, 3)), key=["D", "G_PAD", "BLOCK", "NSEL_PAD", "T"])
@triton.jit(do_not_specialize=["n_rows", "nsel"])
def _fwd_union_kernel(q_ptr, k_ptr, v_ptr, blk_ptr, un_ptr, bits_ptr, cnt_ptr, os_ptr, ls_ptr, o_ptr, lse_ptr,
                      rows_ptr, n_rows, n_groups, window, sm_scale, stride_qb, stride_qt, stride_qh, stride_kb,
                      stride_kt, stride_kh, stride_vb, stride_vt, stride_vh, stride_bb, stride_bh, stride_bt,
                      stride_ub, stride_uh, stride_ut, stride_cb, stride_ch, stride_osb, stride_lsb, stride_ob,
                      stride_ot, stride_oh, stride_lb, stride_lt,
                      G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr, nsel,
                      NSEL_PAD: tl.constexpr, INIT: tl.constexpr, T: tl.constexpr):
    """Continues the shared part's softmax state of T tokens x the G heads of KV group g (rows of T * G_PAD) of
    sequence b (grid axis 1: sequences x groups; rows_ptr: `union_blocks`'s table) with the union of the tokens' own
    blocks. bits: scratch shaped as the union, for each block the tokens that chose it (bit i: token i of the
    tile). A tile past a shorter sequence's queries has an empty union and stores nothing."""
    pid = tl.program_id(0)
    b, g, tq, q_start, _ = row_params(rows_ptr, n_rows, tl.program_id(1), n_groups, 1)
    q_ptr += b * stride_qb
    k_ptr += b * stride_kb
    v_ptr += b * stride_vb
    blk_ptr += b * stride_bb
    os_ptr += b * stride_osb
    ls_ptr += b * stride_lsb
    o_ptr += b * stride_ob
    lse_ptr += b * stride_lb
    q, ti, hi, rm = query_tile(q_ptr, pid, g, tq, stride_qt, stride_qh, G, G_PAD, T, D)
    dd = tl.arange(0, D)
    qoff = ti[:, None] * stride_qt + hi[:, None] * stride_qh + dd[None, :]
    acc = tl.load(os_ptr + qoff, mask=rm[:, None], other=0.0)
    m_i = tl.load(ls_ptr + ti * stride_lt + hi, mask=rm, other=float("-inf"))
    l_i = tl.where(m_i > float("-inf"), 1.0, 0.0)
    n_u = tl.load(cnt_ptr + b * stride_cb + g * stride_ch + pid)
    row = un_ptr + b * stride_ub + g * stride_uh + pid * stride_ut
    bits_row = bits_ptr + b * stride_ub + g * stride_uh + pid * stride_ut
    _tile_bits(blk_ptr + g * stride_bh, stride_bt, row, bits_row, n_u, pid, tq, q_start, window, nsel, NSEL_PAD,
               INIT, BLOCK, T)
    lane = ti - pid * T  # each row's token within the tile
    qk_scale = sm_scale * 1.4426950408889634
    kk0 = tl.arange(0, BLOCK)
    for u in tl.range(0, n_u):
        mask, k, v = _union_block(row, bits_row, u, lane, k_ptr, v_ptr, g, dd, kk0, stride_kt, stride_kh, stride_vt,
                                  stride_vh, BLOCK)
        m_i, l_i, acc = softmax_step(q, k, v, mask, m_i, l_i, acc, qk_scale)
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    out = (acc / l_safe[:, None]).to(o_ptr.dtype.element_ty)
    tl.store(o_ptr + ti[:, None] * stride_ot + hi[:, None] * stride_oh + dd[None, :], out, mask=rm[:, None])
    lse = tl.where(l_i > 0, (m_i + tl.log2(l_safe)) / 1.4426950408889634, float("-inf"))
    tl.store(lse_ptr + ti * stride_lt + hi, lse, mask=rm)


def fwd_union(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, idx: torch.Tensor, union: torch.Tensor,
              counts: torch.Tensor, table: torch.Tensor, o_shared: torch.Tensor, lse_shared: torch.Tensor,
              o: torch.Tensor, lse: torch.Tensor, block_size: int, scale: float, init_blocks: int, window: int,
              tokens: int) -> None:
    """Sequences as `sparse_fwd`'s rows (q [R, Tq, hq, d], k/v [R, Tk, hkv, d], idx [R, hkv, Tq, K] int32; table
    and union, counts: `union_blocks`'s): o [R, Tq, hq, d], lse [R, Tq, hq] for each sequence's queries from the
    shared part's (o_shared, lse_shared: `sparse_fwd`'s intermediates, laid out as q) and the unions."""
    r, tq, hq, d = q.shape
    hkv = k.shape[2]
    nsel = idx.shape[3]
    bits = torch.empty_like(union)
    _fwd_union_kernel[(union.shape[2], hkv * r)](
        q, k, v, idx, union, bits, counts, o_shared, lse_shared, o, lse, table, r, hkv, window, scale,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1),
        v.stride(2), idx.stride(0), idx.stride(1), idx.stride(2), union.stride(0), union.stride(1), union.stride(2),
        counts.stride(0), counts.stride(1), o_shared.stride(0), lse_shared.stride(0), o.stride(0), o.stride(1),
        o.stride(2), lse.stride(0), lse.stride(1),
        G=hq // hkv, G_PAD=max(16, triton.next_power_of_2(hq // hkv)), D=d, BLOCK=block_size, nsel=nsel,
        NSEL_PAD=triton.next_power_of_2(max(nsel, 1)), INIT=init_blocks, T=tokens)


@triton.autotune(configs=autotune_configs(warps=(4, 8), stages=(2, 3)), key=["D", "G_PAD", "BLOCK", "NSEL_PAD", "T"])
@triton.jit(do_not_specialize=["tq", "q_start", "nsel"])
def _bwd_dq_union_kernel(q_ptr, k_ptr, v_ptr, blk_ptr, un_ptr, bits_ptr, cnt_ptr, do_ptr, lse_ptr, delta_ptr, dqs_ptr,
                         dq_ptr, tq, q_start, window, sm_scale, stride_qt, stride_qh, stride_kt, stride_kh, stride_vt,
                         stride_vh, stride_bh, stride_bt, stride_uh, stride_ut, stride_ch, stride_lt,
                         G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr, nsel,
                         NSEL_PAD: tl.constexpr, INIT: tl.constexpr, T: tl.constexpr):
    """The dq pass's own blocks as `_fwd_union_kernel` walks them (one sequence): T tokens x the G heads of KV group
    g over the union of their own blocks, each row's p masked to its own token's choice, added to the shared part's
    dq (dqs, fp32) — the token kernel's `_bwd_dq_token_kernel` result."""
    pid = tl.program_id(0)
    g = tl.program_id(1)
    q, ti, hi, rm = query_tile(q_ptr, pid, g, tq, stride_qt, stride_qh, G, G_PAD, T, D)
    dd = tl.arange(0, D)
    qoff = ti[:, None] * stride_qt + hi[:, None] * stride_qh + dd[None, :]
    do = tl.load(do_ptr + qoff, mask=rm[:, None], other=0.0)
    # Rows outside the queries: lse +inf, so their p is 0 in every block.
    lse = tl.load(lse_ptr + ti * stride_lt + hi, mask=rm, other=float("inf")) * 1.4426950408889634
    delta = tl.load(delta_ptr + ti * stride_lt + hi, mask=rm, other=0.0)
    n_u = tl.load(cnt_ptr + g * stride_ch + pid)
    row = un_ptr + g * stride_uh + pid * stride_ut
    bits_row = bits_ptr + g * stride_uh + pid * stride_ut
    _tile_bits(blk_ptr + g * stride_bh, stride_bt, row, bits_row, n_u, pid, tq, q_start, window, nsel, NSEL_PAD,
               INIT, BLOCK, T)
    lane = ti - pid * T
    qk_scale = sm_scale * 1.4426950408889634
    dq = tl.zeros((T * G_PAD, D), dtype=tl.float32)
    kk0 = tl.arange(0, BLOCK)
    for u in tl.range(0, n_u):
        mask, k, v = _union_block(row, bits_row, u, lane, k_ptr, v_ptr, g, dd, kk0, stride_kt, stride_kh, stride_vt,
                                  stride_vh, BLOCK)
        dq = dq_step(q, do, k, v, mask, lse, delta, dq, qk_scale)
    dq = dq * sm_scale + tl.load(dqs_ptr + qoff, mask=rm[:, None], other=0.0)
    tl.store(dq_ptr + qoff, dq.to(dq_ptr.dtype.element_ty), mask=rm[:, None])


def bwd_dq_union(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, idx: torch.Tensor, union: torch.Tensor,
                 counts: torch.Tensor, do: torch.Tensor, lse: torch.Tensor, delta: torch.Tensor,
                 dq_shared: torch.Tensor, dq: torch.Tensor, block_size: int, scale: float, init_blocks: int,
                 window: int, tokens: int) -> None:
    """`sparse_bwd`'s per-token dq over the unions (one sequence: q/do/dq/dq_shared [Tq, hq, d] contiguous, k/v
    [Tk, hkv, d], idx [hkv, Tq, K] int32, lse/delta [Tq, hq] alike; union, counts: `union_blocks`'s for idx[None])
    into dq."""
    tq, hq, d = q.shape
    tk, hkv, _ = k.shape
    nsel = idx.shape[2]
    union, counts = union[0], counts[0]
    bits = torch.empty_like(union)
    _bwd_dq_union_kernel[(union.shape[1], hkv)](
        q, k, v, idx, union, bits, counts, do, lse, delta, dq_shared, dq, tq, tk - tq, window, scale, q.stride(0),
        q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), idx.stride(0), idx.stride(1),
        union.stride(0), union.stride(1), counts.stride(0), lse.stride(0),
        G=hq // hkv, G_PAD=max(16, triton.next_power_of_2(hq // hkv)), D=d, BLOCK=block_size, nsel=nsel,
        NSEL_PAD=triton.next_power_of_2(max(nsel, 1)), INIT=init_blocks, T=tokens)
