"""`ProcessEngine` (`cpm4 serve --engine-process`): the model in a child process behind the same server. Outputs
equal the in-process engine's; aborts, a dying child, shutdown and bad options are handled."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from test_serve import ENUM_TOOLS, MESSAGES, MODEL, _Server  # noqa: E402

from cpm4.engine.sampling import SamplingParams  # noqa: E402
from cpm4.serve import AsyncEngine, ProcessEngine, create_app  # noqa: E402
from cpm4.serve.engine import EngineClosedError, EngineError  # noqa: E402


@pytest.fixture(scope="module")
def ckpt(tiny_checkpoint):
    return tiny_checkpoint


@pytest.fixture(scope="module")
def proc_engine(ckpt):
    eng = ProcessEngine(ckpt, device="cpu", dtype="float32", max_batch_size=4)
    yield eng
    eng.shutdown()


def _client(srv):
    return openai.OpenAI(base_url=f"{srv.url}/v1", api_key="unused", max_retries=0, timeout=60)


def _requests(client):
    """Greedy completions (plain, streamed, with echoed prompt logprobs) and a chat, four at once."""
    def plain(p):
        r = client.completions.create(model=MODEL, prompt=p, max_tokens=9, temperature=0,
                                      extra_body={"ignore_eos": True})
        return r.choices[0].text, r.usage.completion_tokens

    def streamed(p):
        chunks = client.completions.create(model=MODEL, prompt=p, max_tokens=7, temperature=0, stream=True,
                                           extra_body={"ignore_eos": True})
        return "".join(c.choices[0].text for c in chunks if c.choices)

    def echoed(p):
        r = client.completions.create(model=MODEL, prompt=p, max_tokens=2, temperature=0, echo=True, logprobs=2)
        return r.choices[0].text, [round(x, 4) for x in r.choices[0].logprobs.token_logprobs[1:]]

    def chat():
        r = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=6, temperature=0)
        return r.choices[0].message.content, r.choices[0].finish_reason

    def sampled(p):  # seeded sampling, n > 1, a stop string
        r = client.completions.create(model=MODEL, prompt=p, max_tokens=12, temperature=0.9, seed=7, n=2,
                                      stop=[" the"])
        return [(c.text, c.finish_reason, c.model_extra["stop_reason"]) for c in r.choices]

    def stop_id(p):  # a stop token (the child sends ids only) and a stop string (text from the child)
        base = client.completions.create(model=MODEL, prompt=p, max_tokens=9, temperature=0, logprobs=0,
                                         extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True})
        tok = int(base.choices[0].logprobs.tokens[3].split(":")[1])
        stop = base.choices[0].text[4:6]
        out = []
        for extra in ({"stop_token_ids": [tok]}, {"stop": [stop]}):
            c = client.completions.create(model=MODEL, prompt=p, max_tokens=9, temperature=0,
                                          extra_body={"ignore_eos": True, **extra}).choices[0]
            out.append((c.text, c.finish_reason, c.model_extra["stop_reason"]))
        assert [o[1:] for o in out] == [("stop", tok), ("stop", stop)], out
        return out

    def tool_call():  # a forced call: grammar compiled here and in the child; the tool parser on deltas apart
        chunks = client.chat.completions.create(model=MODEL, messages=MESSAGES, tools=ENUM_TOOLS, max_tokens=120,
                                                tool_choice={"type": "function", "function": {"name": "get_weather"}},
                                                seed=1, stream=True)
        calls = [(t.function.name, t.function.arguments) for ch in chunks if ch.choices
                 for t in ch.choices[0].delta.tool_calls or []]
        return calls

    def schema():
        fmt = {"type": "json_schema", "json_schema": {"name": "t", "schema": {
            "type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}}}
        r = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=40, seed=0, response_format=fmt)
        return r.choices[0].message.content, r.choices[0].finish_reason

    prompts = ["The sky is", "Once upon a time", "def main():", "Numbers: 1, 2,"]
    with ThreadPoolExecutor(8) as pool:
        jobs = [pool.submit(plain, p) for p in prompts] + [pool.submit(streamed, p) for p in prompts]
        jobs += [pool.submit(echoed, prompts[0]), pool.submit(chat), pool.submit(sampled, prompts[1]),
                 pool.submit(stop_id, prompts[2])]
        try:
            import xgrammar  # noqa: F401

            jobs += [pool.submit(tool_call), pool.submit(schema)]
        except ImportError:
            pass
        return [j.result() for j in jobs]


def test_process_engine_serves_as_the_thread_engine(ckpt, proc_engine):
    """The same requests, concurrently, through a server on each engine: equal greedy outputs, logprobs and
    usage; /health and the engine's counters from the child. The child sends no text for requests without stop
    strings (this process decodes their ids: api_detokenize), and text for those with them."""
    from cpm4.llm import LLM

    llm = LLM(ckpt, device="cpu", dtype="float32")
    ref_eng = AsyncEngine(llm.model, llm.tokenizer, max_batch_size=4)
    srv, ref_srv = _Server(create_app(proc_engine, MODEL)), _Server(create_app(ref_eng, MODEL))
    wire: dict[bool, list[str]] = {True: [], False: []}  # texts the child sent, by whether this process decodes
    deliver = proc_engine._deliver

    def spy(msgs):
        for rid, payload in msgs:
            req = proc_engine._requests.get(rid)
            if req is not None and isinstance(payload, tuple):
                wire[req.detached is not None].append(payload[0])
        deliver(msgs)

    proc_engine._deliver = spy
    try:
        got, want = _requests(_client(srv)), _requests(_client(ref_srv))
        assert got == want, (got, want)
        assert wire[True] and not any(wire[True])  # ids only
        assert any(wire[False])  # the stop-string request: text from the child
        assert all(n == 9 for _, n in got[:4])
        assert httpx.get(f"{srv.url}/health", timeout=10).status_code == 200
        assert proc_engine.num_running == 0 and proc_engine.num_waiting == 0
        assert proc_engine.kv_cache_usage() == 0
        assert proc_engine.num_generation_tokens > 0 and proc_engine.device == "cpu"
        # Prefix-cache hits come back from the child: a long prompt twice, the second finds its pages.
        long = list(range(5, 205))
        used = [_client(srv).completions.create(model=MODEL, prompt=long, max_tokens=2, temperature=0).usage
                for _ in "ab"]
        assert used[0].prompt_tokens_details.cached_tokens == 0
        assert used[1].prompt_tokens_details.cached_tokens > 0
    finally:
        del proc_engine._deliver
        srv.stop()
        ref_srv.stop()
        ref_eng.shutdown()


def test_process_engine_abort_frees_and_bad_request(proc_engine):
    """Closing a stream aborts it in the child; a request the child refuses fails alone."""
    ids = proc_engine.tokenizer.encode("Hello")

    async def run():
        s = proc_engine.stream(ids, SamplingParams(temperature=0, max_tokens=3000, ignore_eos=True), "long")
        async for d in s:
            assert d.token_ids
            break
        await s.aclose()
        with pytest.raises(ValueError, match="already in use"):
            other = proc_engine.stream(ids, SamplingParams(max_tokens=2), "dup")
            first = proc_engine.stream(ids, SamplingParams(max_tokens=2000, ignore_eos=True), "dup")
            await first.__anext__()
            await other.__anext__()
        await first.aclose()

    aborted = proc_engine.num_aborted
    asyncio.run(run())
    deadline = time.monotonic() + 15
    while proc_engine.num_running and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc_engine.num_aborted >= aborted + 2
    assert proc_engine.finish_reason("long") == "abort"
    assert proc_engine.num_running == 0 and proc_engine.kv_cache_usage() == 0


def test_process_engine_child_death_fails_requests(ckpt):
    """A child that dies mid-request: the stream raises EngineError naming the exit, the health check says the
    engine is down, later requests are refused."""
    eng = ProcessEngine(ckpt, device="cpu", dtype="float32", max_batch_size=2)
    srv = _Server(create_app(eng, MODEL))
    try:
        ids = eng.tokenizer.encode("Hello")

        async def run():
            n = 0
            async for _ in eng.stream(ids, SamplingParams(max_tokens=3000, ignore_eos=True), "doomed"):
                n += 1
                if n == 2:
                    eng._proc.kill()
            return n

        with pytest.raises(EngineError, match="engine process died"):
            asyncio.run(run())
        assert not eng.is_running and eng.exitcode is not None and eng.exitcode != 0
        assert httpx.get(f"{srv.url}/health", timeout=10).status_code == 503
        with pytest.raises(EngineClosedError):
            asyncio.run(eng.stream(ids, SamplingParams(max_tokens=2), "after").__anext__())
    finally:
        srv.stop()
        eng.shutdown()


def test_process_engine_shutdown_and_bad_options(ckpt, tmp_path):
    eng = ProcessEngine(ckpt, device="cpu", dtype="float32", max_batch_size=2)
    eng.shutdown()
    assert eng.exitcode == 0 and not eng.is_running
    eng.shutdown()  # twice is fine
    with pytest.raises(FileNotFoundError, match="model directory"):
        ProcessEngine(tmp_path / "missing")
    with pytest.raises(TypeError, match="unknown engine options: max_batch"):
        ProcessEngine(ckpt, max_batch=3)
    with pytest.raises(ValueError, match="max_batch_size"):
        ProcessEngine(ckpt, max_batch_size=0)
    with pytest.raises(ValueError, match="max_model_len"):
        ProcessEngine(ckpt, max_model_len=10**9)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((ckpt / "config.json").read_text())
    for f in ckpt.iterdir():
        if f.name.startswith("tokenizer"):
            (broken / f.name).write_bytes(f.read_bytes())
    with pytest.raises(ValueError, match="engine process could not start"):
        ProcessEngine(broken, device="cpu")  # no weights: the child's load fails (a CheckpointError, as in a thread)


def test_wire_format_round_trip():
    """Every queue item survives the pipe's encoding, whatever a delta's text is."""
    from cpm4.engine.generate import StreamDelta, TokenLogprob
    from cpm4.serve.engine import _END
    from cpm4.serve.engine_proc import _decode, _encode

    lps = [TokenLogprob(5, -0.5, [(5, -0.5), (7, -1.0)])]
    for d in (StreamDelta(0, "error", [5], None, lps), StreamDelta(0, "", [], "abort"),
              StreamDelta(0, "x", [1, 2], "stop"), StreamDelta(0, "y", [3], None, None, 128)):
        assert _decode(_encode(d)) == d
    assert _decode(_encode(_END)) is _END
    for err, cls in ((ValueError("bad"), ValueError), (EngineClosedError("shut"), EngineClosedError),
                     (RuntimeError("boom"), EngineError), (EngineError("gen"), EngineError)):
        back = _decode(_encode(err))
        assert type(back) is cls and str(back) == str(err)
    with pytest.raises(TypeError):
        _encode(object())


def wait_up(proc, url: str, timeout: float = 120) -> None:
    """Until `url`/health answers 200, while the server process `proc` runs."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert proc.poll() is None and time.monotonic() < deadline, "server did not come up"
        time.sleep(0.2)


def test_process_engine_reader_failure_ends_the_engine(ckpt, monkeypatch):
    """A failure while handling the child's messages ends the engine (requests fail) instead of hanging."""
    eng = ProcessEngine(ckpt, device="cpu", dtype="float32", max_batch_size=2)
    try:
        def broken(msgs):
            raise RuntimeError("bug")

        monkeypatch.setattr(eng, "_deliver", broken)
        ids = eng.tokenizer.encode("Hello")

        async def run():
            return [d async for d in eng.stream(ids, SamplingParams(max_tokens=5), "r")]

        with pytest.raises(EngineError, match="engine process died"):
            asyncio.run(asyncio.wait_for(run(), 60))
        assert not eng.is_running
    finally:
        eng.shutdown()


def test_cpm4_serve_engine_process_cli(ckpt):
    """`cpm4 serve --engine-process` end to end: answers, and Ctrl-C (SIGINT to the server) stops it and its
    engine process cleanly."""
    import os
    import signal
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, NO_PROXY="127.0.0.1", no_proxy="127.0.0.1")
    # The model as vLLM's positional argument (`vllm serve MODEL`).
    proc = subprocess.Popen([sys.executable, "-m", "cpm4.cli", "serve", str(ckpt), "--port", str(port),
                             "--engine-process", "--device", "cpu", "--log-stats-interval", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_up(proc, url)
        children = [int(c) for c in open(f"/proc/{proc.pid}/task/{proc.pid}/children").read().split()]
        assert children  # the engine (and multiprocessing's resource tracker)
        r = httpx.post(f"{url}/v1/completions", timeout=60,
                       json={"prompt": "Hello", "max_tokens": 4, "temperature": 0, "ignore_eos": True})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0
        assert f"Uvicorn running on http://127.0.0.1:{port}" in proc.stdout.read()  # (on the socket taken first)
        deadline = time.monotonic() + 30
        alive = children
        while alive and time.monotonic() < deadline:
            alive = [c for c in alive if os.path.exists(f"/proc/{c}") and
                     open(f"/proc/{c}/stat").read().split(")")[-1].split()[0] != "Z"]
            time.sleep(0.1)
        assert not alive, f"processes left behind: {alive}"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("flag,expected", [(None, AsyncEngine), (False, AsyncEngine), (True, ProcessEngine)])
def test_serve_picks_the_engine(ckpt, monkeypatch, flag, expected):
    """`serve(engine_process=None)` keeps the engine in a thread on the CPU (a child process on CUDA); True and
    False are obeyed; the CLI's --engine-process/--no-engine-process map onto them."""
    import argparse

    import torch

    from cpm4.serve import default_engine_process, serve
    from cpm4.serve.cli import add_serve_command

    seen = {}

    def fake_run(app, **kw):
        seen["engine"] = app.state.engine
        assert app.state.engine.is_running

    monkeypatch.setattr("cpm4.serve._run_server", fake_run)
    serve(ckpt, device="cpu", engine_process=flag, log_stats_interval=0, max_batch_size=2,
          enable_prefix_caching=flag is not True, cascade_decode=flag)
    assert type(seen["engine"]) is expected
    if expected is AsyncEngine:  # the options reach the engine (the child's: test_prefix_caching_off)
        assert seen["engine"].enable_prefix_caching is (flag is not True)
        assert seen["engine"].cascade_decode is flag
    assert not seen["engine"].is_running  # shut down when uvicorn returns
    assert default_engine_process(torch.device("cuda")) and not default_engine_process(torch.device("cpu"))
    sub = argparse.ArgumentParser().add_subparsers()
    p = add_serve_command(sub)
    argv = {None: [], False: ["--no-engine-process"], True: ["--engine-process"]}[flag]
    assert p.parse_args(argv).engine_process is flag
    assert p.parse_args([]).enable_prefix_caching is True
    assert p.parse_args(["--no-enable-prefix-caching"]).enable_prefix_caching is False
    assert p.parse_args([]).cascade_decode is None
    assert p.parse_args(["--no-cascade-decode"]).cascade_decode is False


@pytest.mark.gpu
def test_process_engine_on_cuda(ckpt):
    """The default engine of `cpm4 serve` on CUDA: the child captures its CUDA graphs and answers as the thread
    engine does (requests one at a time, so both run the same batches); the parent never touches the GPU."""
    import torch

    from cpm4.llm import LLM

    cuda_before = torch.cuda.is_initialized()
    eng = ProcessEngine(ckpt, device="cuda", dtype="float32", max_batch_size=4, kv_cache_tokens=4096)
    try:
        assert eng.device.startswith("cuda")
        if not cuda_before:  # no CUDA context (and its memory) in the server process
            assert not torch.cuda.is_initialized()
        llm = LLM(ckpt, device="cuda", dtype="float32")
        ref = AsyncEngine(llm.model, llm.tokenizer, max_batch_size=4, kv_cache_tokens=4096)
        srv, ref_srv = _Server(create_app(eng, MODEL)), _Server(create_app(ref, MODEL))
        try:
            for p in ["The sky is", "Once upon a time", "def main():"]:
                outs = []
                for s in (srv, ref_srv):
                    r = _client(s).completions.create(model=MODEL, prompt=p, max_tokens=24, temperature=0,
                                                      logprobs=1, extra_body={"ignore_eos": True})
                    c = r.choices[0]
                    outs.append((c.text, r.usage.completion_tokens, c.logprobs.tokens))
                    assert r.usage.completion_tokens == 24
                assert outs[0] == outs[1]
            with ThreadPoolExecutor(8) as pool:  # many at once through the child's batches
                lens = list(pool.map(lambda i: _client(srv).completions.create(
                    model=MODEL, prompt=f"Item {i}:", max_tokens=16, temperature=0,
                    extra_body={"ignore_eos": True}).usage.completion_tokens, range(12)))
            assert lens == [16] * 12
            assert eng.num_running == 0 and eng.kv_cache_usage() == 0
        finally:
            srv.stop()
            ref_srv.stop()
            ref.shutdown()
    finally:
        eng.shutdown()


def test_process_engine_abort_racing_its_add(proc_engine, monkeypatch):
    """An abort from another thread between a request's registration and the send of its add (`_submit` sends
    outside the lock) reached the child first, found nothing, and the request ran to max_tokens; it ends now."""
    ids = proc_engine.tokenizer.encode("Hello")
    send = proc_engine._send

    def racing(msg):
        if msg[0] == "add" and msg[1] == "race":
            proc_engine.abort("race")  # its abort message goes out before the add
        send(msg)

    monkeypatch.setattr(proc_engine, "_send", racing)

    async def run():
        params = SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)
        return [d async for d in proc_engine.stream(ids, params, "race")]

    deltas = asyncio.run(run())
    assert deltas[-1].finish_reason == "abort"
    assert sum(len(d.token_ids) for d in deltas) < 400
