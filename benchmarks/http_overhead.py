"""What the HTTP layer costs a streaming server, with the model taken out.

    python benchmarks/http_overhead.py [--clients 64] [--step-ms 2.4] [--loop auto] [--http auto]

The server's engine (`AsyncEngine`, the worker thread and queues behind `cpm4 serve`) runs a stand-in scheduler:
each step works --host-ms in Python (holding the GIL, as the engine's scheduling, sampling and detokenizing do),
waits --step-ms with the GIL released, as the host waits for a GPU decode step (2.4 ms in all is the H200's 0.5B
batch-64 step, RESULTS.md server.64), then gives every running request one token with text. So the rows
differ only in how the tokens reach the clients:
- `inproc.<clients>`: asyncio clients reading `AsyncEngine.stream` in the engine's process (no HTTP);
- `http-openai.<clients>`: `cpm4.serve.create_app` under uvicorn on 127.0.0.1, `openai.AsyncOpenAI` streaming
  /v1/completions from --client-processes other processes (as benchmarks/serving.py's http row);
- `http-httpx.<clients>`: the same server read by httpx, one json.loads per event: a cheap client, so the row
  shows the server's own limit.
Each client asks for 64-512 tokens (seed 2, as serving.py's server rows). `peer_ms` is the in-process row's wall
time and `speedup` in-process time over the row's (1.0: HTTP costs nothing). `client_cpu_s` (the busiest client
process's CPU time) near the row's time says the clients, not the server, set its pace; `server_cpu_s` is the
server process's CPU time (engine thread included, warm-up requests too). Prints a table and writes
benchmarks/results/http_overhead-<date>.json. Needs fastapi, uvicorn and openai.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import random
import sys
import threading
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from common import covering_tokenizer, write_rows  # noqa: E402
from serving_http import (  # noqa: E402
    BenchRequest,
    HTTPServer,
    default_client_processes,
    missing_modules,
    run_clients,
    summarize,
)  # noqa: E402

from cpm4.engine.generate import StreamDelta  # noqa: E402
from cpm4.engine.sampling import SamplingParams  # noqa: E402
from cpm4.model.config import preset  # noqa: E402
from cpm4.model.init import random_model  # noqa: E402
from cpm4.serve import create_app  # noqa: E402
from cpm4.serve.engine import AsyncEngine  # noqa: E402


class StubScheduler:
    """Stands in for `LLMEngine` in `AsyncEngine`'s worker: a step sleeps `step_s` (the GIL released, as while
    the GPU runs) and gives every running request its next token."""

    num_preempted = 0

    def __init__(self, texts: list[str], step_s: float, host_s: float = 0.0, host_ops: int = 0) -> None:
        self.texts, self.step_s, self.host_s, self.host_ops = texts, step_s, host_s, host_ops
        self._x = torch.zeros(64)
        self.running: dict[str, list] = {}  # id -> [tokens left, next token, aborted]

    def warm_up(self) -> None:
        pass

    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams, **options: object) -> None:
        # options: LLMEngine's stream_text / detokenize, which the worker passes; the stand-in always sends text
        self.running[request_id] = [params.max_tokens, prompt_ids[-1] % len(self.texts), False]

    def abort(self, request_id: str) -> None:
        if request_id in self.running:
            self.running[request_id][2] = True

    def step(self) -> list[tuple[str, StreamDelta]]:
        end = time.perf_counter() + self.host_s
        while time.perf_counter() < end:  # the engine's own Python work of a step, holding the GIL
            pass
        for _ in range(self.host_ops):  # small torch calls: each lets go of the GIL and takes it back
            self._x.add_(1.0)
        time.sleep(self.step_s)
        out = []
        for rid, r in list(self.running.items()):
            if r[2]:
                out.append((rid, StreamDelta(0, "", [], "abort")))
                del self.running[rid]
                continue
            r[0] -= 1
            tid = r[1] = (r[1] * 7 + 1) % len(self.texts)
            fin = "length" if r[0] == 0 else None
            out.append((rid, StreamDelta(0, self.texts[tid], [tid], fin)))
            if fin:
                del self.running[rid]
        return out


class StubEngine(AsyncEngine):
    def __init__(self, *args, texts: list[str], step_s: float, host_s: float, host_ops: int, **kwargs) -> None:
        # set before the worker starts: it builds the scheduler
        self._texts, self._step_s, self._host_s, self._host_ops = texts, step_s, host_s, host_ops
        super().__init__(*args, **kwargs)

    def _new_scheduler(self) -> StubScheduler:
        self._sched = StubScheduler(self._texts, self._step_s, self._host_s, self._host_ops)
        return self._sched

    def kv_cache_usage(self) -> float | None:
        return None


async def inproc_clients(engine: AsyncEngine, reqs: list[BenchRequest]) -> dict:
    """The requests read straight from `AsyncEngine.stream`, as a `cpm4.serve.bench.run_clients` report."""
    async def one(i: int, r: BenchRequest) -> dict:
        t0 = time.perf_counter()
        first, got, chunks = None, 0, 0
        async for d in engine.stream(r.prompt, SamplingParams(max_tokens=r.max_tokens, ignore_eos=True), f"r{i}"):
            if d.token_ids and first is None:
                first = time.perf_counter() - t0
            got += len(d.token_ids)
            chunks += bool(d.text)
        total = time.perf_counter() - t0
        return {"ttft_s": total if first is None else first, "total_s": total, "itl_s": [], "tokens": got,
                "text_chunks": chunks, "error": None}

    t = time.perf_counter()
    res = await asyncio.gather(*(one(i, r) for i, r in enumerate(reqs)))
    return {"wall_s": time.perf_counter() - t, "results": res, "client": "in process", "processes": 0,
            "client_cpu_s": 0.0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--step-ms", type=float, default=2.4, help="the stand-in decode step's time")
    ap.add_argument("--host-ms", type=float, default=0.0,
                    help="Python work (holding the GIL) of each step before the wait, as the engine's host side")
    ap.add_argument("--host-ops", type=int, default=0,
                    help="small torch calls of each step (each releases the GIL and must take it back, as the "
                         "engine's launches and copies do)")
    ap.add_argument("--switch-interval-ms", type=float, default=None,
                    help="sys.setswitchinterval for the server process (Python's default: 5 ms)")
    ap.add_argument("--loop", default="auto", help="uvicorn's event loop: auto (uvloop when installed), asyncio, "
                                                  "uvloop")
    ap.add_argument("--http", default="auto", help="uvicorn's HTTP implementation: auto (httptools when "
                                                  "installed), h11, httptools")
    ap.add_argument("--clients-lib", nargs="+", default=["openai", "httpx"], choices=["openai", "httpx"])
    ap.add_argument("--client-processes", type=int, default=default_client_processes(),
                    help="processes the HTTP clients are spread over (default: half the cores, at most 8)")
    ap.add_argument("--tag", default="", help="appended to the row names (e.g. the setting under test)")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    if args.switch_interval_ms is not None:
        sys.setswitchinterval(args.switch_interval_ms / 1000)
    missing = missing_modules()
    if missing:
        ap.error(f"needs {', '.join(missing)}: pip install fastapi uvicorn openai")
    torch.manual_seed(0)
    cfg = preset("tiny")
    model = random_model(cfg, torch.device("cpu"), torch.float32)  # only for the server's request checks
    tok = covering_tokenizer(cfg.vocab_size)
    texts = [tok.decode([i]) for i in range(cfg.vocab_size)]
    rnd = random.Random(2)
    hi = cfg.vocab_size - 1
    reqs = [BenchRequest([rnd.randint(0, hi) for _ in range(rnd.randint(100, 1024) // 8)], rnd.randint(64, 512))
            for _ in range(args.clients)]
    warm = [BenchRequest(r.prompt[:8], 4) for r in reqs]
    step_s = args.step_ms / 1000

    def engine() -> StubEngine:
        return StubEngine(model, tok, max_batch_size=args.clients, kv_cache_tokens=64 * args.clients,
                          texts=texts, step_s=step_s, host_s=args.host_ms / 1000,
                          host_ops=args.host_ops)

    rows = []
    tag = f"-{args.tag}" if args.tag else ""

    def row(phase: str, rep: dict, peer_ms: float | None, **extra) -> None:
        s = summarize(rep, reqs)
        ours = round(1000 * rep["wall_s"], 1)
        r = {"phase": f"{phase}{tag}.{args.clients}", "seqlen": None, "ours_ms": ours, "peer_ms": peer_ms,
             "speedup": None if peer_ms is None else round(peer_ms / ours, 3),
             "output_tokens": s["total_output_tokens"], "output_tok_s": round(s["output_throughput"], 1),
             "mean_ttft_ms": round(s["mean_ttft_ms"], 2), "mean_tbt_ms": round(s["mean_tpot_ms"], 3),
             "text_chunks": sum(x["text_chunks"] for x in rep["results"]), "short_outputs": s["short_outputs"],
             "failed": s["failed"], **extra}
        rows.append(r)
        print(r, flush=True)

    eng = engine()
    try:
        asyncio.run(inproc_clients(eng, warm))
        m = asyncio.run(inproc_clients(eng, reqs))
    finally:
        eng.shutdown()
    row("inproc", m, None)
    base = round(1000 * m["wall_s"], 1)
    for lib in args.clients_lib:
        eng = engine()
        try:
            srv = HTTPServer(create_app(eng, "stub"), loop=args.loop, http=args.http)
            try:
                cpu = time.process_time()
                rep = run_clients(srv.url, "stub", reqs, warmup=warm, client=lib, processes=args.client_processes)
                cpu = time.process_time() - cpu  # the server process (engine thread included), warm-up too
            finally:
                srv.stop()
        finally:
            eng.shutdown()
        row(f"http-{lib}", rep, base, client=rep["client"], client_processes=rep["processes"],
            client_cpu_s=round(rep["client_cpu_s"], 2), server_cpu_s=round(cpu, 2), loop=args.loop, http=args.http)

    ideal = max(r.max_tokens for r in reqs) * (step_s + args.host_ms / 1000)
    print(f"\n{args.clients} clients, stand-in step {args.step_ms} ms + {args.host_ms} ms host + {args.host_ops} "
          f"torch calls (all tokens in {ideal:.2f} s at best); uvicorn loop={args.loop} http={args.http}")
    print(f"{'phase':28s} {'seconds':>8s} {'tok/s':>9s} {'x inproc':>9s} {'TTFT ms':>8s} {'TBT ms':>7s} {'chunks':>7s} "
          f"{'client cpu s':>12s} {'server cpu s':>12s}")
    for r in rows:
        sp = "" if r["speedup"] is None else f"{r['speedup']:.2f}"
        print(f"{r['phase']:28s} {r['ours_ms'] / 1000:8.2f} {r['output_tok_s']:9.0f} {sp:>9s} "
              f"{r['mean_ttft_ms']:8.1f} {r['mean_tbt_ms']:7.2f} {r['text_chunks']:7d} "
              f"{r.get('client_cpu_s', ''):>12} {r.get('server_cpu_s', ''):>12}")
    write_rows("http_overhead", f"{platform.processor() or platform.machine()} CPU ({os.cpu_count()} cores)", rows,
               args.out, step_ms=args.step_ms, host_ms=args.host_ms, host_ops=args.host_ops,
               switch_interval_ms=args.switch_interval_ms, clients=args.clients)


if __name__ == "__main__":
    threading.current_thread().name = "main"
    main()
