"""Where an offline batch's decode steps stall: nano-vllm's workload (as `serving.py`'s offline row) through one
`LLMEngine`, its steps timed on the host (no sync added) and split into steps whose rows are those of the step
before and steps where rows changed (a request ended or joined). For each kind: host ms per step and the host ms
spent inside the engine's parts (launching the step, sampling, reading back the last step's tokens, emitting:
stop rules and detokenizing, the block table, the cascade groups). Then (CUDA) the same workload once more under
torch's sync debug mode: every synchronizing call a decode step makes (a copy from pageable memory, `.item()`,
`.tolist()` of a device tensor ...) counted by the engine's line that made it. With --profile-prefill N, the
workload's first N steps once more, each under torch.profiler and followed by a sync: per prefill step the host's
ms to return, the ms to the sync and the summed kernel ms (a step whose kernels fill its wall time is GPU-bound),
the kernels by name, and the caching allocator's device allocations and retries (a cudaMalloc or a retry's frees
can stall the host where sync debug mode sees nothing).

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

from common import covering_tokenizer, parse_engine_args  # noqa: E402

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


def cprofile_prefill(eng, reqs, n: int) -> None:
    """The workload's first n steps under one cProfile (prefill steps while prompts remain): the host's
    functions by own time and by cumulative time."""
    import cProfile
    import pstats

    prof = cProfile.Profile()

    class On:
        def __enter__(self):
            prof.enable()

        def __exit__(self, *exc):
            prof.disable()

    steps = run(eng, reqs, 4, lambda i: On() if i < n else None)
    print(f"\ncProfile of the first {n} steps ({sum(s['prefill'] for s in steps[:n])} prefill), "
          f"{sum(s['ms'] for s in steps[:n]):.0f} ms:")
    st = pstats.Stats(prof)
    st.sort_stats("tottime").print_stats(28)
    st.sort_stats("cumulative").print_stats(40)


def profile_prefill(eng, reqs, n: int) -> dict:
    """The workload's first n steps, each under torch.profiler (CUDA kernels) then synced: for the prefill
    steps, host ms to return from `step`, ms to the sync, summed kernel ms, kernels by name; the caching
    allocator's device allocations (cudaMalloc) and retries during those steps."""
    from torch.profiler import ProfilerActivity, profile

    out: list[dict] = []
    kernels: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0])
    prof_box = {}

    def wrap(i):
        class Prof:
            def __enter__(self):
                torch.cuda.synchronize()
                self.m0 = torch.cuda.memory_stats()
                self.p = profile(activities=[ProfilerActivity.CUDA])
                self.p.__enter__()
                self.t0 = time.perf_counter()

            def __exit__(self, *exc):
                t1 = time.perf_counter()
                torch.cuda.synchronize()
                t2 = time.perf_counter()
                self.p.__exit__(*exc)
                m1 = torch.cuda.memory_stats()
                prof_box[i] = (1000 * (t1 - self.t0), 1000 * (t2 - self.t0), self.p,
                               {k: m1.get(k, 0) - self.m0.get(k, 0)
                                for k in ("num_device_alloc", "num_device_free", "num_alloc_retries")})
        return Prof() if i < n else None

    steps = run(eng, reqs, 3, wrap)
    for i, s in enumerate(steps[:n]):
        if not s["prefill"] or i not in prof_box:
            continue
        host_ms, wall_ms, p, mem = prof_box[i]
        k_ms = 0.0
        for e in p.events():
            if e.device_type == torch.autograd.DeviceType.CUDA and e.device_time > 0:
                k_ms += e.device_time / 1000
                g = kernels[e.name[:80]]
                g[0] += e.device_time / 1000
                g[1] += 1
        out.append({"step": i, "decode_rows": s["rows"], "host_ms": round(host_ms, 2), "wall_ms": round(wall_ms, 2),
                    "kernel_ms": round(k_ms, 2), **mem})
    print(f"\nprefill steps of the first {n}, each profiled and synced:")
    print(f"{'step':>5s}{'rows':>6s}{'host ms':>10s}{'wall ms':>10s}{'kernel ms':>11s}{'mallocs':>9s}{'frees':>7s}"
          f"{'retries':>9s}")
    for r in out:
        print(f"{r['step']:5d}{r['decode_rows']:6d}{r['host_ms']:10.2f}{r['wall_ms']:10.2f}{r['kernel_ms']:11.2f}"
              f"{r['num_device_alloc']:9d}{r['num_device_free']:7d}{r['num_alloc_retries']:9d}")
    top = sorted(kernels.items(), key=lambda kv: -kv[1][0])[:15]
    m = max(len(out), 1)
    print("kernels of those steps, ms a step:")
    for name, (ms, calls) in top:
        print(f"  {ms / m:8.3f} ms {calls / m:7.1f}x  {name}")
    return {"steps": out, "kernels": [{"kernel": k, "ms": round(v[0] / m, 4), "calls": round(v[1] / m, 2)}
                                      for k, v in top]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="minicpm4-0.5b")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--profile-prefill", type=int, default=0, metavar="N",
                    help="profile the workload's first N steps one by one (CUDA): the prefill steps' kernels")
    ap.add_argument("--cprofile-prefill", type=int, default=0, metavar="N",
                    help="the workload's first N steps under cProfile (the host's functions in the prefill steps)")
    ap.add_argument("--tag", default="")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = parse_engine_args(ap)  # (--no-prefill-graphs and the other engine switches)
    dev = torch.device(args.device)
    cfg = preset(args.config)
    model = random_model(cfg, dtype=torch.bfloat16 if dev.type == "cuda" else torch.float32, device=dev)
    tok = covering_tokenizer(cfg.vocab_size)
    reqs = workload(args.requests, cfg.vocab_size - 1)
    need = sum(len(p) + sp.max_tokens + 64 for p, sp in reqs)
    eng = build_engine(model, tok, need, args.requests, compile=args.compile)
    eng.stream_text, eng.detokenize = False, False  # as LLM.generate and serving.py's offline row
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
    if args.cprofile_prefill:
        cprofile_prefill(eng, reqs, args.cprofile_prefill)
    prefill = profile_prefill(eng, reqs, args.profile_prefill) if args.profile_prefill and dev.type == "cuda" \
        else None
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"decode_stalls-{args.config}{'-cpu' if dev.type != 'cuda' else ''}{args.tag}-"
                                  f"{datetime.date.today()}.json")
    dev_name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU"
    with open(path + ".tmp", "w") as f:
        json.dump({"device": dev_name, "kinds": table, "syncs": dict(syncs.most_common()), "prefill_profile": prefill},
                  f, indent=1)
    os.replace(path + ".tmp", path)
    print("wrote", path)


if __name__ == "__main__":
    main()
