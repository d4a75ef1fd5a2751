"""The decode GEMV kernel (cpm4/kernels/gemv) against its float64 reference: on the CPU through Triton's
interpreter (tiny shapes, every split of K and the merge by the last slice), on CUDA at the 8B shape's sizes."""

from __future__ import annotations

import os

import pytest
import torch

from cpm4.kernels.gemv import gemv_reference

triton = pytest.importorskip("triton")

ON_CPU = not torch.cuda.is_available()
needs_kernels = pytest.mark.skipif(ON_CPU and os.environ.get("TRITON_INTERPRET") != "1",
                                   reason="needs CUDA or TRITON_INTERPRET=1")


def _xw(dev, dtype, m, n, k):
    g = torch.Generator().manual_seed(m * 1000 + n + k)
    x = torch.randn(m, k, generator=g).to(dev, dtype)
    w = (torch.randn(n, k, generator=g) / k ** 0.5).to(dev, dtype)
    return x, w


@needs_kernels
@pytest.mark.parametrize("split", [1, 2, 3])
@pytest.mark.parametrize("m,n,k", [(1, 40, 200), (3, 33, 130), (8, 16, 64)])
def test_gemv_splits_interpreted(split, m, n, k):
    """Rows, output sizes and K not multiples of the tiles (masked edges); K in `split` slices merged by the last
    slice to arrive; the arrival counters are back at zero afterwards (the next call, or graph replay, needs it)."""
    from cpm4.kernels.gemv.triton_gemv import _counters, gemv

    dev = "cpu" if ON_CPU else "cuda"
    x, w = _xw(dev, torch.float32, m, n, k)
    for _ in range(2):  # a second call reuses the counters
        got = gemv(x, w, config={"BLOCK_N": 16, "BLOCK_K": 32, "SPLIT": split})
        assert got.shape == (m, n) and got.dtype == torch.float32
        torch.testing.assert_close(got, gemv_reference(x, w), rtol=1e-5, atol=1e-5)
    assert int(_counters(x.device).abs().sum()) == 0


@needs_kernels
def test_gemv_autotuned_interpreted():
    from cpm4.kernels.gemv.triton_gemv import gemv

    x, w = _xw("cpu" if ON_CPU else "cuda", torch.float32, 2, 50, 96)
    torch.testing.assert_close(gemv(x, w), gemv_reference(x, w), rtol=1e-5, atol=1e-5)


def test_gemv_bad_shapes():
    from cpm4.kernels.gemv.triton_gemv import gemv

    with pytest.raises(ValueError, match="x \\[M, K\\] and w \\[N, K\\]"):
        gemv(torch.zeros(1, 4), torch.zeros(3, 5))
    with pytest.raises(ValueError, match="1 to 8 rows"):
        gemv(torch.zeros(9, 4), torch.zeros(3, 4))
    with pytest.raises(ValueError, match="contiguous along K"):
        gemv(torch.zeros(1, 4), torch.zeros(4, 3).T)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [1, 2, 5])
@pytest.mark.parametrize("n,k", [(4608, 4096), (4096, 4096), (4096, 16384), (1000, 4096)])
def test_gemv_cuda(dtype, m, n, k):
    from cpm4.kernels.gemv.triton_gemv import _counters, gemv

    x, w = _xw("cuda", dtype, m, n, k)
    want = gemv_reference(x, w).float()
    torch.testing.assert_close(gemv(x, w).float(), want, rtol=2e-2, atol=2e-2)
    for split in (1, 2, 4):
        got = gemv(x, w, config={"BLOCK_N": 16, "BLOCK_K": 128, "SPLIT": split})
        torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2)
    assert int(_counters(x.device).abs().sum()) == 0
