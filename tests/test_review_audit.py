"""Review of run-batch, priority scheduling, beam search and the serve options: each test failed before its fix."""

import json
import random
import shutil
import subprocess
import threading
import time

import pytest
import torch
from conftest import random_model

from cpm4 import LLM, BeamSearchParams, SamplingParams
from cpm4.model.tokenizer import build_tokenizer


def test_batch_lines_end_at_newlines_only(tmp_path):
    """A JSONL line holding U+2028, U+2029 or U+0085 in a string (json.dumps(ensure_ascii=False) writes them
    unescaped, and they are valid JSON) is one request: it was split there and the file refused as "not JSON". A
    BOM (Windows editors) is no error either, CRLF lines work, and line numbers in errors stay right."""
    from cpm4.serve.batch import read_batch

    prompts = ["a\u2028b", "c\u2029d", "e\x85f"]
    lines = [json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/completions",
                         "body": {"prompt": p, "max_tokens": 2}}, ensure_ascii=False) for i, p in enumerate(prompts)]
    src = tmp_path / "in.jsonl"
    src.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(lines).encode() + b"\r\n")
    reqs = read_batch(src)
    assert [r.body["prompt"] for r in reqs] == prompts and [r.line for r in reqs] == [1, 2, 3]
    src.write_text("\n".join(lines[:2] + ["{bad"]) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"in.jsonl:3: not JSON"):
        read_batch(src)


def test_beams_end_where_a_fixed_kv_cache_is_full(tiny_checkpoint):
    """Beams longer than the whole KV cache end with "length" there, as any output does: offline (a fixed
    kv_cache_tokens) the search raised PromptTooLongError part-way, and the server answered 500."""
    from fastapi.testclient import TestClient

    from cpm4.serve import create_app
    from cpm4.serve.engine import AsyncEngine

    prompt = list(range(5, 55))  # 50 tokens; with 30 more the beams outgrow a 64-token cache
    params = BeamSearchParams(beam_width=2, max_tokens=30, ignore_eos=True)
    llm = LLM(tiny_checkpoint, device="cpu", kv_cache_tokens=64)
    out = llm.beam_search([{"prompt_token_ids": prompt}], params)[0]
    assert [(len(s.tokens), s.finish_reason) for s in out.sequences] == [(64, "length")] * 2
    eng = AsyncEngine(llm.model, llm.tokenizer, max_batch_size=4, kv_cache_tokens=64)
    try:
        with TestClient(create_app(eng, "m")) as c:
            r = c.post("/v1/completions", json={"prompt": prompt, "n": 2, "max_tokens": 30, "ignore_eos": True,
                                                "use_beam_search": True})
            assert r.status_code == 200, r.text
            body = r.json()
            assert [ch["finish_reason"] for ch in body["choices"]] == ["length"] * 2
            assert [ch["text"] for ch in body["choices"]] == [s.text for s in out.sequences]
            assert body["usage"]["completion_tokens"] == 2 * 14
    finally:
        eng.shutdown()


def test_priority_queue_of_many_requests_is_not_quadratic():
    """Queuing under scheduling_policy "priority" costs about what fcfs does: the insertion scanned the queue
    from its end (20,000 prompts with random priorities: 112 s against fcfs's 1.5 s). The queue is in
    (priority, arrival) order."""
    from cpm4.engine.paged import PagedKVCache
    from cpm4.engine.scheduler import LLMEngine

    model, tok = random_model("tiny", dtype=torch.float32), build_tokenizer(1024)
    n, took = 10000, {}
    for policy in ("fcfs", "priority"):
        eng = LLMEngine(model, tok, PagedKVCache(model.config, num_pages=8, page_size=16), max_batch_size=2,
                        scheduling_policy=policy)
        rng = random.Random(0)
        sps = [SamplingParams(max_tokens=2, priority=rng.randint(-50, 50) if policy == "priority" else 0)
               for _ in range(n)]
        t = time.perf_counter()
        for i, sp in enumerate(sps):
            eng.add_request(str(i), [5, 6, 7], sp)
        took[policy] = time.perf_counter() - t
        ranks = [r.rank for r in eng.waiting]
        assert ranks == sorted(ranks) and len(ranks) == n
    assert took["priority"] < 3 * took["fcfs"] + 0.5, took


def test_api_key_is_required_under_root_path():
    """With --root-path, uvicorn's request path starts with the prefix: the API key check looked for "/v1" at
    its start and let every /v1 route through without a key (a real uvicorn server here)."""
    import httpx
    import uvicorn

    from cpm4.serve import create_app
    from cpm4.serve.engine import AsyncEngine

    model, tok = random_model("tiny", dtype=torch.float32), build_tokenizer(1024)
    eng = AsyncEngine(model, tok, max_batch_size=2, kv_cache_tokens=256)
    server = uvicorn.Server(uvicorn.Config(create_app(eng, "m", api_key="sekrit"), host="127.0.0.1", port=0,
                                           root_path="/api", log_level="warning"))
    th = threading.Thread(target=server.run, daemon=True)
    th.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert th.is_alive() and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.05)
        base = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
        assert httpx.get(f"{base}/v1/models").status_code == 401
        body = {"prompt": "Hi", "max_tokens": 2}
        assert httpx.post(f"{base}/v1/completions", json=body).status_code == 401
        key = {"Authorization": "Bearer sekrit"}
        assert httpx.get(f"{base}/v1/models", headers=key).json()["data"][0]["id"] == "m"
        assert httpx.post(f"{base}/v1/completions", json=body, headers=key, timeout=60).status_code == 200
        assert httpx.get(f"{base}/health").status_code == 200  # outside /v1: open, as without a root path
    finally:
        server.should_exit = True
        th.join(30)
        eng.shutdown()


def test_tls_files_that_do_not_load_are_said_before_the_model(tmp_path, capsys):
    """A key that is not the certificate's, or a file that is not PEM, is named before the model loads (it was
    uvicorn's "[SSL] PEM lib (_ssl.c:...)" after the load, naming no file, under a line saying https was up)."""
    from cpm4.cli import main

    if shutil.which("openssl") is None:
        pytest.skip("no openssl")
    for name in ("a", "b"):
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout",
                        str(tmp_path / f"{name}.key"), "-out", str(tmp_path / f"{name}.crt"), "-days", "1", "-subj",
                        "/CN=127.0.0.1"], check=True, capture_output=True)
    (tmp_path / "junk.pem").write_text("not a PEM file\n")
    missing = tmp_path / "no-model"  # never reached: the TLS files fail first
    for key, crt, ca, what in (("b.key", "a.crt", None, "--ssl-keyfile"), ("junk.pem", "a.crt", None, "junk.pem"),
                               ("a.key", "a.crt", "junk.pem", "--ssl-ca-certs")):
        args = ["serve", str(missing), "--port", "0", "--ssl-keyfile", str(tmp_path / key),
                "--ssl-certfile", str(tmp_path / crt)] + (["--ssl-ca-certs", str(tmp_path / ca)] if ca else [])
        assert main(args) == 2
        err = capsys.readouterr().err
        assert "cannot use --ssl-" in err and what in err and "no-model" not in err, err
