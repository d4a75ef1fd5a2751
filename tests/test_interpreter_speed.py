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


@triton.jit
def _int_kernel(a_ptr, b_ptr, out_ptr, N: tl.constexpr):
    i = tl.arange(0, N)
    a, b = tl.load(a_ptr + i), tl.load(b_ptr + i)
    tl.store(out_ptr + i, a * b + a - b)


def test_no_overflow_checks_where_they_would_be_dropped():
    """Without debug the interpreter drops device asserts, so the 32-bit overflow checks are not built (they were
    computed in 64 bits and thrown away): integer arithmetic still wraps as the GPU's (and torch's) does."""
    from triton.runtime import interpreter

    options = interpreter.interpreter_builder.options
    assert not options.debug and not options.sanitize_overflow
    a = torch.tensor([3, 2**30, -(2**31), 46341, 7, -5, 2**31 - 1, 0], dtype=torch.int32)
    b = torch.tensor([4, 4, -1, 46341, -9, 2**31 - 1, 2, -7], dtype=torch.int32)
    out = torch.empty_like(a)
    _int_kernel[(1,)](a, b, out, N=8)
    assert torch.equal(out, a * b + a - b)
