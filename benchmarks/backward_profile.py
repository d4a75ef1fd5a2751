"""CUDA only. Where the InfLLM v2 sparse attention's forward and backward spend their time, kernel by kernel.

One layer of the 8B shape (32/2 heads, d 128, bf16, released sparse_config, always sparse), random inputs, the
selection fixed (as attention.py's backward row): `SparseAttentionFn` forward, then its backward, under
torch.profiler; per kernel its total CUDA time and calls, over `--steps` runs.

    python benchmarks/backward_profile.py [--length 131072] [--steps 3] [--dkdv-chunk N] [--dkdv-variants]

Prints two tables and writes `benchmarks/results/backward_profile-<length>-<date>.json`.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import write_json  # noqa: E402

from cpm4.model.config import SparseConfig  # noqa: E402


def kernel_table(prof, steps: int, top: int) -> list[dict]:
    rows = [{"kernel": e.key, "ms": e.device_time_total / 1e3 / steps, "calls": e.count / steps}
            for e in prof.key_averages() if e.device_time_total > 0 and e.device_type.name == "CUDA"]
    return sorted(rows, key=lambda r: -r["ms"])[:top]


def dkdv_variants(q, k, v, o, do, idx, cfg, scale) -> list[dict]:
    """The dk/dv kernels alone on the backward's inverted selection, and on variants of it: which part of their
    time the initial block (every token attends to it) and the local blocks take; each key block's tokens unsplit
    or split into items of 16384/8192 (DKDV_CHUNK); tiles of 128 or 32 rows, 8 or 2 warps; the scores as [keys,
    rows] (DKDV_KEYS_FIRST). The first session's table (4096/2048, keys_first alone) is in RESULTS.md."""
    import triton

    from cpm4.kernels.infllm_v2.triton_attention import bwd_dkdv, full_block_list, invert_blocks

    tk, hkv, d = k.shape
    tq, hq, _ = q.shape
    lse = torch.zeros(tq, hq, device="cuda", dtype=torch.float32)  # timing only: values do not matter
    delta = (o.float() * do.float()).sum(-1)
    blocks = full_block_list(idx.to(torch.int32), torch.arange(tk - tq, tk, device="cuda"), 64, cfg.init_blocks,
                             cfg.local_blocks)
    n_blocks = triton.cdiv(tk, 64)
    init = cfg.init_blocks
    lists = {"as called": blocks, "no initial block": blocks[:, :, init:],
             "no local blocks": blocks[:, :, :blocks.shape[2] - cfg.local_blocks - 1]}
    variants = {"": {}, ".unsplit": {"chunk": 0}, ".chunk16384": {"chunk": 16384}, ".chunk8192": {"chunk": 8192},
                ".chunk8192.rows128.warps8": {"chunk": 8192, "rows": 128, "num_warps": 8},
                ".chunk8192.rows32": {"chunk": 8192, "rows": 32}, ".chunk8192.warps2": {"chunk": 8192, "num_warps": 2},
                ".unsplit.rows128.warps8": {"chunk": 0, "rows": 128, "num_warps": 8},
                ".chunk8192.keys_first": {"chunk": 8192, "keys_first": True}}
    rows = []
    for name, bl in lists.items():
        tokens, offsets = invert_blocks(bl.contiguous(), n_blocks)
        for label, kw in variants.items():
            if name != "as called" and label:
                continue

            def run(tokens=tokens, offsets=offsets, kw=kw):
                return bwd_dkdv(q, k, v, do, lse, delta, tokens, offsets, scale, 64, **kw)
            try:
                run()
                torch.cuda.synchronize()
            except Exception as e:  # noqa: BLE001 - e.g. out of shared memory: the variant loses its row only
                print(f"dkdv {name + label:28s} failed: {e!r}"[:300])
                continue
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            for _ in range(3):
                run()
            b.record()
            torch.cuda.synchronize()
            rows.append({"variant": name + label, "ms": a.elapsed_time(b) / 3, "pairs": int(offsets[-1])})
            print(f"dkdv {name + label:28s} {rows[-1]['ms']:8.2f} ms  {rows[-1]['pairs']} (token, block) pairs")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--length", type=int, default=131072)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--dkdv-chunk", type=int, default=None,
                    help="set triton_attention.DKDV_CHUNK for the profiled backward, 0 unsplit (default: as the module "
                         "has it); the JSON's name then ends in -chunk<N>")
    ap.add_argument("--dkdv-variants", action="store_true",
                    help="also time the dk/dv kernels alone: as called, without the initial block's tokens, without "
                         "the local blocks', split into items (DKDV_CHUNK), with 8 warps, with 128-row tiles")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("backward_profile.py needs a CUDA GPU")
    from torch.profiler import ProfilerActivity, profile

    from cpm4.kernels.infllm_v2 import triton_attention
    from cpm4.kernels.infllm_v2.triton_attention import SparseAttentionFn
    from cpm4.kernels.infllm_v2.triton_select import block_scores, compress, select_blocks

    if args.dkdv_chunk is not None:
        triton_attention.DKDV_CHUNK = args.dkdv_chunk
    torch.manual_seed(0)
    n, hq, hkv, d = args.length, 32, 2, 128
    cfg = SparseConfig(variant="gen-b", dense_len=-1)
    scale = d ** -0.5
    q, k, v = (torch.randn(n, h, d, device="cuda", dtype=torch.bfloat16) for h in (hq, hkv, hkv))
    k1 = compress(k, cfg.kernel_size, cfg.kernel_stride)
    k2 = compress(k, cfg.coarse_kernel_size, cfg.coarse_kernel_stride)
    blocks = select_blocks(block_scores(q, k1, k2, 0, cfg, scale), 0, n, k1.shape[0], cfg)
    qs, ks, vs = (x.clone().requires_grad_() for x in (q, k, v))

    def fwd():
        return SparseAttentionFn.apply(qs, ks, vs, blocks, 64, scale, cfg.init_blocks, cfg.local_blocks)

    o = fwd()
    do = torch.randn_like(o)
    torch.autograd.grad(o, (qs, ks, vs), do, retain_graph=True)  # warm-up: autotuning, compiles
    torch.cuda.synchronize()
    tables = {}
    for name, fn in (("forward", fwd), ("backward", lambda: torch.autograd.grad(o, (qs, ks, vs), do,
                                                                               retain_graph=True))):
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(args.steps):
                fn()
            torch.cuda.synchronize()
        tables[name] = kernel_table(prof, args.steps, args.top)
        total = sum(r["ms"] for r in kernel_table(prof, args.steps, 10**6))
        print(f"\n{name} at {n}: {total:.1f} ms of kernel time per run")
        print(f"{'ms':>9s} {'calls':>6s}  kernel")
        for r in tables[name]:
            print(f"{r['ms']:9.2f} {r['calls']:6.0f}  {r['kernel'][:90]}")
    if args.dkdv_variants:
        tables["dkdv_variants"] = dkdv_variants(q, k, v, o.detach(), do, blocks, cfg, scale)
    date = datetime.date.today().isoformat()
    write_json({"device": torch.cuda.get_device_name(), "date": date, "length": n,
                "dkdv_chunk": triton_attention.DKDV_CHUNK, **tables},
               f"backward_profile-{n}-{date}{'' if args.dkdv_chunk is None else f'-chunk{args.dkdv_chunk}'}.json",
               args.out)


if __name__ == "__main__":
    main()
