"""Multi-row prefill with the real tokens packed end to end (`cpm4.model.modeling.Packing`) against the padded
[rows, longest] layout, through `LLMEngine` (the prompts of one scheduler step, outputs of one token).

    python benchmarks/packed_prefill.py                                   # bundled demo model, CPU, float32
    python benchmarks/packed_prefill.py --config minicpm4-0.5b --device cuda --rows 16 32

Prompts of 100-1024 random tokens (nano-vllm's lengths), seed 0. Peer (--peer rows, default): the same engine with
`model.pack_rows = False`; --peer attention: rows packed, attention padded back to [rows, longest] around itself
(`Attention.packed_prefill = False`) against the packed attention (`Attention._packed_dense`); --peer graphs: the
packed step with its work between attention calls replayed from CUDA graphs (`cpm4.engine.prefill_graphs`, every
bucket captured before timing; with --rows 1 a lone prompt's step, `prefill_graphs.WIDER`) against the same step
launched layer by layer. Measured in the same run; both
produce the same first tokens (checked; with graphs, bf16 near ties may differ: counted, not fatal).
Prints a table and writes benchmarks/results/packed_prefill-<model>-<date>.json.
"""

from __future__ import annotations

import argparse
import datetime
import os
import random
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from common import covering_tokenizer, write_json  # noqa: E402

from cpm4 import SamplingParams  # noqa: E402
from cpm4.engine.paged import PagedKVCache, page_size_for  # noqa: E402
from cpm4.engine.scheduler import LLMEngine  # noqa: E402
from cpm4.model.checkpoint import load_checkpoint  # noqa: E402
from cpm4.model.config import preset  # noqa: E402
from cpm4.model.init import random_model  # noqa: E402
from cpm4.model.modeling import Attention  # noqa: E402


def prefill(model, tok, reqs: list[list[int]], pack: bool, peer: str = "rows", graphs=None
            ) -> tuple[float, list[int]]:
    """Seconds for one step prefilling every prompt; the first sampled token of each. pack False: the peer's way
    (`peer`: the rows padded, only the attention, or no prefill graphs; `graphs`: the captured ones)."""
    default = Attention.packed_prefill
    if peer == "rows":
        model.pack_rows = pack
    elif peer == "attention":
        Attention.packed_prefill = pack
    try:
        ps = page_size_for(model.config)
        pages = sum(-(-len(r) // ps) + 1 for r in reqs) + 1
        cache = PagedKVCache(model.config, pages, ps, model.device, model.dtype)
        eng = LLMEngine(model, tok, cache, max_batch_size=len(reqs), chunk_tokens=sum(map(len, reqs)),
                        prefill_graphs=False if peer == "graphs" else None)
        if peer == "graphs":
            model.prefill_graphs = graphs if pack else None
        for i, p in enumerate(reqs):
            eng.add_request(f"r{i}", p, SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        res = eng.run_to_completion()
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t, [res[f"r{i}"][1][0] for i in range(len(reqs))]
    finally:
        if peer == "rows":
            del model.pack_rows
        elif peer == "attention":
            Attention.packed_prefill = default


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="models/cpm4-demo", help="checkpoint directory (ignored with --config)")
    ap.add_argument("--config", default=None, help="a preset with random weights instead of --model")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rows", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--peer", choices=["rows", "attention", "graphs"], default="rows",
                    help="rows: every op on the padded rows; attention: only the attention padded; graphs: the "
                         "packed step without its prefill graphs")
    ap.add_argument("--tag", default="", help="appended to the JSON file's name")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    dev = torch.device(args.device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    if args.config:
        model, name = random_model(preset(args.config), dev, dtype), args.config
    else:
        model, name = load_checkpoint(args.model, device=dev, dtype=dtype), os.path.basename(args.model.rstrip("/"))
    tok = covering_tokenizer(model.config.vocab_size)
    rnd = random.Random(0)
    hi = min(1000, model.config.vocab_size - 1)
    rows = []
    graphs = None
    tag = ("" if args.peer == "rows" else f"-{args.peer}")
    print(f"{'rows':>5s} {'tokens':>7s} {'padded':>7s} {'packed ms':>10s} {'padded ms':>10s} {'speed-up':>9s}")
    for n in args.rows:
        reqs = [[rnd.randint(3, hi) for _ in range(rnd.randint(100, 1024))] for _ in range(n)]
        prefill(model, tok, reqs[:2], True, args.peer, graphs)  # warm-up (allocator, kernels; the engine fuses)
        if args.peer == "graphs":
            from cpm4.engine import prefill_graphs
            from cpm4.engine.prefill_graphs import PrefillGraphs

            prefill_graphs.WIDER = True  # --rows 1: a lone prompt's step through the pieces too

            graphs = PrefillGraphs(model, sum(map(len, reqs)))
            t0 = time.perf_counter()
            graphs.warm_up()  # every bucket captured before timing, over the weights the engine fused
            capture_s = time.perf_counter() - t0
            if graphs.chains:  # (off the GPU the pieces run uncaptured)
                print(f"  captured {len(graphs.sizes)} buckets x {len(graphs.chains[graphs.max_tokens])} pieces "
                      f"in {capture_s:.2f} s")
        ours, peer, differ = [], [], 0
        for _ in range(args.repeats):
            t, a = prefill(model, tok, reqs, True, args.peer, graphs)
            ours.append(t)
            t, b = prefill(model, tok, reqs, False, args.peer, graphs)
            peer.append(t)
            if args.peer == "graphs":
                differ = max(differ, sum(x != y for x, y in zip(a, b)))
            elif a != b:
                raise SystemExit(f"packed and padded prefill disagree on the first tokens: {a} vs {b}")
        o, p = min(ours) * 1000, min(peer) * 1000
        total, padded = sum(map(len, reqs)), n * max(map(len, reqs))
        phase = f"prefill.rows{n}" + tag.replace("-", ".")
        rows.append({"phase": phase, "seqlen": total, "ours_ms": round(o, 1), "peer_ms": round(p, 1),
                     "speedup": round(p / o, 2), "padded_tokens": padded, "first_tokens_differing": differ}
                    | ({"capture_s": round(capture_s, 2)} if graphs is not None else {}))
        print(f"{n:5d} {total:7d} {padded:7d} {o:10.1f} {p:10.1f} {p / o:8.2f}x" + (f"  ({differ} first tokens differ)"
                                                                                  if differ else ""))
    date = datetime.date.today().isoformat()
    device = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    write_json({"device": device, "date": date, "model": name, "rows": rows},
               f"packed_prefill-{name}{tag}{args.tag}-{date}.json", args.out)


if __name__ == "__main__":
    main()
