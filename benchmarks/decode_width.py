"""The InfLLM v2 decode step against its block table's width, one layer of the 8B shape (CUDA only).

The step's selection runs over the next power of two of the table's columns (a compile-time size), however many
blocks the sequence has: the engine's table is as wide as its longest context, so a 128K context with a few decode
tokens (2,049 blocks) selects over 4,096 lanes where attention.py's 131,072-token row (2,048 blocks) uses 2,048.
Rows: the step (CUDA graph, cold L2, as attention.py's decode.cuda_graph) at a cache length with the table exactly
as wide as its pages, and padded to wider tables; peer: the exact-width table at the same length. Then the same
with every stage's split count pinned (rows `.splits<N>`): since the selection picks fewer lanes at run time (the
twelfth GPU pass), a 64K context in a 4,096-column table still took 27.0 µs against 22.6 in its own 1,024-column
one; the registers are not it (cuobjdump: 72 → 96 a thread, no local memory); the pinned rows show how much of
the rest is the LSE and score stages' split counts, which grow with the width.

    python benchmarks/decode_width.py --lengths 65536 131072 131104
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import cold_graph_ms, paged_decode_state, print_rows, write_rows  # noqa: E402

from cpm4.model.config import SparseConfig  # noqa: E402


def time_length(n: int, widths: list[int]) -> list[dict]:
    """The step at cache length n with the exact table and with each wider one in `widths`."""
    import triton

    from cpm4.kernels.infllm_v2.triton_decode import paged_sparse_decode
    from cpm4.kernels.infllm_v2.triton_select import compress, num_sms

    hq, hkv, d = 32, 2, 128
    cfg = SparseConfig(variant="gen-b", dense_len=-1)
    k = torch.randn(n, hkv, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(n, hkv, d, device="cuda", dtype=torch.bfloat16)
    q = torch.randn(1, hq, d, device="cuda", dtype=torch.bfloat16)
    k1 = compress(k, cfg.kernel_size, cfg.kernel_stride)
    k2 = compress(k, cfg.coarse_kernel_size, cfg.coarse_kernel_stride)
    kc, vc, table, lens, fine, coarse = paged_decode_state(k, v, k1, k2, cfg)
    pages = table.shape[1]
    # Also every stage's split count pinned to what the exact table gives the LSE and score stages (those grow with
    # the table's width: programs past the sequence's blocks have nothing to do): what is left of a wider table's
    # cost is its compile-time sizes. Peer of those rows: the exact table with the same splits.
    pinned = min(triton.cdiv(2 * num_sms(q.device), hkv), triton.cdiv(pages, 16))  # as _default_splits
    rows = []
    for splits in (None, pinned):
        exact = ref = None
        for width in [pages] + [w for w in widths if w > pages]:
            wide = torch.zeros(1, width, device="cuda", dtype=torch.int32)
            wide[:, :pages] = table

            def step(wide=wide, splits=splits):
                return paged_sparse_decode(q, kc, vc, wide, lens, fine, coarse, cfg, d ** -0.5, splits=splits)
            out = step()
            if exact is None:
                exact, ref = cold_graph_ms(step), out
            elif not torch.equal(out, ref):
                raise SystemExit(f"the step at {n} tokens gave another output with a {width}-column table")
            ms = exact if width == pages else cold_graph_ms(step)
            tag = "" if splits is None else f".splits{splits}"
            rows.append({"phase": f"decode.cuda_graph.width{width}.lanes{2 ** math.ceil(math.log2(width))}{tag}",
                         "seqlen": n, "ours_ms": ms, "peer_ms": exact, "speedup": exact / ms})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[65536, 131072, 131104])
    ap.add_argument("--widths", type=int, nargs="+", default=[2049, 2064, 4096],
                    help="table widths (columns) to time besides the exact one; those below the pages are skipped")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("decode_width.py needs a CUDA GPU")
    torch.manual_seed(0)
    rows = [r for n in args.lengths for r in time_length(n, args.widths)]
    print_rows(rows, digits=4)
    write_rows("decode_width", torch.cuda.get_device_name(), rows, args.out)


if __name__ == "__main__":
    main()
