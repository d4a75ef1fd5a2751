"""The device names cpm4 runs on, checked without torch, so a typo on the command line or in a run file is said
at once (importing torch takes seconds) and other torch device types get a clear refusal, not a traceback from
deep inside a load (mps, xpu, meta: torch knows them, cpm4's kernels and loaders do not)."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
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


class InsufficientMemoryError(ValueError):
    """What is about to be allocated or written cannot fit where it goes; said before starting, with both sizes
    (torch's own error comes from deep inside, after allocating whatever fitted, or not at all: a CPU
    allocation larger than the memory can succeed and be killed later)."""


def gib(nbytes: float) -> str:
    return f"{nbytes / 2**30:.1f} GiB"


def free_bytes(device: str | torch.device) -> int | None:
    """Bytes that can still be allocated on `device`: the GPU's free memory, or the host's available memory
    and free swap (Linux's MemAvailable + SwapFree); None where that cannot be read."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return None
        return torch.cuda.mem_get_info(device.index if device.index is not None else torch.cuda.current_device())[0]
    if device.type != "cpu":
        return None
    try:
        fields = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines() if ":" in line)
        return sum(int(fields[k].split()[0]) * 1024 for k in ("MemAvailable", "SwapFree"))
    except (OSError, KeyError, ValueError):
        return None


def check_fits(nbytes: int, device: str | torch.device, what: str) -> None:
    """InsufficientMemoryError when `what`, of nbytes, cannot fit in what `device` has free (`free_bytes`)."""
    free = free_bytes(device)
    if free is not None and nbytes > free:
        raise InsufficientMemoryError(f"{what} needs {gib(nbytes)} but {device} has {gib(free)} free")


def check_disk(nbytes: int, path: str | os.PathLike, what: str) -> None:
    """InsufficientMemoryError when `what`, of nbytes, cannot fit on the file system that holds `path` (the
    nearest folder of it that exists)."""
    folder = Path(path).absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    free = shutil.disk_usage(folder).free
    if nbytes > free:
        raise InsufficientMemoryError(f"{what} needs {gib(nbytes)} but the disk holding {folder} has {gib(free)} "
                                      "free")
