"""Seeded random steps through the cascade (`Attention._cascade`, rows after shared cached prefix pages): random
prefixes shared by random subsets of the rows, rows with more of their own tokens cached, rows without a prefix,
pages handed out in random order, dense and InfLLM v2 models (the latter's rows dense, its kernel keys pooled).
Every row's logits must be those of its whole prompt without a cache (float64; the flash kernel's float-math
stand-in off the GPU)."""

import random

import pytest
import torch
from conftest import random_model

from cpm4.engine.paged import PagedBatch, PagedKVCache, SeqPages
from cpm4.model.modeling import Attention

SEEDS = range(40)


def _step(model, prefixes, rows, rng):
    """The prefixes computed and published, then one batched step of every row (prompt, extra own tokens cached)
    after what it finds cached: each row's logits and cached count."""
    cache = PagedKVCache(model.config, num_pages=256, page_size=16, prefix_caching=True, dtype=torch.float64)
    rng.shuffle(cache.free)
    for pre in prefixes:
        seq = SeqPages()
        cache.reserve(seq, len(pre))
        model(torch.tensor([pre]), cache.batch([seq]), torch.tensor([len(pre)]))
        cache.publish(seq, pre)
    seqs, cut = [], []
    for p, extra in rows:
        seq, c = cache.new_sequence(p)
        extra = min(extra, len(p) - 1 - c)
        if extra > 0:
            cache.reserve(seq, extra)
            model(torch.tensor([p[c:c + extra]]), cache.batch([seq]), torch.tensor([extra]))
            c += extra
        seqs.append(seq)
        cut.append(c)
    new = [len(p) - c for (p, _), c in zip(rows, cut)]
    for s, n in zip(seqs, new):
        cache.reserve(s, n)
    ids = torch.zeros(len(rows), max(new), dtype=torch.long)
    for i, ((p, _), c) in enumerate(zip(rows, cut)):
        ids[i, :new[i]] = torch.tensor(p[c:])
    logits = model(ids, cache.batch(seqs), torch.tensor(new))
    return [logits[i, :n] for i, n in enumerate(new)], cut


@pytest.fixture(scope="module")
def models():
    sc = {"kernel_size": 8, "kernel_stride": 4, "init_blocks": 1, "block_size": 16, "window_size": 32, "topk": 2,
          "dense_len": 4096, "variant": "gen-b"}
    return random_model("tiny", sparse_config=None), random_model("tiny", sparse_config=sc)


def test_cascade_fuzz(monkeypatch, models):
    monkeypatch.setattr(Attention, "varlen_on_cpu", True)
    monkeypatch.setattr(Attention, "cascade_min_tokens", 16)
    calls = []
    real = Attention._cascade
    monkeypatch.setattr(Attention, "_cascade", lambda self, *a: calls.append(1) or real(self, *a))
    stepped = 0
    for seed in SEEDS:
        rng = random.Random(seed)
        model = models[seed % 2]
        prefixes = [[rng.randrange(3, 1000) for _ in range(rng.randrange(16, 90))]
                    for _ in range(rng.randrange(1, 3))]
        rows = []
        for _ in range(rng.randrange(2, 7)):
            k = rng.randrange(len(prefixes) + 1)
            head = prefixes[k] if k < len(prefixes) else []
            tail = [rng.randrange(3, 1000) for _ in range(rng.randrange(1, 30))]
            rows.append((head + tail, rng.choice([0, 0, rng.randrange(1, 25)])))
        before = len(calls)
        got, cut = _step(model, prefixes, rows, rng)
        stepped += len(calls) > before
        for i, (p, _) in enumerate(rows):
            want = model(torch.tensor([p]))[0, cut[i]:]
            torch.testing.assert_close(got[i], want, rtol=1e-6, atol=1e-6,
                                       msg=lambda m, seed=seed, i=i: f"seed {seed} row {i}: {m}")
    assert stepped >= len(SEEDS) // 3  # the cascade ran in a good share of the steps


def test_cascade_for_each_of_two_prefixes(monkeypatch, models):
    """Rows after two different cached prefixes in one step (two system prompts), one with more of its own tokens
    cached, beside a row without a prefix: each prefix's rows take their own cascade (two a layer), every row's
    logits those of its whole prompt (float64); a group sharing fewer than cascade_min_tokens keys stays out."""
    monkeypatch.setattr(Attention, "varlen_on_cpu", True)
    monkeypatch.setattr(Attention, "cascade_min_tokens", 16)
    calls = []
    real = Attention._cascade
    monkeypatch.setattr(Attention, "_cascade",
                        lambda self, *a: calls.append(tuple(tuple(g) for g, _ in a[4])) or real(self, *a))
    rng = random.Random(7)
    model = models[0]
    prefixes = [[rng.randrange(3, 1000) for _ in range(n)] for n in (70, 40)]  # 4 and 2 whole pages of 16

    def tail(n):
        return [rng.randrange(3, 1000) for _ in range(n)]

    rows = [(prefixes[0] + tail(9), 0), (prefixes[1] + tail(5), 0), (prefixes[0] + tail(20), 7),
            (prefixes[1] + tail(12), 0), (tail(30), 0)]
    got, cut = _step(model, prefixes, rows, rng)
    layers = model.config.num_hidden_layers
    assert calls == [((0, 2), (1, 3))] * layers  # one cascade a layer for both groups
    for i, (p, _) in enumerate(rows):
        torch.testing.assert_close(got[i], model(torch.tensor([p]))[0, cut[i]:], rtol=1e-6, atol=1e-6)
    # Without the row that has no prefix every row is in a cascade: the keys gathered skip the 2 pages both
    # groups share at least (each cascade reads its group's pages through shared_kv).
    calls.clear()
    skips = []
    real_skip = PagedBatch.skip_pages
    monkeypatch.setattr(PagedBatch, "skip_pages", lambda self, *a: skips.append(real_skip(self, *a)) or skips[-1])
    got, cut = _step(model, prefixes, rows[:4], rng)
    assert calls == [((0, 2), (1, 3))] * layers and skips == [2] * layers
    for i, (p, _) in enumerate(rows[:4]):
        torch.testing.assert_close(got[i], model(torch.tensor([p]))[0, cut[i]:], rtol=1e-6, atol=1e-6)
    calls.clear()
    monkeypatch.setattr(Attention, "cascade_min_tokens", 48)  # the 2-page prefix's group is below it
    got, cut = _step(model, prefixes, rows, rng)
    assert calls == [((0, 2),)] * layers
    for i, (p, _) in enumerate(rows):
        torch.testing.assert_close(got[i], model(torch.tensor([p]))[0, cut[i]:], rtol=1e-6, atol=1e-6)
