"""Where an offline batch's decode steps stall: nano-vllm's workload (as `serving.py`'s offline row) through one
`LLMEngine`, its steps timed on the host (no sync added) and split into steps whose rows are those of the step
before and steps where rows changed (a request ended or joined). For each kind: host ms per step and the host ms
spent inside the engine's parts (launching the step, sampling, reading back the last step's tokens, emitting:
stop rules and detokenizing, the block table, the cascade groups). Then (CUDA) the same workload once more under
torch's sync debug mode: every synchronizing call a decode step makes (a copy from pageable memory, `.item()`,
`.tolist()` of a device tensor ...) counted by the engine's line that made it.

    python benchmarks/decode_stalls.py --config minicpm4-0.5b --compile          # H200: bf16
    python benchmarks/decode_stalls.py --config tiny --device cpu --requests 16  # the logic, on the CPU

Prints tables and writes benchmarks/results/decode_stalls-<config>-<date>.json.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import random
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from common import covering_tokenizer  # noqa: E402

from cpm4.engine import cuda_graph, scheduler  # noqa: E402
from cpm4.engine.paged import HostBlockTable  # noqa: E402
from cpm4.engine.sampling import SamplingParams  # noqa: E402
from cpm4.engine.scheduler import build_engine  # noqa: E402
from cpm4.model.config import preset  # noqa: E402
from cpm4.model.init import random_model  # noqa: E402
from cpm4.model.tokenizer import IncrementalDetokenizer  # noqa: E402

# (label, owner, attribute): methods timed while a step runs (nested ones count in both)
PARTS = [("forward", scheduler.LLMEngine, "_forward"), ("sample_run", scheduler.LLMEngine, "_run"),
         ("launch", scheduler.LLMEngine, "_launch"), ("forward_decode", scheduler.LLMEngine, "_forward_decode"),
         ("sampling_args", scheduler.LLMEngine, "_sampling_args"), ("drain", scheduler.LLMEngine, "_drain"),
         ("emit", scheduler.LLMEngine, "_emit"), ("detok_extend", IncrementalDetokenizer, "extend"),
         ("table_update", HostBlockTable, "update"), ("cascade_share", cuda_graph.DecodeGraphs, "_share"),
         ("graph_run", cuda_graph.DecodeGraphs, "run")]


def workload(n: int, hi: int) -> list[tuple[list[int], SamplingParams]]:
    """nano-vllm's bench.py: prompts of 100-1024 random ids, 100-1024 output tokens, temperature 0.6."""
    rnd = random.Random(0)
    reqs = [[rnd.randint(0, hi) for _ in range(rnd.randint(100, 1024))] for _ in range(n)]
    return [(r, SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=rnd.randint(100, 1024))) for r in reqs]


def timed_parts() -> tuple[dict[str, float], list]:
    """Wrap PARTS with host-time accumulators; (the accumulator, the originals to restore)."""
    acc: dict[str, float] = collections.defaultdict(float)
    saved = []
    for label, owner, name in PARTS:
        fn = getattr(owner, name)
        saved.append((owner, name, fn))

        def wrap(*a, _fn=fn, _label=label, **k):
            t = time.perf_counter()
            try:
                return _fn(*a, **k)
            finally:
                acc[_label] += time.perf_counter() - t

        setattr(owner, name, wrap)
    return acc, saved


def run(eng, reqs, shift: int, on_step=None) -> list[dict]:
    """Every step of one run: host ms, decode rows, whether it prefilled; `on_step(i)` wraps each step."""
    rows = [0]
    prefill = [False]
    forward, forward_decode = eng._forward, eng._forward_decode

    def probe(group):
        prefill[0] = prefill[0] or any(k > 1 for _, k in group)
        return forward(group)

    def probe_decode(seqs, ids, *a):
        rows[0] += len(seqs)
        return forward_decode(seqs, ids, *a)

    eng._forward, eng._forward_decode = probe, probe_decode
    steps = []
    try:
        for i, (p, sp) in enumerate(reqs):
            eng.add_request(f"r{shift}-{i}", [(t + shift) % eng.model.config.vocab_size for t in p], sp)
        while eng.has_work():
            t = time.perf_counter()
            ctx = on_step(len(steps)) if on_step else None
            if ctx is not None:
                with ctx:
                    eng.step()
            else:
                eng.step()
            steps.append({"ms": 1000 * (time.perf_counter() - t), "rows": rows[0], "prefill": prefill[0]})
            rows[0], prefill[0] = 0, False
    finally:
        del eng._forward, eng._forward_decode
    return steps


def kind_of(steps: list[dict]) -> list[str]:
    out, last = [], None
    for s in steps:
        if s["prefill"]:
            out.append("prefill")
        else:
            out.append("decode, same rows" if s["rows"] == last else "decode, rows changed")
            last = s["rows"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="minicpm4-0.5b")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--tag", default="")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = ap.parse_args()
    dev = torch.device(args.device)
    cfg = preset(args.config)
    model = random_model(cfg, dtype=torch.bfloat16 if dev.type == "cuda" else torch.float32, device=dev)
    tok = covering_tokenizer(cfg.vocab_size)
    reqs = workload(args.requests, cfg.vocab_size - 1)
    need = sum(len(p) + sp.max_tokens + 64 for p, sp in reqs)
    eng = build_engine(model, tok, need, args.requests, compile=args.compile)
    eng.stream_text = False  # as LLM.generate and serving.py's offline row
    eng.warm_up()
    run(eng, [(p[:32], SamplingParams(max_tokens=4, ignore_eos=True)) for p, _ in reqs], 0)

    # 1. Host time by kind of step, and inside each kind by part.
    acc, saved = timed_parts()
    per_step: list[dict[str, float]] = []

    class Mark:  # snapshot of the accumulators around a step
        def __enter__(self):
            self.before = dict(acc)

        def __exit__(self, *exc):
            per_step.append({k: acc[k] - self.before.get(k, 0.0) for k in acc})

    try:
        steps = run(eng, reqs, 1, lambda i: Mark())
    finally:
        for owner, name, fn in saved:
            setattr(owner, name, fn)
    kinds = kind_of(steps)
    table = {}
    for kind in sorted(set(kinds)):
        idx = [i for i, k in enumerate(kinds) if k == kind]
        row = {"steps": len(idx), "total_ms": round(sum(steps[i]["ms"] for i in idx), 1),
               "mean_ms": round(sum(steps[i]["ms"] for i in idx) / len(idx), 3)}
        for label, _, _ in PARTS:
            row[label + "_ms"] = round(1000 * sum(per_step[i].get(label, 0.0) for i in idx) / len(idx), 3)
        table[kind] = row
    cols = ["steps", "total_ms", "mean_ms"] + [p[0] + "_ms" for p in PARTS]
    print(f"{'kind':22s}" + "".join(f"{c.removesuffix('_ms'):>15s}" for c in cols))
    for kind, row in table.items():
        print(f"{kind:22s}" + "".join(f"{row[c]:>15}" for c in cols))

    # 2. Synchronizing calls of decode steps (CUDA only).
    syncs: collections.Counter = collections.Counter()
    if dev.type == "cuda":
        def guard(i):
            class Guard:
                def __enter__(self):
                    self.w = warnings.catch_warnings(record=True)
                    self.got = self.w.__enter__()
                    warnings.simplefilter("always")
                    torch.cuda.set_sync_debug_mode("warn")

                def __exit__(self, *exc):
                    torch.cuda.set_sync_debug_mode("default")
                    self.w.__exit__(*exc)
                    for w in self.got:
                        if "synchroniz" not in str(w.message):
                            continue
                        syncs[str(w.message)[:60] + " @ " + (w.filename.split("/")[-1] + f":{w.lineno}")] += 1
            return Guard()

        run(eng, reqs, 2, guard)
        print("\nsynchronizing calls during the run (sync debug mode), by where they were made:")
        for where, n in syncs.most_common(20):
            print(f"{n:8d}  {where}")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"decode_stalls-{args.config}{'-cpu' if dev.type != 'cuda' else ''}{args.tag}-"
                                  f"{datetime.date.today()}.json")
    dev_name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU"
    with open(path + ".tmp", "w") as f:
        json.dump({"device": dev_name, "kinds": table, "syncs": dict(syncs.most_common())}, f, indent=1)
    os.replace(path + ".tmp", path)
    print("wrote", path)


if __name__ == "__main__":
    main()
