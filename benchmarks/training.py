"""Training throughput of the real trainer (`cpm4.train.Trainer.train_step`: forward, backward, µP AdamW):
tokens/s and MFU of a MiniCPM4-0.5B-shaped model, dense SDPA at 4K, and InfLLM v2 against dense SDPA at 32K.

    python benchmarks/training.py --seqlens 4096 32768 --steps 5

Rows: `train-dense` (no peer: MFU is the figure) and `train-sparse` (ours = InfLLM v2, peer = the same model
with dense SDPA attention at the same sequence length). Synthetic uniform tokens; bf16 autocast, fp32
master weights. Prints a table and writes benchmarks/results/training-<date>.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from cpm4.train.config import TrainConfig  # noqa: E402
from cpm4.train.data import SyntheticDataset  # noqa: E402
from cpm4.train.trainer import Trainer, model_flops_per_token  # noqa: E402

SPARSE = {"kernel_size": 32, "kernel_stride": 16, "init_blocks": 1, "block_size": 64, "window_size": 2048,
          "topk": 64, "use_nope": False, "dense_len": 8192, "variant": "gen-b"}


def measure(seq: int, batch: int, sparse: bool, steps: int, compile_: bool, ckpt: bool, run_dir: str) -> dict:
    cfg = TrainConfig()
    cfg.model.preset = "minicpm4-0.5b"
    cfg.model.overrides = {"sparse_config": SPARSE} if sparse else {}
    cfg.data.path, cfg.data.seq_len = "synthetic", seq
    t = cfg.train
    t.steps, t.batch_size, t.precision, t.deterministic = 10_000, batch, "bf16", False
    t.compile, t.activation_checkpointing = compile_, ckpt
    cfg.schedule.warmup_steps = 10
    cfg.checkpoint.dir = run_dir
    cfg.log.tensorboard = cfg.log.progress = False
    trainer = Trainer(cfg, SyntheticDataset(73448, seq))
    for _ in range(2):
        trainer.train_step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        rec = trainer.train_step()
    torch.cuda.synchronize()
    ms = (time.perf_counter() - t0) * 1000 / steps
    tok_s = batch * seq / (ms / 1000)
    mfu = tok_s * model_flops_per_token(trainer.config, seq) / (trainer.peak_flops() or float("nan"))
    mem = torch.cuda.max_memory_allocated() / 2**30
    del trainer
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return {"ms": ms, "tokens_per_s": tok_s, "mfu": mfu, "loss": rec["loss"], "mem_gib": mem}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seqlens", type=int, nargs="+", default=[4096, 32768])
    ap.add_argument("--tokens-per-step", type=int, default=32768, help="batch = this / seqlen (at least 1)")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--compile", action="store_true", help="torch.compile each decoder layer")
    ap.add_argument("--activation-checkpointing", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("training benchmark needs a CUDA GPU")
    device = torch.cuda.get_device_name()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seq in args.seqlens:
            batch = max(1, args.tokens_per_step // seq)
            dense = measure(seq, batch, False, args.steps, args.compile, args.activation_checkpointing, tmp)
            row = {"phase": "train-dense", "seqlen": seq, "batch": batch, "ours_ms": dense["ms"], "peer_ms": None,
                   "speedup": None, "tokens_per_s": dense["tokens_per_s"], "mfu": dense["mfu"],
                   "mem_gib": dense["mem_gib"], "compile": args.compile}
            rows.append(row)
            print(f"dense  seq {seq:6d} x{batch}: {dense['ms']:8.1f} ms/step {dense['tokens_per_s']:9.0f} tok/s "
                  f"MFU {dense['mfu']:.1%} mem {dense['mem_gib']:.1f} GiB", flush=True)
            if seq >= SPARSE["dense_len"]:
                sp = measure(seq, batch, True, args.steps, args.compile, args.activation_checkpointing, tmp)
                rows.append({"phase": "train-sparse", "seqlen": seq, "batch": batch, "ours_ms": sp["ms"],
                             "peer_ms": dense["ms"], "speedup": dense["ms"] / sp["ms"],
                             "tokens_per_s": sp["tokens_per_s"], "peer_tokens_per_s": dense["tokens_per_s"],
                             "mfu_dense_equivalent": sp["mfu"], "mem_gib": sp["mem_gib"], "compile": args.compile})
                print(f"sparse seq {seq:6d} x{batch}: {sp['ms']:8.1f} ms/step {sp['tokens_per_s']:9.0f} tok/s "
                      f"({dense['ms'] / sp['ms']:.2f}x dense) mem {sp['mem_gib']:.1f} GiB", flush=True)
    print(f"\n{'phase':14s} {'seqlen':>7s} {'ours ms':>9s} {'peer ms':>9s} {'speedup':>8s} {'tok/s':>9s} {'MFU':>6s}")
    for r in rows:
        peer = f"{r['peer_ms']:9.1f}" if r["peer_ms"] else f"{'-':>9s}"
        sp = f"{r['speedup']:8.2f}" if r["speedup"] else f"{'-':>8s}"
        mfu = r.get("mfu", r.get("mfu_dense_equivalent"))
        print(f"{r['phase']:14s} {r['seqlen']:7d} {r['ours_ms']:9.1f} {peer} {sp} {r['tokens_per_s']:9.0f} {mfu:6.1%}")
    date = datetime.date.today().isoformat()
    out = args.out or os.path.join(os.path.dirname(__file__), "results", f"training-{date}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out + ".tmp", "w") as f:
        json.dump({"device": device, "date": date, "model": "minicpm4-0.5b shape", "rows": rows}, f, indent=2)
    os.replace(out + ".tmp", out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
