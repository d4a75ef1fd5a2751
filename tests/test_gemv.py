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
@pytest.mark.parametrize("split", [1, 2, 3, 8])
@pytest.mark.parametrize("m,n,k", [(1, 40, 200), (3, 33, 130), (8, 16, 64)])
@pytest.mark.parametrize("bn,bk", [(16, 32), (4, 64)])
def test_gemv_splits_interpreted(split, m, n, k, bn, bk):
    """Rows, output sizes and K not multiples of the tiles (masked edges); K in `split` slices merged by the last
    slice to arrive; the arrival counters are back at zero afterwards (the next call, or graph replay, needs it)."""
    from cpm4.kernels.gemv.triton_gemv import _counters, gemv

    dev = "cpu" if ON_CPU else "cuda"
    x, w = _xw(dev, torch.float32, m, n, k)
    for _ in range(2):  # a second call reuses the counters
        got = gemv(x, w, config={"BLOCK_N": bn, "BLOCK_K": bk, "SPLIT": split})
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
    """Fixed tiles on the 8B's shapes; the autotuned choice at one bf16 row (the decode case: tuning every case
    here compiled ~300 kernels, past two minutes; `test_every_tile_on_cuda` checks each tile it can choose)."""
    from cpm4.kernels.gemv.triton_gemv import _counters, gemv

    x, w = _xw("cuda", dtype, m, n, k)
    want = gemv_reference(x, w).float()
    if dtype == torch.bfloat16 and m == 1:
        torch.testing.assert_close(gemv(x, w).float(), want, rtol=2e-2, atol=2e-2)
    for split, bn, bk in ((1, 16, 128), (2, 16, 128), (4, 16, 128), (8, 4, 512)):
        got = gemv(x, w, config={"BLOCK_N": bn, "BLOCK_K": bk, "SPLIT": split})
        torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2)
    assert int(_counters(x.device).abs().sum()) == 0


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 5])
def test_every_tile_on_cuda(monkeypatch, m):
    """Each tile the autotuner may choose (`_configs`, those `_prune` keeps for some matrix at this many rows), with
    its warps: the reference's values on a matrix whose N and K are no multiples of the tiles."""
    from cpm4.kernels.gemv import triton_gemv as t

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x, w = _xw("cuda", torch.bfloat16, m, 1000, 1100)
    want = gemv_reference(x, w).float()
    m_pad = 1 << (m - 1).bit_length()
    configs = [c for c in t._configs() if m_pad * c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_K"] <= 64 * 32 * c.num_warps]
    assert len(configs) >= 8
    for c in configs:
        got = t.gemv(x, w, config={**c.kwargs, "num_warps": c.num_warps, "num_stages": c.num_stages})
        torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2, msg=str(c))
    assert int(t._counters(x.device).abs().sum()) == 0


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


def test_rows_and_plan(monkeypatch):
    """Which calls the kernel takes (rows up to max_rows; CPU tensors never) and which models' decode uses it."""
    from cpm4.kernels import gemv

    w = torch.zeros(6, 4)
    assert [gemv._rows_ok(torch.zeros(r, 4), 1) for r in (1, 2)] == [True, False]
    assert gemv._rows_ok(torch.zeros(1, 3, 4), 3) and not gemv._rows_ok(torch.zeros(1, 3, 4), 2)
    assert not gemv._rows_ok(torch.zeros(0, 4), 8)
    assert not gemv._takes(torch.zeros(1, 4, dtype=torch.bfloat16), w.bfloat16(), 8)  # CPU: F.linear
    x, w = torch.randn(2, 4), torch.randn(6, 4)
    torch.testing.assert_close(gemv.linear(x, w, max_rows=1), x @ w.T)
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    for fuse in (False, True):
        for large in (False, True):
            monkeypatch.setattr(gemv, "FUSE_LAYERS", fuse)
            monkeypatch.setattr(gemv, "FUSE_LARGE", large)
            assert gemv.decode_plan(1024, torch.bfloat16, cuda) == (gemv.DECODE_PROJECTIONS, 1, fuse)
            # the 8B: the same projections, its layers fused only with both flags
            assert gemv.decode_plan(4096, torch.bfloat16, cuda) == (gemv.DECODE_PROJECTIONS, 1, fuse and large)
    assert gemv.decode_plan(1024, torch.float32, cuda) is None and gemv.decode_plan(1024, torch.bfloat16, cpu) is None


def test_use_gemv_max_rows():
    from conftest import random_model

    from cpm4.kernels.gemv import linear

    model = random_model("tiny", dtype=torch.float32, sparse_config=None)
    model.use_gemv(only=["qkv", "o", "down"], max_rows=1)
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    for fn in (attn.gemv_in, attn.gemv_out, mlp.gemv_out):
        assert fn.func is linear and fn.keywords == {"max_rows": 1}
    assert mlp.gemv_in is None and model.gemv is None
    for bad in (0, 9):
        with pytest.raises(ValueError, match="max_rows must be in"):
            model.use_gemv(max_rows=bad)
    model.use_gemv(False)
    assert attn.gemv_in is None and attn.gemv_out is None and mlp.gemv_out is None


@pytest.mark.gpu
@pytest.mark.parametrize("fuse", [False, True])
def test_engine_small_model_plan_on_cuda(monkeypatch, fuse):
    """LLMEngine(gemv=True) on a small bf16 model takes `decode_plan` (the plan's projections through the GEMV at
    one row, cuBLAS beyond; with FUSE_LAYERS the fused layers), compiled decode graphs: greedy tokens as with
    gemv=False, one request at a time and three together."""
    from conftest import alone_then_together, random_model
    from test_engine import tok

    from cpm4.engine.paged import PagedKVCache
    from cpm4.engine.sampling import SamplingParams
    from cpm4.engine.scheduler import LLMEngine
    from cpm4.kernels import gemv as gemv_module
    from cpm4.kernels.gemv import DECODE_ROWS

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    monkeypatch.setattr(gemv_module, "FUSE_LAYERS", fuse)
    model = random_model("tiny", dtype=torch.float32, sparse_config=None).to("cuda", torch.bfloat16)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    prompts = [list(range(5 + 3 * i, 60 + 7 * i)) for i in range(3)]
    out = {}
    for gemv in (True, False):
        model.use_gemv(False)
        cache = PagedKVCache(model.config, num_pages=100, page_size=16, device="cuda", dtype=torch.bfloat16)
        eng = LLMEngine(model, tok(), cache, max_batch_size=4, chunk_tokens=128, compile=True, gemv=gemv)
        attn = model.model.layers[0].self_attn
        assert (attn.gemv_out is not None) == gemv
        assert (model.model.layers[0].fused_rows is not None) == (gemv and fuse)
        if gemv:
            assert attn.gemv_out.keywords == {"max_rows": DECODE_ROWS}
        out[gemv] = alone_then_together(eng, prompts, params)  # batch 1: the GEMV; three rows: cuBLAS
    same = sum(out[True][k] == out[False][k] for k in out[False])
    assert same >= len(out[False]) - 1  # bf16: a near tie may break the other way in one request
    model.use_gemv(False)


_FLAGS = {"norm": dict(norm=True), "glu": dict(glu=True), "res": dict(res=True), "norm_res": dict(norm=True, res=True),
          "glu_res": dict(glu=True, res=True)}


def _fused_case(dev, dtype, m, n, k, norm=False, glu=False, res=False, seed=0):
    g = torch.Generator().manual_seed(seed + m * 100 + n + k)
    x = torch.randn(m, 2 * k if glu else k, generator=g) * 3
    w = torch.randn(n, k, generator=g) / k ** 0.5
    kw = {}
    if norm:
        kw["norm"] = ((1 + 0.5 * torch.randn(k, generator=g)).to(dev, dtype), 1e-6)
    if glu:
        kw["glu"] = True
    if res:
        kw["residual"] = torch.randn(m, n, generator=g).to(dev, dtype)
        kw["scale"] = 0.35
    return x.to(dev, dtype), w.to(dev, dtype), kw


@needs_kernels
@pytest.mark.parametrize("flags", sorted(_FLAGS))
@pytest.mark.parametrize("split", [1, 3])
@pytest.mark.parametrize("m,n,k", [(1, 40, 200), (3, 33, 130)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fused_interpreted(flags, split, m, n, k, dtype):
    """The norm before, silu(gate) * up before, the scaled residual after (alone and together), with K in slices and
    masked edges: the float64 definition with its roundings (`fused_gemv_reference`); float16 within an ulp or
    two of the output (sums in another order)."""
    from cpm4.kernels.gemv import fused_gemv_reference
    from cpm4.kernels.gemv.triton_gemv import _counters, gemv

    dev = "cpu" if ON_CPU else "cuda"
    x, w, kw = _fused_case(dev, dtype, m, n, k, **_FLAGS[flags])
    want = fused_gemv_reference(x, w, **kw)
    got = gemv(x, w, config={"BLOCK_N": 16, "BLOCK_K": 32, "SPLIT": split}, **kw)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=4e-3, atol=4e-3)
    torch.testing.assert_close(got, want, **tol)
    plain = gemv_reference(x if not kw.get("glu") else x[:, :k], w)  # the flags change the result
    assert not torch.allclose(got.float(), plain.float(), rtol=1e-2, atol=1e-2)
    assert int(_counters(x.device).abs().sum()) == 0


@needs_kernels
@pytest.mark.parametrize("split", [1, 2])
@pytest.mark.parametrize("m", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("norm", [False, True])
def test_fused_rope_interpreted(split, m, dtype, norm):
    """The q/k/v projection with RoPE inside: heads of 16 (3 rotated, 2 left as they are: the v heads), each
    row its own tables; tiles of 8 and 16 columns (a tile is half a head's first half, half their partners);
    against the float64 definition (`fused_gemv_reference`: rotate_half's convention)."""
    from cpm4.kernels.gemv import fused_gemv_reference
    from cpm4.kernels.gemv.triton_gemv import gemv

    dev = "cpu" if ON_CPU else "cuda"
    d, heads, rot = 16, 5, 3
    x, w, kw = _fused_case(dev, dtype, m, heads * d, 72, norm=norm, seed=9)
    g = torch.Generator().manual_seed(11)
    angle = torch.rand(m, d // 2, generator=g) * 6
    cos = torch.cat([angle.cos(), angle.cos()], 1).to(dev)
    sin = torch.cat([angle.sin(), angle.sin()], 1).to(dev)
    kw["rope"] = (cos, sin, rot * d, d)
    want = fused_gemv_reference(x, w, **kw)
    plain = fused_gemv_reference(x, w, **{k: v for k, v in kw.items() if k != "rope"})
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=4e-3, atol=4e-3)
    for bn in (8, 16):
        got = gemv(x, w, config={"BLOCK_N": bn, "BLOCK_K": 32, "SPLIT": split}, **kw)
        torch.testing.assert_close(got, want, **tol)
    torch.testing.assert_close(got[:, rot * d:], plain[:, rot * d:], **tol)  # the v heads as projected
    assert not torch.allclose(got[:, :rot * d].float(), plain[:, :rot * d].float(), rtol=1e-2, atol=1e-2)


@needs_kernels
def test_fused_norm_over_several_passes():
    """Rows wider than the norm's one-pass block (5 rows: 1,024 at a time over K = 1,300): the RMS summed over
    passes, masked at the end."""
    from cpm4.kernels.gemv import fused_gemv_reference
    from cpm4.kernels.gemv.triton_gemv import gemv

    dev = "cpu" if ON_CPU else "cuda"
    x, w, kw = _fused_case(dev, torch.float32, 5, 20, 1300, norm=True, res=True)
    got = gemv(x, w, config={"BLOCK_N": 16, "BLOCK_K": 128, "SPLIT": 2}, **kw)
    torch.testing.assert_close(got, fused_gemv_reference(x, w, **kw), rtol=1e-5, atol=1e-5)


def test_fused_bad_arguments():
    from cpm4.kernels.gemv.triton_gemv import gemv

    x, w = torch.zeros(2, 8), torch.zeros(4, 8)
    with pytest.raises(ValueError, match=r"x \[M, 2K\] \(\[gate \| up\]\) and w \[N, K\]"):
        gemv(x, w, glu=True)
    with pytest.raises(ValueError, match="norm or glu, not both"):
        gemv(torch.zeros(2, 16), w, glu=True, norm=(torch.ones(8), 1e-6))
    with pytest.raises(ValueError, match=r"norm weight must be \[8\]"):
        gemv(x, w, norm=(torch.ones(7), 1e-6))
    with pytest.raises(ValueError, match=r"residual must be \[2, 4\]"):
        gemv(x, w, residual=torch.zeros(4, 2))
    cs = torch.ones(2, 4)
    with pytest.raises(ValueError, match="rope goes with a plain or normed input"):
        gemv(x, w, residual=torch.zeros(2, 4), rope=(cs, cs, 4, 4))
    with pytest.raises(ValueError, match="even head_dim dividing N = 4"):
        gemv(x, w, rope=(torch.ones(2, 3), torch.ones(2, 3), 3, 3))
    with pytest.raises(ValueError, match=r"rope tables must be \[2, 4\]"):
        gemv(x, w, rope=(torch.ones(1, 4), torch.ones(1, 4), 4, 4))
    with pytest.raises(ValueError, match="even BLOCK_N dividing 4"):
        gemv(x, w, config={"BLOCK_N": 8, "BLOCK_K": 8, "SPLIT": 1}, rope=(cs, cs, 4, 4))


def test_fused_takes(monkeypatch):
    from cpm4.kernels import gemv

    x, w = torch.zeros(1, 8), torch.zeros(4, 8)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert gemv.fused_takes(x, w, 1) and not gemv.fused_takes(torch.zeros(2, 8), w, 1)
    assert not gemv.fused_takes(x, w.double(), 1)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not gemv.fused_takes(x, w, 1)  # the CPU without the interpreter: PyTorch's ops


@pytest.mark.slow
@needs_kernels
def test_fused_decoder_layers_equal_the_plain_ones():
    """`use_gemv(fuse=True)`: a one-row step's layers as four fused GEMVs (norms, SiLU·up, residuals inside) give
    the plain layers' logits (float32, under the interpreter off the GPU); two rows (past max_rows) take the plain
    path; then through the engine, each request alone, the same greedy tokens with the fused layers as without."""
    from conftest import random_model
    from test_engine import tok

    from cpm4.engine.paged import PagedKVCache
    from cpm4.engine.sampling import SamplingParams
    from cpm4.engine.scheduler import LLMEngine
    from cpm4.model.modeling import DecoderLayer

    dev = "cpu" if ON_CPU else "cuda"
    model = random_model("tiny", dtype=torch.float32, sparse_config=None).to(dev)
    model.fuse_projections()
    calls = []
    orig = DecoderLayer._fused
    DecoderLayer._fused = lambda self, *a: calls.append(a[0].shape[0]) or orig(self, *a)
    try:
        ids = torch.randint(3, 500, (2, 1), generator=torch.Generator().manual_seed(3)).to(dev)
        with torch.no_grad():
            want = model(ids)
            model.use_gemv(only=(), max_rows=1, fuse=True)
            got1, got2 = model(ids[:1]), model(ids)
        assert calls == [1] * model.config.num_hidden_layers  # the two-row call: plain layers
        torch.testing.assert_close(got1, want[:1], rtol=1e-4, atol=1e-4)
        assert torch.equal(got2, want)
        params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
        ps = [list(range(7, 30)), list(range(40, 52))]
        out = {}
        for fuse in (True, False):
            model.use_gemv(fuse, only=(), max_rows=1, fuse=True)
            eng = LLMEngine(model, tok(), PagedKVCache(model.config, num_pages=16, page_size=16, device=dev),
                            max_batch_size=1, chunk_tokens=64, cuda_graphs=False)
            for i, p in enumerate(ps):
                eng.add_request(f"r{i}", p, params)
                out[fuse, i] = eng.run_to_completion()[f"r{i}"][1]
        assert all(out[True, i] == out[False, i] for i in range(len(ps)))
        assert len(calls) > model.config.num_hidden_layers * 4  # the engine's decode steps took the fused layers
    finally:
        DecoderLayer._fused = orig
        model.use_gemv(False)


def test_autotune_prune(monkeypatch):
    """The tiles tuned over: narrow ones (BLOCK_N <= 8) for small matrices, up to 16 wide in at most two slices
    for large (the 8B's best, 4 x 512, among them), none whose accumulator outgrows the registers at this many
    rows."""
    from cpm4.kernels.gemv import triton_gemv as t

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    configs = t._configs()

    def widths(n, k, m_pad=1):
        return {c.kwargs["BLOCK_N"] for c in t._prune(configs, {"N": n, "K": k, "M_PAD": m_pad})}

    assert widths(1280, 1024) == {4, 8}  # 2.6 MB (0.5B q/k/v)
    assert widths(4608, 4096) == {4, 8, 16}  # 38 MB (8B q/k/v)
    large = t._prune(configs, {"N": 4608, "K": 4096, "M_PAD": 1})
    assert {c.kwargs["SPLIT"] for c in large} == {1, 2}
    assert any((c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.kwargs["SPLIT"], c.num_warps) == (4, 512, 1, 2)
               for c in large)
    kept = t._prune(configs, {"N": 1280, "K": 1024, "M_PAD": 8})
    assert kept and all(8 * c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_K"] <= 64 * 32 * c.num_warps for c in kept)


@needs_kernels
def test_fused_op_compiles_whole():
    """`cpm4::gemv_fused` (optional tensors, float arguments) as torch.compile sees it: no graph break, values as
    the kernel's; `fused_takes` traced for the rows rule."""
    from cpm4.kernels.gemv import fused_gemv_reference, fused_linear, fused_takes

    dev = "cpu" if ON_CPU else "cuda"
    dt = torch.float32 if ON_CPU else torch.bfloat16
    x, w, kw = _fused_case(dev, dt, 1, 40, 96, norm=True)
    h, w2, kw2 = _fused_case(dev, dt, 1, 24, 40, glu=True, res=True)

    def f(x, w, g, h, w2, r):
        assert fused_takes(x, w, 1)
        return fused_linear(x, w, norm=(g, 1e-6)), fused_linear(h, w2, glu=True, residual=r, scale=0.35)

    got = torch.compile(f, fullgraph=True, backend="aot_eager")(x, w, kw["norm"][0], h, w2, kw2["residual"])
    tol = dict(rtol=1e-5, atol=1e-5) if dt == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(got[0], fused_gemv_reference(x, w, **kw), **tol)
    torch.testing.assert_close(got[1], fused_gemv_reference(h, w2, **kw2), **tol)


@needs_kernels
@pytest.mark.skipif(not ON_CPU, reason="interpreter test: the GPU runs test_engine_small_model_plan_on_cuda")
def test_fused_decode_step_compiles_as_one_graph():
    """The engine's one-row decode step with the fused layers, compiled as the decode graphs compile it (the paged
    attention and the fused GEMVs opaque custom ops): one graph, no break, and the plain eager step's logits."""
    from conftest import random_model
    from test_engine import tok

    from cpm4.engine import paged
    from cpm4.engine.paged import PagedKVCache
    from cpm4.engine.sampling import SamplingParams
    from cpm4.engine.scheduler import LLMEngine

    model = random_model("tiny", dtype=torch.float32, sparse_config=None, num_hidden_layers=2)
    cache = PagedKVCache(model.config, num_pages=20, page_size=16)
    eng = LLMEngine(model, tok(), cache, max_batch_size=1, chunk_tokens=128, paged_decode=True)
    eng.add_request("r", list(range(5, 50)), SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    eng.step()  # the prefill; its next token sampled
    seq = eng.running[0].pages
    cache.reserve(seq, 1)
    ids = torch.tensor([[eng.running[0].state.generated[-1]]])
    ones = torch.ones(1, dtype=torch.long)
    try:
        with torch.inference_mode():
            ref = model(ids, cache.batch([seq], decode=True), ones, last_only=True)
            model.use_gemv(only=(), max_rows=1, fuse=True)
            paged.make_opaque_to_compile()
            explain = torch._dynamo.explain(model)(ids, cache.batch([seq], decode=True), ones, last_only=True)
            assert explain.graph_break_count == 0 and explain.graph_count == 1
            gm = explain.graphs[0]
            assert str(gm.code).count("gemv_fused") == 4 * model.config.num_hidden_layers
            out = torch.compile(model, backend="aot_eager", dynamic=False)(ids, cache.batch([seq], decode=True), ones,
                                                                            last_only=True)
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    finally:
        model.use_gemv(False)
