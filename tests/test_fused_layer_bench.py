"""benchmarks/fused_layer.py's chains (CUDA-only as a benchmark) compute the same layers: checked here on the
CPU (float32, the fused GEMVs under Triton's interpreter), so the benchmark's timings compare equal work."""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" or torch.cuda.is_available(),
                    reason="CPU check under the Triton interpreter")
def test_chains_agree():
    import fused_layer

    g = torch.Generator().manual_seed(0)

    def w(rows, cols):
        return torch.randn(rows, cols, generator=g) / cols ** 0.5

    layers = [dict(qkv=w(128, 64), o=w(64, 64), gate_up=w(192, 64), down=w(64, 96),
                   g1=1 + 0.1 * torch.randn(64, generator=g), g2=1 + 0.1 * torch.randn(64, generator=g))
              for _ in range(3)]
    x, a = torch.randn(1, 64, generator=g), torch.randn(1, 64, generator=g)
    angle = torch.rand(1, 8, generator=g) * 6
    cos, sin = torch.cat([angle.cos()] * 2, 1), torch.cat([angle.sin()] * 2, 1)
    # 8 heads of 16 (128 q/k/v columns): 4 q, 2 k rotated, 2 v
    outs = {name: fn(x, a, layers, cos, sin) for name, fn in fused_layer.chains(1e-6, 0.3, 8, 6, 16).items()}
    ref_x, ref_ys = outs.pop("plain")
    assert not torch.allclose(ref_x, x)  # the layers did something
    for name, (xo, ys) in outs.items():
        torch.testing.assert_close(xo, ref_x, rtol=1e-5, atol=1e-5, msg=name)
        for y, yr in zip(ys, ref_ys):
            torch.testing.assert_close(y, yr, rtol=1e-5, atol=1e-5, msg=name)
