"""What a declined union call costs, kernel by kernel: InfLLM v2 stage 2 (`sparse_fwd`) on independent selections
(random inputs: the union path is always declined) with UNION_TOKENS = 4 (the plan decided on the device, both
kernels launched) against UNION_TOKENS = 0 (the token kernel alone), MiniCPM4-8B attention shape.

    python benchmarks/union_decline.py [--lengths 32768 131072]

Rows `stage2.*`: the whole call, CUDA events (peer: off). Rows `kernel.*`: each kernel's device time a call under
torch.profiler (ours: with the plan; peer: the same kernel without it, where it runs there too). CUDA only.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import bench, print_rows, write_rows  # noqa: E402
from stage2_union import BLOCK, HKV, HQ, INIT, WINDOW, D, draw  # noqa: E402


def kernel_ms(fn, calls: int = 3) -> dict[str, float]:
    """Device milliseconds a call of `fn` by kernel name (torch.profiler over `calls` calls)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    out = {}
    for evt in prof.key_averages():
        us = getattr(evt, "device_time_total", None)
        us = evt.cuda_time_total if us is None else us
        if us:
            out[evt.key] = us / 1000 / calls
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[32768, 131072])
    ap.add_argument("--noise", type=float, default=100.0)
    ap.add_argument("--tag", default="")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("union_decline.py measures CUDA kernels: no CUDA device here")
    from cpm4.kernels.infllm_v2 import triton_union
    from cpm4.kernels.infllm_v2.triton_attention import sparse_fwd

    rows = []
    saved = triton_union.UNION_TOKENS
    for n in args.lengths:
        q = torch.randn(n, HQ, D, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(n, HKV, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        run = (q, k, v, draw(n, args.noise, seed=n), BLOCK, D ** -0.5, INIT, WINDOW)
        times, kernels = {}, {}
        try:
            for tokens in (0, 4, 0, 4):
                triton_union.UNION_TOKENS = tokens
                times.setdefault(tokens, []).append(bench(lambda run=run: sparse_fwd(*run), warmup=3, rep=10))
            for tokens in (0, 4):
                triton_union.UNION_TOKENS = tokens
                kernels[tokens] = kernel_ms(lambda run=run: sparse_fwd(*run))
        finally:
            triton_union.UNION_TOKENS = saved
        ours, peer = min(times[4]), min(times[0])
        rows.append({"phase": f"stage2.noise{args.noise:g}.auto4", "seqlen": n, "ours_ms": ours, "peer_ms": peer,
                     "speedup": peer / ours})
        for name, ms in sorted(kernels[4].items(), key=lambda kv: -kv[1]):
            base = kernels[0].get(name)
            rows.append({"phase": f"kernel.{name[:40]}", "seqlen": n, "ours_ms": ms, "peer_ms": base,
                         "speedup": None if base is None else base / ms})
        del q, k, v
    print_rows(rows)
    write_rows(f"union_decline{args.tag}", torch.cuda.get_device_name(), rows, args.out)


if __name__ == "__main__":
    main()
