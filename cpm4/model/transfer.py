"""Host-built tensors (indices, lengths, token ids) onto the GPU without stalling the host."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def to_device(x: torch.Tensor | Sequence, device: torch.device | str, dtype: torch.dtype | None = None
              ) -> torch.Tensor:
    """`x` (a host tensor, or values for `torch.tensor`) on `device`. To a GPU through pinned memory: a copy from
    pageable memory may wait for the stream's queued work (the driver stages it; profiled, ~1 ms a copy inside a
    prefill step), so each one made mid-forward stalled the host while the GPU ran dry."""
    t = x if isinstance(x, torch.Tensor) else torch.tensor(x, dtype=dtype)
    if dtype is not None and t.dtype != dtype:
        t = t.to(dtype)
    device = torch.device(device)
    if device.type != "cuda" or t.device.type != "cpu":
        return t.to(device)
    # The caching host allocator keeps the pinned block until the copy is done (an event is recorded on it).
    return t.pin_memory().to(device, non_blocking=True)
