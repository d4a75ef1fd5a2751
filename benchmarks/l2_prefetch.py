"""CUDA only. Does prefetching the output projection's weights into L2 during the decode attention pay?

One 8B-shaped decode layer at batch 1 (bf16): q/k/v GEMM, attention, o GEMM, gate/up GEMM, down GEMM. The
attention is the engine's InfLLM v2 decode step at 128K (`paged_sparse_decode`, random cache) or, with
`--sleep-us`, a one-thread spin of that length (the attention's shape in time: long, few SMs, little HBM).
8 layers of distinct weights (3.5 GB: nothing stays in L2 from one to the next), replayed from one CUDA graph;
milliseconds per layer. Variants: no prefetch; the o weights (32 MB) prefetched on a side stream that forks before
the attention and joins before the o GEMM (`prefetch_l2` below, by loads with 32/64/128 programs, or by sm_90
bulk prefetches); the o weights plus the first 16 MB of gate/up. At batch 1 HBM idles during the attention
(≈ 25-30 µs on a few SMs, a few MB moved) while the o GEMM's weights wait; L2 (50 MB on the H200) could hold them.

    python benchmarks/l2_prefetch.py [--context 131072] [--sleep-us 0] [--tag TAG]

Table and JSON (`benchmarks/results/l2_prefetch[-TAG]-<date>.json`); `ours_ms` a variant, `peer_ms` no prefetch.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from common import paged_decode_state, print_rows, write_rows  # noqa: E402

# The prefetch, kept here with the measurement that dropped it (RESULTS.md, eleventh GPU pass): on the H200 it
# saved at most 2 µs a layer. Two ways: `bulk=True` (sm_90 and up), one `cp.async.bulk.prefetch.L2` per lane
# (a TMA bulk prefetch: no registers, nothing returned to the SM); otherwise plain loads with `evict_last`, folded
# into an xor that is stored only in the impossible case it equals a magic value (so the compiler keeps the loads).
_MAGIC = 0x5EED5EED


@triton.jit
def _prefetch_loads_kernel(ptr, n, sink, MAGIC: tl.constexpr, BLOCK: tl.constexpr, ITERS: tl.constexpr):
    pid = tl.program_id(0)
    start = pid.to(tl.int64) * (BLOCK * ITERS)
    acc = tl.zeros([BLOCK], tl.int32)
    for i in range(ITERS):
        offs = start + i * BLOCK + tl.arange(0, BLOCK)
        acc ^= tl.load(ptr + offs, mask=offs < n, other=0, eviction_policy="evict_last")
    x = tl.xor_sum(acc, 0)
    tl.store(sink + pid, x, mask=x == MAGIC)


@triton.jit
def _prefetch_bulk_kernel(ptr, nbytes, LANES: tl.constexpr, CHUNK: tl.constexpr):
    # ptr: bytes (uint8). Each lane prefetches CHUNK bytes (a multiple of 16), the last lanes what is left.
    pid = tl.program_id(0)
    off = pid.to(tl.int64) * (LANES * CHUNK) + tl.arange(0, LANES).to(tl.int64) * CHUNK
    size = tl.minimum(tl.maximum(nbytes - off, 0), CHUNK).to(tl.int32)
    # a zero-size bulk prefetch is not allowed: lanes past the end prefetch the tensor's first 16 bytes instead
    addr = ptr + tl.where(size > 0, off, 0)
    size = tl.where(size > 0, size, 16)
    tl.inline_asm_elementwise("cp.async.bulk.prefetch.L2.global [$1], $2;\n\tmov.u32 $0, 0;", "=r,l,r",
                              [addr, size], dtype=tl.int32, is_pure=False, pack=1)


_SINKS: dict[torch.device, torch.Tensor] = {}


def prefetch_l2(t: torch.Tensor, programs: int = 64, bulk: bool | None = None) -> None:
    """Start reading `t` (contiguous) into L2 on the current stream; returns at once. `programs`: how many
    programs share the reading (few: it runs beside other kernels). `bulk`: the sm_90 bulk prefetch (None: on
    sm_90 and up)."""
    if not t.is_contiguous():
        raise ValueError("prefetch_l2: the tensor must be contiguous")
    nbytes = t.numel() * t.element_size()
    if nbytes == 0:
        return
    if bulk is None:
        bulk = t.is_cuda and torch.cuda.get_device_capability(t.device)[0] >= 9
    if bulk:
        if nbytes % 16 or t.data_ptr() % 16:
            raise ValueError("prefetch_l2(bulk=True): the tensor's address and size must be multiples of 16 bytes")
        lanes = 128
        chunk = max(16, triton.cdiv(triton.cdiv(nbytes, programs * lanes), 16) * 16)
        grid = triton.cdiv(nbytes, lanes * chunk)
        _prefetch_bulk_kernel[(grid,)](t.view(torch.uint8), nbytes, LANES=lanes, CHUNK=chunk, num_warps=4)
        return
    if nbytes % 4:
        raise ValueError("prefetch_l2: the tensor's size must be a multiple of 4 bytes")
    words = t.view(-1).view(torch.int32)
    n = words.numel()
    block = 1024
    iters = max(1, triton.cdiv(n, programs * block))
    grid = triton.cdiv(n, block * iters)
    sink = _SINKS.get(t.device)
    if sink is None or sink.numel() < grid:
        sink = _SINKS[t.device] = torch.zeros(max(grid, 256), dtype=torch.int32, device=t.device)
    _prefetch_loads_kernel[(grid,)](words, n, sink, MAGIC=_MAGIC, BLOCK=block, ITERS=iters, num_warps=4)


def bench_graph(fn, rep: int = 20) -> float:
    """Median ms of one replay of a graph holding `fn` (after a warm-up call outside the graph)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    for _ in range(3):
        g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(rep):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[rep // 2]


def attention_step(n: int):
    """The engine's InfLLM v2 decode step of one layer at `n` cached tokens (random cache), as attention.py."""
    from cpm4.kernels.infllm_v2.triton_decode import paged_sparse_decode
    from cpm4.kernels.infllm_v2.triton_select import compress
    from cpm4.model.config import SparseConfig

    hq, hkv, d = 32, 2, 128
    cfg = SparseConfig(variant="gen-b", dense_len=-1)
    k = torch.randn(n, hkv, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    k1 = compress(k, cfg.kernel_size, cfg.kernel_stride)
    k2 = compress(k, cfg.coarse_kernel_size, cfg.coarse_kernel_stride)
    kc, vc, table, lens, fine, coarse = paged_decode_state(k, v, k1, k2, cfg)
    pages = kc.shape[0]
    q1 = torch.randn(1, hq, d, device="cuda", dtype=torch.bfloat16)
    slot = torch.tensor([(pages - 1) * 64 + (n - 1) % 64], device="cuda")
    k_new, v_new = k[-1:].clone(), v[-1:].clone()
    return lambda: paged_sparse_decode(q1, kc, vc, table, lens, fine, coarse, cfg, d ** -0.5,
                                       new_kv=(k_new, v_new, slot))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--context", type=int, default=131072)
    ap.add_argument("--sleep-us", type=float, default=0, help="a spin of this length instead of the attention")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--tag", default="", help="appended to the JSON's name")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("l2_prefetch.py needs a CUDA GPU")
    torch.manual_seed(0)
    hidden, inter, qkv_out = 4096, 16384, 4096 + 2 * 2 * 128

    def w(o, i):
        return torch.randn(o, i, device="cuda", dtype=torch.bfloat16) * 0.01

    layers = [(w(qkv_out, hidden), w(hidden, hidden), w(2 * inter, hidden), w(hidden, inter))
              for _ in range(args.layers)]
    x = torch.randn(1, hidden, device="cuda", dtype=torch.bfloat16)
    if args.sleep_us:
        cycles = int(args.sleep_us * torch.cuda.get_device_properties(0).clock_rate * 1e-3)  # clock_rate: kHz
        attend = lambda: torch.cuda._sleep(cycles)  # noqa: E731
    else:
        attend = attention_step(args.context)
    side = torch.cuda.Stream()

    def run(prefetch=None, attention=True, gemms=True):
        h = x
        for wqkv, wo, wgu, wd in layers:
            if gemms:
                F.linear(h, wqkv)
            if prefetch is not None:
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    prefetch(wo, wgu)
            if attention:
                attend()
            if prefetch is not None:
                torch.cuda.current_stream().wait_stream(side)
            if gemms:
                a = F.linear(h, wo)
                g = F.linear(a, wgu)
                h = F.linear(g[:, :inter] * g[:, inter:], wd)
        return h

    n = len(layers)
    base = bench_graph(run) / n
    gate_up_16mb = 16 * 2**20 // (hidden * 2)  # rows of gate/up in 16 MB
    variants = {
        "attention_only": lambda: run(gemms=False),
        "gemms_only": lambda: run(attention=False),
        "prefetch_o.loads32": lambda: run(lambda wo, wgu: prefetch_l2(wo, 32, bulk=False)),
        "prefetch_o.loads64": lambda: run(lambda wo, wgu: prefetch_l2(wo, 64, bulk=False)),
        "prefetch_o.loads128": lambda: run(lambda wo, wgu: prefetch_l2(wo, 128, bulk=False)),
        "prefetch_o.bulk": lambda: run(lambda wo, wgu: prefetch_l2(wo, 64, bulk=True)),
        "prefetch_o_gu16.bulk": lambda: run(lambda wo, wgu: (prefetch_l2(wo, 64, bulk=True),
                                                             prefetch_l2(wgu[:gate_up_16mb], 32, bulk=True))),
        "prefetch_o_gu16.loads64": lambda: run(lambda wo, wgu: (prefetch_l2(wo, 64, bulk=False),
                                                                prefetch_l2(wgu[:gate_up_16mb], 32, bulk=False))),
    }
    attn = f"sleep {args.sleep_us:g} us" if args.sleep_us else f"InfLLM v2 decode at {args.context}"
    rows = [{"phase": "layer", "seqlen": args.context, "ours_ms": round(base, 4), "peer_ms": round(base, 4),
             "speedup": 1.0}]
    for name, fn in variants.items():
        try:
            t = bench_graph(fn) / n
        except Exception as e:  # noqa: BLE001 - a variant that fails loses its row only
            print(f"{name}: failed: {e!r}")
            continue
        peer = None if name in ("attention_only", "gemms_only") else round(base, 4)
        rows.append({"phase": f"layer.{name}", "seqlen": args.context, "ours_ms": round(t, 4), "peer_ms": peer,
                     "speedup": None if peer is None else round(base / t, 3)})
    dev = torch.cuda.get_device_name()
    print(f"device: {dev}; attention: {attn}; ms per layer")
    print_rows(rows, digits=4)
    write_rows("l2_prefetch" + (f"-{args.tag}" if args.tag else ""), dev, rows, args.out, attention=attn)


if __name__ == "__main__":
    main()
