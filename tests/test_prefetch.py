"""The L2 prefetch (cpm4/kernels/prefetch): the kernel's reading mode under Triton's interpreter against
`word_sum` (every word read once, by the program the stride assigns it), the other modes built for sm_80/sm_90,
the plan of weights a layer prefetches, and the engine's decode steps forking and joining it around each layer's
attention without changing a token (on the CPU with the fork spied on; on CUDA for real, graphs captured)."""

from __future__ import annotations

import os

import pytest
import torch

from cpm4.kernels import prefetch as pf
from cpm4.kernels.prefetch import word_sum

triton = pytest.importorskip("triton")
ON_CPU = not torch.cuda.is_available()
needs_kernels = pytest.mark.skipif(ON_CPU and os.environ.get("TRITON_INTERPRET") != "1",
                                   reason="needs CUDA or TRITON_INTERPRET=1")


def _words(n: int, dtype=torch.bfloat16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + n)
    t = torch.randint(-2**15, 2**15, (n,), dtype=torch.int32, generator=g).to(torch.int16).view(torch.bfloat16)
    return t.view(dtype) if dtype != torch.bfloat16 else t


@needs_kernels
@pytest.mark.parametrize("n,programs", [(1, 1), (127, 1), (129, 3), (1000, 7), (4096, 4)])
def test_load_mode_reads_every_word_once(n, programs):
    """mode 'load' with check: each program's int32 sum is that of the LOAD_BLOCK-word blocks the stride gives
    it (block b to program b % programs), so the whole range is read, each word once."""
    from cpm4.kernels.prefetch.triton_prefetch import LOAD_BLOCK, prefetch

    dev = "cpu" if ON_CPU else "cuda"
    t = _words(n * LOAD_BLOCK // 128).to(dev)  # the same number of blocks at any LOAD_BLOCK
    sink = prefetch(t, mode="load", programs=programs, check=True)
    words = t.view(torch.int16).to(torch.int64).cpu()
    want = [0] * programs
    for b in range(0, t.numel(), LOAD_BLOCK):
        want[(b // LOAD_BLOCK) % programs] += int(words[b:b + LOAD_BLOCK].sum())
    got = [int(v) % 2**32 for v in sink.cpu().to(torch.int64)]
    assert got == [w % 2**32 for w in want]
    assert sum(got) % 2**32 == word_sum(t)


@needs_kernels
def test_load_mode_partial_and_wider_dtypes():
    """n_bytes: only that prefix is read; a float32 tensor is read as its 16-bit words."""
    from cpm4.kernels.prefetch.triton_prefetch import prefetch

    dev = "cpu" if ON_CPU else "cuda"
    t = _words(600).to(dev)
    sink = prefetch(t, mode="load", programs=2, n_bytes=2 * 333, check=True)
    assert int(sink.to(torch.int64).sum()) % 2**32 == word_sum(t, 333) != word_sum(t)
    f = torch.randn(77, generator=torch.Generator().manual_seed(1)).to(dev)
    sink = prefetch(f, mode="load", programs=3, check=True)
    assert int(sink.to(torch.int64).sum()) % 2**32 == word_sum(f)


def test_prefetch_errors():
    from cpm4.kernels.prefetch.triton_prefetch import prefetch

    t = torch.zeros(64, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="mode must be one of"):
        prefetch(t, mode="nope")
    with pytest.raises(ValueError, match="contiguous"):
        prefetch(torch.zeros(8, 8, dtype=torch.bfloat16).T)
    with pytest.raises(ValueError, match="even count"):
        prefetch(t, n_bytes=3)
    with pytest.raises(ValueError, match="even count"):
        prefetch(t, n_bytes=2 * 65)
    with pytest.raises(ValueError, match="16-byte"):
        prefetch(t, mode="bulk", n_bytes=18)
    with pytest.raises(ValueError, match="'load' only"):
        prefetch(t, mode="line", check=True)


def test_plan_for_fills_the_budget_in_reading_order():
    a = torch.zeros(1024, dtype=torch.bfloat16)  # 2 KB
    b = torch.zeros(8192, dtype=torch.bfloat16)  # 16 KB
    c = torch.zeros(8192, dtype=torch.bfloat16)
    plan = pf.plan_for([a, b, c], budget=2048 + 16384 + 5000)
    assert [(w is x, n) for (w, n), x in zip(plan, (a, b, c))] == [(True, 2048), (True, 16384), (True, 4992)]
    assert pf.plan_for([a, b], budget=10**9) == [(a, 2048), (b, 16384)]
    # a weight that is no plain tensor (a quantized module) ends the plan; so does a budget under 4 KB left
    assert pf.plan_for([b, torch.nn.Linear(2, 2), c], budget=10**9) == [(b, 16384)]
    assert [n for _, n in pf.plan_for([b, c], budget=16384 + 4000)] == [16384]
    assert pf.plan_for([torch.zeros(8, 8).T], budget=10**9) == []


def test_fork_is_a_no_op_off_cuda_and_without_a_mode():
    plan = [(torch.zeros(4096, dtype=torch.bfloat16), 8192)]
    assert pf.fork(plan, "line") is False  # CPU tensors
    assert pf.fork([], "line") is False
    assert pf.fork(plan, None) is False


def test_layer_weights_after_attention():
    from conftest import random_model

    model = random_model("tiny", dtype=torch.float32, sparse_config=None)
    layer = model.model.layers[0]
    got = layer.weights_after_attention()
    want = [layer.self_attn.o_proj.weight, layer.mlp.gate_proj.weight, layer.mlp.up_proj.weight,
            layer.mlp.down_proj.weight]
    assert len(got) == 4 and all(g is w for g, w in zip(got, want))
    model.fuse_projections()
    got = layer.weights_after_attention()
    assert [g is w for g, w in zip(got, [layer.self_attn.o_proj.weight, layer.mlp.gate_up,
                                         layer.mlp.down_proj.weight])] == [True] * 3


def test_engine_forks_and_joins_around_each_layers_attention(monkeypatch):
    """Paged decode steps (CPU, interpreter) with a plan in the cache: one fork with that layer's plan and one
    join per layer and step, and the tokens of the engine without it."""
    pytest.importorskip("triton")
    if not ON_CPU:
        pytest.skip("the spied fork: CPU only (test_engine_prefetch_on_cuda runs it for real)")
    from conftest import random_model
    from test_engine import tok

    from cpm4.engine.paged import PagedKVCache
    from cpm4.engine.sampling import SamplingParams
    from cpm4.engine.scheduler import LLMEngine

    model = random_model("tiny", dtype=torch.float32, sparse_config=None, num_hidden_layers=2)
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    prompts = [list(range(7, 30)), list(range(40, 52))]
    calls = []
    monkeypatch.setattr(pf, "fork", lambda plan, mode: calls.append(("fork", plan, mode)) or True)
    monkeypatch.setattr(pf, "join", lambda device: calls.append(("join", device)))
    out = {}
    for on in (False, True):
        cache = PagedKVCache(model.config, num_pages=40, page_size=16)
        eng = LLMEngine(model, tok(), cache, max_batch_size=2, chunk_tokens=32, paged_decode=True)
        eng.set_l2_prefetch("line")
        assert cache.l2_prefetch is None  # off CUDA
        plans = [pf.plan_for(layer.weights_after_attention(), 10**9) for layer in model.model.layers]
        if on:
            cache.l2_prefetch = ("line", plans)
        for i, p in enumerate(prompts):
            eng.add_request(f"r{i}", p, params)
        out[on] = {k: v[1] for k, v in eng.run_to_completion().items()}
        if not on:
            assert calls == []
    assert out[True] == out[False]
    forks = [c for c in calls if c[0] == "fork"]
    assert len(forks) >= 2 * 4 and len(forks) % 2 == 0  # two layers, at least four decode steps
    assert [c[0] for c in calls] == ["fork", "join"] * len(forks)
    for i, (_, plan, mode) in enumerate(forks):
        assert mode == "line" and plan is plans[i % 2]


@pytest.mark.skipif(not ON_CPU or os.environ.get("TRITON_INTERPRET") != "1", reason="CPU-only build check")
def test_prefetch_modes_build_for_sm80_and_sm90():
    """The reading mode from its interpreted launch; the line prefetch (sm_80+) and the bulk one (sm_90) built
    from the same kernel with their constexprs (the interpreter cannot run inline PTX)."""
    import cuda_build

    if not cuda_build.available():
        pytest.skip("no bundled ptxas")
    from cpm4.kernels.prefetch import triton_prefetch as tp

    with cuda_build.capture() as launches:
        tp.prefetch(_words(300), mode="load", programs=2)
    assert cuda_build.build(launches) == ["_prefetch_kernel"]
    fn, sig, consts, options = launches[0]
    line = [(fn, sig, {**consts, "MODE": 1, "CHECK": False}, options)]
    bulk = [(fn, sig, {**consts, "MODE": 2, "CHECK": False}, options)]
    assert cuda_build.build(line) == ["_prefetch_kernel"]
    assert cuda_build.build(bulk, archs=(90,)) == ["_prefetch_kernel"]


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["load", "line", "bulk"])
def test_modes_on_cuda(mode):
    """Each mode runs on the device (bulk on sm_90+); the reading one's check as on the CPU."""
    from cpm4.kernels.prefetch.triton_prefetch import prefetch

    if ON_CPU:
        pytest.skip("needs CUDA")
    if mode == "bulk" and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("bulk prefetch: sm_90+")
    t = _words(3 << 20).cuda()
    sink = prefetch(t, mode=mode, programs=32, check=mode == "load")
    torch.cuda.synchronize()
    if mode == "load":
        assert int(sink.to(torch.int64).sum()) % 2**32 == word_sum(t)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["line", "bulk"])
def test_engine_prefetch_on_cuda(mode):
    """LLMEngine with the prefetch set, compiled decode graphs (the fork and join captured as a branch): greedy
    tokens as without it, one request at a time and three together."""
    from conftest import alone_then_together, random_model
    from test_engine import tok

    from cpm4.engine.paged import PagedKVCache
    from cpm4.engine.sampling import SamplingParams
    from cpm4.engine.scheduler import LLMEngine

    if ON_CPU:
        pytest.skip("needs CUDA")
    if mode == "bulk" and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("bulk prefetch: sm_90+")
    model = random_model("tiny", dtype=torch.float32, sparse_config=None).to("cuda", torch.bfloat16)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    prompts = [list(range(5 + 3 * i, 60 + 7 * i)) for i in range(3)]
    out = {}
    for on in (False, True):
        cache = PagedKVCache(model.config, num_pages=100, page_size=16, device="cuda", dtype=torch.bfloat16)
        eng = LLMEngine(model, tok(), cache, max_batch_size=4, chunk_tokens=128, compile=True)
        eng.set_l2_prefetch(mode if on else None)
        assert (cache.l2_prefetch is not None) == on
        if on:  # the tiny model's layer fits: all of it planned
            assert [len(p) for p in cache.l2_prefetch[1]] == [3] * model.config.num_hidden_layers
        out[on] = alone_then_together(eng, prompts, params)
    assert out[True] == out[False]
