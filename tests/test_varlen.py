"""Packed variable-length attention with its log-sum-exp (`cpm4.model.varlen`) against plain float64 attention,
and the merge of attention over two disjoint key sets (cascade attention)."""

import math

import pytest
import torch

from cpm4.model.varlen import attention_lse, merge_attention


def _packed(n_q, n_k, hq=4, hkv=2, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(sum(n_q), hq, d, generator=g, dtype=torch.float64)
    k = torch.randn(sum(n_k), hkv, d, generator=g, dtype=torch.float64)
    v = torch.randn(sum(n_k), hkv, d, generator=g, dtype=torch.float64)
    cu = [torch.tensor([0, *torch.tensor(x).cumsum(0).tolist()], dtype=torch.int32) for x in (n_q, n_k)]
    return q, k, v, cu[0], cu[1]


def _naive(q, k, v, causal, scale):
    """One sequence, query by query and head by head: o [nq, hq, d], lse [hq, nq]."""
    nq, hq, _ = q.shape
    nk, hkv, _ = k.shape
    o, lse = torch.zeros_like(q), torch.zeros(hq, nq, dtype=q.dtype)
    for i in range(nq):
        last = nk - nq + i if causal else nk - 1
        for h in range(hq):
            kv = h // (hq // hkv)
            s = [scale * float(q[i, h] @ k[j, kv]) for j in range(last + 1)]
            m = max(s)
            z = sum(math.exp(x - m) for x in s)
            lse[h, i] = m + math.log(z)
            o[i, h] = sum(math.exp(x - m) / z * v[j, kv] for j, x in enumerate(s))
    return o, lse


@pytest.mark.parametrize("causal", [True, False])
def test_attention_lse_against_naive(causal):
    """Each sequence's output and log-sum-exp equal a per-query, per-head loop in float64 (GQA, bottom-right causal
    with more keys than queries)."""
    n_q, n_k = [3, 1, 5], [7, 4, 5]
    q, k, v, cu_q, cu_k = _packed(n_q, n_k)
    o, lse = attention_lse(q, k, v, cu_q, cu_k, max(n_q), max(n_k), causal, 0.3)
    assert o.shape == q.shape and lse.shape == (q.shape[1], q.shape[0])
    for j in range(len(n_q)):
        qs, ks = slice(int(cu_q[j]), int(cu_q[j + 1])), slice(int(cu_k[j]), int(cu_k[j + 1]))
        want_o, want_lse = _naive(q[qs], k[ks], v[ks], causal, 0.3)
        torch.testing.assert_close(o[qs], want_o, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(lse[:, qs], want_lse, rtol=1e-10, atol=1e-10)


def test_merge_of_two_key_sets_is_attention_over_their_union():
    """Queries over a shared prefix of keys (not causal) and over their own keys after it (causal) merged by
    log-sum-exp: the causal attention over all keys, for every query (cascade attention)."""
    p, n_own, n_q = 9, [6, 3], [4, 2]
    q, k, v, _, _ = _packed(n_q, [p + sum(n_own)], seed=1)
    pre_k, pre_v = k[:p], v[:p]
    own_k, own_v = k[p:], v[p:]
    cu_all = torch.tensor([0, sum(n_q)], dtype=torch.int32)
    o1, l1 = attention_lse(q, pre_k, pre_v, cu_all, torch.tensor([0, p], dtype=torch.int32), sum(n_q), p, False, 0.5)
    cu_q = torch.tensor([0, n_q[0], sum(n_q)], dtype=torch.int32)
    cu_k = torch.tensor([0, n_own[0], sum(n_own)], dtype=torch.int32)
    o2, l2 = attention_lse(q, own_k, own_v, cu_q, cu_k, max(n_q), max(n_own), True, 0.5)
    merged = merge_attention(o1, l1, o2, l2)
    for j in range(2):
        qs = slice(int(cu_q[j]), int(cu_q[j + 1]))
        ks = torch.cat([torch.arange(p), p + torch.arange(int(cu_k[j]), int(cu_k[j + 1]))])
        want, _ = _naive(q[qs], k[ks], v[ks], True, 0.5)
        torch.testing.assert_close(merged[qs], want, rtol=1e-10, atol=1e-10)
