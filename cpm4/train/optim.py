"""µP optimiser groups as MiniCPM uses them (spec/training.md).

With width multiplier m = hidden_size / dim_model_base, Adam learning rates are:
- matrix weights inside the blocks (attention, MLP, MTP projections): lr / m — their fan-in grows with
  width, so a per-coordinate Adam step of lr / m keeps each layer's output change O(1);
- the embedding, the norms and the output head: lr — the embedding's fan-in is one token, norms are
  vectors, and the head's output is already divided by m in the forward (model.md).
Weight decay (decoupled, AdamW) applies to matrices only.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from cpm4.model.config import MiniCPM4Config


def lr_scale(name: str, param: torch.Tensor, config: MiniCPM4Config) -> float:
    """Multiplier of the base learning rate for a parameter, by its checkpoint name."""
    if param.dim() < 2 or name in ("model.embed_tokens.weight", "lm_head.weight"):
        return 1.0
    return config.dim_model_base / config.hidden_size


def param_groups(model: nn.Module, config: MiniCPM4Config, lr: float, weight_decay: float,
                 mup: bool = True) -> list[dict[str, Any]]:
    """Groups for torch.optim.AdamW, each with its own `lr` and `lr_scale` (the scheduler multiplies
    `base_lr * lr_scale` by the schedule factor). With mup=False every tensor gets the base rate
    (standard parametrisation, for comparison)."""
    groups: dict[tuple[float, float], list[torch.Tensor]] = {}
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:  # tied weights appear once
            continue
        seen.add(id(p))
        scale = lr_scale(name.removeprefix("_orig_mod."), p, config) if mup else 1.0
        wd = weight_decay if p.dim() >= 2 and "embed_tokens" not in name else 0.0
        groups.setdefault((scale, wd), []).append(p)
    return [{"params": ps, "lr": lr * s, "lr_scale": s, "weight_decay": wd}
            for (s, wd), ps in sorted(groups.items(), reverse=True)]


def set_lr(optimizer: torch.optim.Optimizer, base_lr: float, factor: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = base_lr * g["lr_scale"] * factor
