"""Cascade decode: the leading pages that groups of rows of a dense decode step share, attended once a group.

Rows after one cached prefix (a system prompt, a few-shot preamble, the `n` samples of one prompt) hold the same
first pages. The paged decode reads a row's every page, so a batch of B such rows reads the prefix B times a
layer. Here one program per (KV head, tile of rows, split of the shared pages) attends the tile's members of
each group in turn (the tiles take the rows by group, so mostly one) — all of the KV group's heads of several
rows, one matrix — to that group's pages, reading them once per tile; the paged decode attends each row's own
pages after them (`_attend_kernel` with SKIP), and `_merge_kernel` merges both kinds of partial outputs by
their log-sum-exps.
As FlashInfer's and vLLM's cascade attention.

Shapes stay fixed for a CUDA graph: the groups' page lists have a fixed number and width, and their used lengths
(`count`) and the rows each applies to (`member`) are device tensors, read by the kernels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import triton
import triton.language as tl

from .triton_decode import page_kv
from .triton_select import num_sms, softmax_step

# Query vectors (rows x the KV group's heads) per program: the shared pages are read once per tile of rows.
TILE_QUERIES = 64


@triton.jit
def _shared_kernel(q_ptr, kc_ptr, vc_ptr, pages_ptr, nsh_ptr, member_ptr, order_ptr, lens_ptr, o_ptr, m_ptr, n_rows,
                   n_groups, sm_scale, stride_pg, stride_qb, stride_qh, stride_kp, stride_kt, stride_kh, stride_vp,
                   stride_vt, stride_vh, stride_ob, stride_oh, stride_os, stride_mb, stride_mh, split0,
                   G: tl.constexpr, G_PAD: tl.constexpr, ROWS: tl.constexpr, D: tl.constexpr, PAGE: tl.constexpr,
                   SPLITS: tl.constexpr, TILE_PAGES: tl.constexpr, SPARSE_ROWS: tl.constexpr,
                   DENSE_LEN: tl.constexpr):
    """Partial output and log-sum-exp (log2) at split split0 + sp of rows order[rt * ROWS : +ROWS], KV head g: each
    member of group k (member k + 1) over split sp of group k's first nsh[k] pages, the tile's groups taken in
    turn (from its least member's group to its greatest; one without members in the tile reads nothing); rows in
    no group get an empty partial (-inf).
    SPARSE_ROWS (the InfLLM v2 step): members at dense_len tokens or more are out too, as `_attend_kernel` reads
    their selected blocks from the start (a captured step keeps its groups while a member grows past dense_len)."""
    g = tl.program_id(0)
    rt = tl.program_id(1)
    sp = tl.program_id(2)
    idx = tl.arange(0, ROWS * G_PAD)
    slot = rt * ROWS + idx // G_PAD
    here = slot < n_rows
    r = tl.load(order_ptr + slot, mask=here, other=0)
    hh = idx % G_PAD
    ok = here & (hh < G)
    mem = tl.load(member_ptr + r, mask=here, other=0)
    use = ok & (mem > 0)
    if SPARSE_ROWS:
        n_tok = tl.load(lens_ptr + r, mask=here, other=0)
        if DENSE_LEN >= 0:
            use = use & (n_tok < DENSE_LEN)
        else:
            use = use & (n_tok <= 0)  # as `_row_state`: every row with tokens is sparse
    h = g * G + hh
    dd = tl.arange(0, D)
    q = tl.load(q_ptr + r[:, None] * stride_qb + h[:, None] * stride_qh + dd[None, :], mask=use[:, None], other=0.0)
    m_i = tl.full((ROWS * G_PAD,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((ROWS * G_PAD,), dtype=tl.float32)
    acc = tl.zeros((ROWS * G_PAD, D), dtype=tl.float32)
    qk_scale = sm_scale * 1.4426950408889634
    rr = tl.arange(0, TILE_PAGES * PAGE)
    tt = rr % PAGE
    # Only the groups with members here: the tile's rows come by group (`order`), so one or two, whatever the
    # graph's number of group slots (a loop over every slot costs a block-wide max per empty slot).
    g_lo = tl.min(tl.where(use, mem, n_groups + 1), 0) - 1
    g_hi = tl.max(tl.where(use, mem, 0), 0)
    for gi in range(g_lo, g_hi):
        mine = use & (mem == gi + 1)
        n = tl.load(nsh_ptr + gi)
        per = tl.cdiv(tl.cdiv(n, SPLITS), TILE_PAGES) * TILE_PAGES
        lo = sp * per
        hi = tl.minimum(lo + per, n)
        hi = tl.where(tl.max(mine.to(tl.int32), 0) > 0, hi, lo)  # no members of this group here: nothing read
        for i0 in range(lo, hi, TILE_PAGES):
            j = i0 + rr // PAGE
            km = j < hi
            page = tl.load(pages_ptr + gi * stride_pg + j, mask=km, other=0).to(tl.int64)
            k, v = page_kv(kc_ptr, vc_ptr, page, tt, g, dd, km, stride_kp, stride_kt, stride_kh, stride_vp,
                           stride_vt, stride_vh)
            # Only this group's members take these keys: the other rows' state passes unchanged.
            m_i, l_i, acc = softmax_step(q, k, v, mine[:, None] & km[None, :], m_i, l_i, acc, qk_scale)
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    at = split0 + sp
    tl.store(o_ptr + r[:, None] * stride_ob + h[:, None] * stride_oh + at * stride_os + dd[None, :],
             acc / l_safe[:, None], mask=ok[:, None])
    tl.store(m_ptr + r * stride_mb + h * stride_mh + at,
             tl.where(use & (l_i > 0), m_i + tl.log2(l_safe), float("-inf")), mask=ok)


@dataclass
class SharedPrefix:
    """The leading pages that groups of rows of a decode batch share. pages: int32 [NG, W] on the device (one
    group: [W] is taken as [1, W]), the first count[k] of row k in use (count: int32 [NG], 0 = none); member:
    int32 [B], k + 1 for each row whose first count[k] pages are group k's (each such row has at least one token
    after them: its current one), 0 for a row in no group. order: int32 [B], the rows by group (`row_order`;
    None: computed here): a tile of rows holds one group's members, so reads its pages alone — rows in arrival
    order interleave the groups, and every tile would read every group's pages for a few rows each."""

    pages: torch.Tensor
    count: torch.Tensor
    member: torch.Tensor
    order: torch.Tensor | None = None
    # Splits of each row's own pages (the paged decode's part) beside the shared ones; None: the paged decode's
    # default, sized for rows that attend everything themselves (benchmarks/cascade_decode.py --own-splits).
    own_splits: ClassVar[int | None] = None

    def __post_init__(self) -> None:
        if self.pages.dim() == 1:
            self.pages = self.pages.unsqueeze(0)
        if self.order is None:
            self.order = self.row_order(self.member)

    @staticmethod
    def row_order(member: torch.Tensor) -> torch.Tensor:
        """The rows by group (int32, stable: rows in no group first, then group 1's, ...)."""
        return torch.argsort(member, stable=True).to(torch.int32)

    @property
    def groups(self) -> int:
        return self.pages.shape[0]

    @classmethod
    def empty(cls, width: int, rows: int, scratch: int, device: torch.device | str, groups: int = 1
              ) -> SharedPrefix:
        """No pages shared yet (counts 0, no members): the buffers a captured graph's step reads, and an
        eager warm-up step's groups; the step launches the cascade kernels and they attend nothing extra."""
        i32 = dict(dtype=torch.int32, device=device)
        return cls(torch.full((groups, width), scratch, **i32), torch.zeros(groups, **i32),
                   torch.zeros(rows, **i32), torch.arange(rows, **i32))

    def tile_rows(self, g: int) -> int:
        """Rows per program for a KV group of g heads (at least 16 query vectors: the dot's minimum)."""
        g_pad = triton.next_power_of_2(g)
        return max(1, max(TILE_QUERIES, 16) // g_pad)

    def splits(self, device: torch.device, b: int, hkv: int, g: int) -> int:
        """Partial outputs per row the shared pages add: enough programs for ~2 waves, at most one per pair
        of pages (fixed by the widths: a graph replays it for any count)."""
        programs = hkv * triton.cdiv(b, self.tile_rows(g))
        n = max(1, min(triton.cdiv(2 * num_sms(device), programs), triton.cdiv(self.pages.shape[-1], 2)))
        return 1 << (n.bit_length() - 1)

    def attend(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, o_part: torch.Tensor,
               m_part: torch.Tensor, split0: int, scale: float, tile_pages: int, lens: torch.Tensor,
               dense_len: int | None = None) -> None:
        """Write the shared pages' partials into o_part [B, hq, S, d] / m_part [B, hq, S] (float32) at splits
        split0 .. split0 + `splits` - 1. lens [B]: the rows' tokens; dense_len (the InfLLM v2 step, None for
        the dense decode): members with that many tokens or more are left out (sparse rows)."""
        b, hq, d = q.shape
        _, page, hkv, _ = k_cache.shape
        g = hq // hkv
        if (self.member.shape != (b,) or self.order.shape != (b,) or self.count.shape != (self.groups,)
                or self.pages.stride(1) != 1):
            raise ValueError(f"member and order must be [{b}], count [{self.groups}] (one per group) and pages "
                             f"contiguous rows, got {tuple(self.member.shape)}, {tuple(self.order.shape)}, "
                             f"{tuple(self.count.shape)}, strides {self.pages.stride()}")
        rows = self.tile_rows(g)
        n = self.splits(q.device, b, hkv, g)
        if split0 + n > o_part.shape[2]:
            raise ValueError(f"partials hold {o_part.shape[2]} splits, the shared pages need {split0} + {n}")
        _shared_kernel[(hkv, triton.cdiv(b, rows), n)](
            q, k_cache, v_cache, self.pages, self.count, self.member, self.order, lens, o_part, m_part, b, self.groups,
            scale, self.pages.stride(0), q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1),
            k_cache.stride(2), v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), o_part.stride(0),
            o_part.stride(1), o_part.stride(2), m_part.stride(0), m_part.stride(1), split0,
            G=g, G_PAD=triton.next_power_of_2(g), ROWS=rows, D=d, PAGE=page, SPLITS=n, TILE_PAGES=tile_pages,
            SPARSE_ROWS=dense_len is not None, DENSE_LEN=-1 if dense_len is None else dense_len,
            num_warps=4 if rows * triton.next_power_of_2(g) <= 64 else 8)  # 128 x d float32 accumulators: 8 warps

