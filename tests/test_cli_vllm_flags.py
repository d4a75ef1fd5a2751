"""`cpm4 serve` (and generate / chat / run-batch) driven by a command line copied from `vllm serve`: vLLM's
spellings of --max-model-len (32k, 32K, auto), its engine options that change nothing here taken (-tp 1,
--kv-cache-dtype auto, --swap-space, --enable-chunked-prefill, ...), those whose value would change something
refused in one line naming the option and why, and the server options with a meaning here (--seed, --max-logprobs,
--return-tokens-as-token-ids, --disable-fastapi-docs) doing what vLLM's do.

Parsing through `build_parser` and `main` in-process; the server options through the app `serve` builds, run under
Starlette's TestClient instead of uvicorn (no port, no network).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from cpm4.cli import build_parser, main
from cpm4.model.init import create_checkpoint


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("vllm_flags") / "tiny"
    create_checkpoint("tiny", path)
    return path


def refused(argv: list[str], capsys) -> str:
    """The usage error of `cpm4 argv` (exit 2, no traceback), as one `cpm4 ...: error:` line."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize("value,want", [("2048", 2048), ("32k", 32000), ("25.6k", 25600), ("32K", 32768),
                                        ("1M", 2**20), ("1m", 10**6), ("auto", None), ("-1", None)])
@pytest.mark.parametrize("command", [["generate"], ["chat"], ["serve"], ["run-batch", "-i", "a", "-o", "b"]])
def test_max_model_len_as_vllm_spells_it(command, value, want):
    assert build_parser().parse_args([*command, "--max-model-len", value]).max_model_len == want


@pytest.mark.parametrize("value,needle", [("1.5K", "did you mean 1.5k"), ("32x", "'32x'"), ("1", ">= 2")])
def test_max_model_len_bad_spellings(capsys, value, needle):
    line = refused(["serve", "--max-model-len", value], capsys)
    assert "--max-model-len" in line and needle in line


# vLLM options whose value changes nothing here: taken, on serve and run-batch alike
NEUTRAL = ["-tp", "1", "--tensor-parallel-size", "1", "-pp", "1", "--pipeline-parallel-size", "1", "-dp", "1",
           "--distributed-executor-backend", "mp", "--kv-cache-dtype", "auto", "--load-format", "safetensors",
           "--tokenizer-mode", "auto", "--cpu-offload-gb", "0", "--enable-chunked-prefill", "--block-size", "16",
           "--swap-space", "4", "--max-seq-len-to-capture", "8192", "--disable-custom-all-reduce",
           "--response-role", "assistant", "--seed", "0", "--max-logprobs", "20", "--return-tokens-as-token-ids",
           "--trust-remote-code", "--disable-log-requests"]


@pytest.mark.parametrize("command", [["serve", "some-model"], ["run-batch", "-i", "a", "-o", "b"]])
def test_neutral_vllm_engine_options_are_taken(command):
    args = build_parser().parse_args([*command, *NEUTRAL, "--no-enable-chunked-prefill"])
    assert args.seed == 0 and args.max_logprobs == 20 and args.return_tokens_as_token_ids
    if command[0] == "serve":
        assert args.model_tag == "some-model"  # the options' values were not taken for the model
        assert build_parser().parse_args(["serve", "--disable-fastapi-docs"]).disable_fastapi_docs


@pytest.mark.parametrize("argv,needles", [
    (["-tp", "2"], ["--tensor-parallel-size/-tp", "one device", "only 1"]),
    (["--pipeline-parallel-size", "4"], ["--pipeline-parallel-size", "one device"]),
    (["--quantization", "awq"], ["--quantization", "unquantized", "'awq'"]),
    (["-q", "fp8"], ["--quantization", "unquantized"]),
    (["--kv-cache-dtype", "fp8"], ["--kv-cache-dtype", "model's dtype", "only auto"]),
    (["--load-format", "pt"], ["--load-format", "safetensors"]),
    (["--response-role", "user"], ["--response-role", "assistant"]),
    (["--max-logprobs", "-1"], ["--max-logprobs", "at most 20"]),
    (["--max-logprobs", "100"], ["--max-logprobs", "at most 20"]),
    (["--cpu-offload-gb", "8"], ["--cpu-offload-gb", "on the device"]),
])
def test_vllm_options_that_would_change_something_are_refused(capsys, argv, needles):
    line = refused(["serve", *argv], capsys)
    for needle in needles:
        assert needle in line, line


def test_server_options_do_what_vllms_do(ckpt, capsys, monkeypatch):
    """--seed: unseeded sampling repeats from one server run to the next (requests in the same order);
    --max-logprobs: a request asking more is a 400 naming it; --return-tokens-as-token-ids: "token_id:ID" tokens;
    --disable-fastapi-docs: no /docs nor /openapi.json."""
    pytest.importorskip("uvicorn")
    pytest.importorskip("httpx")
    from fastapi.testclient import TestClient

    def serve_once(*flags: str) -> dict[str, Any]:
        seen: dict[str, Any] = {}

        def fake_run(app, **kw):
            with TestClient(app) as tc:
                seen["docs"] = tc.get("/docs").status_code, tc.get("/openapi.json").status_code
                body = {"prompt": "hello", "max_tokens": 6, "temperature": 1.0, "top_p": 1.0}
                seen["texts"] = [tc.post("/v1/completions", json=body).json()["choices"][0]["text"]
                                 for _ in range(3)]
                r = tc.post("/v1/completions", json={**body, "logprobs": 3})
                seen["too_many"] = r.status_code, r.json()
                r = tc.post("/v1/completions", json={**body, "logprobs": 2})
                seen["tokens"] = r.json()["choices"][0]["logprobs"]["tokens"]
                r = tc.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                          "max_tokens": 2, "logprobs": True, "top_logprobs": 5})
                seen["chat_too_many"] = r.status_code, r.json()

        monkeypatch.setattr("cpm4.serve._run_server", fake_run)
        rc = main(["serve", str(ckpt), "--device", "cpu", "--log-stats-interval", "0", "--max-batch-size", "2",
                   "--generation-config", "vllm", *flags])
        assert rc == 0, capsys.readouterr().err
        return seen

    flags = ("--seed", "1234", "--max-logprobs", "2", "--return-tokens-as-token-ids", "--disable-fastapi-docs")
    first, second = serve_once(*flags), serve_once(*flags)
    assert first["texts"] == second["texts"]
    assert first["docs"] == (404, 404)
    status, body = first["too_many"]
    assert status == 400 and "--max-logprobs 2" in body["error"]["message"] and body["error"]["param"] == "logprobs"
    status, body = first["chat_too_many"]
    assert status == 400 and body["error"]["param"] == "top_logprobs"
    assert first["tokens"] and all(t.startswith("token_id:") for t in first["tokens"])
    # without them: vLLM's defaults (docs served, token text, 20 logprobs allowed)
    plain = serve_once()
    assert plain["docs"] == (200, 200)
    assert plain["too_many"][0] == 200 and not any(t.startswith("token_id:") for t in plain["tokens"])


# ---------------------------------------------------------------------------------------------------------
# bench serve as `vllm bench serve` is driven


def test_bench_serve_takes_vllms_options(tmp_path, monkeypatch):
    """--host/--port name the server (they were unrecognized), vLLM's bare --save-result with --result-dir and
    --result-filename saves there (it was "expected one argument"), and --backend vllm, --dataset-name random,
    --endpoint /v1/completions, --ignore-eos (what the benchmark does) are taken. The server's side is faked:
    /v1/models and the clients."""
    import io
    import json

    seen: dict[str, Any] = {}

    def urlopen(req, timeout):
        seen["url"] = req.full_url
        return io.BytesIO(json.dumps({"data": [{"id": "org/served", "vocab_size": 500}]}).encode())

    def run_clients(base, model, reqs, warm, **kw):
        seen["base"], seen["model"] = base, model
        results = [{"ttft_s": 0.1, "total_s": 0.2, "itl_s": [0.1] * (r.max_tokens - 1), "tokens": r.max_tokens,
                    "error": None} for r in reqs]
        return {"wall_s": 1.0, "results": results, "client": "fake", "processes": 1, "client_cpu_s": 0.0}

    monkeypatch.setattr("urllib.request.urlopen", urlopen)
    monkeypatch.setattr("cpm4.serve.bench.run_clients", run_clients)
    common = ["bench", "serve", "--host", "localhost", "--port", "8123", "--backend", "vllm", "--dataset-name",
              "random", "--endpoint", "/v1/completions", "--ignore-eos", "--num-prompts", "2",
              "--random-input-len", "4", "--random-output-len", "3"]
    assert main([*common, "--save-result", "--result-dir", str(tmp_path / "a"), "--result-filename", "r.json"]) == 0
    assert seen["url"] == "http://localhost:8123/v1/models" and seen["base"] == "http://localhost:8123"
    assert json.loads((tmp_path / "a" / "r.json").read_text())["completed"] == 2
    # bare --save-result: vLLM's name from backend, rate and model, in --result-dir
    assert main([*common, "--save-result", "--result-dir", str(tmp_path / "b")]) == 0
    [saved] = (tmp_path / "b").iterdir()
    assert saved.name.startswith("vllm-infqps-served-") and saved.suffix == ".json"
    # cpm4's --save-result FILE and --base-url as before
    out = tmp_path / "c.json"
    assert main([*common, "--base-url", "http://127.0.0.1:9/v1", "--save-result", str(out)]) == 0
    assert seen["base"] == "http://127.0.0.1:9" and json.loads(out.read_text())["completed"] == 2


@pytest.mark.parametrize("argv,needle", [(["--dataset-name", "sharegpt"], "random token ids"),
                                         (["--backend", "openai-chat"], "/v1/completions"),
                                         (["--port", "70000"], "[0, 65535]")])
def test_bench_serve_refuses_what_it_does_not_do(capsys, argv, needle):
    line = refused(["bench", "serve", *argv], capsys)
    assert argv[0] in line and needle in line
