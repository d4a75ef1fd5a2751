"""The element-wise parts of a decoder layer as plain PyTorch: the definitions the Triton kernels are tested against.
They are the model's own eager functions (`cpm4.model.fused`), so kernel and model cannot drift apart."""

from cpm4.model.fused import add_rms_norm, add_scaled, rms_norm, rotary, silu_mul

__all__ = ["add_rms_norm", "add_scaled", "rms_norm", "rotary", "silu_mul"]
