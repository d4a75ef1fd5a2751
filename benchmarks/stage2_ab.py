"""InfLLM v2 stage 2 (sparse_fwd) kernel by kernel, for A/B runs of two checkouts: each kernel's median device
time (torch.profiler) and the configs its autotuner picked. The selection is made once with the checkout's own
stage 1, so both sides attend to the same blocks (same seed, same inputs).

    python3 benchmarks/stage2_ab.py --root ab_old --length 131072 --tag old

--ncu: after the autotuning runs, one run inside cudaProfilerStart/Stop and nothing else, for Nsight Compute's
`--profile-from-start off` (device stage `ncushared`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", default=".", help="checkout whose cpm4 is imported")
    ap.add_argument("--length", type=int, default=131072)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--tag", default="")
    ap.add_argument("--out", default=None, help="folder for a JSON of the rows")
    ap.add_argument("--ncu", action="store_true", help="one profiler-range run after autotuning, then exit")
    args = ap.parse_args()
    sys.path.insert(0, os.path.abspath(args.root))
    import torch
    from torch.profiler import ProfilerActivity, profile

    from cpm4.kernels.infllm_v2 import triton_attention as ta
    from cpm4.kernels.infllm_v2.triton_select import block_scores, compress, select_blocks
    from cpm4.model.config import SparseConfig

    torch.manual_seed(0)
    n, hq, hkv, d = args.length, 32, 2, 128
    cfg = SparseConfig(variant="gen-b", dense_len=-1)
    scale = d ** -0.5
    q = torch.randn(n, hq, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(n, hkv, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(n, hkv, d, device="cuda", dtype=torch.bfloat16)
    k1 = compress(k, cfg.kernel_size, cfg.kernel_stride)
    k2 = compress(k, cfg.coarse_kernel_size, cfg.coarse_kernel_stride)
    idx = select_blocks(block_scores(q, k1, k2, 0, cfg, scale), 0, n, k1.shape[0], cfg)

    def run():
        return ta.sparse_fwd(q, k, v, idx, 64, scale, cfg.init_blocks, cfg.local_blocks)

    for _ in range(3):  # autotune and warm
        run()
    torch.cuda.synchronize()
    if args.ncu:
        torch.cuda.cudart().cudaProfilerStart()
        run()
        torch.cuda.synchronize()
        torch.cuda.cudart().cudaProfilerStop()
        return
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(args.reps):
            run()
        torch.cuda.synchronize()
    times: dict[str, list[float]] = {}
    for e in prof.events():
        if e.device_type.name == "CUDA":
            times.setdefault(e.name, []).append(e.device_time / 1e3)
    rows = []
    for name, ts in sorted(times.items(), key=lambda kv: -sum(kv[1])):
        rows.append({"phase": f"prefill.stage2.{name[:60]}", "seqlen": n, "ours_ms": round(statistics.median(ts), 4),
                     "peer_ms": None, "speedup": None, "tag": args.tag, "calls": len(ts)})
    configs = {}
    for kname in ("_fwd_shared_kernel", "_fwd_token_kernel"):
        tuner = getattr(ta, kname)
        cache = getattr(tuner, "cache", {})
        configs[kname] = [str(c) for c in cache.values()]
    print(f"{'tag':5} {'kernel':60} {'calls':>5} {'median ms':>10}")
    for r in rows:
        print(f"{r['tag']:5} {r['phase'][15:]:60} {r['calls']:5} {r['ours_ms']:10.3f}")
    for kname, cs in configs.items():
        print(f"{args.tag:5} {kname} configs: {cs}")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        path = os.path.join(args.out, f"stage2-ab-{args.tag}.json")
        with open(path + ".tmp", "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "length": n, "rows": rows, "configs": configs}, f,
                      indent=1)
        os.replace(path + ".tmp", path)


if __name__ == "__main__":
    main()
