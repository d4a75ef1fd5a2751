"""Weights pulled into the L2 cache while a decode step's attention runs (`triton_prefetch.py`, beside
`reference.py`): the attention of one token per row is a chain of small latency-bound kernels with HBM mostly
idle, and the o projection (and for a small model the MLP) right after it streams weights that fit in L2 (the
8B's o is 33.5 MB; the H200 has 60 MB). `fork(plan)` launches their prefetch on a side stream and `join()` makes
the step's stream wait for it before the o projection; under CUDA-graph capture the pair becomes a parallel
branch of the graph. `plan_for` picks the weights a layer reads after its attention, in order, up to a byte budget.
Off by default (`MODE` None) until measured: `cpm4.engine.paged` forks around each decode attention when
the cache names a plan (`PagedKVCache.l2_prefetch`), which `LLMEngine.set_l2_prefetch` sets (default MODE)."""

from __future__ import annotations

import torch

from .reference import word_sum

__all__ = ["MODE", "fork", "join", "plan_for", "word_sum"]

# "load", "line", "bulk" (triton_prefetch.MODES), or None: no prefetch.
MODE: str | None = None
# Programs a prefetch launch: the issuing modes need few (the attention's kernels run beside them); the reading
# mode needs enough loads in flight to stream at HBM speed (two a multiprocessor on an H200).
PROGRAMS = {"load": 264, "line": 32, "bulk": 32}
BUDGET_FRACTION = 0.6  # of the device's L2, for one layer's prefetched weights

_SIDE: dict[torch.device, tuple[torch.cuda.Stream, torch.Tensor]] = {}


def _side(device: torch.device) -> tuple[torch.cuda.Stream, torch.Tensor]:
    s = _SIDE.get(device)
    if s is None:  # made once, outside any graph capture (`prepare`)
        s = _SIDE[device] = (torch.cuda.Stream(device=device), torch.zeros(max(PROGRAMS.values()),
                                                                            dtype=torch.int32, device=device))
    return s


def prepare(device: torch.device) -> None:
    """Create the side stream and sink for device now (before the decode graphs are captured)."""
    if device.type == "cuda":
        _side(device)


def plan_for(weights: list[torch.Tensor], budget: int) -> list[tuple[torch.Tensor, int]]:
    """(tensor, bytes) to prefetch: the weights in the order read, whole while they fit in budget bytes, then the
    first part of the next one (a prefix of its rows is as good as any part: each is read once); only contiguous
    16-bit-word tensors."""
    out, left = [], budget
    for w in weights:
        if left < 4096 or not isinstance(w, torch.Tensor) or not w.is_contiguous():
            break
        size = w.numel() * w.element_size()
        take = min(size, left) // 16 * 16
        if take:
            out.append((w, take))
        left -= take
        if take < size:
            break
    return out


def fork(plan: list[tuple[torch.Tensor, int]], mode: str | None) -> bool:
    """Launch the prefetch of plan's bytes in mode on the device's side stream, after the current stream's work
    so far; False (nothing launched) off CUDA or with no mode."""
    if not plan or mode is None or plan[0][0].device.type != "cuda":
        return False
    from .triton_prefetch import prefetch

    dev = plan[0][0].device
    side, sink = _side(dev)
    side.wait_stream(torch.cuda.current_stream(dev))
    with torch.cuda.stream(side):
        for w, n in plan:
            prefetch(w, mode=mode, programs=PROGRAMS[mode], n_bytes=n, sink=sink)
    return True


def join(device: torch.device) -> None:
    """The current stream waits for the side stream's prefetches (a graph capture must join what it forked)."""
    torch.cuda.current_stream(device).wait_stream(_side(device)[0])


def budget_bytes(device: torch.device) -> int:
    """BUDGET_FRACTION of the device's L2 size."""
    return int(torch.cuda.get_device_properties(device).L2_cache_size * BUDGET_FRACTION)
