"""Programmatic dependent launch (PDL, Hopper and later): a kernel launched as a programmatic dependent may start
while the kernel before it on the stream is still running, once every program of that one has signalled
(`gdc_launch_dependents`); it must wait (`gdc_wait`) before it reads what the earlier kernel wrote or writes what
it might still read. Each of our PDL kernels signals first and then waits in every program before anything else
that depends on the step, so a kernel's completion still implies its predecessors' (a GEMV pulling its weights
toward L2 between the two was measured a loss at the 8B and dropped). Non-PDL kernels (inductor's, cuBLAS) in the
chain are full barriers as usual. Captured CUDA graphs keep the dependencies as programmatic edges."""

from __future__ import annotations

import os
import threading
from contextlib import contextmanager

import torch
import triton
import triton.language as tl

# Whether launches whose kernel's flag says None (auto) are PDL: inside `ours()`, which the engine enters for the
# decode steps whose kernels are (nearly) all ours. Measured on the H200 (RESULTS.md, thirty-fifth GPU pass): the
# 0.5B's batch-1 decode with its layers fused 0.83 -> 0.77 ms at 1K, 0.89 -> 0.84 at 4K; the 8B's at 32K, whose
# gate/up and SiLU·up stay cuBLAS's and inductor's, 5.52-5.55 -> 5.59-5.62 ms (a little slower, and 6.6 ms with the
# GEMV's weight prefetch): so PDL only where the step's chain is ours. Per thread: an engine's capture does not
# reach kernels another thread launches meanwhile.
_SCOPE = threading.local()


def inside() -> bool:
    """Whether this thread is inside `ours()` (its innermost scope's on)."""
    return getattr(_SCOPE, "on", False)


@contextmanager
def ours(on: bool = True):
    """Inside (with on), kernels whose PDL flag is None launch as programmatic dependents (where `enabled`)."""
    before, _SCOPE.on = inside(), bool(on)
    try:
        yield
    finally:
        _SCOPE.on = before


def enabled(device: torch.device, flag: bool | None) -> bool:
    """flag (None: whether inside `ours()`), on a CUDA device of compute capability 9 or later (not under Triton's
    CPU interpreter)."""
    flag = inside() if flag is None else flag
    return (bool(flag) and device.type == "cuda" and os.environ.get("TRITON_INTERPRET") != "1"
            and torch.cuda.get_device_capability(device)[0] >= 9)


def launch(pdl: bool) -> dict:
    """The launch option for a PDL launch; nothing otherwise (the option is unknown to Triton's CPU interpreter
    and to old Triton versions)."""
    return {"launch_pdl": True} if pdl else {}


@triton.jit
def enter(PDL: tl.constexpr):
    """A PDL kernel's prologue: let the next kernel launch, then wait for the previous one."""
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
