"""Engine audit: preemption and recomputation across the dense/sparse switch, prefix pages shared only between
prompts that attend alike, prompt tokens fed one at a time, the admission's page arithmetic, aborts in every
state, seeds, penalties and length limits, each against an independent reference (the plain generate loop,
float64, or a naive formula). Page reference counts are checked after every engine step."""

import collections
import dataclasses
import json
import random

import pytest
import torch
from conftest import random_model
from test_engine import alone, prompts, sparse, tok

from cpm4 import LLM, SamplingParams
from cpm4.engine.generate import GenerationOutput, PromptTooLongError, generate_ids
from cpm4.engine.paged import PagedKVCache
from cpm4.engine.sampling import process_logits
from cpm4.engine.scheduler import LLMEngine


def assert_pages_consistent(eng: LLMEngine) -> None:
    """Each page's reference count is the number of its holders (running sequences, the prefix table); free
    pages have none and are listed once; waiting requests hold no page."""
    cache = eng.cache
    holders = collections.Counter(cache.prefix.values())
    for r in eng.running:
        holders.update(r.pages.pages)
    assert all(r.pages is None for r in eng.waiting)
    assert len(set(cache.free)) == len(cache.free)
    for p in range(cache.num_pages):
        assert cache.refs[p] == holders[p], (p, cache.refs[p], holders[p])
        assert (p in cache.free) == (cache.refs[p] == 0), p
    # The counters behind num_free against a walk of the prefix table.
    published = collections.Counter(cache.prefix.values())
    assert cache._pubs == [published[p] for p in range(cache.num_pages)]
    assert cache._reclaimable == sum(1 for p in published if cache.refs[p] == 1)
    # Each published page knows its key, and each reclaimable one waits in the heap at its last use.
    assert all(cache._key[p] == h for h, p in cache.prefix.items())
    queued = set(cache._lru)
    assert all((cache._used[p], p) in queued for p in published if cache.refs[p] == 1)


def assert_all_free(eng: LLMEngine) -> None:
    """Idle: every page free or only cached as a reusable prefix, no request left behind."""
    assert_pages_consistent(eng)
    assert not eng.has_work() and not eng.by_id
    assert eng.cache.num_free == eng.cache.num_pages


def run(eng: LLMEngine, preempt: dict[int, str] | None = None, abort: dict[int, str] | None = None,
        outs: dict[str, GenerationOutput] | None = None) -> dict[str, GenerationOutput]:
    """Step until idle, gathering each request's deltas (into `outs` when given); preempt / abort: {step:
    request id} done just before that step (a preemption only if the request is running then). Pages are
    checked after every step."""
    outs = {} if outs is None else outs
    step = 0
    while eng.has_work():
        rid = (preempt or {}).get(step)
        if rid is not None and eng.by_id.get(rid) in eng.running:
            eng._preempt(eng.by_id[rid])
        if abort and step in abort:
            eng.abort(abort[step])
        for rid, d in eng.step():
            outs.setdefault(rid, GenerationOutput([])).add(d)
        assert_pages_consistent(eng)
        step += 1
    assert_all_free(eng)
    return outs


def same_as(out: GenerationOutput, ref: GenerationOutput, tol: float) -> None:
    assert (out.token_ids, out.finish_reason) == (ref.token_ids, ref.finish_reason)
    if ref.logprobs is None:
        assert out.logprobs is None
        return
    assert len(out.logprobs) == len(ref.logprobs) == len(ref.token_ids)  # none lost, none repeated
    for a, b in zip(out.logprobs, ref.logprobs):
        assert a.token_id == b.token_id and [t for t, _ in a.top] == [t for t, _ in b.top]
        assert a.logprob == pytest.approx(b.logprob, abs=tol)


def plain(model, p, params) -> GenerationOutput:
    return generate_ids(model, tok(), [p], [params])[0]


def sparse64(dense_len=100):
    # Past the sparse budget ((topk + window / block) blocks = 64 tokens) dense and sparse attention differ.
    return random_model("tiny", dtype=torch.float64, sparse_config=sparse(dense_len))


@pytest.mark.parametrize("at", [1, 8, 30])
def test_recompute_after_preemption_follows_the_dense_sparse_switch(at):
    """A request of an 80-token prompt (dense, dense_len 100) preempted mid-prompt-chunk (1), while decoding
    dense (8) or after its decoding crossed dense_len (30) recomputes exactly what it ran: its prompt and
    early outputs dense, the later ones sparse (a recomputation chunk crossing dense_len ran all sparse: its
    logprobs moved by 6e-3). float64: logprobs to 1e-9, none lost or repeated; the penalties count the same
    tokens (the prompt and outputs once each, not the recomputed ones again)."""
    model = sparse64()
    p = prompts(1, seed=20, lo=80, hi=81)[0]
    params = SamplingParams(temperature=0, max_tokens=36, ignore_eos=True, logprobs=2, repetition_penalty=1.2,
                            frequency_penalty=0.5, presence_penalty=0.3)
    eng = LLMEngine(model, tok(), PagedKVCache(model.config, num_pages=20, page_size=16, dtype=torch.float64),
                    chunk_tokens=32)
    eng.add_request("a", p, params)
    out = run(eng, preempt={at: "a"})["a"]
    assert eng.num_preempted == 1
    same_as(out, plain(model, p, params), 1e-9)


def test_prefix_pages_are_shared_only_between_prompts_of_one_mode():
    """A prompt below dense_len runs dense, one at or above it sparse at every position: the same prefix holds
    other keys and values in the two modes, so a prompt reuses only pages published by one of its own mode
    (a 116-token prompt reusing a 98-token one's dense pages was 6e-3 off, the other way round 1e-2)."""
    model = sparse64()
    base = prompts(1, seed=21, lo=96, hi=97)[0]
    short, long_, longer = base + [5, 6], base + list(range(7, 27)), base + list(range(30, 48))
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, logprobs=1)
    for first, second, shared in ((short, long_, False), (long_, short, False), (long_, longer, True)):
        eng = LLMEngine(model, tok(), PagedKVCache(model.config, num_pages=40, page_size=16, dtype=torch.float64))
        eng.add_request("x", first, params)
        run(eng)
        eng.add_request("y", second, params)
        eng._admit()
        assert eng.by_id["y"].computed == (96 if shared else 0)  # the 6 full pages of the common prefix, or none
        same_as(run(eng)["y"], plain(model, second, params), 1e-9)


def test_prompt_token_fed_alone_follows_the_whole_prompt():
    """A prompt token fed alone (here: the step's token budget spent by a prompt admitted before it) attends as
    its whole prompt says: sparse for a prompt of >= dense_len tokens, not dense because the sequence is still
    shorter (it took the decode step's switch: 5e-4 off in float64)."""
    model = sparse64()
    base = prompts(1, seed=22, lo=96, hi=97)[0]
    ahead = prompts(1, seed=23, lo=150, hi=151)[0]
    p = base + prompts(1, seed=24, lo=54, hi=55)[0]  # 150 tokens: sparse
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True, logprobs=1)
    eng = LLMEngine(model, tok(), PagedKVCache(model.config, num_pages=60, page_size=16, dtype=torch.float64),
                    chunk_tokens=50)
    eng.add_request("y", base + list(range(5, 15)), params)  # a sparse prompt publishes the 96-token prefix
    run(eng)
    eng.add_request("ahead", ahead, params)
    eng.add_request("p", p, params)
    eng.step()
    # `ahead` took the 50-token budget; p fed one token after its 96 cached ones, at 97 < dense_len tokens.
    assert eng.by_id["ahead"].computed == 50 and eng.by_id["p"].computed == 97
    out = run(eng)
    same_as(out["p"], plain(model, p, params), 1e-9)
    same_as(out["ahead"], plain(model, ahead, params), 1e-9)


def test_dense_prompt_tokens_fed_alone_stay_in_the_decode_forward(monkeypatch):
    """Prompt rows cut to one token by a spent budget: a dense prompt's go into the batched decode forward (its
    switch is dense either way), not the prefill forward, where they would be padded to the longest chunk (the
    0.5B 256-request row lost a quarter of its throughput so); a sparse prompt's go the prefill way (above).
    Outputs equal each request run alone."""
    model = sparse64()
    short = prompts(3, seed=31, lo=30, hi=40)  # < dense_len: dense
    long = prompts(1, seed=32, lo=150, hi=151)[0]  # >= dense_len: sparse
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, logprobs=1)
    eng = LLMEngine(model, tok(), PagedKVCache(model.config, num_pages=60, page_size=16, dtype=torch.float64),
                    chunk_tokens=20)
    groups: list[list[tuple[int, bool]]] = []
    forward = LLMEngine._forward

    def spy(self, group):
        groups.append([(n, self._sparse_prompt(r)) for r, n in group])
        return forward(self, group)

    monkeypatch.setattr(LLMEngine, "_forward", spy)
    for i, p in enumerate([*short, long]):
        eng.add_request(f"r{i}", p, params)
    out = run(eng)
    mixed = [g for g in groups if any(n > 1 for n, _ in g) and any(n == 1 and not sp for n, sp in g)]
    assert not mixed, mixed
    assert any(all(n == 1 for n, _ in g) and len(g) > 1 for g in groups)  # one-token rows batched together
    for i, p in enumerate([*short, long]):
        same_as(out[f"r{i}"], plain(model, p, params), 1e-9)


def test_steps_launched_ahead_never_sample_mid_prompt():
    """async_output with a one-token prefill budget: every row feeds one token a step, prompt tokens too. Only
    rows feeding their last token may go into a step launched ahead (it samples every row): a row mid-prompt
    there had a token sampled and streamed from a half-read prompt."""
    model = random_model("tiny", dtype=torch.float32, sparse_config=None)
    ps = prompts(3, seed=26, lo=3, hi=9)
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    eng = LLMEngine(model, tok(), PagedKVCache(model.config, num_pages=20, page_size=16), chunk_tokens=1,
                    async_output=True)
    for i, p in enumerate(ps):
        eng.add_request(f"r{i}", p, params)
    out = run(eng)
    for i, p in enumerate(ps):
        same_as(out[f"r{i}"], plain(model, p, params), 0)


@pytest.mark.parametrize("pages", [3, 4])
def test_admission_counts_a_decoding_rows_next_page_once(pages):
    """A request is admitted when its prompt's pages and one page per running request fit. A decoding row
    whose next token starts a page needs that page as its one: counted twice, a 32-token prompt waited for a
    4th free page beside a decoding row on a full page (3 free: its 2 and the row's 1 were enough)."""
    model = random_model("tiny", dtype=torch.float32, sparse_config=None)
    eng = LLMEngine(model, tok(), PagedKVCache(model.config, num_pages=pages, page_size=16))
    r, w = prompts(1, seed=27, lo=15, hi=16)[0], prompts(1, seed=28, lo=32, hi=33)[0]
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    eng.add_request("r", r, params)
    outs: dict[str, GenerationOutput] = {}
    for _ in range(2):  # prefill, then the first decode step: 16 tokens on r's page, the next one needs another
        for rid, d in eng.step():
            outs.setdefault(rid, GenerationOutput([])).add(d)
    assert eng.by_id["r"].pages.length == 16 and eng.cache.num_free == pages - 1
    eng.add_request("w", w, params)
    for rid, d in eng.step():
        outs.setdefault(rid, GenerationOutput([])).add(d)
    # 3 free pages: w's 2 and r's next one, admitted at once; 2 free: w waits for r to end (this step).
    assert ("w" in outs) == (pages == 4) and outs["r"].finish_reason == "length"
    run(eng, outs=outs)
    assert eng.num_preempted == 0
    for rid, p in (("r", r), ("w", w)):
        same_as(outs[rid], plain(model, p, params), 0)


def _state(eng: LLMEngine, req) -> str:
    if req in eng.waiting:
        return "preempted" if req.state.generated else "waiting"
    return "prefill" if req.computed < len(req.prompt_ids) else "running"


@pytest.mark.parametrize("async_output", [False, True])
@pytest.mark.parametrize("state", ["waiting", "prefill", "running", "preempted"])
def test_abort_in_every_state_frees_pages_and_spares_the_others(state, async_output):
    """A request aborted while waiting, mid-prefill, decoding or preempted ends with "abort" and no tokens after
    it; every page comes back (reference counts exact after every step) and the others equal their runs
    alone."""
    model = random_model("tiny", dtype=torch.float32, sparse_config=None)
    ps = prompts(4, seed=3, lo=30, hi=70)
    params = SamplingParams(temperature=0, max_tokens=25, ignore_eos=True)
    eng = LLMEngine(model, tok(), PagedKVCache(model.config, num_pages=12, page_size=16), max_batch_size=3,
                    chunk_tokens=16, async_output=async_output)
    for i, p in enumerate(ps):
        eng.add_request(f"r{i}", p, params)
    outs: dict[str, GenerationOutput] = {}
    victim = None
    while eng.has_work() and victim is None:
        victim = next((r.request_id for r in [*eng.waiting, *eng.running]
                       if r.request_id != "r0" and _state(eng, r) == state), None)
        if victim is not None:
            eng.abort(victim)
            held = len(eng.by_id[victim].state.generated)
        for rid, d in eng.step():
            outs.setdefault(rid, GenerationOutput([])).add(d)
        assert_pages_consistent(eng)
    assert victim is not None
    run(eng, outs=outs)
    assert outs[victim].finish_reason == "abort" and len(outs[victim].token_ids) == held
    for i, p in enumerate(ps):
        if f"r{i}" != victim:
            assert outs[f"r{i}"].token_ids == alone(model, p, params), i


def test_seeded_n_completions_with_logprobs_through_preemption():
    """n=2 seeded sampled completions with logprobs in a cache too small for the batch (preemptions, sequences
    crossing dense_len while decoding): each completion is the plain loop's run alone with seed + j, token for
    token, its logprobs neither lost nor repeated; every page comes back."""
    model = random_model("tiny", dtype=torch.float32, sparse_config=sparse(dense_len=40))
    llm = LLM(model, tokenizer=tok(), max_num_seqs=6, kv_cache_tokens=160, chunk_tokens=32)  # 10 pages of 16
    ps = prompts(3, seed=29, lo=20, hi=36)
    sp = SamplingParams(n=2, seed=7, temperature=0.9, top_p=0.95, max_tokens=40, ignore_eos=True, logprobs=1)
    outs = llm.generate(ps, sp)
    eng = llm.engine.engine
    assert eng.num_preempted > 0
    assert_all_free(eng)
    for p, o in zip(ps, outs):
        assert len(o.outputs) == 2
        for j, c in enumerate(o.outputs):
            same_as(c, plain(model, p, dataclasses.replace(sp, n=1, seed=7 + j)), 1e-4)


def test_penalties_and_bias_match_a_naive_float64_reference():
    """Logit bias, then the repetition penalty over prompt and output (each id once), then presence and
    frequency penalties over the output alone, on batches mixing rows with and without each."""
    rng = random.Random(0)
    vocab = 50
    for _ in range(60):
        params, hist, outs = [], [], []
        for _ in range(rng.randint(1, 5)):
            kw = {"temperature": 0}
            if rng.random() < 0.6:
                kw["repetition_penalty"] = rng.choice([0.5, 1.0, 1.3, 2.0])
            if rng.random() < 0.6:
                kw["presence_penalty"] = rng.uniform(-2, 2)
            if rng.random() < 0.6:
                kw["frequency_penalty"] = rng.uniform(-2, 2)
            if rng.random() < 0.3:
                kw["logit_bias"] = {rng.randrange(vocab): rng.uniform(-5, 5) for _ in range(3)}
            params.append(SamplingParams(**kw))
            prompt = [rng.randrange(vocab) for _ in range(rng.randint(0, 6))]
            out = [rng.randrange(vocab) for _ in range(rng.randint(0, 8))]
            hist.append(prompt + out)
            outs.append(out)
        x = torch.randn(len(params), vocab, generator=torch.Generator().manual_seed(rng.randrange(1000))) * 3
        ref = x.double()
        for b, sp in enumerate(params):
            for t, v in (sp.logit_bias or {}).items():
                ref[b, t] += v
            for t in set(hist[b]):
                r = sp.repetition_penalty
                ref[b, t] = ref[b, t] / r if ref[b, t] > 0 else ref[b, t] * r
            for t in set(outs[b]):
                ref[b, t] -= sp.frequency_penalty * outs[b].count(t) + sp.presence_penalty
        got = process_logits(x, params, hist, None, outs)
        torch.testing.assert_close(got.double(), ref, rtol=0, atol=1e-5)


def test_filter_edge_values():
    """top_k=1 and min_p=1 sample the argmax; top_k of the vocabulary or more, -1 or 0 filter nothing (the same
    draws as without, seed for seed); top_p=1 likewise."""
    from cpm4.engine.sampling import Sampler, sample_batch

    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 40, generator=g, dtype=torch.float64).float() * 2

    def draw(**kw):
        params = [SamplingParams(temperature=0.8, seed=100 + i, **kw) for i in range(x.shape[0])]
        return sample_batch(x, [Sampler(p) for p in params], params, [[] for _ in params])

    greedy = x.argmax(-1).tolist()
    assert draw(top_k=1) == draw(min_p=1.0) == greedy
    free = draw()
    assert free != greedy
    assert draw(top_k=40) == draw(top_k=1000) == draw(top_k=-1) == draw(top_k=0) == draw(top_p=1.0) == free


def test_length_limits_and_stop_strings_at_max_model_len():
    """max_model_len: a prompt of max_model_len - 1 tokens gets one token ("length"), one of max_model_len or an
    empty one is refused; prompt + max_tokens past it ends with "length" at it with the plain loop's tokens,
    never past a position; a stop string spanning two tokens ends the text where it starts."""
    model = random_model("tiny", dtype=torch.float32, sparse_config=sparse(dense_len=32))
    eng = LLMEngine(model, tok(), PagedKVCache(model.config, num_pages=12, page_size=16), max_model_len=48)
    long_params = SamplingParams(temperature=0, max_tokens=100, ignore_eos=True)
    with pytest.raises(PromptTooLongError):
        eng.add_request("x", list(range(3, 51)), long_params)
    with pytest.raises(ValueError, match="empty prompt"):
        eng.add_request("x", [], long_params)
    ps = prompts(2, seed=30, lo=25, hi=40) + [list(range(5, 52))]
    free = [plain(model, p, long_params) for p in ps]
    # A stop string made of the last character of one token's text and the first of the next's.
    ids, text = free[0].token_ids, free[0].text
    k = next(k for k in range(1, 12) if tok().decode(ids[:k]) and len(tok().decode(ids[:k + 1])) > len(
        tok().decode(ids[:k])) and tok().decode(ids[:k + 1]).startswith(tok().decode(ids[:k])))
    cut = len(tok().decode(ids[:k]))
    stop = text[cut - 1:cut + 1]
    stop_params = SamplingParams(temperature=0, max_tokens=100, ignore_eos=True, stop=[stop])
    for i, p in enumerate(ps):
        eng.add_request(f"r{i}", p, long_params)
    eng.add_request("s", ps[0], stop_params)
    out = run(eng)
    for i, p in enumerate(ps):
        assert out[f"r{i}"].finish_reason == "length" and len(p) + len(out[f"r{i}"].token_ids) == 48
        assert out[f"r{i}"].token_ids == free[i].token_ids[:48 - len(p)]
    assert out["s"].finish_reason == "stop" and out["s"].text == text[:text.index(stop)]
    assert out["s"].text == plain(model, ps[0], stop_params).text


def test_batched_decode_crossing_dense_len_equals_alone():
    """Rows of a batch cross dense_len while decoding at different steps, beside rows still prefilling in
    chunks and rows whose prompts are sparse from the start: each row's logprobs are its run alone (float64)."""
    model = sparse64(dense_len=60)
    ps = prompts(2, seed=31, lo=40, hi=58) + prompts(2, seed=32, lo=62, hi=130)
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=1)
    eng = LLMEngine(model, tok(), PagedKVCache(model.config, num_pages=60, page_size=16, dtype=torch.float64),
                    chunk_tokens=40)
    out = {}
    for i, p in enumerate(ps):  # one arrival per step: prefill chunks and decode steps share steps
        eng.add_request(f"r{i}", p, params)
        for rid, d in eng.step():
            out.setdefault(rid, GenerationOutput([])).add(d)
    run(eng, outs=out)
    for i, p in enumerate(ps):
        same_as(out[f"r{i}"], plain(model, p, params), 1e-9)


def test_kv_cache_usage_read_while_the_worker_changes_the_prefix_table():
    """AsyncEngine.kv_cache_usage runs on the metrics / stats-log thread while the worker takes, publishes and
    reclaims prefix pages: every read is a share in [0, 1] (two counters, no walk of the prefix table that a
    change could interrupt), pages are seen in use while requests run, and all are free again at the end."""
    import asyncio
    import threading

    from cpm4.serve.engine import AsyncEngine

    model = random_model("tiny", dtype=torch.float32, sparse_config=None)
    eng = AsyncEngine(model, tok(), max_batch_size=2, kv_cache_tokens=640)  # 10 pages of 64: reclaimed often
    reads: list = []
    stop = threading.Event()

    def reader():
        while not stop.is_set():
            reads.append(eng.kv_cache_usage())

    async def clients():
        async def one(i, p):
            async for _ in eng.stream(p, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), f"r{i}"):
                pass
        # Prompts of 2-4 pages, some sharing a first page: published, reused and reclaimed.
        ps = [[3 + (i % 3)] * 64 + [7 + i] * (64 + 37 * (i % 4)) for i in range(12)]
        await asyncio.gather(*(one(i, p) for i, p in enumerate(ps)))

    t = threading.Thread(target=reader)
    t.start()
    try:
        asyncio.run(clients())
    finally:
        stop.set()
        t.join()
        try:
            cache = eng._sched.cache
            assert eng.kv_cache_usage() == 0.0 and cache.num_free == cache.num_pages
            assert cache.prefix  # pages stayed published (reclaimable), counted as free
        finally:
            eng.shutdown()
    real = [r for r in reads if r is not None]
    assert real and all(isinstance(r, float) and 0.0 <= r <= 1.0 for r in real)
    assert max(real) > 0.0  # some read saw pages in use


# ---------------------------------------------------------------------------------------------------------
# Prompts the whole cache cannot hold, text held back at a cache-full end, seeds near 2**63, prompt ids,
# --max-model-len before the load, stale checkpoint leftovers


def _app_client(eng):
    pytest.importorskip("httpx")
    from fastapi.testclient import TestClient

    from cpm4.serve import create_app

    return TestClient(create_app(eng, "m"))


def test_prompt_larger_than_the_kv_cache_is_refused_up_front():
    """kv_cache_tokens=48 (3 pages of 16), a 60-token prompt: refused where prompts are checked (AsyncEngine,
    LLMEngine.add_request) with PromptTooLongError naming the cache, so the server answers 400
    context_length_exceeded, streamed or not (it was a 500, or an error event after a 200). A 40-token prompt
    fits: alone, its output ends with "length" when the cache is full, its tokens the plain loop's."""
    from cpm4.serve.engine import AsyncEngine

    model = random_model("tiny", dtype=torch.float32, sparse_config=sparse(dense_len=96))
    big, fits = prompts(1, seed=40, lo=60, hi=61)[0], prompts(1, seed=41, lo=40, hi=41)[0]
    eng = AsyncEngine(model, tok(), max_batch_size=2, kv_cache_tokens=48)
    try:
        with pytest.raises(PromptTooLongError, match="KV cache, which holds 48"):
            eng.check_prompt(big)
        with _app_client(eng) as client:
            for stream in (False, True):
                r = client.post("/v1/completions", json={"prompt": big, "max_tokens": 4, "stream": stream})
                assert r.status_code == 400, r.text
                err = r.json()["error"]
                assert err["code"] == "context_length_exceeded" and "holds 48" in err["message"]
            r = client.post("/v1/completions", json={"prompt": fits, "max_tokens": 100, "temperature": 0,
                                                      "ignore_eos": True})
            assert r.status_code == 200, r.text
            choice = r.json()["choices"][0]
    finally:
        eng.shutdown()
    ref = plain(model, fits, SamplingParams(temperature=0, max_tokens=48 - 40 + 1, ignore_eos=True))
    assert choice["finish_reason"] == "length" and choice["text"] == ref.text

    sched = LLMEngine(model, tok(), PagedKVCache(model.config, num_pages=3, page_size=16))
    with pytest.raises(PromptTooLongError, match="holds 48"):
        sched.add_request("big", big, SamplingParams())
    assert not sched.by_id
    params = SamplingParams(temperature=0, max_tokens=100, ignore_eos=True)
    sched.add_request("fits", fits, params)
    out = run(sched)["fits"]
    assert out.finish_reason == "length" and out.token_ids == ref.token_ids  # 9 tokens: positions 40-47 fed


@pytest.mark.parametrize("async_output", [False, True])
@pytest.mark.parametrize("stream_text", [True, False])
def test_cache_full_length_flushes_held_back_text(stream_text, async_output):
    """A lone request whose output outgrows the cache ends with "length" like a max_tokens cut: the text the
    stop-string matcher held back (a stop string whose start matches the output's last characters) and the
    detokenizer's tail are emitted, not lost (`pending_text` flushed neither). Reference: the plain loop with
    max_tokens = the tokens it got."""
    model = random_model("tiny", dtype=torch.float32, sparse_config=None)
    p = prompts(1, seed=42, lo=20, hi=21)[0]
    got = 32 - 20 + 1  # 2 pages of 16: positions 20-31 fed, one token sampled after each
    free = plain(model, p, SamplingParams(temperature=0, max_tokens=got, ignore_eos=True))
    assert len(free.text) >= 2
    stop = free.text[-2:] + "\u2603\u2603"  # held back: its first two characters end the output
    params = SamplingParams(temperature=0, max_tokens=100, ignore_eos=True, stop=[stop] if stream_text else None)
    ref = plain(model, p, dataclasses.replace(params, max_tokens=got))
    assert ref.text == free.text and ref.finish_reason == "length"
    eng = LLMEngine(model, tok(), PagedKVCache(model.config, num_pages=2, page_size=16), async_output=async_output,
                    stream_text=stream_text)
    eng.add_request("a", p, params)
    out = run(eng)["a"]
    assert (out.token_ids, out.finish_reason, out.text) == (ref.token_ids, "length", ref.text)


def test_abort_flushes_held_back_text():
    """An abort ends through the same path: the text the stop-string matcher held back comes with the "abort"
    delta (the output's text is its tokens' text)."""
    model = random_model("tiny", dtype=torch.float32, sparse_config=None)
    p = prompts(1, seed=43, lo=20, hi=21)[0]
    free = plain(model, p, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    stop = free.text[-2:] + "\u2603\u2603"
    eng = LLMEngine(model, tok(), PagedKVCache(model.config, num_pages=8, page_size=16))
    eng.add_request("a", p, SamplingParams(temperature=0, max_tokens=100, ignore_eos=True, stop=[stop]))
    outs: dict[str, GenerationOutput] = {}
    while len(outs.get("a", GenerationOutput([])).token_ids) < 6:
        for rid, d in eng.step():
            outs.setdefault(rid, GenerationOutput([])).add(d)
    eng.abort("a")
    run(eng, outs=outs)
    assert outs["a"].finish_reason == "abort" and outs["a"].token_ids == free.token_ids
    assert outs["a"].text == free.text


def test_seed_of_the_jth_completion_wraps_into_int64():
    """n completions seeded near 2**63 - 1: completion j draws with seed + j wrapped into [-2**63, 2**63)
    (seed + 1 was 2**63 and failed the seed check), offline and through the server alike, each equal to the
    plain loop run alone with that seed."""
    from cpm4.serve.engine import AsyncEngine

    top = 2**63 - 1
    model = random_model("tiny", dtype=torch.float32, sparse_config=None)
    p = prompts(1, seed=44, lo=5, hi=6)[0]
    sp = SamplingParams(n=2, seed=top, temperature=0.9, max_tokens=8, ignore_eos=True)
    refs = [plain(model, p, dataclasses.replace(sp, n=1, seed=s)) for s in (top, -(2**63))]
    assert refs[0].token_ids != refs[1].token_ids
    out = LLM(model, tokenizer=tok(), kv_cache_tokens=256).generate([p], sp)[0]
    assert [c.token_ids for c in out.outputs] == [r.token_ids for r in refs]
    eng = AsyncEngine(model, tok(), max_batch_size=2, kv_cache_tokens=256)
    try:
        with _app_client(eng) as client:
            r = client.post("/v1/completions", json={"prompt": p, "max_tokens": 8, "temperature": 0.9, "n": 2,
                                                      "seed": top, "ignore_eos": True})
    finally:
        eng.shutdown()
    assert r.status_code == 200, r.text
    assert [c["text"] for c in sorted(r.json()["choices"], key=lambda c: c["index"])] == [x.text for x in refs]
    from cpm4.engine.sampling import nth_seed

    assert [nth_seed(top, j) for j in range(3)] == [top, -(2**63), -(2**63) + 1]
    assert nth_seed(None, 2) is None and nth_seed(5, 2) == 7 and nth_seed(-(2**63), 0) == -(2**63)


def test_prompt_ids_checked_on_add_request_and_numpy_ids_taken():
    """LLMEngine.add_request refuses an id outside the vocabulary (it was queued and failed the step it joined,
    taking the other requests with it); numpy integer ids are taken as ints by the engine and the offline path
    (which refused them as "not in the vocabulary"), floats are not."""
    np = pytest.importorskip("numpy")
    model = random_model("tiny", dtype=torch.float32, sparse_config=None)
    ps = prompts(2, seed=45, lo=5, hi=20)
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    eng = LLMEngine(model, tok(), PagedKVCache(model.config, num_pages=8, page_size=16))
    eng.add_request("ok", ps[0], params)
    for bad in (1024, -1, 3.0, True):
        with pytest.raises(ValueError, match="not in the vocabulary"):
            eng.add_request("bad", [5, bad, 6], params)
    eng.add_request("np", list(np.array(ps[1], dtype=np.int64)), params)
    assert eng.by_id.keys() == {"ok", "np"} and all(type(t) is int for t in eng.by_id["np"].prompt_ids)
    out = run(eng)
    for rid, p in (("ok", ps[0]), ("np", ps[1])):
        assert out[rid].token_ids == alone(model, p, params)
    llm = LLM(model, tokenizer=tok(), kv_cache_tokens=256)
    got = llm.engine.generate([list(np.array(p, dtype=np.int32)) for p in ps], [params, params])
    assert [o.token_ids for o in got] == [alone(model, p, params) for p in ps]
    assert all(type(t) is int for o in got for t in o.prompt_token_ids)
    with pytest.raises(ValueError, match="prompt token id np.float64|prompt token id 5.0"):
        llm.engine.generate([[np.float64(5.0)]], [params])



def test_max_model_len_longer_than_the_context_refused_before_the_weights_are_read(tmp_path, monkeypatch):
    """LLM (cpm4 generate) and serve check max_model_len against the checkpoint's config before reading a
    weight (LLM built its engine, which checked it, after the load; serve did not pass it to LLM)."""
    import cpm4.model.checkpoint as checkpoint
    from cpm4.model.init import create_checkpoint
    from cpm4.serve import serve

    create_checkpoint("tiny", tmp_path / "tiny")
    LLM(tmp_path / "tiny", device="cpu", max_model_len=4096)  # the context itself: loads

    def no_weights(*a, **kw):
        raise AssertionError("weights read before max_model_len was checked")

    monkeypatch.setattr(checkpoint, "read_state_dict", no_weights)
    with pytest.raises(ValueError, match="max_model_len 5000 is longer than the model's context"):
        LLM(tmp_path / "tiny", device="cpu", max_model_len=5000)
    with pytest.raises(ValueError, match="max_model_len 5000 is longer than the model's context"):
        serve(tmp_path / "tiny", device="cpu", max_model_len=5000, log_stats_interval=0, engine_process=False)


def _dead_pid() -> int:
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", ""])
    proc.wait()
    return proc.pid


def test_save_checkpoint_cleans_up_after_saves_killed_midway(tmp_path):
    """Saves killed midway leave `.NAME.partial-PID` (mid-write) or, killed between an overwrite's two renames,
    the previous copy at `.NAME.old-PID` with NAME missing. The next save to NAME removes the partial folders of
    dead processes (a live one's is left alone) and puts a dead overwrite's old copy back, which then counts as
    the existing output (refused without overwrite); a stale old copy beside an existing NAME is removed."""
    import os
    import subprocess
    import sys

    from cpm4.model.checkpoint import save_checkpoint

    model = random_model("tiny", dtype=torch.float32, sparse_config=None)
    cfg, weights = model.config, model.state_dict()
    out = tmp_path / "ckpt"
    dead = _dead_pid()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        stale = tmp_path / f".ckpt.partial-{dead}"
        kept = tmp_path / f".ckpt.partial-{live.pid}"
        old = tmp_path / f".ckpt.old-{dead}"
        other = tmp_path / f".ckpt2.partial-{dead}"  # another output's leftovers
        for d in (stale, kept, old, other):
            d.mkdir()
            (d / "config.json").write_text(d.name)
        with pytest.raises(FileExistsError):
            save_checkpoint(weights, cfg, out)
        assert (out / "config.json").read_text() == old.name and not old.exists()  # put back, not overwritten
        assert not stale.exists() and kept.exists() and other.exists()
        save_checkpoint(weights, cfg, out, overwrite=True)
        assert json.loads((out / "config.json").read_text())["hidden_size"] == cfg.hidden_size
        (tmp_path / f".ckpt.old-{dead}").mkdir()  # killed after the second rename: NAME is whole
        save_checkpoint(weights, cfg, out, overwrite=True)
        left = sorted(p.name for p in tmp_path.iterdir())
        assert left == sorted(["ckpt", kept.name, other.name]), left
        assert os.path.isfile(out / "model.safetensors")
    finally:
        live.kill()
        live.wait()


def test_a_seeded_row_that_allows_no_token_spares_its_batch():
    """A seeded request whose grammar and allowed_token_ids exclude each other (every logit -inf) made the
    seeded draw raise (multinomial on NaN) and failed every request in the batch; it now ends alone, as an
    unseeded one does, and the other request's output equals it run alone."""
    model = random_model("tiny", dtype=torch.float32, sparse_config=None)
    b = tok().encode("b")[-1]
    eng = LLMEngine(model, tok(), PagedKVCache(model.config, num_pages=20, page_size=16))
    p, q = prompts(2, seed=41, lo=5, hi=12)
    for seed in (7, None):
        bad = SamplingParams(temperature=1.0, seed=seed, max_tokens=5, guided_regex="a+", allowed_token_ids=[b])
        good = SamplingParams(temperature=1.0, seed=3, max_tokens=5, ignore_eos=True)
        eng.add_request("bad", p, bad)
        eng.add_request("good", q, good)
        out = run(eng)
        assert out["bad"].finish_reason == "stop" and not out["bad"].text
        same_as(out["good"], plain(model, q, good), 1e-6)


def test_prompt_completed_by_a_step_launched_ahead_is_shared():
    """A prompt whose last token is fed alone (the step's budget spent on the others) may go through a decode
    step launched ahead; its full pages were then never offered for sharing. A 17-token prompt with a 16-token
    budget: its last token rides a launched step, and a later prompt with the same first 16 tokens reuses the
    page (16 tokens computed at admission) and equals its run alone."""
    model = random_model("tiny", dtype=torch.float32, sparse_config=None)
    p = prompts(1, seed=31, lo=17, hi=18)[0]
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    eng = LLMEngine(model, tok(), PagedKVCache(model.config, num_pages=8, page_size=16), chunk_tokens=16,
                    async_output=True)
    launched = []
    launch = eng._launch
    eng._launch = lambda reqs, ids: launched.append([r.computed for r in reqs]) or launch(reqs, ids)
    eng.add_request("a", p, params)
    eng.run_to_completion()
    assert launched[0] == [16]  # the prompt's 17th token went through a step launched ahead
    q = p[:16] + [7, 8, 9]
    eng.add_request("b", q, params)
    eng._admit()
    assert eng.by_id["b"].computed == 16
    assert eng.run_to_completion()["b"][1] == alone(model, q, params)
