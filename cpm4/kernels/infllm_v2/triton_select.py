"""InfLLM v2 stages 1-3 in Triton: semantic-kernel keys, group-summed block scores, block selection.

Same definitions as reference.py (one sequence: queries are the last Tq of Tk tokens):
- `compress`: kernel j = mean of keys [j*stride, j*stride + size), accumulated in fp32.
- `block_scores`: pass 1 computes each query head's log-sum-exp over the visible coarse (Gen-B) or fine
  (Gen-A) kernels; pass 2 computes exp(q.K1/sqrt(d) - lse) for visible fine kernels and sums it over the
  G heads of a group on chip ("NSA trick": a tile's rows are BLOCK_T tokens x G heads), writing only the
  group scores [hkv, Tq, N1] in the input dtype. Tiles whose kernels no query can see are skipped and
  left unwritten: the selection kernel applies the same visibility rule and never reads them.
- `select_blocks`: per (KV head, query) program: max-pool kernel scores onto blocks, force/exclude blocks
  by variant, then top-k without sorting: a binary search on the (order-preserving integer) score key,
  over the range the unforced keys span, finds the k-th largest value, ties at it go to the lowest block
  indices (the reference's stable sort), and a prefix sum writes the chosen blocks in ascending order,
  -1 padded.
"""

from __future__ import annotations

import functools
import math
import os

import torch
import triton
import triton.language as tl

from cpm4.model.config import SparseConfig
from cpm4.model.transfer import to_device

from .reference import num_kernels


@triton.jit
def softmax_step(q, k, v, s_mask, m_i, l_i, acc, qk_scale):
    """One key block of flash attention: scores in log2 units, masked entries excluded; returns the
    updated running max, normaliser and (unnormalised) accumulator."""
    s = tl.dot(q, tl.trans(k)) * qk_scale
    s = tl.where(s_mask, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    return m_new, l_i * alpha + tl.sum(p, 1), acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)


@triton.jit
def dq_step(q, do, k, v, p_mask, lse, delta, dq, qk_scale):
    """One key block of the flash-attention dq pass (scores in log2 units; p_mask None: every entry counts)."""
    s = tl.dot(q, tl.trans(k)) * qk_scale
    p = tl.exp2(s - lse[:, None])
    if p_mask is not None:
        p = tl.where(p_mask, p, 0.0)
    ds = p * (tl.dot(do, tl.trans(v)) - delta[:, None])
    return dq + tl.dot(ds.to(k.dtype), k)


@triton.jit
def lse_step(s, m_i, l_i):
    """Online log-sum-exp over a tile of scores s [rows, cols] (log2 units, -inf excluded): updated
    running max and normaliser."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    return m_new, l_i * tl.exp2(m_i - m_safe) + tl.sum(tl.exp2(s - m_safe[:, None]), 1)


@triton.jit
def lse_value(m_i, l_i):
    """log2-sum-exp from the running max and normaliser; -inf where nothing was seen."""
    return tl.where(l_i > 0, m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))


@triton.jit
def merge_lse(parts):
    """log2-sum-exp over the last axis of partial log2-sum-exps [rows, splits] (-inf: empty split)."""
    mx = tl.max(parts, 1)
    mx_safe = tl.where(mx > float("-inf"), mx, 0.0)
    return lse_value(mx_safe, tl.sum(tl.exp2(parts - mx_safe[:, None]), 1))


@triton.jit
def complete_kernels(pos, KSIZE: tl.constexpr, KSTRIDE: tl.constexpr):
    """Kernels complete at position pos (j*KSTRIDE + KSIZE - 1 <= pos)."""
    return tl.where(pos >= KSIZE - 1, tl.maximum(pos - KSIZE + 1, 0) // KSTRIDE + 1, 0)


@triton.jit
def shared_block(i, qb, window, INIT: tl.constexpr):
    """The i-th block of query block qb's shared set (b < INIT, then qb - window .. qb) and the set's size."""
    lo = tl.maximum(qb - window, INIT)
    n_init = tl.minimum(INIT, lo)
    return tl.where(i < n_init, i, lo + i - n_init), n_init + qb + 1 - lo


@triton.jit
def group_rows(t, g, stride_qt, stride_qh, G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr):
    """The G query heads of KV group g at token t as tile rows (padded to G_PAD): (heads, row mask, offsets)."""
    r = tl.arange(0, G_PAD)
    h = g * G + r
    return h, r < G, t * stride_qt + h[:, None] * stride_qh + tl.arange(0, D)[None, :]


@triton.jit
def own_range(row, qb, window, nsel, NSEL_PAD: tl.constexpr, INIT: tl.constexpr):
    """[lo, hi) of a sorted, -1-padded selection row holding the blocks outside the shared set."""
    sel = tl.load(row + tl.arange(0, NSEL_PAD), mask=tl.arange(0, NSEL_PAD) < nsel, other=-1)
    valid = sel >= 0
    return tl.sum((valid & (sel < INIT)).to(tl.int32), 0), tl.sum((valid & (sel < qb - window)).to(tl.int32), 0)


@triton.jit
def query_tile(q_ptr, pid_t, g, tq, stride_qt, stride_qh, G: tl.constexpr, G_PAD: tl.constexpr,
               BLOCK_T: tl.constexpr, D: tl.constexpr):
    """A tile of BLOCK_T query tokens x the G heads of KV group g (padded to G_PAD rows per token):
    returns (q rows, token index, head index, row mask)."""
    r = tl.arange(0, BLOCK_T * G_PAD)
    ti = pid_t * BLOCK_T + r // G_PAD
    hi = g * G + r % G_PAD
    tm = (ti < tq) & (r % G_PAD < G)
    dd = tl.arange(0, D)
    q = tl.load(q_ptr + ti[:, None] * stride_qt + hi[:, None] * stride_qh + dd[None, :], mask=tm[:, None], other=0.0)
    return q, ti, hi, tm


@triton.jit
def visible_split(pid_t, sp, tq, q_start, n_keys, per_split, BLOCK_T: tl.constexpr, KSIZE: tl.constexpr,
                  KSTRIDE: tl.constexpr):
    """[lo, hi) of the kernels of split sp that the last query of tile pid_t can see (none beyond)."""
    last = tl.minimum(q_start + pid_t * BLOCK_T + BLOCK_T - 1, q_start + tq - 1)
    n_vis = tl.minimum(n_keys, tl.maximum((last - KSIZE + 1) // KSTRIDE + 1, 0))
    n_vis = tl.where(pid_t * BLOCK_T < tq, n_vis, 0)  # a tile past a shorter row's queries (ROWS)
    lo = sp * per_split
    return lo, tl.minimum(lo + per_split, n_vis)


@triton.jit
def row_params(rows_ptr, n_rows, pid, n_groups, KEYS_ROW: tl.constexpr):
    """Several sequences in one launch (`Rows`): rows_ptr is int32 [5, n_rows] (queries, first query's
    position, keys, fine kernels, coarse kernels per sequence); a grid axis of n_rows x n_groups programs.
    Returns (row as int64 for offsets, group, queries, first position, kernels of table KEYS_ROW)."""
    b = pid // n_groups
    tq = tl.load(rows_ptr + b)
    q_start = tl.load(rows_ptr + n_rows + b)
    n_keys = tl.load(rows_ptr + KEYS_ROW * n_rows + b)
    return b.to(tl.int64), pid % n_groups, tq, q_start, n_keys


def autotune_configs(warps=(4, 8), stages=(2, 3)) -> list:
    # The interpreter runs every config it is given: one is enough there.
    if os.environ.get("TRITON_INTERPRET") == "1":
        return [triton.Config({}, num_warps=4, num_stages=1)]
    return [triton.Config({}, num_warps=w, num_stages=st) for w in warps for st in stages]


@triton.jit(do_not_specialize=["start", "n_out"])  # see _lse_kernel
def _compress_kernel(k_ptr, out_ptr, start, n_out, stride_kt, stride_kh, stride_ot, stride_oh,
                     KSIZE: tl.constexpr, KSTRIDE: tl.constexpr, D: tl.constexpr, BLOCK_J: tl.constexpr):
    pid_j = tl.program_id(0)
    h = tl.program_id(1)
    j = pid_j * BLOCK_J + tl.arange(0, BLOCK_J)
    jm = j < n_out
    dd = tl.arange(0, D)
    acc = tl.zeros((BLOCK_J, D), dtype=tl.float32)
    for u in range(KSIZE):
        t = (start + j) * KSTRIDE + u
        ptr = k_ptr + t[:, None] * stride_kt + h * stride_kh + dd[None, :]
        acc += tl.load(ptr, mask=jm[:, None], other=0.0).to(tl.float32)
    acc = acc / KSIZE
    optr = out_ptr + j[:, None] * stride_ot + h * stride_oh + dd[None, :]
    tl.store(optr, acc.to(out_ptr.dtype.element_ty), mask=jm[:, None])


def compress(k: torch.Tensor, kernel_size: int, kernel_stride: int, start: int = 0,
             stop: int | None = None) -> torch.Tensor:
    """Kernels [start, stop) of k [T, hkv, d] -> [stop - start, hkv, d] (k's dtype)."""
    n = num_kernels(k.shape[0], kernel_size, kernel_stride)
    stop = n if stop is None else stop
    if not 0 <= start <= stop <= n:
        raise ValueError(f"kernel range [{start}, {stop}) outside the {n} complete kernels")
    _, hkv, d = k.shape
    out = torch.empty((stop - start, hkv, d), device=k.device, dtype=k.dtype)
    if stop > start:
        k = k if k.stride(-1) == 1 else k.contiguous()
        block_j = 32
        grid = (triton.cdiv(stop - start, block_j), hkv)
        _compress_kernel[grid](k, out, start, stop - start, k.stride(0), k.stride(1), out.stride(0), out.stride(1),
                               KSIZE=kernel_size, KSTRIDE=kernel_stride, D=d, BLOCK_J=block_j)
    return out


# The prefill kernels' lengths (queries, their first position, keys, rows) change with every step: Triton would
# specialize each (1, a multiple of 16 or other) and compile a variant for each new combination in the middle of
# serving, seconds inside a request. They only bound loops and masks across rows (ROWS reads them from the device
# anyway). Test: test_interpreter_prefill_signatures_do_not_follow_lengths (tests/jit_signatures.py).
@triton.autotune(configs=autotune_configs(), key=["D", "G_PAD", "BLOCK_T", "BLOCK_N", "ROWS"])
@triton.jit(do_not_specialize=["tq", "q_start", "n_keys", "n_rows"])
def _lse_kernel(q_ptr, k_ptr, lse_ptr, tq, q_start, n_keys, per_split, sm_scale,
                stride_qt, stride_qh, stride_kt, stride_kh, stride_ls, stride_lt,
                rows_ptr, n_rows, n_groups, stride_qb, stride_kb, stride_lb,
                G: tl.constexpr, G_PAD: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
                D: tl.constexpr, KSIZE: tl.constexpr, KSTRIDE: tl.constexpr, ROWS: tl.constexpr,
                KEYS_ROW: tl.constexpr):
    """Partial lse[split, t, h] (log2 units) over the kernels of this split visible to query t
    (end j*KSTRIDE + KSIZE - 1 <= position); splits are merged afterwards (one split in prefill).
    ROWS: several sequences, the second grid axis (row, KV head); see `row_params`."""
    pid_t = tl.program_id(0)
    g = tl.program_id(1)
    sp = tl.program_id(2)
    if ROWS:
        b, g, tq, q_start, n_keys = row_params(rows_ptr, n_rows, g, n_groups, KEYS_ROW)
        q_ptr += b * stride_qb
        k_ptr += b * stride_kb
        lse_ptr += b * stride_lb
    M: tl.constexpr = BLOCK_T * G_PAD
    q, ti, hi, tm = query_tile(q_ptr, pid_t, g, tq, stride_qt, stride_qh, G, G_PAD, BLOCK_T, D)
    pos = q_start + ti
    dd = tl.arange(0, D)
    m_i = tl.full((M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((M,), dtype=tl.float32)
    # Kernels beyond what the last query of the tile can see contribute nothing.
    j_lo, j_hi = visible_split(pid_t, sp, tq, q_start, n_keys, per_split, BLOCK_T, KSIZE, KSTRIDE)
    for j0 in tl.range(j_lo, j_hi, BLOCK_N):
        j = j0 + tl.arange(0, BLOCK_N)
        kt = tl.load(k_ptr + j[None, :] * stride_kt + g * stride_kh + dd[:, None], mask=(j < j_hi)[None, :],
                     other=0.0)
        s = tl.dot(q, kt) * (sm_scale * 1.4426950408889634)
        vis = (j[None, :] * KSTRIDE + KSIZE - 1 <= pos[:, None]) & (j < j_hi)[None, :]
        m_i, l_i = lse_step(tl.where(vis, s, float("-inf")), m_i, l_i)
    lse = lse_value(m_i, l_i)
    tl.store(lse_ptr + sp * stride_ls + ti * stride_lt + hi, lse, mask=tm)


# SCORE_KEYS_FIRST: stage 1's scores computed as [keys, rows] (K Q^T) so that the sum over a group's heads runs
# along the tile's columns (adjacent columns of the MMA result: adds within a thread and shuffles within a quad)
# instead of along its rows (across warps, through shared memory, every key tile). Same values up to rounding.
# H200, 8B shape at 128K (attention.py row prefill.stage1_scores.keys_first): 18.70 -> 15.30 ms.
SCORE_KEYS_FIRST = True


# LSE_SPLITS (the LSE pass's key splits, which follow the context and the query count) is a runtime number: as a
# constant, and a key of the autotuning, each new count compiled and autotuned the kernel again mid-serving.
# LSE_SPLITS_PAD takes few values (1, then 8 or more: `lse_splits_pad`).
@triton.autotune(configs=autotune_configs(),
                 key=["D", "G_PAD", "BLOCK_T", "BLOCK_N", "LSE_SPLITS_PAD", "KEYS_FIRST", "ROWS"])
@triton.jit(do_not_specialize=["tq", "q_start", "n_keys", "n_rows", "LSE_SPLITS"])  # see _lse_kernel
def _score_kernel(q_ptr, k_ptr, lse_ptr, s_ptr, tq, q_start, n_keys, per_split, sm_scale,
                  stride_qt, stride_qh, stride_kt, stride_kh, stride_ls, stride_lt, stride_sh, stride_st,
                  rows_ptr, n_rows, n_groups, stride_qb, stride_kb, stride_lb, stride_sb,
                  G: tl.constexpr, G_PAD: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
                  D: tl.constexpr, KSIZE: tl.constexpr, KSTRIDE: tl.constexpr, LSE_SPLITS,
                  LSE_SPLITS_PAD: tl.constexpr, KEYS_FIRST: tl.constexpr, ROWS: tl.constexpr):
    """One tile of queries (BLOCK_T tokens x G heads) against the fine kernels of its split, tile by tile
    (KEYS_FIRST: see SCORE_KEYS_FIRST; ROWS: as `_lse_kernel`)."""
    pid_t = tl.program_id(0)
    g = tl.program_id(1)
    sp = tl.program_id(2)
    if ROWS:
        b, g, tq, q_start, n_keys = row_params(rows_ptr, n_rows, g, n_groups, 3)
        q_ptr += b * stride_qb
        k_ptr += b * stride_kb
        lse_ptr += b * stride_lb
        s_ptr += b * stride_sb
    j_lo, j_hi = visible_split(pid_t, sp, tq, q_start, n_keys, per_split, BLOCK_T, KSIZE, KSTRIDE)
    q, ti, hi, tm = query_tile(q_ptr, pid_t, g, tq, stride_qt, stride_qh, G, G_PAD, BLOCK_T, D)
    pos = q_start + ti
    dd = tl.arange(0, D)
    if LSE_SPLITS_PAD == 1:
        lse = tl.load(lse_ptr + ti * stride_lt + hi, mask=tm, other=float("-inf"))  # log2 units
    else:  # merge the LSE pass's partial results here rather than in extra launches
        ss = tl.arange(0, LSE_SPLITS_PAD)
        parts = tl.load(lse_ptr + ss[None, :] * stride_ls + ti[:, None] * stride_lt + hi[:, None],
                        mask=tm[:, None] & (ss < LSE_SPLITS)[None, :], other=float("-inf"))
        lse = merge_lse(parts)
    has = lse > float("-inf")
    lse = tl.where(has, lse, 0.0)
    tt = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    if KEYS_FIRST:
        qt = tl.trans(q)  # [D, rows], once per program
        for j0 in tl.range(j_lo, j_hi, BLOCK_N):
            j = j0 + tl.arange(0, BLOCK_N)
            k = tl.load(k_ptr + j[:, None] * stride_kt + g * stride_kh + dd[None, :], mask=(j < n_keys)[:, None],
                        other=0.0)
            s = tl.dot(k, qt) * (sm_scale * 1.4426950408889634)  # [keys, rows]
            vis = (j[:, None] * KSTRIDE + KSIZE - 1 <= pos[None, :]) & (j < n_keys)[:, None] & has[None, :]
            p = tl.where(vis, tl.exp2(s - lse[None, :]), 0.0)
            grp = tl.sum(tl.reshape(p, (BLOCK_N, BLOCK_T, G_PAD)), 2)  # [keys, tokens]
            sptr = s_ptr + g * stride_sh + tt[None, :] * stride_st + j[:, None]
            tl.store(sptr, grp.to(s_ptr.dtype.element_ty), mask=(tt < tq)[None, :] & (j < j_hi)[:, None])
    else:
        for j0 in tl.range(j_lo, j_hi, BLOCK_N):
            j = j0 + tl.arange(0, BLOCK_N)
            kt = tl.load(k_ptr + j[None, :] * stride_kt + g * stride_kh + dd[:, None], mask=(j < n_keys)[None, :],
                         other=0.0)
            s = tl.dot(q, kt) * (sm_scale * 1.4426950408889634)
            vis = (j[None, :] * KSTRIDE + KSIZE - 1 <= pos[:, None]) & (j < n_keys)[None, :] & has[:, None]
            p = tl.where(vis, tl.exp2(s - lse[:, None]), 0.0)
            grp = tl.sum(tl.reshape(p, (BLOCK_T, G_PAD, BLOCK_N)), 1)  # sum over the G heads of the group
            sptr = s_ptr + g * stride_sh + tt[:, None] * stride_st + j[None, :]
            tl.store(sptr, grp.to(s_ptr.dtype.element_ty), mask=(tt < tq)[:, None] & (j < j_hi)[None, :])


def group_pad(g: int) -> int:
    """A KV group's g query heads as rows of a one-token tile: the next power of two, at least the tensor cores'
    minimum of 16 rows."""
    return max(16, triton.next_power_of_2(g))


def tile_shape(g: int, rows: int = 64) -> tuple[int, int]:
    """(tokens per tile, padded group) so that tile rows (tokens x padded heads) are `rows`, or G_PAD if
    larger: enough rows for the tensor cores' minimum of 16."""
    g_pad = max(triton.next_power_of_2(g), 1)
    return max(1, rows // g_pad), g_pad


@functools.cache
def num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def lse_splits_pad(splits: int) -> int:
    """The score kernel's lanes for the LSE pass's partial results: 1 (one split, read directly) or a power of
    two of at least 8, so the usual counts (2-8) share one compiled variant."""
    return 1 if splits == 1 else max(8, triton.next_power_of_2(splits))


def _splits(n_keys: int, n_programs: int, device: torch.device, block_n: int) -> int:
    """Split the key range when the query tiles alone cannot fill the GPU (decode, short chunks)."""
    sms = num_sms(device)
    if n_programs >= 2 * sms:
        return 1
    return max(1, min(triton.cdiv(2 * sms, n_programs), triton.cdiv(n_keys, 4 * block_n)))


class Rows:
    """Several sequences in one launch of the prefill kernels: sequence i's queries are the last n_new[i] of its
    kv_lens[i] tokens, q [R, T, hq, d] (its first n_new[i] rows), k/v [R, S, hkv, d], kernel keys [R, N, hkv, d]
    (its first n1[i] / n2[i]); padding is never read. The five per-sequence numbers go to the GPU once."""

    def __init__(self, n_new: list[int], kv_lens: list[int], n1: list[int], n2: list[int] | None,
                 device: torch.device):
        if len(n_new) != len(kv_lens) or any(n > k or n < 1 for n, k in zip(n_new, kv_lens)):
            raise ValueError(f"each sequence needs 1 <= queries <= keys; got {n_new} queries, {kv_lens} keys")
        self.n = len(n_new)
        self.n_new, self.kv_lens = list(n_new), list(kv_lens)
        self.q_start = [k - n for n, k in zip(n_new, kv_lens)]
        self.tq = max(n_new)
        host = [n_new, self.q_start, kv_lens, n1, n2 if n2 is not None else n1]
        self.table = to_device(host, device, torch.int32)

    def blocks(self, block_size: int) -> int:
        """Blocks of the longest sequence (the selection's lanes)."""
        return (max(self.kv_lens) - 1) // block_size + 1


def padded_empty(*shape: int, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """torch.empty(shape) as a view of a buffer whose last axis is padded to a multiple of 16 elements. Triton
    specializes int arguments as 1, a multiple of 16 or other, so a stride that follows a step's lengths
    (tq * heads, tq * blocks) compiled a variant per class in the middle of serving; padded, every stride over the
    other axes stays a multiple of 16 whatever the lengths and head counts."""
    *lead, n = shape
    return torch.empty((*lead, triton.cdiv(n, 16) * 16), device=device, dtype=dtype)[..., :n]


def score_buffer(r: int, hkv: int, tq: int, n1: int, device: torch.device | str, dtype: torch.dtype
                 ) -> torch.Tensor:
    """Stage 1's scores [r, hkv, tq, max(n1, 1)], rows padded to a multiple of 16 kernels (`padded_empty`)."""
    return padded_empty(r, hkv, tq, max(n1, 1), dtype=dtype, device=device)


def block_scores(q: torch.Tensor, k1: torch.Tensor, k2: torch.Tensor | None, q_start: int, cfg: SparseConfig,
                 scale: float, exact_lse: bool = False, key_splits: int | None = None,
                 block_n: int = 64, keys_first: bool | None = None, rows: Rows | None = None) -> torch.Tensor:
    """Stage 1 -> [hkv, Tq, N1] scores in q's dtype (unwritten where no query sees the kernel).

    The LSE is taken over the coarse keys (Gen-B, the approximation) or over the fine ones (Gen-A, or
    `exact_lse` for testing). keys_first: see SCORE_KEYS_FIRST (None: that). rows: several sequences (q, k1, k2
    with a leading row axis, see `Rows`; q_start unused) -> [R, hkv, T, N1]."""
    if rows is None:
        q, k1, k2 = q[None], k1[None], None if k2 is None else k2[None]
    r, tq, hq, d = q.shape
    hkv = k1.shape[2]
    g = hq // hkv
    n1 = k1.shape[1]
    bt, g_pad = tile_shape(g, 128)
    use_fine = exact_lse or cfg.variant == "gen-a" or k2 is None
    kn, ks, kst = (k1, cfg.kernel_size, cfg.kernel_stride) if use_fine else (
        k2, cfg.coarse_kernel_size, cfg.coarse_kernel_stride)
    n_tiles = triton.cdiv(tq, bt)
    table = q if rows is None else rows.table  # read only with ROWS
    batch = dict(rows_ptr=table, n_rows=r, n_groups=hkv, ROWS=rows is not None)
    if kn.shape[1] == 0:
        part = padded_empty(r, 1, tq, hq, dtype=torch.float32, device=q.device).fill_(-math.inf)
    else:
        splits = key_splits or _splits(kn.shape[1], n_tiles * hkv * r, q.device, block_n)
        per = triton.cdiv(triton.cdiv(kn.shape[1], splits), block_n) * block_n
        splits = triton.cdiv(kn.shape[1], per)
        part = padded_empty(r, splits, tq, hq, dtype=torch.float32, device=q.device)
        _lse_kernel[(n_tiles, hkv * r, splits)](q, kn, part, tq, q_start, kn.shape[1], per, scale, q.stride(1),
                                                q.stride(2), kn.stride(1), kn.stride(2), part.stride(1),
                                                part.stride(2), stride_qb=q.stride(0), stride_kb=kn.stride(0),
                                                stride_lb=part.stride(0), G=g, G_PAD=g_pad, BLOCK_T=bt,
                                                BLOCK_N=block_n, D=d, KSIZE=ks, KSTRIDE=kst,
                                                KEYS_ROW=3 if use_fine else 4, **batch)
    scores = score_buffer(r, hkv, tq, n1, q.device, q.dtype)
    if n1:
        splits = key_splits or _splits(n1, n_tiles * hkv * r, q.device, block_n)
        per = triton.cdiv(triton.cdiv(n1, splits), block_n) * block_n
        splits = triton.cdiv(n1, per)
        _score_kernel[(n_tiles, hkv * r, splits)](q, k1, part, scores, tq, q_start, n1, per, scale, q.stride(1),
                                                  q.stride(2), k1.stride(1), k1.stride(2), part.stride(1),
                                                  part.stride(2), scores.stride(1), scores.stride(2),
                                                  stride_qb=q.stride(0), stride_kb=k1.stride(0),
                                                  stride_lb=part.stride(0), stride_sb=scores.stride(0), G=g,
                                                  G_PAD=g_pad, BLOCK_T=bt, BLOCK_N=block_n, D=d,
                                                  KSIZE=cfg.kernel_size, KSTRIDE=cfg.kernel_stride,
                                                  LSE_SPLITS=part.shape[1],
                                                  LSE_SPLITS_PAD=lse_splits_pad(part.shape[1]),
                                                  KEYS_FIRST=SCORE_KEYS_FIRST if keys_first is None else keys_first,
                                                  **batch)
    return scores if rows is not None else scores[0]


def warm_select(cfg: SparseConfig, hkv: int, context: int, device: torch.device, dtype: torch.dtype,
                start: int = 1, queries: int = 1024, seed: int = 0) -> None:
    """Compile (and autotune) the selection kernel for every lane width (NB_PAD: the block count rounded up to a
    power of two) a sequence of up to `context` tokens can need, one sequence and several rows (`Rows`), from
    `start` blocks up: the other lengths are not specialized, so these are all its variants. A prompt reaching a
    new power of two of blocks otherwise compiles it inside its request. Random scores for the last `queries`
    positions: the autotuning times a full grid on scores that spread as a random model's do (zeros would make
    the top-k search trivial, one query a launch-bound timing)."""
    bsz = cfg.block_size
    gen = torch.Generator(device=device).manual_seed(seed)
    lanes = triton.next_power_of_2(max(start, 1))
    while lanes // 2 * bsz < context:  # a context of more than lanes / 2 blocks needs these lanes
        n = min(context, lanes * bsz)  # tokens: (n - 1) // bsz + 1 blocks round up to `lanes`
        n1 = num_kernels(n, cfg.kernel_size, cfg.kernel_stride)
        tq = min(queries, n)
        scores = score_buffer(1, hkv, tq, n1, device, dtype)
        scores.copy_(torch.rand(scores.shape, generator=gen, device=device))
        select_blocks(scores[0], n - tq, tq, n1, cfg)
        select_blocks(scores, 0, 0, 0, cfg, rows=Rows([tq], [n], [n1], None, device))
        lanes *= 2


def warm_scores(cfg: SparseConfig, hq: int, hkv: int, d: int, device: torch.device, dtype: torch.dtype,
                queries: int = 16, block_n: int = 64, seed: int = 0) -> None:
    """Compile (and autotune) stage 1 for a few queries after a long context (a request continuing a cached
    prefix): the LSE pass then splits its keys and the score pass merges the splits, another variant of it
    (LSE_SPLITS_PAD > 1) that a whole-prompt prefill never needs. One sequence and several rows (`Rows`), on
    random queries and keys: two splits of the LSE keys (`lse_splits_pad` gives every count above one these lanes)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    fine = cfg.variant == "gen-a"  # the LSE over the fine kernels (Gen-A) or the coarse ones (Gen-B)
    size, stride = (cfg.kernel_size, cfg.kernel_stride) if fine else (cfg.coarse_kernel_size,
                                                                      cfg.coarse_kernel_stride)
    n = 2 * block_n * stride + size  # 2 * block_n + 1 LSE kernels: two splits of block_n-wide tiles
    n1 = num_kernels(n, cfg.kernel_size, cfg.kernel_stride)
    n2 = num_kernels(n, cfg.coarse_kernel_size, cfg.coarse_kernel_stride)

    def rand(*shape):
        return torch.randn(shape, generator=gen, device=device).to(dtype)

    q, k1, k2 = rand(queries, hq, d), rand(n1, hkv, d), None if fine else rand(n2, hkv, d)
    scale = 1 / math.sqrt(d)
    block_scores(q, k1, k2, n - queries, cfg, scale, key_splits=2, block_n=block_n)
    rows = Rows([queries], [n], [n1], None if fine else [n2], device)
    block_scores(q[None], k1[None], None if fine else k2[None], 0, cfg, scale, key_splits=2, block_n=block_n,
                 rows=rows)


def score_shift(dtype: torch.dtype) -> int:
    """Low bits that are zero in every float32 score rounded from `dtype` (scores are stored in the input
    dtype): the top-k search skips them."""
    return {torch.bfloat16: 16, torch.float16: 13}.get(dtype, 0)


# SELECT_NARROW: the top-k threshold's binary search starts on the range the unforced keys span (found in the pass
# that counts them) instead of on every key value (15 steps for bf16 scores): as many dependent steps as that range
# has bits, fewer when scores crowd into a few exponents, as a model's do. For the prefill selection and the decode
# step. Measured (H200, 2026-11-29): decode step at 128K 32.0 -> 29.9 µs on random inputs (28.8 with uniform
# queries); inside the 8B engine at 128K decode 6.25 -> 6.09 ms a token (two runs each; decode_variant.sh).
# A five-way search (four thresholds a step, their counts in one int64 reduction) was slower in the prefill and in
# the engine (RESULTS.md, twelfth GPU pass): the per-step work, not the step count, is what costs.
SELECT_NARROW = True


@triton.jit
def _range_combine(n0, i0, lo0, hi0, n1, i1, lo1, hi1):
    return n0 + n1, i0 + i1, tl.minimum(lo0, lo1), tl.maximum(hi0, hi1)


@triton.jit
def topk_mask(pooled, b, qb, k_top, INIT: tl.constexpr, LOCAL: tl.constexpr, GEN_B: tl.constexpr,
              SHIFT: tl.constexpr = 0, NARROW: tl.constexpr = True, k_out=0):
    """Blocks chosen from pooled scores (>= 0, one per block b) for a query in block qb: forced/excluded
    blocks by variant, then the top k_top without sorting. A search on order-preserving integer keys finds the
    k_top-th largest value; ties at it go to the lowest block indices (the reference's stable sort).
    Scores rounded from bf16/fp16 have their SHIFT low bits zero: the search runs over the rest (15 bits for
    bf16 instead of 31). A binary search, one count per step: NARROW starts it on the range the unforced keys
    span (a model's scores crowd into a few exponents: fewer of the dependent steps), else on every key value
    (15 steps for bf16). (Two histogram passes instead were slower inside the 8B engine: RESULTS.md.)
    k_out: forced blocks chosen outside `b` (the decode selection's lanes stop short of the query's block when
    the rest are its local blocks): k_top less them."""
    # Scores are >= 0 (their bits sort as integers), +inf forced in, -1 for excluded blocks.
    key = pooled.to(tl.int32, bitcast=True) >> SHIFT
    INF_KEY: tl.constexpr = 0x7F800000 >> SHIFT
    if GEN_B:
        forced = (b < INIT) | ((b >= qb - LOCAL) & (b <= qb))
        key = tl.where(forced, INF_KEY, key)
    else:
        key = tl.where((b < INIT) & (b <= qb), INF_KEY, key)
        key = tl.where((b > qb - LOCAL) & (b <= qb), -1, key)
    key = tl.where(b > qb, -1, key)
    # One pass: how many keys count, how many are forced (or not finite), the range of the others.
    valid = key >= 0
    top = key >= INF_KEY
    finite = valid & ~top
    n_valid, n_top, kmin, kmax = tl.reduce((valid.to(tl.int32), top.to(tl.int32), tl.where(finite, key, INF_KEY),
                                            tl.where(finite, key, 0)), 0, _range_combine)
    k_eff = tl.minimum(n_valid, k_top) - k_out
    # Largest threshold thr with count(key >= thr) >= k_eff, in [0, 2^BITS) (count(key >= 0) = n_valid: always).
    lo = tl.zeros((), dtype=tl.int32)
    BITS: tl.constexpr = 31 - SHIFT
    if NARROW:
        # thr = INF_KEY when the forced keys fill k_eff; else in [kmin, kmax]: count(key >= kmin) = n_valid and
        # count(key > kmax) = n_top < k_eff (then some unforced key exists, so kmin <= kmax).
        lo = tl.where(n_top >= k_eff, INF_KEY, kmin)
        hi = tl.where(n_top >= k_eff, INF_KEY, kmax)
        while lo < hi:
            mid = lo + (hi - lo + 1) // 2
            cnt = tl.sum((key >= mid).to(tl.int32), 0)
            take = cnt >= k_eff
            lo = tl.where(take, mid, lo)
            hi = tl.where(take, hi, mid - 1)
    else:
        hi = tl.full((), INF_KEY, dtype=tl.int32)
        for _ in range(BITS):
            mid = lo + (hi - lo + 1) // 2
            cnt = tl.sum((key >= mid).to(tl.int32), 0)
            take = cnt >= k_eff
            lo = tl.where(take, mid, lo)
            hi = tl.where(take, hi, mid - 1)
    thr = lo
    above = key > thr
    n_above = tl.sum(above.to(tl.int32), 0)
    at = (key == thr) & (key >= 0)
    sel = above | (at & (tl.cumsum(at.to(tl.int32), 0) <= k_eff - n_above))
    return sel & ((b * 0 + k_eff) > 0)


@triton.autotune(configs=autotune_configs(warps=(2, 4, 8), stages=(1,)), key=["NB_PAD", "K_PAD", "ROWS"])
@triton.jit(do_not_specialize=["tq", "q_start", "n_kernels", "n_rows", "k_top"])  # see _lse_kernel
def _select_kernel(s_ptr, out_ptr, tq, q_start, n_kernels, stride_sh, stride_st, stride_oh, stride_ot,
                   rows_ptr, n_rows, n_groups, stride_sb, stride_ob,
                   k_top, K_PAD: tl.constexpr, NB_PAD: tl.constexpr,
                   PER_BLOCK: tl.constexpr, PAD: tl.constexpr, WIDTH: tl.constexpr,
                   KSIZE: tl.constexpr, KSTRIDE: tl.constexpr, BLOCK: tl.constexpr,
                   INIT: tl.constexpr, LOCAL: tl.constexpr, GEN_B: tl.constexpr, SHIFT: tl.constexpr,
                   NARROW: tl.constexpr, ROWS: tl.constexpr):
    t = tl.program_id(0)
    g = tl.program_id(1)
    if ROWS:  # as `_lse_kernel`; programs past a shorter row's queries do nothing
        b, g, tq, q_start, n_kernels = row_params(rows_ptr, n_rows, g, n_groups, 3)
        if t < tq:
            _select_query(s_ptr + b * stride_sb, out_ptr + b * stride_ob, t, g, q_start, n_kernels, stride_sh,
                          stride_st, stride_oh, stride_ot, k_top, K_PAD, NB_PAD, PER_BLOCK, PAD, WIDTH, KSIZE, KSTRIDE,
                          BLOCK, INIT, LOCAL, GEN_B, SHIFT, NARROW)
    else:
        _select_query(s_ptr, out_ptr, t, g, q_start, n_kernels, stride_sh, stride_st, stride_oh, stride_ot, k_top,
                      K_PAD, NB_PAD, PER_BLOCK, PAD, WIDTH, KSIZE, KSTRIDE, BLOCK, INIT, LOCAL, GEN_B, SHIFT, NARROW)


@triton.jit
def _select_query(s_ptr, out_ptr, t, g, q_start, n_kernels, stride_sh, stride_st, stride_oh, stride_ot,
                  k_top, K_PAD: tl.constexpr, NB_PAD: tl.constexpr, PER_BLOCK: tl.constexpr,
                  PAD: tl.constexpr, WIDTH: tl.constexpr, KSIZE: tl.constexpr, KSTRIDE: tl.constexpr,
                  BLOCK: tl.constexpr, INIT: tl.constexpr, LOCAL: tl.constexpr, GEN_B: tl.constexpr,
                  SHIFT: tl.constexpr, NARROW: tl.constexpr):
    pos = q_start + t
    qb = pos // BLOCK
    row = s_ptr + g * stride_sh + t * stride_st
    obase = out_ptr + g * stride_oh + t * stride_ot
    # Lanes: a quarter or half of NB_PAD when the query's blocks fit (the early tokens of a long prefill).
    if NB_PAD >= 64:
        if qb < NB_PAD // 4:
            _select_row(row, obase, pos, qb, n_kernels, k_top, K_PAD, NB_PAD // 4, PER_BLOCK, PAD, WIDTH, KSIZE,
                        KSTRIDE, INIT, LOCAL, GEN_B, SHIFT, NARROW)
        elif qb < NB_PAD // 2:
            _select_row(row, obase, pos, qb, n_kernels, k_top, K_PAD, NB_PAD // 2, PER_BLOCK, PAD, WIDTH, KSIZE,
                        KSTRIDE, INIT, LOCAL, GEN_B, SHIFT, NARROW)
        else:
            _select_row(row, obase, pos, qb, n_kernels, k_top, K_PAD, NB_PAD, PER_BLOCK, PAD, WIDTH, KSIZE, KSTRIDE,
                        INIT, LOCAL, GEN_B, SHIFT, NARROW)
    else:
        _select_row(row, obase, pos, qb, n_kernels, k_top, K_PAD, NB_PAD, PER_BLOCK, PAD, WIDTH, KSIZE, KSTRIDE, INIT,
                    LOCAL, GEN_B, SHIFT, NARROW)


@triton.jit
def _select_row(row, obase, pos, qb, n_kernels, k_top, K_PAD: tl.constexpr, NB: tl.constexpr,
                PER_BLOCK: tl.constexpr, PAD: tl.constexpr, WIDTH: tl.constexpr, KSIZE: tl.constexpr,
                KSTRIDE: tl.constexpr, INIT: tl.constexpr, LOCAL: tl.constexpr, GEN_B: tl.constexpr,
                SHIFT: tl.constexpr, NARROW: tl.constexpr):
    """One query's selection over lanes [0, NB) (its blocks 0..qb all among them) from its kernel scores."""
    b = tl.arange(0, NB)
    # Max over the fine kernels overlapping each block; invisible or missing kernels count as 0.
    pooled = tl.zeros((NB,), dtype=tl.float32)
    for w in range(WIDTH):
        c = b * PER_BLOCK - PAD + w
        ok = (c >= 0) & (c < n_kernels) & (c * KSTRIDE + KSIZE - 1 <= pos)
        pooled = tl.maximum(pooled, tl.load(row + c, mask=ok, other=0.0).to(tl.float32))
    sel = topk_mask(pooled, b, qb, k_top, INIT, LOCAL, GEN_B, SHIFT, NARROW)
    slot = tl.cumsum(sel.to(tl.int32), 0) - 1
    tl.store(obase + slot, b, mask=sel)
    n_sel = tl.sum(sel.to(tl.int32), 0)
    i = tl.arange(0, K_PAD)
    tl.store(obase + i, tl.full((K_PAD,), -1, dtype=tl.int32), mask=(i >= n_sel) & (i < k_top))


def select_blocks(scores: torch.Tensor, q_start: int, tq: int, n_kernels: int, cfg: SparseConfig,
                  narrow: bool | None = None, rows: Rows | None = None) -> torch.Tensor:
    """Stage 3 -> int32 [hkv, Tq, K] ascending block ids, -1 padded (same rule as reference.select_blocks).
    narrow: the binary search over the unforced keys' range only (`topk_mask`; None: SELECT_NARROW).
    rows: several sequences (scores [R, hkv, T, N1] from `block_scores`; q_start, tq, n_kernels unused) ->
    [R, hkv, T, K] with K for the longest (a shorter sequence's rows -1 padded past its own count)."""
    if rows is None:
        scores = scores[None]
        n_blocks = (q_start + tq - 1) // cfg.block_size + 1
    else:
        n_blocks = rows.blocks(cfg.block_size)
        tq = rows.tq
    r, hkv = scores.shape[:2]
    bsz = cfg.block_size
    k = min(cfg.num_selected, n_blocks)
    out = padded_empty(r, hkv, tq, k, dtype=torch.int32, device=scores.device)
    s = cfg.kernel_stride
    _select_kernel[(tq, hkv * r)](scores, out, tq, q_start, n_kernels, scores.stride(1), scores.stride(2),
                                  out.stride(1), out.stride(2), scores if rows is None else rows.table, r, hkv,
                                  scores.stride(0), out.stride(0), k_top=k, K_PAD=triton.next_power_of_2(k),
                                  NB_PAD=triton.next_power_of_2(n_blocks), PER_BLOCK=bsz // s,
                                  PAD=cfg.kernel_size // s - 1, WIDTH=bsz // s + cfg.kernel_size // s - 1,
                                  KSIZE=cfg.kernel_size, KSTRIDE=s, BLOCK=bsz, INIT=cfg.init_blocks,
                                  LOCAL=cfg.local_blocks, GEN_B=cfg.variant == "gen-b",
                                  SHIFT=score_shift(scores.dtype), NARROW=SELECT_NARROW if narrow is None else narrow,
                                  ROWS=rows is not None)
    return out if rows is not None else out[0]
