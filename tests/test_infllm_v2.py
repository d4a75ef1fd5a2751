"""The InfLLM v2 reference against a brute-force definition written from the spec with plain Python
loops in float64: kernel means, per-query scores, block max, forced blocks, top-k, then a dense softmax
under the token-level mask that the selected blocks imply."""

import math

import pytest
import torch
from conftest import random_model

from cpm4.kernels.infllm_v2 import compress_keys, kernel_means, num_kernels, sparse_attention
from cpm4.kernels.infllm_v2.reference import infllm_v2_attention
from cpm4.model.config import SparseConfig


def cfg_small(variant="gen-b", **kw):
    base = dict(kernel_size=8, kernel_stride=4, init_blocks=1, block_size=16, window_size=32, topk=3,
                dense_len=-1, variant=variant)
    base.update(kw)
    return SparseConfig(**base)


def brute_force(q, k, v, cfg: SparseConfig):
    """Returns (out [Tq, hq, d], selected {(g, i): set(blocks)}) for queries at the end of the sequence."""
    tq, hq, d = q.shape
    tk, hkv, _ = k.shape
    G = hq // hkv
    sc = 1 / math.sqrt(d)
    ks, st, B = cfg.kernel_size, cfg.kernel_stride, cfg.block_size
    k2s, k2t = 4 * ks, 4 * st
    n1 = (tk - ks) // st + 1 if tk >= ks else 0
    n2 = (tk - k2s) // k2t + 1 if tk >= k2s else 0
    K1 = [[sum(k[j * st + u, g] for u in range(ks)) / ks for g in range(hkv)] for j in range(n1)]
    K2 = [[sum(k[j * k2t + u, g] for u in range(k2s)) / k2s for g in range(hkv)] for j in range(n2)]
    local = cfg.window_size // B
    out = torch.zeros(tq, hq, d, dtype=torch.float64)
    selected = {}
    for i in range(tq):
        p = tk - tq + i
        qb = p // B
        for g in range(hkv):
            vis1 = [j for j in range(n1) if j * st + ks - 1 <= p]
            S = {j: 0.0 for j in vis1}
            for h in range(g * G, (g + 1) * G):
                s1 = {j: float(q[i, h] @ K1[j][g]) * sc for j in vis1}
                if cfg.variant == "gen-b":
                    norm = [float(q[i, h] @ K2[j][g]) * sc for j in range(n2) if j * k2t + k2s - 1 <= p]
                else:
                    norm = list(s1.values())
                if not norm:
                    continue
                lse = math.log(sum(math.exp(x) for x in norm))
                for j in vis1:
                    S[j] += math.exp(s1[j] - lse)
            score = {}
            for b in range(qb + 1):
                over = [S[c] for c in vis1 if c * st < (b + 1) * B and c * st + ks > b * B]
                score[b] = max(over + [0.0])
                if cfg.variant == "gen-b":
                    if b < cfg.init_blocks or qb - local <= b <= qb:
                        score[b] = math.inf
                else:
                    if b < cfg.init_blocks:
                        score[b] = math.inf
                    if qb - local < b <= qb:
                        score[b] = -math.inf
            kk = cfg.topk + local if cfg.variant == "gen-b" else cfg.topk
            ranked = sorted(score, key=lambda b: (-score[b], b))
            chosen = {b for b in ranked[:kk] if score[b] > -math.inf}
            selected[(g, i)] = set(chosen)
            if cfg.variant == "gen-a":
                chosen |= {b for b in range(qb - local + 1, qb + 1) if b >= 0}
            allowed = [t for t in range(p + 1) if t // B in chosen]
            for h in range(g * G, (g + 1) * G):
                s = torch.stack([q[i, h] @ k[t, g] for t in allowed]) * sc
                w = torch.softmax(s, 0)
                out[i, h] = (w[:, None] * v[allowed, g]).sum(0)
    return out, selected


def rand_qkv(T, hq, hkv, d, tq=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    tq = T if tq is None else tq
    q = torch.randn(tq, hq, d, generator=g, dtype=torch.float64)
    k = torch.randn(T, hkv, d, generator=g, dtype=torch.float64)
    v = torch.randn(T, hkv, d, generator=g, dtype=torch.float64)
    # A common direction makes some blocks clearly more relevant than others.
    k[:, :, 0] += 2 * torch.randn(T, hkv, 1, generator=g, dtype=torch.float64)[..., 0]
    return q, k, v


@pytest.mark.parametrize("variant", ["gen-b", "gen-a"])
@pytest.mark.parametrize("T,hq,hkv,tq", [(150, 4, 2, None), (203, 4, 1, None), (177, 2, 2, 1), (130, 6, 2, 5)])
def test_reference_matches_brute_force(variant, T, hq, hkv, tq):
    cfg = cfg_small(variant)
    q, k, v = rand_qkv(T, hq, hkv, 8, tq)
    out, idx = infllm_v2_attention(q, k, v, cfg, return_blocks=True, chunk=37)
    ref, sel = brute_force(q, k, v, cfg)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    for (g, i), blocks in sel.items():
        got = {int(b) for b in idx[g, i] if b >= 0}
        assert got == blocks, (g, i)
    # Sparsity is real: late queries skip some of their past blocks.
    p_last = T - 1
    assert len(sel[(0, q.shape[0] - 1)]) < p_last // cfg.block_size + 1


@pytest.mark.parametrize("variant", ["gen-b", "gen-a"])
@pytest.mark.parametrize("T,hq,hkv,tq", [(150, 4, 2, None), (203, 4, 1, None), (177, 2, 2, 1), (130, 6, 2, 5)])
def test_cpu_stage4_equals_reference(variant, T, hq, hkv, tq, monkeypatch):
    """`sparse_attention` off the GPU (the reference's selection, `cpu.block_sparse_attention` as stage 4, query
    chunks smaller than the sequence) equals the gathering reference and the brute force in float64."""
    from cpm4.kernels.infllm_v2 import cpu

    monkeypatch.setattr(cpu, "CHUNK", 16)
    cfg = cfg_small(variant)
    q, k, v = rand_qkv(T, hq, hkv, 8, tq)
    out = sparse_attention(q, k, v, cfg)
    torch.testing.assert_close(out, infllm_v2_attention(q, k, v, cfg), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out, brute_force(q, k, v, cfg)[0], rtol=1e-10, atol=1e-10)


def test_cpu_stage4_edge_rows_and_gradients(monkeypatch):
    """Stage 4 off the GPU on explicit block lists: a query that sees no token gives 0 (as the reference),
    blocks past the sequence and the causal cut inside the query's block are masked, and the gradients equal
    the reference's."""
    from cpm4.kernels.infllm_v2 import cpu, reference

    monkeypatch.setattr(cpu, "FEW", 0)  # three queries: the union path, not the reference's gather
    g = torch.Generator().manual_seed(3)
    tk, hq, hkv, d, bs = 70, 4, 2, 8, 16
    q = torch.randn(3, hq, d, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(tk, hkv, d, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(tk, hkv, d, generator=g, dtype=torch.float64, requires_grad=True)
    pos = torch.tensor([5, 40, 69])
    blocks = torch.tensor([[[-1, -1, -1], [0, 2, -1], [1, 3, 4]],   # KV head 0: the first query sees nothing
                           [[0, -1, -1], [2, -1, -1], [0, 4, -1]]])  # block 2 holds query 1's causal cut
    ours = cpu.block_sparse_attention(q, k, v, blocks, pos, bs, 0.3)
    ref, _ = reference.block_sparse_attention(q, k, v, blocks, pos, bs, 0.3)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    assert (ours[0, :2] == 0).all() and ours[0, 2:].abs().sum() > 0
    w = torch.randn(ours.shape, generator=g, dtype=torch.float64)
    ga = torch.autograd.grad((ours * w).sum(), (q, k, v))
    gb = torch.autograd.grad((ref * w).sum(), (q, k, v))
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_selection_is_shared_by_gqa_group_and_sorted():
    cfg = cfg_small()
    q, k, v = rand_qkv(160, 8, 2, 8)
    _, idx = infllm_v2_attention(q, k, v, cfg, return_blocks=True)
    assert idx.shape[0] == 2  # one list per KV head
    for row in idx.reshape(-1, idx.shape[-1]).tolist():
        valid = [b for b in row if b >= 0]
        assert valid == sorted(valid) and row[len(valid):] == [-1] * (len(row) - len(valid))


def test_equals_dense_when_every_block_fits():
    # 5 blocks <= topk + local blocks: every past block is selected, so sparse == dense causal attention.
    cfg = cfg_small(topk=3, window_size=32)  # 3 + 2 = 5 selected
    q, k, v = rand_qkv(80, 4, 2, 8)
    out = sparse_attention(q, k, v, cfg)
    dense = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1), k.repeat_interleave(2, 1).transpose(0, 1), v.repeat_interleave(2, 1).transpose(0, 1),
        is_causal=True).transpose(0, 1)
    torch.testing.assert_close(out, dense, rtol=1e-12, atol=1e-12)


def test_incremental_kernel_means_equal_full():
    k = torch.randn(100, 2, 8, dtype=torch.float64)
    full = kernel_means(k, 8, 4)
    assert full.shape[0] == num_kernels(100, 8, 4) == 24
    parts = torch.cat([kernel_means(k, 8, 4, 0, 5), kernel_means(k, 8, 4, 5, 17), kernel_means(k, 8, 4, 17)])
    assert torch.equal(parts, full)
    torch.testing.assert_close(full[3], k[12:20].mean(0))
    k1, k2 = compress_keys(k, cfg_small())
    assert k1.shape[0] == 24 and k2.shape[0] == (100 - 32) // 16 + 1
    assert compress_keys(k, cfg_small("gen-a"))[1] is None
    with pytest.raises(ValueError, match="kernel range"):
        kernel_means(k, 8, 4, 0, 30)


def test_model_dense_len_above_length_is_exactly_dense():
    sparse = random_model("tiny")
    assert sparse.config.sparse_config.dense_len == 256
    dense = random_model("tiny", sparse_config=None)
    ids = torch.randint(0, 1000, (2, 200), generator=torch.Generator().manual_seed(0))
    assert torch.equal(sparse(ids), dense(ids))
    # At or above dense_len the sparse path really runs and differs from dense.
    ids = torch.randint(0, 1000, (1, 300), generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(sparse(ids), dense(ids), atol=1e-6)


def test_sparse_model_layer_matches_brute_force():
    """One attention layer of the model in sparse mode equals brute force on its own q, k, v."""
    from cpm4.model.rope import apply_rotary

    model = random_model("tiny", sparse_config={**random_model("tiny").config.sparse_config.to_dict(),
                                                "dense_len": -1})
    attn = model.model.layers[0].self_attn
    x = torch.randn(1, 120, model.config.hidden_size, dtype=torch.float64)
    pos = torch.arange(120)[None]
    cos, sin = model.rotary(pos, torch.float64)
    out = attn(x, cos, sin, torch.zeros(1, dtype=torch.long), torch.tensor([120]))
    q = apply_rotary(attn.q_proj(x).view(1, 120, 8, 16), cos, sin)[0]
    k = apply_rotary(attn.k_proj(x).view(1, 120, 2, 16), cos, sin)[0]
    v = attn.v_proj(x).view(120, 2, 16)
    ref, _ = brute_force(q, k, v, model.config.sparse_config)
    torch.testing.assert_close(out[0], attn.o_proj(ref.reshape(120, -1)), rtol=1e-10, atol=1e-10)


def test_bad_shapes():
    cfg = cfg_small()
    q, k, v = rand_qkv(50, 3, 2, 8)
    with pytest.raises(ValueError, match="not a multiple"):
        sparse_attention(q, k, v, cfg)
    q, k, v = rand_qkv(20, 4, 2, 8, tq=30)
    with pytest.raises(ValueError, match="more queries"):
        sparse_attention(q, k, v, cfg)


def test_varlen_batch_equals_each_sequence():
    from cpm4.kernels.infllm_v2 import sparse_attention_varlen

    cfg = cfg_small()
    seqs = [rand_qkv(T, 4, 2, 8, tq, seed=i) for i, (T, tq) in enumerate([(90, 90), (40, 1), (130, 17)])]
    q = torch.cat([s[0] for s in seqs])
    k = torch.cat([s[1] for s in seqs])
    v = torch.cat([s[2] for s in seqs])
    cu_q = torch.tensor([0, 90, 91, 108])
    cu_k = torch.tensor([0, 90, 130, 260])
    out = sparse_attention_varlen(q, k, v, cu_q, cu_k, cfg)
    for (qs, ks, vs), a, b in zip(seqs, cu_q[:-1].tolist(), cu_q[1:].tolist()):
        assert torch.equal(out[a:b], sparse_attention(qs, ks, vs, cfg))
    with pytest.raises(ValueError, match="cu_seqlens"):
        sparse_attention_varlen(q, k, v, torch.tensor([0, 90]), cu_k, cfg)



def test_rows_batch_equals_each_sequence_and_checks_counts():
    """`sparse_attention_rows` (off the GPU: row by row) on a right-padded batch equals each sequence alone, zero
    past each row's queries; counts that do not fit the batch are refused."""
    from cpm4.kernels.infllm_v2 import compress_keys, sparse_attention_rows

    cfg = cfg_small()
    shapes = [(90, 90), (40, 1), (130, 17)]
    seqs = [rand_qkv(T, 4, 2, 8, tq, seed=i) for i, (T, tq) in enumerate(shapes)]
    q = torch.zeros(3, 92, 4, 8, dtype=torch.float64)
    k = torch.zeros(3, 130, 2, 8, dtype=torch.float64)
    v = torch.zeros_like(k)
    keys = []
    for i, ((qs, ks, vs), (T, tq)) in enumerate(zip(seqs, shapes)):
        q[i, :tq], k[i, :T], v[i, :T] = qs, ks, vs
        keys.append(compress_keys(ks, cfg))
    scale = 8 ** -0.5
    out = sparse_attention_rows(q, k, v, [tq for _, tq in shapes], [T for T, _ in shapes], cfg, scale,
                                [a for a, _ in keys], [b for _, b in keys])
    assert out.shape == (3, 90, 4, 8)
    for i, ((qs, ks, vs), (_, tq)) in enumerate(zip(seqs, shapes)):
        assert torch.equal(out[i, :tq], sparse_attention(qs, ks, vs, cfg, scale))
        assert not out[i, tq:].any()
    with pytest.raises(ValueError, match="3 rows but 2 query counts"):
        sparse_attention_rows(q, k, v, [90, 1], [90, 40, 130], cfg, scale, [a for a, _ in keys], None)


def test_rows_table_refuses_more_queries_than_keys():
    pytest.importorskip("triton")
    from cpm4.kernels.infllm_v2.triton_select import Rows

    with pytest.raises(ValueError, match="1 <= queries <= keys"):
        Rows([5, 20], [10, 10], [1, 1], None, torch.device("cpu"))
    assert Rows([5, 1], [10, 70], [1, 15], None, torch.device("cpu")).blocks(16) == 5

@pytest.mark.parametrize("dense_fraction", [0, 10 ** 6])
@pytest.mark.parametrize("variant", ["gen-b", "gen-a"])
def test_decode_rows_equal_each_row_alone(variant, dense_fraction, monkeypatch):
    """One decode step of several sequences of different lengths in one pass (`sparse_decode_rows`, rows on
    the query axis, padding masked by each row's position) equals each row's own step, and the brute force,
    in float64; a row shorter than the window sees everything. Both stage-4 forms: the gather of the selected
    tokens (dense_fraction 0) and the dense pass with the selection as a mask."""
    from cpm4.kernels.infllm_v2 import cpu, sparse_decode_rows

    monkeypatch.setattr(cpu, "DENSE_FRACTION", dense_fraction)

    cfg = cfg_small(variant)
    lens = [150, 203, 37, 177]
    rows = [rand_qkv(n, 4, 2, 8, tq=1, seed=i) for i, n in enumerate(lens)]
    tmax = max(lens)
    q = torch.cat([r[0] for r in rows])
    k, v = (torch.stack([torch.nn.functional.pad(r[j], (0, 0, 0, 0, 0, tmax - n), value=7.0)
                         for r, n in zip(rows, lens)]) for j in (1, 2))  # padding that must not be read
    keys = [compress_keys(r[1], cfg) for r in rows]
    out = sparse_decode_rows(q, k, v, lens, cfg, 8 ** -0.5, [a for a, _ in keys],
                             None if keys[0][1] is None else [b for _, b in keys])
    for i, (qi, ki, vi) in enumerate(rows):
        torch.testing.assert_close(out[i:i + 1], infllm_v2_attention(qi, ki, vi, cfg), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(out[i:i + 1], brute_force(qi, ki, vi, cfg)[0], rtol=1e-10, atol=1e-10)
