"""The HTTP side of benchmarks/serving.py's `http.<clients>` row.

- `HTTPServer`: the OpenAI-compatible app (`cpm4.serve.create_app`) under a real uvicorn on 127.0.0.1, on a free
  port, in a background thread of the benchmark process (as `cpm4 serve` runs it: uvicorn and the engine's
  worker thread share one process);
- `run_clients`: starts this file as a separate Python process (so the clients do not compete with the server
  for the GIL) that sends every request at once, streaming, with `openai.AsyncOpenAI` to /v1/completions and
  reports, per request, the time to the first text, the tokens streamed and the total time.

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


def missing_modules() -> list[str]:
    """Which of the modules the http row needs cannot be imported here."""
    import importlib.util

    return [m for m in NEEDED if importlib.util.find_spec(m) is None]


class HTTPServer:
    """uvicorn serving `app` on 127.0.0.1 (a free port) in a daemon thread; `stop()` shuts it down."""

    def __init__(self, app, start_timeout: float = 60.0) -> None:
        import uvicorn

        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))  # a free port, held open so nothing can take it before uvicorn listens
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on",
                                                    timeout_graceful_shutdown=5))
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
                temperature: float, timeout: float = 1800.0) -> dict:
    """Run the clients in a child process: first `warmup` (all at once), then `reqs` (all at once, timed).
    Each request is (prompt token ids, max_tokens). Returns the child's report (see `_main`)."""
    spec = {"url": url, "model": model, "temperature": temperature, "warmup": warmup, "requests": reqs,
            "timeout": timeout}
    env = dict(os.environ, NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost")  # never via a proxy
    p = subprocess.run([sys.executable, os.path.abspath(__file__)], input=json.dumps(spec), capture_output=True,
                       text=True, timeout=timeout + 120, env=env)
    if p.returncode != 0:
        raise RuntimeError(f"the HTTP client process failed (exit {p.returncode}):\n{p.stderr[-4000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


async def _clients(spec: dict) -> dict:
    import openai

    client = openai.AsyncOpenAI(base_url=f"{spec['url']}/v1", api_key="unused", max_retries=0,
                                timeout=spec["timeout"])

    async def one(prompt: list[int], max_tokens: int) -> dict:
        t0 = time.perf_counter()
        stream = await client.completions.create(
            model=spec["model"], prompt=prompt, max_tokens=max_tokens, temperature=spec["temperature"],
            stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        first, chunks, usage, finish = None, 0, None, None
        async for c in stream:
            if c.usage is not None:
                usage = c.usage.completion_tokens
            for ch in c.choices:
                if ch.text:
                    chunks += 1
                    if first is None:
                        first = time.perf_counter() - t0
                if ch.finish_reason is not None:
                    finish = ch.finish_reason
        total = time.perf_counter() - t0
        return {"ttft_s": total if first is None else first, "total_s": total, "text_chunks": chunks,
                "usage_tokens": usage, "tokens": chunks if usage is None else usage, "max_tokens": max_tokens,
                "finish_reason": finish}

    async with client:
        await asyncio.gather(*(one(p, n) for p, n in spec["warmup"]))
        t = time.perf_counter()
        res = await asyncio.gather(*(one(p, n) for p, n in spec["requests"]))
        wall = time.perf_counter() - t
    return {"wall_s": wall, "results": res, "openai_version": openai.__version__}


def _main() -> None:
    spec = json.loads(sys.stdin.read())
    print(json.dumps(asyncio.run(_clients(spec))), flush=True)


if __name__ == "__main__":
    _main()
