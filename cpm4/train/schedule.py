"""Warmup-Stable-Decay learning-rate schedule (MiniCPM; spec/training.md).

The factor is a pure function of the step, so resuming needs nothing but the step. The decay is placed
at the end of `total_steps`: to decay a stable-phase checkpoint taken at step s for d steps, resume it
with total_steps = s + d and decay_steps = d (the stable phase before it is unchanged).
"""

from __future__ import annotations

import math

DECAY_SHAPES = ("linear", "cosine", "exp", "sqrt")


def wsd(step: int, total_steps: int, warmup_steps: int, decay_steps: int, shape: str = "exp",
        min_ratio: float = 0.1) -> float:
    """Factor in [min_ratio, 1] that multiplies the peak learning rate at `step` (0-based).

    Warmup: linear from 1/warmup to 1. Stable: 1. Decay over the last `decay_steps` steps from 1 to
    min_ratio; "exp" is MiniCPM's exponential decay f(x) = min_ratio ** x, x the decay progress in (0, 1].
    """
    if shape not in DECAY_SHAPES:
        raise ValueError(f"schedule.decay_shape: must be one of {DECAY_SHAPES}, got {shape!r}")
    if not 0 <= min_ratio <= 1:
        raise ValueError(f"schedule.min_ratio: must be in [0, 1], got {min_ratio}")
    if warmup_steps < 0 or decay_steps < 0 or warmup_steps + decay_steps > total_steps:
        raise ValueError(f"schedule: warmup ({warmup_steps}) + decay ({decay_steps}) steps must fit in "
                         f"total steps ({total_steps})")
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_start = total_steps - decay_steps
    if step < decay_start:
        return 1.0
    x = min(1.0, (step - decay_start + 1) / decay_steps)
    if shape == "linear":
        return 1.0 - (1.0 - min_ratio) * x
    if shape == "cosine":
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * x))
    if shape == "sqrt":
        return 1.0 - (1.0 - min_ratio) * math.sqrt(x)
    return min_ratio ** x if min_ratio > 0 else 1.0 - x
