"""Cascade decode (cpm4.kernels.infllm_v2.triton_cascade): rows sharing leading pages attend them once, the
rest of their pages per row, merged — against the float64 paged decode over each row's own pages. On the CPU in
Triton's interpreter (tiny shapes); the `gpu` test runs the real kernels in bf16."""

import math

import numpy as np
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
    appends its (largest group's page count, member rows) to."""
    from cpm4.engine import paged

    monkeypatch.setattr(paged, "CASCADE_DECODE", True)
    monkeypatch.setattr(paged, "CASCADE_DECODE_MIN_TOKENS", min_tokens)
    monkeypatch.setattr(paged, "CASCADE_DECODE_MIN_READS", 0)  # tiny shapes: any group
    seen = []
    real = SharedPrefix.attend
    monkeypatch.setattr(SharedPrefix, "attend",
                        lambda self, *a: seen.append((int(self.count.max()), self.member.tolist())) or real(self, *a))
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


def _check_groups(device, dtype, tol, hq=8, hkv=2, d=16, page=16):
    """Two groups in one batch (member k + 1), their rows interleaved, with rows in no group between them; a
    third group slot unused (count 0): against float64 and the plain decode."""
    from cpm4.kernels.infllm_v2.triton_decode import paged_decode

    lens, groups = [60, 49, 37, 80, 1, 52, 90, 70], [1, 2, 0, 1, 0, 2, 1, 2]
    lens = [n * page // 16 for n in lens]
    q, kc, vc, table, seq, _ = _setup(device, dtype, hq, hkv, d, page, lens, [int(x == 1) for x in groups], 3, 5)
    for i in (5, 7):  # group 2: rows 1, 5 and 7 share row 1's first 2 pages (pages other rows use: no NaN)
        table[i, :2] = table[1, :2]
    pages = torch.stack([table[0, :5], table[1, :5], table[2, :5]]).to(torch.int32)
    i32 = dict(dtype=torch.int32, device=device)
    shared = SharedPrefix(pages, torch.tensor([3, 2, 0], **i32), torch.tensor(groups, **i32))
    ref = R.paged_decode(q.double(), kc.double(), vc.double(), table, seq)
    got = paged_decode(q, kc, vc, table, seq, splits=2, shared=shared)
    assert torch.isfinite(got).all() and (got.double() - ref).abs().max().item() < tol
    plain = paged_decode(q, kc, vc, table, seq, splits=2)
    assert (got.double() - plain.double()).abs().max().item() < tol
    # The tiles in arrival order (each holds rows of both groups and rows of none): the same outputs.
    arrival = SharedPrefix(pages, shared.count, shared.member, torch.arange(len(lens), **i32))
    got = paged_decode(q, kc, vc, table, seq, splits=2, shared=arrival)
    assert torch.isfinite(got).all() and (got.double() - ref).abs().max().item() < tol
    with pytest.raises(ValueError, match=r"count \[3\] \(one per group\)"):
        paged_decode(q, kc, vc, table, seq, shared=SharedPrefix(pages, shared.count[:2], shared.member))


def test_interpreter_cascade_decode_with_several_groups(monkeypatch):
    """Groups straddling tiles of 4 rows (16 query vectors a program)."""
    if CUDA:
        pytest.skip("interpreter test: runs on CPU only")
    from cpm4.kernels.infllm_v2 import triton_cascade

    monkeypatch.setattr(triton_cascade, "TILE_QUERIES", 16)
    _check_groups("cpu", torch.float32, 1e-5)


@gpu
def test_gpu_cascade_decode_with_several_groups():
    if not CUDA:
        pytest.skip("needs CUDA")
    _check_groups("cuda", torch.bfloat16, 3e-2, hq=32, hkv=2, d=128, page=64)


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
    with pytest.raises(ValueError, match="member and order must be"):
        paged_decode(q, kc, vc, table, seq, shared=bad)


def test_shared_groups_finds_each_group_most_reads_first():
    import numpy as np

    from cpm4.engine.paged import shared_groups

    def find(rows, lens, min_pages, max_groups=1):
        w = max(len(r) for r in rows)
        table = np.array([r + [99] * (w - len(r)) for r in rows], dtype=np.int32)  # padding: any page id
        return [(m.astype(int).tolist(), p) for m, p in shared_groups(table, np.array(lens), 16, min_pages,
                                                                       max_groups=max_groups)]

    a = [10, 11, 12, 13]
    rows = [a[:3] + [20], [5, 6], a[:3] + [21, 22], a[:2] + [30], a[:3] + [40]]
    # Rows 0, 2, 3 and 4 start with page 10; row 3 stops sharing after 2 pages: the group's common run.
    assert find(rows, [60, 30, 70, 40, 49], 2) == [([1, 0, 1, 1, 1], 2)]
    # Without row 3 three pages are common; a row whose current token lies in page 12 stops the run there.
    assert find([rows[0], rows[2], rows[4]], [60, 70, 49], 2) == [([1, 1, 1], 3)]
    assert find([rows[0], rows[2], rows[4]], [60, 70, 48], 2) == [([1, 1, 1], 2)]
    # Two groups, the one reading more shared tokens first; a row too short for min_pages stays out.
    rows = [[1, 2, 3], [1, 2, 4], [7, 8, 9], [7, 8, 5], [7, 8, 6]]
    assert find(rows, [40, 40, 40, 40, 40], 1, 4) == [([0, 0, 1, 1, 1], 2), ([1, 1, 0, 0, 0], 2)]
    assert find(rows, [40, 40, 40, 40, 40], 1) == [([0, 0, 1, 1, 1], 2)]
    assert find(rows + [[1, 2, 5]], [40, 40, 40, 40, 16, 40], 1, 4) == [([1, 1, 0, 0, 0, 1], 2),
                                                                        ([0, 0, 1, 1, 0, 0], 2)]
    # Two members sharing 3 pages read more once than three sharing 1.
    rows = [[1, 2, 3, 4], [1, 2, 3, 5], [6, 7, 8], [6, 9, 8], [6, 5, 4]]
    assert find(rows, [60, 60, 40, 40, 40], 1, 4) == [([1, 1, 0, 0, 0], 3), ([0, 0, 1, 1, 1], 1)]
    # Fewer than two rows past min_pages pages, or a run shorter than min_pages: none.
    assert find([rows[0], rows[1]], [60, 30], 2) == []
    assert find([a, a], [40, 40], 3) == []
    assert find([[1, 2, 3], [1, 5, 3]], [40, 40], 2) == []


@pytest.mark.slow
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


def test_cascade_decode_with_two_prefixes_keeps_the_engines_tokens(monkeypatch):
    """Rows after two different cached prefixes (two system prompts) form two groups in the same decode steps,
    each group's pages attended once for its members; greedy tokens as each prompt alone."""
    if CUDA:
        pytest.skip("interpreter test: runs on CPU only")
    from test_engine import alone, prompts, random_model, tok

    from cpm4.engine.paged import PagedKVCache
    from cpm4.engine.sampling import SamplingParams
    from cpm4.engine.scheduler import LLMEngine

    launches = _cascade_on(monkeypatch)
    model = random_model("tiny", dtype=torch.float32, sparse_config=None, num_hidden_layers=2)
    eng = LLMEngine(model, tok(), PagedKVCache(model.config, num_pages=60, page_size=16, prefix_caching=True),
                    max_batch_size=4, chunk_tokens=256, paged_decode=True)
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    first, second = prompts(1, seed=31, lo=50, hi=51)[0], prompts(1, seed=32, lo=34, hi=35)[0]
    for i, prefix in enumerate((first, second)):
        eng.add_request(f"warm{i}", prefix + [5], params)
    eng.run_to_completion()
    tails = prompts(4, seed=33, lo=3, hi=12)
    ps = [first + tails[0], second + tails[1], first + tails[2], second + tails[3]]
    for i, p in enumerate(ps):
        eng.add_request(f"r{i}", p, params)
    res = eng.run_to_completion()
    # 50 and 34 tokens: 3 and 2 whole pages of 16, the first prefix's group first (more reads saved)
    assert ([3, [1, 2, 1, 2]]) in [[c, m] for c, m in launches]
    for i, p in enumerate(ps):
        assert res[f"r{i}"][1] == alone(model, p, params), i


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


def test_graph_buffers_hold_the_steps_groups(monkeypatch):
    """The captured decode steps' static buffers (built without a GPU here): each group's shared pages and count
    and the member rows (k + 1 for group k) of each step, the counts back to 0 when no group remains; at most
    CASCADE_DECODE_GROUPS groups, most reads saved first."""
    from test_engine import random_model

    from cpm4.engine import paged
    from cpm4.engine.cuda_graph import DecodeGraphs
    from cpm4.engine.paged import PagedKVCache, SeqPages

    _cascade_on(monkeypatch)
    model = random_model("tiny", dtype=torch.float32, sparse_config=None, num_hidden_layers=1)
    cache = PagedKVCache(model.config, num_pages=60, page_size=16)
    seqs = [SeqPages() for _ in range(5)]
    for s, n in zip(seqs, (50, 70, 20, 60, 45)):
        cache.reserve(s, n + 1)
        s.length = n
    seqs[1].pages[:3] = seqs[0].pages[:3]  # rows 0 and 1 share 3 pages (as a cached prefix would)
    seqs[4].pages[:2] = seqs[3].pages[:2]  # rows 3 and 4 share 2 (row 4's current token is in its 3rd page)
    found = []
    real = paged.shared_groups
    monkeypatch.setattr(paged, "shared_groups", lambda *a: found.append(1) or real(*a))

    def graphs_for(groups):
        monkeypatch.setattr(paged, "CASCADE_DECODE_GROUPS", groups)
        graphs = DecodeGraphs.__new__(DecodeGraphs)
        graphs.init_buffers(cache, 8, 8, torch.device("cpu"))
        return graphs

    def step(graphs, rows):
        cols = graphs.host_table.update(rows, 8)
        _, _, ends = graphs._rows(rows, 8)
        return graphs._share(ends[:len(rows)], len(rows), 8, cols)

    graphs = graphs_for(4)
    assert step(graphs, seqs)  # the step replays the cascade graph
    sh = graphs.shared
    assert sh.count.tolist() == [3, 2, 0, 0] and sh.member.tolist() == [1, 1, 0, 2, 2, 0, 0, 0]
    assert sh.order.tolist() == [2, 5, 6, 7, 0, 1, 3, 4]  # the rows by group: a tile of rows reads one group's pages
    assert sh.pages[0, :3].tolist() == seqs[0].pages[:3] and sh.pages[1, :2].tolist() == seqs[3].pages[:2]
    cache.reserve(seqs[2], 40)  # row 2 grows a page: the same sequences in the same rows keep the groups
    seqs[2].length += 30
    assert step(graphs, seqs)
    assert len(found) == 1 and sh.count.tolist() == [3, 2, 0, 0]
    assert step(graphs, seqs[1:])  # row 0 ended, the others moved up: found again, one group left
    assert len(found) == 2
    assert sh.count.tolist() == [2, 0, 0, 0] and sh.member.tolist() == [0, 0, 1, 1, 0, 0, 0, 0]
    assert sh.order.tolist() == [0, 1, 4, 5, 6, 7, 2, 3]
    assert not step(graphs, seqs[1:3]) and sh.count.tolist() == [0, 0, 0, 0] and not sh.member.any()
    # 2 rows x 3 pages + 2 rows x 2 pages of 16 = 160 tokens read once instead of twice: below
    # CASCADE_DECODE_MIN_READS, the plain step
    monkeypatch.setattr(paged, "CASCADE_DECODE_MIN_READS", 161)
    assert not step(graphs, seqs) and sh.count.tolist() == [0, 0, 0, 0]
    monkeypatch.setattr(paged, "CASCADE_DECODE_MIN_READS", 160)
    step(graphs, seqs[1:3])  # other rows, so the next step looks again
    assert step(graphs, seqs) and sh.count.tolist() == [3, 2, 0, 0]
    monkeypatch.setattr(paged, "CASCADE_DECODE_MIN_READS", 0)
    graphs = graphs_for(1)  # one group's buffers: the group saving the most reads
    assert step(graphs, seqs)
    assert graphs.shared.count.tolist() == [3] and graphs.shared.member.tolist() == [1, 1, 0, 0, 0, 0, 0, 0]


def test_cascade_groups_need_enough_reads_saved(monkeypatch):
    """`cascade_groups`: the groups `shared_groups` finds, only when their members x shared tokens together
    reach CASCADE_DECODE_MIN_READS (and each one's shared pages CASCADE_DECODE_MIN_TOKENS)."""
    import numpy as np

    from cpm4.engine import paged

    table = np.array([[1, 2, 3, 9], [1, 2, 3, 8], [1, 2, 3, 7], [4, 5, 6, 0], [4, 5, 6, 1]], dtype=np.int32)
    lens = np.array([60, 55, 50, 60, 60])
    monkeypatch.setattr(paged, "CASCADE_DECODE_MIN_TOKENS", 32)
    for reads, expect in ((240, True), (241, False)):  # (3 + 2 members) x 3 pages x 16 tokens = 240
        monkeypatch.setattr(paged, "CASCADE_DECODE_MIN_READS", reads)
        got = paged.cascade_groups(table, lens, 16)
        assert (got is not None) == expect
        if expect:
            assert got[0].tolist() == [1, 1, 1, 2, 2] and got[1] == [3, 3]
    monkeypatch.setattr(paged, "CASCADE_DECODE_MIN_READS", 144)  # the larger group alone reaches it
    got = paged.cascade_groups(table, lens, 16, max_groups=1)
    assert got[0].tolist() == [1, 1, 1, 0, 0] and got[1] == [3]
    monkeypatch.setattr(paged, "CASCADE_DECODE_MIN_TOKENS", 64)  # 4 pages needed: the groups share 3
    monkeypatch.setattr(paged, "CASCADE_DECODE_MIN_READS", 0)
    assert paged.cascade_groups(table, lens, 16) is None


def test_cascade_min_reads_by_heads_per_kv_head(monkeypatch):
    """More than 8 query heads a KV head (the 8B shape): 1.5x the reads; the 0.5B shape's 8 and fewer: as set."""
    from cpm4.engine import paged
    from cpm4.model.config import preset

    assert paged.cascade_min_reads(preset("minicpm4-8b")) == 196608
    assert paged.cascade_min_reads(preset("minicpm4-0.5b")) == 131072
    monkeypatch.setattr(paged, "CASCADE_DECODE_MIN_READS", 1000)
    assert paged.cascade_min_reads(preset("minicpm4-8b")) == 1500
    monkeypatch.setattr(paged, "CASCADE_DECODE_MIN_TOKENS", 32)
    table = np.array([[1, 2, 3, 9], [1, 2, 3, 8]], dtype=np.int32)  # 2 members x 3 pages x 16 = 96 tokens
    assert paged.cascade_groups(table, np.array([60, 60]), 16, min_reads=96) is not None
    assert paged.cascade_groups(table, np.array([60, 60]), 16, min_reads=97) is None


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16])
@pytest.mark.parametrize("hq,hkv,d", [(32, 2, 128), (16, 2, 64), (12, 4, 64)])
def test_gpu_cascade_decode(dtype, hq, hkv, d):
    if not CUDA:
        pytest.skip("needs CUDA")
    lens = [3000 + 7 * i for i in range(40)] + [100, 5000, 1]
    member = [1] * 40 + [0, 0, 0]
    _check("cuda", dtype, hq, hkv, d, 64, lens, member, n_shared=2900 // 64, tol=2e-2, splits=8)


def _check_sparse_step(device, dtype, tol, groups=1):
    """The InfLLM v2 decode step with a shared prefix over rows of which some are sparse (dense_len tokens or
    more) though marked members, as a captured step's group stays while a member grows past dense_len: the
    outputs of the step without the shared prefix (each row's own pages or selected blocks). groups 2: rows 1,
    3 and 5 share row 1's first pages instead (one page fewer), a second group."""
    from test_infllm_v2_triton import paged_sequences, small_cfg

    from cpm4.kernels.infllm_v2.triton_decode import paged_sparse_decode

    page = 16 if device == "cpu" else 64
    cfg = small_cfg("gen-b", dense_len=40) if device == "cpu" else SparseConfig(
        variant="gen-b", kernel_size=32, kernel_stride=16, init_blocks=1, block_size=64, window_size=128, topk=4,
        dense_len=1024)
    unit = cfg.dense_len / 40  # the CPU's shapes scaled to the GPU's
    lens = [int(x * unit) for x in (33, 38, 60, 45, 20, 39)] + [int(41 * unit)]
    member = [1, 1, 1, 1, 0, 1, 0]  # rows 2 and 3 sparse members; row 6 sparse, not a member
    if groups == 2:
        member = [1, 2, 1, 2, 0, 2, 0]  # row 2 a sparse member of group 1, row 3 of group 2
    kc, vc, table, _, _, stores = paged_sequences(lens, page, 2, 16 if device == "cpu" else 64, dtype, device, cfg,
                                                  seed=5)
    n_sh = int(32 * unit) // page  # 2 pages of 16 on the CPU, 12 of 64 on the GPU: before every member's last token
    counts = [n_sh, n_sh - 1][:groups]
    for i, m in enumerate(member):
        if m:  # a group's first pages are its first row's (their keys there as its: what they read either way)
            table[i, :counts[m - 1]] = table[m - 1, :counts[m - 1]]
    q = torch.randn(len(lens), 4 if device == "cpu" else 8, kc.shape[-1], device=device).to(dtype)
    shared = SharedPrefix(table[:groups, :n_sh + 2].contiguous(), torch.tensor(counts, dtype=torch.int32,
                                                                                 device=device),
                          torch.tensor(member, dtype=torch.int32, device=device))
    lt = torch.tensor(lens, dtype=torch.int32, device=device)
    args = (q, kc, vc, table, lt, stores["fine"], stores["coarse"], cfg)
    plain = paged_sparse_decode(*args)
    got = paged_sparse_decode(*args, shared=shared)
    assert torch.isfinite(got).all()
    err = (got.double() - plain.double()).abs().max(-1).values.max(-1).values
    assert (err < tol).all(), err.tolist()


@pytest.mark.parametrize("groups", [1, 2])
def test_interpreter_cascade_in_the_sparse_step_leaves_sparse_members_out(groups):
    if CUDA:
        pytest.skip("interpreter test: runs on CPU only")
    _check_sparse_step("cpu", torch.float32, 1e-5, groups)


@gpu
@pytest.mark.parametrize("groups", [1, 2])
def test_gpu_cascade_in_the_sparse_step_leaves_sparse_members_out(groups):
    if not CUDA:
        pytest.skip("needs CUDA")
    _check_sparse_step("cuda", torch.bfloat16, 1e-2, groups)


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
        groups.append((int(self.shared.count.max()), self.shared.member.tolist()))
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
