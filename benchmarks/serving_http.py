"""The HTTP side of benchmarks/serving.py's `http.<clients>` row.

- `HTTPServer`: the OpenAI-compatible app (`cpm4.serve.create_app`) under a real uvicorn on 127.0.0.1, on a free
  port, in a background thread of the benchmark process (as `cpm4 serve` runs it: uvicorn and the engine's
  worker thread share one process);
- the clients are `cpm4.serve.bench.run_clients` (what `cpm4 bench serve` runs): separate Python processes (so
  they do not compete with the server for the GIL, and their own per-chunk work is spread over cores) that send
  every request at once, streaming, with `openai.AsyncOpenAI` (or httpx) to /v1/completions and report, per
  request, the time to the first text, the tokens streamed and the total time.

fastapi, uvicorn and openai are imported only when the row runs.
"""

from __future__ import annotations

import socket
import threading
import time

from cpm4.serve.bench import (  # noqa: F401 (the clients, for the rows)
    BenchRequest,
    default_client_processes,
    run_clients,
    summarize,
)

NEEDED = ("fastapi", "uvicorn", "openai")


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
