"""`cpm4 bench serve` (cpm4.serve.bench): request generation, the summary figures against hand-computed ones, and
a run against a real server on loopback (clients in several processes, both client libraries, errors)."""

from __future__ import annotations

import json
import math
import statistics

import pytest

from cpm4.serve.bench import BenchRequest, format_summary, random_requests, summarize


def test_random_requests_lengths_rates_and_errors():
    a = random_requests(200, 100, 20, range_ratio=0.5, vocab=50, request_rate=10.0, seed=3)
    assert a == random_requests(200, 100, 20, range_ratio=0.5, vocab=50, request_rate=10.0, seed=3)
    assert all(50 <= len(r.prompt) <= 150 and 10 <= r.max_tokens <= 30 for r in a)
    assert all(0 <= t < 50 for r in a for t in r.prompt)
    starts = [r.send_at for r in a]
    assert starts[0] == 0 and starts == sorted(starts)
    gaps = [b - a for a, b in zip(starts, starts[1:])]
    assert 0.07 < statistics.fmean(gaps) < 0.13  # Poisson arrivals at 10/s: mean gap 0.1 s
    fixed = random_requests(5, 7, 3)
    assert all(len(r.prompt) == 7 and r.max_tokens == 3 and r.send_at == 0 for r in fixed)
    with pytest.raises(ValueError, match="range_ratio"):
        random_requests(2, 4, 4, range_ratio=1.0)
    with pytest.raises(ValueError, match="request_rate"):
        random_requests(2, 4, 4, request_rate=0)
    with pytest.raises(ValueError, match=">= 1"):
        random_requests(0, 4, 4)
    # A shared prefix (vLLM's --random-prefix-len): the same ids first in every prompt, then the prompts the
    # seed gives without one.
    pre = random_requests(20, 30, 5, range_ratio=0.5, vocab=50, seed=3, prefix_len=17)
    plain = random_requests(20, 30, 5, range_ratio=0.5, vocab=50, seed=3)
    assert len({tuple(r.prompt[:17]) for r in pre}) == 1
    assert [r.prompt[17:] for r in pre] == [r.prompt for r in plain]
    with pytest.raises(ValueError, match="prefix_len"):
        random_requests(2, 4, 4, prefix_len=-1)


def test_summarize_against_hand_computed_figures():
    reqs = [BenchRequest([1] * 10, 5), BenchRequest([1] * 20, 4), BenchRequest([1] * 30, 9)]
    res = [{"ttft_s": 0.1, "total_s": 0.5, "itl_s": [0.1, 0.1, 0.1, 0.1], "tokens": 5, "error": None},
           {"ttft_s": 0.3, "total_s": 0.6, "itl_s": [0.1, 0.2], "tokens": 3, "error": None},
           {"ttft_s": 1.0, "total_s": 1.0, "itl_s": [], "tokens": 0, "error": "RuntimeError: HTTP 500"}]
    s = summarize({"wall_s": 2.0, "results": res, "client": "x", "processes": 2, "client_cpu_s": 0.4}, reqs)
    assert (s["completed"], s["failed"], s["short_outputs"]) == (2, 1, 1)
    assert (s["total_input_tokens"], s["total_output_tokens"]) == (30, 8)
    assert s["request_throughput"] == 1.0 and s["output_throughput"] == 4.0 and s["total_token_throughput"] == 19.0
    # p99 interpolated between ranks (numpy's default, vLLM's bench): 100 + 0.99 * (300 - 100)
    assert math.isclose(s["mean_ttft_ms"], 200) and math.isclose(s["p99_ttft_ms"], 298)
    # TPOT: (0.5 - 0.1) / 4 and (0.6 - 0.3) / 2
    assert math.isclose(s["mean_tpot_ms"], 1000 * (0.1 + 0.15) / 2)
    # ITL gaps sorted: five of 100 ms, one of 200; rank 0.99 * 5 = 4.95 lies 95% of the way from 100 to 200
    assert math.isclose(s["median_itl_ms"], 100) and math.isclose(s["p99_itl_ms"], 195)
    assert math.isclose(s["mean_e2el_ms"], 550)
    assert s["errors"] == ["RuntimeError: HTTP 500"]
    text = format_summary(s)
    assert "2 / 1" in text and "HTTP 500" in text and s["cached_input_tokens"] is None  # no server said
    res[0]["usage_cached_tokens"], res[1]["usage_cached_tokens"] = 8, 0
    s = summarize({"wall_s": 2.0, "results": res, "client": "x", "processes": 2, "client_cpu_s": 0.4}, reqs)
    assert s["cached_input_tokens"] == 8 and "8 input tokens from the prefix cache" in format_summary(s)


# ---------------------------------------------------------------------------------------------------------
# Against a server

@pytest.fixture(scope="module")
def server(tmp_path_factory):
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    pytest.importorskip("openai")
    from test_serve import _Server

    from cpm4.llm import LLM
    from cpm4.model.init import create_checkpoint
    from cpm4.serve import AsyncEngine, create_app

    path = tmp_path_factory.mktemp("bench") / "tiny"
    create_checkpoint("tiny", path)
    llm = LLM(path, device="cpu", dtype="float32")
    eng = AsyncEngine(llm.model, llm.tokenizer, max_batch_size=8)
    srv = _Server(create_app(eng, "tiny", api_key="sk-bench"))
    yield srv
    srv.stop()
    eng.shutdown()


def _bench(*args: str) -> int:
    from cpm4.cli import main

    return main(["bench", "serve", "--random-vocab", "500", "--random-input-len", "12", "--random-output-len", "5",
                 *args])


@pytest.mark.parametrize("client", ["openai", "httpx"])
def test_bench_serve_against_a_server(server, tmp_path, client, capsys):
    out = tmp_path / "res" / "bench.json"
    rc = _bench("--base-url", f"{server.url}/v1", "--api-key", "sk-bench", "--num-prompts", "6", "--client", client,
                "--client-processes", "2", "--max-concurrency", "3", "--request-rate", "200", "--num-warmups", "2",
                "--save-result", str(out))
    assert rc == 0
    s = json.loads(out.read_text())
    assert s["model"] == "tiny"  # from /v1/models
    assert (s["completed"], s["failed"], s["short_outputs"]) == (6, 0, 0)
    assert s["total_output_tokens"] == 30 and s["total_input_tokens"] == 72
    assert s["processes"] == 2 and s["client"].startswith(client)
    assert 0 < s["mean_ttft_ms"] <= s["mean_e2el_ms"] and s["mean_tpot_ms"] > 0
    assert "output tokens/s" in capsys.readouterr().out
    assert not list(out.parent.glob("*.tmp"))


def test_bench_serve_with_a_shared_prefix(server, tmp_path):
    """--random-prefix-len: every prompt starts with the same ids; the server's prefix cache serves them after the
    first (its usage's cached tokens, summed in the result)."""
    out = tmp_path / "bench.json"
    assert _bench("--base-url", server.url, "--api-key", "sk-bench", "--num-prompts", "6", "--client", "httpx",
                  "--client-processes", "1", "--max-concurrency", "2", "--random-prefix-len", "150",
                  "--save-result", str(out)) == 0
    s = json.loads(out.read_text())
    assert s["random_prefix_len"] == 150 and s["total_input_tokens"] == 6 * (150 + 12)
    assert 0 < s["cached_input_tokens"] <= 5 * 150  # the first request computed the prefix


def test_bench_serve_errors(server, capsys):
    # Wrong key: every request fails with the server's message; exit code 1.
    assert _bench("--base-url", server.url, "--api-key", "wrong", "--model", "tiny", "--num-prompts", "2",
                  "--client", "httpx", "--client-processes", "1") == 1
    assert "401" in capsys.readouterr().out
    # Nobody listening: a clear error before any client starts (exit code 2).
    assert _bench("--base-url", "http://127.0.0.1:9", "--num-prompts", "2") == 2
    assert "cannot list the models" in capsys.readouterr().err


def test_run_watch_counts_triton_compiles_and_their_seconds():
    """benchmarks/common.RunWatch chains Triton's pre- and post-compile hooks (as Triton calls them around a
    compilation: here by hand), counts compilations per kernel with their seconds, never skips a kernel (the
    pre-compile hook's result would) and puts the earlier hooks back."""
    import os
    import sys
    import time

    knobs = pytest.importorskip("triton").knobs
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
    try:
        from common import RunWatch
    finally:
        sys.path.pop(0)

    class Kernel:  # a JITFunction's shape: .fn is the Python function
        def __init__(self, fn):
            self.fn = fn

    def _score_kernel():
        pass

    calls = []
    before_pre, before_post = knobs.runtime.jit_cache_hook, knobs.runtime.jit_post_compile_hook
    knobs.runtime.jit_cache_hook = lambda *a, **k: calls.append("pre")
    knobs.runtime.jit_post_compile_hook = lambda *a, **k: calls.append("post")
    try:
        with RunWatch() as watch:
            for _ in range(2):
                assert not knobs.runtime.jit_cache_hook(fn=Kernel(_score_kernel), key="k")
                time.sleep(0.02)
                knobs.runtime.jit_post_compile_hook(fn=Kernel(_score_kernel), key="k")
        s = watch.summary()
        assert s["triton_by_name"] == {"_score_kernel": 2} and s["triton_kernels"] == 2
        assert 0.04 <= s["triton_compile_s"] < 1.0
        assert calls == ["pre", "post", "pre", "post"]  # the earlier hooks still called
        assert knobs.runtime.jit_cache_hook(fn=None) is None and calls[-1] == "pre"  # restored
    finally:
        knobs.runtime.jit_cache_hook, knobs.runtime.jit_post_compile_hook = before_pre, before_post


def test_bench_serve_draws_prompts_from_the_served_vocabulary(server, tmp_path):
    """Without --random-vocab the prompt ids come from the served model's vocabulary (its /v1/models card says
    it): the default of 10000 made every request a 400 against a model of fewer ids (the demo model's 8192, the
    tiny one's here)."""
    import httpx

    card = httpx.get(f"{server.url}/v1/models", headers={"Authorization": "Bearer sk-bench"}, timeout=30).json()
    vocab = card["data"][0]["vocab_size"]
    assert vocab < 10000
    from cpm4.cli import main

    out = tmp_path / "bench.json"
    assert main(["bench", "serve", "--base-url", server.url, "--api-key", "sk-bench", "--num-prompts", "4",
                 "--random-input-len", "200", "--random-output-len", "2", "--client", "httpx",
                 "--client-processes", "1", "--save-result", str(out)]) == 0
    assert json.loads(out.read_text())["failed"] == 0


def test_sigterm_stops_the_bench_and_its_client_processes(tmp_path):
    """`kill` (SIGTERM) of a running `cpm4 bench serve` ends it with 143 and takes its client processes with it
    (the default action ended the bench alone, and its clients went on loading the server). The server here
    answers /v1/models and holds every generation request open, so the clients are mid-request when it comes."""
    import os
    import signal
    import subprocess
    import sys
    import threading
    import time
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    release = threading.Event()

    class Holding(BaseHTTPRequestHandler):
        def do_GET(self):
            body = json.dumps({"object": "list", "data": [{"id": "m", "object": "model"}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self):
            release.wait(60)

        def log_message(self, *args):
            pass

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Holding)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{srv.server_address[1]}"
    bench = subprocess.Popen([sys.executable, "-m", "cpm4.cli", "bench", "serve", "--base-url", url, "--num-prompts",
                              "4", "--client-processes", "2", "--client", "httpx"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def children() -> list[int]:
        try:
            with open(f"/proc/{bench.pid}/task/{bench.pid}/children") as f:
                return [int(x) for x in f.read().split()]
        except OSError:
            return []

    try:
        deadline = time.monotonic() + 60
        while len(children()) < 2:
            assert bench.poll() is None, bench.communicate()
            assert time.monotonic() < deadline, "the client processes did not start"
            time.sleep(0.1)
        kids = children()
        time.sleep(1.0)  # the clients past "ready", their requests held by the server
        bench.send_signal(signal.SIGTERM)
        assert bench.wait(30) == 143
        for pid in kids:  # killed and reaped by the bench: gone from the process table
            assert not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z", pid
    finally:
        release.set()
        if bench.poll() is None:
            bench.kill()
        bench.communicate()
        srv.shutdown()
