"""Batch-1 (and few-row) decode GEMVs at the 8B shape: the Triton kernel of cpm4/kernels/gemv against
`F.linear` (cuBLAS, the peer) in the same run.

    python benchmarks/gemv.py [--rows 1 4] [--config minicpm4-8b] [--sweep]

Each variant runs inside a CUDA graph over enough weight copies (>= 512 MB) that the weights stream from HBM as
they do in a decode step; µs per call, GB/s and the share of the device copy bandwidth measured in the same run.
--sweep: also every fixed tile (BLOCK_N, BLOCK_K, SPLIT, warps) of a grid at one row, the best three per matrix
(whether the autotuner's pick is the best there is). Writes benchmarks/results/gemv[-TAG]-<date>.json.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from common import replay_ms, write_rows  # noqa: E402

from cpm4.engine.capture import capture_graph  # noqa: E402
from cpm4.kernels.gemv import gemv_reference  # noqa: E402
from cpm4.model.config import preset  # noqa: E402


def copy_bandwidth() -> float:
    a = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(10):
        b.copy_(a)
    e.record()
    e.synchronize()
    return 2 * 2**30 * 10 / (s.elapsed_time(e) / 1e3)


def graph_us(fn, xs, ws, reps: int = 10) -> float:
    """µs per call of fn(x, w) over the weight copies, captured once as a CUDA graph and replayed."""
    for x, w in zip(xs, ws):
        fn(x, w)  # autotune / heuristics outside the capture
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with capture_graph(g):
        for x, w in zip(xs, ws):
            fn(x, w)
    return replay_ms(g, reps) * 1e3 / len(ws)


def sweep(name: str, n: int, k: int, xs, ws, peer: float, gemv) -> list[dict]:
    """Every fixed tile of a grid on these weights (µs in a graph, as above); prints the best three."""
    timed = []
    for bn in (4, 8, 16, 32):
        for bk in (64, 128, 256, 512):
            for split in (1, 2, 4, 8):
                for warps in (2, 4, 8):
                    if bn * bk > 64 * 32 * warps or bk * split > 4 * k:
                        continue
                    cfg = {"BLOCK_N": bn, "BLOCK_K": bk, "SPLIT": split, "num_warps": warps}
                    us = graph_us(lambda x, w, cfg=cfg: gemv(x, w, config=cfg), xs, ws)
                    timed.append((us, cfg))
    timed.sort(key=lambda t: t[0])
    for us, cfg in timed[:3]:
        print(f"  {name:<9} sweep {us:8.2f} us ({peer / us:.2f}x cuBLAS)  {cfg}")
    return [dict(phase=f"{name}.rows1.sweep{i}", seqlen=None, ours_ms=us / 1e3, peer_ms=peer / 1e3,
                 speedup=round(peer / us, 3), n=n, k=k, rows=1, config=cfg) for i, (us, cfg) in enumerate(timed[:3])]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="minicpm4-8b")
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--sweep", action="store_true", help="time a grid of fixed tiles at one row too")
    ap.add_argument("--tag", default="")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gemv.py measures CUDA kernels: no CUDA device here")
    from cpm4.kernels.gemv.triton_gemv import gemv

    cfg = preset(args.config)
    h, i, d = cfg.hidden_size, cfg.intermediate_size, cfg.dim_head
    shapes = {"qkv": ((cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * d, h),
              "o": (h, cfg.num_attention_heads * d), "gate_up": (2 * i, h), "down": (h, i),
              "lm_head": (cfg.vocab_size, h)}
    bw = copy_bandwidth()
    dt = torch.bfloat16

    rows = []
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s")
    print(f"{'op':<9}{'rows':>5}{'N x K':>14}{'cuBLAS us':>11}{'ours us':>9}{'ours GB/s':>10}"
          f"{'of copy':>8}{'speed-up':>9}{'max err':>9}")
    for m in args.rows:
        for name, (n, k) in shapes.items():
            copies = max(2, -(-512 * 2**20 // (n * k * 2)))
            ws = [torch.randn(n, k, device="cuda", dtype=dt) / k ** 0.5 for _ in range(copies)]
            xs = [torch.randn(m, k, device="cuda", dtype=dt) for _ in range(copies)]
            err = (gemv(xs[0], ws[0]).float() - gemv_reference(xs[0], ws[0]).float()).abs().max().item()
            peer = graph_us(F.linear, xs, ws)
            ours = graph_us(gemv, xs, ws)
            gbs = n * k * 2 / (ours * 1e-6) / 1e9
            print(f"{name:<9}{m:>5}{f'{n}x{k}':>14}{peer:>11.2f}{ours:>9.2f}{gbs:>10.0f}"
                  f"{gbs * 1e9 / bw:>7.0%}{peer / ours:>8.2f}x{err:>9.1e}")
            rows.append(dict(phase=f"{name}.rows{m}", seqlen=None, ours_ms=ours / 1e3, peer_ms=peer / 1e3,
                             speedup=round(peer / ours, 3), n=n, k=k, rows=m,
                             ours_gb_s=round(gbs), copy_share=round(gbs * 1e9 / bw, 3), max_abs_err=err))
            if args.sweep and m == 1:
                rows += sweep(name, n, k, xs, ws, peer, gemv)
            del ws, xs
    write_rows("gemv" + args.tag, torch.cuda.get_device_name(), rows, args.out, config=args.config, dtype="bfloat16",
               copy_bytes_per_s=bw, peer="F.linear (cuBLAS)", ours="cpm4.kernels.gemv (Triton)")


if __name__ == "__main__":
    main()
