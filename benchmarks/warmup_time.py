"""`LLMEngine.warm_up` (every decode-graph bucket captured, compiled with --compile) with cascade decode on — each
bucket's cascade variant captured too — against off. Random weights of a preset; prints a table and writes
benchmarks/results/warmup_time-<date>.json (ours: cascade decode on, peer: off; seqlen: max batch). Mode
`nographs`: CUDA graphs off (`--enforce-eager`: an eager decode step of every batch size, `_warm_decode`) against
the graphs' eager warm-up, cascade decode on in both.

    python benchmarks/warmup_time.py --config minicpm4-0.5b --max-batch 256
    python benchmarks/warmup_time.py --modes nographs --max-batch 16
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from common import covering_tokenizer, print_rows, write_rows  # noqa: E402

from cpm4.engine.scheduler import build_engine  # noqa: E402
from cpm4.model.config import preset  # noqa: E402
from cpm4.model.init import random_model  # noqa: E402


def warm_up_s(model, tok, max_batch: int, compile: bool, cascade: bool, graphs: bool = True) -> tuple[float, int]:
    """Seconds of one engine's warm_up, and the graphs it captured."""
    eng = build_engine(model, tok, 300_000, max_batch, cuda_graphs=None if graphs else False, compile=compile,
                       cascade_decode=cascade)
    torch.cuda.synchronize()
    t = time.perf_counter()
    eng.warm_up()
    torch.cuda.synchronize()
    s = time.perf_counter() - t
    n = 0 if eng.graphs is None else len(eng.graphs.graphs) + len(eng.graphs.cascade_graphs)
    del eng
    gc.collect()
    torch.cuda.empty_cache()
    return s, n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="minicpm4-0.5b")
    ap.add_argument("--max-batch", type=int, default=256)
    ap.add_argument("--modes", nargs="+", default=["eager", "compile"], choices=["eager", "compile", "nographs"])
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("warmup_time.py captures CUDA graphs: no CUDA device here")
    cfg = preset(args.config)
    model = random_model(cfg, dtype=torch.bfloat16, device=torch.device("cuda"))
    tok = covering_tokenizer(cfg.vocab_size)
    rows = []
    for mode in args.modes:
        if mode == "nographs":
            on, _ = warm_up_s(model, tok, args.max_batch, False, True, graphs=False)
            off, n_off = warm_up_s(model, tok, args.max_batch, False, True)
            rows.append({"phase": "warm_up.nographs", "seqlen": args.max_batch, "ours_ms": round(on * 1000, 1),
                         "peer_ms": round(off * 1000, 1), "speedup": round(off / on, 2), "graphs": 0,
                         "peer_graphs": n_off, "peer": "graphs on (eager), cascade decode on"})
            print(f"warm_up graphs off: {on:.1f} s; graphs on: {off:.1f} s ({n_off} graphs)", flush=True)
            continue
        off, n_off = warm_up_s(model, tok, args.max_batch, mode == "compile", False)
        on, n_on = warm_up_s(model, tok, args.max_batch, mode == "compile", True)
        rows.append({"phase": f"warm_up.{mode}", "seqlen": args.max_batch, "ours_ms": round(on * 1000, 1),
                     "peer_ms": round(off * 1000, 1), "speedup": round(off / on, 2), "graphs": n_on,
                     "peer_graphs": n_off})
        print(f"warm_up {mode}: cascade on {on:.1f} s ({n_on} graphs), off {off:.1f} s ({n_off})", flush=True)
    print(f"\nLLMEngine.warm_up, cascade decode on vs off, {args.config} ({torch.cuda.get_device_name()})")
    print_rows(rows, digits=1)
    write_rows("warmup_time", torch.cuda.get_device_name(), rows, args.out, config=args.config)


if __name__ == "__main__":
    main()
