"""Rotary scalings against Hugging Face transformers' implementations and the spec's formulas."""

import math

import pytest
import torch

from cpm4.model import preset
from cpm4.model.rope import RotaryEmbedding


def hf_inv_freq(kind: str, rope: dict, maxpos: int, head_dim: int = 16):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    c = LlamaConfig(hidden_size=head_dim * 8, num_attention_heads=8, max_position_embeddings=maxpos,
                    rope_scaling={"rope_type": kind, **rope})
    return ROPE_INIT_FUNCTIONS[kind](c, "cpu")


@pytest.mark.parametrize("rope", [
    {"factor": 4.0, "original_max_position_embeddings": 1024},
    {"factor": 8.0, "original_max_position_embeddings": 512, "beta_fast": 16, "beta_slow": 2},
    {"factor": 2.0, "original_max_position_embeddings": 2048, "attention_factor": 1.3},
])
def test_yarn_matches_transformers(rope):
    cfg = preset("tiny", rope_scaling={"rope_type": "yarn", **rope})
    ours = RotaryEmbedding(cfg)
    inv, attn = hf_inv_freq("yarn", rope, cfg.max_position_embeddings)
    torch.testing.assert_close(ours.inv_freq, inv.float(), rtol=1e-6, atol=0)
    assert ours.scale == pytest.approx(attn)
    cos, _ = ours(torch.tensor([0]))
    assert cos[0, 0].item() == pytest.approx(attn)  # the attention factor scales cos/sin


def test_linear_scaling_divides_frequencies():
    cfg = preset("tiny", rope_scaling={"rope_type": "linear", "factor": 4.0})
    base = RotaryEmbedding(preset("tiny"))
    ours = RotaryEmbedding(cfg)
    c1, s1 = ours(torch.tensor([40]))
    c2, s2 = base(torch.tensor([10]))
    torch.testing.assert_close(c1, c2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s1, s2, rtol=1e-5, atol=1e-5)


def test_longrope_reference_formula():
    d = preset("tiny").dim_head
    short = [1.0 + 0.1 * i for i in range(d // 2)]
    long = [2.0 + 0.5 * i for i in range(d // 2)]
    rs = {"rope_type": "longrope", "original_max_position_embeddings": 4096, "short_factor": short,
          "long_factor": long}
    pos = torch.tensor([0, 1, 77, 4095])
    for maxpos, factors in ((4096, short), (32768, long)):
        rope = RotaryEmbedding(preset("tiny", rope_scaling=rs, max_position_embeddings=maxpos))
        # Reference construction: inv_freq in fp32, freqs = outer(t, 1/ext) * inv_freq, scaled cos/sin.
        inv_freq = 1.0 / (10000.0 ** (torch.arange(0, d, 2).float() / d))
        ext = torch.tensor(factors, dtype=torch.float32)
        freqs = torch.outer(pos.float(), 1.0 / ext) * inv_freq
        emb = torch.cat([freqs, freqs], -1)
        mscale = 1.0 if maxpos == 4096 else math.sqrt(1 + math.log(maxpos / 4096) / math.log(4096))
        cos, sin = rope(pos)
        assert torch.equal(cos, emb.cos() * mscale) and torch.equal(sin, emb.sin() * mscale)


def test_released_8b_mscale_values():
    """spec: raising max_position_embeddings to 131072 gives 1.0645813 (4-8B) and 1.0307764 (4.1)."""
    d = 128
    for orig, expect in ((32768, 1.0645813), (65536, 1.0307764)):
        cfg = preset("minicpm4-8b", max_position_embeddings=131072,
                     rope_scaling={"rope_type": "longrope", "original_max_position_embeddings": orig,
                                   "short_factor": [1.0] * (d // 2), "long_factor": [1.0] * (d // 2)})
        assert RotaryEmbedding(cfg).scale == pytest.approx(expect, abs=1e-7)


def test_float64_tables_agree_with_float32():
    rope = RotaryEmbedding(preset("tiny"))
    pos = torch.arange(0, 4096, 37)
    c32, _ = rope(pos)
    c64, _ = rope(pos, torch.float64)
    assert c64.dtype == torch.float64
    torch.testing.assert_close(c64.float(), c32, rtol=0, atol=5e-4)
