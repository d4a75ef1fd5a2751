"""Cascade decode against the plain paged decode, one layer, CUDA graphs, cold L2.

B rows decode after the same P-token prefix (its pages shared, as prefix caching leaves them) plus their own
tokens. Ours: `paged_decode(..., shared=SharedPrefix)` (the prefix attended once per KV head and tile of rows,
`cpm4/kernels/infllm_v2/triton_cascade.py`); peer: `paged_decode` reading every row's every page. Same inputs,
same run; the outputs are compared too.

    python benchmarks/cascade_decode.py                                   # 8B and 0.5B shapes
    python benchmarks/cascade_decode.py --shapes 8b --batches 64 --prefixes 4096
    python benchmarks/cascade_decode.py --empty      # also the cascade step without a group (count 0)
    python benchmarks/cascade_decode.py --groups 1 2 4   # the rows split over that many prefixes (a row each)
    python benchmarks/cascade_decode.py --groups 2 4 --unsorted   # also with the rows' tiles in arrival order

Prints a table and writes benchmarks/results/cascade_decode[-slots<N>][<tag>]-<date>.json (rows: phase
`cascade_decode.<shape>.b<B>[.g<groups>]`, seqlen = P, each group's prefix). With --groups, row i follows prefix
i mod groups; the `SharedPrefix` holds --slots group slots (default paged.CASCADE_DECODE_GROUPS, as the engine's
graphs), the unused ones with count 0; the shared kernel's tiles take the rows by group (`SharedPrefix.order`),
with --unsorted also in arrival order (`.unsorted`: every tile holds rows of every group).
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from common import cold_graph_ms, print_rows, write_rows  # noqa: E402

from cpm4.engine import paged  # noqa: E402
from cpm4.kernels.infllm_v2 import triton_cascade  # noqa: E402
from cpm4.kernels.infllm_v2.triton_cascade import SharedPrefix  # noqa: E402
from cpm4.kernels.infllm_v2.triton_decode import paged_decode  # noqa: E402

SHAPES = {"8b": (32, 2, 128), "0.5b": (16, 2, 64)}  # query heads, KV heads, head dim
PAGE = 64


def inputs(b: int, plen: int, own: int, hq: int, hkv: int, d: int, seed: int = 0, device: str = "cuda",
           dtype: torch.dtype = torch.bfloat16, groups: int = 1, slots: int = 1):
    """Caches with `groups` prefixes of P/64 pages each, row i after prefix i mod groups, then each row's own
    pages (1 to `own` tokens of its own, the current one included), table, lengths and the `SharedPrefix` of
    every row (`slots` group slots)."""
    g = torch.Generator(device=device).manual_seed(seed)
    shared = plen // PAGE
    own_lens = torch.randint(1, own + 1, (b,), generator=g, device=device)
    own_pages = (own_lens + PAGE - 1) // PAGE
    width = shared + int(own_pages.max())
    n_pages = groups * shared + b * (width - shared) + 1
    kc = torch.randn(n_pages, PAGE, hkv, d, generator=g, device=device).to(dtype)
    vc = torch.randn(n_pages, PAGE, hkv, d, generator=g, device=device).to(dtype)
    table = torch.empty(b, width, dtype=torch.int32, device=device)
    group = torch.arange(b, device=device) % groups
    table[:, :shared] = (group[:, None] * shared + torch.arange(shared, device=device)).to(torch.int32)
    table[:, shared:] = groups * shared + torch.arange(b * (width - shared), dtype=torch.int32,
                                                       device=device).view(b, -1)
    lens = (shared * PAGE + own_lens).to(torch.int32)
    q = torch.randn(b, hq, d, generator=g, device=device).to(dtype)
    pages = torch.zeros(max(slots, groups), width, dtype=torch.int32, device=device)
    pages[:groups] = table[:groups]
    count = torch.zeros(pages.shape[0], dtype=torch.int32, device=device)
    count[:groups] = shared
    sp = SharedPrefix(pages, count, (group + 1).to(torch.int32))
    return q, kc, vc, table, lens, sp


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--batches", type=int, nargs="+", default=[8, 32, 64, 128])
    ap.add_argument("--prefixes", type=int, nargs="+", default=[1024, 4096, 16384], help="shared tokens (x 64)")
    ap.add_argument("--own", type=int, default=256, help="each row's own tokens: 1 .. this many")
    ap.add_argument("--tile-queries", type=int, nargs="+", default=[64],
                    help="query vectors per program (triton_cascade.TILE_QUERIES); several: a row per value")
    ap.add_argument("--own-splits", type=int, nargs="+", default=[0],
                    help="splits of the rows' own pages (SharedPrefix.own_splits; 0: the paged decode's default); "
                    "several: a row per value")
    ap.add_argument("--groups", type=int, nargs="+", default=[1],
                    help="prefixes the rows are split over (row i after prefix i mod groups); several: a row each")
    ap.add_argument("--slots", type=int, default=None,
                    help="group slots of the SharedPrefix (default paged.CASCADE_DECODE_GROUPS, as the engine's "
                    "graphs; 1: a single group's buffers)")
    ap.add_argument("--empty", action="store_true",
                    help="also time the step with no group (count 0: a captured cascade step without sharing)")
    ap.add_argument("--unsorted", action="store_true",
                    help="also time the tiles taking the rows in arrival order (groups interleaved)")
    ap.add_argument("--tag", default="", help="appended to the JSON's name")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("cascade_decode.py times CUDA kernels: no CUDA device here")
    rows, slots = [], args.slots or paged.CASCADE_DECODE_GROUPS
    for shape in args.shapes:
        hq, hkv, d = SHAPES[shape]
        for b in args.batches:
            for plen, groups in itertools.product(args.prefixes, args.groups):
                if plen % PAGE:
                    sys.exit(f"--prefixes must be whole pages of {PAGE} tokens, got {plen}")
                if not 1 <= groups <= b:
                    sys.exit(f"--groups must be 1 .. the batch ({b}), got {groups}")
                x = inputs(b, plen, args.own, hq, hkv, d, groups=groups, slots=slots)
                sp = x[-1]
                gtag = "" if args.groups == [1] else f".g{groups}"

                def ours(x=x, sp=sp):
                    return paged_decode(*x[:-1], shared=sp)

                def peer(x=x):
                    return paged_decode(*x[:-1])

                t_peer = cold_graph_ms(peer)
                for tq, own in itertools.product(args.tile_queries, args.own_splits):
                    triton_cascade.TILE_QUERIES = tq
                    SharedPrefix.own_splits = own or None
                    diff = (ours().float() - peer().float()).abs().max().item()
                    t_ours = cold_graph_ms(ours)
                    tag = gtag + ("" if len(args.tile_queries) == 1 else f".tq{tq}") + \
                        ("" if len(args.own_splits) == 1 else f".own{own or 'default'}")
                    rows.append({"phase": f"cascade_decode.{shape}.b{b}{tag}", "seqlen": plen,
                                 "ours_ms": round(t_ours, 4), "peer_ms": round(t_peer, 4),
                                 "speedup": round(t_peer / t_ours, 2), "max_abs_diff": diff})
                    print(f"  {shape} B={b} P={plen} groups {groups} tile {tq} own splits {own or 'default'}: ours "
                          f"{t_ours * 1000:.1f} us, plain {t_peer * 1000:.1f} us, max |diff| {diff:.2e}", flush=True)
                variants = []  # (phase suffix, the step's groups)
                if args.unsorted and groups > 1:  # the tiles in arrival order: every tile holds every group's rows
                    variants.append((".unsorted", SharedPrefix(sp.pages, sp.count, sp.member,
                                                               torch.arange(b, dtype=torch.int32,
                                                                            device=sp.member.device))))
                if args.empty:  # no group: a captured cascade step without sharing
                    variants.append((".empty", SharedPrefix(sp.pages, torch.zeros_like(sp.count),
                                                            torch.zeros_like(sp.member))))
                for suffix, shared in variants:

                    def variant(x=x, shared=shared):
                        return paged_decode(*x[:-1], shared=shared)

                    diff = (variant().float() - peer().float()).abs().max().item()
                    t_var = cold_graph_ms(variant)
                    rows.append({"phase": f"cascade_decode.{shape}.b{b}{gtag}{suffix}", "seqlen": plen,
                                 "ours_ms": round(t_var, 4), "peer_ms": round(t_peer, 4),
                                 "speedup": round(t_peer / t_var, 2), "max_abs_diff": diff})
    print()
    print(f"cascade decode vs plain paged decode, one layer, CUDA graphs, cold L2 ({torch.cuda.get_device_name()})")
    print_rows(rows, digits=4)
    name = "cascade_decode" + ("" if slots == paged.CASCADE_DECODE_GROUPS else f"-slots{slots}") + args.tag
    write_rows(name, torch.cuda.get_device_name(), rows, args.out, own_tokens=args.own, slots=slots)


if __name__ == "__main__":
    main()
