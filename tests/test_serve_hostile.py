"""Hostile or careless requests to the OpenAI-compatible server: each is a clear 4xx in OpenAI's error body naming
the problem, costs the server no unbounded memory or time, and leaves other requests undisturbed."""

from __future__ import annotations

import threading
import time

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

import test_serve  # noqa: E402
from test_serve import MODEL, _Server  # noqa: E402

from cpm4.serve import AsyncEngine, create_app  # noqa: E402
from cpm4.serve import api as serve_api  # noqa: E402
from cpm4.serve.protocol import MAX_BAD_WORDS, MAX_LOGIT_BIAS, MAX_STOP, MAX_TOKEN_IDS  # noqa: E402

llm = test_serve.llm  # the tiny model on the CPU (module-scoped fixture)


@pytest.fixture(scope="module")
def http(llm):
    eng = AsyncEngine(llm.model, llm.tokenizer, max_batch_size=4, max_model_len=256)
    srv = _Server(create_app(eng, MODEL))
    with httpx.Client(base_url=srv.url, timeout=30) as c:
        yield c
    srv.stop()
    eng.shutdown()


def _error(r: httpx.Response, status: int, param: str | None) -> str:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["param"] == param, err
    return err["message"]


def _assert_alive(http) -> None:
    r = http.post("/v1/completions", json={"prompt": "ok", "max_tokens": 2, "temperature": 0})
    assert r.status_code == 200, r.text


def test_overflowing_number_is_a_400_not_a_500(http):
    # json reads 1e999 as inf (no NaN / Infinity token in the body); /v1/responses echoed it in its answer's tools,
    # which JSON cannot encode: a 500, and the connection dropped.
    tools = b'[{"type": "function", "name": "f", "parameters": {"type": "object", "x": 1e999}}]'
    r = http.post("/v1/responses", content=b'{"input": "hi", "max_output_tokens": 2, "tools": ' + tools + b"}")
    assert "not a JSON number" in _error(r, 400, "tools")
    digits = b"1" * 400 + b".0"  # as many digits before the point: inf too
    r = http.post("/v1/responses", content=b'{"input": "hi", "max_output_tokens": 2, "tools": '
                  + tools.replace(b"1e999", digits) + b"}")
    _error(r, 400, "tools")
    _assert_alive(http)


def test_body_past_the_limit_is_a_413(http, monkeypatch):
    monkeypatch.setattr(serve_api, "MAX_BODY_BYTES", 1000)
    body = b'{"prompt": "' + b"a" * 2000 + b'", "max_tokens": 1}'
    assert "limit of 1000 bytes" in _error(http.post("/v1/completions", content=body), 413, None)
    # without a Content-Length (chunked): refused as it arrives
    r = http.post("/v1/chat/completions", content=iter([body[:600], body[600:]]))
    _error(r, 413, None)
    monkeypatch.undo()
    _assert_alive(http)


@pytest.mark.parametrize("field,value", [
    ("stop", [f"s{i}" for i in range(MAX_STOP + 1)]),
    ("bad_words", [f"w{i}" for i in range(MAX_BAD_WORDS + 1)]),
    ("logit_bias", {"0" * (i // 1000) + str(i % 1000): 1 for i in range(MAX_LOGIT_BIAS + 1)}),
    ("allowed_token_ids", [1] * (MAX_TOKEN_IDS + 1)),
    ("stop_token_ids", [1] * (MAX_TOKEN_IDS + 1)),
])
def test_oversized_lists_are_400s_naming_the_field(http, field, value):
    # 100k stop strings held a concurrent request 20 s; 100k bad words stalled the engine for minutes (their
    # deduplication is quadratic); each choice of n checks and applies them apart.
    r = http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2, field: value})
    _error(r, 400, field)
    r = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
                                                field: value})
    _error(r, 400, field)


def test_lists_at_the_limit_are_served(http):
    r = http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2,
                                           "stop": [f"zz{i}" for i in range(MAX_STOP)],
                                           "bad_words": [f"zz{i}" for i in range(MAX_BAD_WORDS)]})
    assert r.status_code == 200, r.text


def test_logit_bias_key_of_many_digits_names_the_field(http):
    # int() of it raised Python's "Exceeds the limit (4300 digits)": a 400 naming nothing
    r = http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2, "logit_bias": {"9" * 5000: 1}})
    assert "logit_bias keys must be token ids" in _error(r, 400, "logit_bias")


@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions"])
def test_grammar_compiles_off_the_event_loop(http, monkeypatch, route):
    # A grammar that takes long to compile (100k guided_choice strings: 63 s) stalled every other request, the
    # compile ran on the event loop. xgrammar compiles without the GIL and caches the result: as this stand-in.
    real, compiled = serve_api.compile_grammar, set()

    def slow_compile(tokenizer, vocab, eos, params):
        if params.guided_regex not in compiled:
            time.sleep(2)
            compiled.add(params.guided_regex)
        return real(tokenizer, vocab, eos, params)

    monkeypatch.setattr(serve_api, "compile_grammar", slow_compile)
    body = {"max_tokens": 2, "guided_regex": f"a+{route[-4:]}", "n": 2}
    body.update({"prompt": "hi"} if route == "/v1/completions" else {"messages": [{"role": "user", "content": "hi"}]})
    result = {}
    t = threading.Thread(target=lambda: result.setdefault("r", http.post(route, json=body)))
    t.start()
    time.sleep(0.3)
    with httpx.Client(base_url=str(http.base_url), timeout=30) as other:
        start = time.monotonic()
        assert other.get("/health").status_code == 200
        waited = time.monotonic() - start
    t.join()
    assert result["r"].status_code == 200, result["r"].text
    assert waited < 1.0, f"/health waited {waited:.1f} s for another request's grammar"


def test_grammar_cache_is_bounded(llm):
    """The compiled-grammar cache has a bound (xgrammar's default is none: every new schema a client sent stayed,
    300 small ones grew a server by 690 MB)."""
    pytest.importorskip("xgrammar")
    from cpm4.engine import guided

    compiler = guided._compiler(llm.tokenizer, llm.model.config.vocab_size, [2])
    assert compiler.cache_limit_bytes == guided.GRAMMAR_CACHE_BYTES


def test_bad_words_deduplicated_in_order(llm):
    """bad_word_ids keeps each token sequence once, in first-seen order (a dict now: the list's lookups made 100k
    bad words stall the engine for minutes)."""
    from cpm4.engine.generate import bad_word_ids

    words = ["hello", " hello", "world", "hello"]
    seqs = bad_word_ids(llm.tokenizer, words)
    enc = [tuple(llm.tokenizer.encode(t, add_bos=False)) for t in ("hello", " hello", "world", " world")]
    assert seqs == list(dict.fromkeys(enc))


def test_long_conversations_render_off_the_event_loop(http, monkeypatch):
    """A chat of more than LOOP_MESSAGES messages is rendered in a worker thread (10^5 messages held the event loop,
    and every other request, for seconds); a short one on the loop."""
    import asyncio

    seen = []
    orig = serve_api._OpenAIServer._chat_ids

    def spy(self, req, *a, **k):
        seen.append((len(req.messages), asyncio._get_running_loop() is not None))
        return orig(self, req, *a, **k)

    monkeypatch.setattr(serve_api._OpenAIServer, "_chat_ids", spy)
    n = serve_api.LOOP_MESSAGES + 1
    long = [{"role": "user" if i % 2 == 0 else "assistant", "content": "hi"} for i in range(n)]
    for messages in (long, long[:1]):
        r = http.post("/v1/chat/completions", json={"model": MODEL, "messages": messages, "max_tokens": 1})
        assert r.status_code in (200, 400), r.text  # the long one is past the context: a 400 after rendering
    assert seen == [(n, False), (1, True)]


def test_logit_bias_keys_in_other_scripts_digits_refused(http):
    # int() reads "١٢" (Arabic-Indic digits) as 12: a key that is not an id's ASCII digits is refused
    r = http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2, "logit_bias": {"١٢": 1}})
    assert "logit_bias keys must be token ids" in _error(r, 400, "logit_bias")
    r = http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2, "logit_bias": {" 12": 1}})
    assert r.status_code == 200, r.text
