"""Binary classification metrics with numpy only (no scikit-learn: two formulas do not earn a 30 MB dependency)."""

from __future__ import annotations

import numpy as np


def _as_arrays(labels, scores) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(labels)
    s = np.asarray(scores, dtype=np.float64)
    if y.shape != s.shape or y.ndim != 1:
        raise ValueError(f"labels and scores must be 1-D and of equal length, got {y.shape} and {s.shape}")
    if not np.isin(y, (0, 1)).all():
        raise ValueError("labels must be 0 or 1")
    return y.astype(bool), s


def roc_auc(labels, scores) -> float:
    """Area under the ROC curve: the probability that a random positive outranks a random negative (ties count
    one half), computed as the Mann-Whitney U statistic from average ranks in O(n log n)."""
    y, s = _as_arrays(labels, scores)
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError("AUC needs at least one positive and one negative")
    order = np.argsort(s, kind="mergesort")
    sorted_s = s[order]
    # Average 1-based rank for each run of equal scores.
    starts = np.flatnonzero(np.r_[True, sorted_s[1:] != sorted_s[:-1]])
    ends = np.r_[starts[1:], s.size]
    avg = (starts + ends + 1) / 2.0
    ranks = np.empty(s.size)
    ranks[order] = np.repeat(avg, ends - starts)
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def binary_metrics(labels, scores, threshold: float = 0.5) -> dict:
    """Precision, recall, F1, accuracy at `threshold` (score >= threshold is positive), AUC and counts."""
    y, s = _as_arrays(labels, scores)
    pred = s >= threshold
    tp = int((pred & y).sum())
    fp = int((pred & ~y).sum())
    fn = int((~pred & y).sum())
    tn = int((~pred & ~y).sum())
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    both = y.any() and not y.all()
    return {
        "threshold": threshold,
        "n": int(y.size),
        "n_positive": int(y.sum()),
        "n_negative": int((~y).sum()),
        "tp": tp, "fp": fp, "tn": tn, "fn": fn,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "accuracy": (tp + tn) / y.size if y.size else 0.0,
        "auc": roc_auc(y, s) if both else None,
    }
