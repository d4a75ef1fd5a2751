"""The decoder layer's element-wise ops as Triton kernels (cpm4/kernels/elementwise) against the model's eager
functions: on the CPU in Triton's interpreter (small shapes, float32 and bfloat16), on CUDA at the 8B shape.
Equal where the order of operations is the same; within one rounding of the output dtype for the norm's mean
square (another summation order) and SiLU's exp (another exp implementation on the CPU)."""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton")

from cpm4.kernels.elementwise import reference, triton_ops  # noqa: E402

ON_CPU = not torch.cuda.is_available()
needs_kernels = pytest.mark.skipif(ON_CPU and os.environ.get("TRITON_INTERPRET") != "1",
                                   reason="needs CUDA or TRITON_INTERPRET=1")


def _inputs(dev, dtype, b=2, t=5, h=48, i=40, nh=3, nkv=1, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dev, dtype)

    gate_up = r(b, t, 2 * i, scale=3)
    qkv = r(b, t, (nh + 2 * nkv) * d)
    pos = torch.arange(t)[None].expand(b, t) + 7 * torch.arange(b)[:, None]  # rows at other offsets
    inv = 1.0 / 10000 ** (torch.arange(0, d, 2).float() / d)
    freqs = pos[..., None].float() * inv
    emb = torch.cat((freqs, freqs), -1)
    return dict(x=r(b, t, h), y=r(b, t, h), w=r(h), gate=gate_up[..., :i], up=gate_up[..., i:],
                q=qkv[..., :nh * d].view(b, t, nh, d), k=qkv[..., nh * d:(nh + nkv) * d].view(b, t, nkv, d),
                qk=qkv.view(b, t, nh + 2 * nkv, d)[:, :, :nh + nkv],
                cos=emb.cos().to(dev), sin=emb.sin().to(dev))


def _ulp_close(got, want, ulps: int = 2):
    """Within `ulps` roundings (relative): one op's rounding apart, carried through the next product."""
    assert got.shape == want.shape and got.dtype == want.dtype
    eps = torch.finfo(want.dtype).eps
    torch.testing.assert_close(got.float(), want.float(), rtol=ulps * eps, atol=eps / 100)


def _check_all(dev, dtype, **shape):
    ops, a = triton_ops(), _inputs(dev, dtype, **shape)
    x, y, w = a["x"], a["y"], a["w"]
    assert torch.equal(ops.add_scaled(x, y, 0.37), reference.add_scaled(x, y, 0.37))
    # exp: numpy's, libdevice's expf and ATen's CPU (vectorized) exp may differ in the last bit
    _ulp_close(ops.silu_mul(a["gate"], a["up"]), reference.silu_mul(a["gate"], a["up"]), ulps=4)
    for name in ("q", "k", "qk"):  # strided views out of the fused q/k/v output, as the model passes them
        assert torch.equal(ops.rotary(a[name], a["cos"], a["sin"]), reference.rotary(a[name], a["cos"], a["sin"]))
    _ulp_close(ops.rms_norm(x, w, 1e-6), reference.rms_norm(x, w, 1e-6))
    s, n = ops.add_rms_norm(x, y, 0.37, w, 1e-6)
    s_ref, n_ref = reference.add_rms_norm(x, y, 0.37, w, 1e-6)
    assert torch.equal(s, s_ref)
    _ulp_close(n, n_ref)


@needs_kernels
def test_ops_match_eager_interpreted():
    """float32 only off the GPU: the interpreter's bfloat16 casts truncate where CUDA's round to nearest."""
    _check_all("cpu" if ON_CPU else "cuda", torch.float32)
    _check_all("cpu" if ON_CPU else "cuda", torch.float32, b=1, t=3, h=20, i=9, nh=4, nkv=2, d=8)


@needs_kernels
def test_model_with_triton_ops_matches_eager():
    """fuse_elementwise(backend="triton") routes every layer through the kernels: logits as the eager model's."""
    from conftest import random_model

    model = random_model("tiny", dtype=torch.float32, num_mtp_layers=1)
    if not ON_CPU:
        model = model.cuda()
    ids = torch.randint(3, 500, (2, 24), generator=torch.Generator().manual_seed(1)).to(model.device)
    with torch.no_grad():
        ref = model(ids)
        model.fuse_elementwise(backend="triton")
        assert model.model.layers[0].mlp.ops is triton_ops()
        got = model(ids)
        model.fuse_projections()  # q and k rotated in one launch over their heads side by side
        got_fused = model(ids)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_fused, ref, rtol=1e-5, atol=1e-5)


@needs_kernels
def test_autograd_takes_the_reference():
    """Inputs that need gradients (a model trained after an engine switched it to the kernels) run the
    reference, so the backward is autograd's: the same gradients as the eager functions."""
    from conftest import random_model

    model = random_model("tiny", dtype=torch.float32)
    if not ON_CPU:
        model = model.cuda()
    ids = torch.randint(3, 500, (2, 16), generator=torch.Generator().manual_seed(2)).to(model.device)
    model(ids).float().square().mean().backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.fuse_elementwise(backend="triton")
    model(ids).float().square().mean().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want[n], rtol=1e-5, atol=1e-6, msg=n)
    model.fuse_elementwise(False)


def test_falls_back_where_no_kernel_applies():
    """float64 (ground-truth runs) and mixed dtypes take the reference, exactly."""
    ops, a = triton_ops(), _inputs("cpu", torch.float64)
    assert torch.equal(ops.rms_norm(a["x"], a["w"], 1e-6), reference.rms_norm(a["x"], a["w"], 1e-6))
    assert torch.equal(ops.rotary(a["q"], a["cos"].double(), a["sin"].double()),
                       reference.rotary(a["q"], a["cos"].double(), a["sin"].double()))
    x32, w16 = a["x"].float(), a["w"].to(torch.bfloat16)
    assert torch.equal(ops.rms_norm(x32, w16, 1e-6), reference.rms_norm(x32, w16, 1e-6))


@needs_kernels
@needs_kernels
def test_prefill_signatures_do_not_follow_the_token_count():
    """The element-wise kernels of a packed prefill step (x [1, all of the step's tokens, ...]) launch with the
    same Triton signature whatever the token count (1, a multiple of 16 or other): on a GPU each new one was a
    compilation in the middle of serving (`_rotary_kernel`'s T, twice per timed run on the H200)."""
    if not (ON_CPU and os.environ.get("TRITON_INTERPRET") == "1"):
        pytest.skip("signatures are read from the interpreter's launches")
    from conftest import random_model
    from jit_signatures import launch_signatures, new_signatures

    from cpm4.engine.paged import PagedKVCache
    from cpm4.engine.sampling import SamplingParams
    from cpm4.engine.scheduler import LLMEngine
    from cpm4.model.tokenizer import build_tokenizer

    model = random_model("tiny", dtype=torch.float32)
    eng = LLMEngine(model, build_tokenizer(1024), PagedKVCache(model.config, num_pages=64, page_size=16),
                    max_batch_size=4, elementwise="triton")
    params = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)

    def run(*lens):
        with launch_signatures() as seen:
            for i, n in enumerate(lens):
                eng.add_request(f"{len(lens)}-{n}-{i}", [3 + (7 * j + n) % 900 for j in range(n)], params)
            eng.run_to_completion()
        return seen

    first = run(5)  # a 5-token prefill, then 1-token decode steps
    assert {"_rotary_kernel", "_rms_norm_kernel", "_silu_mul_kernel"} <= set(first)
    for lens in [(16,), (17, 15), (2,), (33, 7, 24)]:  # steps of 16, 32, 2 and 64 tokens
        assert new_signatures(first, run(*lens)) == {}, lens


def test_bad_shapes():
    from cpm4.kernels.elementwise.kernels import add_rms_norm, rms_norm, rotary

    x = torch.zeros(2, 3, 8)
    with pytest.raises(ValueError, match="norm weight \\(7,\\) does not fit hidden size 8"):
        rms_norm(x, torch.zeros(7), 1e-6)
    with pytest.raises(ValueError, match="residual .* and update .* differ"):
        add_rms_norm(x, torch.zeros(2, 3, 9), 1.0, torch.zeros(8), 1e-6)
    with pytest.raises(ValueError, match="rotary needs x \\[B, T, H, d\\]"):
        rotary(x, torch.zeros(2, 3, 8), torch.zeros(2, 3, 8))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_ops_match_eager_cuda_8b_shape(dtype):
    _check_all("cuda", dtype, b=1, t=300, h=4096, i=16384, nh=32, nkv=2, d=128)
    _check_all("cuda", dtype, b=3, t=1, h=4096, i=16384, nh=32, nkv=2, d=128)  # decode rows
