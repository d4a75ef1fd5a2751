"""Shared by the benchmark scripts: writing their JSON, the tokenizer of random models."""

from __future__ import annotations

import argparse
import json
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cpm4.model.tokenizer import Tokenizer


def replay_ms(graph, reps: int) -> float:
    """Milliseconds per replay of a captured CUDA graph, after one untimed replay."""
    import torch

    graph.replay()
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(reps):
        graph.replay()
    e.record()
    e.synchronize()
    return s.elapsed_time(e) / reps


def write_json(doc: dict, name: str, out: str) -> None:
    """Write `doc` as `out/name` atomically (temporary file, then rename), and also under $OUT when set (the
    device machine's folder that comes back)."""
    for folder in [out] + ([os.environ["OUT"]] if os.environ.get("OUT") else []):
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, name)
        with open(path + ".tmp", "w") as f:
            json.dump(doc, f, indent=1)
        os.replace(path + ".tmp", path)
        print(f"wrote {path}")


def write_rows(name: str, device: str, rows: list[dict], out: str, **meta) -> None:
    """A benchmark's results as `out/<name>-<date>.json`: {"device", "date", **meta, "rows"}."""
    import datetime

    date = datetime.date.today().isoformat()
    write_json({"device": device, "date": date, **meta, "rows": rows}, f"{name}-{date}.json", out)


def print_rows(rows: list[dict], digits: int = 3) -> None:
    """The table of `rows` ({"phase", "seqlen", "ours_ms", "peer_ms", "speedup"}; peer and speed-up may be None)."""
    print(f"{'phase':28s} {'seqlen':>7s} {'ours ms':>9s} {'peer ms':>9s} {'speedup':>8s}")
    for r in rows:
        peer = "" if r["peer_ms"] is None else f"{r['peer_ms']:9.{digits}f}"
        sp = "" if r["speedup"] is None else f"{r['speedup']:7.{min(digits, 3) - 1}f}x"
        print(f"{r['phase']:28s} {r['seqlen']:7d} {r['ours_ms']:9.{digits}f} {peer:>9s} {sp:>8s}")


def cpu_device() -> str:
    import torch

    return f"CPU ({torch.get_num_threads()} threads)"


def covering_tokenizer(vocab_size: int, base: Tokenizer | None = None) -> Tokenizer:
    """A tokenizer in which every id of a random model's vocabulary decodes to text: a 1024-id byte-level one
    (or `base`) plus plain tokens "<tN>" for the ids above. With ids that decode to nothing (beyond a small
    tokenizer, or skipped special tokens), a streaming detokenizer's window never advances and every step
    re-decodes the whole output so far: quadratic host time that a real tokenizer never causes."""
    from cpm4.model.tokenizer import build_tokenizer

    tok = base or build_tokenizer(1024)
    n = len(tok.hf)
    if n >= vocab_size:
        return tok
    if base is not None:
        tok = build_tokenizer(n)  # a fresh copy: `base` stays as it was
    tok.hf.add_tokens([f"<t{i}>" for i in range(n, vocab_size)])
    if len(tok.hf) != vocab_size:
        raise RuntimeError(f"covering tokenizer has {len(tok.hf)} ids, expected {vocab_size}")
    return tok


def _fuse_rows(text: str) -> int:
    """--fuse-dense-store: on (every step), off (none) or a step's most rows."""
    if text in ("on", "off"):
        return 1 << 30 if text == "on" else 0
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected on, off or a number of rows, got {text!r}")
    return int(text)


def parse_engine_args(ap: argparse.ArgumentParser) -> argparse.Namespace:
    """Parse with the engine options every engine benchmark shares and apply them."""
    from cpm4.engine import cuda_graph

    ap.add_argument("--pinned-inputs", action="store_true",
                    help="decode-graph inputs from pinned, double-buffered host tensors (cuda_graph.PINNED_INPUTS)")
    ap.add_argument("--compile-per-bucket", action="store_true",
                    help="with --compile: a compilation for every decode-graph bucket rather than one shared past "
                    "batch 1 (cuda_graph.DYNAMIC_BATCH off)")
    ap.add_argument("--warm-order", choices=["largest", "smallest"], default="largest",
                    help="which decode-graph bucket warm_up captures first (cuda_graph.WARM_LARGEST_FIRST)")
    ap.add_argument("--cascade-groups", type=int, default=None,
                    help="the most prefix groups a step's cascade takes, prefill (Attention.cascade_groups) and "
                    "decode (paged.CASCADE_DECODE_GROUPS); default theirs (4)")
    ap.add_argument("--no-prefill-graphs", action="store_true",
                    help="packed prefill steps layer by layer, not through their CUDA graphs (prefill_graphs.ENABLED)")
    ap.add_argument("--prefill-graphs-narrow", action="store_true",
                    help="only the packed all-dense prefill steps through the prefill graphs, not a lone prompt's "
                         "or a sparse or cascade step (prefill_graphs.WIDER off)")
    ap.add_argument("--decode-gemv", choices=["off", "plan", "fused", "all"], default=None,
                    help="batch-1 decode through the Triton GEMV (cpm4.kernels.gemv): off (cuBLAS throughout), plan "
                         "(q/k/v, o, down; DECODE_GEMV), fused (plan and a small model's layers as GEMVs holding "
                         "the norms, RoPE, SiLU·up and residuals; FUSE_LAYERS), all (any model's layers fused; "
                         "FUSE_LARGE); default the library's (fused)")
    ap.add_argument("--pdl", choices=["on", "off"], default=None,
                    help="every decode kernel of ours (attention, GEMV) as a programmatic dependent launch in every "
                         "step (Hopper+; triton_decode.PDL, triton_gemv.PDL), or none (off); default the library's "
                         "(PDL in fused one-row steps only: cuda_graph.FUSED_PDL)")
    ap.add_argument("--fuse-dense-store", type=_fuse_rows, default=None, metavar="on|off|ROWS",
                    help="the dense paged decode stores the new keys/values in its attention launch (on), or by a "
                         "launch of its own before it (off), at every batch size, or in the launch for steps of up "
                         "to ROWS rows; default the library's (triton_decode.FUSE_DENSE_STORE_ROWS)")
    ap.add_argument("--store-peel", choices=["on", "off"], default=None,
                    help="with the store in the attention launch, the current token added after the tiles' loop "
                         "(on) rather than swapped into its tile (off); default the library's "
                         "(triton_decode.STORE_PEEL)")
    ap.add_argument("--union-tokens", type=int, choices=[0, 2, 4, 8], default=None,
                    help="InfLLM v2 prefill's stage 2 over the union of this many neighbouring tokens' blocks where "
                         "they overlap (triton_union.UNION_TOKENS; 0 off); default the library's (4)")
    ap.add_argument("--dense-steps", action="store_true",
                    help="an InfLLM v2 model's decode steps below dense_len through the dense paged decode, from "
                         "graphs of their own (cpm4.engine.paged.DENSE_STEPS)")
    args = ap.parse_args()
    if args.dense_steps:
        from cpm4.engine import paged

        paged.DENSE_STEPS = True
    if args.union_tokens is not None:
        from cpm4.kernels.infllm_v2 import triton_union

        triton_union.UNION_TOKENS = args.union_tokens
    if args.store_peel is not None:
        from cpm4.kernels.infllm_v2 import triton_decode

        triton_decode.STORE_PEEL = args.store_peel == "on"
    if args.fuse_dense_store is not None:
        from cpm4.kernels.infllm_v2 import triton_decode

        triton_decode.FUSE_DENSE_STORE_ROWS = args.fuse_dense_store
    if args.pdl is not None:
        from cpm4.kernels.gemv import triton_gemv
        from cpm4.kernels.infllm_v2 import triton_decode

        triton_decode.PDL = triton_gemv.PDL = args.pdl == "on"
    if args.decode_gemv is not None:
        from cpm4.kernels import gemv

        gemv.DECODE_GEMV = args.decode_gemv != "off"
        gemv.FUSE_LAYERS = args.decode_gemv in ("fused", "all")
        gemv.FUSE_LARGE = args.decode_gemv == "all"
    if args.no_prefill_graphs or args.prefill_graphs_narrow:
        from cpm4.engine import prefill_graphs

        prefill_graphs.ENABLED = not args.no_prefill_graphs
        prefill_graphs.WIDER = not args.prefill_graphs_narrow
    if args.cascade_groups is not None:
        if args.cascade_groups < 1:
            ap.error(f"--cascade-groups must be >= 1, got {args.cascade_groups}")
        from cpm4.engine import paged
        from cpm4.model.modeling import Attention

        Attention.cascade_groups = paged.CASCADE_DECODE_GROUPS = args.cascade_groups
    cuda_graph.PINNED_INPUTS = cuda_graph.PINNED_INPUTS or args.pinned_inputs
    cuda_graph.DYNAMIC_BATCH = cuda_graph.DYNAMIC_BATCH and not args.compile_per_bucket
    cuda_graph.WARM_LARGEST_FIRST = args.warm_order == "largest"
    return args


class RunWatch:
    """What else ran inside a `with` block: Triton JIT compiles (by kernel name, through Triton's post-compile
    hook where this Triton has one), dynamo graphs compiled, and the garbage collector's pauses. A timed run
    that compiles or collects for long is measuring those."""

    def __init__(self) -> None:
        self.triton: dict[str, int] = {}
        self.triton_s: dict[str, float] = {}  # seconds from the pre-compile hook to the post-compile one
        self._compile_t0: dict[str, float] = {}
        self.dynamo_graphs = 0
        self.gc_ms: list[float] = []  # one per collection of the oldest generation
        self.gc_young_ms = 0.0
        self.cuda_alloc: dict[str, int] = {}

    def _gc(self, phase: str, info: dict) -> None:
        import time

        if phase == "start":
            self._gc_t = time.perf_counter()
            return
        ms = (time.perf_counter() - self._gc_t) * 1000
        if info.get("generation") == 2:
            self.gc_ms.append(round(ms, 1))
        else:
            self.gc_young_ms += ms

    @staticmethod
    def _name(kwargs: dict) -> str:
        fn = kwargs.get("fn")
        return getattr(getattr(fn, "fn", fn), "__name__", None) or str(kwargs.get("repr", "?")).split("[")[0]

    def _pre(self, *args, **kwargs) -> None:
        import time

        self._compile_t0[self._name(kwargs)] = time.perf_counter()

    def _hook(self, *args, **kwargs) -> None:
        import time

        name = self._name(kwargs)
        self.triton[name] = self.triton.get(name, 0) + 1
        t0 = self._compile_t0.pop(name, None)
        if t0 is not None:
            self.triton_s[name] = self.triton_s.get(name, 0.0) + time.perf_counter() - t0

    def __enter__(self) -> RunWatch:
        import gc

        import torch._dynamo.utils as dyn

        gc.callbacks.append(self._gc)
        self._mem0 = self._mem()

        self._graphs0 = dyn.counters["stats"]["unique_graphs"]
        self._knobs = None
        try:
            from triton import knobs

            self._knobs, self._prev = knobs.runtime, knobs.runtime.jit_post_compile_hook
            self._prev_pre = knobs.runtime.jit_cache_hook
            prev, prev_pre = self._prev, self._prev_pre

            def hook(*args, **kwargs):
                self._hook(*args, **kwargs)
                return prev(*args, **kwargs) if prev else None

            def pre(*args, **kwargs):  # called before compiling; a true result would skip the kernel
                self._pre(*args, **kwargs)
                return prev_pre(*args, **kwargs) if prev_pre else None

            knobs.runtime.jit_post_compile_hook = hook
            knobs.runtime.jit_cache_hook = pre
        except (ImportError, AttributeError):
            pass
        return self

    def __exit__(self, *exc) -> None:
        import gc

        import torch._dynamo.utils as dyn

        gc.callbacks.remove(self._gc)
        mem = self._mem()
        self.cuda_alloc = {k: mem[k] - self._mem0.get(k, 0) for k in mem}

        self.dynamo_graphs = dyn.counters["stats"]["unique_graphs"] - self._graphs0
        if self._knobs is not None:
            self._knobs.jit_post_compile_hook = self._prev
            self._knobs.jit_cache_hook = self._prev_pre

    @staticmethod
    def _mem() -> dict[str, int]:
        """The CUDA caching allocator's counters that mean waiting: device allocations and frees (cudaMalloc /
        cudaFree), and retries after a failed allocation (every cached block freed, the device synchronized)."""
        import torch

        if not torch.cuda.is_available() or not torch.cuda.is_initialized():
            return {}
        st = torch.cuda.memory_stats()
        return {k: int(st.get(k, 0)) for k in ("num_alloc_retries", "num_device_alloc", "num_device_free")}

    def summary(self) -> dict:
        return {"triton_kernels": sum(self.triton.values()), "triton_by_name": dict(self.triton),
                "triton_compile_s": round(sum(self.triton_s.values()), 3),
                "dynamo_graphs": self.dynamo_graphs, "gc_full_ms": self.gc_ms,
                "gc_young_ms": round(self.gc_young_ms, 1), "cuda_alloc": self.cuda_alloc}


def paged_decode_state(k, v, k1, k2, cfg):
    """CUDA. A paged cache (64-token pages, in order) holding `k`/`v` ([n, hkv, d]) with their fine and coarse
    kernel keys `k1`/`k2` in page-slot stores, as the engine keeps them for one layer and one sequence: returns
    (key pages, value pages, block table [1, pages], lengths [1], fine store, coarse store)."""
    import math

    import torch

    from cpm4.kernels.infllm_v2 import reference as R

    n, hkv, d = k.shape
    pages = math.ceil(n / 64)
    kc = torch.zeros(pages, 64, hkv, d, device="cuda", dtype=k.dtype)
    vc = torch.zeros_like(kc)
    kc.view(-1, hkv, d)[:n] = k
    vc.view(-1, hkv, d)[:n] = v
    table = torch.arange(pages, device="cuda", dtype=torch.int32)[None]
    lens = torch.tensor([n], device="cuda", dtype=torch.int32)
    stores = []
    for kk, size, stride in ((k1, cfg.kernel_size, cfg.kernel_stride),
                             (k2, cfg.coarse_kernel_size, cfg.coarse_kernel_stride)):
        store = torch.zeros(pages, R.kernel_slots(64, stride), hkv, d, device="cuda", dtype=k.dtype)
        pg, slot = R.kernel_page_slots(torch.arange(kk.shape[0], device="cuda"), size, stride, 64)
        store[pg, slot] = kk
        stores.append(store)
    return kc, vc, table, lens, stores[0], stores[1]


def bench(fn, warmup: int = 5, rep: int = 20) -> float:
    """CUDA. Median milliseconds of `fn` over `rep` runs (CUDA events), after warm-up."""
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(rep):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    times.sort()
    return times[len(times) // 2]


_FLUSH: list = []


def cold_graph_ms(fn, reps: int = 20) -> float:
    """CUDA. Milliseconds a call of `fn` replayed from a CUDA graph with a cold L2: `reps` calls in one graph, each
    after a 256 MB write that evicts the L2 (that write's time measured alone and subtracted), as inside a model's
    decode graph and without the ~10 µs of launching a graph per call."""
    import torch

    from cpm4.engine.capture import capture_graph

    if not _FLUSH:
        _FLUSH.append(torch.empty(64 * 1024**2, dtype=torch.int32, device="cuda"))  # 256 MB > the 50 MB L2

    def per_call(f) -> float:
        graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            f()
        torch.cuda.current_stream().wait_stream(stream)
        with capture_graph(graph):
            for _ in range(reps):
                f()
        return bench(graph.replay, rep=20) / reps

    def flush() -> None:
        _FLUSH[0].zero_()

    def step() -> None:
        flush()
        fn()
    return per_call(step) - per_call(flush)

