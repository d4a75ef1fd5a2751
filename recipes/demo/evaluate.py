"""Held-out perplexity of a checkpoint on token shards: every row of the validation stream exactly once.

    python recipes/demo/evaluate.py --model models/cpm4-demo --shards build/demo/shards/valid --seq-len 2048
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

from cpm4.model.checkpoint import load_checkpoint  # noqa: E402
from cpm4.train.data import PackedDataset  # noqa: E402
from cpm4.train.loss import held_out_loss  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--shards", required=True)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    model = load_checkpoint(args.model, device=args.device, dtype=torch.float32)
    ds = PackedDataset(args.shards, args.seq_len, document_masking=False, vocab_size=model.config.vocab_size)
    loss = held_out_loss(model, ds, None, args.batch_size, args.device)
    print(json.dumps({"model": args.model, "rows": ds.num_rows, "loss": loss, "perplexity": math.exp(loss),
                      "seq_len": args.seq_len}))


if __name__ == "__main__":
    main()
