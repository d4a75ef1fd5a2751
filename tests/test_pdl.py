"""Programmatic dependent launches through a decode step (cpm4/kernels/pdl.py): where they apply, and on a Hopper
GPU the GEMV (plain and fused) and the engine's compiled, graph-captured
decode steps (dense and InfLLM v2) giving what they give without. The kernels' sm_90 builds are checked on the CPU
in test_cuda_build.py."""

from __future__ import annotations

import threading

import pytest
import torch

from cpm4.kernels import pdl

ON_CPU = not torch.cuda.is_available()


def test_enabled_only_on_a_hopper_gpu(monkeypatch):
    assert not pdl.enabled(torch.device("cpu"), True)
    assert pdl.launch(False) == {} and pdl.launch(True) == {"launch_pdl": True}
    if not ON_CPU:
        dev = torch.device("cuda")
        assert not pdl.enabled(dev, False)
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        assert not pdl.enabled(dev, True)


def test_auto_flag_follows_ours(monkeypatch):
    """A kernel flag of None means PDL exactly inside `pdl.ours()` (nested scopes restore what was outside, an
    error inside too; the scope is the thread's own); True and False stand whatever the scope."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    dev = torch.device("cuda")
    assert not pdl.enabled(dev, None) and pdl.enabled(dev, True)
    with pdl.ours():
        assert pdl.enabled(dev, None) and not pdl.enabled(dev, False)
        with pdl.ours(False):
            assert not pdl.enabled(dev, None) and pdl.enabled(dev, True)
        assert pdl.enabled(dev, None)
        with pytest.raises(RuntimeError), pdl.ours(False):
            raise RuntimeError
        assert pdl.enabled(dev, None)
    assert not pdl.enabled(dev, None)
    with pdl.ours():  # another thread's launches stay outside this thread's scope
        seen = []
        worker = threading.Thread(target=lambda: seen.append(pdl.enabled(dev, None)))
        worker.start()
        worker.join()
        assert seen == [False] and pdl.enabled(dev, None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    with pdl.ours():
        assert not pdl.enabled(dev, None)  # Ampere has no PDL


def _hopper():
    if ON_CPU or torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("needs a CUDA device of compute capability 9+")


@pytest.mark.gpu
def test_gemv_with_pdl_on_cuda():
    """A chain of GEMVs each launched as a programmatic dependent of the one before, which lets it launch at its
    start and writes its input: each waits, so the chain's values are the plain launches' (bit for bit) and the
    float64 definition's, for tiles with and without K slices and each fused flag, eagerly and replayed from a
    CUDA graph."""
    _hopper()
    from cpm4.kernels.gemv import fused_gemv_reference
    from cpm4.kernels.gemv import triton_gemv as t

    g = torch.Generator(device="cuda").manual_seed(0)
    n = 1024
    ws = [(torch.randn(n, n, device="cuda", generator=g) / 32).bfloat16() for _ in range(4)]
    x0 = torch.randn(1, n, device="cuda", generator=g).bfloat16()
    norm = (torch.ones(n, device="cuda", dtype=torch.bfloat16), 1e-6)

    def chain(x, cfg, pdl):
        outs = []
        for i, w in enumerate(ws):  # plain, normed, with the residual, plain
            kw = [{}, {"norm": norm}, {"residual": x, "scale": 0.5}, {}][i]
            x = t.gemv(x, w, config=cfg, pdl=pdl, **kw)
            outs.append((x, kw))
        return outs

    for cfg in ({"BLOCK_N": 4, "BLOCK_K": 512, "SPLIT": 1, "num_warps": 2}, {"BLOCK_N": 8, "BLOCK_K": 128,
                                                                            "SPLIT": 4}):
        plain = [y for y, _ in chain(x0, cfg, False)]
        got = chain(x0, cfg, True)
        for (y, kw), want, w, prev in zip(got, plain, ws, [x0] + plain[:-1]):
            assert torch.equal(y, want)
            ref = fused_gemv_reference(prev, w, **kw)
            torch.testing.assert_close(y.float(), ref.float(), atol=3e-2, rtol=3e-2)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = chain(x0, cfg, True)
        graph.replay()
        torch.cuda.synchronize()
        assert all(torch.equal(y, want) for (y, _), want in zip(captured, plain))


@pytest.mark.gpu
@pytest.mark.parametrize("sparse", [False, True])
def test_engine_decode_with_pdl_on_cuda(monkeypatch, sparse):
    """The engine's compiled decode graphs with every decode kernel a programmatic dependent (the attention's
    and the GEMV's, fused layers on the small model): greedy tokens as without, one request at a time and three
    together (InfLLM v2 rows past dense_len too)."""
    _hopper()
    from conftest import alone_then_together, random_model
    from test_engine import sparse as sparse_cfg
    from test_engine import tok

    from cpm4.engine.paged import PagedKVCache
    from cpm4.engine.sampling import SamplingParams
    from cpm4.engine.scheduler import LLMEngine
    from cpm4.kernels.gemv import triton_gemv
    from cpm4.kernels.infllm_v2 import triton_decode

    sc = sparse_cfg(dense_len=40) if sparse else None
    model = random_model("tiny", dtype=torch.float32, sparse_config=sc).to("cuda", torch.bfloat16)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    prompts = [list(range(5 + 3 * i, 60 + 7 * i)) for i in range(3)]
    out = {}
    for on in (False, True):
        monkeypatch.setattr(triton_decode, "PDL", on)
        monkeypatch.setattr(triton_gemv, "PDL", on)
        cache = PagedKVCache(model.config, num_pages=100, page_size=16, device="cuda", dtype=torch.bfloat16)
        eng = LLMEngine(model, tok(), cache, max_batch_size=4, chunk_tokens=128, compile=True)
        out[on] = alone_then_together(eng, prompts, params)
        torch._dynamo.reset()  # the next engine compiles with the other kernels
    assert out[True] == out[False]


@pytest.mark.gpu
@pytest.mark.parametrize("fuse", [True, False])
def test_engine_captures_only_fused_steps_with_pdl(monkeypatch, fuse):
    """`cuda_graph.FUSED_PDL`: the engine captures the decode buckets its layers run fused (one row, with
    FUSE_LAYERS) inside `pdl.ours()`, the others and an unfused plan's outside."""
    if ON_CPU:
        pytest.skip("needs CUDA")
    from conftest import random_model
    from test_engine import tok

    from cpm4.engine import cuda_graph
    from cpm4.engine.paged import PagedKVCache
    from cpm4.engine.scheduler import LLMEngine
    from cpm4.kernels import gemv as gemv_module

    monkeypatch.setattr(gemv_module, "FUSE_LAYERS", fuse)
    seen = {}
    forward = cuda_graph.DecodeGraphs._forward

    def spy(self, bs, *args, **kw):
        seen.setdefault(bs, set()).add(pdl.inside())
        return forward(self, bs, *args, **kw)

    monkeypatch.setattr(cuda_graph.DecodeGraphs, "_forward", spy)
    model = random_model("tiny", dtype=torch.float32, sparse_config=None).to("cuda", torch.bfloat16)
    cache = PagedKVCache(model.config, num_pages=40, page_size=16, device="cuda", dtype=torch.bfloat16)
    eng = LLMEngine(model, tok(), cache, max_batch_size=4, chunk_tokens=128, gemv=True)
    eng.graphs.warm_up()
    assert seen == {1: {fuse}, 2: {False}, 4: {False}}
    assert not pdl.inside()
