"""The host's work to take in a burst of requests that share a long prompt prefix, before any model work:
`LLMEngine.add_request` (the prompt check) and the step's admission (prefix keys, the cached-prefix lookup, pages).
Ours: prefix keys of pages a request shares with a recently keyed prompt taken from it (`PagedKVCache._recall`);
peer: every page of every prompt hashed (the recall off), same engine, same prompts, same run. CPU only: no model
work is timed (a one-layer tiny model computes the prefix once, untimed).

    python benchmarks/admission.py                       # 32 requests, prefixes of 1K, 4K and 16K tokens
    python benchmarks/admission.py --requests 8 --prefixes 30000

Rows: `admission.add` (add_request for every request), `admission.admit` (the step's admission of all of them);
median of --repeats runs. Prints a table and writes benchmarks/results/admission-<date>.json.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from common import cpu_device, print_rows, write_rows  # noqa: E402

from cpm4.engine.paged import PagedKVCache  # noqa: E402
from cpm4.engine.sampling import SamplingParams  # noqa: E402
from cpm4.engine.scheduler import LLMEngine  # noqa: E402
from cpm4.model.config import preset  # noqa: E402
from cpm4.model.init import random_model  # noqa: E402
from cpm4.model.tokenizer import build_tokenizer  # noqa: E402


def once(model, tok, plen: int, n: int, suffix: int, seed: int, recall: bool) -> tuple[float, float]:
    """(add_request ms, admission ms) of n requests of a plen-token prefix + their own suffix tokens."""
    pages = (n + 2) * (plen + suffix) // 64 + 8
    cache = PagedKVCache(model.config, num_pages=pages, page_size=64, prefix_caching=True)
    if not recall:
        cache._recall = lambda root, ids, n_pages, out: out  # every page hashed
    eng = LLMEngine(model, tok, cache, max_batch_size=n, cuda_graphs=False)
    rng = random.Random(seed)
    vocab = model.config.vocab_size
    prefix = [rng.randrange(3, vocab) for _ in range(plen)]
    params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    eng.add_request("earlier", prefix + [7], params)  # the server's earlier request with this prefix
    eng.run_to_completion()
    prompts = [prefix + [rng.randrange(3, vocab) for _ in range(suffix)] for _ in range(n)]
    t0 = time.perf_counter()
    for i, p in enumerate(prompts):
        eng.add_request(f"r{i}", p, params)
    t1 = time.perf_counter()
    with torch.inference_mode():
        eng._admit()
    t2 = time.perf_counter()
    assert len(eng.running) == n and all(r.computed >= plen - 64 for r in eng.running)
    return 1000 * (t1 - t0), 1000 * (t2 - t1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prefixes", type=int, nargs="+", default=[1024, 4096, 16384])
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--suffix", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = ap.parse_args()
    cfg = preset("tiny", num_hidden_layers=1, sparse_config=None,
                 max_position_embeddings=max(args.prefixes) + args.suffix + 64)
    model = random_model(cfg, dtype=torch.float32)
    tok = build_tokenizer(1024)
    rows = []
    for plen in args.prefixes:
        runs = {on: [once(model, tok, plen, args.requests, args.suffix, seed, on) for seed in range(args.repeats)]
                for on in (True, False)}
        for k, phase in ((0, "admission.add"), (1, "admission.admit")):
            ours = statistics.median(r[k] for r in runs[True])
            peer = statistics.median(r[k] for r in runs[False])
            rows.append({"phase": phase, "seqlen": plen, "ours_ms": round(ours, 2), "peer_ms": round(peer, 2),
                         "speedup": round(peer / ours, 2), "requests": args.requests, "suffix": args.suffix})
    print(f"\n{args.requests} requests of a shared prefix + {args.suffix} own tokens, {cpu_device()}; "
          "peer: every page hashed")
    print_rows(rows, digits=2)
    write_rows("admission", cpu_device(), rows, args.out, requests=args.requests, suffix=args.suffix,
               repeats=args.repeats)


if __name__ == "__main__":
    main()
