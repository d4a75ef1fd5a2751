"""The decode GEMV kernel (cpm4/kernels/gemv) against its float64 reference: on the CPU through Triton's
interpreter (tiny shapes), on CUDA at the 8B shape's sizes."""

from __future__ import annotations

import os

import pytest
import torch

from cpm4.kernels.gemv import gemv_reference

triton = pytest.importorskip("triton")


def _check(dev: str, dtype: torch.dtype, m: int, n: int, k: int, atol: float) -> None:
    from cpm4.kernels.gemv.triton_gemv import gemv

    g = torch.Generator().manual_seed(m * 1000 + n + k)
    x = torch.randn(m, k, generator=g).to(dev, dtype)
    w = (torch.randn(n, k, generator=g) / k ** 0.5).to(dev, dtype)
    got = gemv(x, w)
    assert got.shape == (m, n) and got.dtype == dtype
    torch.testing.assert_close(got.float(), gemv_reference(x, w).float(), rtol=2e-2, atol=atol)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                    reason="needs CUDA or TRITON_INTERPRET=1")
@pytest.mark.parametrize("m,n,k", [(1, 40, 96), (3, 33, 130), (8, 16, 64)])
def test_gemv_interpreted(m, n, k):
    """Rows, output sizes and K not multiples of the tiles (masked edges), float32 on the CPU."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    _check(dev, torch.float32, m, n, k, atol=1e-4)


def test_gemv_bad_shapes():
    from cpm4.kernels.gemv.triton_gemv import gemv

    with pytest.raises(ValueError, match="x \\[M, K\\] and w \\[N, K\\]"):
        gemv(torch.zeros(1, 4), torch.zeros(3, 5))
    with pytest.raises(ValueError, match="1 to 8 rows"):
        gemv(torch.zeros(9, 4), torch.zeros(3, 4))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [1, 2, 5])
@pytest.mark.parametrize("n,k", [(4608, 4096), (4096, 4096), (4096, 16384), (1000, 4096)])
def test_gemv_cuda(dtype, m, n, k):
    _check("cuda", dtype, m, n, k, atol=2e-2)
