"""Engine decode steps on the CPU with several sequences past dense_len (InfLLM v2 rows): one pass over all
rows (`infllm_v2.sparse_decode_rows`) against one pass per row (`Attention.batch_sparse_decode = False`), in
the same run, through `LLMEngine` on the bundled demo model (dense_len 512).

    python benchmarks/cpu_engine_decode.py [--rows 4 8] [--length 1000]
    python benchmarks/cpu_engine_decode.py --peer table-gather --length 400 1000
    python benchmarks/cpu_engine_decode.py --peer token-gather --length 1000 2000 4000
    python benchmarks/cpu_engine_decode.py --peer unfused --rows 1 4 8 --length 100 1000

--peer picks what the same engine runs as the peer: per-row (default: one InfLLM v2 pass per row), table-gather
(the page gather indexing the cache by the 2-D block table, the earlier form of `PagedBatch.gather`; dense or
sparse rows), token-gather (stage 4 of the one-pass decode always gathering each row's selected tokens, never
the dense pass masked by the selection: `cpu.DENSE_FRACTION = 0`), unfused (the model's separate q/k/v and
gate/up weights, `LLMEngine.fuse_weights = False`, against the one fused GEMM each; dense or sparse rows).

Prompts of --length random tokens, greedy, 60 new tokens each; ms per decode step (prefill excluded). Both
produce the same tokens (checked). Prints a table, writes benchmarks/results/cpu_engine_decode-<date>.json.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from common import covering_tokenizer, cpu_device, write_rows  # noqa: E402

from cpm4 import SamplingParams  # noqa: E402
from cpm4.engine.paged import PagedBatch, PagedKVCache, page_size_for  # noqa: E402
from cpm4.engine.scheduler import LLMEngine  # noqa: E402
from cpm4.model.checkpoint import load_checkpoint  # noqa: E402
from cpm4.model.modeling import Attention  # noqa: E402


def decode(model, tok, reqs: list[list[int]], new: int) -> tuple[float, dict]:
    """ms per decode step of the requests run together, and their tokens."""
    ps = page_size_for(model.config)
    cache = PagedKVCache(model.config, sum(-(-(len(r) + new) // ps) for r in reqs) + 1, ps)
    eng = LLMEngine(model, tok, cache, max_batch_size=len(reqs), chunk_tokens=sum(map(len, reqs)))
    for i, p in enumerate(reqs):
        eng.add_request(f"r{i}", p, SamplingParams(temperature=0, max_tokens=new, ignore_eos=True))
    out: dict[str, list[int]] = {}
    for rid, d in eng.step():  # the prefill step
        out.setdefault(rid, []).extend(d.token_ids)
    steps, t = 0, time.perf_counter()
    while eng.has_work():
        for rid, d in eng.step():
            out.setdefault(rid, []).extend(d.token_ids)
        steps += 1
    return (time.perf_counter() - t) * 1000 / steps, out


def table_index_gather(store: torch.Tensor, pages, end: int) -> torch.Tensor:
    """The gather before index_select: the cache indexed by the [rows, pages] block table."""
    if isinstance(pages, slice):
        return store[pages].flatten(0, 1)[None, :end]
    return store[pages].flatten(1, 2)[:, :end]


def compare(model, tok, reqs: list[list[int]], new: int, patch) -> tuple[float, float]:
    """(ours, peer) ms per step; `patch()` switches to the peer and returns the undo."""
    ours, a = decode(model, tok, reqs, new)
    undo = patch()
    try:
        peer, b = decode(model, tok, reqs, new)
    finally:
        undo()
    if a != b:
        raise SystemExit("ours and the peer disagree on the tokens")
    return ours, peer


def sparse_per_row():
    Attention.batch_sparse_decode = False
    return lambda: setattr(Attention, "batch_sparse_decode", True)


def token_gather():
    from cpm4.kernels.infllm_v2 import cpu

    ours = cpu.DENSE_FRACTION
    cpu.DENSE_FRACTION = 0
    return lambda: setattr(cpu, "DENSE_FRACTION", ours)


def table_gather():
    ours = PagedBatch.__dict__["gather"]
    PagedBatch.gather = staticmethod(table_index_gather)
    return lambda: setattr(PagedBatch, "gather", ours)


def unfused(model):
    """The engine on the model's separate q/k/v and gate/up weights (`LLMEngine.fuse_weights` off)."""
    LLMEngine.fuse_weights = False
    model.unfuse_projections()
    return lambda: setattr(LLMEngine, "fuse_weights", True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="models/cpm4-demo")
    ap.add_argument("--rows", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--length", type=int, nargs="+", default=[1000])
    ap.add_argument("--peer", choices=["per-row", "table-gather", "token-gather", "unfused"], default="per-row")
    ap.add_argument("--new-tokens", type=int, default=60)
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    model = load_checkpoint(args.model, dtype=torch.float32)
    sc = model.config.sparse_config
    if args.peer not in ("table-gather", "unfused") and (sc is None or not all(sc.is_sparse(n) for n in args.length)):
        ap.error(f"--length {args.length} is not past the model's dense_len: no InfLLM v2 rows to measure")
    tok = covering_tokenizer(model.config.vocab_size)
    rnd = random.Random(0)
    rows = []
    what, peer_name, patch = {"per-row": ("one pass", "per row", sparse_per_row),
                              "table-gather": ("gather", "2-D index", table_gather),
                              "token-gather": ("ours", "token gather", token_gather),
                              "unfused": ("fused", "unfused", lambda: unfused(model))}[args.peer]
    print(f"{'rows':>5s} {'length':>7s} {what + ' ms/step':>17s} {peer_name + ' ms/step':>17s} {'speed-up':>9s}")
    for length in args.length:
        kind = "sparse" if sc is not None and sc.is_sparse(length) else "dense"
        for n in args.rows:
            reqs = [[rnd.randint(3, 1000) for _ in range(length)] for _ in range(n)]
            ours, peer = compare(model, tok, reqs, args.new_tokens, patch)
            rows.append({"phase": f"decode.{kind}.rows{n}", "seqlen": length, "ours_ms": round(ours, 2),
                         "peer_ms": round(peer, 2), "speedup": round(peer / ours, 2)})
            print(f"{n:5d} {length:7d} {ours:17.2f} {peer:17.2f} {peer / ours:8.2f}x")
    name = {"per-row": "cpu_engine_decode", "table-gather": "cpu_engine_gather",
            "token-gather": "cpu_engine_stage4", "unfused": "cpu_engine_fused"}[args.peer]
    write_rows(name, cpu_device(), rows, args.out, model=args.model)


if __name__ == "__main__":
    main()
