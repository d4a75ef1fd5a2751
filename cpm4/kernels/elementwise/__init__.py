"""The decoder layer's element-wise ops (norms, residual adds, RoPE, SiLU·up): `reference.py` (the model's eager
functions) beside one Triton kernel each (`kernels.py`). `triton_ops()` gives them as a `cpm4.model.fused.Ops`
for `MiniCPM4ForCausalLM.fuse_elementwise(backend="triton")`: each call runs the kernel where it applies (CUDA,
or Triton's interpreter; float16/bfloat16/float32; matching dtypes; nothing to differentiate) and the reference
otherwise, and inside a torch.compile'd region the reference (inductor fuses it there)."""

from __future__ import annotations

import functools
import os

import torch

from cpm4.model import fused

from . import reference

__all__ = ["triton_ops", "reference"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _applies(*tensors: torch.Tensor) -> bool:
    if torch.compiler.is_compiling():
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False  # the kernels have no backward: a model trained after an engine ran it keeps its gradients
    t0 = tensors[0]
    if t0.dtype not in _DTYPES or any(t.dtype != t0.dtype for t in tensors):
        return False
    return t0.is_cuda or (t0.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")


@functools.cache
def triton_ops() -> fused.Ops:
    from . import kernels as k

    def rms_norm(x, weight, eps):
        return k.rms_norm(x, weight, eps) if _applies(x, weight) else reference.rms_norm(x, weight, eps)

    def add_scaled(x, y, scale):
        return k.add_scaled(x, y, scale) if _applies(x, y) else reference.add_scaled(x, y, scale)

    def add_rms_norm(x, y, scale, weight, eps):
        if _applies(x, y, weight):
            return k.add_rms_norm(x, y, scale, weight, eps)
        return reference.add_rms_norm(x, y, scale, weight, eps)

    def silu_mul(gate, up):
        return k.silu_mul(gate, up) if _applies(gate, up) else reference.silu_mul(gate, up)

    def rotary(x, cos, sin):
        if _applies(x) and cos.dtype == sin.dtype == torch.float32:  # the tables stay float32 for 16-bit x
            return k.rotary(x, cos, sin)
        return reference.rotary(x, cos, sin)

    return fused.Ops(rms_norm, add_scaled, add_rms_norm, silu_mul, rotary)
