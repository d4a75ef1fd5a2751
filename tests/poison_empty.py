"""`CPM4_POISON_EMPTY=1 pytest ...`: every `torch.empty` / `empty_like` / `empty_strided` / `Tensor.new_empty` that
Python code calls returns memory filled with a poison value instead of what the allocator held (floats NaN, integers
1, booleans True). A kernel or function that reads memory nobody wrote then gives NaNs or wrong answers in the tests'
comparisons, where fresh allocations (often zeros on the CPU and on a fresh GPU) would hide it. Integers are 1
rather than a huge number so that a stray index stays inside its tensor (a plausible wrong block, not a crash of
the interpreter). Allocations made inside PyTorch's own C++ are untouched, and so are those over LARGE bytes
(filling them would commit memory that an untouched `torch.empty` never does; the hazards looked for are in the
small buffers around the kernels).

Whole suite with the poison (forty-third session, CPU): every test passes. It would not have shown the bug the GPU
training tests found that session (the dq union kernel reading a declined plan's never-written counts): there the
token kernel overwrote whatever the union kernel wrote, and only a fault on garbage showed it — a test of that
kernel alone does (`test_declined_plans_union_kernels_write_nothing`)."""

from __future__ import annotations

import functools

import torch

_POISON = {True: float("nan"), False: 1}
LARGE = 16 << 20


def _poison(t: torch.Tensor) -> torch.Tensor:
    if t.numel() and not t.is_meta and t.numel() * t.element_size() <= LARGE:
        if t.dtype == torch.bool:
            t.fill_(True)
        else:
            t.fill_(_POISON[t.dtype.is_floating_point or t.dtype.is_complex])
    return t


def _wrap(fn):
    @functools.wraps(fn)
    def poisoned(*args, **kwargs):
        out = fn(*args, **kwargs)
        if isinstance(out, torch.Tensor) and not torch.compiler.is_compiling():  # (traced: no storage to fill)
            with torch.no_grad():
                _poison(out)
        return out
    return poisoned


def install() -> None:
    """Poison the Python-level empty allocators (once)."""
    if getattr(torch.empty, "_cpm4_poison", False):
        return
    # `with torch.device(...)` recognises the constructors by identity, in a set it builds once from torch's
    # attributes: built before they are replaced, it names the originals, which the wrappers call.
    try:
        from torch.utils._device import _device_constructors
    except ImportError:  # (a torch without it matches some other way)
        pass
    else:
        _device_constructors()
    for name in ("empty", "empty_like", "empty_strided"):
        wrapped = _wrap(getattr(torch, name))
        wrapped._cpm4_poison = True
        setattr(torch, name, wrapped)
    torch.Tensor.new_empty = _wrap(torch.Tensor.new_empty)
