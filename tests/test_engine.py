"""Continuous batching over the paged KV cache: outputs equal each request run alone, whatever the
arrival order, chunking, preemption or prefix sharing."""

import contextlib
import functools
import gc
import random

import pytest
import torch
from conftest import random_model

from cpm4 import SamplingParams
from cpm4.engine.generate import GenerationOutput, generate_ids
from cpm4.engine.paged import OutOfPages, PagedKVCache, SeqPages
from cpm4.engine.scheduler import LLMEngine
from cpm4.model.tokenizer import build_tokenizer


@functools.cache
def tok():
    return build_tokenizer(1024)


def sparse(dense_len=96):
    return {"kernel_size": 8, "kernel_stride": 4, "init_blocks": 1, "block_size": 16, "window_size": 32,
            "topk": 2, "dense_len": dense_len, "variant": "gen-b"}


def prompts(n, seed=0, lo=3, hi=150):
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(lo, hi, (n,), generator=g).tolist()
    return [torch.randint(3, 1000, (k,), generator=g).tolist() for k in lens]


def alone(model, p, params):
    # The plain generate loop (`cpm4.generate` itself now runs this engine).
    return generate_ids(model, tok(), [p], [params])[0].token_ids


def run_burst(eng, ps, params) -> dict:
    """Every prompt queued at once (request ids r0, r1, ...), run to the end: the engine's results."""
    for i, p in enumerate(ps):
        eng.add_request(f"r{i}", p, params)
    return eng.run_to_completion()


def assert_each_alone(res, model, ps, params) -> None:
    """Each request's tokens in `res` (`run_burst`'s) are those of the request alone."""
    for i, p in enumerate(ps):
        assert res[f"r{i}"][1] == alone(model, p, params), i


@pytest.mark.parametrize("sc", [None, sparse()])
def test_staggered_arrivals_equal_alone(sc):
    model = random_model("tiny", dtype=torch.float32, sparse_config=sc)
    cache = PagedKVCache(model.config, num_pages=200, page_size=16)
    eng = LLMEngine(model, tok(), cache, max_batch_size=4, chunk_tokens=40)
    ps = prompts(7)
    params = [SamplingParams(temperature=0, max_tokens=6 + i, ignore_eos=True) for i in range(7)]
    results = {}
    pending = list(enumerate(ps))
    step = 0
    while pending or eng.has_work():
        if pending and step % 2 == 0:  # a new request every other step
            i, p = pending.pop(0)
            eng.add_request(f"r{i}", p, params[i])
        for rid, d in eng.step():
            results.setdefault(rid, []).extend(d.token_ids)
        step += 1
    for i, p in enumerate(ps):
        assert results[f"r{i}"] == alone(model, p, params[i]), i
    assert cache.num_free == cache.num_pages  # everything freed (prefix pages are reclaimable)


def test_preemption_keeps_outputs():
    model = random_model("tiny", dtype=torch.float32)
    cache = PagedKVCache(model.config, num_pages=14, page_size=16)  # too small for all at once
    eng = LLMEngine(model, tok(), cache, max_batch_size=8, chunk_tokens=64)
    ps = prompts(5, seed=1, lo=20, hi=60)
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    for i, p in enumerate(ps):
        eng.add_request(f"r{i}", p, params)
    res = eng.run_to_completion()
    assert eng.num_preempted > 0
    for i, p in enumerate(ps):
        assert res[f"r{i}"][1] == alone(model, p, params) and res[f"r{i}"][2] == "length"


def test_engine_fuses_projections_on_any_device():
    """The engine runs q/k/v and gate/up as one GEMM each on the CPU too (fewer op dispatches); its tokens are
    those of the model before fusing."""
    model = random_model("tiny", dtype=torch.float32)
    p = prompts(1, seed=3, lo=20, hi=21)[0]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    want = alone(model, p, params)
    assert model.model.layers[0].self_attn.qkv is None
    eng = LLMEngine(model, tok(), PagedKVCache(model.config, num_pages=8, page_size=16))
    assert all(layer.self_attn.qkv is not None and layer.mlp.gate_up is not None for layer in model.model.layers)
    eng.add_request("r", p, params)
    assert eng.run_to_completion()["r"][1] == want


def test_token_slice_is_a_slice_of_the_tokens():
    """What a step feeds a request (a prompt chunk, a resumed request's prompt and output) without joining them."""
    from types import SimpleNamespace

    from cpm4.engine.scheduler import EngineRequest

    req = EngineRequest("r", [11, 12, 13], SimpleNamespace(generated=[14, 15]))
    for a in range(6):
        for b in range(a, 6):
            assert req.token_slice(a, b) == req.tokens[a:b], (a, b)


def test_prefix_pages_are_shared():
    model = random_model("tiny", dtype=torch.float32)
    cache = PagedKVCache(model.config, num_pages=64, page_size=16)
    eng = LLMEngine(model, tok(), cache, max_batch_size=4)
    base = prompts(1, seed=2, lo=100, hi=101)[0]
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    eng.add_request("a", base + [5, 6], params)
    eng.run_to_completion()
    eng.add_request("b", base + [7, 8, 9], params)
    req = eng.by_id["b"]
    first = [t for _, d in eng.step() for t in d.token_ids]
    # 100 shared tokens: a's 6 full pages (the prefix table's only entries) reused
    assert len(cache.prefix) == 6 and set(req.pages.pages[:6]) == set(cache.prefix.values())
    res = eng.run_to_completion()
    assert first + res["b"][1] == alone(model, base + [7, 8, 9], params)


def test_a_prompt_page_is_hashed_once(monkeypatch):
    """Admission hashes a prompt's whole pages for the prefix lookup; marking them computing and publishing them
    after the prefill reuse those keys (a burst of 32 prompts of 16K tokens is 8,000 pages to hash)."""
    model = random_model("tiny", dtype=torch.float32)
    p = prompts(1, seed=5, lo=100, hi=101)[0]  # 6 whole pages (16 tokens each) to look up, publish the same 6
    cache = PagedKVCache(model.config, num_pages=64, page_size=16)
    calls = []
    real = PagedKVCache._chain
    monkeypatch.setattr(PagedKVCache, "_chain", staticmethod(lambda *a: calls.append(1) or real(*a)))
    eng = LLMEngine(model, tok(), cache, max_batch_size=4)
    eng.add_request("a", p, SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    eng.run_to_completion()
    assert len(calls) == 6 and len(cache.prefix) == 6
    assert set(cache.prefix) == set(cache.chain(p, 6))  # the keys a later lookup computes


def test_prefix_keys_from_recent_chains_equal_hashing():
    """Keys taken from a recent chain (`PagedKVCache._recall`: prompts compared as int64 ids) are the keys hashing
    every page gives: prompts off a few shared bases diverging anywhere (first page, a page boundary, mid-page),
    both attention modes, ids covering all the tokens or only the first ones, known leading keys."""
    import numpy as np

    model = random_model("tiny", dtype=torch.float32)
    cache = PagedKVCache(model.config, num_pages=8, page_size=16)  # the memo's cache
    fresh = PagedKVCache(model.config, num_pages=8, page_size=16)  # hashes every page (no ids: no memo)
    g = torch.Generator().manual_seed(31)
    bases = [torch.randint(3, 1000, (300,), generator=g).tolist() for _ in range(3)]
    recalled = 0
    for case in range(200):
        base = bases[int(torch.randint(0, 3, (1,), generator=g))]
        cut = int(torch.randint(0, 300, (1,), generator=g))
        tail = torch.randint(3, 1000, (int(torch.randint(0, 80, (1,), generator=g)),), generator=g).tolist()
        tokens = base[:cut] + tail
        if len(tokens) < 2:
            continue
        sparse = bool(case % 3 == 0)
        n_ids = len(tokens) if case % 4 else int(torch.randint(0, len(tokens) + 1, (1,), generator=g))
        ids = np.asarray(tokens[:n_ids], dtype=np.int64)
        want = fresh.chain(tokens, (len(tokens) - 1) // 16, sparse)
        before = len(cache._recent)
        got = cache.lookup_chain(tokens, sparse, ids)
        assert got == want, case
        k = int(torch.randint(0, len(want) + 1, (1,), generator=g))
        assert cache.chain(tokens, len(want), sparse, known=want[:k], ids=ids) == want, case
        recalled += before > 0
    assert recalled > 150 and len(cache._recent) <= PagedKVCache._RECENT


def test_a_burst_sharing_a_prefix_hashes_it_once(monkeypatch):
    """Eight requests with one 10-page prefix and their own 40 tokens: the prefix's pages are hashed for the first
    request only; each later one hashes its own 2 whole pages (96 hashes before: 12 a request). Outputs as alone."""
    model = random_model("tiny", dtype=torch.float32)
    cache = PagedKVCache(model.config, num_pages=128, page_size=16)
    calls = []
    real = PagedKVCache._chain
    monkeypatch.setattr(PagedKVCache, "_chain", staticmethod(lambda *a: calls.append(1) or real(*a)))
    prefix = prompts(1, seed=32, lo=160, hi=161)[0]
    ps = [prefix + p for p in prompts(8, seed=33, lo=40, hi=41)]
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    eng = LLMEngine(model, tok(), cache, max_batch_size=8)
    for i, p in enumerate(ps):
        eng.add_request(f"r{i}", p, params)
    res = eng.run_to_completion()
    assert len(calls) == 12 + 7 * 2
    monkeypatch.setattr(PagedKVCache, "_chain", real)
    for i, p in enumerate(ps[:3]):
        assert res[f"r{i}"][1] == alone(model, p, params), i

def test_abort_frees_pages_at_once_and_others_continue():
    model = random_model("tiny", dtype=torch.float32)
    cache = PagedKVCache(model.config, num_pages=64, page_size=16)
    eng = LLMEngine(model, tok(), cache)
    ps = prompts(2, seed=3)
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    eng.add_request("x", ps[0], params)
    eng.add_request("y", ps[1], params)
    out = {}
    for _ in range(3):
        for rid, d in eng.step():
            out.setdefault(rid, []).extend(d.token_ids)
    held = cache.num_pages - cache.num_free
    eng.abort("x")
    deltas = eng.step()
    assert ("x", "abort") in [(rid, d.finish_reason) for rid, d in deltas]
    assert cache.num_pages - cache.num_free < held
    for rid, d in deltas + [x for _ in range(40) for x in eng.step()]:
        out.setdefault(rid, []).extend(d.token_ids)
    assert out["y"] == alone(model, ps[1], params)


def test_cache_budget_and_errors():
    model = random_model("tiny", dtype=torch.float32)
    cfg = model.config
    sc = cfg.sparse_config  # blocks of 16, kernel strides 4 (fine) and 16 (coarse)
    # Per page and layer: K and V (2 x 16 rows), 16 / 4 fine and 16 / 16 coarse kernel keys; float32.
    per_page = (2 * 16 + 16 // sc.kernel_stride + 16 // sc.coarse_kernel_stride) * cfg.num_hidden_layers \
        * cfg.num_key_value_heads * cfg.dim_head * 4
    cache = PagedKVCache.from_budget(cfg, 11 * per_page + 5, page_size=16)
    assert cache.num_pages == 10 and cache.k[0].shape[0] == 11  # plus the scratch page
    assert cache.fine[0].shape[:2] == (11, 4) and cache.coarse[0].shape[:2] == (11, 1)
    with pytest.raises(ValueError, match="below two pages"):
        PagedKVCache.from_budget(cfg, 2 * per_page - 1, page_size=16)
    with pytest.raises(ValueError, match="pages of one block"):
        PagedKVCache(cfg, num_pages=4, page_size=64)
    cache = PagedKVCache(cfg, num_pages=2, page_size=16)
    eng = LLMEngine(model, tok(), cache)
    with pytest.raises(ValueError, match="does not fit the KV cache"):
        eng.add_request("big", list(range(3, 60)), SamplingParams())
    eng.add_request("a", [5, 6, 7], SamplingParams(max_tokens=100, ignore_eos=True, temperature=0))
    with pytest.raises(ValueError, match="already in use"):
        eng.add_request("a", [5], SamplingParams())
    res = eng.run_to_completion()  # runs out of pages alone: ends with "length", nothing crashes
    # 32 slots hold the 3 prompt tokens and 29 outputs; the 30th output needs no slot until it is fed.
    assert res["a"][2] == "length" and len(res["a"][1]) == 32 - 3 + 1
    with pytest.raises(OutOfPages):
        s, _ = cache.new_sequence([1, 2, 3])
        cache.reserve(s, 100)


def test_kv_budget_leaves_room_for_the_prefill_graphs():
    """The KV budget: utilization of the device less what is in use, one chunk's activation peak and the prefill
    graphs' pool (that peak scaled to their capture limit); nothing left is an error that names the parts."""
    from cpm4.engine.paged import budget_left

    gib = 2**30
    # 0.9 of 100 GiB, 10 GiB in use, a 4 GiB peak for 8,192 tokens, graphs to 2,048 tokens: 1 GiB more
    assert budget_left(0.9, 90 * gib, 100 * gib, 4 * gib, 8192, 2048) == (90 - 10 - 4 - 1) * gib
    assert budget_left(0.9, 90 * gib, 100 * gib, 4 * gib, 8192) == (90 - 10 - 4) * gib
    with pytest.raises(ValueError, match=r"gpu_memory_utilization 0.15: 10.0 GiB in use of 100.0 GiB, 4.00 GiB "
                                         r"needed for a 8192-token prefill chunk and 4.00 GiB for the prefill graphs"):
        budget_left(0.15, 90 * gib, 100 * gib, 4 * gib, 8192, 8192)
    with pytest.raises(ValueError, match="prefill chunk$"):
        budget_left(0.1, 90 * gib, 100 * gib, 4 * gib, 8192)


def test_elementwise_choice():
    """LLMEngine(elementwise=...) sets how every layer runs its element-wise ops; the CPU default leaves them."""
    from cpm4.model import fused

    model = random_model("tiny", dtype=torch.float32)
    cache = PagedKVCache(model.config, num_pages=8, page_size=16)
    LLMEngine(model, tok(), cache)
    assert all(m.ops is fused.EAGER for m in model.modules() if hasattr(m, "ops"))
    pytest.importorskip("triton")
    from cpm4.kernels.elementwise import triton_ops

    LLMEngine(model, tok(), cache, elementwise="triton")
    assert model.model.layers[1].self_attn.ops is triton_ops() and model.model.norm.ops is triton_ops()
    LLMEngine(model, tok(), cache, elementwise="eager")
    assert model.model.layers[1].self_attn.ops is fused.EAGER
    with pytest.raises(ValueError, match="elementwise must be 'inductor', 'triton' or 'eager', not 'fast'"):
        LLMEngine(model, tok(), cache, elementwise="fast")


@pytest.mark.gpu
@pytest.mark.parametrize("graphs", [True, False, "compile", "async", "async-pinned"])
@pytest.mark.parametrize("sc", [None, sparse()])
def test_gpu_scheduler_matches_generate_on_cuda(graphs, sc, monkeypatch):
    """The paged cache and scheduler on a CUDA model (bf16): prefill chunks through the gathering path,
    decode steps on the pages in place (dense, or InfLLM v2 past dense_len), eager or from CUDA graphs."""
    from cpm4.model import MiniCPM4ForCausalLM

    base = random_model("tiny", dtype=torch.float32, sparse_config=sc)
    model = MiniCPM4ForCausalLM(base.config).to("cuda", torch.bfloat16)
    model.load_state_dict({k: v.to(torch.bfloat16) for k, v in base.state_dict().items()})
    cache = PagedKVCache(model.config, num_pages=200, page_size=16, device="cuda", dtype=torch.bfloat16)
    if graphs == "async-pinned":  # inputs copied from pinned, double-buffered host tensors
        from cpm4.engine import cuda_graph

        monkeypatch.setattr(cuda_graph, "PINNED_INPUTS", True)
    eng = LLMEngine(model, tok(), cache, max_batch_size=4, chunk_tokens=64, cuda_graphs=bool(graphs),
                    compile=graphs == "compile", async_output=str(graphs).startswith("async"))
    assert (eng.graphs is not None and eng.graphs._staging is not None) == (graphs == "async-pinned")
    from cpm4.kernels.elementwise import triton_ops  # the engine's default on CUDA, compiled or not

    assert model.model.layers[0].mlp.ops is triton_ops()
    assert eng.paged_decode and (eng.graphs is not None) == bool(graphs)
    if graphs == "compile":  # every bucket and the fused prefill ops compiled up front, no page kept
        free = cache.num_free
        eng.warm_up()
        assert cache.num_free == free
    ps = prompts(6, seed=4, lo=20, hi=150)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    for i, p in enumerate(ps):
        eng.add_request(f"r{i}", p, params)
    res = eng.run_to_completion()
    refs = [alone(model, p, params) for p in ps]
    assert all(res[f"r{i}"][1][0] == r[0] for i, r in enumerate(refs))  # from the prefill, not compiled
    agree = sum(res[f"r{i}"][1] == r for i, r in enumerate(refs))
    # bf16: a near-tie may flip one sequence's greedy path under another batch shape; the compiled step also
    # rounds differently (fused norms keep float32 where eager rounds to bf16), so flips are more frequent.
    assert agree >= (3 if graphs == "compile" else 5)


def test_paged_decode_kernels_with_the_other_decode_variants(monkeypatch):
    """The engine's InfLLM v2 decode with the step's other paths (the threshold search over every key value, the
    splits merged by the last one to finish): the tokens of the gathering path."""
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        pytest.skip("interpreter test: runs on CPU only")
    from cpm4.kernels.infllm_v2 import triton_decode, triton_select

    monkeypatch.setattr(triton_decode, "SEPARATE_MERGE", False)
    monkeypatch.setattr(triton_select, "SELECT_NARROW", False)
    test_paged_decode_kernels_equal_alone(sparse(dense_len=40), max_tokens=6)  # fewer steps: the paths, not lengths


@pytest.mark.parametrize("rows,peel", [(1 << 30, False), (1 << 30, True), (0, False), (1, False)])
def test_paged_decode_storing_in_the_attention_launch(monkeypatch, rows, peel):
    """The dense paged decode with the new keys/values stored by the attention launch (steps of up to
    FUSE_DENSE_STORE_ROWS rows; the current token swapped into its tile or, STORE_PEEL, added apart) and by a
    launch of its own (larger steps): the tokens of the gathering path whichever way each step stores (rows=1:
    the prompts alone one way, together the other)."""
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        pytest.skip("interpreter test: runs on CPU only")
    from cpm4.kernels.infllm_v2 import triton_decode

    monkeypatch.setattr(triton_decode, "FUSE_DENSE_STORE_ROWS", rows)
    monkeypatch.setattr(triton_decode, "STORE_PEEL", peel)
    calls = []
    orig = triton_decode.append_kv
    monkeypatch.setattr(triton_decode, "append_kv", lambda *a, **k: calls.append(a[0].shape[0]) or orig(*a, **k))
    test_paged_decode_kernels_equal_alone(None, max_tokens=6)
    assert all(b > rows for b in calls)  # a separate store launch only for steps above the limit
    assert (calls == []) == (rows == 1 << 30)


def test_sparse_decode_with_the_token_peeled_equals_alone(monkeypatch):
    """STORE_PEEL in the InfLLM v2 step (the key the new token completes scored after the log-sum-exp launch's
    loop): the engine's tokens those of the gathering path, rows crossing dense_len included."""
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        pytest.skip("interpreter test: runs on CPU only")
    from cpm4.kernels.infllm_v2 import triton_decode

    monkeypatch.setattr(triton_decode, "STORE_PEEL", True)
    test_paged_decode_kernels_equal_alone(sparse(dense_len=40), max_tokens=6)


@pytest.mark.slow
def test_dense_steps_of_a_sparse_model_equal_its_sparse_steps():
    """An InfLLM v2 model's decode steps whose rows are all below dense_len through the dense paged decode
    (`paged.dense_step`: the store and the kernel-key pooling inside the attention launch): the same tokens, and
    the same kernel keys pooled (the sparse steps past dense_len later read them), as its sparse step."""
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        pytest.skip("interpreter test: runs on CPU only")
    from cpm4.engine import paged

    model = random_model("tiny", dtype=torch.float32, sparse_config=sparse(dense_len=90), num_hidden_layers=2)
    ps = prompts(2, seed=7, lo=30, hi=60)  # with 12 tokens each, below 90 throughout
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    out, keys = {}, {}
    for dense in (False, True):
        cache = PagedKVCache(model.config, num_pages=40, page_size=16)
        eng = LLMEngine(model, tok(), cache, max_batch_size=2, chunk_tokens=64, paged_decode=True)
        for i, p in enumerate(ps):
            eng.add_request(f"r{i}", p, params)
        with paged.dense_step() if dense else contextlib.nullcontext():
            res = eng.run_to_completion()
        out[dense] = {k: v[1] for k, v in res.items()}
        keys[dense] = [f.clone() for f in cache.fine] + [c.clone() for c in cache.coarse or []]
    assert out[True] == out[False]
    for a, b in zip(keys[True], keys[False]):  # (layer 1's keys within float32 rounding: its input went through
        # layer 0's attention in another kernel order)
        torch.testing.assert_close(a.nan_to_num(7.0), b.nan_to_num(7.0), rtol=1e-5, atol=1e-6)
    assert not all(torch.equal(k, torch.zeros_like(k)) for k in keys[True])


@pytest.mark.gpu
def test_dense_step_graphs_on_cuda(monkeypatch):
    """`paged.DENSE_STEPS` on the GPU: an InfLLM v2 model's compiled decode graphs with the dense variant for the
    steps below dense_len, requests crossing it mid-decode: the greedy tokens of the sparse steps throughout."""
    from conftest import alone_then_together

    from cpm4.engine import paged

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    model = random_model("tiny", dtype=torch.float32, sparse_config=sparse(dense_len=72)).to("cuda", torch.bfloat16)
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    ps = [list(range(5 + 3 * i, 50 + 8 * i)) for i in range(3)]  # 45-61 tokens: each crosses 72 while decoding
    out = {}
    for on in (False, True):
        monkeypatch.setattr(paged, "DENSE_STEPS", on)
        cache = PagedKVCache(model.config, num_pages=100, page_size=16, device="cuda", dtype=torch.bfloat16)
        eng = LLMEngine(model, tok(), cache, max_batch_size=4, chunk_tokens=128, compile=True)
        out[on] = alone_then_together(eng, ps, params)
        assert bool(eng.graphs.dense_graphs) == on
    same = sum(out[True][k] == out[False][k] for k in out[False])
    assert same >= len(out[False]) - 1  # bf16: a near tie may break the other way in one request


def test_graphs_replay_the_dense_variant_only_below_dense_len(monkeypatch):
    """`DecodeGraphs.run` (host side, without a GPU) with `paged.DENSE_STEPS`: a step whose rows are all below an
    InfLLM v2 model's dense_len replays its bucket's dense graph (captured on first use), any other step the
    plain one; off, never the dense one."""
    from cpm4.engine import paged
    from cpm4.engine.cuda_graph import DecodeGraphs
    from cpm4.engine.paged import SeqPages

    model = random_model("tiny", dtype=torch.float32, sparse_config=sparse(dense_len=40), num_hidden_layers=1)
    cache = PagedKVCache(model.config, num_pages=60, page_size=16)
    seqs = [SeqPages() for _ in range(3)]
    for s, n in zip(seqs, (20, 30, 38)):
        cache.reserve(s, 60)
        s.length = n
    replayed, captured = [], []

    class Graph:
        def __init__(self, name):
            self.name = name

        def replay(self):
            replayed.append(self.name)

    def capture(bs, cascade=False, dense=False):
        captured.append((bs, dense))
        return Graph("dense" if dense else "plain"), torch.zeros(bs, 5)

    for on in (True, False):
        monkeypatch.setattr(paged, "DENSE_STEPS", on)
        graphs = DecodeGraphs.__new__(DecodeGraphs)
        graphs.init_buffers(cache, 4, 8, torch.device("cpu"))
        graphs.shared = None  # no cascade here
        graphs.model = graphs.step = None  # (uncompiled)
        replayed.clear()
        captured.clear()
        graphs._capture = capture
        graphs.run([1, 2, 3], seqs)  # 21, 31, 39 tokens with the current ones: all below 40
        seqs[2].length = 39
        graphs.run([1, 2, 3], seqs)  # the third row reaches 40: sparse
        graphs.run([1, 2], seqs[:2])
        seqs[2].length = 38
        if on:  # (two rows: bucket 2, its plain graph captured first as ever)
            assert replayed == ["dense", "plain", "dense"]
            assert captured == [(4, False), (4, True), (2, False), (2, True)]
        else:
            assert replayed == ["plain"] * 3 and captured == [(4, False), (2, False)]


@pytest.mark.slow
@pytest.mark.parametrize("sc", [None, sparse(dense_len=40)])
def test_paged_decode_kernels_equal_alone(sc, max_tokens=12):
    """Decode steps attending on the pages in place (the Triton kernels; on the CPU in the interpreter),
    with kernel keys pooled on the device as pages fill, give the tokens of the gathering path."""
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        pytest.skip("interpreter test: runs on CPU only")
    model = random_model("tiny", dtype=torch.float32, sparse_config=sc, num_hidden_layers=2)
    cache = PagedKVCache(model.config, num_pages=60, page_size=16)
    eng = LLMEngine(model, tok(), cache, max_batch_size=3, chunk_tokens=32, paged_decode=True)
    assert eng.graphs is None
    ps = prompts(3, seed=5, lo=20, hi=70)
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    for i, p in enumerate(ps):
        eng.add_request(f"r{i}", p, params)
    res = eng.run_to_completion()
    for i, p in enumerate(ps):
        assert res[f"r{i}"][1] == alone(model, p, params), i


@pytest.mark.parametrize("sc", [None, sparse(dense_len=40)])
def test_compiled_decode_step_is_one_graph(sc):
    """With the paged attention as one custom op, torch.compile traces the whole decode step as one graph
    (no break, no recompilation per layer) and computes what the eager step does."""
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        pytest.skip("interpreter test: runs on CPU only")
    model = random_model("tiny", dtype=torch.float32, sparse_config=sc, num_hidden_layers=2)
    cache = PagedKVCache(model.config, num_pages=20, page_size=16)
    eng = LLMEngine(model, tok(), cache, max_batch_size=2, chunk_tokens=128, paged_decode=True)
    for i, p in enumerate(prompts(2, seed=6, lo=45, hi=60)):
        eng.add_request(f"r{i}", p, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    compiled_decode_matches_eager(model, cache, eng)


@pytest.mark.slow
def test_compiled_graph_step_compiles_once_for_every_bucket_past_one(monkeypatch):
    """The graphs' compiled step (`DecodeGraphs._forward`, built without a GPU here) with `DYNAMIC_BATCH`: one
    compilation for batch 1 and one for all the others (from DYNAMIC_FROM, 2), the eager step's logits at each;
    off, one per bucket (what made a compiled warm-up of 15 buckets take minutes)."""
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        pytest.skip("interpreter test: runs on CPU only")
    from torch._dynamo.testing import CompileCounterWithBackend

    from cpm4.engine import cuda_graph, paged
    from cpm4.engine.cuda_graph import DecodeGraphs
    from cpm4.engine.paged import DecodeBatch, decode_inputs

    model = random_model("tiny", dtype=torch.float32, sparse_config=sparse(dense_len=40), num_hidden_layers=1)
    cache = PagedKVCache(model.config, num_pages=60, page_size=16)
    seqs = [SeqPages() for _ in range(8)]
    for i, s in enumerate(seqs):  # rows dense (< 40 tokens) and sparse, as a batch mixes them
        cache.reserve(s, 30 + 6 * i + 1)
        s.length = 30 + 6 * i
    graphs = DecodeGraphs.__new__(DecodeGraphs)
    graphs.init_buffers(cache, 8, 8, torch.device("cpu"))
    for dst, src in zip((graphs.table, graphs.starts, graphs.slots, graphs.ends),
                        decode_inputs(cache, seqs, 8, "cpu", rows=8)):
        dst.copy_(src)
    graphs.ids.copy_(torch.randint(3, 1000, (8, 1), generator=torch.Generator().manual_seed(3)))
    paged.make_opaque_to_compile()

    def compilations(sizes, check):
        torch._dynamo.reset()
        cnt = CompileCounterWithBackend("aot_eager")
        graphs.model, graphs.step = model, torch.compile(model, backend=cnt, dynamic=False)
        with torch.inference_mode():
            for bs in sizes:
                out = graphs._forward(bs)
                if check:
                    view = DecodeBatch(cache, graphs.table[:bs], graphs.starts[:bs], graphs.slots[:bs],
                                       graphs.ends[:bs])
                    torch.testing.assert_close(out, model(graphs.ids[:bs], view, graphs.ones[:bs], last_only=True))
        return cnt.frame_count

    assert compilations((1, 2, 8, 4, 6), check=True) == 2
    monkeypatch.setattr(cuda_graph, "DYNAMIC_BATCH", False)
    assert compilations((2, 4, 8), check=False) == 3


def test_decode_graphs_warm_up_captures_the_largest_bucket_first(monkeypatch):
    """warm_up captures the largest bucket first (`WARM_LARGEST_FIRST`): the shared compilation's first launch,
    where inductor picks its kernels' launch configurations for every size, runs at the largest batch; buckets
    already captured are kept."""
    from cpm4.engine import cuda_graph
    from cpm4.engine.cuda_graph import DecodeGraphs

    g = DecodeGraphs.__new__(DecodeGraphs)
    g.sizes, g.graphs, g.cascade_graphs, g.shared = [1, 2, 4, 8], {2: "kept"}, {}, None
    g.dense_graphs, g._dense_len = {}, None
    order = []
    g._reset_inputs = lambda: None
    g._capture = lambda bs, cascade=False, dense=False: order.append(bs) or f"graph {bs}"
    g.warm_up()
    assert order == [8, 4, 1] and g.graphs == {8: "graph 8", 4: "graph 4", 2: "kept", 1: "graph 1"}
    monkeypatch.setattr(cuda_graph, "WARM_LARGEST_FIRST", False)
    g.graphs, order[:] = {}, []
    g.warm_up()
    assert order == [1, 2, 4, 8]


def test_decode_graphs_without_warm_up_tune_at_the_largest_bucket(monkeypatch):
    """A compiled engine that never ran warm_up: the first bucket of the shared compilation it meets is captured
    after the largest one, so the compilation's first launch (inductor's one-time kernel tuning) is at the largest
    batch; later buckets alone. Uncompiled (each bucket its own step), no extra capture."""
    from cpm4.engine import paged
    from cpm4.engine.cuda_graph import DecodeGraphs

    monkeypatch.setattr(paged, "CASCADE_DECODE", False)
    model = random_model("tiny", dtype=torch.float32, sparse_config=None, num_hidden_layers=1)
    cache = PagedKVCache(model.config, num_pages=40, page_size=16)
    seqs = [SeqPages() for _ in range(3)]
    for s in seqs:
        cache.reserve(s, 21)
        s.length = 20

    class Replay:
        def replay(self):
            pass

    def graphs(compiled):
        g = DecodeGraphs.__new__(DecodeGraphs)
        g.init_buffers(cache, 8, 8, torch.device("cpu"))
        g.model, g.step = model, (object() if compiled else model)
        order = []
        g._capture = lambda bs, cascade=False: order.append(bs) or (Replay(), torch.zeros(bs, 4))
        return g, order

    g, order = graphs(True)
    assert g.run([5, 6], seqs[:2]).shape == (2, 4) and order == [8, 2]
    g.run([5, 6, 7], seqs)
    g.run([5], seqs[:1])  # batch 1: its own static compilation
    assert order == [8, 2, 4, 1]
    g, order = graphs(False)
    g.run([5, 6], seqs[:2])
    assert order == [2]


def compiled_decode_matches_eager(model, cache, eng) -> list:
    """After the prefill step of `eng`'s two waiting requests, their decode step compiled (the paged attention
    one custom op) is one graph (no break, no recompilation per layer) and computes the eager step's logits.
    Returns the rows' pages (their lengths not advanced)."""
    from cpm4.engine import paged

    eng.step()  # prefill both; the next token of each is sampled
    assert all(len(r.state.generated) == 1 for r in eng.running)
    seqs = [r.pages for r in eng.running]
    for s in seqs:
        cache.reserve(s, 1)
    ids = torch.tensor([[r.state.generated[-1]] for r in eng.running])
    ones = torch.ones(2, dtype=torch.long)
    with torch.inference_mode():
        ref = model(ids, cache.batch(seqs, decode=True), ones, last_only=True)
        paged.make_opaque_to_compile()
        paged.make_opaque_to_compile()  # idempotent
        explain = torch._dynamo.explain(model)(ids, cache.batch(seqs, decode=True), ones, last_only=True)
        assert explain.graph_break_count == 0 and explain.graph_count == 1
        out = torch.compile(model, backend="aot_eager", dynamic=False)(ids, cache.batch(seqs, decode=True), ones,
                                                                        last_only=True)
    torch.testing.assert_close(out, ref)
    return seqs


def test_host_block_table_follows_sequences():
    """The incrementally updated block table of the captured decode steps holds, in every row, exactly the
    row's sequence's pages (what `block_table` builds from scratch) through growth, replacement of a row's
    sequence, a sequence released and refilled, and padding rows."""
    from cpm4.engine.paged import HostBlockTable, SeqPages

    scratch, width = 99, 8
    t = HostBlockTable(4, width, scratch)
    g = torch.Generator().manual_seed(0)
    a, b, c = SeqPages([1, 2], 100), SeqPages([3], 10), SeqPages([4, 5, 6], 150)

    def check(seqs, rows):
        cols = t.update(seqs, rows)
        assert cols == max([len(s.pages) for s in seqs] + [1])
        for i, s in enumerate(seqs):
            assert t.table[i, :len(s.pages)].tolist() == s.pages, i
        for i in range(len(seqs), rows):
            assert int(t.table[i, 0]) == scratch

    check([a, b], 4)
    a.pages.append(7)
    check([a, b], 4)
    check([b, a, c], 3)  # rows change owners
    c.pages.clear()
    c.pages += [8]  # released and refilled: fewer pages than the row held
    check([b, a, c], 4)
    for _ in range(5):
        s = [a, b, c][int(torch.randint(0, 3, (1,), generator=g))]
        if len(s.pages) < width:
            s.pages.append(int(torch.randint(0, 50, (1,), generator=g)))
        check([c, b, a][: int(torch.randint(1, 4, (1,), generator=g))], 4)
    with pytest.raises(ValueError, match="width"):
        check([SeqPages(list(range(width + 1)), 1)], 1)
    t.reset()
    assert (t.table == scratch).all() and t.update([], 2) == 1


def test_text_at_the_end_equals_streamed_text():
    """stream_text=False (offline batches): requests without stop strings get their text in their last delta,
    detokenized once; ids, text and finish reasons equal the streamed ones, through stop tokens, max_tokens,
    an abort (the text streamed so far) and stop strings (these still stream). With detokenize=False the engine
    leaves those texts to the caller: `finish_texts` after the run gives the same."""
    from cpm4.engine.generate import finish_texts

    model = random_model("tiny", dtype=torch.float32)
    ps = prompts(5, seed=7, lo=5, hi=40)
    params = [SamplingParams(temperature=0, max_tokens=40, ignore_eos=True),
              SamplingParams(temperature=0.8, seed=3, max_tokens=30, stop_token_ids=[7, 11, 13, 17, 19, 23]),
              SamplingParams(temperature=0.9, seed=4, max_tokens=35, ignore_eos=True),
              SamplingParams(temperature=0.9, seed=5, max_tokens=25, stop=["qqzz"]),
              SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)]
    res = {}
    for stream, detokenize in ((True, True), (False, True), (False, False)):
        cache = PagedKVCache(model.config, num_pages=100, page_size=16)
        eng = LLMEngine(model, tok(), cache, max_batch_size=4, chunk_tokens=64, stream_text=stream,
                        detokenize=detokenize)
        states = []
        for i, (p, sp) in enumerate(zip(ps, params)):
            states.append(eng.add_request(f"r{i}", p, sp))
        out, texts, step = {}, {}, 0
        while eng.has_work():
            if step == 12:
                eng.abort("r2")
            for rid, d in eng.step():
                o = out.setdefault(rid, ["", [], None])
                o[0] += d.text
                o[1] += d.token_ids
                o[2] = d.finish_reason or o[2]
                if d.text:
                    texts.setdefault(rid, []).append(d.finish_reason)
            step += 1
        if not detokenize:
            assert not any(f"r{i}" in texts for i in (0, 1, 2, 4))  # the engine decoded none of those
            for i, text in enumerate(finish_texts(states)):
                out[f"r{i}"][0] += text
            assert finish_texts(states) == [""] * len(states)  # owed once
            assert [st.text for st in states] == [out[f"r{i}"][0] for i in range(len(ps))]
        res[stream, detokenize] = (out, texts)
    assert res[False, True][0] == res[True, True][0] == res[False, False][0]
    assert res[True, True][0]["r2"][2] == "abort" and res[True, True][0]["r2"][0]
    texts = res[False, True][1]
    assert all(set(texts[f"r{i}"]) == {res[False, True][0][f"r{i}"][2]} for i in (0, 1, 2, 4))  # one piece, at the end
    assert len(texts["r3"]) > 1 and len(res[False, False][1]["r3"]) > 1  # stop strings: streamed


def test_warm_up_without_graphs_is_a_no_op():
    model = random_model("tiny", dtype=torch.float32)
    eng = LLMEngine(model, tok(), PagedKVCache(model.config, num_pages=8, page_size=16))
    assert eng.graphs is None
    frozen = gc.get_freeze_count()
    eng.warm_up()
    assert gc.get_freeze_count() == frozen  # nothing frozen on the CPU path
    eng.add_request("a", [5, 6, 7], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    assert eng.run_to_completion()["a"][1] == alone(model, [5, 6, 7], SamplingParams(temperature=0, max_tokens=3,
                                                                                     ignore_eos=True))


def test_graph_inputs_follow_sequences_through_row_shifts():
    """The host side of a captured decode step (`DecodeGraphs`, buffers on the CPU): block table rows and
    per-row inputs equal `decode_inputs` built from scratch while sequences grow, end (the rows after them
    shift up and are copied over), join, and the batch changes bucket."""
    from cpm4.engine.cuda_graph import DecodeGraphs
    from cpm4.engine.paged import SeqPages, decode_inputs

    cache = PagedKVCache(random_model("tiny", dtype=torch.float32).config, num_pages=400, page_size=16)
    g = DecodeGraphs.__new__(DecodeGraphs)
    g.init_buffers(cache, 24, 32, torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    pool = iter(range(400))
    seqs = []
    for step in range(60):
        if step % 7 == 0 and seqs:  # one ends (the rows after it shift up)
            seqs.pop(int(torch.randint(0, len(seqs), (1,), generator=gen)))
        while len(seqs) < (20 if step < 30 else 6):
            n = int(torch.randint(1, 30, (1,), generator=gen))
            seqs.append(SeqPages([next(pool) for _ in range(-(-(n + 1) // 16))], n))
        for s in seqs:
            if s.length >= len(s.pages) * 16:
                s.pages.append(next(pool))
        bs = next(b for b in g.sizes if b >= len(seqs))
        g.host_table.update(seqs, bs)
        starts, slots, ends = g._rows(seqs, bs)
        table, *ref = decode_inputs(cache, seqs, 32, "cpu", rows=bs)
        for i, s in enumerate(seqs):
            assert g.host_table.table[i, :len(s.pages)].tolist() == s.pages
        assert (g.host_table.table[len(seqs):bs, 0] == cache.scratch).all()
        for a, b in zip((starts, slots, ends), ref):
            assert torch.equal(a, b)
        for s in seqs:
            s.length += 1
        pool = iter(range(400)) if step == 30 else pool  # pages ids reused (values only matter per row)


def test_prefill_pools_kernel_keys_of_every_row():
    """Chunked prefill of several rows at once (unequal chunks, a row idle in one step) leaves each row's
    kernel-key pages equal to the reference pooling of its whole key sequence."""
    from cpm4.kernels.infllm_v2 import compress_keys

    model = random_model("tiny", dtype=torch.float32, sparse_config=sparse())
    sc = model.config.sparse_config
    cache = PagedKVCache(model.config, num_pages=60, page_size=16)
    ps = prompts(3, seed=7, lo=90, hi=140)
    seqs = [cache.new_sequence(p)[0] for p in ps]
    done = [0, 0, 0]
    for chunks in ([37, 0, 50], [40, 61, 1], [100, 100, 100]):
        new = [min(c, len(p) - d) for c, p, d in zip(chunks, ps, done)]
        t = max(new)
        ids = torch.zeros(3, t, dtype=torch.long)
        for i, (p, d, n) in enumerate(zip(ps, done, new)):
            ids[i, :n] = torch.tensor(p[d:d + n])
            cache.reserve(seqs[i], n)
        with torch.no_grad():
            model(ids, cache.batch(seqs), torch.tensor(new))
        done = [d + n for d, n in zip(done, new)]
    assert done == [len(p) for p in ps]
    batch = cache.batch(seqs)
    for layer in range(model.config.num_hidden_layers):
        for i, p in enumerate(ps):
            pages = torch.tensor(seqs[i].pages)
            keys = cache.k[layer][pages].flatten(0, 1)[:len(p)]
            k1, k2 = compress_keys(keys, sc)
            f1, f2 = batch.compressed_keys(layer, i, len(p), sc)
            torch.testing.assert_close(f1, k1, rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(f2, k2, rtol=1e-6, atol=1e-6)


def test_warm_up_with_graphs_off_on_cuda_still_warms_prefill(monkeypatch):
    """Eager decode on CUDA (cuda_graphs=False): nothing to capture, but the paged decode kernels (of every batch
    size, `_warm_decode`) and the prefill kernels still compile and autotune in warm_up rather than inside the
    first requests; on the CPU nothing is done."""
    import types

    model = random_model("tiny", dtype=torch.float32)
    eng = LLMEngine(model, tok(), PagedKVCache(model.config, num_pages=8, page_size=16))
    assert eng.graphs is None
    calls = []
    monkeypatch.setattr(eng, "_warm_prefill", lambda: calls.append("prefill"))
    monkeypatch.setattr(gc, "freeze", lambda: calls.append("freeze"))
    eng.warm_up()
    assert calls == []
    monkeypatch.setattr(eng, "cache", types.SimpleNamespace(device=torch.device("cuda")))
    eng.warm_up()
    assert calls == ["prefill", "freeze"]  # the gathering decode path (paged_decode off): no kernels of its own
    calls.clear()
    monkeypatch.setattr(eng, "paged_decode", True)
    monkeypatch.setattr(eng, "_warm_decode", lambda: calls.append("decode"))
    eng.warm_up()
    assert calls == ["decode", "prefill", "freeze"]


def test_eager_decode_warm_up_steps_the_first_layer_alone(monkeypatch):
    """`_warm_decode`'s steps (a batch size each, and a cascade group each from two rows) run the model with its
    first layer alone: every layer launches the same kernels (the 0.5B's 256 sizes took 26 s through all 24
    layers). The layers are back afterwards, and when a step raises; no page stays taken."""
    from cpm4.engine import paged

    monkeypatch.setattr(paged, "CASCADE_DECODE", True)
    model = random_model("tiny", dtype=torch.float32, num_hidden_layers=3)
    layers = model.model.layers
    cache = PagedKVCache(model.config, num_pages=40, page_size=16)
    eng = LLMEngine(model, tok(), cache, max_batch_size=3, paged_decode=True)
    free = cache.num_free
    seen = []

    def step(seqs, ids, shared=None):
        seen.append((len(seqs), shared is not None, [layer.self_attn.layer_idx for layer in model.model.layers]))
        if len(seqs) == 3 and shared is not None:
            raise RuntimeError("boom")

    monkeypatch.setattr(eng, "_forward_decode", step)
    with pytest.raises(RuntimeError, match="boom"):
        eng._warm_decode()
    assert seen == [(1, False, [0]), (2, False, [0]), (2, True, [0]), (3, False, [0]), (3, True, [0])]
    assert model.model.layers is layers and len(layers) == 3 and cache.num_free == free


def test_warm_up_compiles_prefill_for_one_and_several_rows():
    """warm_up with compile runs the fused prefill ops for one row and for several (dynamo specializes sizes
    of 1) on throwaway pages: later prefills of any row count compile nothing, and no page stays taken. The
    compiler's objects end up frozen, out of the garbage collector's full collections."""
    import torch._dynamo

    class NoGraphs:  # the decode graphs' part needs CUDA; only the prefill part is exercised here
        def warm_up(self, stop=None):
            pass

    model = random_model("tiny", dtype=torch.float32, sparse_config=sparse())
    cache = PagedKVCache(model.config, num_pages=80, page_size=16)
    eng = LLMEngine(model, tok(), cache, max_batch_size=4, chunk_tokens=512)
    model.fuse_elementwise(backend="aot_eager")  # what compile=True turns on, without generating code
    eng.graphs, eng.compile = NoGraphs(), True
    torch._dynamo.reset()
    free = cache.num_free
    frozen = gc.get_freeze_count()
    try:
        eng.warm_up()
        assert gc.get_freeze_count() > frozen
        eng.graphs = None  # steps decode on the gathering path
        assert cache.num_free == free
        compiled = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        assert compiled > 0
        params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)  # prefill steps only
        for group in (prompts(1, seed=8, lo=20, hi=40), prompts(3, seed=9, lo=20, hi=90)):
            for i, p in enumerate(group):
                eng.add_request(f"g{len(group)}-{i}", p, params)
            assert len(eng.run_to_completion()) == len(group)
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == compiled
    finally:
        gc.unfreeze()  # the rest of the test session collects as usual
        model.fuse_elementwise(enabled=False)
        torch._dynamo.reset()


def test_warm_up_freezes_objects_with_eager_graphs():
    """Captured graphs without compile: warm_up still moves the long-lived objects out of the collector's
    full collections (150-220 ms each in an eager serving run on the H200 host)."""
    class Graphs:
        warmed = False

        def warm_up(self, stop=None):
            self.warmed = True

    model = random_model("tiny", dtype=torch.float32)
    eng = LLMEngine(model, tok(), PagedKVCache(model.config, num_pages=8, page_size=16))
    eng.graphs = Graphs()
    frozen = gc.get_freeze_count()
    try:
        eng.warm_up()
        assert eng.graphs.warmed and gc.get_freeze_count() > frozen
    finally:
        gc.unfreeze()


@pytest.mark.parametrize("pages", [40, 8])
def test_warm_up_prefills_one_and_two_rows_dense_and_sparse(pages):
    """warm_up runs prefill forwards of one row and two, short and (InfLLM v2) past dense_len, on pages it
    gives back, so kernels compile (and autotune) before the first request; the sparse rows are left out where
    the free pages cannot hold them (8 pages of 16: not 2 x 97 tokens), without error."""
    class Graphs:
        def warm_up(self, stop=None):
            pass

    model = random_model("tiny", dtype=torch.float32, sparse_config=sparse())  # dense_len 96
    cache = PagedKVCache(model.config, num_pages=pages, page_size=16)
    eng = LLMEngine(model, tok(), cache, max_batch_size=4)
    eng.graphs = Graphs()
    shapes = []
    forward = model.forward

    def recording(ids, batch, new_lens, **kw):
        shapes.append((tuple(ids.shape), new_lens.tolist()))
        return forward(ids, batch, new_lens, **kw)

    model.forward = recording
    free = cache.num_free
    try:
        eng.warm_up()
    finally:
        gc.unfreeze()
        del model.forward
    fits = [(1, 2), (2, 2), (1, 97)] + ([(2, 97)] if pages == 40 else [])
    assert shapes == [((r, n), [n] * r) for r, n in fits]
    assert cache.num_free == free
    eng.graphs = None  # the engine serves as before (decode on the gathering path)
    eng.add_request("a", [5, 6, 7], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    assert eng.run_to_completion()["a"][1] == alone(model, [5, 6, 7], SamplingParams(temperature=0, max_tokens=3,
                                                                                     ignore_eos=True))


def test_warm_up_compiles_the_sparse_kernel_variants(monkeypatch):
    """With the Triton kernels (CUDA), warm_up also has the prefill kernels compiled for every variant a prompt from
    dense_len to the engine's context can need (`infllm_v2.warm_prefill_kernels`): the selection for every power
    of two of blocks (`triton_select.warm_select`, from the shortest sparse prompt's blocks), stage 1 for a few
    queries after a long context (`warm_scores`), each selection width (`warm_widths`); not off the GPU."""
    from cpm4.kernels import infllm_v2
    from cpm4.kernels.infllm_v2 import triton_select

    model = random_model("tiny", dtype=torch.float32, sparse_config=sparse())  # dense_len 96, blocks of 16
    eng = LLMEngine(model, tok(), PagedKVCache(model.config, num_pages=8, page_size=16), max_model_len=1000)
    calls = []

    def record(name):
        return lambda *a, **k: calls.append((name, tuple(str(x) if isinstance(x, torch.device) else x for x in a), k))

    real = infllm_v2.warm_prefill_kernels
    monkeypatch.setattr(infllm_v2, "warm_prefill_kernels", record("prefill"))
    eng._warm_sparse()
    assert calls == []  # the CPU path has none of these kernels
    monkeypatch.setattr(infllm_v2, "uses_triton", lambda x: True)
    eng._warm_sparse()
    sc = model.config.sparse_config
    assert calls == [("prefill", (sc, 8, 2, 16, 1000, "cpu", torch.float32), {})]
    calls.clear()
    for name in ("warm_select", "warm_scores"):
        monkeypatch.setattr(triton_select, name, record(name))
    monkeypatch.setattr(infllm_v2, "warm_widths", record("warm_widths"))
    real(sc, 8, 2, 16, 1000, "cpu", torch.float32, queries=5)
    assert calls == [("warm_select", (sc, 2, 1000, "cpu", torch.float32), {"start": 6, "queries": 5}),
                     ("warm_scores", (sc, 8, 2, 16, "cpu", torch.float32), {}),
                     ("warm_widths", (sc, 8, 2, 16, 1000, "cpu", torch.float32, 6), {"queries": 5})]


def test_lone_sequence_reads_its_pages_in_place():
    """Pages come back in ascending order after a release, so a lone sequence's pages are consecutive and a
    step reads its keys as a view of the cache (no gather); a batch of two gathers them. Same values."""
    model = random_model("tiny", dtype=torch.float32, sparse_config=sparse())
    cache = PagedKVCache(model.config, num_pages=40, page_size=16)
    first, _ = cache.new_sequence([5] * 70)
    cache.reserve(first, 70)
    cache.release(first)
    a, _ = cache.new_sequence([6] * 50)
    cache.reserve(a, 50)
    assert a.pages == list(range(a.pages[0], a.pages[0] + 4))
    k, v = torch.randn(2, 1, 50, 2, model.config.dim_head).unbind(0)
    zero = torch.zeros(1, dtype=torch.long)
    k_all, v_all = cache.batch([a]).write(0, k, v, zero, torch.tensor([50]))
    assert k_all.untyped_storage().data_ptr() == cache.k[0].untyped_storage().data_ptr()  # a view
    assert torch.equal(k_all[0], k[0]) and torch.equal(v_all[0], v[0])
    b, _ = cache.new_sequence([7] * 20)
    cache.reserve(b, 20)
    k2, v2 = torch.randn(2, 1, 20, 2, model.config.dim_head).unbind(0)
    pair = cache.batch([a, b])
    a.length = 50  # a's tokens are cached; b writes its first 20
    k_all, _ = pair.write(0, torch.cat([k2, k2]), torch.cat([v2, v2]), torch.tensor([50, 0]), torch.tensor([0, 20]))
    assert k_all.untyped_storage().data_ptr() != cache.k[0].untyped_storage().data_ptr()  # gathered
    assert torch.equal(k_all[0, :50], k[0]) and torch.equal(k_all[1, :20], k2[0])


@pytest.mark.parametrize("sc", [None, sparse(dense_len=48)])
def test_packed_prefill_equals_padded(sc):
    """A multi-row prefill runs the per-token work on its real tokens only (`Packing`): the same logits (every
    position, and last-only) and the same cache (the next steps' logits) as the padded layout and as each row
    run alone, in float64. Rows start at 0 (one causal call), continue cached tokens (row by row) beside
    rows that start (those together), sit a step out, and with sc cross dense_len; the last step feeds one
    token per row (one masked call)."""
    model = random_model("tiny", dtype=torch.float64, sparse_config=sc)
    g = torch.Generator().manual_seed(3)
    steps = [[30, 0, 17, 0], [3, 40, 5, 25], [3, 60, 1, 2], [1, 1, 1, 1]]  # new tokens per row and step
    ids = [torch.randint(3, 1000, (len(steps[0]), max(s)), generator=g) for s in steps]
    runs = []
    for pack in (True, False):
        model.pack_rows = pack
        cache = PagedKVCache(model.config, num_pages=40, page_size=16, dtype=torch.float64)
        seqs = [SeqPages() for _ in steps[0]]
        out = []
        try:
            for lens, x in zip(steps, ids):
                for s, n in zip(seqs, lens):
                    cache.reserve(s, n)
                full = model(x, cache.batch(seqs), torch.tensor(lens))
                out.append([full[i, :n] for i, n in enumerate(lens)])
        finally:
            del model.pack_rows
        runs.append(out)
    # Each row alone (one-row forwards: no padding, no packing) is the independent reference.
    for i in range(len(steps[0])):
        cache = PagedKVCache(model.config, num_pages=40, page_size=16, dtype=torch.float64)
        seq = SeqPages()
        for j, (lens, x) in enumerate(zip(steps, ids)):
            if lens[i]:
                cache.reserve(seq, lens[i])
                alone = model(x[i:i + 1, :lens[i]], cache.batch([seq]))[0]
                torch.testing.assert_close(runs[0][j][i], alone, rtol=1e-10, atol=1e-10)
    for step_packed, step_padded in zip(*runs):
        for a, b in zip(step_packed, step_padded):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    # last_only reads each row's last real token from the packed order (the second step is packed)
    cache = PagedKVCache(model.config, num_pages=40, page_size=16, dtype=torch.float64)
    seqs = [SeqPages() for _ in steps[0]]
    for lens, x in zip(steps[:2], ids):
        for s, n in zip(seqs, lens):
            cache.reserve(s, n)
        last = model(x, cache.batch(seqs), torch.tensor(lens), last_only=True)
    torch.testing.assert_close(last, torch.stack([r[-1] for r in runs[1][1]]), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("caching", [True, False])
def test_requests_sharing_a_prefix_being_computed_wait_for_it(caching):
    """Requests whose next page is a prompt page a running request is computing wait until it is published, then
    find it cached (they computed the whole prefix side by side before); unrelated requests behind them are not
    held up; a request preempted or finished lets its waiters go. Outputs equal each run alone; without prefix
    caching nobody waits."""
    model = random_model("tiny", dtype=torch.float32)
    cache = PagedKVCache(model.config, num_pages=60, page_size=16, prefix_caching=caching)
    eng = LLMEngine(model, tok(), cache, max_batch_size=8, chunk_tokens=32)
    g = torch.Generator().manual_seed(5)
    shared = torch.randint(3, 1000, (70,), generator=g).tolist()
    ps = [shared + [7 + i] * 9 for i in range(3)] + [torch.randint(3, 1000, (40,), generator=g).tolist()]
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    for i, p in enumerate(ps):
        eng.add_request(f"r{i}", p, params)
    eng.step()
    running = {r.request_id for r in eng.running}
    assert running == ({"r0", "r3"} if caching else {"r0", "r1", "r2", "r3"})
    assert [r.request_id for r in eng.waiting] == (["r1", "r2"] if caching else [])
    res: dict[str, GenerationOutput] = {}
    while eng.has_work():
        for rid, d in eng.step():
            res.setdefault(rid, GenerationOutput([])).add(d)
    for i, p in enumerate(ps):
        assert res[f"r{i}"].token_ids == alone(model, p, params), i
    # r0 computed the shared prompt's 4 whole pages (64 tokens); r1 and r2 found them.
    assert [res[f"r{i}"].num_cached_tokens for i in range(4)] == ([0, 64, 64, 0] if caching else [0, 0, 0, 0])
    assert not eng._computing and cache.num_free == cache.num_pages
    if not caching:
        return
    # The owner preempted (or aborted) before publishing: its waiter is admitted and computes the prefix itself.
    for end in ("preempt", "abort"):
        fresh = torch.randint(3, 1000, (70,), generator=g).tolist()  # not cached yet
        pa, pb = fresh + [5] * 9, fresh + [6] * 9
        eng.add_request("a", pa, params)
        eng.add_request("b", pb, params)
        eng.step()
        owner = next(r for r in eng.running if r.request_id == "a")
        assert [r.request_id for r in eng.waiting] == ["b"] and owner.computing
        if end == "preempt":
            eng._preempt(owner)
        else:
            eng.abort("a")
        res = {}
        while eng.has_work():
            for rid, d in eng.step():
                res.setdefault(rid, GenerationOutput([])).add(d)
        assert res["b"].token_ids == alone(model, pb, params) and not eng._computing
    # A request sharing only the start of a long prompt being computed does not wait for all of it.
    fresh = torch.randint(3, 1000, (40,), generator=g).tolist()
    long, short = fresh + torch.randint(3, 1000, (200,), generator=g).tolist(), fresh + [9] * 5
    eng.add_request("long", long, params)
    eng.add_request("short", short, params)
    eng.step()
    assert {r.request_id for r in eng.running} == {"long", "short"} and not eng.waiting
    res = {}
    while eng.has_work():
        for rid, d in eng.step():
            res.setdefault(rid, GenerationOutput([])).add(d)
    assert res["short"].token_ids == alone(model, short, params) and res["short"].num_cached_tokens == 0


def _rows_forward(model, ps, cut, device, dtype, page_size=16):
    """Logits of the prompts' tokens after `cut` cached ones, the new parts as one batched step (cache pages)."""
    cache = PagedKVCache(model.config, num_pages=64, page_size=page_size, device=device, dtype=dtype)
    seqs = [SeqPages() for _ in ps]
    for seq, p, c in zip(seqs, ps, cut):  # the cached part, one row at a time
        if c:
            cache.reserve(seq, c)
            model(torch.tensor([p[:c]], device=device), cache.batch([seq]), torch.tensor([c], device=device))
    return _rest_step(model, cache, seqs, ps, cut, device)


def _rest_step(model, cache, seqs, ps, cut, device) -> list[torch.Tensor]:
    """Each prompt's tokens after its `cut` cached ones as one batched step: their logits (float32, CPU)."""
    new = [len(p) - c for p, c in zip(ps, cut)]
    for seq, n in zip(seqs, new):
        cache.reserve(seq, n)
    ids = torch.zeros(len(ps), max(new), dtype=torch.long)
    for i, (p, c) in enumerate(zip(ps, cut)):
        ids[i, :new[i]] = torch.tensor(p[c:])
    logits = model(ids.to(device), cache.batch(seqs), torch.tensor(new, device=device))
    return [logits[i, :n].float().cpu() for i, n in enumerate(new)]


def check_batched_rows(base, model, ps, cut, one, rows, prefix_len):
    """A batched attention path on CUDA (bf16): the logits `one` equal the row-by-row `rows` within bf16 rounding
    and the float32 model `base`; then through the engine, a batch after a cached prefix of prefix_len tokens
    gives the tokens of the same batch without caching."""
    for i, (a, b) in enumerate(zip(one, rows)):
        ref = base(torch.tensor([ps[i]]))[0, cut[i]:]
        assert (a - b).abs().max() < 0.05, i
        assert (a - ref).abs().max() < 0.1 and (a.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9, i
    prefix = prompts(1, seed=12, lo=prefix_len, hi=prefix_len + 1)[0]
    batch = [prefix + p[:20] for p in prompts(4, seed=13, lo=20, hi=21)]
    caching_keeps_tokens(model, prefix, batch)


def tokens_after_prefix(model, prefix, batch, params, cache_kw, **engine_kw) -> list[list[int]]:
    """Each prompt's generated tokens from a fresh paged cache (`cache_kw`) and engine (`engine_kw`), the batch
    submitted together after an earlier request with `prefix` ran to its end."""
    eng = LLMEngine(model, tok(), PagedKVCache(model.config, **cache_kw), **engine_kw)
    eng.add_request("warm", prefix + [5], params)
    eng.run_to_completion()
    for i, p in enumerate(batch):
        eng.add_request(f"r{i}", p, params)
    res = eng.run_to_completion()
    return [res[f"r{i}"][1] for i in range(len(batch))]


def caching_keeps_tokens(model, prefix, batch):
    """On CUDA in bf16, the engine's greedy tokens for `batch` after an earlier request with `prefix` are the same
    with prefix caching as without (but for a bf16 near-tie)."""
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    out = {caching: tokens_after_prefix(model, prefix, batch, params,
                                        dict(num_pages=100, page_size=16, device="cuda", dtype=torch.bfloat16,
                                             prefix_caching=caching), max_batch_size=4, cuda_graphs=False)
           for caching in (True, False)}
    assert sum(a == b for a, b in zip(out[True], out[False])) >= len(batch) - 1  # a bf16 near-tie may flip one

@pytest.mark.gpu
def test_continuing_rows_in_one_varlen_call_on_cuda(monkeypatch):
    """Dense rows continuing cached tokens (a shared prefix, later chunks) take one variable-length flash call
    on CUDA: the same logits as row by row (each its own bottom-right causal SDPA call), within bf16 rounding,
    and against the float32 model on the CPU; the engine's greedy tokens with a cached prefix as without."""
    from cpm4.model import MiniCPM4ForCausalLM
    from cpm4.model.modeling import Attention

    base = random_model("tiny", dtype=torch.float32)
    model = MiniCPM4ForCausalLM(base.config).to("cuda", torch.bfloat16)
    model.load_state_dict({k: v.to(torch.bfloat16) for k, v in base.state_dict().items()})
    ps = prompts(5, seed=11, lo=40, hi=120)
    cut = [7, 30, 0, 55, 16]  # tokens already cached per row (0: a row from its start beside the others)

    def forward(batched):
        monkeypatch.setattr(Attention, "batch_continuing_rows", batched)
        return _rows_forward(model, ps, cut, "cuda", torch.bfloat16)

    calls = []
    real = torch.ops.aten._flash_attention_forward
    monkeypatch.setattr(torch.ops.aten, "_flash_attention_forward", lambda *a, **k: calls.append(1) or real(*a, **k))
    one, rows = forward(True), forward(False)
    assert len(calls) == model.config.num_hidden_layers  # one call a layer, then none row by row
    monkeypatch.setattr(Attention, "batch_continuing_rows", True)
    check_batched_rows(base, model, ps, cut, one, rows, prefix_len=70)


@pytest.mark.slow
def test_sparse_rows_in_one_launch_interpreter(monkeypatch):
    """Sparse rows of one step (after cached tokens, or from their start beside them) through the batched InfLLM
    v2 kernels (`Attention._sparse_rows`; on the CPU in Triton's interpreter, as on the GPU): the logits of each
    prompt's whole forward without a cache."""
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        pytest.skip("interpreter test: runs on CPU only")
    from cpm4.kernels import infllm_v2
    from cpm4.model.modeling import Attention

    model = random_model("tiny", dtype=torch.float32, sparse_config=sparse(dense_len=40), num_hidden_layers=1)
    ps = prompts(3, seed=21, lo=50, hi=70) + prompts(1, seed=22, lo=25, hi=26)  # the last one dense beside them
    cut = [33, 20, 0, 10]
    refs = [model(torch.tensor([p]))[0, c:] for p, c in zip(ps, cut)]  # the plain-PyTorch InfLLM v2
    calls = []
    real = infllm_v2.triton_pipeline_rows
    monkeypatch.setattr(infllm_v2, "uses_triton", lambda q: True)
    monkeypatch.setattr(infllm_v2, "triton_pipeline_rows", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(Attention, "batch_sparse_rows", True)
    got = _rows_forward(model, ps, cut, "cpu", torch.float32)
    assert len(calls) == model.config.num_hidden_layers  # one batched pipeline a layer
    for i, ref in enumerate(refs):
        assert (got[i] - ref).abs().max() < 1e-4, i


@pytest.mark.gpu
def test_sparse_rows_in_one_launch_on_cuda(monkeypatch):
    """On CUDA in bf16, sparse rows continuing cached tokens take the batched InfLLM v2 kernels: the same logits as
    row by row within bf16 rounding and against the float32 model; the engine's greedy tokens after a cached
    sparse prefix as without caching."""
    from cpm4.kernels import infllm_v2
    from cpm4.model import MiniCPM4ForCausalLM
    from cpm4.model.modeling import Attention

    base = random_model("tiny", dtype=torch.float32, sparse_config=sparse(dense_len=64))
    model = MiniCPM4ForCausalLM(base.config).to("cuda", torch.bfloat16)
    model.load_state_dict({k: v.to(torch.bfloat16) for k, v in base.state_dict().items()})
    ps = prompts(5, seed=11, lo=100, hi=300)
    cut = [70, 30, 0, 95, 16]
    calls = []
    real = infllm_v2.triton_pipeline_rows
    monkeypatch.setattr(infllm_v2, "triton_pipeline_rows", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(Attention, "batch_sparse_rows", True)
    one = _rows_forward(model, ps, cut, "cuda", torch.bfloat16)
    assert len(calls) == model.config.num_hidden_layers
    monkeypatch.setattr(Attention, "batch_sparse_rows", False)
    rows = _rows_forward(model, ps, cut, "cuda", torch.bfloat16)
    monkeypatch.setattr(Attention, "batch_sparse_rows", True)
    check_batched_rows(base, model, ps, cut, one, rows, prefix_len=150)


@pytest.mark.gpu
@pytest.mark.parametrize("sc", [None, sparse(dense_len=64)])
def test_prefill_steps_never_wait_for_the_gpu(sc, monkeypatch):
    """An engine prefill step's forward (several rows, chunked prompts, a cached prefix: the cascade when dense,
    InfLLM v2) reads nothing back from the GPU: torch's sync debug mode set to error around every non-decode
    forward raises on any .tolist(), .item(), nonzero or blocking copy. The outputs stay those of the same engine
    unguarded."""
    from cpm4.model import MiniCPM4ForCausalLM
    from cpm4.model.modeling import Attention

    monkeypatch.setattr(Attention, "cascade_min_tokens", 64)

    base = random_model("tiny", dtype=torch.float32, sparse_config=sc)
    model = MiniCPM4ForCausalLM(base.config).to("cuda", torch.bfloat16)
    model.load_state_dict({k: v.to(torch.bfloat16) for k, v in base.state_dict().items()})
    prefix = prompts(1, seed=21, lo=150, hi=151)[0]
    ps = [prefix + p for p in prompts(5, seed=22, lo=10, hi=90)]
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    guarded = []

    def guard(mod, args):
        if len(args) > 1 and not getattr(args[1], "decoding", False):
            guarded.append(1)
            torch.cuda.set_sync_debug_mode("error")

    def unguard(mod, args, out):
        torch.cuda.set_sync_debug_mode(0)

    out = {}
    for on in (False, True):
        cache = PagedKVCache(model.config, num_pages=120, page_size=16, device="cuda", dtype=torch.bfloat16,
                             prefix_caching=True)
        eng = LLMEngine(model, tok(), cache, max_batch_size=4, chunk_tokens=96)
        hooks = [model.register_forward_pre_hook(guard), model.register_forward_hook(unguard)] if on else []
        try:
            eng.add_request("warm", prefix + [7], params)
            eng.run_to_completion()
            for i, p in enumerate(ps):
                eng.add_request(f"r{i}", p, params)
            res = eng.run_to_completion()
        finally:
            torch.cuda.set_sync_debug_mode(0)
            for h in hooks:
                h.remove()
        out[on] = [res[f"r{i}"][1] for i in range(len(ps))]
    assert len(guarded) >= 3  # the warm prompt, then chunked prefill steps of several rows
    assert out[True] == out[False]


@pytest.mark.gpu
def test_decode_steps_launched_ahead_never_wait_for_the_gpu(monkeypatch):
    """A decode step launched ahead of reading the last one's tokens (async_output, CUDA graphs) must queue its
    work without waiting for the step in flight, also when rows end and the others go on (the rows' index into the
    tokens on the device) and over the sampling options such rows take (greedy, temperature, top-p/k, min-p,
    seeds, logit_bias, allowed_token_ids, stop strings): torch's sync debug mode set to error around every such
    launch. The tokens stay those of the same engine unguarded (each run from the same global seed)."""
    from cpm4.model import MiniCPM4ForCausalLM

    base = random_model("tiny", dtype=torch.float32)
    model = MiniCPM4ForCausalLM(base.config).to("cuda", torch.bfloat16)
    model.load_state_dict({k: v.to(torch.bfloat16) for k, v in base.state_dict().items()})
    ps = prompts(7, seed=31, lo=5, hi=40)
    params = [SamplingParams(temperature=0, max_tokens=9, ignore_eos=True),
              SamplingParams(temperature=0.8, top_p=0.9, seed=1, max_tokens=14, ignore_eos=True),
              SamplingParams(temperature=1.0, top_k=20, seed=2, max_tokens=5, ignore_eos=True),
              SamplingParams(temperature=0.7, min_p=0.1, seed=3, max_tokens=17, ignore_eos=True),
              SamplingParams(temperature=0, logit_bias={5: 3.0, 9: -100.0}, max_tokens=7, ignore_eos=True),
              SamplingParams(temperature=0.9, allowed_token_ids=list(range(40, 90)), seed=4, max_tokens=11,
                             ignore_eos=True),
              SamplingParams(temperature=1.0, stop=["zzqx"], max_tokens=12, ignore_eos=True)]  # device generator
    launches = []
    launch = LLMEngine._launch

    def guarded(self, reqs, ids):
        launches.append(len(reqs))
        torch.cuda.set_sync_debug_mode("error")
        try:
            return launch(self, reqs, ids)
        finally:
            torch.cuda.set_sync_debug_mode(0)

    out = {}
    for on in (False, True):
        cache = PagedKVCache(model.config, num_pages=64, page_size=16, device="cuda", dtype=torch.bfloat16)
        eng = LLMEngine(model, tok(), cache, max_batch_size=8, async_output=True)
        if on:
            monkeypatch.setattr(LLMEngine, "_launch", guarded)
        eng.warm_up()
        torch.manual_seed(0)
        for i, (p, sp) in enumerate(zip(ps, params)):
            eng.add_request(f"r{i}", p, sp)
        res = eng.run_to_completion()
        out[on] = [res[f"r{i}"][1] for i in range(len(ps))]
        monkeypatch.undo()
    assert [len(t) for t in out[True]] == [sp.max_tokens for sp in params]
    assert out[True] == out[False]
    assert len(launches) >= 10 and len(set(launches)) >= 4  # launched ahead at several row counts


def _shared_prefix_forward(model, prefix, tails, own_cached, device, dtype, scatter=False, others=()):
    """Logits of each prompt `prefix + tails[i]` after its cached tokens, the new parts in one batched step: the
    prefix's whole pages computed once and shared by every row (prefix caching), then own_cached[i] more tokens of
    the row cached alone. others: (prompt, cached) rows without the prefix in the same step, after those. scatter:
    pages handed out in a random order (else a fresh cache's consecutive ones). Returns the logits of every row
    and each row's cached count."""
    cache = PagedKVCache(model.config, num_pages=128, page_size=16, device=device, dtype=dtype, prefix_caching=True)
    if scatter:
        random.Random(0).shuffle(cache.free)
    first = SeqPages()
    cache.reserve(first, len(prefix))
    model(torch.tensor([prefix]), cache.batch([first]), torch.tensor([len(prefix)]))
    cache.publish(first, prefix)
    ps = [prefix + t for t in tails] + [p for p, _ in others]
    seqs, cut = [], []
    for i, p in enumerate(ps):
        if i < len(tails):
            seq, c = cache.new_sequence(p)
            extra = own_cached[i]
        else:
            seq, c, extra = SeqPages(), 0, others[i - len(tails)][1]
        if extra:
            cache.reserve(seq, extra)
            model(torch.tensor([p[c:c + extra]]), cache.batch([seq]), torch.tensor([extra]))
            c += extra
        seqs.append(seq)
        cut.append(c)
    return _rest_step(model, cache, seqs, ps, cut, device), cut


def _count_cascades(monkeypatch):
    from cpm4.model.modeling import Attention

    calls = []
    real = Attention._cascade
    monkeypatch.setattr(Attention, "_cascade", lambda self, *a: calls.append(1) or real(self, *a))
    return calls


@pytest.mark.parametrize("scatter", [False, True])
def test_cascade_over_shared_pages_equals_whole_prompts(monkeypatch, scatter):
    """Rows after one cached prefix (the same pages), some with more of their own tokens cached, one with a single
    new token: the cascade (the shared keys in one call for all rows, each row's own keys in a second, merged by
    log-sum-exp; float math on the CPU) gives each prompt's logits of its whole forward without a cache (float64),
    as the row-by-row path does."""
    from cpm4.model.modeling import Attention

    model = random_model("tiny", sparse_config=None)
    prefix = prompts(1, seed=41, lo=70, hi=71)[0]  # 4 whole pages of 16 shared, 6 tokens of a 5th
    tails = prompts(4, seed=42, lo=1, hi=40)
    tails[1] = tails[1][:1]
    own = [0, 0, 20, 3]
    monkeypatch.setattr(Attention, "varlen_on_cpu", True)
    monkeypatch.setattr(Attention, "cascade_min_tokens", 16)
    calls = _count_cascades(monkeypatch)
    got, cut = _shared_prefix_forward(model, prefix, tails, own, "cpu", torch.float64, scatter)
    assert len(calls) == model.config.num_hidden_layers
    monkeypatch.setattr(Attention, "cascade_prefix", False)
    rows, _ = _shared_prefix_forward(model, prefix, tails, own, "cpu", torch.float64, scatter)
    assert len(calls) == model.config.num_hidden_layers  # no cascade with it off
    for i, t in enumerate(tails):
        want = model(torch.tensor([prefix + t]))[0, cut[i]:].float()
        torch.testing.assert_close(got[i], want, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(rows[i], want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("sc", [None, sparse(dense_len=4096)])
def test_cascade_beside_rows_without_the_prefix(monkeypatch, sc):
    """A step with rows after one cached prefix, a prompt from its start and a row after its own cached tokens: the
    rows sharing the prefix take the cascade (reading the other rows' keys from the whole gather), the others their
    own paths; with an InfLLM v2 model whose rows are all dense (its kernel keys are pooled, so nothing is skipped)
    too. Every row's logits are those of its whole prompt without a cache (float64)."""
    from cpm4.model.modeling import Attention

    model = random_model("tiny", sparse_config=sc)
    prefix = prompts(1, seed=51, lo=50, hi=51)[0]
    tails = prompts(3, seed=52, lo=2, hi=30)
    others = [(p, c) for p, c in zip(prompts(2, seed=53, lo=30, hi=60), [0, 21])]
    monkeypatch.setattr(Attention, "varlen_on_cpu", True)
    monkeypatch.setattr(Attention, "cascade_min_tokens", 16)
    calls = _count_cascades(monkeypatch)
    for extra in ([], others):
        before = len(calls)
        got, cut = _shared_prefix_forward(model, prefix, tails, [0, 4, 0], "cpu", torch.float64, others=extra)
        assert len(calls) - before == model.config.num_hidden_layers
        for i, p in enumerate([prefix + t for t in tails] + [p for p, _ in extra]):
            want = model(torch.tensor([p]))[0, cut[i]:].float()
            torch.testing.assert_close(got[i], want, rtol=1e-6, atol=1e-6)


def test_cascade_off_when_rows_share_too_little(monkeypatch):
    """Below cascade_min_tokens shared, or with a row that shares no page, the step takes the variable-length call."""
    from cpm4.model.modeling import Attention

    model = random_model("tiny", dtype=torch.float32, sparse_config=None)
    prefix = prompts(1, seed=43, lo=40, hi=41)[0]  # 2 whole pages
    monkeypatch.setattr(Attention, "varlen_on_cpu", True)
    calls = _count_cascades(monkeypatch)
    monkeypatch.setattr(Attention, "cascade_min_tokens", 64)
    _shared_prefix_forward(model, prefix, prompts(3, seed=44, lo=5, hi=20), [0, 0, 0], "cpu", torch.float32)
    assert not calls
    monkeypatch.setattr(Attention, "cascade_min_tokens", 16)
    _shared_prefix_forward(model, prefix, prompts(3, seed=44, lo=5, hi=20), [0, 0, 0], "cpu", torch.float32)
    assert len(calls) == model.config.num_hidden_layers


def test_engine_burst_with_cascade_equals_alone(monkeypatch):
    """A burst of requests after a cached prefix through the engine with the cascade (float math on the CPU): each
    request's greedy tokens are those of the request alone."""
    from cpm4.model.modeling import Attention

    model = random_model("tiny", dtype=torch.float32, sparse_config=None)
    monkeypatch.setattr(Attention, "varlen_on_cpu", True)
    monkeypatch.setattr(Attention, "cascade_min_tokens", 32)
    calls = _count_cascades(monkeypatch)
    prefix = prompts(1, seed=45, lo=100, hi=101)[0]
    ps = [prefix + p for p in prompts(5, seed=46, lo=3, hi=30)]
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    cache = PagedKVCache(model.config, num_pages=96, page_size=16)
    eng = LLMEngine(model, tok(), cache, max_batch_size=5)
    eng.add_request("warm", prefix + [9], params)
    eng.run_to_completion()
    res = run_burst(eng, ps, params)
    assert calls
    monkeypatch.setattr(Attention, "varlen_on_cpu", False)
    assert_each_alone(res, model, ps, params)


@pytest.mark.gpu
def test_cascade_over_shared_pages_on_cuda(monkeypatch):
    """On CUDA in bf16 the cascade's two flash calls a layer and their merge: the logits of the row-by-row path
    within bf16 rounding and of the float32 model; the engine's tokens after a cached prefix as without caching."""
    from cpm4.model import MiniCPM4ForCausalLM
    from cpm4.model.modeling import Attention

    base = random_model("tiny", dtype=torch.float32, sparse_config=None)
    model = MiniCPM4ForCausalLM(base.config).to("cuda", torch.bfloat16)
    model.load_state_dict({k: v.to(torch.bfloat16) for k, v in base.state_dict().items()})
    prefix = prompts(1, seed=47, lo=150, hi=151)[0]
    tails = prompts(4, seed=48, lo=1, hi=60)  # 31, 47, 31 and 13 tokens after the prefix's 144 cached
    own = [0, 5, 0, 10]
    monkeypatch.setattr(Attention, "cascade_min_tokens", 64)
    flash = []
    real = torch.ops.aten._flash_attention_forward
    monkeypatch.setattr(torch.ops.aten, "_flash_attention_forward", lambda *a, **k: flash.append(1) or real(*a, **k))
    calls = _count_cascades(monkeypatch)
    got, cut = _shared_prefix_forward(model, prefix, tails, own, "cuda", torch.bfloat16)
    assert len(calls) == model.config.num_hidden_layers and len(flash) == 2 * len(calls)
    monkeypatch.setattr(Attention, "cascade_prefix", False)
    rows, _ = _shared_prefix_forward(model, prefix, tails, own, "cuda", torch.bfloat16)
    monkeypatch.setattr(Attention, "cascade_prefix", True)
    for i, t in enumerate(tails):
        ref = base(torch.tensor([prefix + t]))[0, cut[i]:]
        assert (got[i] - rows[i]).abs().max() < 0.05, i
        assert (got[i] - ref).abs().max() < 0.1 and (got[i].argmax(-1) == ref.argmax(-1)).float().mean() > 0.9, i
    caching_keeps_tokens(model, prefix, [prefix + t for t in tails])


def test_continuing_rows_in_one_varlen_call_float_math(monkeypatch):
    """The continuing rows' variable-length path (`_dense_varlen`, flash on the GPU) with the float-math stand-in
    on the CPU: each prompt's logits of its whole forward without a cache (float64)."""
    from cpm4.model import modeling
    from cpm4.model.modeling import Attention

    model = random_model("tiny", sparse_config=None)
    ps = prompts(5, seed=11, lo=40, hi=120)
    cut = [7, 30, 0, 55, 16]
    monkeypatch.setattr(Attention, "varlen_on_cpu", True)
    calls = []
    real = modeling.attention_lse
    monkeypatch.setattr(modeling, "attention_lse", lambda *a: calls.append(1) or real(*a))
    got = _rows_forward(model, ps, cut, "cpu", torch.float64)
    assert len(calls) == model.config.num_hidden_layers
    for i, p in enumerate(ps):
        torch.testing.assert_close(got[i], model(torch.tensor([p]))[0, cut[i]:].float(), rtol=1e-6, atol=1e-6)


def _interpreted_sparse_engine(monkeypatch, cache_kw: dict | None = None, **engine_kw) -> LLMEngine:
    """A one-layer InfLLM v2 engine (dense_len 40, 8 blocks of 16 selected) on Triton's interpreter, forced onto
    the Triton path, for the tests that compare kernel signatures (skips off the interpreter)."""
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        pytest.skip("interpreter test: runs on CPU only")
    from jit_signatures import interpreted

    from cpm4.kernels import infllm_v2

    if not interpreted():
        pytest.skip("signatures are read from the interpreter's launches")
    monkeypatch.setattr(infllm_v2, "uses_triton", lambda q: True)
    model = random_model("tiny", dtype=torch.float32, sparse_config=sparse(dense_len=40) | {"topk": 6},
                         num_hidden_layers=1)
    assert model.config.sparse_config.num_selected == 8  # 3 blocks and more are sparse: widths 4 and 8
    return LLMEngine(model, tok(), PagedKVCache(model.config, num_pages=40, page_size=16, **(cache_kw or {})),
                     max_model_len=128, **engine_kw)


@pytest.mark.slow
def test_prefill_kernels_compile_nothing_after_warm_up_interpreter(monkeypatch):
    """What the engine's own prefill steps launch (keys read from the pages, several sparse rows in one launch,
    rows continuing a cached prefix, contexts of fewer blocks than num_selected) has no InfLLM v2 prefill kernel
    signature its warm-up (`_warm_prefill`) did not launch: on the GPU each would compile and autotune inside a
    request (`benchmarks/jit_variants.py` counts them there). Triton's interpreter, forced onto the Triton path;
    the decode kernels are compiled by the CUDA graphs' capture in warm_up or, without graphs, by `_warm_decode`
    (the next test), not here."""
    import functools

    eng = _interpreted_sparse_engine(monkeypatch)
    from jit_signatures import launch_signatures, new_signatures

    from cpm4.kernels import infllm_v2

    # Fewer autotuning queries than the GPU's 1,024: the interpreter runs every program in Python.
    monkeypatch.setattr(infllm_v2, "warm_prefill_kernels",
                        functools.partial(infllm_v2.warm_prefill_kernels, queries=8))
    with launch_signatures() as warm:
        eng._warm_prefill()
    params = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
    ps = prompts(3, seed=5, lo=41, hi=90)
    with launch_signatures() as used:
        for i, p in enumerate(ps[:2]):  # whole prompts: two sparse rows in one step
            eng.add_request(f"a{i}", p, params)
        eng.run_to_completion()
        for i, p in enumerate([ps[2], ps[0][:40] + ps[1][:30]]):  # beside a row after a cached prefix of 2 pages
            eng.add_request(f"b{i}", p, params)
        eng.run_to_completion()
    prefill = ("cpm4.kernels.infllm_v2.triton_select", "cpm4.kernels.infllm_v2.triton_attention")
    assert {name for name, sigs in used.items() for s in sigs if s[0][1] in prefill} >= {
        "_select_kernel", "_fwd_token_kernel"}
    assert new_signatures({k: v for k, v in warm.items()}, {
        k: {s for s in v if s[0][1] in prefill} for k, v in used.items()}) == {}


@pytest.mark.slow
def test_eager_decode_kernels_compile_nothing_after_warm_up_interpreter(monkeypatch):
    """Eager decode (CUDA graphs off): the steps of a serving run — batches shrinking from 3 rows to 1 as
    requests end, contexts of 2 to 4 pages (21-51 tokens), rows crossing dense_len into sparse decoding, then
    dense rows after a cached 2-page prefix decoding as a cascade group — launch no decode kernel signature that
    warm_up's `_warm_decode` did not: the block table (and a group's page list) is `decode_width` wide in every
    step (before, its width followed the longest row, and the split counts, lanes and table stride with it: a
    compile per width class on the GPU), and the warm-up steps each batch size as a group too."""
    from cpm4.engine import paged

    monkeypatch.setattr(paged, "CASCADE_DECODE", True)
    monkeypatch.setattr(paged, "CASCADE_DECODE_MIN_TOKENS", 16)  # tiny shapes: a group of one shared page is one
    monkeypatch.setattr(paged, "CASCADE_DECODE_MIN_READS", 0)
    eng = _interpreted_sparse_engine(monkeypatch, dict(prefix_caching=True), max_batch_size=3)
    from jit_signatures import launch_signatures, new_signatures

    assert eng.graphs is None and eng.paged_decode and eng.decode_width == 16
    with launch_signatures() as warm:
        eng._warm_decode()
    decode = ("cpm4.kernels.infllm_v2.triton_decode", "cpm4.kernels.infllm_v2.triton_cascade")
    assert {name for name, sigs in warm.items() for s in sigs if s[0][1] in decode} >= {
        "_lse_kernel", "_score_kernel", "_shared_kernel"}
    prefix = prompts(1, seed=9, lo=32, hi=33)[0]
    with launch_signatures() as used:
        for i, (p, n) in enumerate(zip(prompts(3, seed=7, lo=20, hi=60), (3, 12, 30))):
            eng.add_request(f"r{i}", p, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))
        out = eng.run_to_completion()
        eng.add_request("prefix", prefix + [5], SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
        eng.run_to_completion()
        for i, t in enumerate(prompts(3, seed=8, lo=1, hi=4)):  # 33-35 tokens, then 4 more: dense rows
            eng.add_request(f"g{i}", prefix + t, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
        eng.run_to_completion()
    assert sorted(len(ids) for _, ids, _ in out.values()) == [3, 12, 30]
    steps = {k: {s for s in v if s[0][1] in decode} for k, v in used.items()}
    assert steps.get("_shared_kernel") and steps.get("_lse_kernel")  # a cascade group decoded, sparse rows too
    assert new_signatures(warm, steps) == {}


@pytest.mark.gpu
@pytest.mark.parametrize("graphs", [True, False])
def test_gpu_prefill_compiles_nothing_after_warm_up(graphs, monkeypatch):
    """On CUDA after warm_up (with CUDA graphs, and without: then the eager decode kernels too), InfLLM v2
    prompts of 3-7 blocks (fewer than the 8 selected: the count is a runtime argument), two in one step, then one
    continuing a cached prefix, compile no prefill kernel (Triton's post-compile hook); the GPU counterpart of
    `test_prefill_kernels_compile_nothing_after_warm_up_interpreter`."""
    from triton import knobs

    from cpm4.model import MiniCPM4ForCausalLM

    base = random_model("tiny", dtype=torch.float32, sparse_config=sparse(dense_len=40) | {"topk": 6})
    model = MiniCPM4ForCausalLM(base.config).to("cuda", torch.bfloat16)
    model.load_state_dict({k: v.to(torch.bfloat16) for k, v in base.state_dict().items()})
    cache = PagedKVCache(model.config, num_pages=64, page_size=16, device="cuda", dtype=torch.bfloat16)
    eng = LLMEngine(model, tok(), cache, max_batch_size=4, cuda_graphs=graphs, max_model_len=256)
    eng.warm_up()
    prefill = ("cpm4.kernels.infllm_v2.triton_select", "cpm4.kernels.infllm_v2.triton_attention")
    # Without graphs the decode steps are eager: `_warm_decode` compiled their kernels too.
    watched = prefill + (() if graphs else ("cpm4.kernels.infllm_v2.triton_decode",))
    compiled = []

    def hook(*args, **kwargs):
        fn = kwargs.get("fn")
        fn = getattr(fn, "fn", fn)
        if getattr(fn, "__module__", None) in watched:
            compiled.append(fn.__name__)

    monkeypatch.setattr(knobs.runtime, "jit_post_compile_hook", hook)
    params = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
    ps = prompts(3, seed=5, lo=41, hi=110)
    for i, p in enumerate(ps[:2]):
        eng.add_request(f"a{i}", p, params)
    eng.run_to_completion()
    for i, p in enumerate([ps[2], ps[0][:40] + ps[1][:30]]):
        eng.add_request(f"b{i}", p, params)
    eng.run_to_completion()
    assert compiled == []
