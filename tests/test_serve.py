"""The OpenAI-compatible server: a real uvicorn on 127.0.0.1 in a background thread, driven by the official
`openai` client (and raw httpx where a client would not send the request), against the tiny random model."""

from __future__ import annotations

import asyncio
import json
import random
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

import torch  # noqa: E402
import uvicorn  # noqa: E402

from cpm4.engine.generate import PromptTooLongError, StreamDelta, TokenLogprob  # noqa: E402
from cpm4.engine.sampling import SamplingParams  # noqa: E402
from cpm4.llm import LLM  # noqa: E402
from cpm4.model.tokenizer import TOOL_CALL  # noqa: E402
from cpm4.serve import AsyncEngine, create_app  # noqa: E402
from cpm4.serve.engine import _END, EngineError  # noqa: E402
from cpm4.serve.tool_calls import ToolCallCollector, parse_tool_calls  # noqa: E402

MODEL = "tiny-test"
KEY = "sk-test-key"
MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                           "parameters": {"type": "object",
                                                          "properties": {"city": {"type": "string"}}}}}]


# ---------------------------------------------------------------------------------------------------------
# Fixtures: one tiny model, one engine, two servers (without and with an API key) for the whole module


class _Server:
    def __init__(self, app) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))  # a free port, held open so nothing can take it before uvicorn listens
        self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="module")
def llm(tiny_checkpoint):
    return LLM(tiny_checkpoint, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def engine(llm):
    eng = AsyncEngine(llm.model, llm.tokenizer, max_batch_size=16)
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def server(engine):
    srv = _Server(create_app(engine, MODEL))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)


def _greedy(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, **kw)


def _assert_alive(client) -> None:
    """A bad request never disturbs the server: a normal one still works right after."""
    r = client.completions.create(model=MODEL, prompt="ok", max_tokens=2, temperature=0)
    assert r.choices[0].finish_reason in ("stop", "length")


# ---------------------------------------------------------------------------------------------------------
# Basic endpoints


def test_models_and_health(client, server):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    r = httpx.get(f"{server.url}/health", timeout=10)
    assert r.status_code == 200 and r.json() == {"status": "ok"}
    from cpm4 import __version__

    assert httpx.get(f"{server.url}/version", timeout=10).json() == {"version": __version__}


def test_cors_only_for_allowed_origins(engine, server):
    """No CORS headers by default; with allowed_origins, preflights pass (before the API key check) and
    answers, the key check's 401 included, carry the origin."""
    pre = {"Origin": "http://localhost:3000", "Access-Control-Request-Method": "POST",
           "Access-Control-Request-Headers": "authorization,content-type"}
    r = httpx.options(f"{server.url}/v1/chat/completions", headers=pre, timeout=10)
    assert "access-control-allow-origin" not in r.headers
    srv = _Server(create_app(engine, MODEL, api_key=KEY, allowed_origins=["http://localhost:3000"]))
    try:
        r = httpx.options(f"{srv.url}/v1/chat/completions", headers=pre, timeout=10)
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://localhost:3000"
        r = httpx.get(f"{srv.url}/v1/models", headers={"Origin": "http://localhost:3000"}, timeout=10)
        assert r.status_code == 401 and r.headers["access-control-allow-origin"] == "http://localhost:3000"
        r = httpx.get(f"{srv.url}/v1/models", headers={"Origin": "http://localhost:3000",
                                                       "Authorization": f"Bearer {KEY}"}, timeout=10)
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://localhost:3000"
        r = httpx.options(f"{srv.url}/v1/chat/completions", headers={**pre, "Origin": "http://evil.example"},
                          timeout=10)
        assert r.status_code == 400 and "access-control-allow-origin" not in r.headers
    finally:
        srv.stop()


def test_chat_greedy_matches_llm(client, llm):
    ref = llm.chat(MESSAGES, _greedy(12))[0]
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=12, temperature=0)
    assert r.object == "chat.completion" and r.model == MODEL
    msg = r.choices[0].message
    assert msg.role == "assistant" and msg.content == ref.text
    assert r.choices[0].finish_reason == ref.finish_reason
    assert r.usage.prompt_tokens == len(llm.chat_ids(MESSAGES)) == len(ref.prompt_token_ids)
    assert r.usage.completion_tokens == len(ref.token_ids)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    # max_completion_tokens is the newer name for the same limit; omitting model means the served one.
    r2 = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_completion_tokens=12, temperature=0)
    assert r2.choices[0].message.content == ref.text


def test_checkpoint_sampling_defaults_fill_unset_fields(engine, llm):
    """sampling_defaults (the checkpoint's generation_config.json) fill what a request leaves unset; what it
    sets wins."""
    srv = _Server(create_app(engine, MODEL, sampling_defaults={"temperature": 0.0, "max_tokens": 6,
                                                               "repetition_penalty": 1.5}))
    try:
        c = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="unused", max_retries=0, timeout=60)
        ref = llm.chat(MESSAGES, _greedy(6, repetition_penalty=1.5))[0]
        r = c.chat.completions.create(model=MODEL, messages=MESSAGES)  # no temperature, no max_tokens
        assert r.choices[0].message.content == ref.text and r.usage.completion_tokens == len(ref.token_ids) <= 6
        ref9 = llm.chat(MESSAGES, _greedy(9, repetition_penalty=1.0))[0]
        r = c.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=9, extra_body={
            "repetition_penalty": 1.0})
        assert r.choices[0].message.content == ref9.text
        ref4 = llm.generate("def main():", _greedy(4, repetition_penalty=1.5))[0]
        r = c.completions.create(model=MODEL, prompt="def main():", max_tokens=4)
        assert r.choices[0].text == ref4.text
    finally:
        srv.stop()


def test_completion_greedy_matches_llm(client, llm, server):
    prompts = ["The capital of France is", "def main():"]
    refs = llm.generate(prompts, _greedy(10))
    r = client.completions.create(model=MODEL, prompt=prompts[0], max_tokens=10, temperature=0)
    assert r.object == "text_completion"
    assert r.choices[0].text == refs[0].text and r.choices[0].finish_reason == refs[0].finish_reason
    assert r.usage.prompt_tokens == len(refs[0].prompt_token_ids)
    assert r.usage.completion_tokens == len(refs[0].token_ids)
    # A list of prompts: one choice each, in order. A token-id prompt gives the same as its text.
    r = client.completions.create(model=MODEL, prompt=prompts, max_tokens=10, temperature=0)
    assert [c.text for c in r.choices] == [o.text for o in refs] and [c.index for c in r.choices] == [0, 1]
    assert r.usage.prompt_tokens == sum(len(o.prompt_token_ids) for o in refs)
    r = client.completions.create(model=MODEL, prompt=refs[1].prompt_token_ids, max_tokens=10, temperature=0)
    assert r.choices[0].text == refs[1].text
    # Model omitted (OpenAI requires it; we take it as the served model) and echo.
    raw = httpx.post(f"{server.url}/v1/completions", timeout=60,
                     json={"prompt": prompts[0], "max_tokens": 10, "temperature": 0, "echo": True}).json()
    assert raw["choices"][0]["text"] == prompts[0] + refs[0].text


def test_penalties_and_logit_bias_match_llm(client, llm):
    """presence/frequency penalties and logit_bias reach sampling as LLM.chat applies them (greedy: the bias
    makes a token win or lose outright, the penalties change what repeats)."""
    ref_plain = llm.chat(MESSAGES, _greedy(12))[0]
    first = ref_plain.token_ids[0]
    kw = dict(presence_penalty=1.5, frequency_penalty=0.75, logit_bias={first: -100, 7: 5})
    ref = llm.chat(MESSAGES, _greedy(12, **kw))[0]
    assert ref.token_ids[0] != first  # the bias moved the greedy pick
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=12, temperature=0,
                                       presence_penalty=1.5, frequency_penalty=0.75,
                                       logit_bias={str(first): -100, "7": 5})
    assert r.choices[0].message.content == ref.text
    assert r.usage.completion_tokens == len(ref.token_ids)
    # An id outside the vocabulary is the request's error, not the batch's.
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2,
                                       logit_bias={str(llm.model.config.vocab_size): 1})
    assert info.value.body["param"] == "logit_bias"
    _assert_alive(client)


# ---------------------------------------------------------------------------------------------------------
# Streaming


def test_streaming_chat(client):
    # Twice: the first may put the prompt's pages in the prefix cache (the usage's cached_tokens then differ).
    for _ in range(2):
        full = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=10, temperature=0)
    chunks = list(client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=10, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [full.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == full.usage.model_dump()
    assert all(c.usage is None for c in chunks[:-1])


def test_streaming_completion(client, llm):
    ref = llm.generate("Once upon a time", _greedy(10))[0]
    chunks = list(client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=10,
                                            temperature=0, stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "text_completion" for c in chunks)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == ref.text
    assert chunks[-1].usage.completion_tokens == len(ref.token_ids)
    assert chunks[-1].usage.prompt_tokens == len(ref.prompt_token_ids)
    # Without include_usage there is no usage chunk.
    plain = list(client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=3, stream=True))
    assert all(c.choices for c in plain)
    # vLLM's continuous_usage_stats: every chunk carries the usage so far, growing to the final count.
    opts = {"include_usage": True, "continuous_usage_stats": True}
    for make in (lambda: client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=10,
                                                   temperature=0, stream=True, stream_options=opts),
                 lambda: client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=10,
                                                        temperature=0, stream=True, stream_options=opts)):
        chunks = list(make())
        counts = [c.usage.completion_tokens for c in chunks]
        assert counts == sorted(counts) and counts[-1] == chunks[-1].usage.completion_tokens > 0
        assert len({c.usage.prompt_tokens for c in chunks}) == 1


def test_responses_not_streamed_take_their_text_at_the_end(client, monkeypatch):
    """A response that is not streamed asks the engine for its text at the end (decoded once, not id by id):
    stream_text=False for completions and plain chat, True for streams and for chat with tools (the tool-call
    parser reads each step's text). The text is the streamed one, and the usage counts agree."""
    from cpm4.engine.scheduler import LLMEngine

    seen: dict[str, bool] = {}
    add = LLMEngine.add_request

    def spy(self, request_id, prompt_ids, params, stream_text=None, **kw):
        seen[request_id] = stream_text
        return add(self, request_id, prompt_ids, params, stream_text=stream_text, **kw)

    monkeypatch.setattr(LLMEngine, "add_request", spy)

    def last() -> bool:  # the latest request's
        return list(seen.values())[-1]

    prompt = "A long time ago in a galaxy"
    whole = client.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0)
    assert last() is False
    chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0, stream=True))
    assert last() is True
    assert whole.choices[0].text == "".join(c.choices[0].text for c in chunks) and whole.choices[0].text
    assert whole.usage.completion_tokens == 24
    chat = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=16, temperature=0, n=2)
    assert last() is False and chat.choices[0].message.content == chat.choices[1].message.content
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=16, temperature=0, stream=True) if c.choices)
    assert chat.choices[0].message.content == streamed
    client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4, temperature=0, tools=TOOLS)
    assert last() is True


def test_raw_sse_format(server):
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", timeout=60,
                      json={"model": MODEL, "messages": MESSAGES, "max_tokens": 3, "stream": True}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        body = r.read().decode()
    events = [e for e in body.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[0][6:])["choices"][0]["delta"] == {"role": "assistant", "content": ""}


# ---------------------------------------------------------------------------------------------------------
# Sampling options


def test_n_with_seed_is_reproducible(client, llm):
    kw = dict(model=MODEL, prompt="Hello", max_tokens=8, temperature=1.0, seed=1234, n=2)
    a = client.completions.create(**kw)
    b = client.completions.create(**kw)
    assert len(a.choices) == 2 and [c.index for c in a.choices] == [0, 1]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    # Choice i is seeded with seed + i, so it equals the offline run with that seed.
    refs = [llm.generate("Hello", SamplingParams(temperature=1.0, max_tokens=8, seed=1234 + i))[0] for i in range(2)]
    assert [c.text for c in a.choices] == [o.text for o in refs]
    assert a.usage.completion_tokens == sum(len(o.token_ids) for o in refs)
    chat = [client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=6, temperature=1.0,
                                           seed=99, n=2) for _ in range(2)]
    assert [c.message.content for c in chat[0].choices] == [c.message.content for c in chat[1].choices]


def test_stop_strings(client, llm):
    ref = llm.generate("Hello world", _greedy(16, ignore_eos=True))[0]
    text = ref.text
    assert len(text) >= 6
    stop = text[3:5]
    expected = text[: text.find(stop)]
    for stop_arg in (stop, [stop, "\u2603never\u2603"]):
        r = client.completions.create(model=MODEL, prompt="Hello world", max_tokens=16, temperature=0,
                                      stop=stop_arg, extra_body={"ignore_eos": True})
        assert r.choices[0].text == expected and r.choices[0].finish_reason == "stop"


def test_stop_reason_in_choices(client, llm):
    """vLLM's choice field stop_reason: the stop string or the stop_token_ids id that ended the output (None for
    EOS and "length"), in the response and in the stream's finishing chunk, for completions and chat."""
    ref = llm.generate("Hello world", _greedy(16, ignore_eos=True))[0]
    stop = ref.text[3:5]
    tok = ref.token_ids[5]
    cases = [({"stop": [stop, "\u2603never"]}, stop),
             ({"extra_body": {"ignore_eos": True, "stop_token_ids": [tok]}}, tok), ({}, None)]
    for kw, want in cases:
        kw = {"extra_body": {"ignore_eos": True}, **kw}
        r = client.completions.create(model=MODEL, prompt="Hello world", max_tokens=16, temperature=0, **kw)
        assert r.choices[0].finish_reason == ("length" if want is None else "stop")
        assert r.choices[0].model_extra["stop_reason"] == want
        last = list(client.completions.create(model=MODEL, prompt="Hello world", max_tokens=16, temperature=0,
                                              stream=True, **kw))[-1].choices[0]
        assert (last.finish_reason, last.model_extra["stop_reason"]) == (r.choices[0].finish_reason, want)
    msgs = [{"role": "user", "content": "hi"}]
    want = llm.chat(msgs, _greedy(8, ignore_eos=True))[0]
    tok = want.token_ids[2]
    for stream in (False, True):
        r = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=8, temperature=0, stream=stream,
                                           extra_body={"ignore_eos": True, "stop_token_ids": [tok]})
        choice = list(r)[-1].choices[0] if stream else r.choices[0]
        assert (choice.finish_reason, choice.model_extra["stop_reason"]) == ("stop", tok)


def _first_token_logprobs(llm, ids: list[int]) -> torch.Tensor:
    """Independent reference: log_softmax of the model's logits at the prompt's last position."""
    with torch.no_grad():
        logits = llm.model(torch.tensor([ids]))[0, -1]
    return torch.log_softmax(logits.double(), -1)


def test_chat_logprobs(client, llm):
    ref = llm.chat(MESSAGES, _greedy(5))[0]
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=5, temperature=0,
                                       logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == len(ref.token_ids)
    assert all(len(e.top_logprobs) == 3 for e in content)
    lp = _first_token_logprobs(llm, llm.chat_ids(MESSAGES))
    first = ref.token_ids[0]
    assert content[0].logprob == pytest.approx(float(lp[first]), abs=1e-4)
    assert content[0].token == llm.tokenizer.decode([first], skip_special_tokens=False)
    top = torch.topk(lp, 3)
    assert [e.logprob for e in content[0].top_logprobs] == pytest.approx(top.values.tolist(), abs=1e-4)
    assert all(isinstance(e.bytes, list) and e.bytes for e in content[0].top_logprobs)
    # Greedy: the sampled token is the most likely one.
    assert content[0].logprob == pytest.approx(content[0].top_logprobs[0].logprob)
    # logprobs=True alone: sampled token only, no alternatives.
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2, temperature=0, logprobs=True)
    assert all(e.top_logprobs == [] for e in r.choices[0].logprobs.content)
    assert r.choices[0].logprobs.content[0].logprob == pytest.approx(float(lp[first]), abs=1e-4)


def test_completion_logprobs(client, llm):
    prompt = "The capital of France is"
    ref = llm.generate(prompt, _greedy(4))[0]
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, temperature=0, logprobs=3,
                                  extra_body={"return_tokens_as_token_ids": True})
    lps = r.choices[0].logprobs
    assert len(lps.tokens) == len(lps.token_logprobs) == len(lps.top_logprobs) == len(ref.token_ids)
    assert lps.tokens == [f"token_id:{t}" for t in ref.token_ids]
    lp = _first_token_logprobs(llm, llm.tokenizer.encode(prompt))
    assert lps.token_logprobs[0] == pytest.approx(float(lp[ref.token_ids[0]]), abs=1e-4)
    top = torch.topk(lp, 3)
    expected = {f"token_id:{i}": v for i, v in zip(top.indices.tolist(), top.values.tolist())}
    assert lps.top_logprobs[0].keys() == expected.keys()  # greedy: sampled token is among the top 3
    for key, v in expected.items():
        assert lps.top_logprobs[0][key] == pytest.approx(v, abs=1e-4)
    # Streaming carries the same numbers.
    chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, temperature=0, logprobs=3,
                                            stream=True, extra_body={"return_tokens_as_token_ids": True}))
    streamed = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
    assert streamed == lps.tokens


def test_prompt_logprobs_function_against_full_logits(llm):
    """generate.prompt_logprobs (head run in chunks) against log_softmax of the model's full logits."""
    from cpm4.engine.generate import prompt_logprobs

    ids = llm.tokenizer.encode("The capital of France is Paris, and the capital of Italy is Rome.")
    with torch.no_grad():
        ref = torch.log_softmax(llm.model(torch.tensor([ids]))[0].double(), -1)
    got = prompt_logprobs(llm.model, ids, 3, chunk=4)
    assert [g.token_id for g in got] == ids and got[0].logprob is None and got[0].top == []
    for t in range(1, len(ids)):
        assert got[t].logprob == pytest.approx(float(ref[t - 1, ids[t]]), abs=1e-4)
        top = torch.topk(ref[t - 1], 3)
        assert [i for i, _ in got[t].top] == top.indices.tolist()
        assert [v for _, v in got[t].top] == pytest.approx(top.values.tolist(), abs=1e-4)


def test_echo_logprobs_and_max_tokens_zero(client, llm):
    """lm-eval's loglikelihood request: echo + logprobs with max_tokens 0 scores the prompt; with tokens to
    generate, the prompt's entries come first (the first token's logprob is null), then the generated ones."""
    prompt = "The capital of France is"
    ids = llm.tokenizer.encode(prompt)
    with torch.no_grad():
        ref = torch.log_softmax(llm.model(torch.tensor([ids]))[0].double(), -1)
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=0, echo=True, logprobs=2,
                                  extra_body={"return_tokens_as_token_ids": True})
    c = r.choices[0]
    assert c.text == prompt and c.finish_reason == "length" and r.usage.completion_tokens == 0
    assert c.logprobs.tokens == [f"token_id:{t}" for t in ids]
    assert c.logprobs.token_logprobs[0] is None and c.logprobs.top_logprobs[0] is None
    want = [float(ref[t - 1, ids[t]]) for t in range(1, len(ids))]
    assert c.logprobs.token_logprobs[1:] == pytest.approx(want, abs=1e-4)
    assert all(len(top) in (2, 3) for top in c.logprobs.top_logprobs[1:])  # 2 best (+ the token itself)
    gen = llm.generate(prompt, _greedy(3))[0]
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=3, temperature=0, echo=True, logprobs=1,
                                  extra_body={"return_tokens_as_token_ids": True})
    c = r.choices[0]
    assert c.text == prompt + gen.text
    assert c.logprobs.tokens == [f"token_id:{t}" for t in ids + gen.token_ids]
    assert c.logprobs.token_logprobs[1:len(ids)] == pytest.approx(want, abs=1e-4)
    # Streaming: the echo chunk carries the prompt's entries, then the generated ones follow.
    chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=3, temperature=0, echo=True,
                                            logprobs=1, stream=True,
                                            extra_body={"return_tokens_as_token_ids": True}))
    streamed = [t for ch in chunks if ch.choices and ch.choices[0].logprobs for t in ch.choices[0].logprobs.tokens]
    assert streamed == c.logprobs.tokens
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == c.text
    # text_offset indexes the returned text: the BOS the echoed text does not show takes no room.
    for stream in (False, True):
        out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=5, temperature=0, echo=True,
                                        logprobs=0, stream=stream)
        parts = [ch.choices[0] for ch in out if ch.choices] if stream else out.choices
        text = "".join(p.text for p in parts)
        toks = [t for p in parts if p.logprobs for t in p.logprobs.tokens]
        offs = [o for p in parts if p.logprobs for o in p.logprobs.text_offset]
        assert len(toks) == len(offs) == len(ids) + 5 and offs[0] == 0 and offs == sorted(offs)
        assert toks[0] == "<s>" and offs[1] == 0  # the BOS takes no room
        shown = [(t, o) for t, o in zip(toks[1:], offs[1:]) if not (t.startswith("<") and t.endswith(">"))
                 and "\ufffd" not in t]
        assert len(shown) >= len(ids) - 1 and all(text[o:o + len(t)] == t for t, o in shown), (text, toks, offs)
    chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=0, echo=True, stream=True))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == prompt
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"
    # Scoring only (max_tokens 0), a prompt may fill the context (lm-eval at max_length was refused); to
    # generate, one token must be left.
    context = llm.model.config.max_position_embeddings
    full = [5] * context
    r = client.completions.create(model=MODEL, prompt=full, max_tokens=0, echo=True, logprobs=0)
    assert len(r.choices[0].logprobs.token_logprobs) == context
    for too_long in ({"prompt": full, "max_tokens": 1}, {"prompt": full + [5], "max_tokens": 0, "echo": True,
                                                          "logprobs": 0}):
        with pytest.raises(openai.BadRequestError, match="maximum context length"):
            client.completions.create(model=MODEL, **too_long)


def test_tokenize_and_detokenize(server, llm):
    """vLLM's /tokenize (a prompt as /v1/completions encodes it, or messages through the chat template) and
    /detokenize; bad input is a 400 naming the field."""
    url = server.url
    prompt = "The capital of France is"
    r = httpx.post(f"{url}/tokenize", json={"model": MODEL, "prompt": prompt}, timeout=30).json()
    assert r["tokens"] == llm.tokenizer.encode(prompt) and r["count"] == len(r["tokens"])
    assert r["max_model_len"] == llm.model.config.max_position_embeddings
    r = httpx.post(f"{url}/tokenize", json={"messages": MESSAGES}, timeout=30).json()
    assert r["tokens"] == llm.chat_ids(MESSAGES)
    back = httpx.post(f"{url}/detokenize", json={"tokens": llm.tokenizer.encode(prompt)}, timeout=30).json()
    assert back == {"prompt": "<s>" + prompt}  # special tokens written out, as vLLM's
    # vLLM's add_special_tokens (the BOS), on /tokenize and /v1/completions (was ignored).
    r = httpx.post(f"{url}/tokenize", json={"prompt": prompt, "add_special_tokens": False}, timeout=30).json()
    assert r["tokens"] == llm.tokenizer.encode(prompt, add_bos=False)
    r = httpx.post(f"{url}/v1/completions", json={"prompt": prompt, "max_tokens": 0, "echo": True, "logprobs": 0,
                                                  "add_special_tokens": False, "return_tokens_as_token_ids": True},
                   timeout=30).json()
    assert r["choices"][0]["logprobs"]["tokens"] == [f"token_id:{t}" for t in llm.tokenizer.encode(prompt, False)]
    # Never refused for length: count against max_model_len is what a client checks (messages were a 400).
    context = llm.model.config.max_position_embeddings
    long = [{"role": "user", "content": "word " * context}]
    r = httpx.post(f"{url}/tokenize", json={"messages": long}, timeout=30)
    assert r.status_code == 200 and r.json()["count"] > r.json()["max_model_len"] == context
    for path, body, param in (("tokenize", {"prompt": "a", "messages": MESSAGES}, "prompt"),
                              ("tokenize", {}, "prompt"),
                              ("detokenize", {"tokens": [llm.model.config.vocab_size]}, "tokens"),
                              ("detokenize", {"tokens": "abc"}, "tokens")):
        r = httpx.post(f"{url}/{path}", json=body, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (path, body, r.text)


def test_vllm_sampling_extensions(client, llm):
    """allowed_token_ids, skip_special_tokens, truncate_prompt_tokens and bad_words reach the engine as the
    offline API takes them."""
    allowed = [5, 17, 300]
    r = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=6, seed=0,
                                  extra_body={"allowed_token_ids": allowed, "return_tokens_as_token_ids": True},
                                  logprobs=0)
    assert all(int(t.split(":")[1]) in allowed for t in r.choices[0].logprobs.tokens)
    im_start = llm.tokenizer.token_id("<|im_start|>")
    body = {"logit_bias": {str(im_start): 100}, "ignore_eos": True}
    r = client.completions.create(model=MODEL, prompt="a", max_tokens=2, temperature=0,
                                  extra_body={**body, "skip_special_tokens": False})
    assert r.choices[0].text == "<|im_start|><|im_start|>"
    r = client.completions.create(model=MODEL, prompt="a", max_tokens=2, temperature=0, extra_body=body)
    assert r.choices[0].text == ""
    prompt = "one two three four five six seven eight nine ten eleven twelve"
    ids = llm.tokenizer.encode(prompt)
    ref = llm.generate([ids[-5:]], _greedy(4))[0]
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, temperature=0,
                                  extra_body={"truncate_prompt_tokens": 5})
    assert r.usage.prompt_tokens == 5 and r.choices[0].text == ref.text
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2, temperature=0,
                                       extra_body={"truncate_prompt_tokens": 7})
    assert r.usage.prompt_tokens == 7
    free = client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0).choices[0].text
    word = free.split()[0] if free.split() else free
    ref = llm.generate(prompt, _greedy(6, bad_words=[word]))[0]
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0,
                                  extra_body={"bad_words": [word]})
    assert r.choices[0].text == ref.text
    for body, param in (({"allowed_token_ids": [10**6]}, "allowed_token_ids"), ({"bad_words": [""]}, "bad_words")):
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model=MODEL, prompt="a", max_tokens=2, extra_body=body)
        assert e.value.body["param"] == param
    _assert_alive(client)


def test_continue_final_message(client, server, llm):
    """vLLM's assistant prefill: continue_final_message (with add_generation_prompt false) writes the reply on
    from the last assistant message's text; the prompt is the template's rendering cut after that text."""
    prefill = MESSAGES + [{"role": "assistant", "content": "The colour is"}]
    ids = llm.tokenizer.encode_chat(prefill, add_generation_prompt=False, continue_final_message=True)
    assert llm.tokenizer.decode(ids).endswith("The colour is")
    assert ids != llm.tokenizer.encode_chat(prefill, add_generation_prompt=False)  # no end of turn after it
    ref = llm.generate([ids], _greedy(8))[0]
    flags = {"add_generation_prompt": False, "continue_final_message": True}
    r = client.chat.completions.create(model=MODEL, messages=prefill, max_tokens=8, temperature=0, extra_body=flags)
    assert r.choices[0].message.content == ref.text and r.usage.prompt_tokens == len(ids)
    tok = httpx.post(f"{server.url}/tokenize", json={"messages": prefill, **flags}, timeout=30).json()
    assert tok["tokens"] == ids
    for messages, body in ((prefill, {"continue_final_message": True}),  # add_generation_prompt left true
                           (MESSAGES, flags)):  # the last message is the user's
        with pytest.raises(openai.BadRequestError, match="continue_final_message"):
            client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2, extra_body=body)
    _assert_alive(client)


# ---------------------------------------------------------------------------------------------------------
# Tool calls


def test_parse_tool_calls():
    text = ('Let me check.\n<|tool_call|>{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
            '<|tool_call|>{"name": "get_time", "arguments": "{\\"tz\\": \\"CET\\"}"}')
    content, calls = parse_tool_calls(text)
    assert content == "Let me check."
    assert [c["function"]["name"] for c in calls] == ["get_weather", "get_time"]
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Paris"}
    assert calls[1]["function"]["arguments"] == '{"tz": "CET"}'
    assert all(c["type"] == "function" and c["id"].startswith("call_") for c in calls)
    assert len({c["id"] for c in calls}) == 2
    # Only calls: content is None. Text after a call is kept as content.
    assert parse_tool_calls('<|tool_call|>{"name": "f", "arguments": {}}')[0] is None
    assert parse_tool_calls('<|tool_call|>{"name": "f", "arguments": {}} done')[0] == "done"
    # Broken JSON, or JSON that is not a call, stays text; no marker: no calls.
    for bad in ("<|tool_call|>{not json", '<|tool_call|>{"arguments": {}}', '<|tool_call|>["f"]'):
        assert parse_tool_calls("hi " + bad) == ("hi " + bad, [])
    assert parse_tool_calls("plain text") == ("plain text", [])
    # A last call cut off after complete ones (max_tokens) is dropped, not shown with its marker as content.
    content, calls = parse_tool_calls('<|tool_call|>{"name": "f", "arguments": {}}\n<|tool_call|>{"name" : "f"\n, "ar')
    assert content is None and len(calls) == 1


def test_tool_call_collector(llm):
    tok = llm.tokenizer
    marker = tok.token_id(TOOL_CALL)
    assert marker is not None
    call = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
    ids = tok.encode("Sure.\n", add_bos=False) + [marker] + tok.encode(call, add_bos=False)
    # Deltas as the engine would give them: text decoded without special tokens, one token each.
    col = ToolCallCollector(tok)
    emitted = "".join(col.feed(tok.decode([t]), [t]) for t in ids)
    assert emitted == "Sure."  # the newline before the call held back, then dropped (unstreamed content is stripped)
    tail, calls = col.finish()
    assert tail == "" and [c["function"]["name"] for c in calls] == ["get_weather"]
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Paris"}
    # skip_special_tokens false: the marker token's text shows the marker, which is not content.
    col = ToolCallCollector(tok)
    emitted = "".join(col.feed(tok.decode([t], skip_special_tokens=False), [t]) for t in ids)
    assert emitted == "Sure." and [c["function"]["name"] for c in col.finish()[1]] == ["get_weather"]
    col = ToolCallCollector(tok)  # the same with a call cut off: no call, the text as it was shown, newline too
    cut = ids[:-5]
    assert "".join(col.feed(tok.decode([t], skip_special_tokens=False), [t]) for t in cut) == "Sure."
    assert col.finish() == (tok.decode(cut, skip_special_tokens=False)[len("Sure."):], [])
    # A literal marker split across text deltas (tokenizers without it as a special token).
    col = ToolCallCollector(tok)
    pieces = ["Ok <|tool", "_call|>" + call[:10], call[10:]]
    assert "".join(col.feed(p, []) for p in pieces) == "Ok"
    assert col.finish()[1][0]["function"]["name"] == "get_weather"
    # No marker at all: everything streams, nothing is held at the end except trailing whitespace and a possible
    # marker prefix.
    col = ToolCallCollector(tok)
    assert col.feed("a <|to", []) == "a" and col.finish() == (" <|to", [])
    col = ToolCallCollector(tok)
    assert [col.feed(p, []) for p in ("a \n", "\tb ", " <|t", "ox")] == ["a", " \n\tb", "", "  <|tox"]
    assert col.finish() == ("", [])


def test_tools_reach_the_prompt(client, llm):
    plain = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=1, temperature=0)
    with_tools = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=1, temperature=0,
                                                tools=TOOLS, tool_choice="auto")
    assert with_tools.usage.prompt_tokens > plain.usage.prompt_tokens
    assert with_tools.usage.prompt_tokens == len(llm.tokenizer.encode_chat(MESSAGES, tools=TOOLS))
    # Assistant tool calls and tool results in the history are rendered too.
    history = MESSAGES + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]
    r = client.chat.completions.create(model=MODEL, messages=history, max_tokens=1, temperature=0, tools=TOOLS)
    expected = llm.tokenizer.encode_chat([{k: v for k, v in m.items() if k != "tool_call_id"} for m in history],
                                         tools=TOOLS)
    assert r.usage.prompt_tokens == len(expected)
    with pytest.raises(openai.BadRequestError):  # a forced call of a function that is not among the tools
        client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=1, tools=TOOLS,
                                       tool_choice={"type": "function", "function": {"name": "nope"}})


class _ScriptedEngine(AsyncEngine):
    """Replays fixed output tokens instead of running the model (random weights never call a tool), through
    the same worker interface a scheduler would replace."""

    script: list[int] = []
    with_logprobs = False  # each token's delta with a logprob (-j for the j-th) and no alternatives

    def _run_batch(self, batch) -> None:
        for req in batch:
            for j, t in enumerate(self.script):
                last = j == len(self.script) - 1
                if last:
                    with self._cond:
                        self._finish(req, "stop")
                lps = [TokenLogprob(t, -float(j), [])] if self.with_logprobs else None
                self._post(req, StreamDelta(0, self.tokenizer.decode([t]), [t], "stop" if last else None, lps))
            self._post(req, _END)


def test_tool_calls_end_to_end(llm):
    tok = llm.tokenizer
    call = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
    eng = _ScriptedEngine(llm.model, tok, continuous=False)
    eng.script = tok.encode("Sure.\n", add_bos=False) + [tok.token_id(TOOL_CALL)] + tok.encode(call, add_bos=False)
    srv = _Server(create_app(eng, MODEL))
    try:
        c = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="unused", max_retries=0, timeout=60)
        r = c.chat.completions.create(model=MODEL, messages=MESSAGES, tools=TOOLS, max_tokens=50)
        choice = r.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content == "Sure."
        (tc,) = choice.message.tool_calls
        assert tc.type == "function" and tc.function.name == "get_weather" and tc.id.startswith("call_")
        assert json.loads(tc.function.arguments) == {"city": "Paris"}
        chunks = list(c.chat.completions.create(model=MODEL, messages=MESSAGES, tools=TOOLS, stream=True))
        content = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
        deltas = [t for ch in chunks if ch.choices for t in ch.choices[0].delta.tool_calls or []]
        assert content == "Sure." and [d.function.name for d in deltas] == ["get_weather"]  # as unstreamed
        assert deltas[0].index == 0 and json.loads(deltas[0].function.arguments) == {"city": "Paris"}
        assert chunks[-1].choices[0].finish_reason == "tool_calls"
        # Without tools (or with tool_choice "none") the output is plain text, the marker dropped as usual.
        for kw in ({}, {"tools": TOOLS, "tool_choice": "none"}):
            r = c.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=50, **kw)
            assert r.choices[0].message.tool_calls is None and r.choices[0].finish_reason == "stop"
            assert r.choices[0].message.content == "Sure.\n" + call
    finally:
        srv.stop()
        eng.shutdown()


def test_reasoning_parser_end_to_end(llm):
    """--reasoning-parser minicpm4: the <think> block comes back as reasoning_content, whole and streamed;
    without the parser it stays in the content; a tool call after the reasoning is still parsed."""
    tok = llm.tokenizer
    thought, answer = "<think>\nCompare the two.\n</think>\n\n", "Blue."
    eng = _ScriptedEngine(llm.model, tok, continuous=False)
    srv = _Server(create_app(eng, MODEL, reasoning_parser="minicpm4"))
    plain = _Server(create_app(eng, MODEL))
    try:
        c = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="unused", max_retries=0, timeout=60)
        eng.script = tok.encode(thought + answer, add_bos=False)
        r = c.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=50)
        msg = r.choices[0].message
        assert msg.reasoning_content == "Compare the two." and msg.content == "Blue."
        assert r.usage.completion_tokens == len(eng.script)
        # The reasoning's tokens: the block with its tags (the newlines after it start the answer).
        n_think = len(tok.encode("<think>\nCompare the two.\n</think>", add_bos=False))
        assert r.usage.completion_tokens_details.reasoning_tokens == n_think < len(eng.script)
        streamed = list(c.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=50, stream=True,
                                                  stream_options={"include_usage": True}))
        assert streamed[-1].usage.completion_tokens_details.reasoning_tokens == n_think
        script, eng.script = eng.script, eng.script[:8]  # an output cut inside the reasoning: all of it
        cut = c.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=50)
        assert cut.choices[0].message.reasoning_content and not cut.choices[0].message.content
        assert cut.usage.completion_tokens_details.reasoning_tokens == cut.usage.completion_tokens == 8
        eng.script = script
        chunks = list(c.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=50, stream=True))
        deltas = [ch.choices[0].delta for ch in chunks if ch.choices]
        assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == "Compare the two."
        assert "".join(d.content or "" for d in deltas) == "Blue."
        first_content = next(i for i, d in enumerate(deltas) if d.content)
        assert all(not getattr(d, "reasoning_content", None) for d in deltas[first_content:])
        # Thinking off (no tags): all content, no reasoning.
        eng.script = tok.encode(answer, add_bos=False)
        r = c.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=50)
        msg = r.choices[0].message
        assert msg.content == "Blue." and msg.reasoning_content is None
        assert r.usage.completion_tokens_details.reasoning_tokens == 0
        # A tool call after the reasoning.
        call = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
        eng.script = tok.encode(thought, add_bos=False) + [tok.token_id(TOOL_CALL)] + tok.encode(call, add_bos=False)
        r = c.chat.completions.create(model=MODEL, messages=MESSAGES, tools=TOOLS, max_tokens=80)
        msg = r.choices[0].message
        assert msg.reasoning_content == "Compare the two." and msg.content is None
        assert r.choices[0].finish_reason == "tool_calls" and msg.tool_calls[0].function.name == "get_weather"
        # Without the parser the block is plain content.
        eng.script = tok.encode(thought + answer, add_bos=False)
        p = openai.OpenAI(base_url=f"{plain.url}/v1", api_key="unused", max_retries=0, timeout=60)
        r = p.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=50)
        msg = r.choices[0].message
        assert msg.content == thought + answer and getattr(msg, "reasoning_content", None) is None
        assert r.usage.completion_tokens_details is None  # no parser, no split
    finally:
        srv.stop()
        plain.stop()
        eng.shutdown()
    with pytest.raises(ValueError, match="unknown reasoning parser"):
        create_app(eng, MODEL, reasoning_parser="deepseek")


# ---------------------------------------------------------------------------------------------------------
# Structured outputs (xgrammar): forced tool calls and response_format

# Bounded argument types, so that even a random model closes the call well within max_tokens.
ENUM_TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"enum": ["Paris", "Oslo"]}, "days": {"type": "integer"}},
        "required": ["city", "days"]}}},
    {"type": "function", "function": {"name": "get_time", "parameters": {
        "type": "object", "properties": {"utc": {"type": "boolean"}}, "required": ["utc"]}}},
]


def _check_weather(args: dict) -> None:
    assert set(args) == {"city", "days"} and args["city"] in ("Paris", "Oslo") and isinstance(args["days"], int)


@pytest.mark.parametrize("stream", [False, True])
def test_forced_tool_choice(client, stream):
    pytest.importorskip("xgrammar")
    named = {"type": "function", "function": {"name": "get_weather"}}
    for seed, choice in [(0, named), (1, named), (2, "required"), (3, "required")]:
        kw = dict(model=MODEL, messages=MESSAGES, tools=ENUM_TOOLS, tool_choice=choice, max_tokens=120, seed=seed,
                  parallel_tool_calls=False)
        if stream:
            chunks = list(client.chat.completions.create(stream=True, **kw))
            calls = [t for ch in chunks if ch.choices for t in ch.choices[0].delta.tool_calls or []]
            finish = chunks[-1].choices[0].finish_reason
        else:
            r = client.chat.completions.create(**kw)
            calls, finish = r.choices[0].message.tool_calls or [], r.choices[0].finish_reason
        # OpenAI's finish reasons: "stop" for a forced named function, "tool_calls" for "required".
        assert finish == ("stop" if choice is named else "tool_calls") and len(calls) == 1, (seed, choice, finish)
        args = json.loads(calls[0].function.arguments)
        if choice == "required" and calls[0].function.name == "get_time":
            assert isinstance(args["utc"], bool) and set(args) == {"utc"}
        else:
            assert calls[0].function.name == "get_weather"
            _check_weather(args)


@pytest.mark.parametrize("stream", [False, True])
def test_forced_tool_call_cut_off_is_not_content(client, stream):
    """A forced call cut off by max_tokens: no call and no content (its JSON came back as content), finish
    "length"."""
    pytest.importorskip("xgrammar")
    named = {"type": "function", "function": {"name": "get_weather"}}
    for choice, max_tokens in ((named, 4), ("required", 2), ("required", 6)):
        kw = dict(model=MODEL, messages=MESSAGES, tools=ENUM_TOOLS, tool_choice=choice, max_tokens=max_tokens,
                  seed=0)
        if stream:
            chunks = list(client.chat.completions.create(stream=True, **kw))
            content = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
            calls = [t for ch in chunks if ch.choices for t in ch.choices[0].delta.tool_calls or []]
            finish = chunks[-1].choices[0].finish_reason
        else:
            m = client.chat.completions.create(**kw).choices[0]
            content, calls, finish = m.message.content or "", m.message.tool_calls or [], m.finish_reason
        assert (content, calls, finish) == ("", [], "length"), (choice, max_tokens, content)


def test_response_format_json(client):
    pytest.importorskip("xgrammar")
    schema = {"type": "object", "properties": {"name": {"type": "string", "pattern": "^[a-z]{1,8}$"},
                                               "n": {"type": "integer"}, "ok": {"type": "boolean"}},
              "required": ["name", "n", "ok"]}
    fmt = {"type": "json_schema", "json_schema": {"name": "thing", "schema": schema, "strict": True}}
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=80, seed=0, n=3, response_format=fmt)
    for c in r.choices:
        assert c.finish_reason == "stop"
        obj = json.loads(c.message.content)
        assert isinstance(obj["name"], str) and 1 <= len(obj["name"]) <= 8 and obj["name"].isalpha()
        assert isinstance(obj["n"], int) and isinstance(obj["ok"], bool)
    # json_object: a random model may not close its strings in time; whatever it ends with, every stop is JSON.
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=40, seed=0, n=4,
                                       response_format={"type": "json_object"})
    for c in r.choices:
        assert c.message.content.startswith("{")
        if c.finish_reason == "stop":
            assert isinstance(json.loads(c.message.content), dict)
    # Completions take response_format too (vLLM's extension).
    r = client.completions.create(model=MODEL, prompt="JSON:", max_tokens=80, seed=1,
                                  extra_body={"response_format": fmt})
    assert r.choices[0].finish_reason == "stop" and set(json.loads(r.choices[0].text)) == {"name", "n", "ok"}


def test_guided_choice_regex_and_grammar(client, llm):
    """vLLM's guided_choice / guided_regex / guided_grammar: every output is one of the choices, or matches the
    expression or grammar in whole, and ends with "stop"; the offline API takes the same SamplingParams fields."""
    pytest.importorskip("xgrammar")
    import re

    choices = ["positive", "negative", 'neutral "maybe"']
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=20, seed=0, n=4,
                                       extra_body={"guided_choice": choices})
    for c in r.choices:
        assert c.finish_reason == "stop" and c.message.content in choices
    pattern = r"[A-Z][a-z]{2,5}-[0-9]{2}"
    r = client.completions.create(model=MODEL, prompt="Code:", max_tokens=20, seed=1, n=3,
                                  extra_body={"guided_regex": pattern})
    for c in r.choices:
        assert c.finish_reason == "stop" and re.fullmatch(pattern, c.text), c.text
    out = llm.generate(["Code:"] * 3, SamplingParams(max_tokens=20, seed=2, guided_regex=pattern))
    assert all(o.finish_reason == "stop" and re.fullmatch(pattern, o.text) for o in out)
    ebnf = 'root ::= "(" num (" + " num)* ")"\nnum ::= [1-9] [0-9]?'
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=40, seed=3, n=3,
                                       extra_body={"guided_grammar": ebnf})
    for c in r.choices:
        if c.finish_reason == "stop":  # a random model may run out of tokens inside the sum
            assert re.fullmatch(r"\([1-9][0-9]?( \+ [1-9][0-9]?)*\)", c.message.content), c.message.content
        else:
            assert re.fullmatch(r"\(([1-9][0-9]?( \+ )?)*", c.message.content), c.message.content
    for body, param in (({"guided_grammar": "root ::= "}, "guided_grammar"),
                        ({"guided_regex": "[0-9"}, "guided_regex"),
                        ({"guided_choice": []}, "guided_choice"),
                        ({"guided_choice": ["a"], "guided_regex": "a"}, "guided_regex")):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=5, extra_body=body)
        assert e.value.body["param"] == param, (body, e.value.body)
    _assert_alive(client)


def test_structured_output_errors(server, client):
    pytest.importorskip("xgrammar")

    def post(**body):
        return httpx.post(f"{server.url}/v1/chat/completions", timeout=30,
                          json={"model": MODEL, "messages": MESSAGES, "max_tokens": 2, **body})

    bad_tool = [{"type": "function", "function": {"name": "f", "parameters": {"type": "bogus"}}}]
    cases = [
        (dict(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "bogus"}}}),
         "response_format"),
        (dict(response_format={"type": "json_schema", "json_schema": {"name": "x"}}), "response_format"),
        (dict(response_format={"type": "yaml"}), "response_format"),
        (dict(tools=bad_tool, tool_choice="required"), "tools"),
        (dict(tools=ENUM_TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}}), "tool_choice"),
        (dict(tool_choice="required"), "tool_choice"),
        (dict(tools=ENUM_TOOLS, tool_choice="required", response_format={"type": "json_object"}), "response_format"),
        # OpenAI's name rule and unique names (an empty name leaked the forced call as content)
        (dict(tools=[{"type": "function", "function": {"name": ""}}], tool_choice="required"), "tools"),
        (dict(tools=[{"type": "function", "function": {"name": 'a b"c'}}]), "tools"),
        (dict(tools=[{"type": "function", "function": {"name": "x" * 65}}]), "tools"),
        (dict(tools=ENUM_TOOLS + ENUM_TOOLS[:1]), "tools"),
    ]
    for body, param in cases:
        r = post(**body)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (body, r.text)
    assert "nope" in post(**cases[4][0]).json()["error"]["message"]
    _assert_alive(client)


# ---------------------------------------------------------------------------------------------------------
# Concurrency


def test_concurrent_clients_match_solo_runs(client, llm, engine):
    prompts = [f"Request number {i}: the answer is" for i in range(8)]
    solo = [llm.generate(p, _greedy(8))[0].text for p in prompts]
    batches_before = engine.num_batches

    def one(p: str) -> str:
        return client.completions.create(model=MODEL, prompt=p, max_tokens=8, temperature=0).choices[0].text

    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(one, prompts))
    assert got == solo
    # Some requests really shared forward passes: 8 requests of 8 tokens alone would take 64+ steps
    # (continuous batching counts steps; whole-batch mode counts batches, then fewer than 8).
    assert engine.num_batches - batches_before < (64 if engine.continuous else 8)


def test_async_output_engine_streams_match_solo_runs(llm):
    """The server's engine with decode steps launched ahead of reading their tokens (async_output): concurrent
    streams, one stopping on a stop string, one cancelled by its reader, equal the requests run alone."""
    prompts = [llm.tokenizer.encode(f"Stream {i} says") for i in range(5)]
    params = [_greedy(10, ignore_eos=True), _greedy(7), _greedy(12, ignore_eos=True), _greedy(9, ignore_eos=True),
              _greedy(30, ignore_eos=True)]
    solo = [llm.generate([p], sp)[0] for p, sp in zip(prompts, params)]
    params[1] = _greedy(7, stop=[solo[1].text[2:4]]) if len(solo[1].text) >= 4 else params[1]
    solo[1] = llm.generate([prompts[1]], params[1])[0]
    eng = AsyncEngine(llm.model, llm.tokenizer, max_batch_size=4, async_output=True)

    async def one(i):
        text, toks, reason = "", [], None
        async for d in eng.stream(prompts[i], params[i], f"a{i}"):
            text, toks, reason = text + d.text, toks + d.token_ids, d.finish_reason or reason
            if i == 4 and len(toks) >= 3:
                break  # the reader goes away: the request is aborted
        return text, toks, reason

    async def main():
        return await asyncio.gather(*(one(i) for i in range(5)))

    try:
        got = asyncio.run(main())
    finally:
        eng.shutdown()
    for i in range(4):
        assert got[i] == (solo[i].text, solo[i].token_ids, solo[i].finish_reason), i
    assert got[4][1] == solo[4].token_ids[:len(got[4][1])]


# ---------------------------------------------------------------------------------------------------------
# Errors


def test_malformed_json(client, server):
    r = httpx.post(f"{server.url}/v1/chat/completions", content=b'{"model": "x", "messages": [',
                   headers={"content-type": "application/json"}, timeout=10)
    assert r.status_code == 400
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and "JSON" in err["message"]
    # Python's json reads NaN; it is no valid temperature.
    r = httpx.post(f"{server.url}/v1/completions", content=b'{"prompt": "x", "temperature": NaN}', timeout=10)
    assert r.status_code == 400 and r.json()["error"]["param"] == "temperature"
    _assert_alive(client)


@pytest.mark.parametrize("field,value", [("temperature", -1), ("n", 0), ("top_p", 1.5), ("max_tokens", 0),
                                         ("temperature", "hot"), ("max_tokens", "5"), ("stream", "yes"),
                                         ("seed", 2**64), ("top_logprobs", 50)])
def test_bad_parameter(client, field, value):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, **{field: value})
    assert info.value.status_code == 400
    assert info.value.body["param"] == field and field in info.value.body["message"]
    _assert_alive(client)


def test_json_body_whatever_the_content_type(server):
    # `curl -d '{...}'` sends application/x-www-form-urlencoded; the body is still read as JSON.
    body = json.dumps({"model": MODEL, "prompt": "Hi", "max_tokens": 2}).encode()
    for ctype in ("application/x-www-form-urlencoded", "text/plain"):
        r = httpx.post(f"{server.url}/v1/completions", content=body, headers={"content-type": ctype}, timeout=30)
        assert r.status_code == 200 and r.json()["object"] == "text_completion"
    r = httpx.post(f"{server.url}/v1/completions", content=b"[1, 2]", timeout=10)
    assert r.status_code == 400 and "JSON object" in r.json()["error"]["message"]


def test_unknown_fields_are_ignored(client):
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2,
                                       extra_body={"some_future_option": {"x": 1}})
    assert r.choices[0].finish_reason in ("stop", "length")


def test_unknown_model(client):
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="gpt-17", messages=MESSAGES, max_tokens=2)
    assert info.value.body["param"] == "model" and "gpt-17" in info.value.body["message"]
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-17", prompt="x", max_tokens=2)
    _assert_alive(client)


def test_prompt_too_long(client, engine):
    long_prompt = "hello " * (engine.context_length + 10)
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt=long_prompt, max_tokens=2)
    assert "context length" in info.value.body["message"] and "too long" in info.value.body["message"]
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": long_prompt}],
                                       max_tokens=2, stream=True)
    assert info.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError):  # token ids outside the vocabulary never reach a batch
        client.completions.create(model=MODEL, prompt=[1, 10**7], max_tokens=2)
    _assert_alive(client)


def test_api_key(engine):
    srv = _Server(create_app(engine, MODEL, api_key=KEY))
    try:
        for key in (None, "wrong"):
            headers = {"authorization": f"Bearer {key}"} if key else {}
            r = httpx.post(f"{srv.url}/v1/completions", json={"prompt": "x", "max_tokens": 1}, headers=headers,
                           timeout=10)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        bad = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
        good = openai.OpenAI(base_url=f"{srv.url}/v1", api_key=KEY, max_retries=0, timeout=60)
        assert [m.id for m in good.models.list().data] == [MODEL]
        _assert_alive(good)
        assert httpx.get(f"{srv.url}/health", timeout=10).status_code == 200  # health needs no key
    finally:
        srv.stop()


# ---------------------------------------------------------------------------------------------------------
# Cancellation and the engine itself


def test_client_disconnect_aborts(client, server, engine):
    aborted_before = engine.num_aborted
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 3000, "temperature": 0, "stream": True,
            "ignore_eos": True}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=30) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                request_id = json.loads(line[6:])["id"]
                break
    # Closing the connection cancels the request at once, long before its 3000 tokens.
    deadline = time.monotonic() + 15
    while engine.finish_reason(f"{request_id}-0") is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.finish_reason(f"{request_id}-0") == "abort"
    assert engine.num_aborted == aborted_before + 1
    t0 = time.monotonic()
    _assert_alive(client)  # the batch slot is free: the next request does not wait for 3000 tokens
    assert time.monotonic() - t0 < 15


def test_non_streaming_disconnect_aborts(server, engine, client):
    aborted_before = engine.num_aborted
    with pytest.raises(httpx.TimeoutException):  # the client gives up and closes the connection
        httpx.post(f"{server.url}/v1/completions", timeout=0.5,
                   json={"model": MODEL, "prompt": "Hi", "max_tokens": 3000, "ignore_eos": True})
    deadline = time.monotonic() + 15
    while engine.num_aborted == aborted_before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.num_aborted == aborted_before + 1
    _assert_alive(client)


def _collect(engine, ids, params, rid):
    async def run():
        return [d async for d in engine.stream(ids, params, rid)]

    return asyncio.run(run())


@pytest.mark.parametrize("coalesce", [True, False])
def test_engine_stream_coalesces_when_the_reader_lags(llm, engine, coalesce):
    """A reader that falls behind gets the waiting steps' deltas joined into one (vLLM's output collector);
    with coalesce=False, one delta per step. Either way tokens, text and logprobs equal the plain loop's."""
    from cpm4.engine.generate import generate_stream

    ids = llm.tokenizer.encode("The colour of the sea")
    params = _greedy(12, ignore_eos=True, logprobs=2)
    rid = f"lag-{coalesce}"

    async def run():
        got, n = [], 0
        async for d in engine.stream(ids, params, rid, coalesce=coalesce):
            got.append(d)
            if n == 0:  # fall behind: let the request finish before reading on
                deadline = time.monotonic() + 60
                while engine.finish_reason(rid) is None and time.monotonic() < deadline:
                    await asyncio.sleep(0.01)
            n += 1
        return got

    deltas = asyncio.run(run())
    ref = [d for step in generate_stream(llm.model, llm.tokenizer, [ids], [params]) for d in step]  # plain loop
    tokens = [t for d in deltas for t in d.token_ids]
    assert tokens == [t for d in ref for t in d.token_ids] and len(tokens) == 12
    assert "".join(d.text for d in deltas) == "".join(d.text for d in ref)
    lps = [lp for d in deltas for lp in d.logprobs]
    assert [lp.token_id for lp in lps] == tokens
    assert [d.finish_reason for d in deltas][-1] == "length"
    assert all(d.finish_reason is None for d in deltas[:-1])
    if coalesce:
        assert len(deltas) == 2 and len(deltas[1].token_ids) == len(tokens) - len(deltas[0].token_ids)
    else:
        assert len(deltas) >= len(tokens)


def test_engine_counts_running_and_waiting_as_vllm(llm):
    """Running is the batch (at most max_batch_size), the rest wait: the worker moves its queue into the scheduler
    each step, and counting only the queue reported every request running and none waiting (/metrics, stats)."""
    eng = AsyncEngine(llm.model, llm.tokenizer, max_batch_size=2)
    ids = llm.tokenizer.encode("Hello")
    try:
        async def five():
            streams = [eng.stream(ids, _greedy(400, ignore_eos=True), f"r{i}") for i in range(5)]
            firsts = [asyncio.ensure_future(st.__anext__()) for st in streams]
            await asyncio.wait(firsts, return_when=asyncio.FIRST_COMPLETED)
            seen = set()
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and (2, 3) not in seen:
                seen.add((eng.num_running, eng.num_waiting))
                await asyncio.sleep(0.005)
            for i in range(5):
                eng.abort(f"r{i}")
            await asyncio.gather(*firsts, return_exceptions=True)
            for st in streams:
                await st.aclose()
            return seen

        seen = asyncio.run(five())
        assert (2, 3) in seen, seen
        assert all(r <= 2 and r + w <= 5 for r, w in seen), seen
        deadline = time.monotonic() + 10
        while (eng.num_running, eng.num_waiting) != (0, 0) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert (eng.num_running, eng.num_waiting) == (0, 0)
    finally:
        eng.shutdown()


def test_engine_abort_waiting_and_errors(llm, monkeypatch):
    eng = AsyncEngine(llm.model, llm.tokenizer, max_batch_size=2, continuous=False)
    try:
        ids = llm.tokenizer.encode("Hello")
        with pytest.raises(PromptTooLongError):  # rejected before queueing
            _collect(eng, [5] * eng.context_length, _greedy(2), "long")
        assert eng.num_waiting == 0 and eng.num_batches == 0

        async def abort_while_waiting():
            # The first request occupies the worker; the second waits and is dropped from the queue.
            first = eng.stream(ids, _greedy(400, ignore_eos=True), "busy")
            second = eng.stream(ids, _greedy(4), "waiting")
            got_first = await first.__anext__()
            task = asyncio.ensure_future(second.__anext__())
            await asyncio.sleep(0.05)
            while eng.num_waiting == 0:
                await asyncio.sleep(0.01)
            assert eng.abort("waiting")
            d = await task
            assert d.finish_reason == "abort"
            await first.aclose()  # closing the stream aborts the running request too
            return got_first

        assert asyncio.run(abort_while_waiting()).index == 0
        deadline = time.monotonic() + 10
        while eng.finish_reason("busy") is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert eng.finish_reason("busy") == eng.finish_reason("waiting") == "abort"
        assert not eng.abort("waiting")  # already finished

        # An error inside a batch reaches its requests as an exception; the worker survives.
        import cpm4.serve.engine as engine_mod

        def broken(*args, **kwargs):
            raise RuntimeError("boom")
            yield  # pragma: no cover

        monkeypatch.setattr(engine_mod, "generate_stream", broken)
        with pytest.raises(EngineError, match="boom"):
            _collect(eng, ids, _greedy(2), "bad")
        monkeypatch.undo()
        out = _collect(eng, ids, _greedy(3), "good")
        assert out[-1].finish_reason in ("stop", "length")
        assert "".join(d.text for d in out) == llm.generate(ids, _greedy(3))[0].text
    finally:
        eng.shutdown()
    assert not eng.is_running


# ---------------------------------------------------------------------------------------------------------
# Prometheus metrics


def _metrics(url: str) -> dict[tuple[str, tuple], float]:
    from prometheus_client.parser import text_string_to_metric_families

    r = httpx.get(f"{url}/metrics", timeout=10)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(r.text) for s in fam.samples}


def test_metrics_count_requests_tokens_and_latency(llm):
    """GET /metrics (Prometheus text, vLLM's metric shapes with the cpm4_ prefix, no API key needed) against
    what the clients saw: token counters equal the usage sums, one finished request per reason, one latency
    observation per request, the running gauge while a stream is open; a rejected prompt counts nothing."""
    pytest.importorskip("prometheus_client")
    eng = AsyncEngine(llm.model, llm.tokenizer, max_batch_size=4)
    srv = _Server(create_app(eng, MODEL, api_key=KEY))
    try:
        client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key=KEY, max_retries=0, timeout=60)
        lab = (("model_name", MODEL),)
        m = _metrics(srv.url)
        assert m[("cpm4_num_requests_running", lab)] == 0 and m[("cpm4_prompt_tokens_total", lab)] == 0
        usages = [client.completions.create(model=MODEL, prompt="The sky is", max_tokens=k, temperature=0,
                                            extra_body={"ignore_eos": True}).usage for k in (5, 3)]
        usages.append(client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4, temperature=0,
                                                     extra_body={"ignore_eos": True}).usage)
        with pytest.raises(openai.BadRequestError):  # too long: rejected before the engine
            client.completions.create(model=MODEL, prompt=[5] * (llm.model.config.max_position_embeddings + 1),
                                      max_tokens=2)
        m = _metrics(srv.url)
        assert m[("cpm4_prompt_tokens_total", lab)] == sum(u.prompt_tokens for u in usages)
        assert m[("cpm4_generation_tokens_total", lab)] == sum(u.completion_tokens for u in usages) == 12
        assert m[("cpm4_request_success_total", (("finished_reason", "length"), ("model_name", MODEL)))] == 3
        for name in ("cpm4_time_to_first_token_seconds", "cpm4_e2e_request_latency_seconds",
                     "cpm4_request_time_per_output_token_seconds"):  # (each of the three generated 3 or more)
            assert m[(name + "_count", lab)] == 3 and m[(name + "_sum", lab)] > 0
            assert m[(name + "_bucket", (("le", "+Inf"), ("model_name", MODEL)))] == 3
        assert m[("cpm4_request_prompt_tokens_sum", lab)] == sum(u.prompt_tokens for u in usages)
        assert m[("cpm4_request_generation_tokens_sum", lab)] == 12
        # 1-2-5 buckets: of the requests of 5, 3 and 4 tokens none is within le=2, all three within le=5
        bucket = {le: m[("cpm4_request_generation_tokens_bucket", (("le", le), ("model_name", MODEL)))]
                  for le in ("2.0", "5.0", "10.0")}
        assert bucket == {"2.0": 0, "5.0": 3, "10.0": 3}
        assert m[("cpm4_num_requests_running", lab)] == 0 and m[("cpm4_num_requests_waiting", lab)] == 0
        assert m[("cpm4_kv_cache_usage_perc", lab)] == 0  # finished requests' pages are free (or reusable)
        assert m[("cpm4_num_preemptions_total", lab)] == 0
        # While a stream is open it runs and holds pages; closing it aborts it.
        body = {"model": MODEL, "prompt": "Hello", "max_tokens": 3000, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"{srv.url}/v1/completions", json=body, timeout=30,
                          headers={"Authorization": f"Bearer {KEY}"}) as r:
            lines = r.iter_lines()  # held: a dropped line iterator closes the response (a disconnect)
            next(line for line in lines if line.startswith("data: "))
            m = _metrics(srv.url)
            assert m[("cpm4_num_requests_running", lab)] == 1 and m[("cpm4_kv_cache_usage_perc", lab)] > 0
        abort = ("cpm4_request_success_total", (("finished_reason", "abort"), ("model_name", MODEL)))
        deadline = time.monotonic() + 15
        while _metrics(srv.url).get(abort) != 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _metrics(srv.url)[abort] == 1
    finally:
        srv.stop()
        eng.shutdown()


def test_prefix_cache_hits_in_usage_and_metrics(llm):
    """Prompt tokens served from shared prefix pages, as OpenAI's usage.prompt_tokens_details.cached_tokens
    (chat, completions whole and streamed, n > 1, the Responses API's input_tokens_details) and vLLM's
    prefix-cache counters: 0 for a new prompt, the whole pages of the shared prefix (leaving a token to compute)
    for a repeat or a prompt sharing its start; none reported by the engine without a paged cache."""
    pytest.importorskip("prometheus_client")
    from cpm4.engine.paged import page_size_for

    ps = page_size_for(llm.model.config)
    rng = random.Random(7)
    base = [rng.randrange(10, 200) for _ in range(5 * ps + 9)]
    other = base[:2 * ps + 3] + [rng.randrange(10, 200) for _ in range(40)]
    eng = AsyncEngine(llm.model, llm.tokenizer, max_batch_size=4)
    srv = _Server(create_app(eng, MODEL))
    try:
        client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="unused", max_retries=0, timeout=60)
        lab = (("model_name", MODEL),)

        def cached(prompt, **kw):
            u = client.completions.create(model=MODEL, prompt=prompt, max_tokens=2, temperature=0, **kw).usage
            return u.prompt_tokens_details.cached_tokens

        assert cached(base) == 0
        assert cached(base) == (len(base) - 1) // ps * ps == 5 * ps
        assert cached(other) == 2 * ps
        other_all = (len(other) - 1) // ps * ps  # `other` whole, now cached too
        assert cached([base, other]) == 5 * ps + other_all  # one per prompt, summed as the prompt tokens are
        u = client.completions.create(model=MODEL, prompt=base, max_tokens=2, n=3, temperature=0).usage
        assert u.prompt_tokens == len(base) and u.prompt_tokens_details.cached_tokens == 5 * ps  # once, not 3x
        chunks = list(client.completions.create(model=MODEL, prompt=base, max_tokens=3, temperature=0, stream=True,
                                                stream_options={"include_usage": True}))
        assert chunks[-1].usage.prompt_tokens_details.cached_tokens == 5 * ps
        m = _metrics(srv.url)
        queries, hits = m[("cpm4_prefix_cache_queries_total", lab)], m[("cpm4_prefix_cache_hits_total", lab)]
        assert queries == 7 * len(base) + 2 * len(other)  # every admitted request's prompt
        assert hits == (1 + 1 + 3 + 1) * 5 * ps + 2 * ps + other_all
        # Chat and the Responses API: the same conversation twice.
        text = " ".join(f"word{i}" for i in range(3 * ps))
        msgs = [{"role": "user", "content": text}]
        first = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=2, temperature=0).usage
        again = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=2, temperature=0).usage
        assert first.prompt_tokens_details.cached_tokens == 0
        assert again.prompt_tokens_details.cached_tokens == (again.prompt_tokens - 1) // ps * ps > 0
        r = client.responses.create(model=MODEL, input=text, max_output_tokens=2, temperature=0)
        assert r.usage.input_tokens_details.cached_tokens == again.prompt_tokens_details.cached_tokens
    finally:
        srv.stop()
        eng.shutdown()
    # vLLM's --no-enable-prefix-caching: a repeat finds nothing (and answers the same); the plain batch loop has
    # no paged cache: nothing to report.
    for kw, want in (({"enable_prefix_caching": False}, [0, 0]), ({"continuous": False}, [None, None])):
        eng = AsyncEngine(llm.model, llm.tokenizer, max_batch_size=2, **kw)
        srv = _Server(create_app(eng, MODEL))
        try:
            client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="unused", max_retries=0, timeout=60)
            rs = [client.completions.create(model=MODEL, prompt=base, max_tokens=4, temperature=0) for _ in "ab"]
            assert rs[0].choices[0].text == rs[1].choices[0].text
            got = [r.usage.prompt_tokens_details for r in rs]
            assert [d if d is None else d.cached_tokens for d in got] == want
        finally:
            srv.stop()
            eng.shutdown()


def test_metrics_without_prometheus_client(engine, monkeypatch):
    """Without prometheus-client the server still starts; /metrics answers 501 and says what to install."""
    from fastapi.testclient import TestClient

    monkeypatch.setitem(__import__("sys").modules, "cpm4.serve.metrics", None)  # import fails
    with TestClient(create_app(engine, MODEL)) as tc:
        r = tc.get("/metrics")
        assert r.status_code == 501 and "prometheus-client" in r.json()["error"]["message"]
        assert tc.get("/health").status_code == 200


def test_max_model_len_caps_requests(llm):
    """max_model_len (vLLM's option): prompts that do not leave a token below it are refused with the OpenAI
    context error, outputs stop at it with "length" (both worker modes), /v1/models reports it, the CPU
    cache default is sized by it; a value above the model's context or below 2 is refused up front."""
    ctx = llm.model.config.max_position_embeddings
    for bad in (ctx + 1, 1, 0, 2.5, True):
        with pytest.raises(ValueError, match="max_model_len"):
            AsyncEngine(llm.model, llm.tokenizer, max_model_len=bad)
    for continuous in (True, False):
        eng = AsyncEngine(llm.model, llm.tokenizer, max_batch_size=2, max_model_len=40, continuous=continuous)
        try:
            if continuous:
                assert eng.kv_cache_tokens == 2 * 40
            with pytest.raises(PromptTooLongError):
                _collect(eng, [5] * 40, _greedy(3), "long")
            out = _collect(eng, [5] * 36, _greedy(100, ignore_eos=True), "capped")
            assert sum(len(d.token_ids) for d in out) == 4 and out[-1].finish_reason == "length"
        finally:
            eng.shutdown()
    eng = AsyncEngine(llm.model, llm.tokenizer, max_batch_size=2, max_model_len=40)
    srv = _Server(create_app(eng, MODEL))
    try:
        client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="unused", max_retries=0, timeout=60)
        assert client.models.retrieve(MODEL).model_extra["max_model_len"] == 40
        with pytest.raises(openai.BadRequestError) as err:
            client.completions.create(model=MODEL, prompt=[5] * 40, max_tokens=2)
        assert err.value.code == "context_length_exceeded" and "40" in err.value.message
        # A max_tokens that does not fit beside the prompt is refused (vLLM, OpenAI), not cut to the room left.
        with pytest.raises(openai.BadRequestError) as err:
            client.completions.create(model=MODEL, prompt=[5] * 30, max_tokens=11)
        assert err.value.code == "context_length_exceeded" and err.value.param == "max_tokens"
        assert "11" in err.value.message and "leaves 10" in err.value.message
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                           max_completion_tokens=40)
        assert err.value.param == "max_completion_tokens"
        r = client.completions.create(model=MODEL, prompt=[5] * 30, max_tokens=10, temperature=0,
                                      extra_body={"ignore_eos": True})
        assert r.usage.completion_tokens == 10 and r.choices[0].finish_reason == "length"
        r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                           temperature=0, extra_body={"ignore_eos": True})
        assert r.choices[0].finish_reason == "length"  # without max_tokens: up to the context
        assert r.usage.prompt_tokens + r.usage.completion_tokens == 40
    finally:
        srv.stop()
        eng.shutdown()


def test_min_tokens_extension(client, llm):
    """vLLM's min_tokens extension: the same output as LLM with it; a value above max_tokens is a 400 naming
    the field."""
    free = llm.generate(["Once upon"], _greedy(8, ignore_eos=True))[0]
    ref = llm.generate(["Once upon"], _greedy(8, stop_token_ids=[free.token_ids[1]], min_tokens=5))[0]
    r = client.completions.create(model=MODEL, prompt="Once upon", max_tokens=8, temperature=0,
                                  extra_body={"stop_token_ids": [free.token_ids[1]], "min_tokens": 5})
    assert r.choices[0].text == ref.text and r.usage.completion_tokens == len(ref.token_ids) >= 5
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=MODEL, prompt="x", max_tokens=2, extra_body={"min_tokens": 3})
    assert "min_tokens" in err.value.message


def test_stats_line_counts_the_interval():
    """The periodic line (vLLM's shape): throughput over the time since the last line, running and waiting
    requests, KV cache usage; nothing while idle; a bad interval refused."""
    from types import SimpleNamespace

    from cpm4.serve.stats import StatsLogger

    eng = SimpleNamespace(num_prompt_tokens=0, num_generation_tokens=0, num_running=0, num_waiting=0,
                          kv_cache_usage=lambda: 0.25)
    st = StatsLogger(eng, 5.0)
    st._last = (100.0, 0, 0)
    assert st.line(now=105.0) is None  # idle
    eng.num_prompt_tokens, eng.num_generation_tokens, eng.num_running, eng.num_waiting = 300, 40, 2, 1
    assert st.line(now=109.0) == ("Avg prompt throughput: 75.0 tokens/s, Avg generation throughput: 10.0 "
                                  "tokens/s, Running: 2 reqs, Waiting: 1 reqs, KV cache usage: 25.0%")
    eng.num_running = eng.num_waiting = 0
    assert st.line(now=110.0) is None
    with pytest.raises(ValueError, match="interval"):
        StatsLogger(eng, 0)


def test_stats_lines_logged_while_serving(llm, caplog):
    eng = AsyncEngine(llm.model, llm.tokenizer, max_batch_size=2)
    srv = _Server(create_app(eng, MODEL, log_stats_interval=0.05))
    try:
        with caplog.at_level("INFO", logger="cpm4.serve"):
            client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="unused", max_retries=0, timeout=60)
            client.completions.create(model=MODEL, prompt="Hello", max_tokens=200, temperature=0,
                                      extra_body={"ignore_eos": True})
            time.sleep(0.2)
        lines = [r.getMessage() for r in caplog.records if r.name == "cpm4.serve"]
        assert any("Avg generation throughput" in line and "KV cache usage" in line for line in lines), lines
    finally:
        srv.stop()
        eng.shutdown()


def test_engine_cpu_threads(llm):
    """cpu_threads: the worker thread's torch threads, set before its first step; the caller's thread keeps
    its own; a bad value is refused before any thread starts."""
    with pytest.raises(ValueError, match="cpu_threads"):
        AsyncEngine(llm.model, llm.tokenizer, cpu_threads=0)
    before = torch.get_num_threads()
    eng = AsyncEngine(llm.model, llm.tokenizer, max_batch_size=2, cpu_threads=1)
    try:
        assert len(_collect(eng, [5, 6, 7], _greedy(3, ignore_eos=True), "t")) >= 1
        assert eng.worker_threads == 1 and torch.get_num_threads() == before
    finally:
        eng.shutdown()


def test_token_buckets_are_vllms_1_2_5():
    pytest.importorskip("prometheus_client")
    from cpm4.serve.metrics import token_buckets

    assert token_buckets(4096) == (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000)
    assert token_buckets(5) == (1, 2, 5) and token_buckets(1) == (1,)
