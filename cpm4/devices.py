"""The device names cpm4 runs on, checked without torch, so a typo on the command line or in a run file is said
at once (importing torch takes seconds) and other torch device types get a clear refusal, not a traceback from
deep inside a load (mps, xpu, meta: torch knows them, cpm4's kernels and loaders do not)."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

DEVICE_TYPES = ("cpu", "cuda")
_NAME = re.compile(r"(cpu|cuda)(:\d+)?")


def check_device_name(name: Any) -> str:
    """`name` if it is "auto", "cpu", "cuda" or "cuda:N" (torch's spelling); ValueError naming it otherwise."""
    if isinstance(name, str) and (name == "auto" or _NAME.fullmatch(name)):
        return name
    raise ValueError(f"unknown device {name!r}: expected auto, cpu, cuda or cuda:N")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """"auto" (or None): CUDA when there is a GPU, else the CPU; otherwise a CPU or CUDA device that exists here
    (ValueError naming the problem)."""
    import torch

    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(check_device_name(device) if not isinstance(device, torch.device) else device)
    if device.type not in DEVICE_TYPES:
        raise ValueError(f"unsupported device {str(device)!r}: expected auto, cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device} requested but CUDA is not available on this machine")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ValueError(f"device {device} requested but this machine has {count} CUDA device"
                             f"{'s' if count != 1 else ''} (cuda:0 to cuda:{count - 1})")
    return device
