"""Loss curves of the demo model's pre-training and SFT runs (metrics.jsonl from `cpm4 pretrain/sft`).

    python recipes/demo/plot.py --pretrain recipes/demo/logs/pretrain_metrics.jsonl \
        --sft recipes/demo/logs/sft_metrics.jsonl --out models/cpm4-demo/loss.png
"""

from __future__ import annotations

import argparse
import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def read(path: str) -> tuple[list[tuple[int, float]], list[tuple[int, float]], list[tuple[int, float]]]:
    train, mtp, valid = [], [], []
    with open(path) as f:
        for line in f:
            r = json.loads(line)
            if "loss" in r:
                train.append((r["step"], r["loss"]))
                if "mtp_loss" in r:
                    mtp.append((r["step"], r["mtp_loss"]))
            if "valid_loss" in r:
                valid.append((r["step"], r["valid_loss"]))
    return train, mtp, valid


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pretrain", required=True)
    ap.add_argument("--sft", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, path, title in ((axes[0], args.pretrain, "pre-training (2048-token rows, 64K tokens/step)"),
                            (axes[1], args.sft, "SFT (assistant tokens only)")):
        train, mtp, valid = read(path)
        ax.plot(*zip(*train), label="train loss (next token)")
        if mtp:
            ax.plot(*zip(*mtp), label="train loss (MTP, token +2)", alpha=0.7)
        if valid:
            ax.plot(*zip(*valid), "o-", label="held-out loss")
        ax.set_xlabel("step")
        ax.set_ylabel("cross-entropy (nats/token)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    tmp = args.out + ".tmp.png"
    fig.savefig(tmp, dpi=90)
    os.replace(tmp, args.out)


if __name__ == "__main__":
    main()
