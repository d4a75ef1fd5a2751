"""The training objective: next-token cross-entropy plus λ times the multi-token-prediction loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .data import IGNORE, Batch


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
