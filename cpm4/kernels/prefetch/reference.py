"""What the prefetch kernel's checked mode is tested against: every 16-bit word of the range read exactly once."""

from __future__ import annotations

import torch


def word_sum(t: torch.Tensor, n_words: int | None = None) -> int:
    """The sum of t's first n_words 16-bit words (all of them by default), as signed int16, modulo 2**32: what the
    kernel's per-program int32 sums add up to when each word is read once."""
    words = t.reshape(-1).view(torch.int16)[:n_words].to(torch.int64)
    return int(words.sum()) % 2**32
