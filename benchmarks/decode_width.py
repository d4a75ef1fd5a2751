"""The InfLLM v2 decode step against its block table's width, one layer of the 8B shape (CUDA only).

The step's selection runs over the next power of two of the table's columns (a compile-time size), however many
blocks the sequence has: the engine's table is as wide as its longest context, so a 128K context with a few decode
tokens (2,049 blocks) selects over 4,096 lanes where attention.py's 131,072-token row (2,048 blocks) uses 2,048.
Rows: the step (CUDA graph, cold L2, as attention.py's decode.cuda_graph) at a cache length with the table exactly
as wide as its pages, and padded to wider tables, first with the split counts as they were, then rounded down to a
power of two (`triton_decode.SPLITS_POW2`, rows `.pow2`; `--pow2-first` swaps the order, since rows of one run
drift by a few µs); peer: the exact-width table without rounding. An earlier pass pinned every stage's split count
to the exact table's and the wider tables then cost nothing more: the extra time was the LSE and score stages'
129-132 splits, whose consumers pad the partials to 256 (RESULTS.md, fourteenth GPU pass).

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


def time_length(n: int, widths: list[int], pow2_first: bool = False) -> list[dict]:
    """The step at cache length n with the exact table and with each wider one in `widths`."""
    from cpm4.kernels.infllm_v2 import triton_decode
    from cpm4.kernels.infllm_v2.triton_select import compress

    hq, hkv, d = 32, 2, 128
    cfg = SparseConfig(variant="gen-b", dense_len=-1)
    k = torch.randn(n, hkv, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(n, hkv, d, device="cuda", dtype=torch.bfloat16)
    q = torch.randn(1, hq, d, device="cuda", dtype=torch.bfloat16)
    k1 = compress(k, cfg.kernel_size, cfg.kernel_stride)
    k2 = compress(k, cfg.coarse_kernel_size, cfg.coarse_kernel_stride)
    kc, vc, table, lens, fine, coarse = paged_decode_state(k, v, k1, k2, cfg)
    pages = table.shape[1]
    # Then the default split counts rounded down to a power of two (triton_decode.SPLITS_POW2, rows .pow2): an
    # earlier pass pinned every stage's splits to the exact table's and the wider tables cost no more, so the
    # extra time was the LSE and score stages' split counts (129-132: merges padded to 256). Peer of every row:
    # the exact table without the rounding.
    rows = []
    ref = None
    saved = triton_decode.SPLITS_POW2
    try:
        for pow2 in ((True, False) if pow2_first else (False, True)):
            triton_decode.SPLITS_POW2 = pow2
            for width in [pages] + [w for w in widths if w > pages]:
                wide = torch.zeros(1, width, device="cuda", dtype=torch.int32)
                wide[:, :pages] = table

                def step(wide=wide):
                    return triton_decode.paged_sparse_decode(q, kc, vc, wide, lens, fine, coarse, cfg, d ** -0.5)
                out = step()
                if ref is None:
                    ref = out
                elif not torch.allclose(out.float(), ref.float(), atol=2e-2, rtol=2e-2):
                    raise SystemExit(f"the step at {n} tokens gave another output with a {width}-column table")
                ms = cold_graph_ms(step)
                tag = ".pow2" if pow2 else ""
                rows.append({"phase": f"decode.cuda_graph.width{width}.lanes{2 ** math.ceil(math.log2(width))}{tag}",
                             "seqlen": n, "ours_ms": ms})
    finally:
        triton_decode.SPLITS_POW2 = saved
    exact = rows[0 if not pow2_first else len(rows) // 2]["ours_ms"]  # the exact table without the rounding
    for r in rows:
        r.update(peer_ms=exact, speedup=exact / r["ours_ms"])
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[65536, 131072, 131104])
    ap.add_argument("--widths", type=int, nargs="+", default=[2049, 2064, 4096],
                    help="table widths (columns) to time besides the exact one; those below the pages are skipped")
    ap.add_argument("--pow2-first", action="store_true", help="time the rounded split counts first (a check that "
                    "the order of the rows is not what differs)")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("decode_width.py needs a CUDA GPU")
    torch.manual_seed(0)
    rows = [r for n in args.lengths for r in time_length(n, args.widths, args.pow2_first)]
    print_rows(rows, digits=4)
    write_rows("decode_width", torch.cuda.get_device_name(), rows, args.out)


if __name__ == "__main__":
    main()
