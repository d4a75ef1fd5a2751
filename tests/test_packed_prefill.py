"""A packed multi-row step whose rows are all dense (`Attention._packed_dense`): one variable-length attention call
on the packed tokens, keys read back from the pages by `PagedBatch.write_packed`, kernel keys pooled from the
cache. Each row's logits against its whole prompt without a cache (float64), the kernel keys in the pages against
the reference pooling, the engine's tokens against each request alone; on CUDA (bf16, flash) against the padded
path and the float32 model."""

import pytest
import torch
from conftest import random_model
from test_engine import _rest_step, assert_each_alone, check_batched_rows, prompts, run_burst, sparse, tok

from cpm4.engine.paged import PagedKVCache, SeqPages
from cpm4.engine.sampling import SamplingParams
from cpm4.engine.scheduler import LLMEngine
from cpm4.model.modeling import Attention


def _count_packed(monkeypatch) -> list:
    calls = []
    real = Attention._packed_dense
    monkeypatch.setattr(Attention, "_packed_dense", lambda self, *a: calls.append(1) or real(self, *a))
    return calls


def _step(model, ps, cached, scatter_seed=None, device="cpu", dtype=torch.float64):
    """Each prompt's logits after its `cached` tokens (computed alone first) as one batched step, and the cache."""
    cache = PagedKVCache(model.config, num_pages=160, page_size=16, device=device, dtype=dtype)
    if scatter_seed is not None:  # pages handed out in a random order
        import random

        random.Random(scatter_seed).shuffle(cache.free)
    seqs = []
    for p, c in zip(ps, cached):
        seq = SeqPages()
        if c:
            cache.reserve(seq, c)
            model(torch.tensor([p[:c]], device=device), cache.batch([seq]), torch.tensor([c], device=device))
        seqs.append(seq)
    _step.seqs = seqs  # the last call's sequences, for the kernel-key check
    return _rest_step(model, cache, seqs, ps, cached, device), cache


@pytest.mark.parametrize("sc", [None, sparse(dense_len=4096)])
@pytest.mark.parametrize("cached", [[0, 0, 0, 0], [0, 37, 0, 5]])
def test_packed_step_equals_whole_prompts(monkeypatch, sc, cached):
    """Rows of different lengths from their start, and beside rows after their own cached tokens: each row's
    logits are those of its whole prompt without a cache (float64), as the padded path's are; with an InfLLM v2
    model whose rows are all dense the kernel keys pooled into the pages equal the padded path's."""
    model = random_model("tiny", dtype=torch.float64, sparse_config=sc)
    ps = prompts(4, seed=61, lo=20, hi=90)
    monkeypatch.setattr(Attention, "varlen_on_cpu", True)
    calls = _count_packed(monkeypatch)
    got, cache = _step(model, ps, cached, scatter_seed=3)
    seqs_packed = _step.seqs
    assert len(calls) == model.config.num_hidden_layers
    monkeypatch.setattr(Attention, "packed_prefill", False)
    padded, _ = _step(model, ps, cached, scatter_seed=3)
    assert len(calls) == model.config.num_hidden_layers  # not taken with it off
    for i, (p, c) in enumerate(zip(ps, cached)):
        want = model(torch.tensor([p]))[0, c:].float()
        torch.testing.assert_close(got[i], want, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(padded[i], want, rtol=1e-6, atol=1e-6)
    if sc is not None:  # each row's kernel keys: the reference pooling of its whole key sequence
        from cpm4.kernels.infllm_v2 import compress_keys

        seqs = [SeqPages(pages=list(s.pages), length=len(p)) for s, p in zip(seqs_packed, ps)]
        batch = cache.batch(seqs)
        for layer in range(model.config.num_hidden_layers):
            for i, p in enumerate(ps):
                keys = cache.k[layer][torch.tensor(seqs[i].pages)].flatten(0, 1)[:len(p)]
                want1, want2 = compress_keys(keys, model.config.sparse_config)
                got1, got2 = batch.compressed_keys(layer, i, len(p), model.config.sparse_config)
                torch.testing.assert_close(got1, want1, rtol=1e-12, atol=1e-12)
                torch.testing.assert_close(got2, want2, rtol=1e-12, atol=1e-12)


def test_packed_step_not_taken_for_sparse_rows(monkeypatch):
    """A row of an InfLLM v2 model past dense_len attends sparsely: the step keeps the padded path, and every
    row's logits are still those of its whole prompt."""
    model = random_model("tiny", dtype=torch.float64, sparse_config=sparse(dense_len=64))
    ps = prompts(3, seed=62, lo=20, hi=40) + prompts(1, seed=63, lo=80, hi=81)
    monkeypatch.setattr(Attention, "varlen_on_cpu", True)
    calls = _count_packed(monkeypatch)
    got, _ = _step(model, ps, [0, 0, 0, 0])
    assert not calls
    for i, p in enumerate(ps):
        torch.testing.assert_close(got[i], model(torch.tensor([p]))[0].float(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("cached", [[0, 0, 0], [0, 21, 9]])
def test_packed_step_keeps_batch_continuing_rows_off(monkeypatch, cached):
    """batch_continuing_rows=False (row by row, the peer of the batched paths) holds for a packed step too: rows
    after cached tokens keep the padded path; rows all from their start still pack. Logits as whole prompts."""
    model = random_model("tiny", dtype=torch.float64)
    ps = prompts(3, seed=64, lo=30, hi=70)
    monkeypatch.setattr(Attention, "varlen_on_cpu", True)
    monkeypatch.setattr(Attention, "batch_continuing_rows", False)
    calls = _count_packed(monkeypatch)
    got, _ = _step(model, ps, cached)
    assert len(calls) == (0 if any(cached) else model.config.num_hidden_layers)
    for i, (p, c) in enumerate(zip(ps, cached)):
        torch.testing.assert_close(got[i], model(torch.tensor([p]))[0, c:].float(), rtol=1e-6, atol=1e-6)


def test_engine_burst_through_packed_steps_equals_alone(monkeypatch):
    """A burst of prompts of different lengths prefilled in packed steps (chunks cutting some prompts, so later
    steps continue them beside fresh ones): each request's greedy tokens are those of the request alone."""
    model = random_model("tiny", dtype=torch.float32, sparse_config=None)
    monkeypatch.setattr(Attention, "varlen_on_cpu", True)
    calls = _count_packed(monkeypatch)
    ps = prompts(6, seed=64, lo=10, hi=120)
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    eng = LLMEngine(model, tok(), PagedKVCache(model.config, num_pages=96, page_size=16), max_batch_size=6,
                    chunk_tokens=150)
    res = run_burst(eng, ps, params)
    assert calls
    monkeypatch.setattr(Attention, "varlen_on_cpu", False)
    assert_each_alone(res, model, ps, params)


@pytest.mark.parametrize("consecutive", [True, False])
def test_write_packed_of_one_row_equals_write(consecutive):
    """One row (the prefill graphs' one-row steps): write_packed stores what write stores and returns the row's keys
    from its first token, on consecutive pages (slots a slice) or scattered ones."""
    model = random_model("tiny", dtype=torch.float32, sparse_config=None)
    cfg = model.config
    g = torch.Generator().manual_seed(7)
    out = []
    for packed in (True, False):
        cache = PagedKVCache(cfg, num_pages=8, page_size=16)
        if not consecutive:
            cache.free.reverse()
        seq = SeqPages()
        cache.reserve(seq, 50)
        seq.length = 10  # 10 tokens cached before this step's 40
        cache.k[0].view(-1)[:] = torch.arange(cache.k[0].numel(), dtype=torch.float32)
        batch = cache.batch([seq])
        k = torch.randn(40, cfg.num_key_value_heads, cfg.dim_head, generator=g)
        v = torch.randn(40, cfg.num_key_value_heads, cfg.dim_head, generator=g)
        g.manual_seed(7)
        if packed:
            got = batch.write_packed(0, k, v, ([10], [40]))
        else:
            got = tuple(x[0] for x in batch.write(0, k[None], v[None], torch.tensor([10]), torch.tensor([40]),
                                                  ([10], [40])))
        out.append((got, cache.k[0].clone(), cache.v[0].clone()))
    (pk, pv), kc, vc = out[0]
    (wk, wv), kc2, vc2 = out[1]
    assert torch.equal(kc, kc2) and torch.equal(vc, vc2)
    assert torch.equal(pk, wk[:50]) and torch.equal(pv, wv[:50])


@pytest.mark.gpu
@pytest.mark.parametrize("cached", [[0, 0, 0, 0], [0, 37, 0, 5]])
def test_packed_step_on_cuda(monkeypatch, cached):
    """On CUDA in bf16 the packed step's one flash call a layer: the logits of the padded path within bf16
    rounding and of the float32 model; the engine's tokens after a cached prefix as without caching."""
    from cpm4.model import MiniCPM4ForCausalLM

    base = random_model("tiny", dtype=torch.float32, sparse_config=None)
    model = MiniCPM4ForCausalLM(base.config).to("cuda", torch.bfloat16)
    model.load_state_dict({k: v.to(torch.bfloat16) for k, v in base.state_dict().items()})
    ps = prompts(4, seed=65, lo=20, hi=150)
    calls = _count_packed(monkeypatch)
    with torch.no_grad():
        one, _ = _step(model, ps, cached, device="cuda", dtype=torch.bfloat16)
        assert len(calls) == model.config.num_hidden_layers
        monkeypatch.setattr(Attention, "packed_prefill", False)
        rows, _ = _step(model, ps, cached, device="cuda", dtype=torch.bfloat16)
        assert len(calls) == model.config.num_hidden_layers
        monkeypatch.setattr(Attention, "packed_prefill", True)
        check_batched_rows(base, model, ps, cached, one, rows, prefix_len=40)
