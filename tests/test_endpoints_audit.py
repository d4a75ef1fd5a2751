"""The server's endpoints besides generation against vLLM's OpenAI server: /tokenize's token_strs, /detokenize's
special tokens, the model card's fields, and the answers to requests no route takes (error bodies, status codes,
which routes the API key guards, /health once the engine is dead, /metrics counters)."""

from __future__ import annotations

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

import test_serve  # noqa: E402
from test_serve import KEY, MESSAGES, MODEL, TOOLS, _Server  # noqa: E402

from cpm4.serve import AsyncEngine, create_app  # noqa: E402

llm, engine, server = test_serve.llm, test_serve.engine, test_serve.server  # module-scoped fixtures


def _post(url: str, path: str, **kw) -> httpx.Response:
    return httpx.post(f"{url}{path}", timeout=30, **kw)


def test_tokenize_token_strs(server, llm):
    """vLLM's return_token_strs: the tokens' vocabulary strings (convert_ids_to_tokens) beside their ids, for a
    prompt and for messages; without it token_strs is null (the field was missing and the flag ignored)."""
    hf = llm.tokenizer.hf
    r = _post(server.url, "/tokenize", json={"prompt": "The colour of the sea"}).json()
    assert "token_strs" in r and r["token_strs"] is None
    r = _post(server.url, "/tokenize", json={"prompt": "The colour of the sea", "return_token_strs": True}).json()
    assert r["tokens"] == llm.tokenizer.encode("The colour of the sea")
    assert r["token_strs"] == hf.convert_ids_to_tokens(r["tokens"]) and r["count"] == len(r["token_strs"])
    body = {"messages": MESSAGES, "tools": TOOLS, "return_token_strs": True}
    r = _post(server.url, "/tokenize", json=body).json()
    assert r["tokens"] == llm.tokenizer.encode_chat(MESSAGES, tools=TOOLS)
    assert r["token_strs"] == hf.convert_ids_to_tokens(r["tokens"]) and "<|im_start|>" in r["token_strs"]
    r = _post(server.url, "/tokenize", json={"prompt": "x", "return_token_strs": "yes"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "return_token_strs"


def test_detokenize_keeps_special_tokens(server, llm):
    """As vLLM's (the tokenizer's decode): special tokens are written out, so /tokenize's ids of a chat come back as
    the rendered template (the BOS and the turn markers were dropped: "user\\nhi\\nassistant\\n")."""
    ids = _post(server.url, "/tokenize", json={"messages": MESSAGES}).json()["tokens"]
    text = _post(server.url, "/detokenize", json={"tokens": ids}).json()["prompt"]
    assert text == llm.tokenizer.decode(ids, skip_special_tokens=False)
    assert text.startswith("<s><|im_start|>system\nYou are terse.<|im_end|>") and text.count("<|im_start|>") == 3
    plain = llm.tokenizer.encode("The capital of France is", add_bos=False)
    assert _post(server.url, "/detokenize", json={"tokens": plain}).json() == {"prompt": "The capital of France is"}
    assert _post(server.url, "/detokenize", json={"tokens": []}).json() == {"prompt": ""}


def test_model_card_has_vllms_fields(server, llm):
    """/v1/models and /v1/models/{id} cards carry vLLM's fields: parent (null) and a permission list (missing)."""
    listed = httpx.get(f"{server.url}/v1/models", timeout=10).json()
    one = httpx.get(f"{server.url}/v1/models/{MODEL}", timeout=10).json()
    assert listed["object"] == "list" and len(listed["data"]) == 1
    for card in (listed["data"][0], one):
        assert {"id": MODEL, "object": "model", "owned_by": "cpm4", "root": MODEL, "parent": None,
                "max_model_len": llm.model.config.max_position_embeddings}.items() <= card.items()
        assert isinstance(card["created"], int)
        [perm] = card["permission"]
        assert perm["object"] == "model_permission" and perm["id"].startswith("modelperm-")
        assert perm["allow_sampling"] and perm["allow_logprobs"] and not perm["allow_fine_tuning"]
    r = httpx.get(f"{server.url}/v1/models/other", timeout=10)
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_requests_no_route_takes(server):
    """OpenAI-style error bodies: 404 for an unknown route, 405 for a wrong method, 400 for a body that is not JSON
    or not an object (whatever its Content-Type); a body sent as text/plain is still read as JSON."""
    url = server.url
    r = httpx.get(f"{url}/v2/nothing", timeout=10)
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    for method, path in (("GET", "/tokenize"), ("POST", "/v1/models"), ("DELETE", "/health")):
        r = httpx.request(method, f"{url}{path}", timeout=10)
        assert r.status_code == 405 and "message" in r.json()["error"], (method, path)
    for raw in (b"{bad", b"", b"[1, 2]", b"null", b'"text"', b"\xff\xfe{"):
        r = _post(url, "/tokenize", content=raw, headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error", raw
    r = _post(url, "/tokenize", content=b'{"prompt": "hi"}', headers={"content-type": "text/plain"})
    assert r.status_code == 200 and r.json()["count"] == 3


def test_api_key_guards_v1_only_and_health_dies_with_the_engine(llm):
    """As vLLM's: the key guards /v1/* only (/tokenize, /detokenize, /health, /version, /metrics are open);
    /health is a 503 once the engine has died while /metrics and /v1/models still answer; the counters moved."""
    eng = AsyncEngine(llm.model, llm.tokenizer, max_batch_size=2)
    srv = _Server(create_app(eng, MODEL, api_key=KEY))
    try:
        url, auth = srv.url, {"Authorization": f"Bearer {KEY}"}
        assert httpx.get(f"{url}/v1/models", timeout=10).status_code == 401
        assert _post(url, "/tokenize", json={"prompt": "hi"}).status_code == 200
        assert _post(url, "/detokenize", json={"tokens": [1]}).status_code == 200
        for path in ("/health", "/version", "/metrics"):
            assert httpx.get(f"{url}{path}", timeout=10).status_code == 200, path
        r = _post(url, "/v1/completions", headers=auth, json={"prompt": "Hello", "max_tokens": 3, "ignore_eos": True})
        assert r.status_code == 200
        metrics = httpx.get(f"{url}/metrics", timeout=10)
        assert metrics.headers["content-type"].startswith("text/plain")
        lines = set(metrics.text.splitlines())
        prompt = r.json()["usage"]["prompt_tokens"]
        assert f'cpm4_prompt_tokens_total{{model_name="{MODEL}"}} {float(prompt)}' in lines
        assert f'cpm4_generation_tokens_total{{model_name="{MODEL}"}} 3.0' in lines
        assert f'cpm4_request_success_total{{finished_reason="length",model_name="{MODEL}"}} 1.0' in lines
        eng._die("test: the worker failed")
        r = httpx.get(f"{url}/health", timeout=10)
        assert r.status_code == 503 and r.json()["error"]["type"] == "server_error"
        assert httpx.get(f"{url}/metrics", timeout=10).status_code == 200
        assert httpx.get(f"{url}/v1/models", headers=auth, timeout=10).status_code == 200
        r = _post(url, "/v1/completions", headers=auth, json={"prompt": "Hello", "max_tokens": 3})
        assert r.status_code == 503
    finally:
        srv.stop()
        eng.shutdown()
