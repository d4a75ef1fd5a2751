"""InfLLM v2 stage 2's per-token part for several neighbouring tokens at once (`UNION_TOKENS`; 4 by default).

`_fwd_token_kernel` reads each (token, KV head)'s own selected blocks for that token alone: at 128K about 62 blocks
of 32 KB per token and head, ≈ 520 GB from L2 a layer, its limit (RESULTS.md, "What holds the unmet targets").
A trained model's neighbouring tokens choose overlapping blocks (the "vertical" keys many queries attend to). Here
one program takes T consecutive tokens — T x G query rows, a larger MMA tile — and walks the union of their own
blocks in ascending order, each block loaded once, every row masked to the blocks its own token chose. A row's
result is the token kernel's: the same blocks in the same order through the same online softmax (a block its
token did not choose changes neither its running max nor its sums).

With disjoint selections (random inputs) the union is T times a token's list, so the loads are the token kernel's
and the scores are computed for T times the rows: the path pays only when the tiles' unions hold at most
UNION_MAX_SHARE of the tokens' own blocks. The question is answered on the device, with no read back to the host
(`choose`): a sample of the tiles counted (`_count_kernel`, ≈ 0.1 ms at the 8B's 128K), then, only if the sample
passes, every tile's union (`_union_kernel`), whose totals in `stats` decide; the token kernel and the union kernel
are both launched and each reads `stats` first (`_taken`), one of them returning at once. Calls of fewer than
UNION_MIN_QUERIES queries never ask. One sequence or several (`Rows`) in one launch alike: a sequence is a row of
one."""

from __future__ import annotations

import os
from collections.abc import Mapping
from contextlib import contextmanager
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .triton_select import dq_step, group_pad, query_tile, row_params, softmax_step

# Tokens per program (2, 4 or 8); 0: every call takes the token kernel. Measured on the H200 (RESULTS.md,
# thirty-sixth to thirty-ninth passes; 8B shape, drawn selections, the count included): T = 4 gains 1.6-1.7x at 32K /
# 128K where neighbours choose the same blocks (share 0.25), 1.04-1.14x at share 0.39-0.48, 0.86-1.00x at 0.58-0.63;
# T = 8 wins more at small shares but breaks even near 0.3; T = 2 at best 1.01x. On (4) by default since the decision
# moved to the device (thirty-ninth pass): on random inputs (independent draws, share 0.63-0.85, never taken) a call
# costs 0.99x of the token kernel alone and the 8B's 128K prefill 0.3 % (inside its run-to-run spread), while a
# trained model's "vertical" keys take it. CPM4_UNION_TOKENS=0 turns it off for a process (and the engine processes
# it starts).


def tokens_from_env(environ: Mapping[str, str] = os.environ) -> int:
    """UNION_TOKENS as the environment gives it: CPM4_UNION_TOKENS = 0 (off), 2, 4 or 8; unset: 4."""
    raw = environ.get("CPM4_UNION_TOKENS", "").strip()
    if raw not in ("", "0", "2", "4", "8"):
        raise ValueError(f"CPM4_UNION_TOKENS must be 0, 2, 4 or 8 (tokens a program), got {raw!r}")
    return int(raw or 4)


UNION_TOKENS = tokens_from_env()
# The union path is taken when the tiles' union lists sum to at most this share of the tokens' own blocks (T = 4's
# break-even above, 0.48 -> 1.04x, 0.58 -> 1.00x).
UNION_MAX_SHARE = 0.5
# `choose`'s sample: every UNION_SAMPLE-th tile, at most UNION_SAMPLE_TILES of them a sequence and KV group. Calls
# of fewer queries than UNION_MIN_QUERIES make no plan (the path is for long prefills; its gains were measured at
# 32K and 128K).
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


@contextmanager
def declined():
    """Inside, `choose` makes no plan however many queries a call has (warm-up: the token kernel's variant without
    a plan, which calls of fewer than UNION_MIN_QUERIES queries take)."""
    global UNION_MIN_QUERIES
    before = UNION_MIN_QUERIES
    UNION_MIN_QUERIES = float("inf")
    try:
        yield
    finally:
        UNION_MIN_QUERIES = before


class Plan(NamedTuple):
    """`choose`'s answer for a call of stage 2, all on the device: the tiles' unions [R, hkv, tiles, T x NSEL_PAD]
    (each row ascending, then -1; written only where the sample passed), their counts [R, hkv, tiles], `Rows`'s
    table, stats int64 [3] (the widest union, the unions' blocks in all, the tokens' own blocks in all: zero where the
    sample declined) and the share it is judged by (UNION_MAX_SHARE when asked, so the backward decides as the
    forward did). The union kernels and the token kernels read stats (`_taken`): one of them does the work."""

    union: torch.Tensor
    counts: torch.Tensor
    table: torch.Tensor
    stats: torch.Tensor
    max_share: float
    tokens: int


def union_blocks(idx: torch.Tensor, table: torch.Tensor, block_size: int, init_blocks: int, window: int,
                 tokens: int) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """The union of each tile's own blocks. idx [R, hkv, Tq, K] (sorted ascending, -1 padded); table int32 [>= 2, R]
    on idx's device: each sequence's queries (its first rows of idx; the rest never read) and its first query's
    position (`Rows.table`'s first two rows); a token's own blocks are init_blocks <= b < its block - window.
    Tiles are `tokens` consecutive queries from query 0. Returns (union [R, hkv, tiles, W] int32, each row ascending
    then -1; counts [R, hkv, tiles] int32; the unions' blocks in all; the tokens' own blocks in all): `count_unions`
    and one read back to the host (tests, benchmarks; `choose` reads nothing back)."""
    rows, counts, stats = count_unions(idx, table, block_size, init_blocks, window, tokens)
    width, total, own = stats.tolist()
    return rows[..., :max(width, 1)].contiguous(), counts, total, own


def count_unions(idx: torch.Tensor, table: torch.Tensor, block_size: int, init_blocks: int, window: int,
                 tokens: int, sample: torch.Tensor | None = None, max_share: float = 0.0
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`union_blocks` left on the device: (union [R, hkv, tiles, T x NSEL_PAD], counts, stats [3] int64), one launch
    of `_union_kernel`. sample: `sample_stats`'s counts; where given, the kernel counts only if they pass `_taken`
    with max_share (else every program returns at once: stats stay zero, union and counts unwritten)."""
    _check_tokens(tokens)
    r, hkv, tq, nsel = idx.shape
    tiles = triton.cdiv(tq, tokens)
    nsel_pad = triton.next_power_of_2(max(nsel, 1))
    rows = torch.empty(r, hkv, tiles, tokens * nsel_pad, dtype=torch.int32, device=idx.device)
    counts = torch.empty(r, hkv, tiles, dtype=torch.int32, device=idx.device)
    stats = torch.zeros(3, dtype=torch.int64, device=idx.device)
    if tiles:
        _union_kernel[(tiles, hkv * r)](
            idx, table, rows, counts, stats, stats if sample is None else sample, max_share, r, hkv, window,
            idx.stride(0), idx.stride(1), idx.stride(2), rows.stride(0), rows.stride(1), rows.stride(2),
            counts.stride(0), counts.stride(1), nsel, NSEL_PAD=nsel_pad, INIT=init_blocks, BLOCK=block_size, T=tokens,
            SAMPLED=sample is not None)
    return rows, counts, stats


@triton.jit
def _taken(stats_ptr, max_share):
    """`take_union` on the device: stats[1] (the unions' blocks in all) against stats[2] (the tokens' own)."""
    total = tl.load(stats_ptr + 1).to(tl.float64)
    own = tl.load(stats_ptr + 2)
    return (own > 0) & (total <= own.to(tl.float64) * max_share)


@triton.jit(do_not_specialize=["n_rows", "window", "nsel"])
def _union_kernel(blk_ptr, rows_ptr, un_ptr, cnt_ptr, stats_ptr, sample_ptr, max_share, n_rows, n_groups, window,
                  stride_bb, stride_bh, stride_bt, stride_ub, stride_uh, stride_ut, stride_cb, stride_ch, nsel,
                  NSEL_PAD: tl.constexpr, INIT: tl.constexpr, BLOCK: tl.constexpr, T: tl.constexpr,
                  SAMPLED: tl.constexpr):
    """Tile program_id(0) of sequence b, KV group g (grid axis 1): its T tokens' own blocks sorted (one list of
    T x NSEL_PAD), each block's repeats dropped (the sorted list stored, then read one place back), the rest
    compacted to the front of its union row and -1 after; its count; stats += (max count, counts, own blocks).
    SAMPLED: nothing unless the sample's counts (sample_ptr, laid out as stats) pass `_taken`."""
    if SAMPLED:
        if not _taken(sample_ptr, max_share):
            return
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
    decision), read back to the host: whether the whole count is worth making (tests, benchmarks; `choose` asks the
    same on the device)."""
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
    only: `sample_stats` and one read back to the host (tests, benchmarks)."""
    _, total, own = sample_stats(idx, table, block_size, init_blocks, window, tokens, every).tolist()
    return total, own


def sample_stats(idx: torch.Tensor, table: torch.Tensor, block_size: int, init_blocks: int, window: int,
                 tokens: int, every: int) -> torch.Tensor:
    """int64 [3] laid out as `count_unions`'s stats (0, the sampled unions' blocks, their tokens' own blocks), on the
    device: one launch of `_count_kernel` (no sort; only the sampled tiles' selections read; measured on the H200 at
    32K, 8B shape: the torch sorts it replaces took 0.41 ms for a sixteenth). Its own kernel rather than
    `_union_kernel` over a stride: the sample needs only the counts, so no sort and no stores."""
    _check_tokens(tokens)
    r, hkv, tq, nsel = idx.shape
    out = torch.zeros(3, dtype=torch.int64, device=idx.device)
    _count_kernel[(triton.cdiv(triton.cdiv(tq, tokens), every), hkv * r)](
        idx, table, out, r, hkv, window, every, idx.stride(0), idx.stride(1), idx.stride(2), nsel,
        NSEL_PAD=triton.next_power_of_2(max(nsel, 1)), INIT=init_blocks, BLOCK=block_size, T=tokens)
    return out


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
    in all, added to out[1] and out[2] (`_taken`'s layout)."""
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
    tl.atomic_add(out_ptr + 1, union)
    tl.atomic_add(out_ptr + 2, own)


def choose(idx: torch.Tensor, tq: int, q_start: int, table: torch.Tensor | None, block_size: int, init_blocks: int,
           window: int) -> Plan | None:
    """The union path's question for a call of stage 2 (forward or dq), asked on the device: None (the token kernel
    alone) unless UNION_TOKENS is set and the call has UNION_MIN_QUERIES queries; else a `Plan`: the sample
    (`sample_stats`, every `sample_every`-th tile; UNION_SAMPLE 1: none, the whole count decides) and the whole count
    behind it (`count_unions`, which returns at once where the sample declined). Nothing is read back: the caller
    launches both `fwd_union` / `bwd_dq_union` and the token kernel with the plan's stats, and one of them returns
    at once (`taken`: the answer on the host). idx [R, hkv, Tq, K]; table: `Rows.table` or None (one sequence of tq
    queries from q_start)."""
    tokens = UNION_TOKENS
    if not tokens or tq < UNION_MIN_QUERIES:
        return None
    if table is None:  # filled on the device: a copy from the host would wait for the stream (a pageable copy)
        table = torch.empty(2, 1, dtype=torch.int32, device=idx.device)
        table[0].fill_(tq)
        table[1].fill_(q_start)
    sample = None
    if UNION_SAMPLE > 1:
        sample = sample_stats(idx, table, block_size, init_blocks, window, tokens, sample_every(idx.shape[2], tokens))
    union, counts, stats = count_unions(idx, table, block_size, init_blocks, window, tokens, sample, UNION_MAX_SHARE)
    return Plan(union, counts, table, stats, UNION_MAX_SHARE, tokens)


def taken(plan: Plan | None) -> bool:
    """Whether the union kernels did (or will do) a call's work under `plan`: its stats read back to the host and
    judged by `take_union` as the kernels judge them (`_taken`)."""
    if plan is None:
        return False
    _, total, own = plan.stats.tolist()
    return take_union(total, own, plan.max_share)


def take_union(total: int, own: int, max_share: float | None = None) -> bool:
    """Whether the tiles' unions (total blocks) are small enough against the tokens' own blocks (max_share, default
    UNION_MAX_SHARE). The kernels' copy of this rule is `_taken`."""
    share = UNION_MAX_SHARE if max_share is None else max_share
    return own > 0 and total <= share * own


# The union kernels' launch (warps, stages): fixed rather than autotuned, as a call's plan is unknown on the host (an
# autotuner timing a declined call would time programs that return at once). Measured on the H200 (8B shape, forced,
# 32K / 128K, RESULTS.md thirty-ninth pass): T = 4 with 4 warps 8.5-8.7 / 38.4-38.5 ms, 8 warps 11.8-12.0 / 50.5-51.3;
# T = 8 with 4 warps 8.3 ms at 32K, 8 warps 9.8; the stages within 3 %. benchmarks/stage2_union.py --configs sets it.
UNION_LAUNCH: tuple[int, int] = (4, 2)


def launch_config() -> dict:
    """num_warps / num_stages of the union kernels (UNION_LAUNCH; one stage in the interpreter)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return {"num_warps": 4, "num_stages": 1}
    warps, stages = UNION_LAUNCH
    return {"num_warps": warps, "num_stages": stages}


def _launch(kernel, grid: tuple, args: tuple, consts: dict) -> None:
    """kernel[grid](*args, **consts) at `launch_config`, or with one stage where that needs more shared memory than
    the GPU has (head dim 256 on a GPU of ~100 KB a block: an autotuner would have skipped the config; a fixed
    launch must not fail a request). The fallback is remembered per kernel and constants."""
    config = launch_config()
    key = (id(kernel), tuple(sorted(consts.items())), config["num_warps"], config["num_stages"])
    if _ONE_STAGE.get(key):
        config = {**config, "num_stages": 1}
    try:
        kernel[grid](*args, **consts, **config)
    except triton.runtime.errors.OutOfResources:
        if config["num_stages"] == 1:
            raise
        _ONE_STAGE[key] = True
        kernel[grid](*args, **consts, **{**config, "num_stages": 1})


_ONE_STAGE: dict[tuple, bool] = {}


def decline_while_tuning(nargs: dict, reset_only: bool = False, **_) -> None:
    """Autotuner pre-hook of the token kernels: while the autotuner times one with a plan (UNION), its stats read as
    declined, so the timings are of the real work and not of programs returning at once (the union kernel, launched
    before, already wrote the same outputs). `restore_after_tuning` puts them back."""
    if reset_only or not nargs.get("UNION"):
        return
    stats = nargs["un_ptr"]
    _saved[stats.data_ptr()] = stats.clone()
    stats.zero_()


def restore_after_tuning(nargs: dict, exception: BaseException | None = None, **_) -> None:
    """Autotuner post-hook: `decline_while_tuning`'s stats back."""
    if not nargs.get("UNION"):
        return
    stats = nargs["un_ptr"]
    saved = _saved.pop(stats.data_ptr(), None)
    if saved is not None:
        stats.copy_(saved)


_saved: dict[int, torch.Tensor] = {}
TUNING_HOOKS = {"pre_hook": decline_while_tuning, "post_hook": restore_after_tuning}


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


@triton.jit(do_not_specialize=["n_rows", "nsel"])
def _fwd_union_kernel(q_ptr, k_ptr, v_ptr, blk_ptr, un_ptr, bits_ptr, cnt_ptr, stats_ptr, max_share, os_ptr, ls_ptr,
                      o_ptr, lse_ptr, rows_ptr, n_rows, n_groups, window, sm_scale, stride_qb, stride_qt, stride_qh,
                      stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh, stride_bb, stride_bh, stride_bt,
                      stride_ub, stride_uh, stride_ut, stride_cb, stride_ch, stride_osb, stride_lsb, stride_ob,
                      stride_ot, stride_oh, stride_lb, stride_lt,
                      G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr, nsel,
                      NSEL_PAD: tl.constexpr, INIT: tl.constexpr, T: tl.constexpr):
    """Continues the shared part's softmax state of T tokens x the G heads of KV group g (rows of T * G_PAD) of
    sequence b (grid axis 1: sequences x groups; rows_ptr: `union_blocks`'s table) with the union of the tokens' own
    blocks. bits: scratch shaped as the union, for each block the tokens that chose it (bit i: token i of the
    tile). A tile past a shorter sequence's queries has an empty union and stores nothing. Nothing at all unless
    the plan's stats pass `_taken` (else the token kernel does the work)."""
    if not _taken(stats_ptr, max_share):
        return
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


def fwd_union(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, idx: torch.Tensor, plan: Plan,
              o_shared: torch.Tensor, lse_shared: torch.Tensor, o: torch.Tensor, lse: torch.Tensor, block_size: int,
              scale: float, init_blocks: int, window: int) -> None:
    """Sequences as `sparse_fwd`'s rows (q [R, Tq, hq, d], k/v [R, Tk, hkv, d], idx [R, hkv, Tq, K] int32; plan:
    `choose`'s): o [R, Tq, hq, d], lse [R, Tq, hq] for each sequence's queries from the shared part's (o_shared,
    lse_shared: `sparse_fwd`'s intermediates, laid out as q) and the unions — where the plan is taken; else
    nothing (every program returns at once)."""
    r, tq, hq, d = q.shape
    hkv = k.shape[2]
    nsel = idx.shape[3]
    union, counts = plan.union, plan.counts
    bits = torch.empty_like(union)
    g_pad = group_pad(hq // hkv)
    _launch(_fwd_union_kernel, (union.shape[2], hkv * r), (
        q, k, v, idx, union, bits, counts, plan.stats, plan.max_share, o_shared, lse_shared, o, lse, plan.table, r,
        hkv, window, scale, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), v.stride(0),
        v.stride(1), v.stride(2), idx.stride(0), idx.stride(1), idx.stride(2), union.stride(0), union.stride(1),
        union.stride(2), counts.stride(0), counts.stride(1), o_shared.stride(0), lse_shared.stride(0), o.stride(0),
        o.stride(1), o.stride(2), lse.stride(0), lse.stride(1)),
        dict(G=hq // hkv, G_PAD=g_pad, D=d, BLOCK=block_size, nsel=nsel, NSEL_PAD=triton.next_power_of_2(max(nsel, 1)),
             INIT=init_blocks, T=plan.tokens))


@triton.jit(do_not_specialize=["tq", "q_start", "nsel"])
def _bwd_dq_union_kernel(q_ptr, k_ptr, v_ptr, blk_ptr, un_ptr, bits_ptr, cnt_ptr, stats_ptr, max_share, do_ptr, lse_ptr,
                         delta_ptr, dqs_ptr, dq_ptr, tq, q_start, window, sm_scale, stride_qt, stride_qh,
                         stride_kt, stride_kh, stride_vt, stride_vh, stride_bh, stride_bt, stride_uh, stride_ut,
                         stride_ch, stride_lt,
                         G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr, nsel,
                         NSEL_PAD: tl.constexpr, INIT: tl.constexpr, T: tl.constexpr):
    """The dq pass's own blocks as `_fwd_union_kernel` walks them (one sequence): T tokens x the G heads of KV group
    g over the union of their own blocks, each row's p masked to its own token's choice, added to the shared part's
    dq (dqs, fp32) — the token kernel's `_bwd_dq_token_kernel` result. Nothing at all unless the plan's stats pass
    `_taken` (declined: counts and unions were never written, and the token kernel writes dq)."""
    if not _taken(stats_ptr, max_share):
        return
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


def bwd_dq_union(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, idx: torch.Tensor, plan: Plan, do: torch.Tensor,
                 lse: torch.Tensor, delta: torch.Tensor, dq_shared: torch.Tensor, dq: torch.Tensor, block_size: int,
                 scale: float, init_blocks: int, window: int) -> None:
    """`sparse_bwd`'s per-token dq over the unions (one sequence: q/do/dq/dq_shared [Tq, hq, d] contiguous, k/v
    [Tk, hkv, d], idx [hkv, Tq, K] int32, lse/delta [Tq, hq] alike; plan: `choose`'s for idx[None]) into dq, where
    the plan is taken (else nothing)."""
    tq, hq, d = q.shape
    tk, hkv, _ = k.shape
    nsel = idx.shape[2]
    union, counts = plan.union[0], plan.counts[0]
    bits = torch.empty_like(union)
    g_pad = group_pad(hq // hkv)
    _launch(_bwd_dq_union_kernel, (union.shape[1], hkv), (
        q, k, v, idx, union, bits, counts, plan.stats, plan.max_share, do, lse, delta, dq_shared, dq, tq, tk - tq,
        window, scale, q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), idx.stride(0),
        idx.stride(1), union.stride(0), union.stride(1), counts.stride(0), lse.stride(0)),
        dict(G=hq // hkv, G_PAD=g_pad, D=d, BLOCK=block_size, nsel=nsel, NSEL_PAD=triton.next_power_of_2(max(nsel, 1)),
             INIT=init_blocks, T=plan.tokens))
