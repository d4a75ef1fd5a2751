"""tests/interpreter_speed.py: installed wherever the suite runs Triton's interpreter, and kernels whose device
functions come from several modules (ours, Triton's standard library: `tl.zeros`, `tl.cumsum`) compute what torch
does across launches (each launch patches the language once per module)."""

from __future__ import annotations

import os

import pytest
import torch
import triton
import triton.language as tl

pytestmark = pytest.mark.skipif(torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") != "1",
                                reason="Triton's interpreter only")


@triton.jit
def _shifted(x, c):
    return tl.where(x > 0, x + c, tl.zeros_like(x))


@triton.jit
def _kernel(x_ptr, out_ptr, c, N: tl.constexpr):
    i = tl.arange(0, N)
    acc = tl.zeros((N,), dtype=tl.float32)
    for _ in range(2):
        acc += _shifted(tl.load(x_ptr + i), c)
    tl.store(out_ptr + i, tl.cumsum(acc, 0))


def test_installed_and_kernels_compute_alike():
    from triton.runtime import interpreter

    assert getattr(interpreter.InterpretedFunction, "_cpm4_fast", False)
    for c in (0.5, -2.0):
        x = torch.randn(16)
        out = torch.empty(16)
        _kernel[(1,)](x, out, c, N=16)
        torch.testing.assert_close(out, torch.cumsum(2 * torch.where(x > 0, x + c, 0.0), 0))
