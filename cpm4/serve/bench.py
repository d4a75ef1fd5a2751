"""Load-test a running OpenAI-compatible server: `cpm4 bench serve` (what `vllm bench serve` is to vLLM).

Requests stream `/v1/completions` from client processes (one Python process parses every chunk of its streams:
a single one saturates long before a fast server does, so the clients are spread over `processes`). Each
request reports its time to the first text, the times between text chunks and its end; the usage chunk gives
the token counts. `summarize` turns the per-request records into throughput and latency figures.

Prompts are token ids (random, seeded), so no tokenizer is needed on the client side and every server that
accepts token-id prompts (cpm4, vLLM) can be measured the same way.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

__all__ = ["BenchRequest", "default_client_processes", "format_summary", "random_requests", "run_clients",
           "summarize"]

CLIENTS = ("openai", "httpx")


@dataclass
class BenchRequest:
    """One request: a token-id prompt, the tokens to generate (ignore_eos), and when to send it (seconds
    after the start; 0 for all at once)."""

    prompt: list[int]
    max_tokens: int
    send_at: float = 0.0


def default_client_processes() -> int:
    """Half the cores, at most 8 (the other half for a server on the same machine)."""
    return max(1, min(8, (os.cpu_count() or 2) // 2))


def random_requests(n: int, input_len: int, output_len: int, range_ratio: float = 0.0, vocab: int = 10000,
                    request_rate: float = math.inf, seed: int = 0, prefix_len: int = 0) -> list[BenchRequest]:
    """n requests with prompts of random ids in [0, vocab) and lengths drawn uniformly within
    `range_ratio` of input_len / output_len; sent at once (request_rate inf) or as a Poisson process of
    `request_rate` requests per second. prefix_len: that many random ids, the same for every request, before
    each prompt (vLLM's --random-prefix-len: a shared system prompt, which prefix caching serves once)."""
    if n < 1 or input_len < 1 or output_len < 1 or vocab < 1:
        raise ValueError(f"need n, input_len, output_len, vocab >= 1, got {n}, {input_len}, {output_len}, {vocab}")
    if prefix_len < 0:
        raise ValueError(f"prefix_len must be >= 0, got {prefix_len}")
    if not 0 <= range_ratio < 1:
        raise ValueError(f"range_ratio must be in [0, 1), got {range_ratio}")
    if not request_rate > 0:
        raise ValueError(f"request_rate must be > 0 (inf: all at once), got {request_rate}")
    rnd = random.Random(seed)
    # Arrivals from a generator of their own, so that a seed gives the same schedule whatever the lengths.
    arrivals = random.Random(f"arrivals-{seed}")

    def length(mean: int) -> int:
        lo, hi = max(1, int(mean * (1 - range_ratio))), max(1, int(mean * (1 + range_ratio)))
        return rnd.randint(lo, hi)

    # From a generator of its own too: the prompts after it are those of the same seed without a prefix.
    prefix = [random.Random(f"prefix-{seed}").randrange(vocab) for _ in range(prefix_len)]
    out, t = [], 0.0
    for _ in range(n):
        prompt = prefix + [rnd.randrange(vocab) for _ in range(length(input_len))]
        out.append(BenchRequest(prompt, length(output_len), t))
        if math.isfinite(request_rate):
            t += arrivals.expovariate(request_rate)
    return out


def run_clients(url: str, model: str, requests: Sequence[BenchRequest], warmup: Sequence[BenchRequest] = (),
                temperature: float = 0.0, client: str = "openai", processes: int = 1,
                max_concurrency: int | None = None, api_key: str | None = None,
                timeout: float = 1800.0) -> dict[str, Any]:
    """Send `requests` to the server at `url` (its root, without /v1) from `processes` child processes (request
    i from process i % processes), each after its own share of `warmup` (all at once, untimed); the timed runs
    of all processes start together. client: "openai" (the official client) or "httpx" (raw SSE lines, less
    work per chunk). max_concurrency: requests in flight at most (split over the processes). api_key: sent as
    the bearer token.

    Returns {"wall_s": first start to last end, "client_cpu_s": the busiest process's CPU time in its timed part
    (near wall_s: the clients set the pace), "results": one record per request in order (ttft_s, total_s,
    itl_s, tokens, text_chunks, usage_prompt_tokens, usage_tokens, usage_cached_tokens, finish_reason, error),
    "client", "processes"}."""
    if client not in CLIENTS:
        raise ValueError(f"client must be one of {CLIENTS}, got {client!r}")
    if not requests:
        raise ValueError("no requests to send")
    processes = max(1, min(processes, len(requests)))
    per_proc: list[int | None] = [None] * processes
    if max_concurrency is not None:
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {max_concurrency}")
        processes = min(processes, max_concurrency)
        # Shares that add up to max_concurrency (rounding each up let more than that be in flight).
        per_proc = [max_concurrency // processes + (k < max_concurrency % processes) for k in range(processes)]
    env = dict(os.environ, NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost")  # loopback direct
    # The children import this module by name: from wherever this copy of cpm4 is, installed or not.
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    procs: list[subprocess.Popen] = []
    try:
        for k in range(processes):
            spec = {"url": url.rstrip("/"), "model": model, "temperature": temperature, "timeout": timeout,
                    "client": client, "max_concurrency": per_proc[k], "api_key": api_key,
                    "warmup": [asdict(r) for r in warmup[k::processes]],
                    "requests": [asdict(r) for r in requests[k::processes]]}
            p = subprocess.Popen([sys.executable, "-m", "cpm4.serve.bench"], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
            p.stdin.write(json.dumps(spec) + "\n")
            p.stdin.flush()
            procs.append(p)
        for p in procs:  # each says "ready" after its warm-up
            if p.stdout.readline().strip() != "ready":
                p.kill()
                raise RuntimeError(f"a client process failed before the timed run:\n{p.communicate()[1][-4000:]}")
        for p in procs:
            p.stdin.write("go\n")
            p.stdin.flush()
        reports = []
        for p in procs:
            out, err = p.communicate(timeout=timeout + 120)
            if p.returncode != 0:
                raise RuntimeError(f"a client process failed (exit {p.returncode}):\n{err[-4000:]}")
            reports.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    results: list = [None] * len(requests)
    for k, rep in enumerate(reports):
        results[k::processes] = rep["results"]
    return {"wall_s": max(r["end"] for r in reports) - min(r["start"] for r in reports),
            "client_cpu_s": max(r["cpu_s"] for r in reports), "results": results, "client": reports[0]["client"],
            "processes": processes}


def _pct(xs: list[float], q: float) -> float:
    # Interpolated between the ranks around q, as numpy's default percentile (which vLLM's bench reports).
    return float(np.percentile(xs, q))


def summarize(report: dict[str, Any], requests: Sequence[BenchRequest]) -> dict[str, Any]:
    """Throughput and latency figures of a `run_clients` report, as vLLM's bench defines them (milliseconds; TTFT:
    to the first text; TPOT: (latency - TTFT) / (output tokens - 1), per request with more than one token; ITL:
    the gaps between text chunks)."""
    res = report["results"]
    ok = [r for r in res if r["error"] is None]
    wall = report["wall_s"]
    out_tokens = sum(r["tokens"] for r in ok)
    # The server's count where its usage gives one (it may add a BOS), else the prompt's length.
    in_tokens = sum(r.get("usage_prompt_tokens") or len(q.prompt) for q, r in zip(requests, res) if r["error"] is None)
    s: dict[str, Any] = {
        "completed": len(ok), "failed": len(res) - len(ok), "duration_s": wall,
        "total_input_tokens": in_tokens, "total_output_tokens": out_tokens,
        "request_throughput": len(ok) / wall, "output_throughput": out_tokens / wall,
        "total_token_throughput": (in_tokens + out_tokens) / wall,
        "short_outputs": sum(r["tokens"] < q.max_tokens for q, r in zip(requests, res) if r["error"] is None),
        # Prompt tokens the server served from its prefix cache (its usage's prompt_tokens_details; None when
        # it reports none).
        "cached_input_tokens": (sum(r.get("usage_cached_tokens") or 0 for r in ok)
                                if any(r.get("usage_cached_tokens") is not None for r in ok) else None),
        "client": report["client"], "processes": report["processes"], "client_cpu_s": report["client_cpu_s"],
        "errors": sorted({r["error"] for r in res if r["error"] is not None})[:5],
    }
    series = {"ttft": [r["ttft_s"] for r in ok],
              "tpot": [(r["total_s"] - r["ttft_s"]) / (r["tokens"] - 1) for r in ok if r["tokens"] > 1],
              "itl": [g for r in ok for g in r["itl_s"]], "e2el": [r["total_s"] for r in ok]}
    for name, xs in series.items():
        if xs:
            s[f"mean_{name}_ms"] = 1000 * statistics.fmean(xs)
            s[f"median_{name}_ms"] = 1000 * statistics.median(xs)
            s[f"p99_{name}_ms"] = 1000 * _pct(xs, 99)
    return s


def format_summary(s: dict[str, Any]) -> str:
    rows = [("requests completed / failed", f"{s['completed']} / {s['failed']}"),
            ("duration (s)", f"{s['duration_s']:.2f}"),
            ("input / output tokens", f"{s['total_input_tokens']} / {s['total_output_tokens']}"
             + ("" if s.get("cached_input_tokens") is None else
                f" ({s['cached_input_tokens']} input tokens from the prefix cache)")),
            ("requests/s", f"{s['request_throughput']:.2f}"),
            ("output tokens/s", f"{s['output_throughput']:.1f}"),
            ("total tokens/s", f"{s['total_token_throughput']:.1f}")]
    labels = {"ttft": "time to first token", "tpot": "time per output token", "itl": "inter-token latency",
              "e2el": "request latency"}
    for name, label in labels.items():
        if f"mean_{name}_ms" in s:
            rows.append((f"{label} ms (mean / median / p99)", f"{s[f'mean_{name}_ms']:.2f} / "
                         f"{s[f'median_{name}_ms']:.2f} / {s[f'p99_{name}_ms']:.2f}"))
    rows.append(("clients", f"{s['client']}, {s['processes']} processes (busiest used {s['client_cpu_s']:.2f} s "
                 "of CPU)"))
    width = max(len(k) for k, _ in rows)
    lines = [f"{k:<{width}}  {v}" for k, v in rows]
    if s["errors"]:
        lines.append("errors: " + "; ".join(s["errors"]))
    return "\n".join(lines)


# ----- the client process -----

async def _openai_events(client, spec: dict, prompt: list[int], max_tokens: int):
    """((usage prompt tokens, completion tokens) or None, [(text, finish_reason) of each choice]) of each streamed
    chunk."""
    stream = await client.completions.create(
        model=spec["model"], prompt=prompt, max_tokens=max_tokens, temperature=spec["temperature"],
        stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    async for c in stream:
        u = c.usage
        details = getattr(u, "prompt_tokens_details", None) if u is not None else None
        yield ((u.prompt_tokens, u.completion_tokens, getattr(details, "cached_tokens", None))
               if u is not None else None, [(ch.text, ch.finish_reason) for ch in c.choices])


async def _httpx_events(client, spec: dict, prompt: list[int], max_tokens: int):
    body = {"model": spec["model"], "prompt": prompt, "max_tokens": max_tokens, "temperature": spec["temperature"],
            "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True}
    async with client.stream("POST", f"{spec['url']}/v1/completions", json=body) as r:
        if r.status_code != 200:
            await r.aread()
            raise RuntimeError(f"HTTP {r.status_code}: {r.text[:200]}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            c = json.loads(line[6:])
            if "error" in c:
                raise RuntimeError(f"stream error: {c['error'].get('message')}")
            u = c.get("usage")
            yield ((u.get("prompt_tokens"), u["completion_tokens"],
                    (u.get("prompt_tokens_details") or {}).get("cached_tokens")) if u else None,
                   [(ch["text"], ch["finish_reason"]) for ch in c["choices"]])


async def _clients(spec: dict) -> dict:
    if spec["client"] == "openai":
        import openai

        client = openai.AsyncOpenAI(base_url=f"{spec['url']}/v1", api_key=spec.get("api_key") or "none",
                                    max_retries=0, timeout=spec["timeout"])
        events, version = _openai_events, f"openai {openai.__version__}"
    else:
        import httpx

        key = spec.get("api_key")
        client = httpx.AsyncClient(timeout=spec["timeout"], limits=httpx.Limits(max_connections=None),
                                   headers={"Authorization": f"Bearer {key}"} if key else None)
        events, version = _httpx_events, f"httpx {httpx.__version__}"
    limit = asyncio.Semaphore(spec["max_concurrency"]) if spec.get("max_concurrency") else None

    async def one(req: dict, start: float) -> dict:
        delay = start + req["send_at"] - time.time()
        if delay > 0:
            await asyncio.sleep(delay)
        if limit is not None:
            await limit.acquire()
        t0 = time.perf_counter()
        first = last = None
        chunks, usage, finish, error, itl = 0, (None, None, None), None, None, []
        try:
            async for u, choices in events(client, spec, req["prompt"], req["max_tokens"]):
                if u is not None:
                    usage = u
                for text, fin in choices:
                    if text:
                        now = time.perf_counter()
                        chunks += 1
                        if first is None:
                            first = now - t0
                        else:
                            itl.append(now - last)
                        last = now
                    if fin is not None:
                        finish = fin
        except Exception as e:  # noqa: BLE001 - a failed request is counted, the run goes on
            error = f"{type(e).__name__}: {e}"[:300]
        finally:
            if limit is not None:
                limit.release()
        total = time.perf_counter() - t0
        return {"ttft_s": total if first is None else first, "total_s": total, "itl_s": itl, "text_chunks": chunks,
                "usage_prompt_tokens": usage[0], "usage_tokens": usage[1], "usage_cached_tokens": usage[2],
                "tokens": chunks if usage[1] is None else usage[1], "finish_reason": finish, "error": error}

    async with client:
        now = time.time()
        await asyncio.gather(*(one(r, now) for r in spec["warmup"]))
        print("ready", flush=True)
        await asyncio.to_thread(sys.stdin.readline)  # "go": all client processes start their timed runs at once
        start, cpu = time.time(), time.process_time()  # wall clock: comparable between the processes
        res = await asyncio.gather(*(one(r, start) for r in spec["requests"]))
        end, cpu = time.time(), time.process_time() - cpu
    return {"start": start, "end": end, "cpu_s": cpu, "results": res, "client": version}


def _client_main() -> None:
    spec = json.loads(sys.stdin.readline())
    print(json.dumps(asyncio.run(_clients(spec))), flush=True)


if __name__ == "__main__":
    _client_main()
