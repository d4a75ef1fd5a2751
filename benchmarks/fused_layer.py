"""CUDA only. A decode layer's work around its attention at one row (batch-1 decode), four ways, per layer:

- plain (the peer): cuBLAS for q/k/v, o, gate/up and down, the norms, RoPE, residual adds and SiLU·up compiled
  by inductor across the layers, as the engine's compiled decode step runs them;
- gemv: the same with q/k/v, o and down through the Triton GEMV (`gemv.DECODE_GEMV`'s small-model plan);
- fused: four GEMVs with the norms, RoPE, SiLU·up and residual adds inside them (`gemv.FUSE_LAYERS`,
  `DecoderLayer._fused`);
- fused-pdl: the same with the GEMVs as programmatic dependent launches (`triton_gemv.PDL`; Hopper).

(SiLU·up in gate/up's epilogue was a fifth way, measured and dropped: RESULTS.md, thirty-fifth GPU pass.)
The attention is left out (the same in all): each layer's o projection reads a fixed stand-in for its output.
Enough layers of distinct weights (>= 1 GB) that they stream from HBM as in a decode step; the chain compiled,
captured as one CUDA graph and replayed; µs per layer.

    python benchmarks/fused_layer.py [--config minicpm4-0.5b minicpm4-8b] [--tag TAG]

Table and JSON (`benchmarks/results/fused_layer[-TAG]-<date>.json`; `peer_ms` the plain chain).
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
from cpm4.kernels.gemv import triton_gemv  # noqa: E402
from cpm4.model import fused  # noqa: E402
from cpm4.model.config import preset  # noqa: E402


def layer_weights(cfg, n: int, dt: torch.dtype) -> list[dict]:
    h, i, hq, hkv, d = (cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads, cfg.num_key_value_heads,
                        cfg.dim_head)

    def w(rows: int, cols: int) -> torch.Tensor:
        return torch.randn(rows, cols, device="cuda", dtype=dt) / cols ** 0.5

    return [dict(qkv=w((hq + 2 * hkv) * d, h), o=w(h, hq * d), gate_up=w(2 * i, h), down=w(h, i),
                 g1=1 + 0.1 * torch.randn(h, device="cuda", dtype=dt), g2=1 + 0.1 * torch.randn(h, device="cuda",
                                                                                                    dtype=dt))
            for _ in range(n)]


def chains(eps: float, scale: float, heads: int, rotated: int, d: int) -> dict:
    """The three ways, each fn(x, a, layers, cos, sin) -> (x after the layers, each layer's rotated q/k [1, rotated *
    d]): heads q/k/v heads of d, the first `rotated` of them (q and k) through RoPE with the tables cos, sin [1, d]."""
    from cpm4.kernels.gemv import fused_linear, linear

    def plain(x, a, layers, cos, sin, lin=F.linear, proj=F.linear):
        qks = []
        for p in layers:
            y = proj(fused.rms_norm(x, p["g1"], eps), p["qkv"]).view(1, 1, heads, d)
            qks.append(fused.rotary(y[:, :, :rotated], cos[:, None], sin[:, None]).reshape(1, rotated * d))
            x, hn = fused.add_rms_norm(x, proj(a, p["o"]), scale, p["g2"], eps)
            gate, up = lin(hn, p["gate_up"]).chunk(2, dim=-1)
            x = fused.add_scaled(x, proj(fused.silu_mul(gate, up), p["down"]), scale)
        return x, qks

    def gemv(x, a, layers, cos, sin):
        return plain(x, a, layers, cos, sin, proj=lambda v, w: linear(v, w, max_rows=1))

    def fused_chain(x, a, layers, cos, sin):
        qks = []
        for p in layers:
            y = fused_linear(x, p["qkv"], norm=(p["g1"], eps), rope=(cos, sin, rotated * d, d))
            qks.append(y[:, :rotated * d])
            x = fused_linear(a, p["o"], residual=x, scale=scale)
            hn = fused_linear(x, p["gate_up"], norm=(p["g2"], eps))
            x = fused_linear(hn, p["down"], glu=True, residual=x, scale=scale)
        return x, qks

    return {"plain": plain, "gemv": gemv, "fused": fused_chain, "fused-pdl": fused_chain}


def graph_us(fn, x, a, layers, cos, sin, reps: int = 20) -> tuple[float, torch.Tensor]:
    """µs per layer of fn over the layers, compiled, captured once and replayed; and its output."""
    step = torch.compile(fn, dynamic=False)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):  # compile, autotune, warm
            step(x, a, layers, cos, sin)
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with capture_graph(g):
        out = step(x, a, layers, cos, sin)
    return replay_ms(g, reps) * 1e3 / len(layers), out[0].clone()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", nargs="+", default=["minicpm4-0.5b", "minicpm4-8b"])
    ap.add_argument("--tag", default="")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("fused_layer.py measures CUDA kernels: no CUDA device here")
    dt = torch.bfloat16
    rows = []
    print(f"{'config':<15}{'variant':<14}{'us/layer':>10}{'plain':>9}{'speed-up':>9}{'max diff':>10}")
    for name in args.config:
        cfg = preset(name)
        per_layer = 2 * cfg.hidden_size * ((cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * cfg.dim_head
                                           + cfg.num_attention_heads * cfg.dim_head + 3 * cfg.intermediate_size)
        layers = layer_weights(cfg, max(4, -(-2**30 // per_layer)), dt)
        x = torch.randn(1, cfg.hidden_size, device="cuda", dtype=dt)
        a = torch.randn(1, cfg.num_attention_heads * cfg.dim_head, device="cuda", dtype=dt)
        hq, hkv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.dim_head
        angle = torch.rand(1, d // 2, device="cuda") * 6
        cos, sin = torch.cat([angle.cos()] * 2, 1), torch.cat([angle.sin()] * 2, 1)
        ways = chains(cfg.rms_norm_eps, cfg.residual_scale, hq + 2 * hkv, hq + hkv, d)
        timed = {}
        for v, fn in ways.items():
            if v.endswith("-pdl") and torch.cuda.get_device_capability()[0] < 9:
                continue
            before, triton_gemv.PDL = triton_gemv.PDL, v.endswith("-pdl")  # read at each launch inside the op
            try:
                timed[v] = graph_us(lambda *t, fn=fn: fn(*t), x, a, layers, cos, sin)
            finally:
                triton_gemv.PDL = before
        peer, ref = timed["plain"]
        for v, (us, out) in timed.items():
            diff = (out.float() - ref.float()).abs().max().item()
            print(f"{name:<15}{v:<14}{us:>10.2f}{peer:>9.2f}{peer / us:>8.2f}x{diff:>10.3g}")
            rows.append(dict(phase=f"layer.{v}", seqlen=None, config=name, ours_ms=us / 1e3, peer_ms=peer / 1e3,
                             speedup=round(peer / us, 3), max_abs_diff=diff, layers=len(layers)))
        del layers
    write_rows("fused_layer" + args.tag, torch.cuda.get_device_name(), rows, args.out, dtype="bfloat16",
               peer="cuBLAS + inductor's element-wise kernels", unit="per layer")


if __name__ == "__main__":
    main()
