"""Host time per decode step of the engine's bookkeeping, by batch size (CPU only, no model).

    python benchmarks/host_overhead.py

The GPU runs a captured decode step in a few ms; whatever the host spends between steps adds to it at batch 1
and grows with the batch. Rows: building the block table from Python lists every step (`decode_inputs`, what
the captured steps did before) against updating it in place (`HostBlockTable.update`, what they do now; the
peer column is the old way), for a 128K-token sequence at batch 1 and 256 sequences of 640 tokens in a 32K
context; plus the per-token sequence bookkeeping (`SequenceState.step`: stop rules, detokenizer) for 256 rows.
Prints a table and writes benchmarks/results/host_overhead-<date>.json.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from common import write_json  # noqa: E402

from cpm4.engine.generate import SequenceState  # noqa: E402
from cpm4.engine.paged import HostBlockTable, PagedKVCache, SeqPages, decode_inputs  # noqa: E402
from cpm4.engine.sampling import SamplingParams  # noqa: E402
from cpm4.model.config import preset  # noqa: E402
from cpm4.model.tokenizer import build_tokenizer  # noqa: E402


def best_ms(fn, repeat: int = 20) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times) * 1000


def block_table_ms(cache: PagedKVCache, bs: int, width: int, pages: int) -> tuple[float, float]:
    """(rebuilt from lists, updated in place) ms per step for bs sequences of `pages` pages."""
    seqs = [SeqPages(list(range(pages)), pages * 64 - 3) for _ in range(bs)]
    table = HostBlockTable(bs, width, cache.scratch)
    table.update(seqs, bs)

    def incremental():
        if len(seqs[0].pages) < width:
            seqs[0].pages.append(1)  # one row gains a page
        table.update(seqs, bs)

    return best_ms(lambda: decode_inputs(cache, seqs, width, "cpu", rows=bs)), best_ms(incremental)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    cfg = preset("tiny")
    cfg.sparse_config = None
    cache = PagedKVCache(cfg, num_pages=1, page_size=64)  # only its page size and scratch index are used
    rows = []
    for bs, width, pages in ((1, 2049, 2048), (64, 512, 10), (256, 512, 10)):
        old, new = block_table_ms(cache, bs, width, pages)
        rows.append({"phase": "block_table", "batch": bs, "seqlen": pages * 64, "width": width,
                     "ours_ms": round(new, 4), "peer_ms": round(old, 4), "speedup": round(old / new, 1)})
    tok = build_tokenizer(1024)
    states = [SequenceState(list(range(5, 300)), SamplingParams(temperature=0.6, max_tokens=10**6, ignore_eos=True),
                            tok, "cpu", 10**7, [2]) for _ in range(256)]
    toks = torch.randint(10, 900, (20, 256), generator=torch.Generator().manual_seed(0)).tolist()
    it = iter(toks * 100)
    ms = best_ms(lambda: [s.step(x) for s, x in zip(states, next(it))])
    rows.append({"phase": "sequence_state_step", "batch": 256, "seqlen": None, "ours_ms": round(ms, 4),
                 "peer_ms": None, "speedup": None})
    print(f"{'what':22s} {'batch':>5s} {'seqlen':>7s} {'ours ms':>9s} {'before ms':>10s} {'speed-up':>9s}")
    for r in rows:
        before = "" if r["peer_ms"] is None else f"{r['peer_ms']:10.3f}"
        sp = "" if r["speedup"] is None else f"{r['speedup']:8.1f}x"
        seqlen = str(r["seqlen"] or "")
        print(f"{r['phase']:22s} {r['batch']:5d} {seqlen:>7s} {r['ours_ms']:9.3f} {before:>10s} {sp:>9s}")
    date = datetime.date.today().isoformat()
    doc = {"device": f"{platform.processor() or 'CPU'} (host side only)", "date": date, "rows": rows}
    write_json(doc, f"host_overhead-{date}.json", args.out)


if __name__ == "__main__":
    main()
