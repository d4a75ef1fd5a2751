"""Engine decode steps on the CPU with several sequences past dense_len (InfLLM v2 rows): one pass over all
rows (`infllm_v2.sparse_decode_rows`) against one pass per row (`Attention.batch_sparse_decode = False`), in
the same run, through `LLMEngine` on the bundled demo model (dense_len 512).

    python benchmarks/cpu_engine_decode.py [--rows 4 8] [--length 1000]

Prompts of --length random tokens, greedy, 60 new tokens each; ms per decode step (prefill excluded). Both
produce the same tokens (checked). Prints a table, writes benchmarks/results/cpu_engine_decode-<date>.json.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from common import covering_tokenizer, cpu_device, write_rows  # noqa: E402

from cpm4 import SamplingParams  # noqa: E402
from cpm4.engine.paged import PagedKVCache, page_size_for  # noqa: E402
from cpm4.engine.scheduler import LLMEngine  # noqa: E402
from cpm4.model.checkpoint import load_checkpoint  # noqa: E402
from cpm4.model.modeling import Attention  # noqa: E402


def decode(model, tok, reqs: list[list[int]], new: int) -> tuple[float, dict]:
    """ms per decode step of the requests run together, and their tokens."""
    ps = page_size_for(model.config)
    cache = PagedKVCache(model.config, sum(-(-(len(r) + new) // ps) for r in reqs) + 1, ps)
    eng = LLMEngine(model, tok, cache, max_batch_size=len(reqs), chunk_tokens=sum(map(len, reqs)))
    for i, p in enumerate(reqs):
        eng.add_request(f"r{i}", p, SamplingParams(temperature=0, max_tokens=new, ignore_eos=True))
    out: dict[str, list[int]] = {}
    for rid, d in eng.step():  # the prefill step
        out.setdefault(rid, []).extend(d.token_ids)
    steps, t = 0, time.perf_counter()
    while eng.has_work():
        for rid, d in eng.step():
            out.setdefault(rid, []).extend(d.token_ids)
        steps += 1
    return (time.perf_counter() - t) * 1000 / steps, out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="models/cpm4-demo")
    ap.add_argument("--rows", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--length", type=int, default=1000)
    ap.add_argument("--new-tokens", type=int, default=60)
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    model = load_checkpoint(args.model, dtype=torch.float32)
    sc = model.config.sparse_config
    if sc is None or not sc.is_sparse(args.length):
        ap.error(f"--length {args.length} is not past the model's dense_len: no InfLLM v2 rows to measure")
    tok = covering_tokenizer(model.config.vocab_size)
    rnd = random.Random(0)
    rows = []
    print(f"{'rows':>5s} {'length':>7s} {'one pass ms/step':>17s} {'per row ms/step':>16s} {'speed-up':>9s}")
    for n in args.rows:
        reqs = [[rnd.randint(3, 1000) for _ in range(args.length)] for _ in range(n)]
        ours, a = decode(model, tok, reqs, args.new_tokens)
        Attention.batch_sparse_decode = False
        try:
            peer, b = decode(model, tok, reqs, args.new_tokens)
        finally:
            Attention.batch_sparse_decode = True
        if a != b:
            raise SystemExit("one-pass and per-row decode disagree on the tokens")
        rows.append({"phase": f"decode.sparse.rows{n}", "seqlen": args.length, "ours_ms": round(ours, 2),
                     "peer_ms": round(peer, 2), "speedup": round(peer / ours, 2)})
        print(f"{n:5d} {args.length:7d} {ours:17.2f} {peer:16.2f} {peer / ours:8.2f}x")
    write_rows("cpu_engine_decode", cpu_device(), rows, args.out, model=args.model)


if __name__ == "__main__":
    main()
