"""What detokenizing a finished request's output costs the host: `IncrementalDetokenizer.extend` (the deferred text
of an offline batch, decoded when the request ends) against one `decode` of the same ids (the peer: the least a
text can cost), and the per-token `add` (streamed text), for outputs of nano-vllm's lengths (100-1024 random ids)
after a 6-id prompt context. Tokenizer: the benchmarks' covering tokenizer of a preset's vocabulary, or a
checkpoint's (--tokenizer DIR).

    python benchmarks/detok_speed.py                       # 64 outputs, the 0.5B preset's vocabulary
    TOKENIZERS_PARALLELISM=false python benchmarks/detok_speed.py --tag=-serial

Prints a table (ms per output) and writes benchmarks/results/detok_speed-<date>.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from common import covering_tokenizer  # noqa: E402

from cpm4.model.config import preset  # noqa: E402
from cpm4.model.tokenizer import IncrementalDetokenizer, Tokenizer  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="minicpm4-0.5b")
    ap.add_argument("--tokenizer", default=None, help="a checkpoint folder's tokenizer instead of the covering one")
    ap.add_argument("--outputs", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--tag", default="")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = ap.parse_args()
    tok = Tokenizer.from_dir(args.tokenizer) if args.tokenizer else covering_tokenizer(preset(args.config).vocab_size)
    rng = random.Random(0)
    v = tok.vocab_size
    outs = [[rng.randrange(v) for _ in range(rng.randint(100, 1024))] for _ in range(args.outputs)]
    ctx = [[rng.randrange(v) for _ in range(6)] for _ in outs]

    def extend() -> list[str]:
        res = []
        for c, ids in zip(ctx, outs):
            d = IncrementalDetokenizer(tok, c)
            res.append(d.extend(ids) + d.flush())
        return res

    def add() -> list[str]:
        res = []
        for c, ids in zip(ctx, outs):
            d = IncrementalDetokenizer(tok, c)
            res.append("".join([d.add(t) for t in ids]) + d.flush())
        return res

    def whole() -> list[str]:
        return [tok.decode(ids) for ids in outs]

    def stream() -> list[str]:  # tokenizers' own incremental decoder, one step per id
        from tokenizers.decoders import DecodeStream

        backend = tok.hf.backend_tokenizer
        res = []
        for c, ids in zip(ctx, outs):
            d = DecodeStream(ids=c, skip_special_tokens=True)
            res.append("".join(filter(None, [d.step(backend, t) for t in ids])))
        return res

    kinds = [("detok.whole_decode", whole), ("detok.extend", extend), ("detok.add", add)]
    try:
        stream()
        kinds.append(("detok.decode_stream", stream))
    except (ImportError, TypeError) as e:  # older tokenizers: no DecodeStream, or none taking ids
        print(f"no DecodeStream row: {e}")
    rows = []
    peer = None
    texts = {}
    for name, fn in kinds:
        fn()
        times = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            texts[name] = fn()
            times.append((time.perf_counter() - t) * 1000 / len(outs))
        ms = statistics.median(times)
        peer = ms if peer is None else peer
        rows.append({"phase": name, "seqlen": round(sum(map(len, outs)) / len(outs)), "ours_ms": round(ms, 4),
                     "peer_ms": round(peer, 4), "speedup": round(peer / ms, 3)})
    same = sum(a == b for a, b in zip(texts["detok.extend"], texts["detok.add"]))
    if "detok.decode_stream" in texts:
        n = sum(a == b for a, b in zip(texts["detok.decode_stream"], texts["detok.add"]))
        print(f"decode_stream == add for {n}/{len(outs)} outputs")
    print(f"{'phase':22s} {'ids':>6s} {'ms/output':>10s} {'decode ms':>10s} {'ratio':>7s}")
    for r in rows:
        print(f"{r['phase']:22s} {r['seqlen']:6d} {r['ours_ms']:10.4f} {r['peer_ms']:10.4f} {r['speedup']:7.3f}")
    par = os.environ.get("TOKENIZERS_PARALLELISM")
    print(f"extend == add for {same}/{len(outs)} outputs; TOKENIZERS_PARALLELISM={par}")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"detok_speed{args.tag}-{datetime.date.today()}.json")
    with open(path + ".tmp", "w") as f:
        json.dump({"device": f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
                   "tokenizers_parallelism": os.environ.get("TOKENIZERS_PARALLELISM"), "rows": rows}, f, indent=1)
    os.replace(path + ".tmp", path)
    print("wrote", path)


if __name__ == "__main__":
    main()
