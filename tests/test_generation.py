"""Generation: KV-cached decoding against full forward passes, batching, sampling rules, stops, streaming."""

import functools

import pytest
import torch
from conftest import random_model

from cpm4 import SamplingParams, generate, stream
from cpm4.engine.generate import PromptTooLongError, generate_stream
from cpm4.engine.kv_cache import CacheFullError, KVCache
from cpm4.model.tokenizer import build_tokenizer


@functools.cache
def tok():
    return build_tokenizer(1024)


def sparse_cfg(variant="gen-b", dense_len=-1):
    return {"kernel_size": 8, "kernel_stride": 4, "init_blocks": 1, "block_size": 16, "window_size": 32,
            "topk": 2, "dense_len": dense_len, "variant": variant}


@pytest.mark.parametrize("sparse", [None, sparse_cfg("gen-b"), sparse_cfg("gen-a"), sparse_cfg("gen-b", 100)])
def test_cached_decode_equals_full_forward(sparse):
    """Right-padded batched prefill of different lengths, then token-by-token decode: every step's logits
    equal a full forward pass over the whole sequence (float64, so equality is tight)."""
    model = random_model("tiny", sparse_config=sparse)
    g = torch.Generator().manual_seed(0)
    lens = [130, 101, 117]  # with dense_len 100 every prompt starts sparse
    total = 190
    seqs = [torch.randint(0, 1000, (total,), generator=g) for _ in lens]
    full = [model(s[None])[0] for s in seqs]
    cache = KVCache(model.config, 3, total, dtype=torch.float64)
    ids = torch.zeros(3, max(lens), dtype=torch.long)
    for i, n in enumerate(lens):
        ids[i, :n] = seqs[i][:n]
    out = model(ids, cache, torch.tensor(lens))
    for i, n in enumerate(lens):
        torch.testing.assert_close(out[i, :n], full[i][:n], rtol=1e-10, atol=1e-10)
    pos = list(lens)
    while min(pos) < total:
        step = torch.tensor([[int(seqs[i][min(p, total - 1)])] for i, p in enumerate(pos)])
        active = torch.tensor([int(p < total) for p in pos])
        logits = model(step, cache, active, last_only=True)
        for i, p in enumerate(pos):
            if p < total:
                torch.testing.assert_close(logits[i], full[i][p], rtol=1e-10, atol=1e-10)
        pos = [p + int(p < total) for p in pos]
    assert cache.lens.tolist() == [total] * 3


def test_cache_compressed_keys_are_incremental():
    model = random_model("tiny", sparse_config=sparse_cfg())
    cache = KVCache(model.config, 1, 200, dtype=torch.float64)
    ids = torch.randint(0, 1000, (1, 200), generator=torch.Generator().manual_seed(1))
    model(ids[:, :60], cache)
    for t in range(60, 200):
        model(ids[:, t:t + 1], cache)
    from cpm4.kernels.infllm_v2 import compress_keys

    sc = model.config.sparse_config
    for layer in range(model.config.num_hidden_layers):
        k1, k2 = compress_keys(cache.k[layer][0, :200], sc)
        n1, n2 = cache.n_fine[layer][0], cache.n_coarse[layer][0]
        # The last step pooled every kernel complete at 200 tokens (the query at 199 sees them all).
        assert n1 == k1.shape[0] and n2 == k2.shape[0]
        assert torch.equal(cache.fine[layer][0, :n1], k1) and torch.equal(cache.coarse[layer][0, :n2], k2)


def test_cache_full_is_reported():
    model = random_model("tiny", dtype=torch.float32)
    cache = KVCache(model.config, 1, 8)
    with pytest.raises(CacheFullError, match="capacity 8"):
        model(torch.zeros(1, 9, dtype=torch.long), cache)


def naive_greedy(model, ids, n):
    ids = list(ids)
    out = []
    for _ in range(n):
        nxt = int(model(torch.tensor([ids]))[0, -1].argmax())
        out.append(nxt)
        ids.append(nxt)
    return out


@pytest.mark.parametrize("sparse", [None, sparse_cfg("gen-b")])
def test_greedy_generation_equals_argmax_of_full_forward(sparse):
    model = random_model("tiny", dtype=torch.float32, sparse_config=sparse)
    prompt = torch.randint(3, 1000, (40,), generator=torch.Generator().manual_seed(2)).tolist()
    out = generate(model, tok(), prompt, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))[0]
    assert out.token_ids == naive_greedy(model, prompt, 12)
    assert out.finish_reason == "length"
    assert out.text == tok().decode(out.token_ids)


def test_batch_of_different_lengths_equals_each_alone():
    model = random_model("tiny", dtype=torch.float32, sparse_config=sparse_cfg("gen-b", 50))
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 1000, (n,), generator=g).tolist() for n in (5, 70, 33, 1)]
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in (9, 4, 12, 7)]
    params[2] = SamplingParams(temperature=0.9, top_k=50, seed=7, max_tokens=12, ignore_eos=True)
    batch = generate(model, tok(), prompts, params)
    for p, sp, o in zip(prompts, params, batch):
        alone = generate(model, tok(), p, sp)[0]
        assert o.token_ids == alone.token_ids and len(o.token_ids) == sp.max_tokens


def test_seeds_reproduce_and_differ():
    model = random_model("tiny", dtype=torch.float32)
    run = functools.partial(generate, model, tok(), "hello there")
    a = run(SamplingParams(temperature=1.0, seed=1, max_tokens=16, ignore_eos=True))[0].token_ids
    b = run(SamplingParams(temperature=1.0, seed=1, max_tokens=16, ignore_eos=True))[0].token_ids
    c = run(SamplingParams(temperature=1.0, seed=2, max_tokens=16, ignore_eos=True))[0].token_ids
    assert a == b and a != c


def test_stop_token_and_eos():
    model = random_model("tiny", dtype=torch.float32)
    prompt = tok().encode("stop test")
    free = generate(model, tok(), prompt, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))[0]
    target = free.token_ids[4]
    first = free.token_ids.index(target)
    out = generate(model, tok(), prompt, SamplingParams(temperature=0, max_tokens=10, stop_token_ids=[target]))[0]
    # The stop token ends the ids (as in vLLM and transformers) but not the text.
    assert out.finish_reason == "stop" and out.token_ids == free.token_ids[:first + 1]
    assert out.text == tok().decode(free.token_ids[:first])
    # The config's eos ids stop generation unless ignore_eos.
    model.config.eos_token_id = [target]
    out = generate(model, tok(), prompt, SamplingParams(temperature=0, max_tokens=10))[0]
    assert out.token_ids == free.token_ids[:first + 1] and out.finish_reason == "stop"


def test_stop_strings_and_streaming():
    model = random_model("tiny", dtype=torch.float32)
    prompt = "The quick brown fox"
    free = generate(model, tok(), prompt, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))[0]
    text = free.text
    assert len(text) > 10
    stop = text[6:9]
    cut = text.find(stop)
    out = generate(model, tok(), prompt, SamplingParams(temperature=0, max_tokens=30, stop=[stop]))[0]
    assert out.text == text[:cut] and out.finish_reason == "stop"
    pieces = list(stream(model, tok(), prompt, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)))
    assert "".join(pieces) == text and len(pieces) > 1


def test_streaming_batch_deltas_add_up():
    model = random_model("tiny", dtype=torch.float32)
    prompts = [tok().encode("a"), tok().encode("bb bb")]
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (3, 6)]
    texts, tokens, reasons = ["", ""], [[], []], [None, None]
    for step in generate_stream(model, tok(), prompts, params):
        for d in step:
            texts[d.index] += d.text
            tokens[d.index] += d.token_ids
            reasons[d.index] = d.finish_reason
    ref = generate(model, tok(), prompts, params)
    assert texts == [o.text for o in ref] and tokens == [o.token_ids for o in ref]
    assert reasons == ["length", "length"]


def test_prompt_errors_and_context_limit():
    model = random_model("tiny", dtype=torch.float32)
    ctx = model.config.max_position_embeddings
    with pytest.raises(PromptTooLongError, match=f"prompt too long: {ctx} tokens"):
        generate(model, tok(), [5] * ctx, SamplingParams(max_tokens=1))
    with pytest.raises(ValueError, match="empty prompt"):
        generate(model, tok(), [[]], SamplingParams(max_tokens=1))
    # max_tokens is clipped to the room left in the context.
    out = generate(model, tok(), [5] * (ctx - 3), SamplingParams(temperature=0, max_tokens=50, ignore_eos=True))[0]
    assert len(out.token_ids) == 3 and out.finish_reason == "length"


def test_logprobs_match_log_softmax_of_full_forward():
    model = random_model("tiny", dtype=torch.float32)
    prompt = tok().encode("log probs")
    out = generate(model, tok(), prompt, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, logprobs=3))[0]
    assert len(out.logprobs) == 4
    ids = list(prompt)
    for lp in out.logprobs:
        ref = torch.log_softmax(model(torch.tensor([ids]))[0, -1].double(), -1)
        assert lp.token_id == int(ref.argmax())
        assert abs(lp.logprob - float(ref[lp.token_id])) < 1e-4
        assert [t for t, _ in lp.top] == ref.topk(3).indices.tolist()
        ids.append(lp.token_id)
    with pytest.raises(ValueError, match="logprobs"):
        SamplingParams(logprobs=-1)


def test_cancelled_sequence_ends_with_abort_and_others_continue():
    model = random_model("tiny", dtype=torch.float32)
    prompts = [tok().encode("first"), tok().encode("second one")]
    params = [SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)] * 2
    steps = {"n": 0}

    def cancelled(i):
        return i == 0 and steps["n"] >= 3

    got = [[], []]
    reasons = [None, None]
    for step in generate_stream(model, tok(), prompts, params, cancelled):
        steps["n"] += 1
        for d in step:
            got[d.index] += d.token_ids
            reasons[d.index] = d.finish_reason or reasons[d.index]
    alone = generate(model, tok(), [prompts[1]], params[1])[0]
    assert reasons == ["abort", "length"] and len(got[0]) == 3
    assert got[1] == alone.token_ids
