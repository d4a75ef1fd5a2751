"""`LLMEngine.warm_up` (every decode-graph bucket captured, compiled with --compile) with cascade decode on — each
bucket's cascade variant captured too — against off. Random weights of a preset; prints a table and writes
benchmarks/results/warmup_time-<date>.json (ours: cascade decode on, peer: off; seqlen: max batch). Mode
`nographs`: CUDA graphs off (`--enforce-eager`: an eager decode step of every batch size, `_warm_decode`) against
the graphs' eager warm-up, cascade decode on in both. Mode `dynamic`: the compiled warm-up with the batch
dimension symbolic (`cuda_graph.DYNAMIC_BATCH`, one compilation shared from bucket --dynamic-from) against one
compilation per bucket (or, with --peer-dynamic-from, one shared from another bucket), and each bucket's captured
step replayed (ms, medians of 100 in 5 rounds taken in turn by the two engines; rows pointed at the scratch
page).

    python benchmarks/warmup_time.py --config minicpm4-0.5b --max-batch 256
    python benchmarks/warmup_time.py --modes nographs --max-batch 16
    python benchmarks/warmup_time.py --modes dynamic
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

from cpm4.engine import cuda_graph  # noqa: E402
from cpm4.engine.scheduler import build_engine  # noqa: E402
from cpm4.model.config import preset  # noqa: E402
from cpm4.model.init import random_model  # noqa: E402


def replay_ms(graphs: cuda_graph.DecodeGraphs, reps: int = 20) -> dict[int, list[float]]:
    """Ms of `reps` replays of each bucket's plain graph."""
    out = {}
    for bs, (graph, _) in sorted(graphs.graphs.items()):
        graph.replay()
        times = out[bs] = []
        for _ in range(reps):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            graph.replay()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
    return out


def kernel_us(graph: torch.cuda.CUDAGraph, reps: int = 10) -> dict[str, float]:
    """µs a replay of `graph` spends in each GPU kernel, by kernel name (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            graph.replay()
        torch.cuda.synchronize()
    out: dict[str, float] = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            out[e.name] = out.get(e.name, 0.0) + e.device_time / reps
    return out


def print_kernel_diff(bs: int, ours: dict[str, float], peer: dict[str, float], top: int = 14) -> None:
    """The kernels of one bucket's replay under both engines, largest difference first."""
    names = sorted(set(ours) | set(peer), key=lambda n: -abs(ours.get(n, 0.0) - peer.get(n, 0.0)))
    print(f"\nbucket {bs}: dynamic {sum(ours.values()):.1f} us, per bucket {sum(peer.values()):.1f} us (kernel time)")
    for n in names[:top]:
        print(f"  {ours.get(n, 0.0):8.1f} {peer.get(n, 0.0):8.1f}  {n[:90]}")


def warm_up_s(model, tok, max_batch: int, compile: bool, cascade: bool, graphs: bool = True,
              keep: list | None = None) -> tuple[float, int]:
    """Seconds of one engine's warm_up, and the graphs it captured (the engine appended to `keep` if given)."""
    eng = build_engine(model, tok, 300_000, max_batch, cuda_graphs=None if graphs else False, compile=compile,
                       cascade_decode=cascade)
    torch.cuda.synchronize()
    t = time.perf_counter()
    eng.warm_up()
    torch.cuda.synchronize()
    s = time.perf_counter() - t
    n = 0 if eng.graphs is None else len(eng.graphs.graphs) + len(eng.graphs.cascade_graphs)
    if keep is not None:
        keep.append(eng)
    del eng
    gc.collect()
    torch.cuda.empty_cache()
    return s, n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="minicpm4-0.5b")
    ap.add_argument("--max-batch", type=int, default=256)
    ap.add_argument("--modes", nargs="+", default=["eager", "compile"],
                    choices=["eager", "compile", "nographs", "dynamic"])
    ap.add_argument("--profile-sizes", type=int, nargs="*", default=[],
                    help="dynamic mode: these buckets' kernels under both engines (torch.profiler)")
    ap.add_argument("--dynamic-from", type=int, default=cuda_graph.DYNAMIC_FROM,
                    help="dynamic mode: ours shares one compilation from this bucket (cuda_graph.DYNAMIC_FROM)")
    ap.add_argument("--peer-dynamic-from", type=int, default=0,
                    help="dynamic mode: the peer shares one from this bucket (default 0: a compilation per bucket)")
    ap.add_argument("--order", choices=["largest", "smallest"], default="largest",
                    help="dynamic mode: ours captures this bucket first (cuda_graph.WARM_LARGEST_FIRST)")
    ap.add_argument("--peer-order", choices=["largest", "smallest"], default="largest")
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
        if mode == "dynamic":
            times, engines = [], []
            for start, order in ((args.dynamic_from, args.order), (args.peer_dynamic_from, args.peer_order)):
                # start 0: a compilation per bucket
                cuda_graph.DYNAMIC_BATCH, cuda_graph.DYNAMIC_FROM = start > 0, max(start, 1)
                cuda_graph.WARM_LARGEST_FIRST = order == "largest"
                torch._dynamo.reset()  # each its own compilations (dynamo's cache is the forward's, not an engine's)
                times.append(warm_up_s(model, tok, args.max_batch, True, True, keep=engines))
                print(f"warm_up compile, shared compilation from {start or '-'}, {order} first: {times[-1][0]:.1f} s "
                      f"({times[-1][1]} graphs)", flush=True)
            # Both engines' graphs replayed in turn, 5 rounds of 20 (a captured graph needs no compiled code).
            reps = [{}, {}]
            for _ in range(5):
                for eng, acc in zip(engines, reps):
                    for bs, t in replay_ms(eng.graphs).items():
                        acc.setdefault(bs, []).extend(t)
            r_on, r_off = ({bs: sorted(t)[len(t) // 2] for bs, t in acc.items()} for acc in reps)
            for bs in args.profile_sizes:
                print_kernel_diff(bs, *(kernel_us(eng.graphs.graphs[bs][0]) for eng in engines))
            engines.clear()
            (on, n_on), (off, n_off) = times
            peer = (f"shared compilation from {args.peer_dynamic_from}" if args.peer_dynamic_from
                    else "a compilation per bucket")
            rows.append({"phase": "warm_up.compile.dynamic_batch", "seqlen": args.max_batch,
                         "ours_ms": round(on * 1000, 1), "peer_ms": round(off * 1000, 1),
                         "speedup": round(off / on, 2), "graphs": n_on, "peer_graphs": n_off,
                         "dynamic_from": args.dynamic_from, "order": args.order, "peer": peer,
                         "peer_order": args.peer_order})
            for bs in sorted(r_on):
                rows.append({"phase": "replay.compile.dynamic_batch", "seqlen": bs, "ours_ms": round(r_on[bs], 4),
                             "peer_ms": round(r_off[bs], 4), "speedup": round(r_off[bs] / r_on[bs], 3)})
            continue
        off, n_off = warm_up_s(model, tok, args.max_batch, mode == "compile", False)
        on, n_on = warm_up_s(model, tok, args.max_batch, mode == "compile", True)
        rows.append({"phase": f"warm_up.{mode}", "seqlen": args.max_batch, "ours_ms": round(on * 1000, 1),
                     "peer_ms": round(off * 1000, 1), "speedup": round(off / on, 2), "graphs": n_on,
                     "peer_graphs": n_off})
        print(f"warm_up {mode}: cascade on {on:.1f} s ({n_on} graphs), off {off:.1f} s ({n_off})", flush=True)
    print(f"\nLLMEngine.warm_up, cascade decode on vs off, {args.config} ({torch.cuda.get_device_name()})")
    print_rows(rows, digits=3)
    write_rows("warmup_time", torch.cuda.get_device_name(), rows, args.out, config=args.config)


if __name__ == "__main__":
    main()
