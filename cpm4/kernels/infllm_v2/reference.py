"""InfLLM v2 in plain PyTorch: the executable form of spec/infllm_v2.md and the reference for the kernels.

All functions work on one sequence (no batch dimension): queries `q [Tq, hq, d]` are the last `Tq`
tokens of a sequence whose post-RoPE keys/values are `k, v [Tk, hkv, d]` (prefill: Tq == Tk; decode:
Tq == 1; chunked prefill: anything in between). Query i sits at absolute position `q_start + i`.

Stages:
1. semantic kernels: mean-pooled keys, fine (kernel_size/kernel_stride) and coarse (4x, for the LSE);
2. block scores: per query token, softmax relevance to the visible fine kernels, summed over the query
   heads of a GQA group (one row per KV head);
3. block selection: max-pool kernel scores onto blocks, force initial/local blocks, top-k;
4. block-sparse attention over the selected blocks, causal inside the query's own block.

Tie rule (documented, deterministic): top-k is a stable descending sort, so among equal scores the lower
block index wins, and blocks after the query's block are never candidates (-inf). The official kernels
leave ties to the CUDA top-k; this resolves them one fixed way.
"""

from __future__ import annotations

import math

import torch

from cpm4.model.config import SparseConfig
from cpm4.numerics import upcast

# Queries processed per chunk: bounds the gathered K/V ([hkv, chunk, blocks*B, d]) and score tensors.
QUERY_CHUNK = 256


def num_kernels(n_tokens: int, kernel_size: int, kernel_stride: int) -> int:
    """Complete kernels over n tokens: kernel j covers tokens [j*stride, j*stride + size)."""
    return 0 if n_tokens < kernel_size else (n_tokens - kernel_size) // kernel_stride + 1


def kernel_means(k: torch.Tensor, kernel_size: int, kernel_stride: int, start: int = 0,
                 stop: int | None = None) -> torch.Tensor:
    """Mean-pooled keys for kernels [start, stop) of k [T, hkv, d] -> [stop-start, hkv, d] (k's dtype)."""
    n = num_kernels(k.shape[0], kernel_size, kernel_stride)
    stop = n if stop is None else stop
    if not 0 <= start <= stop <= n:
        raise ValueError(f"kernel range [{start}, {stop}) outside the {n} complete kernels")
    if start == stop:
        return k.new_empty((0,) + tuple(k.shape[1:]))
    first = start * kernel_stride
    last = (stop - 1) * kernel_stride + kernel_size
    windows = k[first:last].unfold(0, kernel_size, kernel_stride)  # [stop-start, hkv, d, size]
    return windows.mean(dim=-1)


def compress_keys(k: torch.Tensor, cfg: SparseConfig) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Fine semantic-kernel keys, and the coarse ones used for the LSE approximation (Gen-B only)."""
    k1 = kernel_means(k, cfg.kernel_size, cfg.kernel_stride)
    k2 = kernel_means(k, cfg.coarse_kernel_size, cfg.coarse_kernel_stride) if cfg.variant == "gen-b" else None
    return k1, k2


def kernel_slots(page: int, kernel_stride: int) -> int:
    """Kernel keys stored per KV page in the paged layout (kernels end every `kernel_stride` tokens)."""
    if page % kernel_stride:
        raise ValueError(f"page size {page} must be a multiple of the kernel stride {kernel_stride}")
    return page // kernel_stride


def kernel_page_slots(j: torch.Tensor, kernel_size: int, kernel_stride: int, page: int
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Paged layout of semantic-kernel keys: kernel j lives in the logical page holding its last token,
    at slot (last % page) // stride, so a page's kernel keys depend only on tokens up to the page's end
    (pages shared by a common prefix share their kernel keys). Returns (logical page, slot)."""
    last = j * kernel_stride + kernel_size - 1
    return last // page, (last % page) // kernel_stride


def kernel_visible(q_pos: torch.Tensor, n: int, kernel_size: int, kernel_stride: int) -> torch.Tensor:
    """[Tq, n] bool: kernel j is visible to a query at position p once it is complete, j*s + size - 1 <= p."""
    ends = torch.arange(n, device=q_pos.device) * kernel_stride + kernel_size - 1
    return ends[None, :] <= q_pos[:, None]


def block_scores(q: torch.Tensor, k1: torch.Tensor, k2: torch.Tensor | None, q_pos: torch.Tensor,
                 cfg: SparseConfig, scale: float) -> torch.Tensor:
    """Stage 1: group-summed softmax relevance of each query to the fine kernels -> [hkv, Tq, N1].

    The softmax normaliser is the exact LSE over visible fine kernels (Gen-A) or the LSE over visible
    coarse kernels (Gen-B's approximation, which leaves rows unnormalised). Rows without any visible
    normalising kernel score 0 everywhere (they are covered by forced blocks). Stored in q's dtype, as
    the kernels store it.

    k1/k2 [Tq, N, hkv, d] instead: each query's own sequence's kernel keys (`decode_rows`: one query per
    sequence; a shorter sequence's kernels past its own are invisible to its query by position).
    """
    tq, hq, d = q.shape
    hkv = k1.shape[-2]
    g = hq // hkv
    qf = upcast(q).view(tq, hkv, g, d)
    keys = "tjhd" if k1.dim() == 4 else "jhd"
    s1 = torch.einsum(f"thgd,{keys}->hgtj", qf, upcast(k1)) * scale
    vis1 = kernel_visible(q_pos, k1.shape[-3], cfg.kernel_size, cfg.kernel_stride)
    if cfg.variant == "gen-b":
        s2 = torch.einsum(f"thgd,{keys}->hgtj", qf, upcast(k2)) * scale
        vis2 = kernel_visible(q_pos, k2.shape[-3], cfg.coarse_kernel_size, cfg.coarse_kernel_stride)
        lse = s2.masked_fill(~vis2, -math.inf).logsumexp(-1, keepdim=True)
    else:
        lse = s1.masked_fill(~vis1, -math.inf).logsumexp(-1, keepdim=True)
    p = torch.exp(s1 - lse)
    p = torch.where(vis1 & torch.isfinite(lse), p, torch.zeros((), device=p.device))
    return p.sum(dim=1).to(q.dtype)


def pool_to_blocks(scores: torch.Tensor, n_blocks: int, cfg: SparseConfig) -> torch.Tensor:
    """Max over the fine kernels that overlap each block -> [..., n_blocks] float32 (0 where none).

    Kernel c covers tokens [c*s, c*s + size); block b covers [b*B, (b+1)*B). With size 32, stride 16,
    block 64 this is the reference's max-pool of width 5, stride 4, padding 1 (kernels 4b-1 .. 4b+3).
    """
    s, size, bsz = cfg.kernel_stride, cfg.kernel_size, cfg.block_size
    per_block, pad = bsz // s, size // s - 1
    width = per_block + pad
    n = scores.shape[-1]
    need = (n_blocks - 1) * per_block + width  # padded length so every block has a full window
    x = upcast(scores)
    # Windows past the last kernel are empty: pad with zeros (the value of a masked score).
    left = x.new_zeros(x.shape[:-1] + (pad,))
    right = x.new_zeros(x.shape[:-1] + (max(need - pad - n, 0),))
    x = torch.cat([left, x, right], dim=-1)[..., :need]
    return x.unfold(-1, width, per_block).amax(dim=-1)


def select_blocks(scores: torch.Tensor, q_pos: torch.Tensor, cfg: SparseConfig) -> torch.Tensor:
    """Stage 3: top-k blocks per KV head and query -> int64 [hkv, Tq, K], ascending, -1 padded at the end.

    Gen-B forces the initial blocks and the local window (qb-local .. qb) to +inf and counts them in the
    top-k of topk + local blocks. Gen-A forces the initial blocks, excludes the local window
    (qb-local+1 .. qb, which the attention adds itself) and takes topk.
    """
    n_blocks = int(q_pos.max()) // cfg.block_size + 1
    return select_pooled(pool_to_blocks(scores, n_blocks, cfg), q_pos, cfg)


def select_pooled(pooled: torch.Tensor, q_pos: torch.Tensor, cfg: SparseConfig) -> torch.Tensor:
    """`select_blocks` from block scores already max-pooled: pooled [hkv, Tq, n_blocks] -> [hkv, Tq, K]."""
    bsz = cfg.block_size
    n_blocks = pooled.shape[-1]
    b = torch.arange(n_blocks, device=pooled.device)[None, :]
    qb = (q_pos // bsz)[:, None]
    inf = torch.tensor(math.inf, device=pooled.device)
    init = b < cfg.init_blocks
    if cfg.variant == "gen-b":
        forced = init | ((b >= qb - cfg.local_blocks) & (b <= qb))
        pooled = torch.where(forced, inf, pooled)
    else:
        pooled = torch.where(init & (b <= qb), inf, pooled)
        pooled = torch.where((b > qb - cfg.local_blocks) & (b <= qb), -inf, pooled)
    pooled = torch.where(b > qb, -inf, pooled)
    k = min(cfg.num_selected, n_blocks)
    order = torch.sort(pooled, dim=-1, descending=True, stable=True).indices[..., :k]
    valid = torch.gather(pooled, -1, order) > -math.inf
    big = torch.iinfo(torch.int64).max
    idx = torch.sort(torch.where(valid, order, big), dim=-1).values
    return torch.where(idx == big, -1, idx)


def attended_blocks(idx: torch.Tensor, q_pos: torch.Tensor, cfg: SparseConfig) -> torch.Tensor:
    """The blocks stage 2 reads: the selection, plus (Gen-A) the local window qb-local+1 .. qb."""
    if cfg.variant == "gen-b":
        return idx
    qb = q_pos // cfg.block_size
    win = qb[:, None] - torch.arange(cfg.local_blocks - 1, -1, -1, device=idx.device)[None, :]
    win = torch.where(win >= 0, win, -1)
    return torch.cat([idx, win.unsqueeze(0).expand(idx.shape[0], -1, -1)], dim=-1)


def block_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, blocks: torch.Tensor,
                           q_pos: torch.Tensor, block_size: int, scale: float, chunk: int = QUERY_CHUNK
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Stage 4: each query attends to the tokens t <= p of its blocks (gathered, not masked densely).

    q [Tq, hq, d]; k, v [Tk, hkv, d]; blocks [hkv, Tq, nsel] (-1 unused) -> out [Tq, hq, d] (q dtype),
    lse [Tq, hq] (-inf for a query that sees nothing; its output is 0). Differentiable in q, k, v.
    """
    outs, lses = [], []
    for i in range(0, q.shape[0], chunk):
        o, l = _gather_attention(q[i:i + chunk], k, v, blocks[:, i:i + chunk], q_pos[i:i + chunk], block_size, scale)
        outs.append(o)
        lses.append(l)
    return torch.cat(outs, 0), torch.cat(lses, 0)


def _gather_attention(q, k, v, blocks, q_pos, block_size, scale):
    """k, v [Tk, hkv, d], or [Tq, Tk, hkv, d]: each query's own sequence (see `decode_rows`)."""
    tq, hq, d = q.shape
    tk, hkv = k.shape[-3:-1]
    g = hq // hkv
    tok = blocks[..., None] * block_size + torch.arange(block_size, device=q.device)  # [hkv, Tq, nsel, B]
    tok = tok.flatten(2)
    valid = (blocks[..., None] >= 0).expand(-1, -1, -1, block_size).flatten(2)
    valid = valid & (tok <= q_pos[None, :, None]) & (tok < tk)
    tok = torch.where(valid, tok, 0)
    heads = torch.arange(hkv, device=q.device)[:, None, None]
    if k.dim() == 4:  # per-query sequences
        rows = torch.arange(tq, device=q.device)[None, :, None]
        kg, vg = upcast(k)[rows, tok, heads], upcast(v)[rows, tok, heads]  # [hkv, Tq, S, d]
    else:
        kh, vh = upcast(k).transpose(0, 1), upcast(v).transpose(0, 1)  # [hkv, Tk, d]
        kg, vg = kh[heads, tok], vh[heads, tok]  # [hkv, Tq, S, d]
    qf = upcast(q).view(tq, hkv, g, d)
    s = torch.einsum("thgd,htsd->hgts", qf, kg) * scale
    s = s.masked_fill(~valid[:, None], -math.inf)
    lse = s.logsumexp(-1)  # [hkv, g, Tq]
    p = torch.exp(s - torch.where(torch.isfinite(lse), lse, 0.0)[..., None])
    out = torch.einsum("hgts,htsd->thgd", p, vg).reshape(tq, hq, d)
    return out.to(q.dtype), lse.permute(2, 0, 1).reshape(tq, hq)


def decode_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lens: torch.Tensor, cfg: SparseConfig,
                scale: float, k1: torch.Tensor, k2: torch.Tensor | None, attend=None) -> torch.Tensor:
    """One decode step of R sequences at once: row r's query q[r] [hq, d] is the last of its lens[r] tokens,
    whose keys/values are k, v[r, :lens[r]] ([R, Tmax, hkv, d], right-padded) and kernel keys k1/k2[r]
    ([R, N, hkv, d], right-padded). The same stages as `infllm_v2_attention` of each row alone, with the rows
    on the query axis (a position per query masks each row's padding) -> [R, hq, d]. `attend`: another stage
    4 with `_gather_attention`'s arguments returning the output only (`cpu.decode_attention`)."""
    pos = (lens - 1).to(q.device)
    idx = select_blocks(block_scores(q, k1, k2, pos, cfg, scale), pos, cfg)
    blocks = attended_blocks(idx, pos, cfg)
    if attend is not None:
        return attend(q, k, v, blocks, pos, cfg.block_size, scale)
    return _gather_attention(q, k, v, blocks, pos, cfg.block_size, scale)[0]


def infllm_v2_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: SparseConfig,
                        scale: float | None = None, k1: torch.Tensor | None = None,
                        k2: torch.Tensor | None = None, return_blocks: bool = False,
                        chunk: int = QUERY_CHUNK, attend=None):
    """InfLLM v2 attention of the last Tq tokens over the whole sequence -> out [Tq, hq, d].

    `k1`/`k2` are the sequence's semantic-kernel keys when a cache already holds them (decode); they
    must equal `compress_keys(k, cfg)` (at least the kernels the queries can see).
    With return_blocks, also returns the selected block indices [hkv, Tq, K].
    `attend`: another stage 4 with `block_sparse_attention`'s arguments returning the output only
    (`cpu.block_sparse_attention`); default this module's.
    """
    tq, hq, d = q.shape
    tk, hkv, _ = k.shape
    if hq % hkv:
        raise ValueError(f"query heads {hq} not a multiple of key/value heads {hkv}")
    if tq > tk:
        raise ValueError(f"more queries ({tq}) than keys ({tk})")
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    if k1 is None:
        k1, k2 = compress_keys(k, cfg)
    q_pos_all = torch.arange(tk - tq, tk, device=q.device)
    outs, sel = [], []
    for i in range(0, tq, chunk):
        qc, pos = q[i:i + chunk], q_pos_all[i:i + chunk]
        scores = block_scores(qc, k1, k2, pos, cfg, scale)
        idx = select_blocks(scores, pos, cfg)
        blocks = attended_blocks(idx, pos, cfg)
        if attend is None:
            out, _ = block_sparse_attention(qc, k, v, blocks, pos, cfg.block_size, scale)
        else:
            out = attend(qc, k, v, blocks, pos, cfg.block_size, scale)
        outs.append(out)
        if return_blocks:
            sel.append(idx)
    out = torch.cat(outs, 0)
    if not return_blocks:
        return out
    width = max(s.shape[-1] for s in sel)
    sel = [torch.nn.functional.pad(s, (0, width - s.shape[-1]), value=-1) for s in sel]
    return out, torch.cat(sel, 1)


def paged_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, table: torch.Tensor,
                 lens: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Dense decode over a paged cache in float64: q [B, hq, d]; caches [pages, page, hkv, d]; table [B, W]
    (each row's pages); lens [B] (tokens, the current one included) -> [B, hq, d] float64."""
    b, hq, d = q.shape
    hkv = k_cache.shape[2]
    scale = d ** -0.5 if scale is None else scale
    out = torch.zeros(b, hq, d, dtype=torch.float64, device=q.device)
    for i in range(b):
        n = int(lens[i])
        k = k_cache[table[i].long()].flatten(0, 1)[:n].double().repeat_interleave(hq // hkv, dim=1)
        v = v_cache[table[i].long()].flatten(0, 1)[:n].double().repeat_interleave(hq // hkv, dim=1)
        w = torch.softmax(torch.einsum("hd,nhd->hn", q[i].double(), k) * scale, dim=-1)
        out[i] = torch.einsum("hn,nhd->hd", w, v)
    return out
