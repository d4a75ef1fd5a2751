"""Host time per decode step of the engine's bookkeeping, by batch size (CPU only, no model).

    python benchmarks/host_overhead.py [--profile]

The GPU runs a captured decode step in a few ms; whatever the host spends between steps adds to it at batch 1
and grows with the batch. Rows: building the block table from Python lists every step (`decode_inputs`, what
the captured steps did before) against updating it in place (`HostBlockTable.update`, what they do now; the
peer column is the old way), for a 128K-token sequence at batch 1 and 256 sequences of 640 tokens in a 32K
context; plus the per-token sequence bookkeeping (`SequenceState.step`: stop rules, detokenizer) for 256 rows.

`cascade_share` rows: the host side cascade decode adds to a captured step whose rows hold other sequences
than the step before (`DecodeGraphs._share`; otherwise it keeps the last group), 64 and 256 rows sharing 4,096
of their 5,120 tokens. `engine_step_<sync|async>_<stream|offline>` rows: whole
`LLMEngine.step()` calls with 64 or 256 sequences
decoding (prompts 100-1024 tokens, temperature 0.6, ignore_eos: nano-vllm's bench.py workload) over a stub
model: a decode step goes through the real host side of `DecodeGraphs.run` (block table, per-row inputs,
copies into the static buffers) but its "replay" runs nothing and returns fixed logits. `sync`/`async`:
`LLMEngine(async_output=...)`; `stream`/`offline`: stream_text True (the server) or False (`LLM.generate`:
text detokenized at each request's end). Every delta is added to a `GenerationOutput`, as the callers do.
`ours ms` is host time per step: the step time (`step ms`) less the sampling arithmetic of the same rows
(`sampling_arith_ms`: a few kernels on a GPU, but real work on this CPU). `workload_*` rows: the whole
workload of 256 requests (outputs 100-1024 tokens) over the stub, per step on average (prefill, admissions,
requests ending, the shrinking tail). `--profile` prints cProfile's top entries for the 256-row steps.
Prints a table and writes benchmarks/results/host_overhead-<date>.json.
"""

from __future__ import annotations

import argparse
import cProfile
import datetime
import inspect
import os
import platform
import pstats
import random
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from common import write_json  # noqa: E402

from cpm4.engine.cuda_graph import DecodeGraphs  # noqa: E402
from cpm4.engine.generate import GenerationOutput, SequenceState  # noqa: E402
from cpm4.engine.paged import HostBlockTable, PagedKVCache, SeqPages, decode_inputs  # noqa: E402
from cpm4.engine.sampling import SamplingParams  # noqa: E402
from cpm4.engine.scheduler import LLMEngine  # noqa: E402
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


def share_ms(cache: PagedKVCache, bs: int, width: int, pages: int, shared: int) -> float:
    """ms per step of cascade decode's host side in the captured steps (`DecodeGraphs._share`: the group over
    the host block table, then its buffers) for bs sequences of `pages` pages, the first `shared` common."""
    from cpm4.engine import paged

    on = paged.CASCADE_DECODE
    paged.CASCADE_DECODE = True
    try:
        graphs = HostGraphs(cache, bs, width, torch.zeros(bs, 8))
    finally:
        paged.CASCADE_DECODE = on
    seqs = [SeqPages(list(range(shared)) + list(range(10**4 + i * pages, 10**4 + (i + 1) * pages - shared)),
                     pages * 64 - 3) for i in range(bs)]
    cols = graphs.host_table.update(seqs, bs)
    _, _, ends = graphs._rows(seqs, bs)
    graphs._share(ends, bs, bs, cols)
    assert int(graphs.shared.count[0]) == shared and int(graphs.shared.count[1:].sum()) == 0  # (one group)

    def recompute():
        graphs._shared_rows = -1  # as after a change of the rows' sequences (else the step keeps last step's group)
        graphs._share(ends, bs, bs, cols)

    return best_ms(recompute)


class StubModel:
    """What the engine needs of a model, without the model: prefill advances the gathered batch's lengths and
    returns fixed logits (decode steps never reach it: they go through `HostGraphs`)."""

    prefill_graphs = None  # (the engine reads and sets it; none off the GPU)

    def __init__(self, config, logits: torch.Tensor):
        self.config, self.logits = config, logits
        self.device, self.dtype = torch.device("cpu"), torch.float32

    def fuse_projections(self) -> None:  # (the engine fuses its model's projections: nothing to fuse here)
        pass

    def __call__(self, ids: torch.Tensor, cache, new_lens: torch.Tensor, last_only: bool = True) -> torch.Tensor:
        if not getattr(cache, "decoding", False):
            cache.advance(new_lens)
        return self.logits[: ids.shape[0]]


class _NoReplay:
    def replay(self) -> None:
        pass


class HostGraphs(DecodeGraphs):
    """`DecodeGraphs` on the CPU whose replay runs nothing: the host side of a captured decode step."""

    def __init__(self, cache: PagedKVCache, max_batch: int, width: int, logits: torch.Tensor):
        self.init_buffers(cache, max_batch, width, torch.device("cpu"))
        self.logits = logits
        self.model = self.step = None  # (uncompiled: `_dynamic` asks whether the step is the model)

    def _capture(self, bs: int):
        return _NoReplay(), self.logits[:bs]


def _engine(rows: int, async_output: bool, tok, stream_text: bool, prompts: list[list[int]], extra_tokens: int,
            vocab: int) -> LLMEngine:
    """An engine over the stub model (cache room for every prompt plus extra_tokens each), graphs on the host."""
    cfg = preset("tiny")
    cfg.sparse_config, cfg.num_hidden_layers, cfg.num_key_value_heads = None, 1, 1  # the cache is never read
    cfg.vocab_size = vocab
    ps = 64
    logits = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(0))
    cache = PagedKVCache(cfg, sum(-(-(len(p) + extra_tokens + 1) // ps) for p in prompts), ps)
    kw = {"stream_text": stream_text} if "stream_text" in inspect.signature(LLMEngine).parameters else {}
    eng = LLMEngine(StubModel(cfg, logits), tok, cache, max_batch_size=rows, chunk_tokens=8192, paged_decode=False,
                    cuda_graphs=False, async_output=async_output, **kw)
    eng.graphs, eng.paged_decode = HostGraphs(cache, rows, -(-cfg.max_position_embeddings // ps), logits), True
    return eng


def _consume(eng: LLMEngine, outs: dict[str, GenerationOutput]) -> None:
    for rid, d in eng.step():
        outs.setdefault(rid, GenerationOutput([])).add(d)


def engine_step_ms(rows: int, async_output: bool, tok, stream_text: bool = True, steps: int = 40,
                   profile: bool = False) -> float:
    """Mean host ms per `LLMEngine.step()` with `rows` sequences decoding (see the module docstring)."""
    rnd = random.Random(0)
    vocab = 1024
    prompts = [[rnd.randint(3, vocab - 1) for _ in range(rnd.randint(100, 1024))] for _ in range(rows)]
    eng = _engine(rows, async_output, tok, stream_text, prompts, steps + 64, vocab)
    outs: dict[str, GenerationOutput] = {}
    for i, p in enumerate(prompts):
        eng.add_request(str(i), p, SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=10**6))
    while eng.waiting or any(r.computed < r.num_tokens - 1 for r in eng.running):  # prefill
        _consume(eng, outs)
    for _ in range(3):
        _consume(eng, outs)
    prof = cProfile.Profile() if profile else None
    if prof is not None:
        prof.enable()
    t = time.perf_counter()
    for _ in range(steps):
        _consume(eng, outs)
    ms = (time.perf_counter() - t) * 1000 / steps
    if prof is not None:
        prof.disable()
        print(f"--- cProfile: {steps} steps, {rows} rows, async_output={async_output}, stream_text={stream_text}")
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)
    return ms


def workload_ms(async_output: bool, tok, stream_text: bool, n: int = 256, vocab: int = 1024
                ) -> tuple[float, int, int]:
    """nano-vllm's whole workload (n requests, prompts and outputs of 100-1024 tokens) over the stub: (host ms
    per step on average, steps, output tokens). Includes prefill steps, admissions, requests ending (rows
    shifting in the block table, deferred detokenizing) and the shrinking batch of the tail."""
    rnd = random.Random(0)
    prompts = [[rnd.randint(3, vocab - 1) for _ in range(rnd.randint(100, 1024))] for _ in range(n)]
    params = [SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=rnd.randint(100, 1024)) for _ in range(n)]
    eng = _engine(n, async_output, tok, stream_text, prompts, 1024, vocab)
    outs: dict[str, GenerationOutput] = {}
    t = time.perf_counter()
    for i, (p, sp) in enumerate(zip(prompts, params)):
        eng.add_request(str(i), p, sp)
    steps = 0
    while eng.has_work():
        _consume(eng, outs)
        steps += 1
    ms = (time.perf_counter() - t) * 1000
    tokens = sum(len(o.token_ids) for o in outs.values())
    assert tokens == sum(sp.max_tokens for sp in params)
    return ms / steps, steps, tokens


def sampling_arith_ms(rows: int, vocab: int = 1024) -> float:
    """The arithmetic any sampler of these rows does (temperature, softmax, exponential race), which on a GPU
    is a few kernels but on this CPU is real work: subtracted from the step times for the host column."""
    logits = torch.randn(rows, vocab)
    col = torch.full((rows, 1), 0.6)

    def arith():
        x = logits.to(torch.float32, copy=True).div_(col)
        p = torch.softmax(x, dim=-1)
        (p / torch.empty_like(p).exponential_()).argmax(dim=-1)

    return best_ms(arith, 50)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--profile", action="store_true", help="print cProfile's top entries for the 256-row steps")
    ap.add_argument("--no-workload", action="store_true", help="skip the whole-workload rows (slowest)")
    args = ap.parse_args()
    torch.set_num_threads(1)  # steadier timings (2-core machine shared with other work); host work is serial
    cfg = preset("tiny")
    cfg.sparse_config = None
    cache = PagedKVCache(cfg, num_pages=1, page_size=64)  # only its page size and scratch index are used
    rows = []
    for bs, width, pages in ((1, 2049, 2048), (64, 512, 10), (256, 512, 10)):
        old, new = block_table_ms(cache, bs, width, pages)
        rows.append({"phase": "block_table", "batch": bs, "seqlen": pages * 64, "width": width,
                     "ours_ms": round(new, 4), "peer_ms": round(old, 4), "speedup": round(old / new, 1)})
    for bs, pages, shared in ((64, 80, 64), (256, 80, 64)):
        ms = share_ms(cache, bs, 512, pages, shared)
        rows.append({"phase": "cascade_share", "batch": bs, "seqlen": pages * 64, "shared_tokens": shared * 64,
                     "ours_ms": round(ms, 4), "peer_ms": None, "speedup": None})
    tok = build_tokenizer(1024)
    states = [SequenceState(list(range(5, 300)), SamplingParams(temperature=0.6, max_tokens=10**6, ignore_eos=True),
                            tok, "cpu", 10**7, [2]) for _ in range(256)]
    toks = torch.randint(10, 900, (20, 256), generator=torch.Generator().manual_seed(0)).tolist()
    it = iter(toks * 100)
    ms = best_ms(lambda: [s.step(x) for s, x in zip(states, next(it))])
    rows.append({"phase": "sequence_state_step", "batch": 256, "seqlen": None, "ours_ms": round(ms, 4),
                 "peer_ms": None, "speedup": None})
    for mode in ("sync", "async"):
        for text in ("stream", "offline"):
            for bs in (64, 256):
                prof = args.profile and bs == 256
                ms = engine_step_ms(bs, mode == "async", tok, stream_text=text == "stream", profile=prof)
                host = ms - sampling_arith_ms(bs)
                rows.append({"phase": f"engine_step_{mode}_{text}", "batch": bs, "seqlen": None,
                             "ours_ms": round(host, 3), "step_ms": round(ms, 3), "peer_ms": None, "speedup": None,
                             "us_per_row": round(1000 * host / bs, 2)})
    if not args.no_workload:
        for mode in ("sync", "async"):
            ms, steps, tokens = workload_ms(mode == "async", tok, stream_text=False)
            host = ms - sampling_arith_ms(round(tokens / steps))  # rows sampled per step, on average
            rows.append({"phase": f"workload_{mode}_offline", "batch": 256, "seqlen": None,
                         "ours_ms": round(host, 3), "step_ms": round(ms, 3), "steps": steps,
                         "output_tokens": tokens, "peer_ms": None, "speedup": None})
    print(f"{'what':28s} {'batch':>5s} {'seqlen':>7s} {'ours ms':>9s} {'before ms':>10s} {'speed-up':>9s} "
          f"{'step ms':>8s}")
    for r in rows:
        before = "" if r["peer_ms"] is None else f"{r['peer_ms']:10.3f}"
        sp = "" if r["speedup"] is None else f"{r['speedup']:8.1f}x"
        seqlen = str(r["seqlen"] or "")
        step = f"{r['step_ms']:8.3f}" if "step_ms" in r else ""
        print(f"{r['phase']:28s} {r['batch']:5d} {seqlen:>7s} {r['ours_ms']:9.3f} {before:>10s} {sp:>9s} {step:>8s}")
    date = datetime.date.today().isoformat()
    doc = {"device": f"{platform.processor() or 'CPU'} (host side only)", "date": date, "rows": rows}
    write_json(doc, f"host_overhead-{date}.json", args.out)


if __name__ == "__main__":
    main()
