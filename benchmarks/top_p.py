"""Top-p on the CPU: the nucleus looked for among the `sampling.TOP_P_CANDIDATES` most likely tokens first (rows
whose nucleus is wider sort in full) against sorting every row's whole vocabulary, as before (the peer:
TOP_P_CANDIDATES past the vocabulary), in the same run on the same logits, through `process_logits`.

    python benchmarks/top_p.py [--rows 1 8] [--vocab 73448]

Logits: "peaked" rows (random normal x 6: the 1,024 most likely tokens hold ≈ 99.7% of the mass, as a trained
model's next-token distribution mostly does), "flat" rows (x 3: ≈ 75-80%, as a random model's: every row falls back
to the full sort) and "mixed" (alternating). top_p 0.9, temperature 1. The outputs are checked equal. Prints a table
and writes benchmarks/results/top_p-<date>.json.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from common import cpu_device, print_rows, write_rows  # noqa: E402

from cpm4.engine import sampling  # noqa: E402
from cpm4.engine.sampling import SamplingParams, SamplingPlan, process_logits  # noqa: E402


def timed(logits: torch.Tensor, params: list[SamplingParams], candidates: int, repeats: int
          ) -> tuple[float, torch.Tensor]:
    sampling.TOP_P_CANDIDATES = candidates
    plan = SamplingPlan(params, logits.shape[1])
    out = process_logits(logits, params, [[]] * len(params), plan)
    t = time.perf_counter()
    for _ in range(repeats):
        process_logits(logits, params, [[]] * len(params), plan)
    return (time.perf_counter() - t) * 1000 / repeats, out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--vocab", type=int, default=73448)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = ap.parse_args()
    ours_k = sampling.TOP_P_CANDIDATES
    g = torch.Generator().manual_seed(0)
    rows = []
    for kind in ("peaked", "flat", "mixed"):
        for n in args.rows:
            scale = {"peaked": [6.0] * n, "flat": [3.0] * n, "mixed": [6.0 if i % 2 else 3.0 for i in range(n)]}[kind]
            logits = torch.randn(n, args.vocab, generator=g) * torch.tensor(scale)[:, None]
            params = [SamplingParams(temperature=1.0, top_p=0.9)] * n
            peer, want = timed(logits, params, 10**9, args.repeats)
            ours, got = timed(logits, params, ours_k, args.repeats)
            if not torch.equal(got, want):
                raise SystemExit(f"{kind} x{n}: the candidates' nucleus differs from the full sort's")
            rows.append({"phase": f"top_p.{kind}.rows{n}", "seqlen": args.vocab, "ours_ms": round(ours, 3),
                         "peer_ms": round(peer, 3), "speedup": round(peer / ours, 2)})
    sampling.TOP_P_CANDIDATES = ours_k
    print_rows(rows)
    write_rows("top_p", cpu_device(), rows, args.out, candidates=ours_k, top_p=0.9)


if __name__ == "__main__":
    main()
