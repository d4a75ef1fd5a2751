"""Beam search (`LLM.beam_search`, vLLM's) against a naive float64 beam search over full forward passes."""

import pytest
import torch
from conftest import random_model

from cpm4 import LLM, BeamSearchParams
from cpm4.engine.beam_search import beam_score, beam_search
from cpm4.model.tokenizer import build_tokenizer


@pytest.fixture(scope="module")
def llm():
    model = random_model("tiny", dtype=torch.float64, seed=4)
    return LLM(model, tokenizer=build_tokenizer(model.config.vocab_size))


def naive(model, prompt, width, max_tokens, eos, length_penalty=1.0, ignore_eos=False, context=10**9):
    """Every beam's next-token log-softmax from a whole forward pass; candidates its top 2 x width."""
    def score(b):
        return beam_score(b[0], b[1], frozenset(eos), length_penalty)

    beams, done = [(list(prompt), 0.0)], []
    for _ in range(max_tokens):
        grown = []
        for toks, cum in beams:
            with torch.no_grad():
                lp = torch.log_softmax(model(torch.tensor([toks], device=model.device))[0][-1].double(), -1).cpu()
            top = torch.topk(lp, 2 * width)
            for t, v in zip(top.indices.tolist(), top.values.tolist()):
                (done if t in eos and not ignore_eos else grown).append((toks + [t], cum + v))
        beams = sorted(grown, key=score, reverse=True)[:width]
        done += [b for b in beams if len(b[0]) >= context]
        beams = [b for b in beams if len(b[0]) < context]
        if not beams:
            break
    return sorted(done + beams, key=score, reverse=True)[:width]


PROMPTS = [[5, 17, 300, 41, 9], [800, 3, 77]]


@pytest.mark.parametrize("width,penalty", [(1, 1.0), (3, 1.0), (4, 0.6)])
def test_beams_equal_the_naive_search(llm, width, penalty):
    """The best beams (tokens, order, summed log-probabilities) are the naive search's; with width 1 it is greedy
    decoding; the texts are the generated tokens' and every beam ran to max_tokens ("length")."""
    params = BeamSearchParams(beam_width=width, max_tokens=6, length_penalty=penalty)
    outs = llm.beam_search([{"prompt_token_ids": p} for p in PROMPTS], params)
    assert len(outs) == len(PROMPTS)
    for p, out in zip(PROMPTS, outs):
        ref = naive(llm.model, p, width, 6, llm.model.config.eos_token_ids, penalty)
        assert [s.tokens for s in out.sequences] == [r[0] for r in ref]
        for s, r in zip(out.sequences, ref):
            assert s.cum_logprob == pytest.approx(r[1], abs=1e-5)  # (the engine reports float32 logprobs)
            assert sum(lp.logprob for lp in s.logprobs) == pytest.approx(s.cum_logprob, abs=1e-9)
            assert s.text == llm.tokenizer.decode(s.tokens[len(p):]) and s.finish_reason == "length"
    if width == 1:
        from cpm4 import SamplingParams

        greedy = llm.generate([{"prompt_token_ids": p} for p in PROMPTS],
                              SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
        assert [o.sequences[0].tokens[len(p):] for o, p in zip(outs, PROMPTS)] == [g.token_ids for g in greedy]


def test_eos_ends_a_beam(llm):
    """A beam that picks an EOS id is finished ("stop", stop_reason the id, text without it) and competes with
    the live ones at the end, as in the naive search; ignore_eos keeps it going. The EOS here is a token the
    search meets (the second step's third choice), so the path is taken."""
    p = PROMPTS[0]
    free = naive(llm.model, p, 3, 2, [])
    eos = [free[2][0][-1]]

    def run(ignore):
        return beam_search(lambda ps, sps: llm.engine.generate(ps, sps), llm.tokenizer.decode, [p],
                           BeamSearchParams(beam_width=3, max_tokens=5, ignore_eos=ignore), eos, 10**6)[0]

    out = run(False)
    ref = naive(llm.model, p, 3, 5, eos)
    assert [s.tokens for s in out.sequences] == [r[0] for r in ref]
    stopped = [s for s in out.sequences if s.finish_reason == "stop"]
    assert stopped  # the finished beam ranks among the best here
    assert all(s.tokens[-1] == eos[0] and s.stop_reason == eos[0] for s in stopped)
    assert all(s.text == llm.tokenizer.decode(s.tokens[len(p):-1]) for s in stopped)
    ignored = run(True)
    assert [s.tokens for s in ignored.sequences] == [r[0] for r in naive(llm.model, p, 3, 5, eos, ignore_eos=True)]
    assert all(s.finish_reason == "length" and len(s.tokens) == len(p) + 5 for s in ignored.sequences)


def test_context_ends_beams(llm):
    """Beams stop at the context ("length") instead of asking the engine for a token it has no room for."""
    p = PROMPTS[1]
    out = beam_search(lambda ps, sps: llm.engine.generate(ps, sps), llm.tokenizer.decode, [p],
                      BeamSearchParams(beam_width=2, max_tokens=50), [], len(p) + 4)[0]
    assert [s.tokens for s in out.sequences] == [r[0] for r in naive(llm.model, p, 2, 50, [], context=len(p) + 4)]
    assert all(len(s.tokens) == len(p) + 4 and s.finish_reason == "length" for s in out.sequences)


@pytest.mark.parametrize("kw,match", [
    ({"beam_width": 0, "max_tokens": 3}, "beam_width must be an int in \\[1, 10\\]"),
    ({"beam_width": 11, "max_tokens": 3}, "beam_width"),
    ({"beam_width": 2, "max_tokens": 0}, "max_tokens must be an int >= 1"),
    ({"beam_width": 2, "max_tokens": 3, "temperature": -1}, "temperature"),
    ({"beam_width": 2, "max_tokens": 3, "length_penalty": float("nan")}, "length_penalty"),
    ({"beam_width": 2, "max_tokens": 3, "ignore_eos": 1}, "ignore_eos must be a bool"),
])
def test_bad_params(kw, match):
    with pytest.raises(ValueError, match=match):
        BeamSearchParams(**kw)


def test_errors_and_text_prompts(llm, tiny_checkpoint):
    """Text prompts work (on a checkpoint's LLM); a SamplingParams instead of BeamSearchParams is a TypeError; a
    prompt with no room left is the engine's usual error."""
    from cpm4 import SamplingParams
    from cpm4.engine.generate import PromptTooLongError

    ck = LLM(tiny_checkpoint, device="cpu")
    out = ck.beam_search(["Hello there", "A"], BeamSearchParams(beam_width=2, max_tokens=3))
    assert [len(o.sequences) for o in out] == [2, 2]
    assert all(s.tokens[:len(ck.tokenizer.encode("A"))] == ck.tokenizer.encode("A") for s in out[1].sequences)
    with pytest.raises(TypeError, match="BeamSearchParams"):
        ck.beam_search("Hi", SamplingParams(max_tokens=2))
    with pytest.raises(PromptTooLongError):
        llm.beam_search([[5] * llm.engine.context], BeamSearchParams(beam_width=2, max_tokens=2))


def test_server_use_beam_search(llm):
    """vLLM's `use_beam_search` on /v1/completions and /v1/chat/completions: the n choices are the n best beams,
    as `LLM.beam_search` gives them (length_penalty too); usage counts every beam's tokens; fields a beam search
    would ignore, a stream, and n above 10 are 400s naming them."""
    from fastapi.testclient import TestClient

    from cpm4.serve import create_app
    from cpm4.serve.engine import AsyncEngine

    eng = AsyncEngine(llm.model, llm.tokenizer, max_batch_size=8, kv_cache_tokens=2048)
    try:
        with TestClient(create_app(eng, "m")) as c:
            r = c.post("/v1/completions", json={"prompt": [PROMPTS[0], PROMPTS[1]], "n": 3, "max_tokens": 5,
                                                "use_beam_search": True, "length_penalty": 0.7})
            assert r.status_code == 200, r.text
            body = r.json()
            want = llm.beam_search([{"prompt_token_ids": p} for p in PROMPTS],
                                   BeamSearchParams(beam_width=3, max_tokens=5, length_penalty=0.7))
            assert [ch["index"] for ch in body["choices"]] == list(range(6))
            assert [ch["text"] for ch in body["choices"]] == [s.text for o in want for s in o.sequences]
            assert body["usage"]["completion_tokens"] == 30 and body["usage"]["prompt_tokens"] == 8
            msgs = [{"role": "user", "content": "hello"}]
            r = c.post("/v1/chat/completions", json={"messages": msgs, "n": 2, "max_tokens": 4,
                                                     "use_beam_search": True})
            assert r.status_code == 200, r.text
            ids = llm.tokenizer.encode_chat(msgs)
            want = llm.beam_search([{"prompt_token_ids": ids}], BeamSearchParams(beam_width=2, max_tokens=4))[0]
            assert [ch["message"]["content"] for ch in r.json()["choices"]] == [s.text for s in want.sequences]
            for extra, param in (({"stream": True}, "stream"), ({"logprobs": 1}, "logprobs"),
                                 ({"stop": ["x"]}, "stop"), ({"guided_regex": "a+"}, "guided_regex"),
                                 ({"n": 11}, "n")):
                r = c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 3, "use_beam_search": True,
                                                    **extra})
                assert r.status_code == 400 and r.json()["error"]["param"] == param, (extra, r.text)
    finally:
        eng.shutdown()


@pytest.mark.gpu
def test_beam_search_on_cuda(tiny_checkpoint):
    """On CUDA (paged decode kernels, CUDA graphs): the beams are the naive search's over the same CUDA model."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA")
    import gc

    # A small fixed cache: the default (90% of the GPU) would stay reserved in this process for later tests' engine
    # processes (one failed so, 2026-12-02).
    gpu = LLM(tiny_checkpoint, device="cuda", dtype="float32", kv_cache_tokens=4096)
    try:
        out = gpu.beam_search([{"prompt_token_ids": p} for p in PROMPTS],
                              BeamSearchParams(beam_width=3, max_tokens=6))
        for p, o in zip(PROMPTS, out):
            ref = naive(gpu.model, p, 3, 6, gpu.model.config.eos_token_ids)
            assert [s.tokens for s in o.sequences] == [r[0] for r in ref]
            assert [s.cum_logprob for s in o.sequences] == pytest.approx([r[1] for r in ref], abs=1e-3)
    finally:
        del gpu
        gc.collect()
        torch.cuda.empty_cache()


def _metrics(text: str) -> dict[tuple[str, tuple], float]:
    from prometheus_client.parser import text_string_to_metric_families

    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def test_server_beam_search_counts_once_in_metrics(llm):
    """/metrics counts a beam search as one request per prompt, not as its steps' engine requests (one per live
    beam per token, each with the whole sequence as its prompt): one observation per histogram, the prompt's
    tokens and the returned beams' (the usage's); a plain request afterwards counts as before. The token counters
    are the engine's work (every step's), as vLLM's."""
    pytest.importorskip("prometheus_client")
    from fastapi.testclient import TestClient

    from cpm4.serve import create_app
    from cpm4.serve.engine import AsyncEngine

    lab = (("model_name", "m"),)

    def value(m, name, labels=lab):
        return m.get((name, labels), 0)

    names = ["cpm4_request_prompt_tokens_count",
             "cpm4_request_prompt_tokens_sum", "cpm4_request_generation_tokens_count",
             "cpm4_request_generation_tokens_sum", "cpm4_e2e_request_latency_seconds_count",
             "cpm4_time_to_first_token_seconds_count", "cpm4_request_time_per_output_token_seconds_count",
             "cpm4_prefix_cache_queries_total"]
    length = ("cpm4_request_success_total", (("finished_reason", "length"), ("model_name", "m")))
    eng = AsyncEngine(llm.model, llm.tokenizer, max_batch_size=8, kv_cache_tokens=2048)
    try:
        with TestClient(create_app(eng, "m")) as c:
            def deltas(body, url="/v1/completions"):
                before = _metrics(c.get("/metrics").text)
                r = c.post(url, json=body)
                assert r.status_code == 200, r.text
                after = _metrics(c.get("/metrics").text)
                got = {n: value(after, n) - value(before, n) for n in names}
                got["success"] = after.get(length, 0) - before.get(length, 0)
                return got, r.json()["usage"]

            got, usage = deltas({"prompt": PROMPTS, "n": 3, "max_tokens": 5, "use_beam_search": True,
                                 "ignore_eos": True})
            assert usage == {"prompt_tokens": 8, "completion_tokens": 30, "total_tokens": 38}
            assert got == {"cpm4_request_prompt_tokens_count": 2, "cpm4_request_prompt_tokens_sum": 8,
                           "cpm4_request_generation_tokens_count": 2, "cpm4_request_generation_tokens_sum": 30,
                           "cpm4_e2e_request_latency_seconds_count": 2, "cpm4_time_to_first_token_seconds_count": 2,
                           "cpm4_request_time_per_output_token_seconds_count": 2,
                           "cpm4_prefix_cache_queries_total": 8, "success": 2}
            msgs = [{"role": "user", "content": "hello"}]
            got, usage = deltas({"messages": msgs, "n": 2, "max_tokens": 4, "use_beam_search": True,
                                 "ignore_eos": True}, "/v1/chat/completions")
            assert got["success"] == 1 and got["cpm4_e2e_request_latency_seconds_count"] == 1
            assert got["cpm4_request_prompt_tokens_sum"] == usage["prompt_tokens"]
            assert got["cpm4_request_generation_tokens_sum"] == usage["completion_tokens"] == 8
            got, usage = deltas({"prompt": PROMPTS[0], "n": 2, "max_tokens": 3, "ignore_eos": True})  # no beams
            assert got["success"] == 2 and got["cpm4_request_prompt_tokens_sum"] == 10
            assert got["cpm4_request_generation_tokens_sum"] == usage["completion_tokens"] == 6
    finally:
        eng.shutdown()


def test_server_beam_search_metrics_when_refused_and_concurrent(llm):
    """A search whose first step the engine refuses (it stopped between the API's check and the step) is not
    counted, as a plain request refused so is not; it was counted as one request per prompt that ended in
    "error". Two searches and a plain request at once are each counted once, with their own tokens."""
    pytest.importorskip("prometheus_client")
    import asyncio

    import httpx

    from cpm4.serve import create_app
    from cpm4.serve.engine import AsyncEngine, EngineClosedError

    eng = AsyncEngine(llm.model, llm.tokenizer, max_batch_size=8, kv_cache_tokens=2048)
    names = ("cpm4_request_success_total", "cpm4_e2e_request_latency_seconds_count",
             "cpm4_request_prompt_tokens_sum", "cpm4_request_generation_tokens_sum")

    def totals(text):
        out = dict.fromkeys(names, 0.0)
        for (name, _), v in _metrics(text).items():
            if name in out:
                out[name] += v
        return out

    beam = {"prompt": PROMPTS, "n": 3, "max_tokens": 5, "use_beam_search": True, "ignore_eos": True}
    plain = {"prompt": PROMPTS[0], "max_tokens": 4, "ignore_eos": True}

    async def main():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(eng, "m")),
                                     base_url="http://t") as c:
            async def changed(*posts):
                before = totals((await c.get("/metrics")).text)
                rs = await asyncio.gather(*(c.post("/v1/completions", json=b) for b in posts))
                after = totals((await c.get("/metrics")).text)
                return [r.status_code for r in rs], {n: after[n] - before[n] for n in names}

            def closed(req):
                raise EngineClosedError("the engine is shut down")

            eng._register = closed
            for body in (plain, beam):
                assert await changed(body) == ([503], dict.fromkeys(names, 0.0))
            del eng._register
            codes, got = await changed(beam, beam, plain)
            assert codes == [200] * 3
            assert got == {"cpm4_request_success_total": 5, "cpm4_e2e_request_latency_seconds_count": 5,
                           "cpm4_request_prompt_tokens_sum": 8 + 8 + 5, "cpm4_request_generation_tokens_sum": 64}

    try:
        asyncio.run(main())
    finally:
        eng.shutdown()
