"""The training objective: next-token cross-entropy plus λ times the multi-token-prediction loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .data import IGNORE, Batch, stack_rows


def mtp_labels(labels: torch.Tensor, depth: int) -> torch.Tensor:
    """Targets of MTP module `depth` (0-based): row i predicts the label of row i+1+depth, valid only when
    every step in between is a valid in-document prediction (so nothing crosses a document boundary)."""
    t = labels.shape[1]
    out = torch.full_like(labels, IGNORE)
    valid = labels != IGNORE
    ok = valid[:, :t - 1 - depth].clone()
    for s in range(1, depth + 2):
        ok &= valid[:, s:t - 1 - depth + s]
    out[:, :t - 1 - depth] = torch.where(ok, labels[:, 1 + depth:], IGNORE)
    return out


def head_loss(model, h: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed CE of the output head on final-norm states h (one function so it can be compiled whole:
    the fp32 logits then never exist in memory apart from the loss kernel)."""
    logits = model.logits(h)
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE, reduction="sum")


def lm_loss(model, batch: Batch, mtp_lambda: float = 0.0, head=head_loss) -> dict[str, torch.Tensor]:
    """Summed losses of one micro-batch: {"ntp": sum, "mtp": sum (if any), "n": valid next-token count,
    "n_mtp": ...}. The trained objective is ntp/n + λ·mtp/n_mtp. `head` computes the summed CE (a
    compiled `head_loss` in training)."""
    h = model.trunk(batch.input_ids, docs=batch.docs)
    ntp, n = head(model, model.model.norm(h), batch.labels), int((batch.labels != IGNORE).sum())
    out = {"ntp": ntp, "n": torch.tensor(n)}
    if mtp_lambda and getattr(model, "mtp", None) is not None:
        total, count = torch.zeros((), device=ntp.device), 0
        for j, hj in enumerate(model.mtp_hidden_states(h, batch.input_ids, batch.docs)):
            lab = mtp_labels(batch.labels, j)
            total, count = total + head(model, hj, lab), count + int((lab != IGNORE).sum())
        out["mtp"], out["n_mtp"] = total / len(model.mtp), torch.tensor(count / len(model.mtp))
    return out


@torch.no_grad()
def held_out_loss(model, shards, max_rows: int | None = None, batch_size: int = 8,
                  device: torch.device | str = "cpu") -> float:
    """Mean next-token loss over rows 0 .. max_rows-1 of a token-shard dataset (all rows once when None):
    a fixed set, so two models are compared on exactly the same tokens. bf16 autocast on CUDA."""
    device = torch.device(device)
    n = shards.num_rows if max_rows is None else min(max_rows, shards.num_rows)
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    for start in range(0, n, batch_size):
        b = stack_rows([shards.row(k) for k in range(start, min(start + batch_size, n))], False).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            total += float(head_loss(model, model.hidden_states(b.input_ids), b.labels))
        count += int((b.labels != IGNORE).sum())
    model.train(was_training)
    return total / max(count, 1)
