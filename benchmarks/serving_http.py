"""The HTTP side of benchmarks/serving.py's `http.<clients>` row.

- `HTTPServer`: the OpenAI-compatible app (`cpm4.serve.create_app`) under a real uvicorn on 127.0.0.1, on a free
  port, in a background thread of the benchmark process (as `cpm4 serve` runs it: uvicorn and the engine's
  worker thread share one process);
- `run_clients`: starts this file as separate Python processes (so the clients do not compete with the server
  for the GIL, and their own per-chunk work is spread over cores) that send every request at once, streaming,
  with `openai.AsyncOpenAI` (or httpx) to /v1/completions and report, per request, the time to the first text,
  the tokens streamed and the total time.

fastapi, uvicorn and openai are imported only here, only when the row runs.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
import time

NEEDED = ("fastapi", "uvicorn", "openai")


def default_client_processes() -> int:
    """Client processes of an HTTP row: half the cores, at most 8 (the other half for the server)."""
    return max(1, min(8, (os.cpu_count() or 2) // 2))


def missing_modules() -> list[str]:
    """Which of the modules the http row needs cannot be imported here."""
    import importlib.util

    return [m for m in NEEDED if importlib.util.find_spec(m) is None]


class HTTPServer:
    """uvicorn serving `app` on 127.0.0.1 (a free port) in a daemon thread; `stop()` shuts it down."""

    def __init__(self, app, start_timeout: float = 60.0, **config) -> None:
        """config: more `uvicorn.Config` settings (loop, http, ...)."""
        import uvicorn

        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))  # a free port, held open so nothing can take it before uvicorn listens
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on",
                                                    timeout_graceful_shutdown=5, **config))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, name="uvicorn",
                                       daemon=True)
        self.thread.start()
        deadline = time.monotonic() + start_timeout
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                self.stop()
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)

    def stop(self, timeout: float = 30.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)
        if self.thread.is_alive():
            raise RuntimeError(f"uvicorn did not stop within {timeout} s")


def run_clients(url: str, model: str, warmup: list[tuple[list[int], int]], reqs: list[tuple[list[int], int]],
                temperature: float, timeout: float = 1800.0, client: str = "openai", processes: int = 1) -> dict:
    """Run the clients in `processes` child processes (request i in process i % processes): each first sends
    its share of `warmup` (all at once); once every process is warm they all send their share of `reqs` (all at
    once, timed). Each request is (prompt token ids, max_tokens). client: "openai" (`openai.AsyncOpenAI`, what
    users run) or "httpx" (httpx reading the SSE lines and json.loads each event: less work per chunk).

    One Python client process parses every streamed chunk of every request: at ~6,000 chunks/s it is busy all
    the time and the row measures the client, not the server (`client_cpu_s` near `wall_s` shows it); several
    processes, as many users' clients would be, take that limit away.
    Returns {"wall_s": first start to last end, "client_cpu_s": the busiest process's CPU time in its timed
    part, "results": per request, in `reqs` order, "client": library and version, "processes"}."""
    if client not in ("openai", "httpx"):
        raise ValueError(f"client must be 'openai' or 'httpx', got {client!r}")
    processes = max(1, min(processes, len(reqs)))
    env = dict(os.environ, NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost")  # never via a proxy
    procs = []
    try:
        for k in range(processes):
            spec = {"url": url, "model": model, "temperature": temperature, "warmup": warmup[k::processes],
                    "requests": reqs[k::processes], "timeout": timeout, "client": client}
            p = subprocess.Popen([sys.executable, os.path.abspath(__file__)], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
            p.stdin.write(json.dumps(spec) + "\n")
            p.stdin.flush()
            procs.append(p)
        for p in procs:  # each says "ready" after its warm-up
            line = p.stdout.readline()
            if line.strip() != "ready":
                raise RuntimeError(f"an HTTP client process failed before the timed run:\n{_stderr(p)}")
        for p in procs:
            p.stdin.write("go\n")
            p.stdin.flush()
        reports = []
        for p in procs:
            out, err = p.communicate(timeout=timeout + 120)
            if p.returncode != 0:
                raise RuntimeError(f"an HTTP client process failed (exit {p.returncode}):\n{err[-4000:]}")
            reports.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    results: list = [None] * len(reqs)
    for k, rep in enumerate(reports):
        results[k::processes] = rep["results"]
    return {"wall_s": max(r["end"] for r in reports) - min(r["start"] for r in reports),
            "client_cpu_s": max(r["cpu_s"] for r in reports), "results": results, "client": reports[0]["client"],
            "processes": processes}


def _stderr(p: subprocess.Popen) -> str:
    p.kill()
    return p.communicate()[1][-4000:]


async def _openai_events(client, spec: dict, prompt: list[int], max_tokens: int):
    """(usage completion tokens or None, [(text, finish_reason) of each choice]) of each streamed chunk."""
    stream = await client.completions.create(
        model=spec["model"], prompt=prompt, max_tokens=max_tokens, temperature=spec["temperature"],
        stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    async for c in stream:
        yield (c.usage.completion_tokens if c.usage is not None else None,
               [(ch.text, ch.finish_reason) for ch in c.choices])


async def _httpx_events(client, spec: dict, prompt: list[int], max_tokens: int):
    body = {"model": spec["model"], "prompt": prompt, "max_tokens": max_tokens, "temperature": spec["temperature"],
            "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True}
    async with client.stream("POST", f"{spec['url']}/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            c = json.loads(line[6:])
            u = c.get("usage")
            yield (u["completion_tokens"] if u else None, [(ch["text"], ch["finish_reason"]) for ch in c["choices"]])


async def _clients(spec: dict) -> dict:
    if spec.get("client", "openai") == "openai":
        import openai

        client = openai.AsyncOpenAI(base_url=f"{spec['url']}/v1", api_key="unused", max_retries=0,
                                    timeout=spec["timeout"])
        events, version = _openai_events, f"openai {openai.__version__}"
    else:
        import httpx

        client = httpx.AsyncClient(timeout=spec["timeout"], limits=httpx.Limits(max_connections=None))
        events, version = _httpx_events, f"httpx {httpx.__version__}"

    async def one(prompt: list[int], max_tokens: int) -> dict:
        t0 = time.perf_counter()
        first, chunks, usage, finish = None, 0, None, None
        async for u, choices in events(client, spec, prompt, max_tokens):
            if u is not None:
                usage = u
            for text, fin in choices:
                if text:
                    chunks += 1
                    if first is None:
                        first = time.perf_counter() - t0
                if fin is not None:
                    finish = fin
        total = time.perf_counter() - t0
        return {"ttft_s": total if first is None else first, "total_s": total, "text_chunks": chunks,
                "usage_tokens": usage, "tokens": chunks if usage is None else usage, "max_tokens": max_tokens,
                "finish_reason": finish}

    async with client:
        await asyncio.gather(*(one(p, n) for p, n in spec["warmup"]))
        print("ready", flush=True)
        await asyncio.to_thread(sys.stdin.readline)  # "go": every client process starts its timed run at once
        start, cpu = time.time(), time.process_time()  # wall clock: comparable between the processes
        res = await asyncio.gather(*(one(p, n) for p, n in spec["requests"]))
        end, cpu = time.time(), time.process_time() - cpu
    return {"start": start, "end": end, "cpu_s": cpu, "results": res, "client": version}


def _main() -> None:
    spec = json.loads(sys.stdin.readline())
    print(json.dumps(asyncio.run(_clients(spec))), flush=True)


if __name__ == "__main__":
    _main()
