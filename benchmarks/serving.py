"""Throughput of the serving engine with many requests (random µP weights of a preset, bf16, one GPU).

    python benchmarks/serving.py --config minicpm4-0.5b [--http]
    python benchmarks/serving.py --config tiny --device cpu --http --requests 16 --clients 8   # float32, CPU

The rows, measured in one run:
- `decode.batch1`: one request (512-token prompt, 256 outputs) alone: output tokens/s at batch 1;
- `offline.256`: nano-vllm's benchmark (bench.py): 256 requests, prompts and outputs of 100-1024 tokens drawn
  with seed 0, temperature 0.6, ignore_eos, all submitted at once to `LLMEngine` (paged KV cache sized by
  gpu_memory_utilization, continuous batching, decode steps from CUDA graphs, every graph bucket captured
  before timing, text detokenized at each request's end as in `LLM.generate`); output tokens/s over the wall
  time including prefill, as nano-vllm counts it;
- `server.64`: the server's engine (`AsyncEngine`, the worker thread behind `cpm4 serve`) with 64 clients
  streaming at once (prompts 100-1024, outputs 64-512): output tokens/s, mean time to first token and mean
  time between tokens;
- `http.64` (with --http): the same 64-client workload end to end through the OpenAI-compatible server: the
  FastAPI app (`cpm4.serve.create_app`) over a new `AsyncEngine`, under uvicorn on 127.0.0.1, driven by
  `openai.AsyncOpenAI` (--http-client httpx: httpx) from --client-processes other processes (streaming
  /v1/completions, token-id prompts, ignore_eos, usage in the last chunk): output tokens/s, mean time to the
  first text and mean time between tokens; `client_cpu_s` near the row's time means the clients set its pace
  (one openai client process parses ~6,000 chunks/s on the H200 host: too few for 64 streams). Its
  engine's tokenizer has an entry for every model id, so (nearly) each token is streamed as its own event
  with text, as with a real tokenizer (the other rows' 1024-id tokenizer gives most ids no text).
  Needs fastapi, uvicorn and openai (`pip install --no-index --find-links .wheels/py312 fastapi uvicorn
  openai` where they are not installed).
With --trace the offline workload runs once more (prompt ids shifted: no prefix hits), synchronized after every
step, and the wall time is split into prefill steps and decode-only steps by batch size (printed, and kept in the
offline row's JSON as `trace`). `--skip offline` / `--skip server` leave those rows out (one device call
cannot hold all of them with compile). The offline row also records what ran inside its timed run besides
the workload (`during_run`: Triton and dynamo compiles, garbage-collector pauses, cudaMalloc/cudaFree and
allocation retries) and its steps that took over 100 ms on the host, with the prefill shapes they ran.
`speedup` is each row's output tokens/s over the batch-1 rate (TARGETS.md: >= 20x for offline.256).
Prints a table and writes benchmarks/results/serving-<config>-<date>.json (serving-<config>-cpu-<date>.json
on CPU). Off CUDA the KV cache is sized in tokens (--kv-cache-tokens; default: `host_kv_cache_tokens`).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import gc
import json
import os
import platform
import random
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from common import RunWatch, covering_tokenizer, parse_engine_args, write_json  # noqa: E402

from cpm4.engine.generate import finish_texts  # noqa: E402
from cpm4.engine.paged import PagedKVCache, kv_budget_bytes, page_size_for  # noqa: E402
from cpm4.engine.sampling import SamplingParams  # noqa: E402
from cpm4.engine.scheduler import LLMEngine, host_kv_cache_tokens  # noqa: E402
from cpm4.model.config import preset  # noqa: E402
from cpm4.model.init import random_model  # noqa: E402
from cpm4.serve import default_cpu_threads, default_engine_process  # noqa: E402
from cpm4.serve.engine import AsyncEngine  # noqa: E402


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return f"CPU ({cpu}, {torch.get_num_threads()} threads)"


def run_engine(eng: LLMEngine, reqs: list[tuple[list[int], SamplingParams]],
               slow: list[dict] | None = None, steps_ms: dict[str, list[float]] | None = None) -> tuple[float, int]:
    """Submit all requests, step until done: (seconds, output tokens). `slow` collects the steps that took
    over 100 ms on the host (no sync added: compiles and stalls show, GPU time may not): their host ms, step
    number and the shapes of the prefill forwards they ran. `steps_ms` (with `slow`) gets every step's host ms
    under "prefill" (it ran a multi-token forward) or "decode" (`step_summary`)."""
    dev = eng.model.device
    shapes: list[tuple[int, int, int]] = []
    rows = [0]  # decode rows of the current step
    if slow is not None:
        forward, forward_decode = eng._forward, eng._forward_decode

        def probe(group):  # (rows, padded length, real tokens) of each multi-token forward
            if any(k > 1 for _, k in group):
                shapes.append((len(group), max(k for _, k in group), sum(k for _, k in group)))
            return forward(group)

        def probe_decode(seqs, ids):
            rows[0] += len(seqs)
            return forward_decode(seqs, ids)

        eng._forward, eng._forward_decode = probe, probe_decode
    try:
        sync(dev)
        t = time.perf_counter()
        states = []
        for i, (p, sp) in enumerate(reqs):
            rid = f"r{time.monotonic_ns()}-{i}"
            states.append(eng.add_request(rid, p, sp))
        n = steps = 0
        after = False  # the step after a prefill step (its host waits for that step's GPU work)
        last = 0  # the previous decode step's rows
        while eng.has_work():
            t0 = time.perf_counter()
            for _, d in eng.step():
                n += len(d.token_ids)
            ms = (time.perf_counter() - t0) * 1000
            if slow is not None and ms > 100:
                slow.append({"ms": round(ms, 1), "step": steps, "prefill_forwards": list(shapes)})
            if steps_ms is not None:
                kind = "prefill" if shapes else "decode"
                steps_ms.setdefault(kind, []).append(ms)
                if not shapes:  # decode steps again: right after a prefill step, with other rows than the
                    # step before (a request ended), or by their rows
                    key = ("decode after prefill" if after else "decode rows changed" if rows[0] != last
                           else "decode " + rows_bucket(rows[0]))
                    steps_ms.setdefault(key, []).append(ms)
                    last = rows[0]
                after = bool(shapes)
            shapes.clear()
            rows[0] = 0
            steps += 1
        finish_texts(states)  # the texts the engine left to its caller (`LLMEngine(detokenize=False)`)
        sync(dev)
        return time.perf_counter() - t, n
    finally:
        if slow is not None:
            del eng._forward, eng._forward_decode


def rows_bucket(b: int) -> str:
    """A decode step's rows as the trace's groups: "<=001", "<=008", ... "<=256"."""
    return "<=" + next(f"{k:03d}" for k in (1, 8, 32, 64, 128, 192, 256, 10**9) if b <= k)


def step_summary(steps_ms: dict[str, list[float]]) -> dict[str, dict]:
    """Per kind of step: count, total seconds and host ms at the 10th, 50th and 90th percentiles. A run slower
    throughout (every decode step longer) tells itself apart from one with a few stalls (`slow_host_steps`)."""
    out = {}
    for kind, ms in sorted(steps_ms.items()):
        q = sorted(ms)
        out[kind] = {"steps": len(q), "total_s": round(sum(q) / 1000, 3),
                     **{f"p{p}_ms": round(q[min(len(q) - 1, len(q) * p // 100)], 3) for p in (10, 50, 90)},
                     "max_ms": round(q[-1], 3)}
    return out


def traced_run(eng: LLMEngine, reqs: list[tuple[list[int], SamplingParams]]) -> dict:
    """Run the workload again, synchronizing after every step, and say where the wall time went: steps that
    prefill (with the decode rows beside them) against decode-only steps by batch size."""
    dev = eng.model.device
    cur = {"prefill_tokens": 0, "prefill_rows": 0, "decode_rows": 0}
    forward, forward_decode = eng._forward, eng._forward_decode

    def traced_forward(group):
        if any(n > 1 for _, n in group):
            cur["prefill_tokens"] += sum(n for _, n in group)
            cur["prefill_rows"] += len(group)
        return forward(group)

    def traced_decode(seqs, ids):
        cur["decode_rows"] += len(seqs)
        return forward_decode(seqs, ids)

    eng._forward, eng._forward_decode = traced_forward, traced_decode
    try:
        for i, (p, sp) in enumerate(reqs):
            eng.add_request(f"t{time.monotonic_ns()}-{i}", p, sp)
        steps = []
        while eng.has_work():
            sync(dev)
            t = time.perf_counter()
            eng.step()
            sync(dev)
            steps.append(((time.perf_counter() - t) * 1000, dict(cur)))
            cur.update(prefill_tokens=0, prefill_rows=0, decode_rows=0)
    finally:
        del eng._forward, eng._forward_decode
    groups: dict[str, list[float]] = {}
    for ms, c in steps:
        if c["prefill_tokens"]:
            key = "prefill"
        else:
            b = c["decode_rows"]
            key = "decode " + rows_bucket(b)
        groups.setdefault(key, []).append(ms)
    pre = [c for _, c in steps if c["prefill_tokens"]]
    out = {"steps": len(steps), "total_ms": round(sum(ms for ms, _ in steps), 1),
           "prefill_tokens": sum(c["prefill_tokens"] for c in pre),
           "decode_rows_in_prefill_steps": sum(c["decode_rows"] for c in pre),
           "groups": {k: {"steps": len(v), "total_ms": round(sum(v), 1), "mean_ms": round(sum(v) / len(v), 3)}
                      for k, v in sorted(groups.items(), key=lambda kv: (kv[0] != "prefill", kv[0]))}}
    print(f"step trace: {out['steps']} steps, {out['total_ms']:.0f} ms; prefill steps carried "
          f"{out['prefill_tokens']} prompt tokens and {out['decode_rows_in_prefill_steps']} decode rows")
    for k, g in out["groups"].items():
        print(f"  {k:14s} {g['steps']:6d} steps {g['total_ms']:10.1f} ms  mean {g['mean_ms']:8.3f} ms")
    return out


async def run_clients(engine: AsyncEngine, reqs: list[tuple[list[int], SamplingParams]],
                      stream_text: bool = True) -> dict:
    """stream_text=False: the clients read the text at the end only (responses that are not streamed)."""
    async def one(i, p, sp):
        t0 = time.perf_counter()
        first, n = None, 0
        async for d in engine.stream(p, sp, f"c{i}-{stream_text}", stream_text=stream_text):
            if d.token_ids and first is None:
                first = time.perf_counter() - t0
            n += len(d.token_ids)
        total = time.perf_counter() - t0
        return first, n, total

    t = time.perf_counter()
    res = await asyncio.gather(*(one(i, p, sp) for i, (p, sp) in enumerate(reqs)))
    wall = time.perf_counter() - t
    toks = sum(r[1] for r in res)
    return {"wall_s": wall, "tokens": toks, "ttft_ms": 1000 * sum(r[0] for r in res) / len(res),
            "tbt_ms": 1000 * sum((r[2] - r[0]) / max(r[1] - 1, 1) for r in res) / len(res)}


def median_run(runs: list[dict]) -> dict:
    """The run of median throughput (the lower middle one of an even count)."""
    return sorted(runs, key=lambda r: r["tokens"] / r["wall_s"])[(len(runs) - 1) // 2]


def http_row(args, model, tok, creqs, dev) -> dict:
    """The `http.<clients>` measurement: server up, clients in a child process, server and engine down."""
    from serving_http import BenchRequest, HTTPServer, run_clients, summarize

    from cpm4.serve import create_app

    options = dict(max_batch_size=args.clients, chunk_tokens=args.chunk_tokens, kv_cache_tokens=args.kv_cache_tokens,
                   gpu_memory_utilization=args.gpu_memory_utilization if dev.type == "cuda" else None,
                   compile=args.compile, async_output=args.async_output, cpu_threads=args.cpu_threads)
    tmp = None
    if args.engine_process:  # the child loads the same weights from a checkpoint folder
        import tempfile

        from cpm4.model.checkpoint import save_checkpoint
        from cpm4.serve import ProcessEngine

        tmp = tempfile.TemporaryDirectory(prefix="cpm4-serving-")
        save_checkpoint(model, model.config, f"{tmp.name}/model", tokenizer=tok, overwrite=True)
        aeng = ProcessEngine(f"{tmp.name}/model", device=str(dev), dtype=str(model.dtype).removeprefix("torch."),
                             api_detokenize=args.api_detokenize, **options)
    else:
        aeng = AsyncEngine(model, tok, **options)
    try:
        srv = HTTPServer(create_app(aeng, args.config))
        try:
            cpu = time.process_time()
            rep = run_clients(srv.url, args.config, [BenchRequest(r, sp.max_tokens) for r, sp in creqs],
                              warmup=[BenchRequest(r[:32], 4) for r, _ in creqs], temperature=0.6,
                              client=args.http_client, processes=args.client_processes)
            cpu = time.process_time() - cpu  # this process (uvicorn, the app, the engine thread), warm-up too
        finally:
            srv.stop()
    finally:
        aeng.shutdown()
        if tmp is not None:
            tmp.cleanup()
    res = rep["results"]
    failed = [r["error"] for r in res if r["error"]]
    if failed:
        raise RuntimeError(f"{len(failed)} of the http row's requests failed, e.g. {failed[0]}")
    s = summarize(rep, [BenchRequest(r, sp.max_tokens) for r, sp in creqs])
    return {"wall_s": rep["wall_s"], "tokens": s["total_output_tokens"], "ttft_ms": s["mean_ttft_ms"],
            "tbt_ms": s["mean_tpot_ms"], "short": s["short_outputs"],
            "usage_missing": sum(r["usage_tokens"] is None for r in res),
            "text_chunks": sum(r["text_chunks"] for r in res), "client": rep["client"],
            "client_cpu_s": round(rep["client_cpu_s"], 2), "server_cpu_s": round(cpu, 2),
            "client_processes": rep["processes"]}


def system_prompt(args, hi: int, i: int = 0) -> list[int]:
    """--system-prompt's shared tokens of request i: system prompt i mod --system-prompts (the same every call)."""
    rnd = random.Random(7 + i % args.system_prompts)
    return [rnd.randint(0, hi) for _ in range(args.system_prompt)]


def sys_tag(args) -> str:
    many = f"x{args.system_prompts}" if args.system_prompts > 1 else ""
    return f".sys{args.system_prompt}{many}" if args.system_prompt else ""


def offline_rows(args, model, tok, cache: PagedKVCache, hi: int, base: float, row, rows: list[dict]) -> None:
    """The `offline.<requests>` row: nano-vllm's bench.py workload through one `LLMEngine` (and, with --trace,
    the same workload again with a sync after every step)."""
    rnd = random.Random(0)
    reqs = [[rnd.randint(0, hi) for _ in range(rnd.randint(100, 1024))] for _ in range(args.requests)]
    reqs = [system_prompt(args, hi, i) + r for i, r in enumerate(reqs)]
    params = [SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=rnd.randint(100, 1024))
              for _ in range(args.requests)]
    # stream_text=False, detokenize=False: an offline batch reads its text at the end, as `LLM.generate` does
    # (`run_engine` decodes the ended requests' texts together after the run, inside the timed span).
    eng = LLMEngine(model, tok, cache, max_batch_size=args.requests, chunk_tokens=args.chunk_tokens,
                    compile=args.compile, async_output=args.async_output, stream_text=False,
                    cascade_decode=args.cascade_decode, detokenize=args.detokenize_in_steps)
    eng.warm_up()  # every decode graph bucket captured (and compiled) before timing
    run_engine(eng, [(r[:32], SamplingParams(max_tokens=4, ignore_eos=True)) for r in reqs])  # warm-up, kernels
    runs = []
    for i in range(args.repeat):
        # Repeats after the first: other prompts (ids shifted by i), so none is served from the prefix cache.
        shifted = [[(t + i) % (hi + 1) for t in r] for r in reqs]
        slow: list[dict] = []
        steps_ms: dict[str, list[float]] = {}
        with RunWatch() as watch:
            t, n = run_engine(eng, list(zip(shifted, params)), slow, steps_ms)
        runs.append({"seconds": t, "tokens": n, "output_tok_s": round(n / t, 1), "during_run": watch.summary(),
                     "slow_host_steps": slow, "steps": step_summary(steps_ms)})
        print(f"timed run {i + 1}: {n / t:.1f} tok/s; {watch.summary()}; host steps over 100 ms: {slow}; "
              f"steps: {runs[-1]['steps']}", flush=True)
    mid = sorted(runs, key=lambda r: r["seconds"])[(len(runs) - 1) // 2]  # the median run (of two, the faster)
    extra = {k: mid[k] for k in ("during_run", "slow_host_steps", "steps")}
    if len(runs) > 1:
        extra["repeats"] = [{k: v for k, v in r.items() if k not in ("seconds", "tokens")} for r in runs]
    row(f"offline.{args.requests}{sys_tag(args)}", mid["seconds"], mid["tokens"], base, preempted=eng.num_preempted,
        **extra,
        note="nano-vllm bench.py workload; published: vLLM 1361.84 tok/s, nano-vllm 1434.13 tok/s "
             "(Qwen3-0.6B, RTX 4070 Laptop)" + (f"; the median of {len(runs)} runs" if len(runs) > 1 else ""))
    if args.trace:
        # Other prompts (ids shifted past the timed runs'): their pages are in the prefix cache.
        rows[-1]["trace"] = traced_run(eng, [([(t + args.repeat) % (hi + 1) for t in r], sp)
                                             for r, sp in zip(reqs, params)])
    if args.profile_slow is not None:
        profile_slow_steps(eng, [([(t + args.repeat + 1) % (hi + 1) for t in r], sp) for r, sp in zip(reqs, params)],
                           args.profile_slow)


def profile_slow_steps(eng: LLMEngine, reqs: list[tuple[list[int], SamplingParams]], ms: float) -> None:
    """Run the workload once more with every step under its own cProfile, and print the Python functions of
    the steps that took over `ms` on the host (no sync added) beside those of all the steps: where the slow
    steps' extra time goes."""
    import cProfile
    import pstats

    for i, (p, sp) in enumerate(reqs):
        eng.add_request(f"s{time.monotonic_ns()}-{i}", p, sp)
    slow, every, n_slow, times = None, None, 0, []
    while eng.has_work():
        cp = cProfile.Profile()
        t0 = time.perf_counter()
        cp.enable()
        eng.step()
        cp.disable()
        times.append((time.perf_counter() - t0) * 1000)
        st = pstats.Stats(cp)
        every = st if every is None else every.add(cp)
        if times[-1] > ms:
            n_slow += 1
            slow = pstats.Stats(cp) if slow is None else slow.add(cp)
    q = sorted(times)
    print(f"profiled run: {len(q)} steps, p50 {q[len(q) // 2]:.2f} ms, {n_slow} over {ms} ms")
    if slow is not None:
        print(f"--- the {n_slow} steps over {ms} ms, by total time in the function ---")
        slow.sort_stats("tottime").print_stats(25)
    print("--- every step, by total time in the function ---")
    every.sort_stats("tottime").print_stats(25)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="minicpm4-0.5b")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="cuda (bf16, KV cache from --gpu-memory-utilization) or cpu (float32, --kv-cache-tokens)")
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=1,
                    help="timed runs of the offline workload in this process (other prompt ids each): the row is "
                         "the median run, `repeats` lists each (the spread between runs of one process)")
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--chunk-tokens", type=int, default=8192, help="prefill tokens per scheduler step")
    ap.add_argument("--detokenize-in-steps", action="store_true",
                    help="offline row: each ended request's text decoded inside the step loop, one at a time (as "
                         "before LLM.generate left it to one batch after the run)")
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    ap.add_argument("--kv-cache-tokens", type=int, default=None,
                    help="KV cache size in tokens of each engine (default: on CUDA from --gpu-memory-utilization, "
                         "elsewhere host_kv_cache_tokens for its batch size)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the decode step (CUDA graphs)")
    ap.add_argument("--async-output", action=argparse.BooleanOptionalAction, default=None,
                    help="launch each decode step before reading back the previous one's tokens")
    ap.add_argument("--http", action="store_true",
                    help="also the http.<clients> row: the OpenAI-compatible server end to end (needs fastapi, "
                         "uvicorn, openai)")
    ap.add_argument("--http-client", default="openai", choices=["openai", "httpx"],
                    help="the http row's client: the official openai one, or httpx reading the events itself")
    ap.add_argument("--client-processes", type=int, default=None,
                    help="processes the http row's clients are spread over (default: half the cores, at most 8; "
                         "one Python process cannot parse 64 streams' chunks as fast as the server sends them)")
    ap.add_argument("--engine-process", action=argparse.BooleanOptionalAction, default=None,
                    help="the http row's engine in a child process (ProcessEngine; default as `cpm4 serve`'s: "
                    "on CUDA)")
    ap.add_argument("--api-detokenize", action=argparse.BooleanOptionalAction, default=True,
                    help="with --engine-process: the server's process decodes the text of requests without stop "
                         "strings from their ids (ProcessEngine's api_detokenize, the default); --no-api-detokenize: "
                         "the engine process does, every running request every step")
    ap.add_argument("--switch-interval-ms", type=float, default=None,
                    help="sys.setswitchinterval for this process (Python's default 5 ms): how long the engine "
                    "thread may wait for the GIL while the HTTP loop runs Python")
    ap.add_argument("--profile-slow", type=float, default=None, metavar="MS",
                    help="after the offline row, run its workload once more under cProfile, step by step, and "
                         "print where the steps over MS host ms spent their time")
    ap.add_argument("--text-at-end", type=int, nargs="?", const=1, default=0, metavar="ROUNDS",
                    help="also the server row with clients that read their text at the end (a response that is "
                         "not streamed: the engine decodes it once), alternating with the streamed clients for "
                         "ROUNDS rounds (default 1); the rows give each kind's median")
    ap.add_argument("--trace", action="store_true",
                    help="after the offline row, run its workload again with a sync after every step and print "
                         "where the time went (prefill steps, decode steps by batch size)")
    ap.add_argument("--cpu-threads", type=int, default=None,
                    help="torch threads of the server engines' worker thread (AsyncEngine cpu_threads; default: "
                    "cpm4 serve's, all cores but one on the CPU)")
    ap.add_argument("--system-prompt", type=int, default=0,
                    help="tokens of one shared prefix before every offline and server request's own prompt (a system "
                    "prompt: prefix caching, cascade attention); their rows are named <row>.sys<N>")
    ap.add_argument("--system-prompts", type=int, default=1,
                    help="distinct system prompts of --system-prompt tokens, request i after prompt i mod this many "
                    "(rows <row>.sys<N>x<this>)")
    ap.add_argument("--cascade-decode", action=argparse.BooleanOptionalAction, default=None,
                    help="decode steps attend the rows' shared prefix pages once (paged.CASCADE_DECODE; default: "
                    "on, where a group saves enough reads)")
    ap.add_argument("--tag", default="", help="appended to the JSON name")
    ap.add_argument("--skip", action="append", default=[], choices=["offline", "server"],
                    help="leave out the offline.<requests> or the server.<clients> row (repeatable)")
    ap.add_argument("--out", default="benchmarks/results")
    args = parse_engine_args(ap)
    dev = torch.device(args.device)
    if args.system_prompt < 0:
        ap.error(f"--system-prompt must be >= 0 tokens, got {args.system_prompt}")
    if args.system_prompts < 1:
        ap.error(f"--system-prompts must be >= 1, got {args.system_prompts}")
    if args.repeat < 1:
        ap.error(f"--repeat must be >= 1, got {args.repeat}")
    if args.cascade_decode is not None:  # the server row's engine too (its own default: on)
        from cpm4.engine import paged

        paged.CASCADE_DECODE = args.cascade_decode
    if dev.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda, but CUDA is not available (use --device cpu)")
    if args.http:
        from serving_http import missing_modules

        missing = missing_modules()
        if missing:
            ap.error(f"--http needs {', '.join(missing)} (not importable): pip install fastapi uvicorn openai, "
                     "or offline: pip install --no-index --find-links .wheels/py312 fastapi uvicorn openai")
    if args.cpu_threads is None:
        args.cpu_threads = default_cpu_threads(dev)
    if args.switch_interval_ms is not None:
        sys.setswitchinterval(args.switch_interval_ms / 1000)
    if args.http and args.client_processes is None:
        from serving_http import default_client_processes

        args.client_processes = default_client_processes()
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    cfg = preset(args.config)
    cfg.max_position_embeddings = min(cfg.max_position_embeddings, 4096)  # nano-vllm: max_model_len 4096
    model = random_model(cfg, dev, dtype)
    tok = covering_tokenizer(cfg.vocab_size)  # every sampled id decodes to text, as with a real tokenizer
    hi = min(10000, cfg.vocab_size - 1)  # prompt token ids are drawn from [0, hi]
    ps = page_size_for(cfg)
    if args.kv_cache_tokens is not None:
        cache = PagedKVCache(cfg, -(-args.kv_cache_tokens // ps), ps, dev, dtype)
    elif dev.type == "cuda":
        cache = PagedKVCache.from_budget(cfg, kv_budget_bytes(model, args.gpu_memory_utilization, args.chunk_tokens),
                                         ps, dev, dtype)
    else:
        cache = PagedKVCache(cfg, -(-host_kv_cache_tokens(model, args.requests) // ps), ps, dev, dtype)
    size = (cache.num_pages + 1) * PagedKVCache.bytes_per_page(cfg, ps, dtype)
    print(f"KV cache: {cache.num_pages} pages of {ps} tokens ({size / 2**30:.1f} GiB)", flush=True)
    rows = []

    def row(phase, seconds, tokens, base=None, **extra):
        r = {"phase": phase, "seqlen": None, "ours_ms": round(seconds * 1000, 1), "peer_ms": None,
             "speedup": None if base is None else round(tokens / seconds / base, 2), "output_tokens": tokens,
             "output_tok_s": round(tokens / seconds, 1)}
        r.update(extra)
        rows.append(r)
        print(json.dumps(r), flush=True)
        return tokens / seconds

    # Batch 1.
    eng1 = LLMEngine(model, tok, cache, max_batch_size=1, chunk_tokens=args.chunk_tokens, compile=args.compile,
                     async_output=args.async_output)
    eng1.warm_up()
    rnd = random.Random(1)
    p1 = [rnd.randint(0, hi) for _ in range(512)]
    run_engine(eng1, [(p1[:64], SamplingParams(temperature=0.6, max_tokens=8, ignore_eos=True))])  # warm-up
    eng1.add_request("b1", p1, SamplingParams(temperature=0.6, max_tokens=1, ignore_eos=True))
    eng1.run_to_completion()  # prefill alone, then time decode steps only
    t, n = run_engine(eng1, [(p1, SamplingParams(temperature=0.6, max_tokens=257, ignore_eos=True))])
    t1, _ = run_engine(eng1, [(p1, SamplingParams(temperature=0.6, max_tokens=1, ignore_eos=True))])
    base = row("decode.batch1", t - t1, n - 1, seqlen_note="512-token prompt, 256 decode steps (prefill subtracted)")
    del eng1

    if "offline" not in args.skip:
        offline_rows(args, model, tok, cache, hi, base, row, rows)
    del cache
    if dev.type == "cuda":
        torch.cuda.empty_cache()

    rnd = random.Random(2)
    creqs = [(system_prompt(args, hi, i) + [rnd.randint(0, hi) for _ in range(rnd.randint(100, 1024))],
              SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=rnd.randint(64, 512)))
             for i in range(args.clients)]
    if "server" not in args.skip:
        # The server's engine with concurrent streaming clients.
        aeng = AsyncEngine(model, tok, max_batch_size=args.clients, chunk_tokens=args.chunk_tokens,
                           kv_cache_tokens=args.kv_cache_tokens,
                           gpu_memory_utilization=args.gpu_memory_utilization if dev.type == "cuda" else None,
                           compile=args.compile, async_output=args.async_output, cpu_threads=args.cpu_threads)
        try:
            asyncio.run(run_clients(aeng, [(r[:32], SamplingParams(max_tokens=4, ignore_eos=True)) for r, _ in creqs]))
            m = asyncio.run(run_clients(aeng, creqs))
            # Other prompts (ids shifted): none is served from the prefix cache.
            end = again = None
            ends, agains = [], []
            for k in range(args.text_at_end):  # alternating, so neither kind only runs first or last
                ends.append(asyncio.run(run_clients(
                    aeng, [([(t + 1 + 2 * k) % (hi + 1) for t in r], sp) for r, sp in creqs], stream_text=False)))
                agains.append(asyncio.run(run_clients(
                    aeng, [([(t + 2 + 2 * k) % (hi + 1) for t in r], sp) for r, sp in creqs])))
            if ends:
                end, again = median_run(ends), median_run(agains)
                print("server runs, tok/s: text at end " + " ".join(f"{r['tokens'] / r['wall_s']:.0f}" for r in ends)
                      + "; streamed again " + " ".join(f"{r['tokens'] / r['wall_s']:.0f}" for r in agains))
        finally:
            aeng.shutdown()
        row(f"server.{args.clients}{sys_tag(args)}", m["wall_s"], m["tokens"], base,
            mean_ttft_ms=round(m["ttft_ms"], 1), mean_tbt_ms=round(m["tbt_ms"], 2))
        if end is not None:
            row(f"server.{args.clients}{sys_tag(args)}.text_at_end", end["wall_s"], end["tokens"], base,
                mean_ttft_ms=round(end["ttft_ms"], 1), mean_tbt_ms=round(end["tbt_ms"], 2),
                runs_tok_s=[round(r["tokens"] / r["wall_s"], 1) for r in ends],
                note="the same clients reading their text at the end (responses not streamed), median run")
            row(f"server.{args.clients}{sys_tag(args)}.again", again["wall_s"], again["tokens"], base,
                mean_ttft_ms=round(again["ttft_ms"], 1), mean_tbt_ms=round(again["tbt_ms"], 2),
                runs_tok_s=[round(r["tokens"] / r["wall_s"], 1) for r in agains],
                note="the streamed clients again, each after a text_at_end run, median run")
        del aeng

    # The same clients through HTTP: uvicorn + the FastAPI app, the official openai client in another process.
    if args.http:
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        if args.engine_process is None:
            args.engine_process = default_engine_process(dev)
        m = http_row(args, model, tok, creqs, dev)
        name = "http" if args.http_client == "openai" else f"http-{args.http_client}"
        name += ("-proc" + ("" if args.api_detokenize else "-enginetext")) if args.engine_process else ""
        row(f"{name}.{args.clients}", m["wall_s"], m["tokens"], base, mean_ttft_ms=round(m["ttft_ms"], 1),
            mean_tbt_ms=round(m["tbt_ms"], 2), short_outputs=m["short"], usage_missing=m["usage_missing"],
            text_chunks=m["text_chunks"], switch_interval_ms=1000 * sys.getswitchinterval(),
            engine_process=args.engine_process, client_processes=m["client_processes"], client_cpu_s=m["client_cpu_s"],
            server_cpu_s=m["server_cpu_s"],
            note=f"server.{args.clients}'s requests through uvicorn + cpm4.serve.create_app on 127.0.0.1"
                 f"{' (engine in a child process)' if args.engine_process else ''}, "
                 f"{m['client']} streaming /v1/completions from {m['client_processes']} other processes; "
                 "tokens from usage; TTFT to the first text chunk")

    name = device_name(dev)
    dname = "bf16" if dtype == torch.bfloat16 else "fp32"
    print(f"\n{args.config} (random weights, {dname}), {name}")
    print(f"{'phase':16s} {'seconds':>8s} {'out tokens':>11s} {'out tok/s':>10s} {'x batch-1':>10s} "
          f"{'TTFT ms':>8s} {'TBT ms':>7s}")
    for r in rows:
        sp = "" if r["speedup"] is None else f"{r['speedup']:9.1f}x"
        ttft = f"{r['mean_ttft_ms']:8.1f}" if "mean_ttft_ms" in r else ""
        tbt = f"{r['mean_tbt_ms']:7.2f}" if "mean_tbt_ms" in r else ""
        print(f"{r['phase']:16s} {r['ours_ms'] / 1000:8.2f} {r['output_tokens']:11d} {r['output_tok_s']:10.1f} "
              f"{sp:>10s} {ttft:>8s} {tbt:>7s}")
    date = datetime.date.today().isoformat()
    fname = f"serving-{args.config}{'' if dev.type == 'cuda' else '-cpu'}{args.tag}-{date}.json"
    doc = {"device": name, "date": date, "config": args.config, "compile": args.compile,
           "compile_per_bucket": args.compile_per_bucket, "warm_order": args.warm_order,
           "pinned_inputs": args.pinned_inputs, "system_prompts": args.system_prompts,
           "cascade_groups": args.cascade_groups, "rows": rows}
    write_json(doc, fname, args.out)


if __name__ == "__main__":
    main()
