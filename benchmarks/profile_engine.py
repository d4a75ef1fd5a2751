"""Where the engine's time goes: kernel-level profile of one prefill and of decode steps at batch 1, or of
decode steps with many sequences running (--batch, the serving case).

    python benchmarks/profile_engine.py --config minicpm4-8b --context 32768 --sparse
    python benchmarks/profile_engine.py --config minicpm4-8b --context 4096 --compile
    python benchmarks/profile_engine.py --config minicpm4-0.5b --context 1024 --batch 256 --compile --async-output

A random model of the preset runs one prompt through `LLMEngine` (paged cache, prompt in one chunk, decode
from CUDA graphs unless --eager). torch.profiler records the prefill and `--steps` decode steps; printed:
wall time, the summed kernel time, and the kernels grouped by name (top --top by time), per phase.
Writes benchmarks/results/profile-<config>-<context>-<date>.json with the grouped rows.
"""

from __future__ import annotations

import argparse
import cProfile
import datetime
import os
import pstats
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from common import covering_tokenizer, parse_engine_args, write_json  # noqa: E402

from cpm4.engine.paged import PagedKVCache, page_size_for  # noqa: E402
from cpm4.engine.sampling import SamplingParams  # noqa: E402
from cpm4.engine.scheduler import LLMEngine  # noqa: E402
from cpm4.model.config import preset  # noqa: E402
from cpm4.model.init import random_model  # noqa: E402


def kernel_rows(prof, steps: int) -> tuple[float, list[dict]]:
    """(summed device time per step in ms, kernels grouped by name with ms per step and calls per step)."""
    groups: dict[str, list[float]] = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA and e.device_time > 0:
            g = groups.setdefault(e.name[:90], [0.0, 0])
            g[0] += e.device_time / 1000
            g[1] += 1
    rows = [{"kernel": k, "ms": round(v[0] / steps, 4), "calls": round(v[1] / steps, 2)}
            for k, v in groups.items()]
    rows.sort(key=lambda r: -r["ms"])
    return sum(r["ms"] for r in rows), rows


def show(title: str, wall_ms: float, total: float, rows: list[dict], top: int) -> None:
    calls = sum(r["calls"] for r in rows)
    print(f"\n{title}: wall {wall_ms:.3f} ms, kernels {total:.3f} ms in {calls:.0f} launches "
          f"(gaps {wall_ms - total:.3f} ms)")
    for r in rows[:top]:
        print(f"  {r['ms']:9.4f} ms {r['calls']:7.1f}x  {r['kernel']}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="minicpm4-8b")
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--sparse", action="store_true", help="the preset's InfLLM v2 sparse_config")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--async-output", action=argparse.BooleanOptionalAction, default=None,
                    help="see LLMEngine (default: on with CUDA graphs)")
    ap.add_argument("--eager", action="store_true", help="no CUDA graphs for decode")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch", type=int, default=1,
                    help="sequences decoding together (> 1: prompts prefilled in chunks, only decode is profiled)")
    ap.add_argument("--chunk-tokens", type=int, default=8192, help="prefill chunk with --batch > 1")
    ap.add_argument("--device", default="cuda", help="cpu: a smoke run of --batch > 1 (no kernel table)")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--out", default="benchmarks/results")
    args = parse_engine_args(ap)
    if args.batch > 1:
        return profile_batch(args)
    dev = torch.device("cuda")
    cfg = preset(args.config)
    if not args.sparse:
        cfg.sparse_config = None
    total = args.context + args.steps + 64
    cfg.max_position_embeddings = max(cfg.max_position_embeddings, total)
    model = random_model(cfg, dev, torch.bfloat16)
    ps = page_size_for(cfg)
    cache = PagedKVCache(cfg, -(-total // ps) + 1, ps, dev, torch.bfloat16)
    eng = LLMEngine(model, covering_tokenizer(cfg.vocab_size), cache, max_batch_size=1, chunk_tokens=total,
                    cuda_graphs=not args.eager, compile=args.compile, async_output=args.async_output)
    g = torch.Generator().manual_seed(0)

    def request(n: int, new: int, rid: str) -> None:
        ids = torch.randint(3, 4000, (n,), generator=g).tolist()
        eng.add_request(rid, ids, SamplingParams(temperature=0, max_tokens=new, ignore_eos=True))

    with torch.inference_mode():
        request(args.context, 4, "warm")  # kernels built, graph captured (and compiled)
        while eng.has_work():
            eng.step()
        request(args.context, 2, "timed")  # the prefill's wall time without the profiler
        torch.cuda.synchronize()
        t = time.perf_counter()
        eng.step()
        torch.cuda.synchronize()
        plain_prefill = (time.perf_counter() - t) * 1000
        while eng.has_work():
            eng.step()
        request(args.context, 3 * args.steps + 2, "run")
        torch.cuda.synchronize()
        t = time.perf_counter()
        with profile(activities=[ProfilerActivity.CUDA]) as p_pre:
            eng.step()  # the whole prompt in one chunk, first token sampled
            torch.cuda.synchronize()
        pre_wall = (time.perf_counter() - t) * 1000
        eng.step()  # one decode step outside the profile
        torch.cuda.synchronize()
        t = time.perf_counter()
        with profile(activities=[ProfilerActivity.CUDA]) as p_dec:
            for _ in range(args.steps):
                eng.step()
            torch.cuda.synchronize()
        dec_wall = (time.perf_counter() - t) * 1000 / args.steps
        # Unprofiled decode steps: their wall time, and where the host spends it (cProfile).
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(args.steps):
            eng.step()
        torch.cuda.synchronize()
        plain_wall = (time.perf_counter() - t) * 1000 / args.steps
        host = cProfile.Profile()
        host.enable()
        for _ in range(args.steps):
            eng.step()
        host.disable()
        while eng.has_work():
            eng.step()
    pre_total, pre_rows = kernel_rows(p_pre, 1)
    dec_total, dec_rows = kernel_rows(p_dec, args.steps)
    mode = ("InfLLM v2" if args.sparse else "dense") + (", compiled" if args.compile else "") \
        + (", eager" if args.eager else ", graphs")
    head = f"{args.config} at {args.context} tokens, {mode}, {torch.cuda.get_device_name(dev)}"
    print(head)
    show("prefill (profiled)", pre_wall, pre_total, pre_rows, args.top)
    print(f"prefill without the profiler: {plain_prefill:.1f} ms")
    show("decode step (profiled, per step)", dec_wall, dec_total, dec_rows, args.top)
    print(f"\ndecode step without the profiler: {plain_wall:.3f} ms; host functions over {args.steps} steps:")
    pstats.Stats(host).sort_stats("tottime").print_stats(args.top)
    date = datetime.date.today().isoformat()
    doc = {"device": torch.cuda.get_device_name(dev), "date": date, "what": head,
           "prefill": {"wall_ms": pre_wall, "kernel_ms": pre_total, "kernels": pre_rows[:60]},
           "decode": {"wall_ms": dec_wall, "kernel_ms": dec_total, "kernels": dec_rows[:60]},
           "rows": [{"phase": "prefill", "seqlen": args.context, "ours_ms": round(plain_prefill, 3)},
                    {"phase": "decode", "seqlen": args.context, "ours_ms": round(plain_wall, 3)}]}
    tag = f"{args.config}-{args.context}-{'sparse' if args.sparse else 'dense'}{'-compiled' if args.compile else ''}"
    write_json(doc, f"profile-{tag}-{date}.json", args.out)


def device_label(dev: torch.device) -> str:
    return torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"


def profile_batch(args) -> None:
    """Decode steps with args.batch sequences of args.context prompt tokens running together: the kernels
    per step, wall time with and without the profiler, and the host's functions (cProfile)."""
    dev = torch.device(args.device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()

    cfg = preset(args.config)
    if not args.sparse:
        cfg.sparse_config = None
    new = 6 * args.steps + 8
    per_seq = args.context + new
    cfg.max_position_embeddings = max(cfg.max_position_embeddings, per_seq)
    model = random_model(cfg, dev, dtype)
    ps = page_size_for(cfg)
    cache = PagedKVCache(cfg, args.batch * (-(-per_seq // ps) + 1) + 1, ps, dev, dtype)
    tok = covering_tokenizer(cfg.vocab_size)
    eng = LLMEngine(model, tok, cache, max_batch_size=args.batch, chunk_tokens=args.chunk_tokens,
                    cuda_graphs=not args.eager and dev.type == "cuda", compile=args.compile,
                    async_output=args.async_output)
    g = torch.Generator().manual_seed(0)
    params = SamplingParams(temperature=0.6, max_tokens=new, ignore_eos=True)

    def all_decoding() -> bool:
        return not eng.waiting and all(r.num_tokens - r.computed <= 1 for r in eng.running)

    def timed(n: int) -> float:
        sync()
        t = time.perf_counter()
        for _ in range(n):
            eng.step()
        sync()
        return (time.perf_counter() - t) * 1000 / n

    with torch.inference_mode():
        eng.warm_up()  # every decode-graph bucket captured (and compiled) first
        for i in range(args.batch):
            ids = torch.randint(3, min(4000, cfg.vocab_size), (args.context,), generator=g).tolist()
            eng.add_request(f"r{i}", ids, params)
        sync()
        t = time.perf_counter()
        prefill_steps = 0
        while not all_decoding():
            eng.step()
            prefill_steps += 1
        sync()
        prefill_ms = (time.perf_counter() - t) * 1000
        timed(2)
        plain_wall = timed(args.steps)
        with profile(activities=[ProfilerActivity.CUDA if dev.type == "cuda" else ProfilerActivity.CPU]) as p_dec:
            dec_wall = timed(args.steps)
        host = cProfile.Profile()
        host.enable()
        timed(args.steps)
        host.disable()
        running = len(eng.running)
        while eng.has_work():
            eng.step()
    dec_total, dec_rows = kernel_rows(p_dec, args.steps)
    mode = ("InfLLM v2" if args.sparse else "dense") + (", compiled" if args.compile else "") \
        + (", eager" if args.eager or dev.type != "cuda" else ", graphs") \
        + (", async output" if eng.async_output else "")
    head = (f"{args.config}: {args.batch} sequences of {args.context} prompt tokens decoding, {mode}, "
            f"{device_label(dev)}")
    print(head)
    print(f"prefill of all prompts: {prefill_ms:.0f} ms in {prefill_steps} engine steps; {running} rows running")
    show("decode step (profiled, per step)", dec_wall, dec_total, dec_rows, args.top)
    print(f"\ndecode step without the profiler: {plain_wall:.3f} ms ({args.batch / plain_wall * 1000:.0f} tok/s); "
          f"host functions over {args.steps} steps:")
    pstats.Stats(host).sort_stats("tottime").print_stats(args.top)
    date = datetime.date.today().isoformat()
    doc = {"device": device_label(dev), "date": date, "what": head,
           "decode": {"wall_ms": dec_wall, "kernel_ms": dec_total, "kernels": dec_rows[:60]},
           "rows": [{"phase": f"decode.batch{args.batch}", "seqlen": args.context, "ours_ms": round(plain_wall, 3),
                     "peer_ms": None, "speedup": None}]}
    tag = f"{args.config}-{args.context}-batch{args.batch}{'-compiled' if args.compile else ''}"
    write_json(doc, f"profile-{tag}-{date}.json", args.out)


if __name__ == "__main__":
    main()
