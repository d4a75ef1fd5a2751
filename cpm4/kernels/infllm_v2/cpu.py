"""InfLLM v2's stage 4 off the GPU: per KV head, over the union of the blocks a chunk of queries attends to, as
one masked matrix product, instead of gathering every query's own copy of its blocks (the reference's
definition: [hkv, Tq, nsel * block, d] per chunk, hundreds of MB and most of a CPU prefill's time). Same function
as `reference.block_sparse_attention` up to summation order; differentiable. `sparse_attention` runs the
reference's stages 1-3 with this stage 4 (`reference.infllm_v2_attention(attend=...)`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cpm4.numerics import upcast

from . import reference

# Queries per chunk: bounds the [g, chunk, union * block] score matrix of one KV head.
CHUNK = 256
# Up to this many queries (decode steps) the reference's gather is as fast: no union or mask to build
# (benchmarks/cpu_sparse.py: decode at 1-4K tokens 0.8-1.0x with the union).
FEW = 4
# Decode: the masked dense pass while the attended tokens are at least 1/DENSE_FRACTION of the longest row
# (demo model, 8 rows: 1.11x at 51% attended, 0.85x at 27%; benchmarks/cpu_engine_decode.py --peer token-gather).
DENSE_FRACTION = 2


def block_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, blocks: torch.Tensor,
                           q_pos: torch.Tensor, block_size: int, scale: float) -> torch.Tensor:
    """`reference.block_sparse_attention`'s output: q [Tq, hq, d], k/v [Tk, hkv, d], blocks [hkv, Tq, nsel]
    (-1 unused), q_pos [Tq] -> [Tq, hq, d] in q's dtype (0 for a query that sees no token)."""
    tq, hq, d = q.shape
    tk, hkv, _ = k.shape
    if tq <= FEW:
        return reference.block_sparse_attention(q, k, v, blocks, q_pos, block_size, scale)[0]
    g = hq // hkv
    qf, kf, vf = upcast(q), upcast(k), upcast(v)
    out = torch.empty(tq, hkv, g, d, dtype=qf.dtype, device=q.device)
    offs = torch.arange(block_size, device=q.device)
    for h in range(hkv):
        for i in range(0, tq, CHUNK):
            blk, pos = blocks[h, i:i + CHUNK], q_pos[i:i + CHUNK]  # [c, nsel], [c]
            union = torch.unique(blk[blk >= 0])  # ascending
            tok = (union[:, None] * block_size + offs).flatten()  # [u * block]
            chosen = (blk[:, :, None] == union[None, None, :]).any(1)  # [c, u]: block u attended by query
            allowed = chosen.repeat_interleave(block_size, 1) & (tok[None, :] <= pos[:, None]) & (tok < tk)
            tok = tok.clamp_max(tk - 1)
            seen = allowed.any(1, keepdim=True)  # a query that sees no token: output 0, as the reference's
            allowed = allowed | ~seen  # (its row unmasked so the softmax stays finite, then zeroed)
            kh, vh = (x[tok, h].expand(g, -1, -1) for x in (kf, vf))  # the group's heads share them
            o = F.scaled_dot_product_attention(qf[i:i + CHUNK, h * g:(h + 1) * g].transpose(0, 1), kh, vh,
                                               attn_mask=allowed[None], scale=scale)  # [g, c, d]
            out[i:i + CHUNK, h] = (o * seen[None]).transpose(0, 1)
    return out.reshape(tq, hq, d).to(q.dtype)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, blocks: torch.Tensor, q_pos: torch.Tensor,
                     block_size: int, scale: float) -> torch.Tensor:
    """Stage 4 of a decode step over R sequences (`reference.decode_rows`): q [R, hq, d], k/v [R, Tmax, hkv,
    d], blocks [hkv, R, nsel], q_pos [R] -> [R, hq, d]. While the attended blocks cover a good part of the
    rows' keys, a dense pass over every key in place with the selection as a mask is faster; beyond that,
    the reference's gather of the selected tokens moves less."""
    r, hq, d = q.shape
    tmax, hkv = k.shape[1], k.shape[2]
    if blocks.shape[-1] * block_size * DENSE_FRACTION < tmax:
        return reference._gather_attention(q, k, v, blocks, q_pos, block_size, scale)[0]
    g = hq // hkv
    n_blk = -(-tmax // block_size)
    chosen = torch.zeros(hkv, r, n_blk + 1, dtype=torch.bool, device=q.device)  # slot n_blk: unused (-1)
    chosen.scatter_(2, torch.where(blocks >= 0, blocks, n_blk).long(), True)
    allowed = chosen[..., :n_blk].repeat_interleave(block_size, 2)[..., :tmax]  # [hkv, R, Tmax]
    allowed = allowed & (torch.arange(tmax, device=q.device) <= q_pos[:, None])[None]
    seen = allowed.any(2)  # [hkv, R]; a row that sees nothing: output 0, as the reference's
    allowed = allowed | ~seen[..., None]
    qf, kf, vf = upcast(q), upcast(k), upcast(v)
    # Grouped matmuls: the g query heads of a KV head against its keys in place (no expanded copy of K/V).
    s = torch.matmul(qf.view(r, hkv, g, d), kf.permute(0, 2, 3, 1)) * scale  # [R, hkv, g, Tmax]
    s = s.masked_fill(~allowed.permute(1, 0, 2)[:, :, None], float("-inf"))
    o = torch.matmul(torch.softmax(s, -1), vf.transpose(1, 2))  # [R, hkv, g, d]
    o = o * seen.t()[:, :, None, None]
    return o.reshape(r, hq, d).to(q.dtype)
