"""The prefill's compiled element-wise ops (`cpm4.model.fused`) at the 8B shape: compiled with every dimension
symbolic (`dynamic=True`, the peer) against compiled with only the token count symbolic (the hidden sizes stay
constants in the generated kernels), and eager for scale. Same inputs as the model gives them (SiLU·up on the
two halves of the fused gate/up output, RoPE on q and k viewed out of the fused q/k/v output). Also the
hand-written Triton kernels (`cpm4.kernels.elementwise`, what the uncompiled path can use) and their largest
difference from eager.

    python benchmarks/fused_ops.py [--tokens 8192 32768] [--config minicpm4-8b]

Prints ms, GB/s and the largest difference from the peer's output; writes benchmarks/results/fused_ops-<date>.json.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from common import write_rows  # noqa: E402

from cpm4.model import fused  # noqa: E402
from cpm4.model.config import preset  # noqa: E402
from cpm4.model.rope import RotaryEmbedding  # noqa: E402


def timed(fn, *args, reps: int = 20) -> float:
    """Median ms of fn(*args) over reps CUDA-event timings."""
    for _ in range(3):
        fn(*args)
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn(*args)
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


def _tuple(x):
    return x if isinstance(x, tuple) else (x,)


def inputs(cfg, t: int, dev: str, dtype: torch.dtype) -> dict[str, tuple]:
    """Per op: (arguments, bytes moved) at t tokens."""
    h, i, hq, hkv, d = cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads, cfg.num_key_value_heads, \
        cfg.dim_head
    e = torch.finfo(dtype).bits // 8
    gate, up = torch.randn(1, t, 2 * i, device=dev, dtype=dtype).chunk(2, dim=-1)
    qkv = torch.randn(1, t, (hq + 2 * hkv) * d, device=dev, dtype=dtype)
    q = qkv[..., :hq * d].view(1, t, hq, d)
    cos, sin = RotaryEmbedding(cfg).to(dev)(torch.arange(t, device=dev)[None], torch.float32)
    x, y = torch.randn(1, t, h, device=dev, dtype=dtype), torch.randn(1, t, h, device=dev, dtype=dtype)
    w = torch.randn(h, device=dev, dtype=dtype)
    return {
        "silu_mul": ((gate, up), 3 * t * i * e),
        "rotary_q": ((q, cos, sin), 2 * t * hq * d * e + 2 * t * d * 4),
        "add_rms_norm": ((x, y, 1.4 / 6, w, 1e-6), 4 * t * h * e),
        "rms_norm": ((x, w, 1e-6), 2 * t * h * e),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="minicpm4-8b")
    ap.add_argument("--tokens", type=int, nargs="+", default=[8192, 32768])
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("fused_ops.py measures CUDA kernels: no CUDA device here")
    dev, dtype = "cuda", torch.bfloat16
    cfg = preset(args.config)
    peer = fused.compiled("inductor", token_dim_only=False)  # every dimension symbolic
    ours = fused.compiled("inductor")
    from cpm4.kernels.elementwise import triton_ops

    hand = triton_ops()  # one hand-written Triton kernel per op (no torch.compile)
    rows = []
    print(f"{'op':<14}{'tokens':>8}{'eager ms':>10}{'peer ms':>9}{'ours ms':>9}{'ours GB/s':>10}{'speed-up':>9}"
          f"{'max diff':>10}{'triton ms':>10}{'triton diff':>12}")
    for t in args.tokens:
        for name, (a, nbytes) in inputs(cfg, t, dev, dtype).items():
            op = name.removesuffix("_q")
            # A second, different length first: what a server's prefill chunks look like to the compiler.
            shorter = inputs(cfg, t // 2 + 17, dev, dtype)[name][0]
            for ops in (peer, ours):
                getattr(ops, op)(*shorter)
            want = getattr(peer, op)(*a)
            got = getattr(ours, op)(*a)
            diff = max((g.float() - w.float()).abs().max().item() for g, w in zip(
                got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)))
            eager_out = getattr(fused.EAGER, op)(*a)
            hand_diff = max((g.float() - w.float()).abs().max().item() for g, w in zip(
                _tuple(getattr(hand, op)(*a)), _tuple(eager_out)))
            ms = {k: timed(getattr(o, op), *a)
                  for k, o in (("eager", fused.EAGER), ("peer", peer), ("ours", ours), ("triton", hand))}
            gbs = nbytes / ms["ours"] / 1e6
            print(f"{name:<14}{t:>8}{ms['eager']:>10.3f}{ms['peer']:>9.3f}{ms['ours']:>9.3f}{gbs:>10.0f}"
                  f"{ms['peer'] / ms['ours']:>8.2f}x{diff:>10.2e}{ms['triton']:>10.3f}{hand_diff:>12.2e}")
            rows.append(dict(phase=name, seqlen=t, ours_ms=round(ms["ours"], 4), peer_ms=round(ms["peer"], 4),
                             speedup=round(ms["peer"] / ms["ours"], 3), eager_ms=round(ms["eager"], 4),
                             ours_gb_s=round(gbs), max_abs_diff=diff, triton_ms=round(ms["triton"], 4),
                             triton_gb_s=round(nbytes / ms["triton"] / 1e6), triton_max_abs_diff_vs_eager=hand_diff))
    write_rows("fused_ops", torch.cuda.get_device_name(), rows, args.out, config=args.config, dtype="bfloat16",
               peer="torch.compile(dynamic=True)", ours="torch.compile, token dimension symbolic only")


if __name__ == "__main__":
    main()
