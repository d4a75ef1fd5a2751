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


@needs_kernels
def test_custom_op_compiles_whole():
    """`cpm4::gemv` as torch.compile sees it: no graph break (fullgraph), values as the kernel's."""
    import cpm4.kernels.gemv  # noqa: F401  (registers the op)

    dev = "cpu" if ON_CPU else "cuda"
    x, w = _xw(dev, torch.float32, 2, 24, 64)
    f = torch.compile(lambda a, b: torch.ops.cpm4.gemv(a, b) * 2, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(f(x, w), gemv_reference(x, w) * 2, rtol=1e-5, atol=1e-5)


def test_use_gemv_routes_the_projections():
    """use_gemv sets the GEMV on every attention and MLP module and the head, and off again; off the GPU
    `linear` is F.linear, so the logits are unchanged."""
    from conftest import random_model

    from cpm4.kernels.gemv import linear
    from cpm4.model.modeling import MLP, Attention

    model = random_model("tiny", dtype=torch.float32, num_mtp_layers=1)
    ids = torch.randint(3, 500, (1, 9), generator=torch.Generator().manual_seed(0))
    mods = [m for m in model.modules() if isinstance(m, (Attention, MLP))]
    with torch.no_grad():
        ref = model(ids)
        model.use_gemv()
        assert model.gemv is linear and all(m.gemv_in is linear and m.gemv_out is linear for m in mods)
        assert torch.equal(model(ids), ref)
        model.use_gemv(only=["qkv", "gate_up", "lm_head"])  # the projections where it beat cuBLAS
        assert model.gemv is linear and all(m.gemv_in is linear and m.gemv_out is None for m in mods)
        assert torch.equal(model(ids), ref)
        model.use_gemv(False)
        assert model.gemv is None and all(m.gemv_in is None and m.gemv_out is None for m in mods)
    with pytest.raises(ValueError, match=r"unknown projections \['up'\] for use_gemv: choose from qkv, o"):
        model.use_gemv(only=["up", "o"])


@pytest.mark.gpu
def test_use_gemv_on_cuda():
    """A float16 model with the GEMV on: logits of few-row forwards (the GEMV's case) as with cuBLAS, and the engine
    decodes through it from CUDA graphs (compiled too: the custom op inside the captured step)."""
    from conftest import random_model
    from test_engine import tok

    from cpm4.engine.paged import PagedKVCache
    from cpm4.engine.sampling import SamplingParams
    from cpm4.engine.scheduler import LLMEngine

    model = random_model("tiny", dtype=torch.float32).to("cuda", torch.float16)
    with torch.no_grad():
        for shape in ((3, 1), (1, 5), (2, 4)):
            ids = torch.randint(3, 500, shape, device="cuda", generator=torch.Generator("cuda").manual_seed(1))
            ref = model(ids)
            model.use_gemv()
            got = model(ids)
            model.use_gemv(False)
            torch.testing.assert_close(got, ref, rtol=2e-2, atol=2e-2)
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    for compile in (False, True):
        model.use_gemv()
        cache = PagedKVCache(model.config, num_pages=100, page_size=16, device="cuda", dtype=torch.float16)
        eng = LLMEngine(model, tok(), cache, max_batch_size=4, chunk_tokens=64, compile=compile)
        for i in range(3):
            eng.add_request(f"r{i}", list(range(5 + i, 40 + i)), params)
        res = eng.run_to_completion()
        assert all(len(res[f"r{i}"][1]) == 10 for i in range(3))
        model.use_gemv(False)
