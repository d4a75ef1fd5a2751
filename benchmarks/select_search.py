"""The prefill selection's top-k threshold searches on the 8B attention shape (CUDA only).

`select_blocks` with the binary search over every key value (narrow=False) and over the unforced keys' range
(True, the default), on stage 1's scores of random inputs and on those scores raised
to the 8th power (spread over many exponents, as a model's scores are, so the range is wide). Peer: the default
search in the same run. Each search's blocks are checked equal to the default's. Prints a table and writes
`benchmarks/results/select_search-<date>.json`. (Its runs of 2026-11-29 also timed a five-way search and two
histogram passes (radix), both since removed: RESULTS.md, twelfth and thirteenth GPU passes.)

    python benchmarks/select_search.py --lengths 32768 131072
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import triton

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import print_rows, write_rows  # noqa: E402

from cpm4.model.config import SparseConfig  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[32768, 131072])
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("select_search.py needs a CUDA GPU")
    from cpm4.kernels.infllm_v2.triton_select import block_scores, compress, select_blocks

    torch.manual_seed(0)
    cfg = SparseConfig(variant="gen-b", dense_len=-1)
    rows = []
    for n in args.lengths:
        q = torch.randn(n, 32, 128, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(n, 2, 128, device="cuda", dtype=torch.bfloat16)
        k1 = compress(k, cfg.kernel_size, cfg.kernel_stride)
        k2 = compress(k, cfg.coarse_kernel_size, cfg.coarse_kernel_stride)
        scores = block_scores(q, k1, k2, 0, cfg, 128 ** -0.5)
        del q, k
        for label, s in (("random", scores), ("spread", (scores.float() ** 8).to(scores.dtype))):
            times = {}

            def select(narrow, s=s, n=n, n1=k1.shape[0]):
                return select_blocks(s, 0, n, n1, cfg, narrow=narrow)
            ref = select(True)
            for name, narrow in (("full_range", False), ("binary", True)):
                if not torch.equal(select(narrow), ref):
                    raise SystemExit(f"{name} selected other blocks than the binary search at {n} ({label})")
                times[name] = triton.testing.do_bench(lambda a=narrow: select(a), warmup=3, rep=40)
            for name, ms in times.items():
                rows.append({"phase": f"prefill.select.{name}.{label}", "seqlen": n, "ours_ms": ms,
                             "peer_ms": times["binary"], "speedup": times["binary"] / ms})
        del scores
    print_rows(rows)
    write_rows("select_search", torch.cuda.get_device_name(), rows, args.out)


if __name__ == "__main__":
    main()
