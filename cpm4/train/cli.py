"""`cpm4 pretrain` and `cpm4 sft`: run a training config (TOML) with `--set section.key=value` overrides.

Same command alone or under `torchrun --nproc-per-node N -m cpm4.cli pretrain ...` (FSDP2)."""

from __future__ import annotations

import argparse
import json
import sys


def _run(args: argparse.Namespace, kind: str) -> int:
    from .config import load_train_config

    cfg = load_train_config(args.config, args.set, kind=kind)
    if args.print_config:
        print(json.dumps(cfg.to_dict(), indent=2))
        return 0
    from .trainer import Trainer  # (torch: imported after the config's errors, which need none of it)

    trainer = Trainer(cfg)
    try:
        history = trainer.fit()
    finally:
        trainer.close()
    if trainer.rank == 0:
        last = next((r for r in reversed(history) if "loss" in r), {})
        valid = next((r for r in reversed(history) if "valid_loss" in r), {})
        msg = f"[cpm4] {kind} done: step {trainer.step}"
        if last:
            msg += f", loss {last['loss']:.4f}"
        if valid:
            msg += f", valid loss {valid['valid_loss']:.4f}"
        print(msg + f"; model -> {cfg.checkpoint.dir}/model", file=sys.stderr)
    return 0


def add_train_commands(subparsers) -> None:
    for kind, help_ in (("pretrain", "pre-train a MiniCPM4 model (µP, WSD, MTP, InfLLM v2) on token shards"),
                        ("sft", "supervised fine-tuning on chat JSONL (loss on assistant turns)")):
        q = subparsers.add_parser(kind, help=help_, description=__doc__)
        q.add_argument("--config", "-c", default=None, help="run file (TOML)")
        q.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                       help="override a run-file value (repeatable), e.g. --set train.steps=100")
        q.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
        q.set_defaults(func=lambda a, k=kind: _run(a, k))
