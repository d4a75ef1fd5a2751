"""Offline batches in a KV cache too small to hold them all: preemptions and time against a cache that holds them.

Prompts of very different lengths (random ids, greedy, ignore_eos) through `LLM.generate` with `kv_cache_tokens`
set to several sizes; peer: the same batch in a cache that holds every sequence at once (no preemption). Outputs
must equal the peer's. Rows: phase `offline.kv<tokens>`, seqlen = the longest prompt, ours/peer in ms, and the
engine's preemption count.

    python benchmarks/preemption.py                       # the bundled demo model on the CPU
    python benchmarks/preemption.py --caches 1500 1700 2200 --lens 7 150 400 700 900 1200 1393
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import cpu_device, print_rows, write_rows  # noqa: E402

from cpm4 import LLM, SamplingParams  # noqa: E402


def run(model: str, device: str, ids: list[list[int]], params: SamplingParams, cache: int
        ) -> tuple[float, int, list[list[int]]]:
    """(ms, preemptions, output ids) of one batch in a `cache`-token KV cache (built before the clock starts)."""
    llm = LLM(model, device=device, kv_cache_tokens=cache)
    llm.generate(ids[:1], SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))  # build the engine
    before = llm.engine.engine.num_preempted
    t = time.perf_counter()
    outs = llm.generate(ids, params)
    ms = (time.perf_counter() - t) * 1e3
    return ms, llm.engine.engine.num_preempted - before, [o.token_ids for o in outs]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="models/cpm4-demo")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--lens", type=int, nargs="+", default=[7, 150, 400, 700, 900, 1200, 1393])
    ap.add_argument("--max-tokens", type=int, default=90)
    ap.add_argument("--caches", type=int, nargs="+", default=[1500, 1700, 2200])
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    r = random.Random(0)
    ids = [[1] + [r.randrange(100, 8000) for _ in range(n)] for n in args.lens]
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    whole = sum(len(p) + args.max_tokens + 64 for p in ids)
    peer_ms, _, ref = run(args.model, args.device, ids, params, whole)
    rows = []
    for cache in args.caches:
        ms, pre, out = run(args.model, args.device, ids, params, cache)
        if out != ref:
            raise SystemExit(f"outputs in a {cache}-token cache differ from the unconstrained run")
        rows.append({"phase": f"offline.kv{cache}", "seqlen": max(args.lens), "ours_ms": ms, "peer_ms": peer_ms,
                     "speedup": peer_ms / ms, "preemptions": pre})
    print_rows(rows)
    print("preemptions:", {r["phase"]: r["preemptions"] for r in rows})
    write_rows("preemption", cpu_device() if args.device == "cpu" else args.device, rows, args.out,
               lens=args.lens, max_tokens=args.max_tokens, peer_cache=whole)


if __name__ == "__main__":
    main()
