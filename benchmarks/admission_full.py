"""The scheduler's host work for a burst of requests arriving at a cache full of reclaimable prefix pages (a
serving engine's steady state: every finished request leaves its prompt pages published), before any model
work: each prefill step's admission (`LLMEngine._admit`) and planning (`_plan`: pages reserved, reclaimed from
the prefix table) until every prompt is fed. Ours: the free-page count kept as references change
(`PagedKVCache.num_free`), the running requests' pages summed once per admission, and the least recently used
reclaimable page popped from a heap; peer: the count walked over the prefix table at every check, the sum taken
again for every waiting request, and the table walked in use order past held pages to the first reclaimable one
(the code before), same prompts, same run. CPU only; no model work is timed (the steps' feeds are applied by
hand). --held: one earlier request's published pages still held (a long prompt decoding), its pages the least
recently used.

    python benchmarks/admission_full.py                      # nano-vllm's 256 requests of 100-1024 tokens
    python benchmarks/admission_full.py --requests 64 512 --held 0 2048

Rows: `full.admit` and `full.plan` (summed over the burst's prefill steps; `held<N>.` with held pages), median of
--repeats runs.
Prints a table and writes benchmarks/results/admission_full-<date>.json.
"""

from __future__ import annotations

import argparse
import collections
import os
import random
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from common import cpu_device, print_rows, write_rows  # noqa: E402

from cpm4.engine.paged import PagedKVCache, SeqPages  # noqa: E402
from cpm4.engine.sampling import SamplingParams  # noqa: E402
from cpm4.engine.scheduler import LLMEngine  # noqa: E402
from cpm4.model.config import preset  # noqa: E402
from cpm4.model.init import random_model  # noqa: E402
from cpm4.model.tokenizer import build_tokenizer  # noqa: E402


class WalkingCache(PagedKVCache):
    """The peer: free pages counted by walking the prefix table, and a reclaimable page found by walking it in
    use order (an ordered dict moved on every use), as before the kept count and the heap."""

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.order: collections.OrderedDict[bytes, int] = collections.OrderedDict()

    @property
    def num_free(self) -> int:
        return len(self.free) + sum(1 for p in self.prefix.values() if self.refs[p] == 1)

    def has_free(self, n: int) -> bool:
        return n <= len(self.free) or n <= self.num_free

    def _touch(self, chain: list[bytes]) -> None:
        super()._touch(chain)
        for h in reversed(chain):
            self.order[h] = self.prefix[h]
            self.order.move_to_end(h)

    def _reclaim(self) -> None:
        for h, p in self.order.items():
            if self.refs[p] == 1:
                del self.order[h]
                self._evict(p)
                return


def fill(cache: PagedKVCache, rng: random.Random, vocab: int) -> None:
    """Every page published by earlier (ended) sequences: nothing free, everything reclaimable."""
    ps = cache.page_size
    while cache.free:
        n = min(len(cache.free), rng.randint(2, 16))
        seq = SeqPages()
        cache.reserve(seq, n * ps)
        seq.length = n * ps
        cache.publish(seq, [rng.randrange(3, vocab) for _ in range(n * ps)])
        cache.release(seq)
    assert cache.num_free == cache.num_pages - sum(1 for r in cache.refs if r > 1)


def once(model, tok, requests: int, seed: int, ours: bool, held: int = 0) -> tuple[float, float, int]:
    """(admission ms, planning ms, prefill steps) of one burst; held: pages of an earlier request still held."""
    rng = random.Random(seed)
    vocab = model.config.vocab_size
    prompts = [[rng.randrange(3, vocab) for _ in range(rng.randint(100, 1024))] for _ in range(requests)]
    outs = [rng.randint(100, 1024) for _ in range(requests)]
    pages = sum(-(-(len(p) + o) // 64) + 1 for p, o in zip(prompts, outs)) + held
    cache = (PagedKVCache if ours else WalkingCache)(model.config, num_pages=pages, page_size=64)
    if held:  # published first: the least recently used pages, held throughout
        seq = SeqPages()
        cache.reserve(seq, held * 64)
        seq.length = held * 64
        cache.publish(seq, [rng.randrange(3, vocab) for _ in range(held * 64)])
    fill(cache, rng, vocab)
    eng = LLMEngine(model, tok, cache, max_batch_size=requests, chunk_tokens=8192, cuda_graphs=False)
    if not ours:  # the running requests summed again for each waiting one
        eng._pages_to_admit = lambda new, running_need=None: LLMEngine._pages_to_admit(eng, new)
    for i, (p, o) in enumerate(zip(prompts, outs)):
        eng.add_request(f"r{i}", p, SamplingParams(temperature=0, max_tokens=o, ignore_eos=True))
    admit = plan = 0.0
    steps = 0
    while any(r.computed < len(r.prompt_ids) for r in eng.running) or eng.waiting:
        t0 = time.perf_counter()
        eng._admit()
        t1 = time.perf_counter()
        feeds = eng._plan()
        t2 = time.perf_counter()
        admit, plan, steps = admit + t1 - t0, plan + t2 - t1, steps + 1
        for req, n in feeds:  # what the forward would do: the tokens are in the pages
            if req.computed < len(req.prompt_ids):
                req.pages.length += n
                req.computed += n
        if steps > 10 * requests:
            raise RuntimeError("the burst's prompts were never all fed")
    assert not eng.waiting and len(eng.running) == requests
    return 1000 * admit, 1000 * plan, steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, nargs="+", default=[256])
    ap.add_argument("--held", type=int, nargs="+", default=[0, 2048],
                    help="pages of an earlier request held through the burst (2,048: a 128K-token prompt)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = ap.parse_args()
    model = random_model(preset("tiny", num_hidden_layers=1, sparse_config=None), dtype=torch.float32)
    tok = build_tokenizer(1024)
    rows = []
    for held in args.held:
        for n in args.requests:
            runs = {on: [once(model, tok, n, seed, on, held) for seed in range(args.repeats)] for on in (True, False)}
            steps = runs[True][0][2]
            assert all(r[2] == steps for rs in runs.values() for r in rs[:1])  # the same steps either way
            for k, what in ((0, "admit"), (1, "plan")):
                ours = statistics.median(r[k] for r in runs[True])
                peer = statistics.median(r[k] for r in runs[False])
                rows.append({"phase": f"{f'held{held}' if held else 'full'}.{what}", "seqlen": n,
                             "ours_ms": round(ours, 2), "peer_ms": round(peer, 2), "speedup": round(peer / ours, 2),
                             "requests": n, "held_pages": held, "prefill_steps": steps})
    print(f"\nbursts of requests (prompts 100-1024 tokens) into a cache full of reclaimable prefix pages, "
          f"{cpu_device()}; seqlen = requests; ms summed over the burst's prefill steps; peer: the walked count")
    print_rows(rows, digits=2)
    write_rows("admission_full", cpu_device(), rows, args.out, repeats=args.repeats)


if __name__ == "__main__":
    main()
