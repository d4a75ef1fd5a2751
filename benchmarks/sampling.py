"""What drawing a decode step's tokens costs: `sample_tokens` over [rows, vocab] logits for greedy, unseeded and
seeded rows (temperature 0.8, top-p 0.95). Seeded rows draw together, each row's exponential noise from its own
generator (the exponential race); the peer is how they drew before, one `torch.multinomial` a row with its
generator (a dozen kernels a row), timed in the same run on the same logits.

    python benchmarks/sampling.py                         # CUDA if present: rows 1, 8, 64, 256; vocab 73,448
    python benchmarks/sampling.py --device cpu --rows 8 64

Prints a table (ms per step; CUDA: synchronized, median of --repeats) and writes
benchmarks/results/sampling-<device>-<date>.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from cpm4.engine.sampling import Sampler, SamplingParams, SamplingPlan, process_logits, sample_tokens  # noqa: E402


def per_row_multinomial(logits, samplers, params, history, plan) -> torch.Tensor:
    """The seeded rows' draw before: processed logits, then a softmax, a validity check and `multinomial` a row."""
    x = process_logits(logits, params, history, plan)
    tokens = x.argmax(dim=-1)
    for i in plan.seeded:
        probs = torch.softmax(x[i], dim=-1)
        ok = torch.isfinite(probs).all() & (probs.sum() > 0)
        probs = torch.where(ok, probs, torch.nn.functional.one_hot(torch.argmax(x[i]), probs.numel()).float())
        tokens[i] = torch.multinomial(probs, 1, generator=samplers[i].generator)[0]
    return tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 8, 64, 256])
    ap.add_argument("--vocab", type=int, default=73448)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--tag", default="")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = ap.parse_args()
    dev = torch.device(args.device)

    def timed(fn, *fn_args) -> float:
        fn(*fn_args)
        times = []
        for _ in range(args.repeats):
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            t = time.perf_counter()
            fn(*fn_args)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            times.append((time.perf_counter() - t) * 1000)
        return statistics.median(times)

    rows = []
    for b in args.rows:
        logits = torch.randn(b, args.vocab, device=dev, generator=torch.Generator(dev).manual_seed(b)) * 3
        history = [[1, 2, 3]] * b
        for kind in ("greedy", "unseeded", "seeded"):
            params = [SamplingParams(temperature=0 if kind == "greedy" else 0.8, top_p=0.95,
                                     seed=i if kind == "seeded" else None) for i in range(b)]
            samplers = [Sampler(p, dev) for p in params]
            plan = SamplingPlan(params, args.vocab)
            step = (logits, samplers, params, history, plan)
            ours = timed(sample_tokens, *step)
            peer = timed(per_row_multinomial, *step) if kind == "seeded" else None
            rows.append({"phase": f"sample.{kind}.b{b}", "seqlen": args.vocab, "ours_ms": round(ours, 4),
                         "peer_ms": None if peer is None else round(peer, 4),
                         "speedup": None if peer is None else round(peer / ours, 3)})
    print(f"{'phase':24s} {'vocab':>7s} {'ours ms':>9s} {'peer ms':>9s} {'speedup':>8s}")
    for r in rows:
        peer = "" if r["peer_ms"] is None else f"{r['peer_ms']:9.3f}"
        sp = "" if r["speedup"] is None else f"{r['speedup']:7.2f}x"
        print(f"{r['phase']:24s} {r['seqlen']:7d} {r['ours_ms']:9.3f} {peer:>9s} {sp:>8s}")
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"sampling-{dev.type}{args.tag}-{datetime.date.today()}.json")
    with open(path + ".tmp", "w") as f:
        json.dump({"device": name, "rows": rows}, f, indent=1)
    os.replace(path + ".tmp", path)
    print("wrote", path)


if __name__ == "__main__":
    main()
