"""InfLLM v2 attention off the GPU: `sparse_attention` (the reference's selection with `cpu.block_sparse_attention`
as stage 4) against the reference pipeline (stage 4 by gathering each query's blocks), one layer.

    python benchmarks/cpu_sparse.py [--lengths 1024 2048 4096] [--config demo|minicpm4-0.5b]

Shapes: the bundled demo model's attention (6 query heads, 2 KV heads, head dim 64, its sparse_config:
kernel 32/16, block 64, window 128, top-k 8) or a preset's; float32, random inputs; prefill = every token of
the sequence as queries, decode = the last token (kernel keys precomputed, as a cache holds them). Dense causal
SDPA over the same tokens is printed beside them for scale (`dense_ms`). Writes
benchmarks/results/cpu_sparse-<config>-<date>.json.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from common import write_json  # noqa: E402

from cpm4.kernels.infllm_v2 import compress_keys, cpu, reference  # noqa: E402
from cpm4.model.config import MiniCPM4Config, preset  # noqa: E402


def timed(fn, reps: int) -> float:
    fn()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) * 1000 / reps


def measure(n: int, hq: int, hkv: int, d: int, sc, g: torch.Generator) -> list[dict]:
    q, k, v = (torch.randn(n, h, d, generator=g) for h in (hq, hkv, hkv))
    k1, k2 = compress_keys(k, sc)
    scale = d ** -0.5
    dense = timed(lambda: F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                                         is_causal=True, enable_gqa=True), 3)
    rows = []
    for phase, qq, reps in (("prefill", q, 1), ("decode", q[-1:], 20)):
        def run(attend=None, qq=qq):
            return reference.infllm_v2_attention(qq, k, v, sc, scale, k1, k2, attend=attend)
        ours = timed(lambda: run(cpu.block_sparse_attention), reps)
        peer = timed(run, reps)
        r = {"phase": phase, "seqlen": n, "ours_ms": round(ours, 3), "peer_ms": round(peer, 3),
             "speedup": round(peer / ours, 2), "dense_ms": round(dense, 3) if phase == "prefill" else None}
        rows.append(r)
        print(r, flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="demo", help="demo (models/cpm4-demo/config.json) or a preset name")
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096])
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    if args.config == "demo":
        cfg = MiniCPM4Config.from_json(os.path.join(os.path.dirname(__file__), "..", "models", "cpm4-demo",
                                                    "config.json"))
    else:
        cfg = preset(args.config)
    sc = cfg.sparse_config
    if sc is None:
        ap.error(f"{args.config} has no sparse_config")
    hq, hkv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.dim_head
    g = torch.Generator().manual_seed(0)
    rows = []
    with torch.inference_mode():
        for n in args.lengths:
            rows += measure(n, hq, hkv, d, sc, g)
    cpu_name = platform.processor() or platform.machine()
    device = f"CPU ({cpu_name}, {torch.get_num_threads()} threads)"
    print(f"\n{args.config}: {hq}/{hkv} heads, d {d}, float32, {device}; peer: the reference's gathering stage 4")
    print(f"{'phase':8s} {'seqlen':>7s} {'ours ms':>9s} {'peer ms':>9s} {'speedup':>8s} {'dense SDPA ms':>14s}")
    for r in rows:
        dn = "" if r["dense_ms"] is None else f"{r['dense_ms']:14.2f}"
        print(f"{r['phase']:8s} {r['seqlen']:7d} {r['ours_ms']:9.2f} {r['peer_ms']:9.2f} {r['speedup']:7.2f}x {dn}")
    date = datetime.date.today().isoformat()
    write_json({"device": device, "date": date, "config": args.config, "rows": rows},
               f"cpu_sparse-{args.config}-{date}.json", args.out)


if __name__ == "__main__":
    main()
