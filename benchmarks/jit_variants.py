"""Triton compilations in the middle of serving.

Triton compiles a kernel once per signature: an int argument is specialized as 1, a multiple of 16 or other,
a pointer as 16-byte aligned or not (unless the kernel lists it in `do_not_specialize`). Arguments that follow
a step's lengths (token counts, strides of buffers sized by them) compile a new variant whenever a length lands
in a class not met before — seconds for the large kernels, inside a request's time. This runs the engine as a
server would (warm_up, then batches of prompts of random lengths) and counts, round by round, the compilations
each round met, with their kernels and seconds (Triton's pre- and post-compile hooks). A steady server compiles
nothing after its first rounds.

    python3 benchmarks/jit_variants.py --config minicpm4-0.5b                      # dense rows
    python3 benchmarks/jit_variants.py --config minicpm4-0.5b --dense-len 2048     # InfLLM v2 rows past 2K
    python3 benchmarks/jit_variants.py --config minicpm4-0.5b --dense-len 2048 --shared-prefix 4096 --max-len 512
    python3 benchmarks/jit_variants.py --config minicpm4-0.5b --dense-len 2048 --eager  # eager decode steps too

`--dense-len N` gives the model the 8B's sparse_config with dense_len N, so prompts past N run the InfLLM v2
prefill kernels. Rows: `round<i>` (round 0 right after warm_up), ours_ms the round's wall time; `compiles`,
`compile_s` and `kernels` (name: count). Prints a table and writes benchmarks/results/jit_variants-<config>-<date>.json.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from common import RunWatch, covering_tokenizer, write_rows  # noqa: E402

from cpm4.engine.sampling import SamplingParams  # noqa: E402
from cpm4.engine.scheduler import build_engine  # noqa: E402
from cpm4.model.config import preset  # noqa: E402
from cpm4.model.init import random_model  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="minicpm4-0.5b")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dense-len", type=int, default=None,
                    help="the 8B's sparse_config with this dense_len (InfLLM v2 prefill past it)")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--requests", type=int, default=16, help="prompts per round, submitted at once")
    ap.add_argument("--min-len", type=int, default=64)
    ap.add_argument("--max-len", type=int, default=4096)
    ap.add_argument("--output", type=int, default=8, help="tokens generated per request")
    ap.add_argument("--shared-prefix", type=int, default=0,
                    help="every prompt starts with the same N tokens (cached after the first round): the rest is "
                         "prefilled as rows continuing a cached prefix (few queries after many keys)")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--eager", action="store_true", help="CUDA graphs off: eager decode steps (--enforce-eager)")
    ap.add_argument("--tag", default="")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = ap.parse_args()
    if args.shared_prefix < 0:
        ap.error(f"--shared-prefix must be >= 0, got {args.shared_prefix}")
    if not 1 <= args.min_len <= args.max_len:
        ap.error(f"need 1 <= --min-len <= --max-len, got {args.min_len} and {args.max_len}")
    dev = torch.device(args.device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    over = {}
    if args.dense_len is not None:
        sc = preset("minicpm4-8b").sparse_config
        over["sparse_config"] = {**{k: getattr(sc, k) for k in ("kernel_size", "kernel_stride", "init_blocks",
                                                                  "block_size", "window_size", "topk", "variant")},
                                 "dense_len": args.dense_len}
    cfg = preset(args.config, **over)
    model = random_model(cfg, dtype=dtype, device=dev)
    tok = covering_tokenizer(cfg.vocab_size)
    eng = build_engine(model, tok, args.requests * (args.shared_prefix + args.max_len + args.output + 64),
                       args.requests, cuda_graphs=False if args.eager else None, compile=args.compile)
    eng.warm_up()
    rnd = random.Random(0)
    prefix = [rnd.randrange(3, cfg.vocab_size) for _ in range(args.shared_prefix)]
    params = SamplingParams(temperature=0, max_tokens=args.output, ignore_eos=True)
    rows = []
    for i in range(args.rounds):
        lens = [rnd.randint(args.min_len, args.max_len) for _ in range(args.requests)]
        with RunWatch() as watch:
            t = time.perf_counter()
            for j, n in enumerate(lens):
                eng.add_request(f"r{i}-{j}", prefix + [rnd.randrange(3, cfg.vocab_size) for _ in range(n)], params)
            eng.run_to_completion()
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            wall = time.perf_counter() - t
        s = watch.summary()
        rows.append({"phase": f"round{i}", "seqlen": sum(lens), "ours_ms": round(1000 * wall, 1), "peer_ms": None,
                     "speedup": None, "compiles": s["triton_kernels"], "compile_s": s["triton_compile_s"],
                     "kernels": s["triton_by_name"]})
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"\n{args.config}{'' if args.dense_len is None else f' (InfLLM v2 past {args.dense_len})'}, {name}; "
          f"{args.requests} prompts of {args.min_len}-{args.max_len} tokens a round"
          + (f" after a shared {args.shared_prefix}-token prefix" if args.shared_prefix else ""))
    print(f"{'round':8s} {'tokens':>8s} {'wall ms':>9s} {'compiles':>9s} {'compile s':>10s}  kernels")
    for r in rows:
        print(f"{r['phase']:8s} {r['seqlen']:8d} {r['ours_ms']:9.1f} {r['compiles']:9d} {r['compile_s']:10.3f}  "
              + ", ".join(f"{k} x{v}" for k, v in sorted(r["kernels"].items())))
    write_rows(f"jit_variants-{args.config}" + ("" if args.dense_len is None else f"-dense{args.dense_len}")
               + (f"-prefix{args.shared_prefix}" if args.shared_prefix else "") + args.tag, name, rows, args.out,
               config=args.config, dense_len=args.dense_len, shared_prefix=args.shared_prefix,
               compile=args.compile, requests=args.requests, min_len=args.min_len, max_len=args.max_len)


if __name__ == "__main__":
    main()
