"""cpm4 against Hugging Face transformers on the same weights: prefill and decode speed at batch 1.

    python benchmarks/generation.py --config minicpm4-0.5b --device cpu --dtype float32 --contexts 256 1024
    python benchmarks/generation.py --config minicpm4-8b --device cuda --dtype bfloat16 --contexts 4096 32768

A random checkpoint of the preset is written (µP init), exported with `cpm4 convert --to llama`, and both
models run the same prompt: one prefill forward, then greedy single-token steps with a KV cache. The peer is
transformers' LlamaForCausalLM (transformers has no MiniCPM4 code), dense attention, same dtype and device.
Prints a table and writes benchmarks/results/generation-<date>.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from cpm4.engine.kv_cache import KVCache  # noqa: E402
from cpm4.model.checkpoint import load_checkpoint, parse_dtype  # noqa: E402
from cpm4.model.config import preset  # noqa: E402
from cpm4.model.convert import convert_to_llama  # noqa: E402
from cpm4.model.init import create_checkpoint  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device):
    sync(device)
    t = time.perf_counter()
    out = fn()
    sync(device)
    return out, (time.perf_counter() - t) * 1000


@torch.inference_mode()
def run_ours(model, ids: list[int], n_decode: int, device) -> tuple[float, float, list[int]]:
    cache = KVCache(model.config, 1, len(ids) + n_decode, device, model.dtype)
    x = torch.tensor([ids], device=device)
    logits, t_prefill = timed(lambda: model(x, cache, last_only=True), device)
    toks = [int(logits[0].argmax())]
    sync(device)
    t0 = time.perf_counter()
    for _ in range(n_decode - 1):
        logits = model(torch.tensor([[toks[-1]]], device=device), cache, last_only=True)
        toks.append(int(logits[0].argmax()))
    sync(device)
    return t_prefill, (time.perf_counter() - t0) * 1000 / max(n_decode - 1, 1), toks


@torch.inference_mode()
def run_hf(model, ids: list[int], n_decode: int, device) -> tuple[float, float, list[int]]:
    x = torch.tensor([ids], device=device)
    out, t_prefill = timed(lambda: model(x, use_cache=True), device)
    past = out.past_key_values
    toks = [int(out.logits[0, -1].argmax())]
    sync(device)
    t0 = time.perf_counter()
    for _ in range(n_decode - 1):
        out = model(torch.tensor([[toks[-1]]], device=device), past_key_values=past, use_cache=True)
        past = out.past_key_values
        toks.append(int(out.logits[0, -1].argmax()))
    sync(device)
    return t_prefill, (time.perf_counter() - t0) * 1000 / max(n_decode - 1, 1), toks


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="minicpm4-0.5b")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--contexts", type=int, nargs="+", default=[256, 1024])
    ap.add_argument("--decode-tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    import transformers

    device = torch.device(args.device)
    dtype = parse_dtype(args.dtype)
    cfg = preset(args.config)
    cfg.sparse_config = None  # the Llama peer is dense: compare dense with dense
    cfg.max_position_embeddings = max(cfg.max_position_embeddings, max(args.contexts) + args.decode_tokens + 1)
    with tempfile.TemporaryDirectory() as tmp:
        create_checkpoint(cfg, os.path.join(tmp, "cpm4"), seed=0, dtype=dtype)
        convert_to_llama(os.path.join(tmp, "cpm4"), os.path.join(tmp, "llama"))
        ours = load_checkpoint(os.path.join(tmp, "cpm4"), device=device, dtype=dtype)
        hf = transformers.LlamaForCausalLM.from_pretrained(os.path.join(tmp, "llama"), dtype=dtype,
                                                           local_files_only=True).to(device).eval()
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.processor() or 'CPU'}, " \
        f"{torch.get_num_threads()} threads"
    rows = []
    g = torch.Generator().manual_seed(0)
    for n in args.contexts:
        ids = torch.randint(3, min(cfg.vocab_size, 4000), (n,), generator=g).tolist()
        best = {}
        for name, fn, model in (("ours", run_ours, ours), ("peer", run_hf, hf)):
            fn(model, ids[:32], 3, device)  # warm-up
            runs = [fn(model, ids, args.decode_tokens, device) for _ in range(args.repeats)]
            best[name] = (min(r[0] for r in runs), min(r[1] for r in runs), runs[0][2])
        same = sum(a == b for a, b in zip(best["ours"][2], best["peer"][2]))
        for phase, i in (("prefill", 0), ("decode", 1)):
            o, p = best["ours"][i], best["peer"][i]
            tok_s = (n if phase == "prefill" else 1) * 1000 / o
            rows.append({"phase": phase, "seqlen": n, "ours_ms": round(o, 3), "peer_ms": round(p, 3),
                         "speedup": round(p / o, 3), "ours_tok_s": round(tok_s, 1),
                         "greedy_tokens_agreeing": f"{same}/{args.decode_tokens}"})
            print(json.dumps(rows[-1]), flush=True)
    print(f"\n{args.config}, {args.dtype}, {dev_name}; peer: transformers {transformers.__version__} "
          "LlamaForCausalLM on the converted weights")
    print(f"{'phase':8s} {'seqlen':>7s} {'ours ms':>9s} {'peer ms':>9s} {'speedup':>8s} {'ours tok/s':>11s}")
    for r in rows:
        print(f"{r['phase']:8s} {r['seqlen']:7d} {r['ours_ms']:9.2f} {r['peer_ms']:9.2f} {r['speedup']:7.2f}x "
              f"{r['ours_tok_s']:11.1f}")
    os.makedirs(args.out, exist_ok=True)
    date = datetime.date.today().isoformat()
    path = os.path.join(args.out, f"generation-{args.config}-{args.device}-{date}.json")
    with open(path + ".tmp", "w") as f:
        json.dump({"device": dev_name, "date": date, "config": args.config, "dtype": args.dtype,
                   "peer": f"transformers {transformers.__version__} LlamaForCausalLM", "rows": rows}, f, indent=1)
    os.replace(path + ".tmp", path)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
