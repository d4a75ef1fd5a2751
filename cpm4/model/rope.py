"""Rotary position embedding with the scalings MiniCPM4 configs use: none, linear, LongRoPE and YaRN.

cos/sin are computed from the positions on the fly in float32 (cheap next to the matmuls, and the same
numbers whether a token is processed in a prefill or a decode step).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import MiniCPM4Config
from .fused import rotary as apply_rotary  # noqa: F401  (the rotation lives with the other fused ops)


def _yarn_inv_freq(inv_freq: torch.Tensor, dim: int, base: float, rs: dict, default_orig: int
                   ) -> tuple[torch.Tensor, float]:
    """YaRN: interpolate low frequencies by `factor`, keep high ones, ramp linearly between the
    wavelengths set by beta_fast/beta_slow; cos/sin are scaled by the attention factor."""
    factor = float(rs["factor"])
    orig = int(rs.get("original_max_position_embeddings") or default_orig)
    beta_fast = float(rs.get("beta_fast") or 32.0)
    beta_slow = float(rs.get("beta_slow") or 1.0)

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attn = rs.get("attention_factor")
    if attn is None:
        m, m_all = rs.get("mscale"), rs.get("mscale_all_dim")
        attn = mscale(factor, m) / mscale(factor, m_all) if (m and m_all) else mscale(factor)

    def correction_dim(rotations: float) -> float:
        # The dimension index whose wavelength makes `rotations` turns over the original context.
        return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rs.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=inv_freq.dtype, device="cpu") - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1: extrapolate (keep the original frequency), 0: interpolate
    inv = (inv_freq / factor) * (1 - keep) + inv_freq * keep
    return inv, float(attn)


class RotaryEmbedding(nn.Module):
    def __init__(self, config: MiniCPM4Config):
        super().__init__()
        # Tables are built in float32 exactly as the reference does, and in float64 for ground-truth runs.
        for dtype, suffix in ((torch.float32, ""), (torch.float64, "64")):
            inv_freq, inv_ext, scale = _frequencies(config, dtype)
            self.register_buffer("inv_freq" + suffix, inv_freq, persistent=False)
            self.register_buffer("inv_ext" + suffix, inv_ext, persistent=False)
        self.scale = scale

    def forward(self, positions: torch.Tensor, dtype: torch.dtype = torch.float32
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: integer tensor of any shape -> (cos, sin) [*positions.shape, head_dim] in float32
        (the reference's precision), or float64 when asked (ground-truth runs)."""
        wide = dtype == torch.float64
        inv_freq, inv_ext = (self.inv_freq64, self.inv_ext64) if wide else (self.inv_freq, self.inv_ext)
        t = positions.to(inv_freq.dtype).unsqueeze(-1)
        # Same op order as the reference ((t * 1/ext) * inv_freq) so tables agree bit for bit.
        freqs = (t * inv_ext) * inv_freq if inv_ext is not None else t * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos(), emb.sin()
        if self.scale != 1.0:
            cos, sin = cos * self.scale, sin * self.scale
        return cos, sin


def longrope_factors(rope_scaling: dict, max_position_embeddings: int) -> list[float]:
    """The LongRoPE factor list in use: the reference picks it by the table length (max_position_embeddings), not
    by the current sequence as Hugging Face's Llama does (the magnitude correction goes into cos/sin)."""
    orig = int(rope_scaling["original_max_position_embeddings"])
    return list(rope_scaling["long_factor" if max_position_embeddings > orig else "short_factor"])


def longrope_scale(rope_scaling: dict, max_position_embeddings: int) -> float:
    """The LongRoPE cos/sin magnitude: attention_factor when given, else from the table's length over the original
    context as the reference computes it (a `factor` is not read: transformers reads it first, which is why the
    Llama export writes this as attention_factor)."""
    if rope_scaling.get("attention_factor") is not None:
        return float(rope_scaling["attention_factor"])
    orig = int(rope_scaling["original_max_position_embeddings"])
    if max_position_embeddings > orig:
        return math.sqrt(1 + math.log(max_position_embeddings / orig) / math.log(orig))
    return 1.0


def _frequencies(config: MiniCPM4Config, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None, float]:
    """(inverse frequencies, 1/LongRoPE factors or None, cos/sin magnitude scale) for a config."""
    d = config.dim_head
    base = float(config.rope_theta)
    # Built on the CPU even under a meta-device context (meta ops here would import torch._dynamo: ~1 s).
    inv_freq = 1.0 / (base ** (torch.arange(0, d, 2, dtype=torch.int64, device="cpu").to(dtype) / d))
    rs = config.rope_scaling or {}
    kind = rs.get("rope_type", rs.get("type")) or "default"
    inv_ext = None
    scale = 1.0
    if kind == "longrope":
        maxpos = config.max_position_embeddings
        inv_ext = 1.0 / torch.tensor(longrope_factors(rs, maxpos), dtype=dtype, device="cpu")
        scale = longrope_scale(rs, maxpos)
    elif kind == "yarn":
        inv_freq, scale = _yarn_inv_freq(inv_freq, d, base, rs, config.max_position_embeddings)
    elif kind == "linear":
        inv_freq = inv_freq / float(rs["factor"])
    return inv_freq, inv_ext, scale
