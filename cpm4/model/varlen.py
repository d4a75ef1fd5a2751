"""Attention of packed variable-length sequences with its log-sum-exp: PyTorch's flash kernel on the GPU, float32
math elsewhere (the same numbers, for tests), and the merge of attention over two disjoint key sets (cascade
attention: a shared prefix's keys read once for every row, each row's own keys after them)."""

from __future__ import annotations

import functools

import torch


def varlen_flash_ok(q: torch.Tensor) -> bool:
    """Whether PyTorch's variable-length flash kernel takes these queries: CUDA, fp16/bf16, an sm80+ GPU (the
    kernel's own limit: a T4 or V100 keeps the row-by-row path), head dim a multiple of 8 up to 256."""
    d = q.shape[-1]
    return (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and d % 8 == 0 and d <= 256
            and _capability(q.device) >= (8, 0))


@functools.cache
def _capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


def attention_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor,
                  max_q: int, max_k: int, causal: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequence j's queries q[cu_q[j]:cu_q[j+1]] ([total_q, hq, d]) over its keys k/v[cu_k[j]:cu_k[j+1]]
    ([total_k, hkv, d], GQA: query head h reads KV head h // (hq // hkv)); causal aligned bottom-right (query i of
    n sees the first len_k - n + i + 1 keys). Returns the output [total_q, hq, d] and the log-sum-exp of each
    query's scaled scores, [hq, total_q] in float32 (natural log; float64 for float64 inputs, off the GPU).
    cu_q/cu_k: int32 offsets on q's device."""
    if varlen_flash_ok(q):
        o, lse = torch.ops.aten._flash_attention_forward(q, k, v, cu_q, cu_k, max_q, max_k, 0.0, causal, False,
                                                         scale=scale)[:2]
        return o, lse
    return attention_lse_reference(q, k, v, cu_q, cu_k, causal, scale)


def attention_lse_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor,
                            cu_k: torch.Tensor, causal: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`attention_lse` in plain PyTorch, sequence by sequence, in float32 (float64 inputs stay float64)."""
    g = q.shape[1] // k.shape[1]
    ct = torch.promote_types(q.dtype, torch.float32)
    cq, ck = cu_q.tolist(), cu_k.tolist()
    outs, lses = [], []
    for j in range(len(cq) - 1):
        qj = q[cq[j]:cq[j + 1]].to(ct)
        kj, vj = (x[ck[j]:ck[j + 1]].to(ct).repeat_interleave(g, dim=1) for x in (k, v))
        s = torch.einsum("qhd,khd->hqk", qj, kj) * scale
        if causal:
            nq, nk = qj.shape[0], kj.shape[0]
            above = torch.arange(nk, device=q.device)[None, :] > (nk - nq + torch.arange(nq, device=q.device))[:, None]
            s = s.masked_fill(above, float("-inf"))
        lses.append(torch.logsumexp(s, dim=-1))
        outs.append(torch.einsum("hqk,khd->qhd", torch.softmax(s, dim=-1), vj))
    return torch.cat(outs).to(q.dtype), torch.cat(lses, dim=1)


def merge_attention(o1: torch.Tensor, lse1: torch.Tensor, o2: torch.Tensor, lse2: torch.Tensor) -> torch.Tensor:
    """Attention over two disjoint key sets as attention over their union: each part's output weighted by its share
    of the softmax mass, exp(its log-sum-exp). o: [n, h, d]; lse: [h, n] (as `attention_lse` returns them)."""
    l1, l2 = lse1.t()[..., None], lse2.t()[..., None]
    m = torch.maximum(l1, l2)
    w1, w2 = torch.exp(l1 - m), torch.exp(l2 - m)
    ct = torch.promote_types(o1.dtype, torch.float32)
    return ((o1.to(ct) * w1 + o2.to(ct) * w2) / (w1 + w2)).to(o1.dtype)
