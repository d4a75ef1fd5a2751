"""Cascade decode (cpm4.kernels.infllm_v2.triton_cascade): rows sharing leading pages attend them once, the
rest of their pages per row, merged — against the float64 paged decode over each row's own pages. On the CPU in
Triton's interpreter (tiny shapes); the `gpu` test runs the real kernels in bf16."""

import math

import pytest
import torch

pytest.importorskip("triton")

from cpm4.kernels.infllm_v2 import reference as R  # noqa: E402
from cpm4.kernels.infllm_v2.triton_cascade import SharedPrefix  # noqa: E402
from cpm4.model.config import SparseConfig  # noqa: E402

CUDA = torch.cuda.is_available()
gpu = pytest.mark.gpu


def _setup(device, dtype, hq, hkv, d, page, lens, member, n_shared, width, seed=0):
    """A pool with NaN in every page no row owns; rows with member[i] start with the same n_shared pages."""
    b = len(lens)
    max_pages = max(math.ceil(n / page) for n in lens)
    n_pages = b * max_pages + 4
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n_pages, generator=g)
    table = perm[: b * max_pages].view(b, max_pages).clone()
    for i in range(b):
        if member[i]:
            table[i, :n_shared] = table[member.index(1), :n_shared]
    kc = torch.randn(n_pages, page, hkv, d, generator=g)
    vc = torch.randn(n_pages, page, hkv, d, generator=g)
    used = torch.zeros(n_pages, dtype=torch.bool)
    for i, n in enumerate(lens):
        used[table[i, : math.ceil(n / page)]] = True
    kc[~used], vc[~used] = float("nan"), float("nan")
    q = torch.randn(b, hq, d, generator=g)
    first = table[member.index(1)] if any(member) else table[0]
    pages = torch.cat([first[:n_shared], first[:1].expand(width - n_shared)]).to(torch.int32)
    shared = SharedPrefix(pages.to(device), torch.tensor([n_shared], dtype=torch.int32, device=device),
                          torch.tensor(member, dtype=torch.int32, device=device))
    t = dict(q=q, kc=kc, vc=vc)
    t = {k: v.to(device=device, dtype=dtype) for k, v in t.items()}
    return t["q"], t["kc"], t["vc"], table.to(device=device, dtype=torch.int32), \
        torch.tensor(lens, dtype=torch.int32, device=device), shared


def _cascade_on(monkeypatch, min_tokens: int = 32) -> list:
    """Cascade decode on (groups of at least min_tokens shared); returns the list each shared-pages launch
    appends its (count, member rows) to."""
    from cpm4.engine import paged

    monkeypatch.setattr(paged, "CASCADE_DECODE", True)
    monkeypatch.setattr(paged, "CASCADE_DECODE_MIN_TOKENS", min_tokens)
    monkeypatch.setattr(paged, "CASCADE_DECODE_MIN_READS", 0)  # tiny shapes: any group
    seen = []
    real = SharedPrefix.attend
    monkeypatch.setattr(SharedPrefix, "attend", lambda self, *a: seen.append((int(self.count), self.member.tolist()))
                        or real(self, *a))
    return seen


def _check(device, dtype, hq, hkv, d, page, lens, member, n_shared, tol, splits=2, width=None):
    from cpm4.kernels.infllm_v2.triton_decode import paged_decode

    q, kc, vc, table, seq, shared = _setup(device, dtype, hq, hkv, d, page, lens, member, n_shared,
                                           width or n_shared + 2)
    ref = R.paged_decode(q, kc, vc, table, seq)
    got = paged_decode(q, kc, vc, table, seq, splits=splits, shared=shared)
    assert torch.isfinite(got).all()
    err = (got.double() - ref).abs().max().item()
    assert err < tol, err
    plain = paged_decode(q, kc, vc, table, seq, splits=splits)
    assert (got.double() - plain.double()).abs().max().item() < tol


@pytest.mark.parametrize("hq,hkv,splits", [(4, 2, 1), (4, 2, 3), (6, 2, 2), (8, 1, 2)])
def test_interpreter_cascade_decode_equals_float64(hq, hkv, splits):
    """Rows 0, 1 and 3 share 3 pages of 16 (row 1 has one own token after them: its current one), rows 2 and 4
    are outside the group (row 4 a single token); odd (3) and single-KV-head groups; the own part in one split."""
    if CUDA:
        pytest.skip("interpreter test: runs on CPU only")
    _check("cpu", torch.float32, hq, hkv, 16, 16, lens=[60, 49, 37, 80, 1], member=[1, 1, 0, 1, 0], n_shared=3,
           tol=1e-5, splits=splits)


@pytest.mark.parametrize("own", [None, 1, 4])
def test_interpreter_cascade_decode_with_own_splits(monkeypatch, own):
    """The rows' own pages in `SharedPrefix.own_splits` splits (None: the paged decode's default)."""
    if CUDA:
        pytest.skip("interpreter test: runs on CPU only")
    monkeypatch.setattr(SharedPrefix, "own_splits", own)
    _check("cpu", torch.float32, 4, 2, 16, 16, lens=[60, 49, 37, 80, 1], member=[1, 1, 0, 1, 0], n_shared=3,
           tol=1e-5, splits=None)


def test_interpreter_cascade_decode_over_several_row_tiles(monkeypatch):
    """16 query vectors a program: 4 rows of a 4-head group per tile, so 7 rows take two tiles (the second
    partly past the batch) and a tile holding no member reads nothing."""
    if CUDA:
        pytest.skip("interpreter test: runs on CPU only")
    from cpm4.kernels.infllm_v2 import triton_cascade

    monkeypatch.setattr(triton_cascade, "TILE_QUERIES", 16)
    _check("cpu", torch.float32, 8, 2, 16, 16, lens=[60, 49, 37, 80, 1, 52, 90], member=[1, 1, 0, 1, 0, 1, 1],
           n_shared=3, tol=1e-5)
    _check("cpu", torch.float32, 8, 2, 16, 16, lens=[60, 49, 37, 20, 70, 52, 90], member=[0, 0, 0, 0, 1, 1, 1],
           n_shared=3, tol=1e-5)


def test_interpreter_cascade_decode_with_nothing_shared_or_every_row():
    if CUDA:
        pytest.skip("interpreter test: runs on CPU only")
    # count 0 (a graph replayed on a step without a group) and every row a member.
    _check("cpu", torch.float32, 4, 2, 16, 16, lens=[60, 49, 37], member=[1, 1, 0], n_shared=0, tol=1e-5, width=4)
    _check("cpu", torch.float32, 4, 2, 16, 16, lens=[70, 65, 99, 66], member=[1, 1, 1, 1], n_shared=4, tol=1e-5)


def test_cascade_needs_the_dense_decode_and_fitting_shapes():
    from cpm4.kernels.infllm_v2.triton_decode import paged_decode

    if CUDA:
        pytest.skip("interpreter test: runs on CPU only")
    q, kc, vc, table, seq, shared = _setup("cpu", torch.float32, 4, 2, 16, 16, [60, 49], [1, 1], 2, 4)
    blocks = torch.zeros(2, 2, 1, dtype=torch.int32)
    with pytest.raises(ValueError, match="dense paged decode"):
        paged_decode(q, kc, vc, table, seq, blocks, shared=shared)
    bad = SharedPrefix(shared.pages, shared.count, shared.member[:1])
    with pytest.raises(ValueError, match="member must be"):
        paged_decode(q, kc, vc, table, seq, shared=bad)


def test_shared_rows_finds_the_largest_group():
    import numpy as np

    from cpm4.engine.paged import shared_rows

    def find(rows, lens, min_pages):
        w = max(len(r) for r in rows)
        table = np.array([r + [99] * (w - len(r)) for r in rows], dtype=np.int32)  # padding: any page id
        got = shared_rows(table, np.array(lens), 16, min_pages)
        return None if got is None else (got[0].astype(int).tolist(), got[1])

    a = [10, 11, 12, 13]
    rows = [a[:3] + [20], [5, 6], a[:3] + [21, 22], a[:2] + [30], a[:3] + [40]]
    # Rows 0, 2, 3 and 4 start with page 10; row 3 stops sharing after 2 pages: the group's common run.
    assert find(rows, [60, 30, 70, 40, 49], 2) == ([1, 0, 1, 1, 1], 2)
    # Without row 3 three pages are common; a row whose current token lies in page 12 stops the run there.
    assert find([rows[0], rows[2], rows[4]], [60, 70, 49], 2) == ([1, 1, 1], 3)
    assert find([rows[0], rows[2], rows[4]], [60, 70, 48], 2) == ([1, 1, 1], 2)
    # The largest group wins; a row too short for min_pages stays out of it.
    rows = [[1, 2, 3], [1, 2, 4], [7, 8, 9], [7, 8, 5], [7, 8, 6]]
    assert find(rows, [40, 40, 40, 40, 40], 1) == ([0, 0, 1, 1, 1], 2)
    assert find(rows + [[1, 2, 5]], [40, 40, 40, 40, 16, 40], 1) == ([1, 1, 0, 0, 0, 1], 2)
    # Fewer than two rows past min_pages pages, or a run shorter than min_pages: none.
    assert find([rows[0], rows[1]], [60, 30], 2) is None
    assert find([a, a], [40, 40], 3) is None
    assert find([[1, 2, 3], [1, 5, 3]], [40, 40], 2) is None


@pytest.mark.parametrize("sparse_model", [False, True])
def test_cascade_decode_keeps_the_engines_tokens(monkeypatch, sparse_model):
    """Engine decode steps on the pages in place (interpreter) with cascade decode: rows after a cached prefix
    share its pages, attended once; greedy tokens as each prompt alone. An InfLLM v2 model: its dense rows
    (below dense_len) share them, a sparse row after the same prefix stays out of the group."""
    if CUDA:
        pytest.skip("interpreter test: runs on CPU only")
    from test_engine import alone, prompts, random_model, sparse, tokens_after_prefix

    from cpm4.engine.sampling import SamplingParams

    shared = _cascade_on(monkeypatch)
    model = random_model("tiny", dtype=torch.float32, sparse_config=sparse(dense_len=80) if sparse_model else None,
                         num_hidden_layers=2)
    prefix = prompts(1, seed=21, lo=50, hi=51)[0]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    ps = [prefix + t for t in prompts(3, seed=22, lo=3, hi=15)]  # at most 71 tokens with their outputs
    if sparse_model:
        ps.append(prefix + prompts(1, seed=25, lo=40, hi=41)[0])  # 90 tokens: past dense_len, a sparse row
    got = tokens_after_prefix(model, prefix, ps, params, dict(num_pages=60, page_size=16, prefix_caching=True),
                              max_batch_size=4, chunk_tokens=256, paged_decode=True)
    assert shared and max(c for c, _ in shared) == 3  # 50 tokens: 3 whole pages of 16 shared
    assert all(m[:3] == [1, 1, 1] and m[3:] in ([], [0]) for c, m in shared if c)
    for i, p in enumerate(ps):
        assert got[i] == alone(model, p, params), i


def _two_rows_after_prefix(monkeypatch):
    """Cascade decode on; a 2-layer model's engine whose two waiting requests follow a finished one's cached
    40-token prefix. Returns (the cascade launches list, model, cache, engine)."""
    from test_engine import prompts, random_model, tok

    from cpm4.engine.paged import PagedKVCache
    from cpm4.engine.sampling import SamplingParams
    from cpm4.engine.scheduler import LLMEngine

    launches = _cascade_on(monkeypatch)
    model = random_model("tiny", dtype=torch.float32, sparse_config=None, num_hidden_layers=2)
    cache = PagedKVCache(model.config, num_pages=30, page_size=16, prefix_caching=True)
    eng = LLMEngine(model, tok(), cache, max_batch_size=2, chunk_tokens=256, paged_decode=True)
    prefix = prompts(1, seed=23, lo=40, hi=41)[0]
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    eng.add_request("warm", prefix + [5], params)
    eng.run_to_completion()
    for i, t in enumerate(prompts(2, seed=24, lo=3, hi=9)):
        eng.add_request(f"r{i}", prefix + t, params)
    launches.clear()
    return launches, model, cache, eng


def test_compiled_decode_step_passes_the_shared_prefix(monkeypatch):
    """The compiled decode step's paged-attention custom op carries the shared prefix: one graph, the eager
    step's logits, and the cascade ran inside it."""
    if CUDA:
        pytest.skip("interpreter test: runs on CPU only")
    from test_engine import compiled_decode_matches_eager

    launches, model, cache, eng = _two_rows_after_prefix(monkeypatch)
    seqs = compiled_decode_matches_eager(model, cache, eng)
    assert cache.batch(seqs, decode=True).shared.count.tolist() == [2]  # 40 tokens: 2 whole pages of 16
    assert launches and {c for c, _ in launches} == {2}  # in the eager step and inside the compiled one


def test_graph_buffers_hold_the_steps_group(monkeypatch):
    """The captured decode steps' static buffers (built without a GPU here): the shared pages, their count and
    the member rows of each step, the count back to 0 when no group remains."""
    from test_engine import random_model

    from cpm4.engine import paged
    from cpm4.engine.cuda_graph import DecodeGraphs
    from cpm4.engine.paged import PagedKVCache, SeqPages

    _cascade_on(monkeypatch)
    model = random_model("tiny", dtype=torch.float32, sparse_config=None, num_hidden_layers=1)
    cache = PagedKVCache(model.config, num_pages=40, page_size=16)
    graphs = DecodeGraphs.__new__(DecodeGraphs)
    graphs.init_buffers(cache, 4, 8, torch.device("cpu"))
    seqs = [SeqPages() for _ in range(3)]
    for s, n in zip(seqs, (50, 70, 20)):
        cache.reserve(s, n + 1)
        s.length = n
    seqs[1].pages[:3] = seqs[0].pages[:3]  # rows 0 and 1 share 3 pages (as a cached prefix would)
    found = []
    real = paged.shared_rows
    monkeypatch.setattr(paged, "shared_rows", lambda *a: found.append(1) or real(*a))

    def step(rows):
        cols = graphs.host_table.update(rows, 4)
        _, _, ends = graphs._rows(rows, 4)
        return graphs._share(ends[:len(rows)], len(rows), 4, cols)

    assert step(seqs)  # the step replays the cascade graph
    assert graphs.shared.count.tolist() == [3] and graphs.shared.member.tolist() == [1, 1, 0, 0]
    assert graphs.shared.pages[:3].tolist() == seqs[0].pages[:3]
    cache.reserve(seqs[2], 40)  # row 2 grows a page: the same sequences in the same rows keep the group
    seqs[2].length += 30
    assert step(seqs)
    assert len(found) == 1 and graphs.shared.count.tolist() == [3]
    assert not step(seqs[1:])  # row 0 ended, the others moved up: found again, rows 1 and 2 share nothing
    assert len(found) == 2
    assert graphs.shared.count.tolist() == [0] and graphs.shared.member.tolist() == [0, 0, 0, 0]
    # 2 rows x 3 pages of 16 = 96 tokens read once instead of twice: below CASCADE_DECODE_MIN_READS, the plain step
    monkeypatch.setattr(paged, "CASCADE_DECODE_MIN_READS", 97)
    assert not step(seqs) and graphs.shared.count.tolist() == [0]


def test_cascade_group_needs_enough_reads_saved(monkeypatch):
    """`cascade_group`: the group `shared_rows` finds, only when members x shared tokens reach
    CASCADE_DECODE_MIN_READS (and its shared pages CASCADE_DECODE_MIN_TOKENS)."""
    import numpy as np

    from cpm4.engine import paged

    table = np.array([[1, 2, 3, 9], [1, 2, 3, 8], [1, 2, 3, 7], [4, 5, 6, 0]], dtype=np.int32)
    lens = np.array([60, 55, 50, 60])
    monkeypatch.setattr(paged, "CASCADE_DECODE_MIN_TOKENS", 32)
    for reads, expect in ((144, True), (145, False)):  # 3 members x 3 pages x 16 tokens = 144
        monkeypatch.setattr(paged, "CASCADE_DECODE_MIN_READS", reads)
        got = paged.cascade_group(table, lens, 16)
        assert (got is not None) == expect
        if expect:
            assert got[0].tolist() == [True, True, True, False] and got[1] == 3
    monkeypatch.setattr(paged, "CASCADE_DECODE_MIN_TOKENS", 64)  # 4 pages needed: the group shares 3
    monkeypatch.setattr(paged, "CASCADE_DECODE_MIN_READS", 0)
    assert paged.cascade_group(table, lens, 16) is None


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16])
@pytest.mark.parametrize("hq,hkv,d", [(32, 2, 128), (16, 2, 64), (12, 4, 64)])
def test_gpu_cascade_decode(dtype, hq, hkv, d):
    if not CUDA:
        pytest.skip("needs CUDA")
    lens = [3000 + 7 * i for i in range(40)] + [100, 5000, 1]
    member = [1] * 40 + [0, 0, 0]
    _check("cuda", dtype, hq, hkv, d, 64, lens, member, n_shared=2900 // 64, tol=2e-2, splits=8)


def _check_sparse_step(device, dtype, tol):
    """The InfLLM v2 decode step with a shared prefix over rows of which some are sparse (dense_len tokens or
    more) though marked members, as a captured step's group stays while a member grows past dense_len: the
    outputs of the step without the shared prefix (each row's own pages or selected blocks)."""
    from test_infllm_v2_triton import paged_sequences, small_cfg

    from cpm4.kernels.infllm_v2.triton_decode import paged_sparse_decode

    page = 16 if device == "cpu" else 64
    cfg = small_cfg("gen-b", dense_len=40) if device == "cpu" else SparseConfig(
        variant="gen-b", kernel_size=32, kernel_stride=16, init_blocks=1, block_size=64, window_size=128, topk=4,
        dense_len=1024)
    unit = cfg.dense_len / 40  # the CPU's shapes scaled to the GPU's
    lens = [int(x * unit) for x in (33, 38, 60, 45, 20, 39)] + [int(41 * unit)]
    member = [1, 1, 1, 1, 0, 1, 0]  # rows 2 and 3 sparse members; row 6 sparse, not a member
    kc, vc, table, _, _, stores = paged_sequences(lens, page, 2, 16 if device == "cpu" else 64, dtype, device, cfg,
                                                  seed=5)
    n_sh = int(32 * unit) // page  # 2 pages of 16 on the CPU, 12 of 64 on the GPU: before every member's last token
    for i, m in enumerate(member):
        if m:  # the members' first pages are row 0's (their keys there as row 0's: what they read either way)
            table[i, :n_sh] = table[0, :n_sh]
    q = torch.randn(len(lens), 4 if device == "cpu" else 8, kc.shape[-1], device=device).to(dtype)
    shared = SharedPrefix(table[0, :n_sh + 2].contiguous(), torch.tensor([n_sh], dtype=torch.int32, device=device),
                          torch.tensor(member, dtype=torch.int32, device=device))
    lt = torch.tensor(lens, dtype=torch.int32, device=device)
    args = (q, kc, vc, table, lt, stores["fine"], stores["coarse"], cfg)
    plain = paged_sparse_decode(*args)
    got = paged_sparse_decode(*args, shared=shared)
    assert torch.isfinite(got).all()
    err = (got.double() - plain.double()).abs().max(-1).values.max(-1).values
    assert (err < tol).all(), err.tolist()


def test_interpreter_cascade_in_the_sparse_step_leaves_sparse_members_out():
    if CUDA:
        pytest.skip("interpreter test: runs on CPU only")
    _check_sparse_step("cpu", torch.float32, 1e-5)


@gpu
def test_gpu_cascade_in_the_sparse_step_leaves_sparse_members_out():
    if not CUDA:
        pytest.skip("needs CUDA")
    _check_sparse_step("cuda", torch.bfloat16, 1e-2)


@gpu
@pytest.mark.parametrize("sparse_model,compile", [(False, False), (True, False), (False, True)])
def test_gpu_cascade_decode_in_cuda_graphs(monkeypatch, sparse_model, compile):
    """Captured decode steps with cascade decode, float32 (in bf16 a random model's near-ties flip tokens
    either way: the kernels' bf16 error is the GPU kernel tests'): the engine's greedy tokens after a cached
    prefix as with it off; for an InfLLM v2 model beside a sparse row after the same prefix and a member
    that grows past dense_len while its group stays. compile: both graphs of a bucket from one compiled step."""
    if not CUDA:
        pytest.skip("needs CUDA")
    from test_engine import prompts, random_model, tokens_after_prefix

    from cpm4.engine import paged
    from cpm4.engine.cuda_graph import DecodeGraphs
    from cpm4.engine.sampling import SamplingParams

    sc = {"kernel_size": 32, "kernel_stride": 16, "init_blocks": 1, "block_size": 64, "window_size": 128,
          "topk": 4, "dense_len": 1024, "variant": "gen-b"}
    model = random_model("tiny", dtype=torch.float32, sparse_config=sc if sparse_model else None).to("cuda")
    prefix = prompts(1, seed=31, lo=300, hi=301)[0]
    batch = [prefix + t for t in prompts(6, seed=32, lo=3, hi=40)]
    if sparse_model:
        batch.append(prefix + prompts(1, seed=33, lo=900, hi=901)[0])  # 1,200 tokens: a sparse row
        batch.append(prefix + prompts(1, seed=34, lo=718, hi=719)[0])  # 1,018: sparse after its 6th token
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    monkeypatch.setattr(paged, "CASCADE_DECODE_MIN_TOKENS", 128)
    monkeypatch.setattr(paged, "CASCADE_DECODE_MIN_READS", 0)
    groups = []  # each captured step's shared page count and member rows
    real = DecodeGraphs._share

    def share(self, *a):
        found = real(self, *a)
        groups.append((int(self.shared.count), self.shared.member.tolist()))
        return found

    monkeypatch.setattr(DecodeGraphs, "_share", share)
    out = {}
    for on in (True, False):
        monkeypatch.setattr(paged, "CASCADE_DECODE", on)
        groups.clear()
        out[on] = tokens_after_prefix(model, prefix, batch, params,
                                      dict(num_pages=200, page_size=64, device="cuda", dtype=torch.float32,
                                           prefix_caching=True), max_batch_size=8, paged_decode=True,
                                      compile=compile, cascade_decode=on)
        assert (max(c for c, _ in groups) == 300 // 64) if on else not groups  # 4 whole pages of 64 shared
        if on and sparse_model:
            assert any(m[7] == 1 for c, m in groups if c)  # the growing row was a member
    assert out[True] == out[False]


def test_engine_option_decides_cascade_decode(monkeypatch):
    """LLMEngine(cascade_decode=...): False keeps a step with a group plain, None follows paged.CASCADE_DECODE;
    an InfLLM v2 model without dense rows never cascades."""
    from test_engine import prompts, random_model, tok

    from cpm4.engine import paged
    from cpm4.engine.paged import PagedKVCache
    from cpm4.engine.sampling import SamplingParams
    from cpm4.engine.scheduler import LLMEngine

    launches = _cascade_on(monkeypatch)
    model = random_model("tiny", dtype=torch.float32, sparse_config=None, num_hidden_layers=1)
    prefix = prompts(1, seed=23, lo=40, hi=41)[0]
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    for option, expect in ((False, False), (None, True)):
        cache = PagedKVCache(model.config, num_pages=30, page_size=16, prefix_caching=True)
        eng = LLMEngine(model, tok(), cache, max_batch_size=2, chunk_tokens=256, paged_decode=True,
                        cascade_decode=option)
        assert paged.cascade_on(cache) == expect
        eng.add_request("warm", prefix + [5], params)
        eng.run_to_completion()
        launches.clear()
        for i, t in enumerate(prompts(2, seed=24, lo=3, hi=9)):
            eng.add_request(f"r{i}", prefix + t, params)
        eng.run_to_completion()
        assert bool(launches) == expect
    sparse_only = random_model("tiny", dtype=torch.float32, num_hidden_layers=1,
                               sparse_config={"kernel_size": 8, "kernel_stride": 4, "init_blocks": 1, "block_size": 16,
                                              "window_size": 32, "topk": 2, "dense_len": -1, "variant": "gen-b"})
    assert not paged.cascade_on(PagedKVCache(sparse_only.config, num_pages=4, page_size=16))


def test_one_compilation_serves_both_graphs_of_a_bucket(monkeypatch):
    """The compiled decode step takes the shared buffers in both of a bucket's graphs: under
    `paged.cascade_paused` (the plain graph's capture) the op reads every page itself and launches no cascade,
    outside it cascades; the same logits either way and dynamo compiles the step once."""
    if CUDA:
        pytest.skip("interpreter test: runs on CPU only")
    from cpm4.engine import paged

    launches, model, cache, eng = _two_rows_after_prefix(monkeypatch)
    eng.step()  # prefill both
    seqs = [r.pages for r in eng.running]
    for s in seqs:
        cache.reserve(s, 1)
    ids = torch.tensor([[r.state.generated[-1]] for r in eng.running])
    ones = torch.ones(2, dtype=torch.long)
    compiles = []

    def backend(gm, example_inputs):
        compiles.append(1)
        return gm.forward

    with torch.inference_mode():
        batch = cache.batch(seqs, decode=True)
        assert batch.shared is not None
        plain_batch = cache.batch(seqs, decode=True)
        plain_batch.shared = None
        ref = model(ids, plain_batch, ones, last_only=True)
        paged.make_opaque_to_compile()
        step = torch.compile(model, backend=backend, dynamic=False)
        launches.clear()
        with paged.cascade_paused():
            paused = step(ids, batch, ones, last_only=True)
        assert not launches
        live = step(ids, batch, ones, last_only=True)
        assert launches
    assert len(compiles) == 1
    torch.testing.assert_close(paused, ref)
    torch.testing.assert_close(live, ref)
