"""What prefix caching buys: requests that share a long prompt prefix (a system prompt, a document asked several
questions), through `LLMEngine` with prefix caching on against the same engine with it off (the peer, vLLM's
--no-enable-prefix-caching), measured in one run on random µP weights of a preset.

    python benchmarks/prefix_cache.py --config minicpm4-0.5b                       # bf16 on CUDA
    python benchmarks/prefix_cache.py --config tiny --device cpu --prefixes 256 1024 --requests 4 --output 8

For each shared-prefix length P: one request with the prefix runs first (as a server's earlier request would
have; untimed), then --requests requests, each the prefix plus its own --suffix random tokens, are submitted at
once and run to completion (with --groups N: N prefixes of that length, an earlier request for each, request i
after prefix i mod N) (greedy, ignore_eos, --output tokens each); with --repeats R, R such batches (fresh
suffixes), the row their median. Rows: `prefix.all` the wall time of the
batch, `prefix.ttft` the mean time from submission to each request's first token; `cached_tokens` the prompt
tokens the timed requests found cached (0 for the peer). `prefix.cold.*`: the same with a prefix nobody computed
before (the first request computes it while the others wait for its pages). Before timing, every engine runs
the same workload with other tokens, so kernel compiles and CUDA-graph captures are not timed. Prints a table and writes
benchmarks/results/prefix_cache-<config>-<date>.json (`-cpu` before the date on the CPU).
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from common import covering_tokenizer, parse_engine_args, print_rows, write_rows  # noqa: E402

from cpm4.engine.sampling import SamplingParams  # noqa: E402
from cpm4.engine.scheduler import LLMEngine, build_engine  # noqa: E402
from cpm4.model.config import preset  # noqa: E402
from cpm4.model.init import random_model  # noqa: E402


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def run(eng: LLMEngine, prompts: list[list[int]], params: SamplingParams) -> dict:
    """Submit all prompts at once and step to the end: wall seconds, mean time to first token, cached tokens."""
    dev = eng.model.device
    sync(dev)
    t0 = time.perf_counter()
    first: dict[str, float] = {}
    cached: dict[str, int] = {}
    tokens = 0
    steps = []  # host-seen ms of each step (the first: admission, prefix lookup and the prefill)
    for i, p in enumerate(prompts):
        eng.add_request(f"r{time.monotonic_ns()}-{i}", p, params)
    while eng.has_work():
        ts = time.perf_counter()
        out = eng.step()
        steps.append(round(1000 * (time.perf_counter() - ts), 2))
        for rid, d in out:
            if d.token_ids and rid not in first:
                first[rid] = time.perf_counter() - t0  # the host saw it: the step's tokens were read back
            if d.cached_tokens is not None:
                cached[rid] = d.cached_tokens
            tokens += len(d.token_ids)
    sync(dev)
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "ttft_s": sum(first.values()) / max(len(first), 1), "tokens": tokens,
            "cached_tokens": sum(cached.values()), "first_steps_ms": steps[:4]}


def workload(rng: random.Random, vocab: int, prefixes: list[list[int]], n: int, suffix: int) -> list[list[int]]:
    """n prompts, the i-th after prefixes[i mod len(prefixes)], each with its own random suffix."""
    return [prefixes[i % len(prefixes)] + [rng.randrange(3, vocab) for _ in range(suffix)] for i in range(n)]


def measure(eng: LLMEngine, args, plen: int, vocab: int, seed: int) -> tuple[dict, dict]:
    """(warm: the batch after an earlier request with its prefix, cold: a batch whose prefix nobody computed
    before, all submitted at once)."""
    params = SamplingParams(temperature=0, max_tokens=args.output, ignore_eos=True)
    rng = random.Random(seed)
    def prefixes() -> list[list[int]]:
        return [[rng.randrange(3, vocab) for _ in range(plen)] for _ in range(args.groups)]

    # Warm-up on other tokens: the same shapes, so compiles and graph captures happen here.
    other = prefixes()
    run(eng, workload(rng, vocab, other, args.requests, args.suffix), params)
    run(eng, workload(rng, vocab, other, args.requests, args.suffix), params)
    shared = prefixes()
    run(eng, [p + [7] for p in shared], params)  # an earlier request with each prefix
    # Fresh suffixes each repeat (a batch seen before would find its own pages cached too); cold: fresh prefixes.
    warm = [run(eng, workload(rng, vocab, shared, args.requests, args.suffix), params) for _ in range(args.repeats)]
    if args.profile and eng.cache.prefix_caching:
        profile(eng, [workload(rng, vocab, shared, args.requests, args.suffix) for _ in range(2)], params)
    cold = [run(eng, workload(rng, vocab, prefixes(), args.requests, args.suffix), params)
            for _ in range(args.repeats)]
    return median_run(warm), median_run(cold)


def median_run(runs: list[dict]) -> dict:
    """The repeats of one batch as one: median wall and time to first token, each repeat's kept (`*_runs`)."""
    out = dict(runs[len(runs) // 2])
    for key in ("wall_s", "ttft_s"):
        out[key] = statistics.median(r[key] for r in runs)
        out[key + "_runs"] = [round(1000 * r[key], 2) for r in runs]
    return out


def profile(eng: LLMEngine, batches: list[list[list[int]]], params: SamplingParams) -> None:
    """A warm batch (batches[0]) under torch.profiler: its first step (admission and the prefill), top ops by
    device time and by host time; another (batches[1]) under cProfile."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as prof

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if eng.model.device.type == "cuda" else [])
    for i, p in enumerate(batches[0]):
        eng.add_request(f"p{time.monotonic_ns()}-{i}", p, params)
    with prof(activities=acts) as pr:
        eng.step()
        sync(eng.model.device)
    while eng.has_work():
        eng.step()
    ka = pr.key_averages()
    if eng.model.device.type == "cuda":
        print(ka.table(sort_by="self_cuda_time_total", row_limit=15, max_name_column_width=60))
    print(ka.table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=60))
    # The same step once more under cProfile: the Python functions the host spends the step in (torch.profiler
    # shows ops and launches, not the interpreter's time around them).
    import cProfile
    import pstats

    for i, p in enumerate(batches[1]):
        eng.add_request(f"c{time.monotonic_ns()}-{i}", p, params)
    cp = cProfile.Profile()
    t0 = time.perf_counter()
    cp.enable()
    eng.step()
    sync(eng.model.device)
    cp.disable()
    print(f"first step under cProfile: {1000 * (time.perf_counter() - t0):.1f} ms host-seen")
    while eng.has_work():
        eng.step()
    pstats.Stats(cp).sort_stats("tottime").print_stats(20)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="minicpm4-0.5b")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--prefixes", type=int, nargs="+", default=[1024, 4096, 16384],
                    help="shared-prefix lengths in tokens")
    ap.add_argument("--requests", type=int, default=32, help="requests sharing each prefix, submitted at once")
    ap.add_argument("--suffix", type=int, default=128, help="each request's own tokens after the prefix")
    ap.add_argument("--output", type=int, default=32, help="tokens generated per request")
    ap.add_argument("--compile", action="store_true", help="torch.compile the decode step (CUDA graphs)")
    ap.add_argument("--row-by-row", action="store_true",
                    help="rows continuing cached tokens attend one SDPA call each (Attention.batch_continuing_rows "
                    "off: the engine before the variable-length call)")
    ap.add_argument("--no-cascade", action="store_true",
                    help="rows after one cached prefix attend it in the variable-length call with their own keys "
                    "(Attention.cascade_prefix off: each row's whole keys gathered and read)")
    ap.add_argument("--cascade-decode", action=argparse.BooleanOptionalAction, default=None,
                    help="decode steps attend the rows' shared prefix pages once (paged.CASCADE_DECODE; default: "
                    "on, where a group saves enough reads)")
    ap.add_argument("--sparse-row-by-row", action="store_true",
                    help="sparse rows (prompts >= dense_len) run an InfLLM v2 pipeline each "
                    "(Attention.batch_sparse_rows off: the engine before the batched kernels)")
    ap.add_argument("--profile", action="store_true",
                    help="profile the warm batch's first step (caching on) and print the top ops")
    ap.add_argument("--groups", type=int, default=1,
                    help="distinct prefixes of each length, the requests spread over them in turn (several system "
                    "prompts)")
    ap.add_argument("--repeats", type=int, default=1,
                    help="timed batches of each kind (fresh suffixes; cold: fresh prefixes): the median is the row, "
                    "every repeat's ms in ours_runs_ms / peer_runs_ms")
    ap.add_argument("--tag", default="", help="appended to the JSON name")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = parse_engine_args(ap)
    if args.row_by_row:
        from cpm4.model.modeling import Attention

        Attention.batch_continuing_rows = False
    if args.no_cascade:
        from cpm4.model.modeling import Attention

        Attention.cascade_prefix = False
    if args.cascade_decode is not None:
        from cpm4.engine import paged

        paged.CASCADE_DECODE = args.cascade_decode
    if args.repeats < 1:
        ap.error(f"--repeats must be 1 or more, got {args.repeats}")
    if args.groups < 1 or args.groups > args.requests:
        ap.error(f"--groups must be 1 .. --requests ({args.requests}), got {args.groups}")
    if args.sparse_row_by_row:
        from cpm4.model.modeling import Attention

        Attention.batch_sparse_rows = False
    dev = torch.device(args.device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    cfg = preset(args.config)
    model = random_model(cfg, dtype=dtype, device=dev)
    tok = covering_tokenizer(cfg.vocab_size)
    vocab = cfg.vocab_size
    rows = []
    for plen in args.prefixes:
        need = (args.requests + args.groups) * (plen + args.suffix + args.output + 64)
        res = {}
        for on in (True, False):
            eng = build_engine(model, tok, need, max(args.requests, 1), compile=args.compile,
                               cascade_decode=args.cascade_decode,
                               enable_prefix_caching=on)
            res[on] = measure(eng, args, plen, vocab, seed=plen)  # the same tokens for both
            del eng
            gc.collect()
            if dev.type == "cuda":
                torch.cuda.empty_cache()
        for k, kind in ((0, "prefix"), (1, "prefix.cold")):
            on, off = res[True][k], res[False][k]
            assert on["tokens"] == off["tokens"] == args.requests * args.output, (on, off)
            for phase, key in ((f"{kind}.all", "wall_s"), (f"{kind}.ttft", "ttft_s")):
                rows.append({"phase": phase, "seqlen": plen, "ours_ms": round(1000 * on[key], 2),
                             "peer_ms": round(1000 * off[key], 2), "speedup": round(off[key] / on[key], 2),
                             "cached_tokens": on["cached_tokens"], "peer_cached_tokens": off["cached_tokens"],
                             "requests": args.requests, "suffix": args.suffix, "output": args.output,
                             "first_steps_ms": on["first_steps_ms"], "peer_first_steps_ms": off["first_steps_ms"],
                             "ours_runs_ms": on[key + "_runs"], "peer_runs_ms": off[key + "_runs"]})
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"\n{args.config} (random weights, {str(dtype).removeprefix('torch.')}), {name}; {args.requests} "
          f"requests of prefix + {args.suffix} tokens, {args.output} outputs; peer: prefix caching off")
    print_rows(rows, digits=2)
    for r in rows[::2]:
        print(f"  {r['phase'][:-4]} P={r['seqlen']}: cached tokens {r['cached_tokens']} "
              f"(peer {r['peer_cached_tokens']})")
    write_rows(f"prefix_cache-{args.config}" + ("-cpu" if dev.type == "cpu" else "") + args.tag, name, rows,
               args.out, config=args.config, dtype=str(dtype).removeprefix("torch."), compile=args.compile,
               row_by_row=args.row_by_row, sparse_row_by_row=args.sparse_row_by_row, cascade=not args.no_cascade,
               cascade_decode=args.cascade_decode, groups=args.groups, cascade_groups=args.cascade_groups)


if __name__ == "__main__":
    main()
