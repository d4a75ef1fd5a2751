"""The server's periodic stats line, as vLLM logs it: prompt and generation throughput over the last interval,
requests running and waiting, KV cache usage. Nothing is logged while the server is idle."""

from __future__ import annotations

import asyncio
import logging
import time

log = logging.getLogger("cpm4.serve")


class StatsLogger:
    """Reads an `AsyncEngine`'s counters every `interval` seconds (`run`), or when asked (`line`)."""

    def __init__(self, engine, interval: float):
        if not interval > 0:
            raise ValueError(f"log stats interval must be > 0 seconds, got {interval!r}")
        self.engine = engine
        self.interval = interval
        self._last = (time.monotonic(), engine.num_prompt_tokens, engine.num_generation_tokens)

    def line(self, now: float | None = None) -> str | None:
        """The line for the time since the previous call; None when nothing happened and nothing is pending."""
        now = time.monotonic() if now is None else now
        t0, p0, g0 = self._last
        e = self.engine
        p, g = e.num_prompt_tokens, e.num_generation_tokens
        self._last = (now, p, g)
        running, waiting = e.num_running, e.num_waiting
        if p == p0 and g == g0 and not running and not waiting:
            return None
        dt = max(now - t0, 1e-9)
        usage = e.kv_cache_usage()
        kv = "" if usage is None else f", KV cache usage: {100 * usage:.1f}%"
        return (f"Avg prompt throughput: {(p - p0) / dt:.1f} tokens/s, Avg generation throughput: "
                f"{(g - g0) / dt:.1f} tokens/s, Running: {running} reqs, Waiting: {waiting} reqs{kv}")

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            text = self.line()
            if text is not None:
                log.info(text)
