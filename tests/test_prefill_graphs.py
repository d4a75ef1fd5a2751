"""Packed prefill steps through the pieces between their attention calls (`cpm4.engine.prefill_graphs`): off the
GPU the pieces run directly on the same padded buffers (capture=False), so the step's split, the bucket padding and
the buffers' plumbing are checked against the layer-by-layer step (float64) and each prompt alone; on CUDA the
captured graphs against the eager step (bf16) and the engine's tokens with and without them."""

import pytest
import torch
from conftest import random_model
from test_engine import assert_each_alone, prompts, run_burst, sparse, tok
from test_packed_prefill import _step

from cpm4.engine import prefill_graphs
from cpm4.engine.paged import PagedKVCache, SeqPages
from cpm4.engine.prefill_graphs import PrefillGraphs, _alias
from cpm4.engine.sampling import SamplingParams
from cpm4.engine.scheduler import LLMEngine
from cpm4.model.modeling import Attention


@pytest.mark.parametrize("sc", [None, sparse(dense_len=4096)])
@pytest.mark.parametrize("cached", [[0, 0, 0, 0], [0, 37, 0, 5]])
@pytest.mark.parametrize("wider", [False, True])
def test_pieces_equal_the_layer_loop(monkeypatch, sc, cached, wider):
    """A packed step padded to its bucket (≈ 100-250 tokens padded to 256) gives each row the logits of the
    layer-by-layer step, and those of its whole prompt without a cache."""
    monkeypatch.setattr(Attention, "varlen_on_cpu", True)
    monkeypatch.setattr(prefill_graphs, "WIDER", wider)
    monkeypatch.setattr(prefill_graphs, "BUCKETS", (64, 128, 256))
    model = random_model("tiny", dtype=torch.float64, sparse_config=sc)
    ps = prompts(4, seed=71, lo=20, hi=90)
    want, _ = _step(model, ps, cached, scatter_seed=5)
    model.prefill_graphs = graphs = PrefillGraphs(model, 300, capture=False)
    assert graphs.sizes == [64, 128, 256, 300]
    got, _ = _step(model, ps, cached, scatter_seed=5)
    # the cached prefixes ran one row at a time: not packed, through the pieces only with WIDER
    assert graphs.steps == 1 + wider * sum(c > 0 for c in cached)
    for i, (p, c) in enumerate(zip(ps, cached)):
        torch.testing.assert_close(got[i], want[i], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(got[i], model.prefill_graphs.model(torch.tensor([p]))[0, c:].float(),
                                   rtol=1e-6, atol=1e-6)


def test_steps_the_pieces_do_not_take(monkeypatch):
    """More tokens than the largest bucket, or (without `WIDER`) sparse rows: the layer loop, same logits."""
    monkeypatch.setattr(Attention, "varlen_on_cpu", True)
    monkeypatch.setattr(prefill_graphs, "WIDER", False)
    model = random_model("tiny", dtype=torch.float64, sparse_config=sparse(dense_len=40))
    ps = prompts(3, seed=72, lo=50, hi=90)  # every row past dense_len: sparse
    want, _ = _step(model, ps, [0, 0, 0])
    model.prefill_graphs = graphs = PrefillGraphs(model, 1000, capture=False)
    got, _ = _step(model, ps, [0, 0, 0])
    assert graphs.steps == 0
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    model = random_model("tiny", dtype=torch.float64, sparse_config=None)
    want, _ = _step(model, ps, [0, 0, 0])
    model.prefill_graphs = graphs = PrefillGraphs(model, sum(map(len, ps)) - 1, capture=False)
    got, _ = _step(model, ps, [0, 0, 0])
    assert graphs.steps == 0
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("cached", [0, 37])
@pytest.mark.parametrize("scatter", [None, 4])
def test_one_row_steps_through_the_pieces(monkeypatch, cached, scatter):
    """`WIDER`: a lone prompt's step (fresh, or after cached tokens; pages in order or scattered) through the
    pieces gives the layer loop's logits (float64) and the same cache (kernel keys too); off, the layer loop."""
    monkeypatch.setattr(Attention, "varlen_on_cpu", True)
    monkeypatch.setattr(prefill_graphs, "BUCKETS", (64, 128))
    model = random_model("tiny", dtype=torch.float64, sparse_config=sparse(dense_len=4096))
    p = prompts(1, seed=76, lo=90, hi=91)[0]
    runs = []
    for wider in (False, True):
        monkeypatch.setattr(prefill_graphs, "WIDER", wider)
        model.prefill_graphs = graphs = PrefillGraphs(model, 200, capture=False)
        got, cache = _step(model, [p], [cached], scatter_seed=scatter)
        assert graphs.steps == int(wider) * (1 + bool(cached))  # (the cached part ran first, one row too)
        runs.append((got[0], cache))
    (a, ca), (b, cb) = runs
    torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)
    for store in ("k", "v", "fine", "coarse"):
        for x, y in zip(getattr(ca, store), getattr(cb, store)):
            torch.testing.assert_close(y, x, rtol=1e-12, atol=1e-12)


def test_takes(monkeypatch):
    monkeypatch.setattr(Attention, "varlen_on_cpu", True)
    model = random_model("tiny", dtype=torch.float32, sparse_config=None)
    graphs = PrefillGraphs(model, 100, capture=False)
    cache = PagedKVCache(model.config, num_pages=8, page_size=16).batch([SeqPages(), SeqPages()])
    for host, t, narrow, wide in ((([0, 0], [30, 20]), 30, True, True),  # packed, all dense
                                  (([0, 0], [30, 30]), 30, False, True),  # no padding: the layer loop does not pack
                                  (([0], [30]), 30, False, True),  # one row
                                  (([0, 0], [60, 50]), 60, False, False),  # more than max_tokens
                                  (([0, 0], [30, 0]), 30, False, False)):  # a row without new tokens
        for wider, want in ((False, narrow), (True, wide)):
            monkeypatch.setattr(prefill_graphs, "WIDER", wider)
            assert graphs.takes(cache, host, t) == want, (host, wider)


@pytest.mark.parametrize("seed", range(16))
def test_wider_fuzz(monkeypatch, seed):
    """`WIDER`, seeded random steps: rows after shared cached prefixes (cascades), rows with more of their own
    tokens cached, rows without a prefix, InfLLM v2 rows past a short dense_len, one row or several, random pages:
    through the pieces (padded to a bucket) every row's logits equal the layer loop's (float64)."""
    import random

    from test_cascade_fuzz import _step as prefix_step

    monkeypatch.setattr(Attention, "varlen_on_cpu", True)
    monkeypatch.setattr(Attention, "cascade_min_tokens", 16)
    monkeypatch.setattr(prefill_graphs, "BUCKETS", (64, 256))
    monkeypatch.setattr(prefill_graphs, "WIDER", True)
    rng = random.Random(seed)
    sc = [None, sparse(dense_len=4096), sparse(dense_len=40)][seed % 3]
    model = random_model("tiny", dtype=torch.float64, sparse_config=sc)
    prefixes = [[rng.randrange(3, 1000) for _ in range(rng.randrange(16, 70))] for _ in range(rng.randrange(1, 3))]
    rows = []
    for _ in range(1 if seed % 4 == 3 else rng.randrange(2, 6)):
        k = rng.randrange(len(prefixes) + 1)
        head = prefixes[k] if k < len(prefixes) else []
        rows.append((head + [rng.randrange(3, 1000) for _ in range(rng.randrange(1, 40))],
                     rng.choice([0, 0, rng.randrange(1, 20)])))
    want, cut = prefix_step(model, prefixes, rows, random.Random(seed))
    model.prefill_graphs = graphs = PrefillGraphs(model, 400, capture=False)
    got, cut2 = prefix_step(model, prefixes, rows, random.Random(seed))
    assert cut2 == cut and graphs.steps >= 1
    for i, (a, b) in enumerate(zip(got, want)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=lambda m, i=i: f"row {i}: {m}")


@pytest.mark.parametrize("together", [True, False])
def test_engine_through_the_pieces_equals_alone(monkeypatch, together):
    """Through the engine, each request's greedy tokens are those of the request alone: a burst of prompts in packed
    steps (chunks cutting prompts, later steps continuing them beside fresh ones), or with `WIDER` prompts one at a
    time (one-row steps, chunked past chunk_tokens)."""
    monkeypatch.setattr(Attention, "varlen_on_cpu", True)
    monkeypatch.setattr(prefill_graphs, "BUCKETS", (32, 96) if together else (32, 64))
    monkeypatch.setattr(prefill_graphs, "WIDER", not together)
    model = random_model("tiny", dtype=torch.float32, sparse_config=None)
    ps = prompts(6, seed=73, lo=10, hi=120) if together else prompts(3, seed=77, lo=10, hi=150)
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    chunk = 150 if together else 100
    eng = LLMEngine(model, tok(), PagedKVCache(model.config, num_pages=96, page_size=16),
                    max_batch_size=len(ps) if together else 1, chunk_tokens=chunk)
    model.prefill_graphs = graphs = PrefillGraphs(model, chunk, capture=False)
    if together:
        res = run_burst(eng, ps, params)
    else:
        res = {}
        for i, p in enumerate(ps):
            eng.add_request(f"r{i}", p, params)
            res.update(eng.run_to_completion())
    assert graphs.steps >= (2 if together else len(ps))
    monkeypatch.setattr(Attention, "varlen_on_cpu", False)
    model.prefill_graphs = None
    assert_each_alone(res, model, ps, params)


def test_out_of_memory_while_capturing_falls_back_to_the_layer_loop(monkeypatch):
    """A capture that runs out of device memory (in warm_up or on a bucket's first use) warns, drops the graphs for
    good and the step runs the layer loop: the same logits, nothing lost."""
    monkeypatch.setattr(Attention, "varlen_on_cpu", True)
    model = random_model("tiny", dtype=torch.float64, sparse_config=None)
    ps = prompts(3, seed=76, lo=20, hi=90)
    want, _ = _step(model, ps, [0, 0, 0])
    for warm in (False, True):
        model.prefill_graphs = graphs = PrefillGraphs(model, 300, capture=False)
        graphs.capture = True  # as on CUDA, with a capture that cannot get its memory
        tried = []

        def oom(nb, tried=tried):
            tried.append(nb)
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (test)")

        monkeypatch.setattr(graphs, "_capture", oom)
        if warm:
            with pytest.warns(UserWarning, match="prefill graphs"):
                graphs.warm_up()
            assert tried == [graphs.sizes[-1]] and graphs.disabled
            got, _ = _step(model, ps, [0, 0, 0])
        else:
            with pytest.warns(UserWarning, match="prefill graphs"):
                got, _ = _step(model, ps, [0, 0, 0])
            assert len(tried) == 1 and graphs.disabled
        assert graphs.steps == 0 and not graphs.chains and len(tried) == 1  # never tried again
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        with pytest.raises(RuntimeError, match="gave up"):
            graphs.run(torch.zeros(4, dtype=torch.long), torch.arange(4), None, None, None, ([0], [4]), None)


def test_alias_reads_the_memory_without_owning_it():
    base = torch.arange(24.0)
    view = base[4:].view(4, 5)[:, 1:]  # an offset, a stride
    a = _alias(view)
    assert a.shape == view.shape and a.stride() == view.stride() and a.data_ptr() == view.data_ptr()
    base[10] = -1.0  # row 1 of the view starts at base[4 + 5], its column 0 is base[10]
    assert a[1, 0] == -1.0 and torch.equal(a, view)


def test_chains_dropped_when_weights_or_ops_change():
    """Captured chains read the weights by address: fusing or unfusing the projections, or other element-wise
    ops, drops them (captured again on use); nothing else does."""
    model = random_model("tiny", dtype=torch.float32, sparse_config=None)
    graphs = PrefillGraphs(model, 256, capture=False)
    graphs._current()
    class Replaced(torch.nn.Module):  # a module without a weight tensor (a quantized projection, say)
        def forward(self, x):
            return x

    def replace():
        model.model.layers[0].self_attn.q_proj = Replaced()

    for change in (model.fuse_projections, lambda: model.fuse_elementwise(True, backend="triton"),
                   model.unfuse_projections, replace):
        graphs.chains[256] = "captured"
        graphs._current()
        assert graphs.chains  # unchanged model: kept
        change()
        graphs._current()
        assert not graphs.chains
    model.prefill_graphs = graphs
    model.to(torch.float64)  # another placement: the graphs' buffers and weights are the old ones
    assert model.prefill_graphs is None


def test_capture_limit():
    """Where a step stops being host-bound, by the documented formula: 0.6 ms of launches a layer against
    2 x params a token at 400 TFLOP/s, rounded up to 512, at most the chunk."""
    from cpm4.engine.prefill_graphs import capture_limit
    from cpm4.model import MiniCPM4ForCausalLM
    from cpm4.model.config import preset

    for name, want in (("minicpm4-0.5b", 8192), ("minicpm4-8b", 512)):
        with torch.device("meta"):
            model = MiniCPM4ForCausalLM(preset(name))
        c = model.config
        per_token = 2 * c.num_hidden_layers * (c.hidden_size * c.dim_head * (2 * c.num_attention_heads
                                                                            + 2 * c.num_key_value_heads)
                                               + 3 * c.hidden_size * c.intermediate_size)
        tokens = 0.6e-3 * c.num_hidden_layers / (per_token / 400e12)
        assert want - 512 < tokens <= want
        assert capture_limit(model, 100_000) == want
        assert capture_limit(model, 300) == 300  # the chunk bounds it


def test_usable(monkeypatch):
    """Without the variable-length flash call (a float32 model, or the CPU) no step takes the pieces but with
    `WIDER`: nothing worth capturing."""
    model = random_model("tiny", dtype=torch.float32, sparse_config=None)  # (the graphs hold it weakly)
    graphs = PrefillGraphs(model, 256, capture=False)
    monkeypatch.setattr(prefill_graphs, "WIDER", False)
    assert not graphs.usable()
    monkeypatch.setattr(prefill_graphs, "WIDER", True)
    assert graphs.usable()
    monkeypatch.setattr(prefill_graphs, "WIDER", False)
    monkeypatch.setattr(Attention, "varlen_on_cpu", True)
    assert graphs.usable()


def test_errors():
    model = random_model("tiny", dtype=torch.float32, sparse_config=None)
    with pytest.raises(ValueError, match="CUDA"):
        PrefillGraphs(model, 256, capture=True)
    with pytest.raises(ValueError, match="max_tokens"):
        PrefillGraphs(model, 0)
    with pytest.raises(ValueError, match="prefill_graphs needs the cache on a CUDA device"):
        LLMEngine(model, tok(), PagedKVCache(model.config, num_pages=8, page_size=16), prefill_graphs=True)
    LLMEngine(model, tok(), PagedKVCache(model.config, num_pages=8, page_size=16))
    assert model.prefill_graphs is None  # the CPU default


def _cuda_model():
    """The tiny model in bf16 on CUDA, projections fused (as the engine runs it)."""
    from cpm4.model import MiniCPM4ForCausalLM

    base = random_model("tiny", dtype=torch.float32, sparse_config=None)
    model = MiniCPM4ForCausalLM(base.config).to("cuda", torch.bfloat16)
    model.load_state_dict({k: v.to(torch.bfloat16) for k, v in base.state_dict().items()})
    model.fuse_projections()
    return model


def _tokens_with_and_without(model, batches: list[list[list[int]]], **engine_kw) -> None:
    """Each batch of prompts run to its end in turn, on an engine with prefill graphs and on one without: the greedy
    tokens agree (but for a bf16 near tie in one request), and the graphs took steps."""
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    out = {}
    for on in (True, False):
        eng = LLMEngine(model, tok(), PagedKVCache(model.config, num_pages=400, page_size=64, device="cuda",
                                                   dtype=torch.bfloat16), prefill_graphs=on, **engine_kw)
        eng.warm_up()
        assert (model.prefill_graphs is not None) == on
        before = model.prefill_graphs.steps if on else 0
        out[on] = {}
        for b, batch in enumerate(batches):
            for i, p in enumerate(batch):
                eng.add_request(f"b{b}r{i}", p, params)
            out[on].update(eng.run_to_completion())
        if on:
            assert model.prefill_graphs.steps > before
    same = sum(out[True][k][1] == out[False][k][1] for k in out[False])
    assert same >= len(out[False]) - 1  # bf16: a near tie may break the other way in one request


@pytest.mark.gpu
@pytest.mark.parametrize("cached", [[0, 0, 0, 0], [0, 37, 0, 5]])
@pytest.mark.parametrize("wider", [False, True])
def test_prefill_graphs_on_cuda(monkeypatch, cached, wider):
    """Captured (bf16, flash): each row's logits within bf16 rounding of the eager packed step; every bucket
    captured by warm_up; the engine's greedy tokens with the graphs equal those without them."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    monkeypatch.setattr(prefill_graphs, "WIDER", wider)
    model = _cuda_model()
    ps = prompts(4, seed=74, lo=20, hi=150)
    # `_step` prefills each cached prefix alone first: through the pieces too with WIDER
    per = 1 + wider * sum(c > 0 for c in cached)
    with torch.no_grad():
        want, _ = _step(model, ps, cached, device="cuda", dtype=torch.bfloat16)
        model.prefill_graphs = graphs = PrefillGraphs(model, 1024)
        graphs.warm_up()
        assert sorted(graphs.chains) == graphs.sizes
        for _ in range(2):  # the second replays what the first left in the buffers
            got, _ = _step(model, ps, cached, device="cuda", dtype=torch.bfloat16)
            for i, (a, b) in enumerate(zip(got, want)):
                assert (a - b).abs().max() < 0.05, i
                assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.95, i
        assert graphs.steps == 2 * per
        model.unfuse_projections()  # the chains read the fused weights: captured again over the separate ones
        got, _ = _step(model, ps, cached, device="cuda", dtype=torch.bfloat16)
        used = {next(b for b in graphs.sizes if b >= n) for n in [sum(map(len, ps)) - sum(cached)]
                + [c for c in cached if wider and c]}
        assert graphs.steps == 3 * per and sorted(graphs.chains) == sorted(used)
        for i, (a, b) in enumerate(zip(got, want)):
            assert (a - b).abs().max() < 0.05, i
        model.fuse_projections()
    _tokens_with_and_without(model, [prompts(12, seed=75, lo=30, hi=400)], max_batch_size=12, chunk_tokens=1024)


@pytest.mark.gpu
def test_one_row_on_cuda(monkeypatch):
    """`WIDER` captured (bf16, flash): a lone prompt's logits, fresh and after cached tokens, within bf16 rounding
    of the layer loop's; requests one at a time through the engine give the tokens they give without the graphs."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    monkeypatch.setattr(prefill_graphs, "WIDER", True)
    model = _cuda_model()
    p = prompts(1, seed=78, lo=300, hi=301)[0]
    with torch.no_grad():
        for cached in (0, 77):
            model.prefill_graphs = None
            want, _ = _step(model, [p], [cached], device="cuda", dtype=torch.bfloat16)
            model.prefill_graphs = graphs = PrefillGraphs(model, 512)
            got, _ = _step(model, [p], [cached], device="cuda", dtype=torch.bfloat16)
            assert graphs.steps == 1 + bool(cached)
            assert (got[0] - want[0]).abs().max() < 0.05
            assert (got[0].argmax(-1) == want[0].argmax(-1)).float().mean() > 0.95
    _tokens_with_and_without(model, [[p] for p in prompts(4, seed=79, lo=30, hi=700)], max_batch_size=4,
                             chunk_tokens=512)
