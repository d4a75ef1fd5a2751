"""vLLM's request log (--enable-log-requests, --max-log-len): a line per engine request with its id, prompt and
params, cut to max_log_len; nothing without it."""

import logging

import pytest

pytest.importorskip("fastapi")


def test_request_log_lines(tiny_checkpoint, caplog):
    from fastapi.testclient import TestClient

    from cpm4.llm import load_model
    from cpm4.serve import create_app
    from cpm4.serve.engine import AsyncEngine

    model, tok = load_model(tiny_checkpoint, "cpu")
    eng = AsyncEngine(model, tok, max_batch_size=2, kv_cache_tokens=1024)
    prompt = "one two three four five six seven eight nine ten"
    ids = tok.encode(prompt)
    try:
        for enabled in (False, True):
            caplog.clear()
            app = create_app(eng, "m", log_requests=enabled, max_log_len=6)
            with caplog.at_level(logging.INFO, logger="cpm4.serve"), TestClient(app) as c:
                r = c.post("/v1/completions", json={"prompt": prompt, "max_tokens": 3, "n": 2, "seed": 5})
                assert r.status_code == 200
            lines = [m for m in caplog.messages if m.startswith("Received request")]
            if not enabled:
                assert lines == []
                continue
            assert len(lines) == 2  # one per choice: each is an engine request
            rid = r.json()["id"]
            for j, line in enumerate(sorted(lines)):
                assert line.startswith(f"Received request {rid}-{j}: prompt: ")
                assert f"prompt_token_ids: {ids[:6]} ({len(ids)} tokens)" in line
                assert "max_tokens=3" in line and f"seed={5 + j}" in line
                shown = line.split("prompt: ", 1)[1].split(", params:")[0]
                assert len(eval(shown)) <= 6  # the prompt text cut to max_log_len characters
    finally:
        eng.shutdown()


def test_cli_request_log_options():
    import argparse

    from cpm4.serve.cli import add_serve_command, engine_options

    p = add_serve_command(argparse.ArgumentParser().add_subparsers())
    opts = engine_options(p.parse_args(["--enable-log-requests", "--max-log-len", "100", "--disable-log-requests"]))
    assert opts["log_requests"] is True and opts["max_log_len"] == 100
    assert engine_options(p.parse_args([]))["log_requests"] is False
