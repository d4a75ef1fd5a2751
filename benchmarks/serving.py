"""Throughput of the serving engine with many requests (random µP weights of a preset, bf16, one GPU).

    python benchmarks/serving.py --config minicpm4-0.5b

Three rows, measured in one run:
- `decode.batch1`: one request (512-token prompt, 256 outputs) alone: output tokens/s at batch 1;
- `offline.256`: nano-vllm's benchmark (bench.py): 256 requests, prompts and outputs of 100-1024 tokens drawn
  with seed 0, temperature 0.6, ignore_eos, all submitted at once to `LLMEngine` (paged KV cache sized by
  gpu_memory_utilization, continuous batching, decode steps from CUDA graphs); output tokens/s over the wall
  time including prefill, as nano-vllm counts it;
- `server.64`: the server's engine (`AsyncEngine`, the worker thread behind `cpm4 serve`) with 64 clients
  streaming at once (prompts 100-1024, outputs 64-512): output tokens/s, mean time to first token and mean
  time between tokens.
`speedup` is each row's output tokens/s over the batch-1 rate (TARGETS.md: >= 20x for offline.256).
Prints a table and writes benchmarks/results/serving-<config>-<date>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import random
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from common import write_json  # noqa: E402

from cpm4.engine.paged import PagedKVCache, kv_budget_bytes, page_size_for  # noqa: E402
from cpm4.engine.sampling import SamplingParams  # noqa: E402
from cpm4.engine.scheduler import LLMEngine  # noqa: E402
from cpm4.model.config import preset  # noqa: E402
from cpm4.model.init import random_model  # noqa: E402
from cpm4.model.tokenizer import build_tokenizer  # noqa: E402
from cpm4.serve.engine import AsyncEngine  # noqa: E402


def run_engine(eng: LLMEngine, reqs: list[tuple[list[int], SamplingParams]]) -> tuple[float, int]:
    """Submit all requests, step until done: (seconds, output tokens)."""
    torch.cuda.synchronize()
    t = time.perf_counter()
    for i, (p, sp) in enumerate(reqs):
        eng.add_request(f"r{time.monotonic_ns()}-{i}", p, sp)
    n = 0
    while eng.has_work():
        for _, d in eng.step():
            n += len(d.token_ids)
    torch.cuda.synchronize()
    return time.perf_counter() - t, n


async def run_clients(engine: AsyncEngine, reqs: list[tuple[list[int], SamplingParams]]) -> dict:
    async def one(i, p, sp):
        t0 = time.perf_counter()
        first, n = None, 0
        async for d in engine.stream(p, sp, f"c{i}"):
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="minicpm4-0.5b")
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--chunk-tokens", type=int, default=8192, help="prefill tokens per scheduler step")
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    ap.add_argument("--compile", action="store_true", help="torch.compile the decode step (CUDA graphs)")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    dev = torch.device("cuda")
    cfg = preset(args.config)
    cfg.max_position_embeddings = min(cfg.max_position_embeddings, 4096)  # nano-vllm: max_model_len 4096
    model = random_model(cfg, dev, torch.bfloat16)
    tok = build_tokenizer(1024)  # ids beyond its vocabulary detokenize to nothing: fine for a benchmark
    ps = page_size_for(cfg)
    budget = kv_budget_bytes(model, args.gpu_memory_utilization, args.chunk_tokens)
    cache = PagedKVCache.from_budget(cfg, budget, ps, dev, torch.bfloat16)
    print(f"KV cache: {cache.num_pages} pages of {ps} tokens ({budget / 2**30:.1f} GiB)", flush=True)
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
    eng1 = LLMEngine(model, tok, cache, max_batch_size=1, chunk_tokens=args.chunk_tokens, compile=args.compile)
    rnd = random.Random(1)
    p1 = [rnd.randint(0, 10000) for _ in range(512)]
    run_engine(eng1, [(p1[:64], SamplingParams(temperature=0.6, max_tokens=8, ignore_eos=True))])  # warm-up
    eng1.add_request("b1", p1, SamplingParams(temperature=0.6, max_tokens=1, ignore_eos=True))
    eng1.run_to_completion()  # prefill alone, then time decode steps only
    t, n = run_engine(eng1, [(p1, SamplingParams(temperature=0.6, max_tokens=257, ignore_eos=True))])
    t1, _ = run_engine(eng1, [(p1, SamplingParams(temperature=0.6, max_tokens=1, ignore_eos=True))])
    base = row("decode.batch1", t - t1, n - 1, seqlen_note="512-token prompt, 256 decode steps (prefill subtracted)")
    del eng1

    # nano-vllm's bench.py workload.
    rnd = random.Random(0)
    reqs = [[rnd.randint(0, 10000) for _ in range(rnd.randint(100, 1024))] for _ in range(args.requests)]
    params = [SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=rnd.randint(100, 1024))
              for _ in range(args.requests)]
    eng = LLMEngine(model, tok, cache, max_batch_size=args.requests, chunk_tokens=args.chunk_tokens,
                    compile=args.compile)
    run_engine(eng, [(r[:32], SamplingParams(max_tokens=4, ignore_eos=True)) for r in reqs])  # warm-up, graphs
    t, n = run_engine(eng, list(zip(reqs, params)))
    row(f"offline.{args.requests}", t, n, base, preempted=eng.num_preempted,
        note="nano-vllm bench.py workload; published: vLLM 1361.84 tok/s, nano-vllm 1434.13 tok/s "
             "(Qwen3-0.6B, RTX 4070 Laptop)")
    del eng
    del cache
    torch.cuda.empty_cache()

    # The server's engine with concurrent streaming clients.
    rnd = random.Random(2)
    creqs = [([rnd.randint(0, 10000) for _ in range(rnd.randint(100, 1024))],
              SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=rnd.randint(64, 512)))
             for _ in range(args.clients)]
    aeng = AsyncEngine(model, tok, max_batch_size=args.clients, chunk_tokens=args.chunk_tokens,
                       gpu_memory_utilization=args.gpu_memory_utilization, compile=args.compile)
    try:
        asyncio.run(run_clients(aeng, [(r[:32], SamplingParams(max_tokens=4, ignore_eos=True)) for r, _ in creqs]))
        m = asyncio.run(run_clients(aeng, creqs))
    finally:
        aeng.shutdown()
    row(f"server.{args.clients}", m["wall_s"], m["tokens"], base, mean_ttft_ms=round(m["ttft_ms"], 1),
        mean_tbt_ms=round(m["tbt_ms"], 2))

    name = torch.cuda.get_device_name(dev)
    print(f"\n{args.config} (random weights, bf16), {name}")
    print(f"{'phase':16s} {'seconds':>8s} {'out tokens':>11s} {'out tok/s':>10s} {'x batch-1':>10s}")
    for r in rows:
        sp = "" if r["speedup"] is None else f"{r['speedup']:9.1f}x"
        print(f"{r['phase']:16s} {r['ours_ms'] / 1000:8.2f} {r['output_tokens']:11d} {r['output_tok_s']:10.1f} "
              f"{sp:>10s}")
    date = datetime.date.today().isoformat()
    fname = f"serving-{args.config}-{date}.json"
    doc = {"device": name, "date": date, "config": args.config, "rows": rows}
    write_json(doc, fname, args.out)


if __name__ == "__main__":
    main()
