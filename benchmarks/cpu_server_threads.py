"""The server's engine on the CPU: torch threads on its worker thread. `cpm4 serve` on the CPU gives the engine
all cores but one (`AsyncEngine(cpu_threads=...)`); the peer is torch's default (every core), measured in the
same run on the bundled demo model.

    python benchmarks/cpu_server_threads.py [--streams 1 8]

Each row: N concurrent greedy streams of 300 tokens from `AsyncEngine.stream` (the path behind the HTTP
server, without HTTP), output tokens/s. Each measurement runs in a fresh process: torch's thread settings (MKL's
are process-wide) must not carry from one to the next. Prints a table, writes
benchmarks/results/cpu_server_threads-<date>.json (ours_ms / peer_ms: wall time of the streams).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from common import cpu_device, write_rows  # noqa: E402

from cpm4 import SamplingParams  # noqa: E402
from cpm4.model.checkpoint import load_checkpoint  # noqa: E402
from cpm4.model.tokenizer import Tokenizer  # noqa: E402
from cpm4.serve.engine import AsyncEngine  # noqa: E402


def run(model, tok, streams: int, cpu_threads: int | None, tokens: int) -> float:
    """Seconds for `streams` concurrent streams of `tokens` tokens (after one warm-up round)."""
    eng = AsyncEngine(model, tok, max_batch_size=streams, cpu_threads=cpu_threads)
    params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)

    async def one(rid: str) -> int:
        return sum([len(d.token_ids) async for d in eng.stream(tok.encode("Hello"), params, rid)])

    async def all_of(tag: str) -> int:
        return sum(await asyncio.gather(*[one(f"{tag}{i}") for i in range(streams)]))

    try:
        asyncio.run(all_of("w"))
        t = time.perf_counter()
        n = asyncio.run(all_of("r"))
        dt = time.perf_counter() - t
    finally:
        eng.shutdown()
    if n != streams * tokens:
        raise SystemExit(f"expected {streams * tokens} tokens, got {n}")
    return dt


def child(args: argparse.Namespace) -> None:
    model = load_checkpoint(args.model, dtype=torch.float32)
    tok = Tokenizer.from_dir(args.model)
    print(run(model, tok, args.child[0], args.child[1] or None, args.tokens))


def measure(args: argparse.Namespace, streams: int, threads: int | None) -> float:
    cmd = [sys.executable, __file__, "--model", args.model, "--tokens", str(args.tokens),
           "--child", str(streams), str(threads or 0)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return float(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="models/cpm4-demo")
    ap.add_argument("--streams", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--tokens", type=int, default=300)
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--child", type=int, nargs=2, default=None, help=argparse.SUPPRESS)  # streams, threads (0: default)
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    ours_threads = max(1, torch.get_num_threads() - 1)
    rows = []
    print(f"{'streams':>7s} {'threads':>7s} {'tok/s':>8s} {'default tok/s':>14s} {'speed-up':>9s}")
    for s in args.streams:
        ours = measure(args, s, ours_threads)
        peer = measure(args, s, None)
        n = s * args.tokens
        rows.append({"phase": f"server_engine.streams{s}", "seqlen": args.tokens, "ours_ms": round(ours * 1000, 1),
                     "peer_ms": round(peer * 1000, 1), "speedup": round(peer / ours, 2),
                     "cpu_threads": ours_threads, "default_threads": torch.get_num_threads()})
        print(f"{s:7d} {ours_threads:7d} {n / ours:8.1f} {n / peer:14.1f} {peer / ours:8.2f}x")
    write_rows("cpu_server_threads", cpu_device(), rows, args.out, model=args.model)


if __name__ == "__main__":
    main()
