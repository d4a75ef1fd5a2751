"""cpm4's engine against Hugging Face transformers on the same weights: prefill and decode speed at batch 1.

    python benchmarks/generation.py --config minicpm4-0.5b --device cpu --dtype float32 --contexts 256 1024
    python benchmarks/generation.py --config minicpm4-8b --device cuda --contexts 4096 32768 131072 --sparse

A random µP-initialised model of the preset is built in memory, its weights folded into an equivalent
`LlamaForCausalLM` (`cpm4.model.convert`, what `cpm4 convert --to llama` writes), and both run the same
prompt. Ours is the serving engine (`LLMEngine`: paged KV cache, the prompt prefilled in one chunk, decode
steps from CUDA graphs on the GPU); with --sparse it also runs with the preset's InfLLM v2 sparse_config
(dense below dense_len). The peer is transformers' LlamaForCausalLM with its dynamic KV cache, dense SDPA
attention, same dtype and device. On CUDA each decode row also gives the bytes-moved floor (weights read
once + attended KV + kernel keys, over the copy bandwidth measured in the same run) and our share of it.
Prints a table and writes benchmarks/results/generation-<config>-<device>-<date>.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from common import covering_tokenizer, parse_engine_args, write_json  # noqa: E402

from cpm4.engine.paged import PagedKVCache, page_size_for  # noqa: E402
from cpm4.engine.sampling import SamplingParams  # noqa: E402
from cpm4.engine.scheduler import LLMEngine  # noqa: E402
from cpm4.kernels.infllm_v2 import num_kernels  # noqa: E402
from cpm4.model.checkpoint import parse_dtype  # noqa: E402
from cpm4.model.config import preset  # noqa: E402
from cpm4.model.convert import folded_weights, llama_config  # noqa: E402
from cpm4.model.init import random_model  # noqa: E402
from cpm4.model.modeling import MiniCPM4ForCausalLM  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device: torch.device) -> float:
    """Device copy bandwidth in bytes/s (read + write), median of 10."""
    x = torch.empty(1024**3 // 2, dtype=torch.bfloat16, device=device)
    y = torch.empty_like(x)
    times = []
    for _ in range(12):
        sync(device)
        t = time.perf_counter()
        y.copy_(x)
        sync(device)
        times.append(time.perf_counter() - t)
    return 2 * x.numel() * 2 / sorted(times[2:])[5]


class Ours:
    """One engine per attention mode, reused across contexts (decode graphs are captured once)."""

    def __init__(self, model: MiniCPM4ForCausalLM, max_tokens: int, device: torch.device, compile: bool,
                 async_output: bool | None = None, elementwise: str | None = None):
        cfg = model.config
        ps = page_size_for(cfg)
        cache = PagedKVCache(cfg, -(-max_tokens // ps) + 1, ps, device, model.dtype)
        tok = covering_tokenizer(model.config.vocab_size)
        self.engine = LLMEngine(model, tok, cache, max_batch_size=1, chunk_tokens=max_tokens,
                                compile=compile, async_output=async_output, elementwise=elementwise)
        self.engine.warm_up()  # the decode graph captured (and compiled) before any timing
        self.device = device
        self.n = 0

    @torch.inference_mode()
    def run(self, ids: list[int], n_decode: int) -> tuple[float, float, list[int]]:
        eng = self.engine
        self.n += 1
        eng.add_request(str(self.n), ids, SamplingParams(temperature=0, max_tokens=n_decode, ignore_eos=True))
        toks: list[int] = []
        sync(self.device)
        t0 = time.perf_counter()
        while not toks:
            for _, d in eng.step():
                toks += d.token_ids
        sync(self.device)
        t1 = time.perf_counter()
        while eng.has_work():
            for _, d in eng.step():
                toks += d.token_ids
        sync(self.device)
        t2 = time.perf_counter()
        return (t1 - t0) * 1000, (t2 - t1) * 1000 / max(len(toks) - 1, 1), toks


@torch.inference_mode()
def run_hf(model, ids: list[int], n_decode: int, device) -> tuple[float, float, list[int]]:
    x = torch.tensor([ids], device=device)
    sync(device)
    t0 = time.perf_counter()
    out = model(x, use_cache=True, logits_to_keep=1)
    toks = [int(out.logits[0, -1].argmax())]
    t1 = time.perf_counter()
    past = out.past_key_values
    for _ in range(n_decode - 1):
        out = model(torch.tensor([[toks[-1]]], device=device), past_key_values=past, use_cache=True)
        past = out.past_key_values
        toks.append(int(out.logits[0, -1].argmax()))
    sync(device)
    return (t1 - t0) * 1000, (time.perf_counter() - t1) * 1000 / max(n_decode - 1, 1), toks


def decode_bytes(model: MiniCPM4ForCausalLM, ctx: int, sparse: bool) -> int:
    """Bytes one decode step must read at least: every weight once (one embedding row), the attended keys
    and values, and (InfLLM v2) the semantic-kernel keys."""
    cfg = model.config
    el = torch.empty((), dtype=model.dtype).element_size()
    weights = sum(p.numel() for p in model.parameters()) - model.model.embed_tokens.weight.numel() \
        + cfg.hidden_size * (2 if cfg.tie_word_embeddings else 1)
    per_tok = 2 * cfg.num_key_value_heads * cfg.dim_head * cfg.num_hidden_layers
    sc = cfg.sparse_config
    if sparse and sc is not None and sc.is_sparse(ctx):
        kv = min(ctx, sc.num_selected * sc.block_size) * per_tok
        kv += (num_kernels(ctx, sc.kernel_size, sc.kernel_stride)
               + num_kernels(ctx, sc.coarse_kernel_size, sc.coarse_kernel_stride)) * per_tok // 2
    else:
        kv = ctx * per_tok
    return (weights + kv) * el


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="minicpm4-0.5b")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on the CPU")
    ap.add_argument("--contexts", type=int, nargs="+", default=[256, 1024])
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--sparse", action="store_true", help="also run ours with the preset's InfLLM v2 config")
    ap.add_argument("--no-peer", action="store_true", help="skip transformers")
    ap.add_argument("--sparse-only", action="store_true", help="run ours with InfLLM v2 only (no dense rows)")
    ap.add_argument("--compile", action="store_true", help="torch.compile our decode step (CUDA graphs)")
    ap.add_argument("--gemv", nargs="?", const="all", default=None, metavar="NAMES",
                    help="decode projections through cpm4.kernels.gemv (the Triton GEMV) instead of cuBLAS: all, or a "
                    "comma-separated subset of qkv,o,gate_up,down,lm_head")
    ap.add_argument("--elementwise", choices=["eager", "triton"], default=None,
                    help="without --compile: the layers' norms, RoPE, SiLU·up and residual adds op by op (eager) or "
                    "as one Triton kernel each (cpm4.kernels.elementwise), in prefill and in the decode graphs "
                    "(default: the engine's, triton on CUDA)")
    ap.add_argument("--async-output", action=argparse.BooleanOptionalAction, default=None,
                    help="launch each decode step before reading back the previous one's tokens")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--tag", default="", help="appended to the JSON file's name (variants of one run)")
    args = parse_engine_args(ap)
    import transformers

    device = torch.device(args.device)
    dtype = parse_dtype(args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    cfg = preset(args.config)
    sparse_cfg = cfg.sparse_config
    cfg.sparse_config = None
    max_tokens = max(args.contexts) + args.decode_tokens + 1
    cfg.max_position_embeddings = max(cfg.max_position_embeddings, max_tokens)
    ours = random_model(cfg, device, dtype)
    hf = None
    if not args.no_peer:
        lcfg = transformers.LlamaConfig(**{k: v for k, v in llama_config(cfg).items() if k != "architectures"})
        with torch.device(device):  # built in `dtype` (not cast after: the rope tables stay float32)
            hf = transformers.LlamaForCausalLM._from_config(lcfg, dtype=dtype).eval()
        missing, unexpected = hf.load_state_dict(dict(folded_weights(ours.state_dict(), cfg)), strict=False)
        if unexpected or any("rotary" not in m for m in missing):
            raise RuntimeError(f"weights do not map onto LlamaForCausalLM: {missing} {unexpected}")
    if device.type == "cuda":
        dev_name = torch.cuda.get_device_name(device)
        bw = copy_bandwidth(device)
    else:
        dev_name = f"{platform.processor() or 'CPU'}, {torch.get_num_threads()} threads"
        bw = None
    if args.gemv:
        ours.use_gemv(only=None if args.gemv == "all" else args.gemv.split(","))
    modes = [("dense", None)] + ([("infllm_v2", sparse_cfg)] if args.sparse and sparse_cfg is not None else [])
    if args.sparse_only:
        if sparse_cfg is None:
            raise SystemExit(f"--sparse-only: config {args.config} has no InfLLM v2 (sparse_config)")
        modes = modes[1:] if len(modes) > 1 else [("infllm_v2", sparse_cfg)]
    engines = {}
    for mode, sc in modes:
        ours.config.sparse_config = sc
        engines[mode] = Ours(ours, max_tokens, device, args.compile, args.async_output,
                             None if args.compile else args.elementwise)
        # Warm-up: decode graph captured (and compiled), kernels built, prefill of a sparse-length prompt.
        engines[mode].run(list(range(3, 40)), 3)
        warm = min(max(args.contexts), 12288)
        engines[mode].run(torch.randint(3, min(cfg.vocab_size, 4000), (warm,)).tolist(), 3)
    ours.config.sparse_config = None
    rows = []
    g = torch.Generator().manual_seed(0)
    for n in args.contexts:
        ids = torch.randint(3, min(cfg.vocab_size, 4000), (n,), generator=g).tolist()
        peer = None
        if hf is not None:
            try:
                run_hf(hf, ids[:min(n, 4096)], 3, device)  # warm-up
                peer = run_hf(hf, ids, args.decode_tokens, device)
            except torch.OutOfMemoryError as e:
                print(f"transformers at {n}: out of memory ({e})", flush=True)
            torch.cuda.empty_cache() if device.type == "cuda" else None
        for mode, sc in modes:
            ours.config.sparse_config = sc
            # Warm-up at this length (other tokens: no prefix hit): kernels whose shapes depend on the
            # length (selection, split counts) are compiled and autotuned outside the timed run.
            engines[mode].run(torch.randint(3, min(cfg.vocab_size, 4000), (n,), generator=g).tolist(), 2)
            t_pre, t_dec, toks = engines[mode].run(ids, args.decode_tokens)
            same = sum(a == b for a, b in zip(toks, peer[2])) if peer else None
            for phase, ms in (("prefill", t_pre), ("decode", t_dec)):
                p = None if peer is None else peer[0 if phase == "prefill" else 1]
                r = {"phase": f"{phase}.{mode}", "seqlen": n, "ours_ms": round(ms, 3),
                     "peer_ms": None if p is None else round(p, 3),
                     "speedup": None if p is None else round(p / ms, 3),
                     "ours_tok_s": round((n if phase == "prefill" else 1) * 1000 / ms, 1)}
                if phase == "decode" and bw:
                    floor = decode_bytes(ours, n, sc is not None) / bw * 1000
                    r.update(floor_ms=round(floor, 3), floor_share=round(floor / ms, 3))
                if same is not None:
                    r["greedy_tokens_agreeing_with_peer"] = f"{same}/{args.decode_tokens}"
                rows.append(r)
                print(json.dumps(r), flush=True)
        ours.config.sparse_config = None
    peer_name = f"transformers {transformers.__version__} LlamaForCausalLM (converted weights, dense)"
    print(f"\n{args.config}, {dtype}, {dev_name}" + (f", copy {bw / 1e12:.2f} TB/s" if bw else "")
          + f"; peer: {peer_name}")
    print(f"{'phase':20s} {'seqlen':>7s} {'ours ms':>9s} {'peer ms':>9s} {'speedup':>8s} {'ours tok/s':>11s} "
          f"{'floor':>6s}")
    for r in rows:
        peer = "" if r["peer_ms"] is None else f"{r['peer_ms']:9.2f}"
        sp = "" if r["speedup"] is None else f"{r['speedup']:7.2f}x"
        fl = f"{r['floor_share']:6.0%}" if "floor_share" in r else ""
        print(f"{r['phase']:20s} {r['seqlen']:7d} {r['ours_ms']:9.2f} {peer:>9s} {sp:>8s} {r['ours_tok_s']:11.1f} "
              f"{fl:>6s}")
    date = datetime.date.today().isoformat()
    tag = "-eager-elementwise" if args.elementwise == "eager" and not args.compile and device.type == "cuda" else ""
    if args.gemv and device.type == "cuda":
        tag += "-gemv" if args.gemv == "all" else "-gemv-" + args.gemv.replace(",", "-")
    tag += f"-{args.tag}" if args.tag else ""
    name = f"generation-{args.config}-{device.type}{tag}-{date}.json"
    ew = "inductor" if args.compile else args.elementwise or ("eager", "triton")[device.type == "cuda"]
    doc = {"device": dev_name, "date": date, "config": args.config, "dtype": str(dtype), "peer": peer_name,
           "compile": args.compile, "gemv": args.gemv,
           "elementwise": ew,
           "copy_bytes_per_s": bw, "rows": rows}
    write_json(doc, name, args.out)


if __name__ == "__main__":
    main()
