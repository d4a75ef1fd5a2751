"""First call against repeat call of the model's dense attention at new shapes: does a shape never seen before
cost a one-time set-up (a backend building a plan, the allocator growing), and which kernel runs?

    python benchmarks/sdpa_shapes.py --config minicpm4-0.5b

The engine's multi-row prefill runs `Attention._dense` on padded [rows, T] batches whose shapes change every
step: rows that all start at position 0 take the causal path, a batch with a row continuing an earlier chunk
takes the masked path ([rows, T, S] boolean mask). A compiled serving run that compiled nothing still had
0.5-0.9 s host steps; this separates the attention's share. Prints a table, writes
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
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from common import write_json  # noqa: E402

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
    # (path, rows, T, cached tokens before the chunk in row 0): shapes like the 0.5B serving run's prefill steps.
    cases = [("causal", 8, 1024, 0), ("causal", 15, 963, 0), ("causal", 12, 700, 0),
             ("masked", 8, 1024, 300), ("masked", 15, 963, 517), ("masked", 12, 700, 64)]
    for path, b, t, cached in cases:
        s = t + cached
        q = torch.randn(b, t, hq, d, device=dev, dtype=torch.bfloat16)
        k, v = (torch.randn(b, s, hkv, d, device=dev, dtype=torch.bfloat16) for _ in range(2))
        starts = torch.zeros(b, dtype=torch.long, device=dev)
        starts[0] = cached

        if path == "causal":
            call = functools.partial(attn._dense, q, k[:, :t], v[:, :t], starts * 0, True, 0)
        else:
            call = functools.partial(attn._dense, q, k, v, starts, False, cached)

        first = timed(call, dev)
        again = min(timed(call, dev) for _ in range(3))
        names = kernels(call)
        r = {"phase": f"{path}.rows{b}.T{t}", "seqlen": s, "ours_ms": round(again, 3), "peer_ms": None,
             "speedup": None, "first_ms": round(first, 1), "kernels": names}
        rows.append(r)
        print(f"{r['phase']:24s} S={s:5d} first {first:8.1f} ms  repeat {again:7.3f} ms  {', '.join(names)[:110]}")
    date = datetime.date.today().isoformat()
    doc = {"device": torch.cuda.get_device_name(dev), "date": date, "config": args.config, "rows": rows}
    write_json(doc, f"sdpa_shapes-{args.config}-{date}.json", args.out)


if __name__ == "__main__":
    main()
