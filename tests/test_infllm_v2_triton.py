"""InfLLM v2 Triton kernels against the plain-PyTorch reference.

On the CPU they run in Triton's interpreter (TRITON_INTERPRET=1, set by conftest) with tiny shapes, so
the kernel logic is checked in CI; the `gpu` tests run the real kernels on the device in bf16/fp16."""

import math

import pytest
import torch

pytest.importorskip("triton")

from cpm4.kernels.infllm_v2 import reference as R  # noqa: E402
from cpm4.kernels.infllm_v2 import shared_window  # noqa: E402
from cpm4.model.config import SparseConfig  # noqa: E402

CUDA = torch.cuda.is_available()


def small_cfg(variant="gen-b", **kw):
    base = dict(kernel_size=8, kernel_stride=4, init_blocks=1, block_size=16, window_size=32, topk=3, dense_len=-1,
                variant=variant)
    base.update(kw)
    return SparseConfig(**base)


def qkv(tq, tk, hq, hkv, d, dtype, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(tq, hq, d, generator=g, device=device, dtype=torch.float32)
    k = torch.randn(tk, hkv, d, generator=g, device=device, dtype=torch.float32)
    v = torch.randn(tk, hkv, d, generator=g, device=device, dtype=torch.float32)
    k[:, :, 0] += 2 * torch.randn(tk, hkv, generator=g, device=device)  # uneven relevance across blocks
    return q.to(dtype), k.to(dtype), v.to(dtype)


def rel(a, b):
    a, b = a.double(), b.double()
    assert torch.isfinite(a).all()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def check_pipeline(cfg, tq, tk, hq, hkv, d, dtype, device, tol, grad=True, seed=0, ref_dtype=torch.float64):
    from cpm4.kernels.infllm_v2.triton_attention import block_sparse_attention
    from cpm4.kernels.infllm_v2.triton_select import block_scores, compress, select_blocks

    q, k, v = qkv(tq, tk, hq, hkv, d, dtype, device, seed)
    scale = 1 / math.sqrt(d)
    q_start = tk - tq
    pos = torch.arange(q_start, tk, device=device)
    # Stage 1-3 against the reference run on the same (rounded) inputs.
    k1 = compress(k, cfg.kernel_size, cfg.kernel_stride)
    k2 = compress(k, cfg.coarse_kernel_size, cfg.coarse_kernel_stride) if cfg.variant == "gen-b" else None
    r1, r2 = R.compress_keys(k, cfg)
    assert rel(k1, r1) < tol
    scores = block_scores(q, k1, k2, q_start, cfg, scale)
    ref_scores = R.block_scores(q, r1, r2, pos, cfg, scale)
    vis = R.kernel_visible(pos, k1.shape[0], cfg.kernel_size, cfg.kernel_stride)
    # Selection from the kernel's own scores must be exactly the reference rule applied to them.
    masked = torch.where(vis, scores, torch.zeros((), dtype=scores.dtype, device=device))
    assert rel(masked.float(), torch.where(vis, ref_scores.float(), 0.0)) < tol  # unwritten entries are unread
    idx = select_blocks(scores, q_start, tq, k1.shape[0], cfg)
    assert torch.equal(idx.long(), R.select_blocks(masked, pos, cfg))
    # Selection from the reference's scores: the same blocks except where near-equal scores round apart.
    ref_idx = R.select_blocks(ref_scores, pos, cfg)
    assert (idx.long() == ref_idx).float().mean().item() > 0.97
    blocks = R.attended_blocks(idx.long(), pos, cfg).to(torch.int32)
    # Stage 4 forward and backward against float64 autograd through the reference.
    xs = [x.clone().requires_grad_(grad) for x in (q, k, v)]
    out = block_sparse_attention(*xs, idx, cfg.block_size, scale, cfg.init_blocks, shared_window(cfg))
    rs = [x.to(ref_dtype).clone().requires_grad_(grad) for x in (q, k, v)]
    ref, _ = R.block_sparse_attention(*rs, blocks.long(), pos, cfg.block_size, scale, chunk=128)
    assert rel(out, ref) < tol
    if grad:
        do = torch.randn_like(out)
        out.backward(do)
        ref.backward(do.to(ref_dtype))
        for a, b in zip(xs, rs):
            assert rel(a.grad, b.grad) < tol


@pytest.mark.parametrize("variant", ["gen-b", "gen-a"])
def test_interpreter_pipeline_matches_reference(variant):
    if CUDA:
        pytest.skip("interpreter test: runs on CPU only")
    check_pipeline(small_cfg(variant), 70, 70, 4, 2, 16, torch.float32, "cpu", 1e-5)


@pytest.mark.parametrize("hq,tq,tk", [(4, 70, 70), (8, 45, 83), (6, 30, 70)])
def test_interpreter_shared_blocks_two_heads_a_program(hq, tq, tk, monkeypatch):
    """SHARED_HEADS=2: the shared blocks' tile holds two heads of a group (a group of 3 falls back to one);
    queries from the start and a chunk at the end of the sequence."""
    if CUDA:
        pytest.skip("interpreter test: runs on CPU only")
    from cpm4.kernels.infllm_v2 import triton_attention

    monkeypatch.setattr(triton_attention, "SHARED_HEADS", 2)
    check_pipeline(small_cfg("gen-b"), tq, tk, hq, 2, 16, torch.float32, "cpu", 1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_row_dot_equals_float64(dtype):
    from cpm4.kernels.infllm_v2.triton_attention import row_dot

    device = "cuda" if CUDA else "cpu"
    o, do = (torch.randn(37, 3, 64, device=device).to(dtype) for _ in range(2))
    ref = (o.double() * do.double()).sum(-1)
    out = row_dot(o, do)
    assert out.dtype == torch.float32 and out.shape == (37, 3)
    assert torch.allclose(out.double(), ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="contiguous"):
        row_dot(o.transpose(0, 1), do.transpose(0, 1))


@pytest.mark.parametrize("chunk", [1, 5, 64])
def test_dkdv_items_cover_each_block_once(chunk):
    """The dk/dv work items: each block's token range cut into pieces of at most `chunk`, in order, every block
    (chosen or not) in at least one item; split blocks get consecutive workspace slots and one sum row each."""
    from cpm4.kernels.infllm_v2.triton_attention import dkdv_items

    counts = torch.tensor([0, 3, 17, 64, 65, 1, 0, 130])  # 2 KV heads x 4 key blocks
    offsets = torch.zeros(counts.numel() + 1, dtype=torch.int32)
    offsets[1:] = torch.cumsum(counts, 0)
    items, sums, n_slots = dkdv_items(offsets, 4, chunk)
    owners = torch.unique_consecutive(items[:, 0]).tolist()
    assert owners == [0, 4, 1, 5, 2, 6, 3, 7]  # block-major: block 0 of both heads first
    slots = []
    for gb, c in enumerate(counts.tolist()):
        mine = items[items[:, 0] == gb]
        want = max(1, math.ceil(c / chunk))
        assert mine.shape[0] == want
        assert mine[0, 1] == offsets[gb] and mine[-1, 2] == offsets[gb + 1]
        assert torch.equal(mine[1:, 1], mine[:-1, 2])  # contiguous pieces
        assert ((mine[:, 2] - mine[:, 1]) <= chunk).all()
        if want == 1:
            assert mine[0, 3] == -1 and not (sums[:, 0] == gb).any()
        else:
            row = sums[sums[:, 0] == gb]
            assert row.shape[0] == 1 and row[0, 2] == want
            assert torch.equal(mine[:, 3], torch.arange(int(row[0, 1]), int(row[0, 1]) + want, dtype=torch.int32))
            slots += mine[:, 3].tolist()
    assert sorted(slots) == list(range(n_slots))
    whole, no_sums, none = dkdv_items(offsets, 4, None)
    assert none == 0 and no_sums.shape[0] == 0 and (whole[:, 3] == -1).all()
    assert whole[:, 0].tolist() == [0, 4, 1, 5, 2, 6, 3, 7]
    with pytest.raises(ValueError, match="chunk"):
        dkdv_items(offsets, 4, 0)


@pytest.mark.parametrize("chunk,rows,keys_first", [(3, 64, False), (16, 128, False), (None, 128, False),
                                                   (None, 64, True), (5, 128, True)])
def test_interpreter_backward_with_split_dkdv(chunk, rows, keys_first, monkeypatch):
    """dk/dv with each key block's tokens split over several programs (partials added by a second kernel), with
    128-row tiles, and with the scores as [keys, rows], equal the float64 reference's gradients, as the unsplit
    64-row kernel does."""
    if CUDA:
        pytest.skip("interpreter test: runs on CPU only")
    from cpm4.kernels.infllm_v2 import triton_attention

    monkeypatch.setattr(triton_attention, "DKDV_CHUNK", chunk)
    monkeypatch.setattr(triton_attention, "DKDV_ROWS", rows)
    monkeypatch.setattr(triton_attention, "DKDV_KEYS_FIRST", keys_first)
    check_pipeline(small_cfg(), 70, 70, 4, 2, 16, torch.float32, "cpu", 1e-5)


def test_interpreter_odd_group_chunk_and_fp16():
    if CUDA:
        pytest.skip("interpreter test: runs on CPU only")
    # Group of 3 (padded to 4 heads per token), queries a chunk at the end of the sequence, fp16 inputs.
    check_pipeline(small_cfg(), 20, 83, 6, 2, 16, torch.float16, "cpu", 3e-3, grad=False)


@pytest.mark.parametrize("search", ["narrow", "full"])
@pytest.mark.parametrize("variant", ["gen-b", "gen-a"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_selection_with_ties_equals_reference(variant, dtype, search):
    """Top-k on scores with many exact ties (few distinct values), in each score dtype (the search skips the
    low bits a bf16/fp16 score cannot have), by binary search over the unforced keys' range or every key value:
    exactly the reference's stable-sort choice."""
    from cpm4.kernels.infllm_v2.triton_select import select_blocks

    device = "cuda" if CUDA else "cpu"
    cfg = small_cfg(variant, topk=5)
    g = torch.Generator(device=device).manual_seed(0)
    tq, tk = 5, 400
    n1 = R.num_kernels(tk, cfg.kernel_size, cfg.kernel_stride)
    scores = (torch.randint(0, 6, (2, tq, n1), generator=g, device=device).float() / 7).to(dtype)
    pos = torch.arange(tk - tq, tk, device=device)
    vis = R.kernel_visible(pos, n1, cfg.kernel_size, cfg.kernel_stride)
    narrow = search == "narrow"
    idx = select_blocks(scores, tk - tq, tq, n1, cfg, narrow=narrow)
    assert torch.equal(idx.long(), R.select_blocks(torch.where(vis, scores, torch.zeros((), dtype=dtype,
                                                                                         device=device)), pos, cfg))
    # scores spread over the dtype's whole range (float32: the 31-bit search, candidates up to +inf)
    wide = torch.exp(torch.randn(2, tq, n1, generator=g, device=device) * 30).clamp(max=torch.finfo(dtype).max / 2)
    wide = wide.to(dtype)
    wide[0, :, 7] = wide[0, :, 9]  # and a tie
    idx = select_blocks(wide, tk - tq, tq, n1, cfg, narrow=narrow)
    assert torch.equal(idx.long(), R.select_blocks(torch.where(vis, wide, torch.zeros((), dtype=dtype,
                                                                                      device=device)), pos, cfg))


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["gen-b", "gen-a"])
def test_selection_over_fewer_lanes_equals_reference(variant):
    """Queries whose blocks fit in a quarter or a half of the selection's lanes use that many (here 34 blocks in 64
    lanes: tokens below 256 a quarter, below 512 a half): the reference's choice at every position, ties too."""
    from cpm4.kernels.infllm_v2.triton_select import select_blocks

    device = "cuda" if CUDA else "cpu"
    cfg = small_cfg(variant, topk=5)
    tk = 530
    n1 = R.num_kernels(tk, cfg.kernel_size, cfg.kernel_stride)
    g = torch.Generator(device=device).manual_seed(1)
    scores = (torch.randint(0, 9, (1, tk, n1), generator=g, device=device).float() / 9).to(torch.bfloat16)
    pos = torch.arange(tk, device=device)
    vis = R.kernel_visible(pos, n1, cfg.kernel_size, cfg.kernel_stride)
    want = R.select_blocks(torch.where(vis, scores, torch.zeros((), dtype=scores.dtype, device=device)), pos, cfg)
    assert torch.equal(select_blocks(scores, 0, tk, n1, cfg).long(), want)


@pytest.mark.parametrize("variant,topk", [("gen-b", 1), ("gen-a", 1), ("gen-b", 5)])
def test_selection_search_edges_equal_reference(variant, topk):
    """The searches at the ends of the narrowed range: every unforced score equal (an empty range), all zero,
    one score above equal others, and forced blocks that fill the top-k alone (topk 1-2: threshold +inf)."""
    from cpm4.kernels.infllm_v2.triton_select import select_blocks

    device = "cuda" if CUDA else "cpu"
    cfg = small_cfg(variant, topk=topk)
    tq, tk = 5, 400
    n1 = R.num_kernels(tk, cfg.kernel_size, cfg.kernel_stride)
    pos = torch.arange(tk - tq, tk, device=device)
    vis = R.kernel_visible(pos, n1, cfg.kernel_size, cfg.kernel_stride)
    one_up = torch.full((2, tq, n1), 0.25, device=device)
    one_up[:, :, 40] = 0.5
    for scores in (torch.full((2, tq, n1), 0.25, device=device), torch.zeros(2, tq, n1, device=device), one_up):
        for dtype in (torch.bfloat16,):  # float32 scores: the ties test
            s = scores.to(dtype)
            want = R.select_blocks(torch.where(vis, s, torch.zeros((), dtype=dtype, device=device)), pos, cfg)
            for search in ("narrow", "full"):
                idx = select_blocks(s, tk - tq, tq, n1, cfg, narrow=search == "narrow")
                assert torch.equal(idx.long(), want), (search, dtype, scores[0, 0, :3])


@pytest.mark.parametrize("pow2", [True, False])
def test_decode_default_splits_round_down_to_a_power_of_two(pow2, monkeypatch):
    # An H200's 132 SMs over 2 KV heads: 132 programs a head for two waves, capped by the tiles there are.
    from cpm4.kernels.infllm_v2 import triton_decode as TD

    monkeypatch.setattr(TD, "num_sms", lambda device: 132)
    monkeypatch.setattr(TD, "SPLITS_POW2", pow2)
    cpu = torch.device("cpu")
    for most, want in [(129, 128), (200, 128), (128, 128), (64, 64), (33, 32), (1, 1)]:
        unrounded = min(132, most)
        assert TD._default_splits(cpu, 2, most) == (want if pow2 else unrounded)
    assert TD._default_splits(cpu, 1000, 50) == 1  # more programs than two waves: one split


@pytest.mark.parametrize("variant", ["gen-b", "gen-a"])
def test_key_splits_merge_equal_one_pass(variant):
    """Stage 1 split along the keys (as in decode) gives the scores of the unsplit pass."""
    from cpm4.kernels.infllm_v2.triton_select import block_scores, compress

    device = "cuda" if CUDA else "cpu"
    cfg = small_cfg(variant)
    q, k, _ = qkv(3, 300, 4, 2, 16, torch.float32, device)
    k1 = compress(k, 8, 4)
    k2 = compress(k, 32, 16) if variant == "gen-b" else None
    one = block_scores(q, k1, k2, 297, cfg, 0.25, key_splits=1, block_n=16)
    many = block_scores(q, k1, k2, 297, cfg, 0.25, key_splits=3, block_n=16)
    r1, r2 = R.compress_keys(k, cfg)
    ref = R.block_scores(q, r1, r2, torch.arange(297, 300, device=device), cfg, 0.25)
    assert rel(many, one) < 1e-5 and rel(many, ref) < 1e-5


@pytest.mark.parametrize("variant", ["gen-b", "gen-a"])
@pytest.mark.parametrize("hq", [6, 32])
def test_block_scores_keys_first_equal_reference(variant, hq):
    """Stage 1 computed as [keys, rows] (SCORE_KEYS_FIRST): the reference's scores, as the rows-first pass."""
    from cpm4.kernels.infllm_v2.triton_select import block_scores, compress

    device = "cuda" if CUDA else "cpu"
    cfg = small_cfg(variant)
    q, k, _ = qkv(40, 300, hq, 2, 16, torch.float32, device)
    k1 = compress(k, 8, 4)
    k2 = compress(k, 32, 16) if variant == "gen-b" else None
    first = block_scores(q, k1, k2, 260, cfg, 0.25, block_n=16, keys_first=True)
    rows = block_scores(q, k1, k2, 260, cfg, 0.25, block_n=16, keys_first=False)
    r1, r2 = R.compress_keys(k, cfg)
    pos = torch.arange(260, 300, device=device)
    ref = R.block_scores(q.double(), r1.double(), None if r2 is None else r2.double(), pos, cfg, 0.25)
    vis = R.kernel_visible(pos, k1.shape[0], cfg.kernel_size, cfg.kernel_stride)
    tol = 2e-3 if CUDA else 1e-5  # tf32 dots on the GPU
    assert rel(torch.where(vis, first, 0.0).double(), torch.where(vis, ref, 0.0)) < tol
    assert rel(torch.where(vis, first, 0.0), torch.where(vis, rows, 0.0)) < tol


@pytest.mark.slow
def test_interpreter_prefill_signatures_do_not_follow_lengths():
    """The prefill kernels (selection and sparse attention, one sequence or several rows in one launch) keep one
    Triton signature whatever the step's lengths: each new length class (1, a multiple of 16, other) of an
    argument compiled a new variant on the GPU in the middle of serving. Head counts as 0.5B's (16 / 2) and 16
    blocks a query (the selection's strides stay multiples of 16, as with the 8B's 96); the same selection
    lanes (NB_PAD) throughout: a longer context legitimately compiles wider lanes."""
    import os

    from jit_signatures import interpreted, launch_signatures, new_signatures

    from cpm4.kernels.infllm_v2 import triton_pipeline, triton_pipeline_rows
    from cpm4.kernels.infllm_v2.triton_select import block_scores, compress

    if CUDA or os.environ.get("TRITON_INTERPRET") != "1" or not interpreted():
        pytest.skip("signatures are read from the interpreter's launches")
    cfg = small_cfg(topk=14, block_size=8, window_size=16)  # 17-32 blocks: 129-256 tokens
    assert cfg.num_selected == 16
    hq, hkv, d = 16, 2, 16
    scale = 1 / math.sqrt(d)
    q, k, v = qkv(160, 160, hq, hkv, d, torch.float16, "cpu")

    def keys(tk):
        return compress(k[:tk], cfg.kernel_size, cfg.kernel_stride), compress(k[:tk], cfg.coarse_kernel_size,
                                                                            cfg.coarse_kernel_stride)

    def one(tq, tk):
        triton_pipeline(q[:tq], k[:tk], v[:tk], cfg, scale)

    def rows(n_new, kv_lens):
        r, t, s = len(n_new), max(n_new), max(kv_lens)
        k1, k2 = zip(*(keys(n) for n in kv_lens))
        triton_pipeline_rows(q[None, :t].expand(r, t, hq, d), k[None, :s].expand(r, s, hkv, d),
                             v[None, :s].expand(r, s, hkv, d), n_new, kv_lens, cfg, scale, list(k1), list(k2),
                             [x.shape[0] for x in k1], [x.shape[0] for x in k2])

    def pool(lens):  # the engine's kernel keys of a prefill step, pooled in the pages (table: the step's width)
        from cpm4.kernels.infllm_v2.triton_decode import pool_kernel_keys

        kc, _, table, _, _, stores = paged_sequences(lens, 16, hkv, d, torch.float16, "cpu", cfg)
        starts, ends = (torch.tensor(x, dtype=torch.int32) for x in ([n // 2 for n in lens], lens))
        pool_kernel_keys(kc, table, starts, ends, torch.empty_like(stores["fine"]), cfg.kernel_size,
                         cfg.kernel_stride, max(lens))

    def split(n):  # the score pass merging the LSE pass's n key splits (continued rows, decode-like tiles)
        k1, _ = keys(141)
        block_scores(q[:9], k1, None, 132, cfg, scale, exact_lse=True, key_splits=n, block_n=16)

    def signatures(*calls):
        with launch_signatures() as seen:
            for fn, *args in calls:
                fn(*args)
        return seen

    # (queries, keys): a whole prompt, or the last queries of a longer context (a continued prefix)
    first = signatures((one, 17, 141), (rows, [9, 15], [141, 150]), (pool, [70, 33, 129]), (split, 2))
    assert {"_lse_kernel", "_score_kernel", "_select_kernel", "_fwd_shared_kernel", "_fwd_token_kernel",
            "_compress_kernel", "_pool_kernel"} <= set(first)
    later = signatures((one, 131, 131), (one, 16, 144), (one, 1, 150), (rows, [16, 1], [145, 153]),
                       (pool, [250, 20]), (pool, [15]), (split, 3))
    assert new_signatures(first, later) == {}


@pytest.mark.slow
def test_interpreter_signatures_with_other_head_and_block_counts():
    """With 12 query heads and 8 selected blocks a query (neither a multiple of 16, unlike MiniCPM4's), the strides
    of the log-sum-exp and selection buffers followed tq * heads and tq * blocks: a variant per length class.
    Padded (`padded_empty`), one signature for every length; outputs and gradients against float64. A context of
    fewer blocks than that selects fewer a query: the same signature too."""
    import os

    from jit_signatures import interpreted, launch_signatures, new_signatures

    if CUDA or os.environ.get("TRITON_INTERPRET") != "1" or not interpreted():
        pytest.skip("signatures are read from the interpreter's launches")
    cfg = small_cfg(topk=6, kernel_size=4, kernel_stride=2, block_size=4, window_size=8)
    assert cfg.num_selected == 8
    with launch_signatures() as first:
        check_pipeline(cfg, 17, 43, 12, 4, 16, torch.float32, "cpu", 1e-5)
        check_pipeline(cfg, 9, 25, 12, 4, 16, torch.float32, "cpu", 1e-5, seed=3)
    with launch_signatures() as later:
        check_pipeline(cfg, 16, 48, 12, 4, 16, torch.float32, "cpu", 1e-5, seed=1)
        check_pipeline(cfg, 1, 45, 12, 4, 16, torch.float32, "cpu", 1e-5, seed=2)
        # 6 blocks after 7, fewer than the 8 selected: a runtime count in the forward and backward, one lane
        check_pipeline(cfg, 5, 22, 12, 4, 16, torch.float32, "cpu", 1e-5, seed=4)
    assert {"_lse_kernel", "_score_kernel", "_select_kernel", "_fwd_token_kernel", "_bwd_dq_token_kernel"} <= set(first)
    assert new_signatures(first, later) == {}


def test_interpreter_warm_select_covers_every_lane_width():
    """`warm_select` launches the selection kernel with every signature sequences of up to `context` tokens
    (from `start` blocks) can need: one per power of two of blocks, one sequence and several rows."""
    import os

    from jit_signatures import interpreted, launch_signatures, new_signatures

    from cpm4.kernels.infllm_v2.triton_select import Rows, score_buffer, select_blocks, warm_select

    if CUDA or os.environ.get("TRITON_INTERPRET") != "1" or not interpreted():
        pytest.skip("signatures are read from the interpreter's launches")
    cfg = small_cfg(topk=14)  # 16 blocks a query, block 16
    with launch_signatures() as warm:
        warm_select(cfg, 2, 700, "cpu", torch.float16, start=17, queries=3)
    assert len(warm["_select_kernel"]) == 4  # lanes 32 (17-32 blocks) and 64 (33-44), each alone and as rows
    with launch_signatures() as used:
        for n in (272, 300, 512, 513, 650, 700):
            n1 = R.num_kernels(n, cfg.kernel_size, cfg.kernel_stride)
            scores = score_buffer(2, 2, 3, n1, "cpu", torch.float16).fill_(1.0)  # as block_scores lays them out
            select_blocks(scores[0], n - 3, 3, n1, cfg)
            m1 = R.num_kernels(n - 40, cfg.kernel_size, cfg.kernel_stride)
            select_blocks(scores, 0, 0, 0, cfg, rows=Rows([3, 2], [n, n - 40], [n1, m1], None, "cpu"))
    assert new_signatures(warm, used) == {}


def test_interpreter_warm_scores_covers_continued_rows():
    """`warm_scores` launches stage 1 with the signatures a few queries after a long context need (the LSE keys
    split, the score pass merging them), one sequence and several rows, whatever the lengths and split count."""
    import os

    from jit_signatures import interpreted, launch_signatures, new_signatures

    from cpm4.kernels.infllm_v2.triton_select import Rows, block_scores, compress, warm_scores

    if CUDA or os.environ.get("TRITON_INTERPRET") != "1" or not interpreted():
        pytest.skip("signatures are read from the interpreter's launches")
    cfg = small_cfg(topk=14, block_size=8, window_size=16)
    hq, hkv, d = 16, 2, 16
    with launch_signatures() as warm:
        warm_scores(cfg, hq, hkv, d, "cpu", torch.float16, block_n=16)
    q, k, v = qkv(16, 2000, hq, hkv, d, torch.float16, "cpu")
    cases = [(n, tq, compress(k[:n], cfg.kernel_size, cfg.kernel_stride),
              compress(k[:n], cfg.coarse_kernel_size, cfg.coarse_kernel_stride))
             for n, tq in ((1616, 16), (2000, 3), (1800, 1))]
    with launch_signatures() as used:
        for n, tq, k1, k2 in cases:
            block_scores(q[:tq], k1, k2, n - tq, cfg, 1.0, block_n=16)  # the splits of a 4-SM "device"
            m1, m2 = k1[:-9], k2[:-2]
            rows = Rows([tq, 2], [n, n - 40], [k1.shape[0], m1.shape[0]], [k2.shape[0], m2.shape[0]], "cpu")
            pad = torch.nn.utils.rnn.pad_sequence
            block_scores(q[None, :max(tq, 2)].expand(2, -1, -1, -1), pad([k1, m1], batch_first=True),
                         pad([k2, m2], batch_first=True), 0, cfg, 1.0, block_n=16, rows=rows)
    assert any(("LSE_SPLITS_PAD", 8) in sig for sig in used["_score_kernel"])  # the case this is about
    assert new_signatures(warm, used) == {}


@pytest.mark.slow
def test_interpreter_warm_prefill_kernels_cover_short_contexts():
    """A context of fewer blocks than num_selected (a dense_len below them) selects one block per block: the
    count was a constexpr of the selection and the attention, a compile for every count (seen on the H200: 2-14
    compiles a round of prompts, 2K-8K tokens past a dense_len of 2,048). A runtime argument now, with a lane
    per power of two; `warm_prefill_kernels` (the engine's warm-up) launches every signature prompts from
    dense_len to the context need, one sequence and several rows, whole prompts and continued ones."""
    import os

    from jit_signatures import interpreted, launch_signatures, new_signatures

    from cpm4.kernels.infllm_v2 import selection_widths, triton_pipeline, triton_pipeline_rows, warm_prefill_kernels
    from cpm4.kernels.infllm_v2.triton_select import compress

    if CUDA or os.environ.get("TRITON_INTERPRET") != "1" or not interpreted():
        pytest.skip("signatures are read from the interpreter's launches")
    cfg = small_cfg(topk=14, block_size=8, window_size=16, dense_len=33)  # 16 blocks a query; sparse from 5 blocks
    hq, hkv, d = 16, 2, 16
    assert selection_widths(cfg, 5, 40) == [5, 9]  # widths 8 (5-8 blocks) and 16 (9 and more)
    assert selection_widths(cfg, 17, 40) == [17] and selection_widths(cfg, 5, 4) == []
    with launch_signatures() as warm:
        warm_prefill_kernels(cfg, hq, hkv, d, 104, "cpu", torch.float16, queries=4)
    assert {dict(s)["NSEL_PAD"] for s in warm["_fwd_token_kernel"]} == {8, 16}
    q, k, v = qkv(104, 104, hq, hkv, d, torch.float16, "cpu")
    scale = 1 / math.sqrt(d)

    def keys(n):
        return compress(k[:n], cfg.kernel_size, cfg.kernel_stride), compress(k[:n], cfg.coarse_kernel_size,
                                                                           cfg.coarse_kernel_stride)

    with launch_signatures() as used:
        for n, tq in ((33, 33), (47, 2), (64, 1), (71, 5), (104, 3)):  # 5, 6, 8, 9 and 13 blocks
            triton_pipeline(q[:tq], k[:n], v[:n], cfg, scale)
            m = n - 7
            (a1, a2), (b1, b2) = keys(n), keys(m)
            triton_pipeline_rows(q[None, :tq].expand(2, tq, hq, d), k[None, :n].expand(2, n, hkv, d),
                                 v[None, :n].expand(2, n, hkv, d), [tq, 1], [n, m], cfg, scale, [a1, b1], [a2, b2],
                                 [a1.shape[0], b1.shape[0]], [a2.shape[0], b2.shape[0]])
    assert {dict(s)["NSEL_PAD"] for s in used["_fwd_token_kernel"]} == {8, 16}
    assert new_signatures(warm, used) == {}


@pytest.mark.parametrize("tile_pages,separate_merge,splits", [(1, False, 2), (2, False, 2), (1, True, 3)])
def test_interpreter_paged_decode(tile_pages, separate_merge, splits):
    if CUDA:
        pytest.skip("interpreter test: runs on CPU only")
    # separate_merge: the splits' partials merged by their own kernel (3 splits: one of row 5's is empty)
    _check_decode("cpu", torch.float32, 4, 2, 16, page=16, lens=[37, 70, 5], tol=1e-5, tile_pages=tile_pages,
                  separate_merge=separate_merge, splits=splits)


def _store_output_check(peel: bool, dtype):
    """How the store-in-the-launch output compares with append_kv then paged_decode: bit for bit, or with the
    peeled token (its probability kept in float32, added last) within rounding."""
    if not peel:
        return torch.equal
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    return lambda a, b: torch.allclose(a.float(), b.float(), atol=tol, rtol=tol)


def _check_decode_store(device, dtype, tile_pages, splits, separate_merge, pdl=None):
    """paged_decode(new_kv=...): each row's current token (the last of its length; one at a page's first slot)
    stored at its slot by the attention launch itself and attended from new_kv, not the cache: with the slots
    pointed at scratch slots and the token's own cache entry poisoned, the output is still the one of append_kv
    then paged_decode, bit for bit, and the scratch slots hold the new key/value. With STORE_PEEL
    the token is added apart from the tiles: equal within rounding."""
    from cpm4.kernels.infllm_v2 import triton_decode
    from cpm4.kernels.infllm_v2.triton_decode import append_kv, paged_decode

    same = _store_output_check(triton_decode.STORE_PEEL, dtype)

    page, hq, hkv, d = 16, 4, 2, 16
    lens = [37, 70, 33, 5]
    b = len(lens)
    g = torch.Generator(device=device).manual_seed(4)
    n_pages = b * 5 + 2
    kc = torch.randn(n_pages, page, hkv, d, generator=g, device=device).to(dtype)
    vc = torch.randn(n_pages, page, hkv, d, generator=g, device=device).to(dtype)
    table = torch.arange(b * 5, device=device, dtype=torch.int32).view(b, 5)
    q = torch.randn(b, hq, d, generator=g, device=device).to(dtype)
    nk = torch.randn(b, hkv, d, generator=g, device=device).to(dtype)
    nv = torch.randn(b, hkv, d, generator=g, device=device).to(dtype)
    seq = torch.tensor(lens, device=device, dtype=torch.int32)
    own = torch.tensor([int(table[i, (n - 1) // page]) * page + (n - 1) % page for i, n in enumerate(lens)],
                       device=device)
    scratch = torch.tensor([(b * 5) * page + i for i in range(b)], device=device)  # the spare pages' slots
    kr, vr = kc.clone(), vc.clone()
    append_kv(nk, nv, kr, vr, own, table, seq)
    want = paged_decode(q, kr, vr, table, seq, splits=splits, tile_pages=tile_pages, separate_merge=separate_merge)
    kp, vp = kc.clone(), vc.clone()
    kp.view(-1, hkv, d)[own], vp.view(-1, hkv, d)[own] = float("nan"), float("nan")
    got = paged_decode(q, kp, vp, table, seq, splits=splits, tile_pages=tile_pages, separate_merge=separate_merge,
                       new_kv=(nk, nv, scratch), pdl=pdl)
    assert same(got, want)
    assert torch.equal(kp.view(-1, hkv, d)[scratch], nk) and torch.equal(vp.view(-1, hkv, d)[scratch], nv)
    # with the true slots: the cache afterwards is append_kv's
    kp, vp = kc.clone(), vc.clone()
    got = paged_decode(q, kp, vp, table, seq, splits=splits, tile_pages=tile_pages, separate_merge=separate_merge,
                       new_kv=(nk, nv, own), pdl=pdl)
    assert same(got, want) and torch.equal(kp, kr) and torch.equal(vp, vr)
    with pytest.raises(ValueError, match="new_kv: k and v must be"):
        paged_decode(q, kp, vp, table, seq, new_kv=(nk[:, :1], nv, own))


def _check_decode_store_pool(device, dtype, splits, pdl=None):
    """paged_decode(new_kv, kernel_keys) on an InfLLM v2 cache whose rows are all dense: the kernel keys each
    new token completes pooled by the attention launch, as append_kv pools them (fine and coarse, each row's
    completing or not), the cache and the output as append_kv then paged_decode."""
    from cpm4.kernels.infllm_v2 import triton_decode
    from cpm4.kernels.infllm_v2.triton_decode import append_kv, paged_decode

    close = _store_output_check(triton_decode.STORE_PEEL, dtype)
    cfg = small_cfg()
    page, hq, hkv, d = 16, 4, 2, 16
    lens = [32, 70, 48, 5]
    kc, vc, table, ks, vs, stores = paged_sequences(lens, page, hkv, d, dtype, device, cfg)
    slots = torch.tensor([int(table[i, (n - 1) // page]) * page + (n - 1) % page for i, n in enumerate(lens)],
                         device=device)
    ends = torch.tensor(lens, device=device, dtype=torch.int32)
    k_new, v_new = torch.stack([k[-1] for k in ks]), torch.stack([v[-1] for v in vs])
    q = torch.randn(len(lens), hq, d, generator=torch.Generator(device=device).manual_seed(8), device=device).to(dtype)
    poisoned = 0
    for name, size, stride in (("fine", cfg.kernel_size, cfg.kernel_stride),
                               ("coarse", cfg.coarse_kernel_size, cfg.coarse_kernel_stride)):
        for i, n in enumerate(lens):  # the kernel each new token completes: poisoned, both ways must write it
            if n >= size and (n - size) % stride == 0:
                p, slot = R.kernel_page_slots(torch.tensor([(n - size) // stride], device=device), size, stride, page)
                stores[name][table[i].long()[p], slot] = float("nan")
                poisoned += 1
    assert poisoned == 4
    kr, vr, fr, cr = kc.clone(), vc.clone(), stores["fine"].clone(), stores["coarse"].clone()
    append_kv(k_new, v_new, kr, vr, slots, table, ends, fr, cr, cfg)
    want = paged_decode(q, kr, vr, table, ends, splits=splits)
    kg, vg, fg, cg = kc.clone(), vc.clone(), stores["fine"].clone(), stores["coarse"].clone()
    got = paged_decode(q, kg, vg, table, ends, splits=splits, new_kv=(k_new, v_new, slots), kernel_keys=(fg, cg, cfg),
                       pdl=pdl)
    def same(a, b):  # (the pool's unused pages are NaN)
        return torch.equal(a.nan_to_num(7.0), b.nan_to_num(7.0))

    assert close(got, want) and same(kg, kr) and same(vg, vr)
    assert same(fg, fr) and same(cg, cr)
    assert int(fg.isnan().sum() + cg.isnan().sum()) < int(stores["fine"].isnan().sum()
                                                         + stores["coarse"].isnan().sum())  # the kernels written


@pytest.mark.parametrize("peel", [False, True])
def test_interpreter_paged_decode_stores_and_pools(monkeypatch, peel):
    if CUDA:
        pytest.skip("interpreter test: runs on CPU only")
    from cpm4.kernels.infllm_v2 import triton_decode

    monkeypatch.setattr(triton_decode, "STORE_PEEL", peel)
    for splits in (1, 3):
        _check_decode_store_pool("cpu", torch.float32, splits)


@pytest.mark.gpu
@pytest.mark.parametrize("peel", [False, True])
@pytest.mark.parametrize("pdl", [False, True])
def test_gpu_paged_decode_stores_and_pools(monkeypatch, pdl, peel):
    if not CUDA:
        pytest.skip("needs CUDA")
    if pdl and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("PDL: sm_90+")
    from cpm4.kernels.infllm_v2 import triton_decode

    monkeypatch.setattr(triton_decode, "STORE_PEEL", peel)
    _check_decode_store_pool("cuda", torch.bfloat16, 4, pdl)


@pytest.mark.parametrize("tile_pages,splits,separate_merge", [(1, 1, False), (2, 3, False), (1, 3, True),
                                                             (2, 2, True)])
@pytest.mark.parametrize("peel", [False, True])
def test_interpreter_paged_decode_stores_the_new_token(monkeypatch, tile_pages, splits, separate_merge, peel):
    if CUDA:
        pytest.skip("interpreter test: runs on CPU only")
    from cpm4.kernels.infllm_v2 import triton_decode

    monkeypatch.setattr(triton_decode, "STORE_PEEL", peel)
    _check_decode_store("cpu", torch.float32, tile_pages, splits, separate_merge)


@pytest.mark.gpu
@pytest.mark.parametrize("pdl", [False, True])
@pytest.mark.parametrize("tile_pages,splits,separate_merge", [(2, 3, True), (1, 1, False), (2, 8, False)])
@pytest.mark.parametrize("peel", [False, True])
def test_gpu_paged_decode_stores_the_new_token(monkeypatch, tile_pages, splits, separate_merge, pdl, peel):
    if not CUDA:
        pytest.skip("needs CUDA")
    if pdl and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("PDL: sm_90+")
    from cpm4.kernels.infllm_v2 import triton_decode

    monkeypatch.setattr(triton_decode, "STORE_PEEL", peel)
    _check_decode_store("cuda", torch.bfloat16, tile_pages, splits, separate_merge, pdl)


def _check_decode(device, dtype, hq, hkv, d, page, lens, tol, nsel=3, tile_pages=None, separate_merge=None,
                  splits=2):
    from cpm4.kernels.infllm_v2.triton_decode import paged_decode

    b = len(lens)
    max_pages = max(math.ceil(n / page) for n in lens)
    n_pages = b * max_pages + 3
    g = torch.Generator(device=device).manual_seed(1)
    kc = torch.randn(n_pages, page, hkv, d, generator=g, device=device).to(dtype)
    vc = torch.randn(n_pages, page, hkv, d, generator=g, device=device).to(dtype)
    perm = torch.randperm(n_pages, generator=torch.Generator().manual_seed(2))[: b * max_pages]
    table = perm.view(b, max_pages).to(device=device, dtype=torch.int32)  # pages scattered in the pool
    q = torch.randn(b, hq, d, generator=g, device=device).to(dtype)
    seq = torch.tensor(lens, device=device)
    # Poison unused slots of the pool: they must never be read.
    used = torch.zeros(n_pages, dtype=torch.bool)
    used[perm] = True
    kc[~used.to(device)] = float("nan")
    vc[~used.to(device)] = float("nan")
    kc[table.long()] = torch.randn(b, max_pages, page, hkv, d, generator=g, device=device).to(dtype)
    blocks = torch.full((b, hkv, nsel), -1, dtype=torch.int32, device=device)
    for i, n in enumerate(lens):
        npg = math.ceil(n / page)
        for h in range(hkv):
            pick = torch.randperm(npg, generator=torch.Generator().manual_seed(10 * i + h))[:nsel].sort().values
            blocks[i, h, : len(pick)] = pick.to(torch.int32)
    for sel in (None, blocks):
        out = paged_decode(q, kc, vc, table, seq, sel, splits=splits, tile_pages=tile_pages,
                           separate_merge=separate_merge)
        for i, n in enumerate(lens):
            ks = kc[table[i].long()].reshape(-1, hkv, d)[:n].double()
            vs = vc[table[i].long()].reshape(-1, hkv, d)[:n].double()
            allowed = torch.ones(hkv, n, dtype=torch.bool, device=device)
            if sel is not None:
                allowed = torch.zeros(hkv, n, dtype=torch.bool, device=device)
                for h in range(hkv):
                    for bb in sel[i, h].tolist():
                        if bb >= 0:
                            allowed[h, bb * page:(bb + 1) * page] = True
            for hh in range(hq):
                h = hh // (hq // hkv)
                s = (ks[:, h] @ q[i, hh].double()) / math.sqrt(d)
                s = s.masked_fill(~allowed[h], -math.inf)
                ref = torch.softmax(s, 0) @ vs[:, h]
                assert rel(out[i, hh], ref) < tol, (i, hh, sel is None)


# ---------------------------------------------------------------- GPU (device machine)

gpu = pytest.mark.gpu


def first_configs(monkeypatch) -> None:
    """Each autotuned InfLLM v2 kernel with its first configuration only, for the test calling this. The tests
    check values, and autotuning compiles and times every configuration at every new shape (most of these
    tests' time on the device) only to check the fastest: the 8B shape's tests keep the search."""
    from triton.runtime.autotuner import Autotuner

    from cpm4.kernels.infllm_v2 import triton_attention, triton_decode, triton_select

    for mod in (triton_attention, triton_decode, triton_select):
        for obj in vars(mod).values():
            if isinstance(obj, Autotuner) and len(obj.configs) > 1:
                monkeypatch.setattr(obj, "configs", obj.configs[:1])


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("hq,hkv", [(32, 2), (16, 2), (8, 2), (6, 2)])
def test_gpu_pipeline_8b_blocks(dtype, d, hq, hkv, monkeypatch):
    if (hq, d) != (32, 128):
        first_configs(monkeypatch)
    cfg = SparseConfig(variant="gen-b", dense_len=-1)  # the released block configuration
    check_pipeline(cfg, 3000, 3000, hq, hkv, d, dtype, "cuda", 2e-2, grad=(hq == 32), ref_dtype=torch.float32)


@gpu
@pytest.mark.parametrize("chunk,rows,warps,keys_first", [(256, 64, None, False), (2000, 128, 8, False),
                                                         (None, 128, 4, True), (4096, 64, None, True)])
def test_gpu_backward_with_split_dkdv(chunk, rows, warps, keys_first, monkeypatch):
    from cpm4.kernels.infllm_v2 import triton_attention

    monkeypatch.setattr(triton_attention, "DKDV_CHUNK", chunk)
    monkeypatch.setattr(triton_attention, "DKDV_ROWS", rows)
    monkeypatch.setattr(triton_attention, "DKDV_WARPS", warps)
    monkeypatch.setattr(triton_attention, "DKDV_KEYS_FIRST", keys_first)
    cfg = SparseConfig(variant="gen-b", dense_len=-1)
    check_pipeline(cfg, 3000, 3000, 32, 2, 128, torch.bfloat16, "cuda", 2e-2, ref_dtype=torch.float32)


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_pipeline_shared_heads2(dtype, monkeypatch):
    from cpm4.kernels.infllm_v2 import triton_attention

    monkeypatch.setattr(triton_attention, "SHARED_HEADS", 2)
    cfg = SparseConfig(variant="gen-b", dense_len=-1)
    check_pipeline(cfg, 3000, 3000, 32, 2, 128, dtype, "cuda", 2e-2, ref_dtype=torch.float32)
    check_pipeline(cfg, 1000, 4000, 32, 2, 128, dtype, "cuda", 2e-2, grad=False, ref_dtype=torch.float32)


@gpu
@pytest.mark.parametrize("variant", ["gen-b", "gen-a"])
@pytest.mark.parametrize("tq,tk", [(4100, 4100), (1000, 7000), (1, 9000), (77, 7777)])
def test_gpu_pipeline_lengths_and_chunks(variant, tq, tk, monkeypatch):
    first_configs(monkeypatch)
    # Smaller local window and top-k than released so that selection really drops blocks at these lengths.
    cfg = SparseConfig(variant=variant, window_size=512, topk=16, dense_len=-1)
    check_pipeline(cfg, tq, tk, 32, 2, 128, torch.bfloat16, "cuda", 2e-2, grad=(tq == tk and tq < 5000),
                   ref_dtype=torch.float32)


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("hq,hkv,d", [(32, 2, 128), (16, 2, 64), (12, 4, 64)])
@pytest.mark.parametrize("tile_pages,separate_merge,splits", [(1, False, 2), (2, False, 2), (4, False, 2),
                                                            (2, True, 2), (2, True, 132)])
def test_gpu_paged_decode(dtype, hq, hkv, d, tile_pages, separate_merge, splits):
    _check_decode("cuda", dtype, hq, hkv, d, page=64, lens=[1, 63, 64, 65, 3000, 9000], tol=2e-2, nsel=20,
                  tile_pages=tile_pages, separate_merge=separate_merge, splits=splits)


@gpu
def test_gpu_outputs_fully_written():
    """Poisoned outputs: every element of out/lse is written (empty rows give 0 and -inf, not garbage)."""
    from cpm4.kernels.infllm_v2.triton_attention import full_block_list, sparse_fwd

    q, k, v = qkv(3000, 3000, 32, 2, 128, torch.bfloat16, "cuda")
    idx = torch.full((2, 3000, 8), -1, dtype=torch.int32, device="cuda")
    idx[:, 2000:, 0] = 3
    # Fill the allocator's cache with NaNs so that unwritten output would show.
    torch.full((3000, 32, 128), float("nan"), device="cuda").sum()
    o, lse = sparse_fwd(q, k, v, idx, 64, 128 ** -0.5, 1, 4)
    assert torch.isfinite(o).all() and torch.isfinite(lse).all()
    pos = torch.arange(3000, device="cuda")
    blocks = full_block_list(idx, pos, 64, 1, 4).long()
    ref, ref_lse = R.block_sparse_attention(q.float(), k.float(), v.float(), blocks, pos, 64, 128 ** -0.5)
    assert rel(o, ref) < 2e-2 and rel(lse, ref_lse) < 1e-3


@gpu
def test_gpu_model_sparse_prefill_and_decode_match_reference():
    """The model on CUDA bf16 (Triton path) against the same model through the reference (float32)."""
    from conftest import random_model

    from cpm4.engine.kv_cache import KVCache
    from cpm4.model import MiniCPM4ForCausalLM

    sc = {"kernel_size": 32, "kernel_stride": 16, "init_blocks": 1, "block_size": 64, "window_size": 256,
          "topk": 4, "dense_len": 1024, "variant": "gen-b"}
    base = random_model("tiny", dtype=torch.float32, sparse_config=sc, num_attention_heads=16,
                        num_key_value_heads=1, hidden_size=256)
    model = MiniCPM4ForCausalLM(base.config).to("cuda", torch.bfloat16)
    model.load_state_dict({k: v.to(torch.bfloat16) for k, v in base.state_dict().items()})
    ids = torch.randint(0, 1000, (1, 2000), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ref = base.cuda()(ids.cuda())
        full = model(ids.cuda())
        cache = KVCache(model.config, 1, 2000, "cuda", torch.bfloat16)
        parts = [model(ids[:, :1500].cuda(), cache)]
        for t in range(1500, 1520):
            parts.append(model(ids[:, t:t + 1].cuda(), cache))
    assert rel(full, ref) < 3e-2
    assert rel(torch.cat(parts, 1), full[:, :1520]) < 3e-2


# ---------------------------------------------------------------- paged InfLLM v2 decode (engine path)


def paged_sequences(lens, page, hkv, d, dtype, device, cfg, seed=0):
    """Random keys/values for sequences of `lens` tokens scattered over a poisoned page pool, with their
    kernel-key pages filled by the torch layout functions (the reference of `pool_kernel_keys`)."""
    b = len(lens)
    width = max(math.ceil(n / page) for n in lens)
    n_pages = b * width + 2
    kc = torch.full((n_pages, page, hkv, d), float("nan"), device=device, dtype=dtype)
    vc = torch.full_like(kc, float("nan"))
    perm = torch.randperm(n_pages, generator=torch.Generator().manual_seed(seed + 1))[: b * width]
    table = perm.view(b, width).to(device=device, dtype=torch.int32)
    ks, vs = [], []
    for i, n in enumerate(lens):
        _, k, v = qkv(1, n, hkv, hkv, d, dtype, device, seed=seed + 10 + i)
        flat_k = torch.zeros(width * page, hkv, d, device=device, dtype=dtype)
        flat_v = torch.zeros_like(flat_k)
        flat_k[:n], flat_v[:n] = k, v
        kc[table[i].long()] = flat_k.view(width, page, hkv, d)
        vc[table[i].long()] = flat_v.view(width, page, hkv, d)
        ks.append(k)
        vs.append(v)
    stores = {}
    for name, size, stride in (("fine", cfg.kernel_size, cfg.kernel_stride),
                               ("coarse", cfg.coarse_kernel_size, cfg.coarse_kernel_stride)):
        store = torch.full((n_pages, R.kernel_slots(page, stride), hkv, d), float("nan"), device=device, dtype=dtype)
        for i in range(b):
            kk = R.kernel_means(ks[i], size, stride)
            page_i, slot = R.kernel_page_slots(torch.arange(kk.shape[0], device=device), size, stride, page)
            store[table[i].long()[page_i], slot] = kk
        stores[name] = store
    return kc, vc, table, ks, vs, stores


def test_interpreter_pool_kernel_keys():
    """Kernel keys pooled in place from the pages equal kernel_means, for decode (one token) and chunks."""
    if CUDA:
        pytest.skip("interpreter test: runs on CPU only")
    _check_pool("cpu", torch.float32, 1e-6)


def _check_pool(device, dtype, tol):
    from cpm4.kernels.infllm_v2.triton_decode import pool_kernel_keys

    cfg = small_cfg()
    page, hkv, d = 16, 2, 16
    lens = [70, 33, 129]
    kc, vc, table, ks, _, stores = paged_sequences(lens, page, hkv, d, dtype, device, cfg)
    for size, stride, ref in ((cfg.kernel_size, cfg.kernel_stride, stores["fine"]),
                              (cfg.coarse_kernel_size, cfg.coarse_kernel_stride, stores["coarse"])):
        for starts in ([69, 32, 128], [40, 0, 100]):  # the last token only / a chunk of new tokens
            out = torch.full_like(ref, float("nan"))
            st = torch.tensor(starts, device=device, dtype=torch.int32)
            en = torch.tensor(lens, device=device, dtype=torch.int32)
            pool_kernel_keys(kc, table, st, en, out, size, stride, max(n - s for n, s in zip(lens, starts)))
            written = 0
            for i, (s, n) in enumerate(zip(starts, lens)):
                lo, hi = R.num_kernels(s, size, stride), R.num_kernels(n, size, stride)
                p, slot = R.kernel_page_slots(torch.arange(lo, hi, device=device), size, stride, page)
                got = out[table[i].long()[p], slot]
                assert rel(got, ref[table[i].long()[p], slot]) < tol
                written += hi - lo
            assert int((~out[..., 0, 0].isnan()).sum()) == written  # nothing else written


def _check_append(device, dtype, tol):
    """append_kv stores each row's new key/value at its slot and pools exactly the fine/coarse kernels the
    token completes (equal to kernel_means), nothing else."""
    from cpm4.kernels.infllm_v2.triton_decode import append_kv

    cfg = small_cfg()
    page, hkv, d = 16, 2, 16
    lens = [32, 70, 48, 5]  # the last token completes: fine+coarse, nothing, fine+coarse, nothing
    kc, vc, table, ks, vs, stores = paged_sequences(lens, page, hkv, d, dtype, device, cfg)
    ref_k, ref_v = kc.clone(), vc.clone()
    ref = {name: st.clone() for name, st in stores.items()}
    slots = torch.tensor([int(table[i, (n - 1) // page]) * page + (n - 1) % page for i, n in enumerate(lens)],
                         device=device)
    flat_k, flat_v = kc.view(-1, hkv, d), vc.view(-1, hkv, d)
    flat_k[slots], flat_v[slots] = float("nan"), float("nan")  # poisoned: the kernel must write them
    written = 0
    for name, size, stride in (("fine", cfg.kernel_size, cfg.kernel_stride),
                               ("coarse", cfg.coarse_kernel_size, cfg.coarse_kernel_stride)):
        for i, n in enumerate(lens):
            if n >= size and (n - size) % stride == 0:  # kernel (n - size) // stride ends at the new token
                p, slot = R.kernel_page_slots(torch.tensor([(n - size) // stride], device=device), size, stride, page)
                stores[name][table[i].long()[p], slot] = float("nan")
                written += 1
    assert written == 4
    k_new = torch.stack([k[-1] for k in ks])
    v_new = torch.stack([v[-1] for v in vs])
    ends = torch.tensor(lens, device=device, dtype=torch.int32)
    append_kv(k_new, v_new, kc, vc, slots, table, ends, stores["fine"], stores["coarse"], cfg)
    assert torch.equal(kc.nan_to_num(7.0), ref_k.nan_to_num(7.0))  # pages never written stay poisoned
    assert torch.equal(vc.nan_to_num(7.0), ref_v.nan_to_num(7.0))
    for name in stores:
        assert rel(stores[name].nan_to_num(7.0), ref[name].nan_to_num(7.0)) < tol, name
    # Without kernel-key pages it only stores (the dense cache).
    flat_k[slots] = float("nan")
    append_kv(k_new, v_new, kc, vc, slots, table, ends)
    assert torch.equal(kc.nan_to_num(7.0), ref_k.nan_to_num(7.0))
    with pytest.raises(ValueError, match="do not fit"):
        append_kv(k_new[:, :1], v_new, kc, vc, slots, table, ends)


def test_interpreter_append_kv():
    if CUDA:
        pytest.skip("interpreter test: runs on CPU only")
    _check_append("cpu", torch.float32, 1e-6)


@gpu
def test_gpu_append_kv():
    _check_append("cuda", torch.bfloat16, 1e-2)


def _poison_last_token(kc, vc, table, stores, lens, cfg, page):
    """NaN over each row's last token (its k/v slot and the kernel keys it completes), as before a decode step
    that stores them itself; returns (k, v, slots) of those tokens and the poisoned originals' copies."""
    hkv, d = kc.shape[2], kc.shape[3]
    slots = torch.tensor([int(table[i, (n - 1) // page]) * page + (n - 1) % page for i, n in enumerate(lens)],
                         device=kc.device)
    k_new, v_new = kc.view(-1, hkv, d)[slots].clone(), vc.view(-1, hkv, d)[slots].clone()
    saved = (kc.clone(), vc.clone(), {name: st.clone() for name, st in stores.items()})
    kinds = [("fine", cfg.kernel_size, cfg.kernel_stride)]
    if cfg.variant == "gen-b":  # Gen-A caches keep no coarse keys
        kinds.append(("coarse", cfg.coarse_kernel_size, cfg.coarse_kernel_stride))
    kc.view(-1, hkv, d)[slots] = float("nan")
    vc.view(-1, hkv, d)[slots] = float("nan")
    for name, size, stride in kinds:
        for i, n in enumerate(lens):
            if n >= size and (n - size) % stride == 0:
                p, slot = R.kernel_page_slots(torch.tensor([(n - size) // stride], device=kc.device), size, stride,
                                              page)
                stores[name][table[i].long()[p], slot] = float("nan")
    return (k_new, v_new, slots), saved


def check_sparse_decode(cfg, lens, hq, hkv, d, dtype, device, tol, splits=None, tile_pages=None, fuse_append=False,
                        pdl=None, persistent_counters=None, separate_merge=None, narrow=None, width=None):
    """paged_sparse_decode against the reference InfLLM v2 (dense below dense_len) for each sequence:
    pooled block scores close to the reference's, the selection exactly the reference rule applied to the
    kernel's own pooled scores (in bf16/fp16 near-ties of rounded scores may differ from the float64
    reference's picks, so those are only counted), the output equal to the reference attention over the
    blocks chosen."""
    from cpm4.kernels.infllm_v2.triton_decode import decode_block_scores, decode_lse, paged_sparse_decode

    page = cfg.block_size
    kc, vc, table, ks, vs, stores = paged_sequences(lens, page, hkv, d, dtype, device, cfg, seed=3)
    if width is not None:  # a wider table, as the engine's (columns past a row's pages: valid, unread pages)
        table = torch.cat([table, table[:, :1].expand(-1, width - table.shape[1])], 1).contiguous()
    g = torch.Generator(device=device).manual_seed(7)
    q = torch.randn(len(lens), hq, d, generator=g, device=device).to(dtype)
    scale = d ** -0.5
    gen_b = cfg.variant == "gen-b"
    coarse = stores["coarse"] if gen_b else None
    lens_t = torch.tensor(lens, device=device, dtype=torch.int32)
    new_kv = saved = None
    if fuse_append:  # the step stores the last token and its kernel keys itself (in the LSE launch)
        new_kv, saved = _poison_last_token(kc, vc, table, stores, lens, cfg, page)
    out, sel = paged_sparse_decode(q, kc, vc, table, lens_t, stores["fine"], coarse, cfg, scale, splits=splits,
                                   return_selection=True, tile_pages=tile_pages, new_kv=new_kv, pdl=pdl,
                                   persistent_counters=persistent_counters, separate_merge=separate_merge,
                                   narrow=narrow)
    if fuse_append:
        for a, b in ((kc, saved[0]), (vc, saved[1]), *((stores[n], saved[2][n]) for n in stores)):
            assert rel(a.nan_to_num(7.0), b.nan_to_num(7.0)) < tol * 1e-2  # written back exactly, nothing else
    norm = (stores["coarse"], cfg.coarse_kernel_size, cfg.coarse_kernel_stride) if gen_b else (
        stores["fine"], cfg.kernel_size, cfg.kernel_stride)
    lse = decode_lse(q, *norm[:1], table, lens_t, cfg, norm[1], norm[2], scale, splits)
    pooled = decode_block_scores(q, stores["fine"], table, lens_t, lse, cfg, scale, splits)
    agree = total = 0
    for i, n in enumerate(lens):
        qi, k, v = q[i:i + 1].double(), ks[i].double(), vs[i].double()
        if cfg.is_sparse(n):
            pos = torch.tensor([n - 1], device=device)
            k1, k2 = R.compress_keys(k, cfg)
            nb = (n - 1) // page + 1
            ref_pooled = R.pool_to_blocks(R.block_scores(qi, k1, k2, pos, cfg, scale), nb, cfg)
            ours_pooled = pooled[i, :, :nb].double()
            assert rel(ours_pooled, ref_pooled[:, 0]) < tol, (i, n)
            ref_sel = R.select_blocks(R.block_scores(qi, k1, k2, pos, cfg, scale), pos, cfg)[:, 0]
            rule = R.select_pooled(ours_pooled[:, None], pos, cfg)[:, 0]
            kk = rule.shape[-1]
            ours = sel[i, :, :kk].long()
            assert torch.equal(ours, rule), (i, n)
            assert (sel[i, :, kk:] == -1).all()
            agree += sum(len(set(a.tolist()) & set(b.tolist()) - {-1}) for a, b in zip(ours, ref_sel))
            total += int((ref_sel >= 0).sum())
            ref, _ = R.block_sparse_attention(qi, k, v, R.attended_blocks(ours[:, None], pos, cfg), pos,
                                              cfg.block_size, scale)
        else:
            qd = qi.view(1, hkv, hq // hkv, d)
            s = torch.einsum("thgd,jhd->hgj", qd, k) * scale
            ref = torch.einsum("hgj,jhd->hgd", torch.softmax(s, -1), v).reshape(1, hq, d)
        assert rel(out[i:i + 1], ref) < tol, (i, n)
    return agree, total


@pytest.mark.parametrize("variant,tile_pages,fuse,sep,narrow", [
    ("gen-b", 1, False, False, True), ("gen-a", 1, False, True, True), ("gen-b", 2, False, False, False),
    ("gen-b", 1, True, True, True), ("gen-a", 1, True, False, False)])
def test_interpreter_paged_sparse_decode(variant, tile_pages, fuse, sep, narrow):
    if CUDA:
        pytest.skip("interpreter test: runs on CPU only")
    # Rows below dense_len (40) run dense; the others select 3 of their blocks (+ window) from pooled scores.
    # The last tokens of rows 200 (fine kernel) and 64 (fine and coarse) complete kernels: with `fuse` the
    # step pools them itself, and the LSE split holding the new kernel must not read its unwritten slot.
    cfg = small_cfg(variant, dense_len=40)
    agree, total = check_sparse_decode(cfg, [150, 7, 200, 64], 4, 2, 16, torch.float32, "cpu", 1e-4, splits=3,
                                       tile_pages=tile_pages, fuse_append=fuse, separate_merge=sep, narrow=narrow)
    assert agree == total > 0  # float32: the same blocks as the float64 reference


@pytest.mark.parametrize("peel", [False, True])
@pytest.mark.parametrize("variant,splits", [("gen-b", 3), ("gen-a", 1), ("gen-b", 2)])
def test_interpreter_lse_storing_the_token_equals_the_stored_one(monkeypatch, variant, splits, peel):
    """The sparse step's log-sum-exp launch storing the new token itself (the key it completes swapped into its
    tile, or with STORE_PEEL scored after the loop) equals that launch over the cache once stored: every head's
    total over its splits (rows 200 and 64 complete a kernel; the stale slots are NaN, so reading one shows)."""
    if CUDA:
        pytest.skip("interpreter test: runs on CPU only")
    from cpm4.kernels.infllm_v2 import triton_decode
    from cpm4.kernels.infllm_v2.triton_decode import decode_lse

    monkeypatch.setattr(triton_decode, "STORE_PEEL", peel)
    cfg = small_cfg(variant, dense_len=40)
    lens = [150, 7, 200, 64]
    kc, vc, table, _, _, stores = paged_sequences(lens, cfg.block_size, 2, 16, torch.float32, "cpu", cfg, seed=3)
    q = torch.randn(len(lens), 4, 16, generator=torch.Generator().manual_seed(5))
    lens_t = torch.tensor(lens, dtype=torch.int32)
    (k_new, v_new, slots), _ = _poison_last_token(kc, vc, table, stores, lens, cfg, cfg.block_size)
    name, size, stride = ("coarse", cfg.coarse_kernel_size, cfg.coarse_kernel_stride) if variant == "gen-b" else (
        "fine", cfg.kernel_size, cfg.kernel_stride)
    append = (k_new, v_new, kc, vc, slots, table, lens_t, stores["fine"], stores.get("coarse"), cfg)
    got = decode_lse(q, stores[name], table, lens_t, cfg, size, stride, 0.25, splits, append)
    want = decode_lse(q, stores[name], table, lens_t, cfg, size, stride, 0.25, splits)  # over the stored keys

    def total(x):  # log2-sum-exp over the splits
        return torch.logsumexp(x.double() * math.log(2), -1) / math.log(2)

    sparse = [i for i, n in enumerate(lens) if cfg.is_sparse(n)]
    assert torch.isfinite(total(got[sparse])).all()
    torch.testing.assert_close(total(got[sparse]), total(want[sparse]), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant,splits", [("gen-b", 3), ("gen-a", 1), ("gen-b", 1)])
def test_interpreter_paged_sparse_decode_peeled(monkeypatch, variant, splits):
    """STORE_PEEL in the sparse step: the key the new token completes scored after the LSE launch's loop instead
    of swapped into its tile (rows 200 and 64 complete kernels); the reference checks of `check_sparse_decode`."""
    if CUDA:
        pytest.skip("interpreter test: runs on CPU only")
    from cpm4.kernels.infllm_v2 import triton_decode

    monkeypatch.setattr(triton_decode, "STORE_PEEL", True)
    agree, total = check_sparse_decode(small_cfg(variant, dense_len=40), [150, 7, 200, 64], 4, 2, 16, torch.float32,
                                       "cpu", 1e-4, splits=splits, fuse_append=True)
    assert agree == total > 0


@pytest.mark.parametrize("variant", ["gen-b", "gen-a"])
def test_interpreter_paged_sparse_decode_in_a_wide_table(variant):
    """A 64-column table (64 selection lanes): rows whose blocks fit in a quarter or a half of the lanes, or all
    but their local blocks do, select over fewer lanes; the same blocks and outputs as the float64 reference."""
    if CUDA:
        pytest.skip("interpreter test: runs on CPU only")
    cfg = small_cfg(variant)  # blocks of 16 tokens, 2 local blocks, top-3
    # blocks: 10 (quarter), 19 (Gen-B: quarter + its 3 local blocks past it), 20 (half: one more would not be
    # local), 27 (half), 35 (Gen-B: half + 3 local), 50 (all 64 lanes)
    lens = [150, 300, 320, 420, 550, 790]
    agree, total = check_sparse_decode(cfg, lens, 4, 2, 16, torch.float32, "cpu", 1e-4, splits=3, width=64)
    assert agree == total > 0


def test_interpreter_persistent_counters_are_left_zero():
    """With persistent counters the kernels leave every arrival counter at zero, so the next call (here the
    same check again, on the same buffer) starts from a clean state."""
    if CUDA:
        pytest.skip("interpreter test: runs on CPU only")
    from cpm4.kernels.infllm_v2 import triton_decode

    cfg = small_cfg("gen-b", dense_len=40)
    for _ in range(2):
        check_sparse_decode(cfg, [150, 7, 200, 64], 4, 2, 16, torch.float32, "cpu", 1e-4, splits=3,
                            persistent_counters=True)
        bufs = triton_decode._COUNTERS[torch.device("cpu")]
        assert len(bufs) == 1 and not bufs[0].any()


@gpu
@pytest.mark.parametrize("variant", ["gen-b", "gen-a"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("hq,hkv,d", [(32, 2, 128), (16, 2, 64), (12, 4, 64)])
@pytest.mark.parametrize("tile_pages,fuse,pdl,sep,narrow", [
    (1, False, False, False, True), (2, False, False, True, True), (1, True, False, False, False),
    (2, True, True, False, True)])
def test_gpu_paged_sparse_decode(variant, dtype, hq, hkv, d, tile_pages, fuse, pdl, sep, narrow):
    cfg = SparseConfig(variant=variant, window_size=512, topk=16, dense_len=4096)
    # The last token of 4096 completes a fine and a coarse kernel, of 20000 a fine one (fused: pooled in the step).
    # pdl: programmatic dependent launches and persistent counters (run twice: the counters are reused).
    for _ in range(2 if pdl else 1):
        agree, total = check_sparse_decode(cfg, [9000, 100, 4096, 20000, 4095], hq, hkv, d, dtype, "cuda", 2e-2,
                                           tile_pages=tile_pages, fuse_append=fuse, pdl=pdl,
                                           persistent_counters=pdl, separate_merge=sep, narrow=narrow)
        assert agree >= 0.9 * total  # the float64 reference's picks, near-ties of rounded scores aside


@gpu
def test_gpu_pool_kernel_keys():
    _check_pool("cuda", torch.bfloat16, 1e-2)


def check_rows(cfg, lens, hq, hkv, d, dtype, device, tol, seed=0, ref_dtype=torch.float64):
    """Several sequences in one launch per stage (`triton_pipeline_rows`): each row's selection is the one of the
    same sequence run alone through the kernels (but near-ties their rounding splits differently), its attention
    over those blocks the reference's, and nothing is written past its queries."""
    from cpm4.kernels.infllm_v2 import triton_pipeline, triton_pipeline_rows
    from cpm4.kernels.infllm_v2.triton_select import compress

    rows = len(lens)
    s = max(kl for _, kl in lens)
    t = max(n for n, _ in lens) + 3  # padding past every row's queries, as the engine's batch has
    scale = 1 / math.sqrt(d)
    q = torch.zeros(rows, t, hq, d, device=device, dtype=dtype)
    k = torch.randn(rows, s, hkv, d, device=device).to(dtype)  # padding keys: garbage that must not be read
    v = torch.randn(rows, s, hkv, d, device=device).to(dtype)
    k1s, k2s, alone = [], [], []
    for r, (n, kl) in enumerate(lens):
        qr, kr, vr = qkv(n, kl, hq, hkv, d, dtype, device, seed + r)
        q[r, :n], k[r, :kl], v[r, :kl] = qr, kr, vr
        k1s.append(compress(kr, cfg.kernel_size, cfg.kernel_stride))
        k2s.append(compress(kr, cfg.coarse_kernel_size, cfg.coarse_kernel_stride) if cfg.variant == "gen-b" else None)
        alone.append(triton_pipeline(qr, kr, vr, cfg, scale, k1s[-1], k2s[-1], return_blocks=True))
    k2 = None if cfg.variant != "gen-b" else k2s
    out, idx = triton_pipeline_rows(q, k, v, [n for n, _ in lens], [kl for _, kl in lens], cfg, scale, k1s, k2,
                                    [x.shape[0] for x in k1s], None if k2 is None else [x.shape[0] for x in k2s],
                                    return_blocks=True)
    assert out.shape == (rows, t - 3, hq, d)
    for r, (n, kl) in enumerate(lens):
        a_out, a_idx = alone[r]
        mine = idx[r, :, :n]
        theirs = torch.nn.functional.pad(a_idx, (0, mine.shape[2] - a_idx.shape[2]), value=-1)
        same = (mine == theirs).all(-1).float().mean().item()
        assert same > (0.999 if dtype == torch.float32 else 0.95), (r, same)
        pos = torch.arange(kl - n, kl, device=device)
        blocks = R.attended_blocks(mine.long(), pos, cfg)
        ref, _ = R.block_sparse_attention(q[r, :n].to(ref_dtype), k[r, :kl].to(ref_dtype), v[r, :kl].to(ref_dtype),
                                          blocks, pos, cfg.block_size, scale, chunk=128)
        assert rel(out[r, :n], ref) < tol, r
        if dtype == torch.float32:
            assert rel(out[r, :n], a_out) < tol, r
        assert not out[r, n:].any(), r  # nothing written past a row's queries


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["gen-b", "gen-a"])
def test_interpreter_rows_in_one_launch(variant):
    if CUDA:
        pytest.skip("interpreter test: runs on CPU only")
    # Rows of different query and key counts: a whole prompt, chunks after cached tokens, a lone query.
    if variant == "gen-b":
        check_rows(small_cfg(variant), [(12, 90), (50, 50), (1, 65), (20, 110)], 4, 2, 16, torch.float32, "cpu", 1e-5)
    else:  # rows too short for a kernel or a second block beside long ones; a group of 3 heads
        check_rows(small_cfg(variant, window_size=16, topk=2), [(5, 7), (1, 3), (40, 40), (16, 100)], 6, 2, 16,
                   torch.float32, "cpu", 1e-5, seed=3)


@gpu
@pytest.mark.parametrize("variant", ["gen-b", "gen-a"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_rows_in_one_launch(variant, dtype, monkeypatch):
    first_configs(monkeypatch)
    cfg = SparseConfig(variant=variant, window_size=512, topk=16, dense_len=-1)
    # After a cached prefix (short chunks of long sequences), a whole prompt, a lone query, a longer chunk.
    check_rows(cfg, [(128, 9000), (64, 8256), (1, 5000), (700, 700), (300, 4000)], 32, 2, 128, dtype, "cuda", 2e-2,
               ref_dtype=torch.float32)
