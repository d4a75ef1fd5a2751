"""First call against repeat call of the model's dense attention at new shapes: does a shape never seen before
cost a one-time set-up (a backend building a plan, the allocator growing), and which kernel runs?

    python benchmarks/sdpa_shapes.py --config minicpm4-0.5b

The engine's multi-row prefill runs `Attention._dense` on padded [rows, T] batches whose shapes change every
step. Measured on the H200 (2026-11-29, RESULTS.md): cuDNN, PyTorch's pick for causal GQA there, spends 47 ms on
the first call of each new shape (0.1 ms after); with a [rows, T, S] mask its first call took 0.5-0.6 s, which
is what the 0.5-0.9 s host stalls of the serving run were (the engine no longer takes that path for multi-token
steps). The model leaves cuDNN out of the multi-row causal call (`modeling.NO_PLAN_BACKENDS`); this runs each
shape both ways. Prints a table, writes
benchmarks/results/sdpa_shapes-<config>-<date>.json (ours_ms: the repeat call; first_ms: the first).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import os
import sys
import time

import torch
from torch.nn.attention import SDPBackend
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from common import write_json  # noqa: E402

from cpm4.model import modeling  # noqa: E402
from cpm4.model.config import preset  # noqa: E402
from cpm4.model.modeling import Attention  # noqa: E402


def timed(fn, dev: torch.device) -> float:
    torch.cuda.synchronize(dev)
    t = time.perf_counter()
    fn()
    torch.cuda.synchronize(dev)
    return (time.perf_counter() - t) * 1000


def kernels(fn) -> list[str]:
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    names = {e.key for e in prof.key_averages() if e.device_time_total > 0}
    return sorted(n[:80] for n in names)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="minicpm4-0.5b")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        ap.error("needs CUDA (the question is about the GPU's attention backends)")
    dev = torch.device("cuda")
    cfg = preset(args.config)
    attn = Attention(cfg, 0).to(dev, torch.bfloat16)
    hq, hkv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
    be = torch.backends.cuda
    print(f"SDPA backends enabled: cudnn {be.cudnn_sdp_enabled()}, flash {be.flash_sdp_enabled()}, "
          f"mem-efficient {be.mem_efficient_sdp_enabled()}")
    rows = []
    # (path, rows, T, cached tokens before the chunk in row 0): shapes like the 0.5B serving run's prefill steps,
    # a long single-sequence prefill, a chunk after cached tokens and a masked multi-row decode step.
    cases = [("causal", 8, 1024, 0), ("causal", 15, 963, 0), ("causal", 12, 700, 0),
             ("masked", 8, 1024, 300), ("masked", 15, 963, 517), ("masked", 12, 700, 64),
             ("causal", 1, 16384, 0), ("chunk", 1, 4096, 8192), ("masked", 64, 1, 1000)]
    # What the multi-row causal call may use: without cuDNN (the model's choice), and every backend (torch's pick).
    every = modeling.NO_PLAN_BACKENDS + [SDPBackend.CUDNN_ATTENTION]
    orders = {"no-plan": modeling.NO_PLAN_BACKENDS, "torch-default": every}
    for order_name, order in orders.items():
        modeling.NO_PLAN_BACKENDS = order
        for path, b, t, cached in cases:
            # A shape each order has not seen (a plan cache must not carry over from the other order's run).
            t = t + (order is every and t > 1)
            s = t + cached
            q = torch.randn(b, t, hq, d, device=dev, dtype=torch.bfloat16)
            k, v = (torch.randn(b, s, hkv, d, device=dev, dtype=torch.bfloat16) for _ in range(2))
            starts = torch.zeros(b, dtype=torch.long, device=dev)
            starts[0] = cached
            if path == "masked" and t == 1:
                starts[:] = cached  # decode: every row sees all its keys but a masked batch
            if path == "causal":
                call = functools.partial(attn._dense, q, k[:, :t], v[:, :t], starts * 0, True, 0)
            else:
                call = functools.partial(attn._dense, q, k, v, starts, False, cached)

            first = timed(call, dev)
            again = min(timed(call, dev) for _ in range(3))
            names = kernels(call)
            r = {"phase": f"{order_name}.{path}.rows{b}.T{t}", "seqlen": s, "ours_ms": round(again, 3),
                 "peer_ms": None, "speedup": None, "first_ms": round(first, 1), "kernels": names}
            rows.append(r)
            print(f"{r['phase']:38s} S={s:5d} first {first:8.1f} ms  repeat {again:7.3f} ms  "
                  f"{', '.join(n for n in names if not n.startswith('Memset'))[:70]}")
    # Same shape, both orders: the ratio is the steady-state cost of leaving cuDNN (peer = torch's default).
    by = {r["phase"].split(".", 1)[1].rsplit(".T", 1)[0]: r for r in rows if r["phase"].startswith("no-plan")}
    for r in rows:
        if r["phase"].startswith("torch"):
            f = by[r["phase"].split(".", 1)[1].rsplit(".T", 1)[0]]
            f["peer_ms"] = r["ours_ms"]
            f["speedup"] = round(r["ours_ms"] / f["ours_ms"], 3) if f["ours_ms"] else None
    print("repeat-call ratio torch-default / no-plan:",
          ", ".join(f"{k} {v['speedup']}" for k, v in by.items()))
    date = datetime.date.today().isoformat()
    doc = {"device": torch.cuda.get_device_name(dev), "date": date, "config": args.config, "rows": rows}
    write_json(doc, f"sdpa_shapes-{args.config}-{date}.json", args.out)


if __name__ == "__main__":
    main()
