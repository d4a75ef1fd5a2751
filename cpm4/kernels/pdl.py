"""Programmatic dependent launch (PDL, Hopper and later): a kernel launched as a programmatic dependent may start
while the kernel before it on the stream is still running, once every program of that one has signalled
(`gdc_launch_dependents`); it must wait (`gdc_wait`) before it reads what the earlier kernel wrote or writes what
it might still read. Each of our PDL kernels signals first and then waits in every program before anything else
that depends on the step, so a kernel's completion still implies its predecessors'; work that depends on nothing
earlier (a GEMV pulling its weights toward L2) goes between the two. Non-PDL kernels (inductor's, cuBLAS) in the
chain are full barriers as usual. Captured CUDA graphs keep the dependencies as programmatic edges."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


def enabled(device: torch.device, flag: bool) -> bool:
    """flag, on a CUDA device of compute capability 9 or later (not under Triton's CPU interpreter)."""
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
