"""Stage 2's per-token part over the union of neighbouring tokens' blocks (cpm4/kernels/infllm_v2/triton_union.py):
the tiles' unions against a set computation, and the kernel's outputs against the token kernel's and the float64
definition (`reference.block_sparse_attention`) under Triton's interpreter on the CPU (and on a GPU)."""

from __future__ import annotations

import collections
import os

import pytest
import torch

from cpm4.kernels.infllm_v2 import reference as R

ON_CPU = not torch.cuda.is_available()
DEV = "cpu" if ON_CPU else "cuda"
# The union kernel against the token kernel: bit-near in the interpreter (exact fp32); on a GPU their tiles differ in
# shape, so TF32 dot products round differently (seen: 2.6e-5).
SAME = 1e-5 if ON_CPU else 2e-4
needs_kernels = pytest.mark.skipif(ON_CPU and os.environ.get("TRITON_INTERPRET") != "1",
                                   reason="Triton kernels: a GPU or the interpreter")


def selections(hkv: int, tq: int, q_start: int, block: int, nsel: int, share: float, seed: int) -> torch.Tensor:
    """[hkv, tq, nsel] int32 ascending, -1 last: each token's blocks before its own, drawn from those it may see;
    with share > 0 each group of 8 neighbouring tokens takes a common draw and keeps each of its entries with
    probability `share` (the rest its own), so neighbours overlap as a trained model's do."""
    g = torch.Generator().manual_seed(seed)
    out = torch.full((hkv, tq, nsel), -1, dtype=torch.int32)
    common = None
    for t in range(tq):
        qb = (q_start + t) // block
        for h in range(hkv):
            if t % 8 == 0 and h == 0:
                common = [torch.randperm(max(qb, 1), generator=g)[:nsel] for _ in range(hkv)]
            pick = torch.randperm(qb + 1, generator=g)[:nsel]  # blocks 0..qb (forced and window ones included)
            if share > 0 and common is not None:
                keep = (torch.rand(len(common[h]), generator=g) < share) & (common[h] <= qb)
                pick = torch.cat([common[h][keep], pick])
                pick = torch.unique(pick)[torch.randperm(len(torch.unique(pick)), generator=g)][:nsel]
            pick = pick.sort().values
            out[h, t, :len(pick)] = pick.to(torch.int32)
    return out


def set_counts(rows: torch.Tensor, sizes: torch.Tensor, block: int, init: int, window: int, tokens: int,
               every: int = 1) -> tuple[int, int]:
    """`union_blocks`' (unions' blocks in all, own blocks in all) by Python sets, over tiles 0, every, 2 every, ...:
    rows [R, hkv, Tq, K], sizes `table`'s (queries, first position) per sequence."""
    total = own = 0
    for r, (n, start) in enumerate(sizes.T.tolist()):
        for h in range(rows.shape[1]):
            for t0 in range(0, rows.shape[2], tokens * every):
                mine = [{b for b in rows[r, h, t].tolist() if init <= b < (start + t) // block - window}
                        for t in range(t0, min(t0 + tokens, n))]
                total += len(set().union(*mine))
                own += sum(map(len, mine))
    return total, own


def table(*sizes: int) -> torch.Tensor:
    """`union_blocks`'s table for sequences of (queries, first position) pairs."""
    return torch.tensor(list(zip(*[sizes[i:i + 2] for i in range(0, len(sizes), 2)])), dtype=torch.int32)


@needs_kernels
def test_union_blocks_are_each_tiles_own_blocks():
    from cpm4.kernels.infllm_v2.triton_union import union_blocks

    block, init, window = 16, 1, 2
    for q_start, tq, tokens in ((0, 50, 4), (37, 29, 8), (100, 5, 2)):
        idx = selections(2, tq, q_start, block, 6, 0.5, seed=q_start)
        idx[1, 0] = 200  # past the sequence's queries (a shorter row's padding): never read
        union, counts, total, own = union_blocks(idx[None].to(DEV), table(tq - 1, q_start).to(DEV), block, init,
                                                 window, tokens)
        union, counts = union.cpu(), counts.cpu()
        tiles = -(-tq // tokens)
        assert union.shape[:3] == (1, 2, tiles) and counts.shape == (1, 2, tiles) and union.dtype == torch.int32
        n_own = 0
        for h in range(2):
            for j in range(tiles):
                want = set()
                for t in range(j * tokens, min(tq - 1, (j + 1) * tokens)):
                    qb = (q_start + t) // block
                    mine = {int(b) for b in idx[h, t] if init <= b < qb - window}
                    n_own += len(mine)
                    want |= mine
                n = int(counts[0, h, j])
                assert n == len(want) and union[0, h, j, :n].tolist() == sorted(want)
                assert (union[0, h, j, n:] == -1).all()
        assert own == n_own and total == int(counts.sum())
    for bad in (3, 16, 1):
        with pytest.raises(ValueError, match="UNION_TOKENS must be 2, 4 or 8"):
            union_blocks(idx[None], table(tq, 0), block, init, window, bad)


def _sparse_fwd(monkeypatch, tokens, share, *args):
    from cpm4.kernels.infllm_v2 import triton_union
    from cpm4.kernels.infllm_v2.triton_attention import sparse_fwd

    monkeypatch.setattr(triton_union, "UNION_TOKENS", tokens)
    monkeypatch.setattr(triton_union, "UNION_MAX_SHARE", share)
    monkeypatch.setattr(triton_union, "UNION_MIN_QUERIES", 0)  # the tests' chunks are short
    monkeypatch.setattr(triton_union, "UNION_SAMPLE", 1)  # (a sample of short chunks may hold no own block)
    return sparse_fwd(*args)


@needs_kernels
@pytest.mark.parametrize("tokens", [2, 4])
@pytest.mark.parametrize("q_start,tq,overlap", [(0, 96, 0.8), (41, 55, 0.0), (41, 55, 0.9), (300, 37, 0.5)])
def test_union_kernel_equals_the_token_kernel(monkeypatch, tokens, q_start, tq, overlap):
    """Forced onto the union path (any share), the output and log-sum-exp are the token kernel's and the float64
    definition's over the shared set plus each token's own blocks: neighbours overlapping or not, a chunk starting
    mid-block, a last tile of fewer tokens."""
    from cpm4.kernels.infllm_v2 import triton_union
    from cpm4.kernels.infllm_v2.triton_attention import full_block_list

    block, init, window, hq, hkv, d = 16, 1, 2, 4, 2, 16
    tk = q_start + tq
    g = torch.Generator().manual_seed(tq + q_start)
    q = torch.randn(tq, hq, d, generator=g).to(DEV)
    k = torch.randn(tk, hkv, d, generator=g).to(DEV)
    v = torch.randn(tk, hkv, d, generator=g).to(DEV)
    idx = selections(hkv, tq, q_start, block, 5, overlap, seed=7).to(DEV)
    args = (q, k, v, idx, block, d ** -0.5, init, window)
    o_tok, lse_tok = _sparse_fwd(monkeypatch, 0, 0.6, *args)
    o_uni, lse_uni = _sparse_fwd(monkeypatch, tokens, float("inf"), *args)
    assert triton_union.taken(triton_union.choose(idx[None], tq, q_start, None, block, init, window))
    torch.testing.assert_close(o_uni, o_tok, rtol=SAME, atol=SAME)
    torch.testing.assert_close(lse_uni, lse_tok, rtol=SAME, atol=SAME)
    pos = torch.arange(q_start, tk, device=DEV)
    blocks = full_block_list(idx, pos, block, init, window).long()
    ref, ref_lse = R.block_sparse_attention(q.double(), k.double(), v.double(), blocks, pos, block, d ** -0.5)
    # Against float64 the tolerance is the kernels' own: on a GPU both take fp32 dot products as TF32 (10-bit
    # mantissa), in the interpreter they are exact fp32.
    tol = 1e-4 if ON_CPU else 5e-3
    torch.testing.assert_close(o_uni.double(), ref, rtol=tol, atol=tol)
    torch.testing.assert_close(lse_uni.double(), ref_lse, rtol=tol, atol=tol)


@needs_kernels
@pytest.mark.parametrize("tokens", [2, 4])
def test_union_kernel_with_rows(monkeypatch, tokens):
    """Several sequences in one launch (`Rows`: different query counts and cached lengths, padding poisoned):
    each sequence's output and log-sum-exp on the union path equal the token kernel's."""
    from cpm4.kernels.infllm_v2.triton_select import Rows

    block, init, window, hq, hkv, d = 16, 1, 2, 4, 2, 16
    n_new, kv_lens = [40, 23, 9], [120, 300, 70]
    r, tq, tk = len(n_new), max(n_new), max(kv_lens)
    g = torch.Generator().manual_seed(tokens)
    q = torch.randn(r, tq, hq, d, generator=g)
    k, v = (torch.randn(r, tk, hkv, d, generator=g) for _ in range(2))
    idx = torch.full((r, hkv, tq, 5), 10**6, dtype=torch.int32)  # padding: any block id would fault if read
    for i, (n, kl) in enumerate(zip(n_new, kv_lens)):
        idx[i, :, :n] = selections(hkv, n, kl - n, block, 5, 0.6, seed=i)
    rows = Rows(n_new, kv_lens, [1] * r, None, DEV)
    args = (q.to(DEV), k.to(DEV), v.to(DEV), idx.to(DEV), block, d ** -0.5, init, window, None, rows)
    o_tok, lse_tok = _sparse_fwd(monkeypatch, 0, 0.6, *args)
    o_uni, lse_uni = _sparse_fwd(monkeypatch, tokens, float("inf"), *args)
    for i, n in enumerate(n_new):
        torch.testing.assert_close(o_uni[i, :n], o_tok[i, :n], rtol=SAME, atol=SAME)
        torch.testing.assert_close(lse_uni[i, :n], lse_tok[i, :n], rtol=SAME, atol=SAME)
        assert (o_uni[i, n:] == 0).all()


@needs_kernels
def test_union_taken_only_when_the_unions_are_small():
    """`take_union`: neighbours choosing alike (unions a quarter of their own blocks) pass UNION_MAX_SHARE,
    independent draws among ~120 blocks (unions nearly all of them) do not."""
    from cpm4.kernels.infllm_v2.triton_union import take_union, union_blocks

    # 128 queries after 1,920 positions (120 blocks to choose from): the kernel runs 64 programs, not 1,024 as over
    # 2,048 queries from 0 (72 s under the interpreter).
    block, tq, q_start, nsel = 16, 128, 1920, 6
    alike = selections(2, tq, q_start, block, nsel, 1.0, seed=1)
    alike = alike.view(2, tq // 8, 8, nsel)[:, :, :1].expand(-1, -1, 8, -1).reshape(2, tq, nsel)  # 8 tokens alike
    apart = selections(2, tq, q_start, block, nsel, 0.0, seed=2)
    _, _, total, own = union_blocks(alike[None].to(DEV), table(tq, q_start).to(DEV), block, 1, 2, 4)
    assert total <= 0.3 * own and take_union(total, own)
    _, _, total, own = union_blocks(apart[None].to(DEV), table(tq, q_start).to(DEV), block, 1, 2, 4)
    assert total >= 0.8 * own and not take_union(total, own)
    assert not take_union(0, 0)


@needs_kernels
def test_sampled_counts_are_a_set_computation_over_those_tiles():
    """`sample_counts` (a kernel comparing each token's list with its tile's earlier tokens') over tiles 0, every,
    2 every, ...: each sampled tile's union of own blocks and its tokens' own blocks, counted with Python sets, for
    two sequences in one call (the second shorter, its padding never read), partial last tiles included; every = 1
    is `union_blocks`'s whole count."""
    from cpm4.kernels.infllm_v2.triton_union import sample_counts, union_blocks

    block, init, window, tq, q_start, nsel = 16, 1, 2, 38, 96, 6
    idx = selections(2, tq, q_start, block, nsel, 0.5, seed=3)
    rows = torch.stack([idx, idx.flip(1)])
    rows[1, :, 21:] = 5  # past the second sequence's 21 queries
    sizes = torch.tensor([[tq, 21], [q_start, q_start + 40]], dtype=torch.int32)
    for tokens in (2, 4, 8):
        for every in (1, 3):
            got = sample_counts(rows.to(DEV), sizes.to(DEV), block, init, window, tokens, every)
            assert got == set_counts(rows, sizes, block, init, window, tokens, every), (tokens, every)
            if every == 1:
                assert got == union_blocks(rows.to(DEV), sizes.to(DEV), block, init, window, tokens)[2:]
    with pytest.raises(ValueError, match="UNION_TOKENS must be 2, 4 or 8"):
        sample_counts(rows, sizes, block, init, window, 3, 1)


@needs_kernels
def test_sampled_decision_is_the_whole_counts_on_clear_cases():
    """Over every 16th tile `likely` decides alike neighbours (take) and independent draws (not) as the whole count
    does (`take_union` of the Python set count that `union_blocks` is checked against above), for one sequence and
    for rows whose second sequence is shorter."""
    from cpm4.kernels.infllm_v2 import triton_union
    from cpm4.kernels.infllm_v2.triton_union import likely, take_union

    block, tq, q_start, nsel = 16, 512, 1024, 6
    alike = selections(2, tq, q_start, block, nsel, 1.0, seed=1)
    alike = alike.view(2, tq // 8, 8, nsel)[:, :, :1].expand(-1, -1, 8, -1).reshape(2, tq, nsel)
    apart = selections(2, tq, q_start, block, nsel, 0.0, seed=2)
    for idx, want in ((alike, True), (apart, False)):
        for sizes in (table(tq, q_start), torch.tensor([[tq, tq // 2], [q_start, q_start]], dtype=torch.int32)):
            rows = idx[None].expand(sizes.shape[1], -1, -1, -1).clone()
            if sizes.shape[1] == 2:
                rows[1, :, tq // 2:] = 5  # past the shorter sequence: never read
            assert take_union(*set_counts(rows, sizes, block, 1, 2, 4)) == want  # (the kernel: 53 s interpreted)
            assert triton_union.UNION_SAMPLE > 1 and likely(rows.to(DEV), sizes.to(DEV), block, 1, 2, 4) == want
    # The stride: every UNION_SAMPLE-th tile, fewer once a call has more than UNION_SAMPLE_TILES of them to sample.
    cap = triton_union.UNION_SAMPLE * triton_union.UNION_SAMPLE_TILES * 4
    assert triton_union.sample_every(cap, 4) == triton_union.UNION_SAMPLE
    assert triton_union.sample_every(2 * cap, 4) == 2 * triton_union.UNION_SAMPLE
    assert triton_union.sample_every(2 * cap + 4, 4) == 2 * triton_union.UNION_SAMPLE + 1


def _alike_and_apart(hkv: int, tq: int, q_start: int, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[hkv, tq, 5] selections: each 8 neighbouring tokens' identical (alike), and independent draws (apart)."""
    alike = selections(hkv, tq, q_start, block, 5, 1.0, seed=1)
    alike = alike.view(hkv, tq // 8, 8, 5)[:, :, :1].expand(-1, -1, 8, -1).reshape(hkv, tq, 5).contiguous().to(DEV)
    return alike, selections(hkv, tq, q_start, block, 5, 0.0, seed=2).to(DEV)


@needs_kernels
def test_plans_are_made_for_long_calls_and_decided_on_the_device(monkeypatch):
    """With UNION_TOKENS set: a call below UNION_MIN_QUERIES gets no plan; a long call's plan holds the decision on
    the device: where the sample declines (independent draws), the whole count's kernel returned at once (stats zero:
    not taken); where it passes, the stats are the whole count's (`union_blocks`) and the plan is taken."""
    from cpm4.kernels.infllm_v2 import triton_union

    block, init, window, hkv, tq, q_start = 16, 1, 2, 2, 64, 256
    alike, apart = _alike_and_apart(hkv, tq, q_start, block)
    monkeypatch.setattr(triton_union, "UNION_TOKENS", 4)
    monkeypatch.setattr(triton_union, "UNION_SAMPLE", 4)
    monkeypatch.setattr(triton_union, "UNION_MIN_QUERIES", tq + 1)
    assert triton_union.choose(alike[None], tq, q_start, None, block, init, window) is None
    monkeypatch.setattr(triton_union, "UNION_MIN_QUERIES", tq)
    plan = triton_union.choose(apart[None], tq, q_start, None, block, init, window)
    assert plan is not None and plan.stats.tolist() == [0, 0, 0] and not triton_union.taken(plan)
    plan = triton_union.choose(alike[None], tq, q_start, None, block, init, window)
    sizes = torch.tensor([[tq], [q_start]], dtype=torch.int32, device=DEV)
    union, counts, total, own = triton_union.union_blocks(alike[None], sizes, block, init, window, 4)
    assert plan.stats.tolist() == [union.shape[-1], total, own] and triton_union.taken(plan)
    assert torch.equal(plan.counts, counts) and torch.equal(plan.union[..., :union.shape[-1]], union)
    assert (plan.union[..., union.shape[-1]:] == -1).all()


@needs_kernels
def test_the_kernels_rule_is_take_union():
    """`_taken` (the rule every kernel reads the plan by) decides as `take_union` on the host: `count_unions` given
    a sample's counts counts only where they pass, for shares at, below and above UNION_MAX_SHARE's kind of values,
    no own blocks, and an infinite share (`forced`)."""
    from cpm4.kernels.infllm_v2 import triton_union

    block, init, window, hkv, tq, q_start = 16, 1, 2, 2, 16, 256
    alike, _ = _alike_and_apart(hkv, tq, q_start, block)
    sizes = torch.tensor([[tq], [q_start]], dtype=torch.int32, device=DEV)
    for total, own, share in ((5, 10, 0.5), (6, 10, 0.5), (4, 10, 0.5), (0, 0, 0.5), (0, 0, float("inf")),
                              (10**9 + 1, 2 * 10**9, 0.5), (10**9, 2 * 10**9, 0.5), (7, 3, float("inf"))):
        sample = torch.tensor([0, total, own], dtype=torch.int64, device=DEV)
        _, _, stats = triton_union.count_unions(alike[None], sizes, block, init, window, 4, sample, share)
        assert (stats[2].item() > 0) == triton_union.take_union(total, own, share), (total, own, share)


def test_token_kernels_are_tuned_on_their_work():
    """The token kernels' autotuners time a call with a taken plan as declined (else their programs would return at
    once and the fastest empty launch would win): the pre-hook zeroes the plan's stats, the post-hook restores them;
    calls without a plan (UNION false) and the reset after tuning are left alone."""
    from cpm4.kernels.infllm_v2 import triton_attention, triton_union

    for kernel in (triton_attention._fwd_token_kernel, triton_attention._bwd_dq_token_kernel):
        assert kernel.pre_hook is triton_union.decline_while_tuning
        assert kernel.post_hook is triton_union.restore_after_tuning
    stats = torch.tensor([3, 40, 100])
    triton_union.decline_while_tuning({"UNION": True, "un_ptr": stats}, reset_only=True)
    triton_union.decline_while_tuning({"UNION": False, "un_ptr": stats})
    assert stats.tolist() == [3, 40, 100]
    triton_union.decline_while_tuning({"UNION": True, "un_ptr": stats})
    assert stats.tolist() == [0, 0, 0] and not triton_union.take_union(*stats.tolist()[1:], 0.5)
    triton_union.restore_after_tuning({"UNION": True, "un_ptr": stats}, exception=None)
    assert stats.tolist() == [3, 40, 100] and not triton_union._saved


@needs_kernels
@pytest.mark.parametrize("silenced", ["union", "token"])
def test_one_kernel_works_as_the_plan_decides(monkeypatch, silenced):
    """sparse_fwd launches both kernels with a plan and each reads the decision: with one of them silenced, the other
    alone gives the whole output where the plan is its own (taken: the union kernel; declined: the token kernel)
    and leaves it untouched (zeros, as `Rows` outputs start) where it is not."""
    from cpm4.kernels.infllm_v2 import triton_attention, triton_union
    from cpm4.kernels.infllm_v2.triton_select import Rows

    block, init, window, hq, hkv, d, tq, q_start = 16, 1, 2, 4, 2, 16, 64, 256
    g = torch.Generator().manual_seed(4)
    q = torch.randn(1, tq, hq, d, generator=g).to(DEV)
    k, v = (torch.randn(1, q_start + tq, hkv, d, generator=g).to(DEV) for _ in range(2))
    monkeypatch.setattr(triton_union, "UNION_SAMPLE", 4)
    monkeypatch.setattr(triton_union, "UNION_MIN_QUERIES", 0)
    for idx, union_does_it in zip(_alike_and_apart(hkv, tq, q_start, block), (True, False)):
        rows = Rows([tq], [q_start + tq], [1], None, DEV)
        args = (q, k, v, idx[None], block, d ** -0.5, init, window, None, rows)
        monkeypatch.setattr(triton_union, "UNION_TOKENS", 0)
        want, _ = triton_attention.sparse_fwd(*args)
        monkeypatch.setattr(triton_union, "UNION_TOKENS", 4)
        with monkeypatch.context() as m:
            quiet = {"union": (triton_union, "_fwd_union_kernel"), "token": (triton_attention, "_fwd_token_kernel")}
            m.setattr(*quiet[silenced], collections.defaultdict(lambda: lambda *a, **kw: None))
            got, _ = triton_attention.sparse_fwd(*args)
        if union_does_it == (silenced == "token"):
            torch.testing.assert_close(got, want, rtol=SAME, atol=SAME)
        else:
            assert (got == 0).all()


@needs_kernels
def test_declined_plans_union_kernels_write_nothing(monkeypatch):
    """Declined, a plan's counts and unions are never written (torch.empty: whatever memory held): both union
    kernels, forward and dq, must return before reading them, leaving their outputs to the token kernels. Here the
    unwritten memory holds plausible blocks (a count of 3, block 1), which a kernel reading them would attend to.
    (The dq kernel lacked the check: on the GPU it faulted on such memory, test_train_gpu.py.)"""
    from cpm4.kernels.infllm_v2 import triton_union

    block, init, window, hq, hkv, d, tq, q_start = 16, 1, 2, 4, 2, 16, 64, 256
    g = torch.Generator().manual_seed(5)
    q = torch.randn(1, tq, hq, d, generator=g).to(DEV)
    k, v = (torch.randn(1, q_start + tq, hkv, d, generator=g).to(DEV) for _ in range(2))
    _, apart = _alike_and_apart(hkv, tq, q_start, block)
    monkeypatch.setattr(triton_union, "UNION_TOKENS", 4)
    monkeypatch.setattr(triton_union, "UNION_SAMPLE", 4)
    monkeypatch.setattr(triton_union, "UNION_MIN_QUERIES", 0)
    plan = triton_union.choose(apart[None], tq, q_start, None, block, init, window)
    assert plan is not None and not triton_union.taken(plan)
    plan.counts.fill_(3)
    plan.union.fill_(-1)
    plan.union[..., :3] = torch.tensor([1, 2, 3], dtype=torch.int32)
    o_shared, lse_shared = torch.zeros_like(q, dtype=torch.float32), torch.zeros(1, tq, hq, device=DEV)
    o, lse = torch.full_like(q, 7.0), torch.full((1, tq, hq), 7.0, device=DEV)
    triton_union.fwd_union(q, k, v, apart[None], plan, o_shared, lse_shared, o, lse, block, d ** -0.5, init, window)
    assert (o == 7).all() and (lse == 7).all()
    do, delta = torch.randn(tq, hq, d, generator=g).to(DEV), torch.zeros(tq, hq, device=DEV)
    dq = torch.full_like(q[0], 7.0)
    triton_union.bwd_dq_union(q[0], k[0], v[0], apart, plan, do, lse[0], delta, o_shared[0], dq, block, d ** -0.5,
                              init, window)
    assert (dq == 7).all()


@needs_kernels
@pytest.mark.parametrize("tokens,q_start,tq,overlap", [(4, 0, 96, 0.8), (2, 41, 55, 0.9)])
def test_union_dq_equals_the_token_kernels(monkeypatch, tokens, q_start, tq, overlap):
    """The backward's per-token dq over the unions (`bwd_dq_union`, taken as the forward decides): dq the token
    kernel's and float64 autograd's through the reference; dk/dv untouched (the same inverted pass)."""
    from cpm4.kernels.infllm_v2 import triton_union
    from cpm4.kernels.infllm_v2.triton_attention import full_block_list, sparse_bwd

    block, init, window, hq, hkv, d = 16, 1, 2, 4, 2, 16
    tk = q_start + tq
    g = torch.Generator().manual_seed(tq + 7)
    q = torch.randn(tq, hq, d, generator=g).to(DEV)
    k, v = (torch.randn(tk, hkv, d, generator=g).to(DEV) for _ in range(2))
    do = torch.randn(tq, hq, d, generator=g).to(DEV)
    idx = selections(hkv, tq, q_start, block, 5, overlap, seed=3).to(DEV)
    args = (q, k, v, idx, block, d ** -0.5, init, window)
    o, lse = _sparse_fwd(monkeypatch, 0, 0.6, *args)
    want = sparse_bwd(do, q, k, v, o, lse, idx, block, d ** -0.5, init, window)
    calls = []
    real = triton_union.bwd_dq_union
    monkeypatch.setattr(triton_union, "bwd_dq_union", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    _sparse_fwd(monkeypatch, tokens, float("inf"), *args)  # (sets the flags the backward reads too)
    assert triton_union.taken(triton_union.choose(idx[None], tq, q_start, None, block, init, window))
    dq, dk, dv = sparse_bwd(do, q, k, v, o, lse, idx, block, d ** -0.5, init, window)
    assert calls == [1]
    torch.testing.assert_close(dq, want[0], rtol=SAME, atol=SAME)
    assert torch.equal(dk, want[1]) and torch.equal(dv, want[2])
    pos = torch.arange(q_start, tk, device=DEV)
    blocks = full_block_list(idx, pos, block, init, window).long()
    qd, kd, vd = (x.double().requires_grad_() for x in (q, k, v))
    ref, _ = R.block_sparse_attention(qd, kd, vd, blocks, pos, block, d ** -0.5)
    ref.backward(do.double())
    tol = 1e-4 if ON_CPU else 5e-3
    torch.testing.assert_close(dq.double(), qd.grad, rtol=tol, atol=tol)


@needs_kernels
def test_autograd_asks_the_union_question_once(monkeypatch):
    """block_sparse_attention (forward and backward through autograd) decides the union path once and both passes
    take it: the gradients are the ones sparse_bwd computes deciding for itself."""
    from cpm4.kernels.infllm_v2 import triton_union
    from cpm4.kernels.infllm_v2.triton_attention import block_sparse_attention, sparse_bwd

    block, init, window, hq, hkv, d, tq, q_start = 16, 1, 2, 4, 2, 16, 32, 256
    g = torch.Generator().manual_seed(5)
    q = torch.randn(tq, hq, d, generator=g).to(DEV)
    k, v = (torch.randn(q_start + tq, hkv, d, generator=g).to(DEV) for _ in range(2))
    idx = selections(hkv, tq, q_start, block, 5, 0.9, seed=4).to(DEV)
    o, lse = _sparse_fwd(monkeypatch, 4, float("inf"), q, k, v, idx, block, d ** -0.5, init, window)
    want = sparse_bwd(torch.ones_like(o), q, k, v, o, lse, idx, block, d ** -0.5, init, window)
    calls, used = [], []
    real_choose, real_dq = triton_union.choose, triton_union.bwd_dq_union
    monkeypatch.setattr(triton_union, "choose", lambda *a, **kw: calls.append(1) or real_choose(*a, **kw))
    monkeypatch.setattr(triton_union, "bwd_dq_union", lambda *a, **kw: used.append(1) or real_dq(*a, **kw))
    qg, kg, vg = (x.clone().requires_grad_() for x in (q, k, v))
    block_sparse_attention(qg, kg, vg, idx, block, d ** -0.5, init, window).sum().backward()
    assert calls == [1] and used == [1]
    for got, w in zip((qg.grad, kg.grad, vg.grad), want):
        torch.testing.assert_close(got, w, rtol=SAME, atol=SAME)


@needs_kernels
def test_sparse_fwd_takes_the_union_kernel_by_the_flag(monkeypatch):
    """sparse_fwd calls `fwd_union` with UNION_TOKENS set and unions small enough, never with it 0."""
    from cpm4.kernels.infllm_v2 import triton_union

    calls = []
    real = triton_union.fwd_union
    monkeypatch.setattr(triton_union, "fwd_union", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    block, init, window, hq, hkv, d, tq = 16, 1, 2, 4, 2, 16, 96
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(tq, h, d, generator=g).to(DEV) for h in (hq, hkv, hkv))
    idx = selections(hkv, tq, 0, block, 5, 1.0, seed=1)
    idx = idx.view(hkv, tq // 8, 8, 5)[:, :, :1].expand(-1, -1, 8, -1).reshape(hkv, tq, 5).contiguous().to(DEV)
    for tokens, want in ((4, 1), (0, 0)):
        calls.clear()
        _sparse_fwd(monkeypatch, tokens, 0.6, q, k, v, idx, block, d ** -0.5, init, window)
        assert len(calls) == want


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [2, 4, 8])
def test_union_kernel_on_cuda(monkeypatch, tokens):
    """bf16 at the 8B's group (32 query heads over 2 KV heads, d 128, blocks of 64), 4K tokens after 1K cached:
    the union path's output is the token kernel's (bf16 rounding apart) and its log-sum-exp equal."""
    if ON_CPU:
        pytest.skip("needs CUDA")
    g = torch.Generator().manual_seed(tokens)
    q_start, tq = 1000, 4096
    q = torch.randn(tq, 32, 128, generator=g).to("cuda", torch.bfloat16)
    k, v = (torch.randn(q_start + tq, 2, 128, generator=g).to("cuda", torch.bfloat16) for _ in range(2))
    idx = selections(2, tq, q_start, 64, 24, 0.7, seed=tokens).cuda()
    args = (q, k, v, idx, 64, 128 ** -0.5, 1, 8)
    o_tok, lse_tok = _sparse_fwd(monkeypatch, 0, 0.6, *args)
    o_uni, lse_uni = _sparse_fwd(monkeypatch, tokens, float("inf"), *args)
    torch.testing.assert_close(o_uni.float(), o_tok.float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(lse_uni, lse_tok, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [4, 8])
def test_union_dq_on_cuda(monkeypatch, tokens):
    """The dq over the unions at the same shape: the token kernel's dq (bf16 rounding apart), dk/dv equal."""
    if ON_CPU:
        pytest.skip("needs CUDA")
    from cpm4.kernels.infllm_v2.triton_attention import sparse_bwd

    g = torch.Generator().manual_seed(tokens + 10)
    q_start, tq = 1000, 4096
    q, do = (torch.randn(tq, 32, 128, generator=g).to("cuda", torch.bfloat16) for _ in range(2))
    k, v = (torch.randn(q_start + tq, 2, 128, generator=g).to("cuda", torch.bfloat16) for _ in range(2))
    idx = selections(2, tq, q_start, 64, 24, 0.7, seed=tokens).cuda()
    args = (q, k, v, idx, 64, 128 ** -0.5, 1, 8)
    o, lse = _sparse_fwd(monkeypatch, 0, 0.6, *args)
    want = sparse_bwd(do, q, k, v, o, lse, idx, 64, 128 ** -0.5, 1, 8)
    _sparse_fwd(monkeypatch, tokens, float("inf"), *args)
    got = sparse_bwd(do, q, k, v, o, lse, idx, 64, 128 ** -0.5, 1, 8)
    torch.testing.assert_close(got[0].float(), want[0].float(), rtol=2e-2, atol=2e-2)
    assert torch.equal(got[1], want[1]) and torch.equal(got[2], want[2])


def test_warm_up_compiles_the_union_kernel(monkeypatch):
    """With UNION_TOKENS set, `warm_prefill_kernels` (the engine's warm-up) launches the union kernel at each
    selection width as well (random inputs alone would take the token kernel and leave it to a request), and the
    token kernel both with a plan and without (calls below UNION_MIN_QUERIES)."""
    from jit_signatures import interpreted, launch_signatures
    from test_infllm_v2_triton import small_cfg

    from cpm4.kernels.infllm_v2 import triton_union, warm_prefill_kernels

    if not ON_CPU or os.environ.get("TRITON_INTERPRET") != "1" or not interpreted():
        pytest.skip("signatures are read from the interpreter's launches")
    cfg = small_cfg(topk=14, block_size=8, window_size=16, dense_len=33)  # widths 8 and 16 (test_infllm_v2_triton)
    before = triton_union.UNION_MAX_SHARE
    for tokens, want in ((0, set()), (4, {8, 16})):
        monkeypatch.setattr(triton_union, "UNION_TOKENS", tokens)
        with launch_signatures() as warm:
            warm_prefill_kernels(cfg, 16, 2, 16, 104, "cpu", torch.float16, queries=4)
        assert {dict(s)["NSEL_PAD"] for s in warm.get("_fwd_union_kernel", [])} == want
        # the token kernel with a plan and without, at each width, one sequence and several rows
        token = {(dict(s)["NSEL_PAD"], dict(s)["UNION"], dict(s)["ROWS"]) for s in warm["_fwd_token_kernel"]}
        assert token == {(w, u, r) for w in (8, 16) for u in {False, bool(tokens)} for r in (False, True)}
        assert triton_union.UNION_MAX_SHARE == before  # forced() restored it


def test_union_tokens_from_the_environment():
    """CPM4_UNION_TOKENS sets the union path's T for a process (unset: 4; 0: off); anything else is refused by
    name."""
    from cpm4.kernels.infllm_v2.triton_union import tokens_from_env

    assert tokens_from_env({}) == 4 and tokens_from_env({"CPM4_UNION_TOKENS": ""}) == 4
    assert [tokens_from_env({"CPM4_UNION_TOKENS": v}) for v in ("0", "2", " 4", "8")] == [0, 2, 4, 8]
    for bad in ("3", "16", "four", "-4"):
        with pytest.raises(ValueError, match=f"CPM4_UNION_TOKENS must be 0, 2, 4 or 8.*{bad}"):
            tokens_from_env({"CPM4_UNION_TOKENS": bad})


def test_union_launch_falls_back_to_one_stage_where_shared_memory_runs_out(monkeypatch):
    """The union kernels' fixed launch (not autotuned): where its stages need more shared memory than the GPU has
    (head dim 256 on a ~100 KB GPU), the launch is made again with one stage, and that kernel and constants keep
    one stage after; an error at one stage is raised."""
    import triton

    from cpm4.kernels.infllm_v2 import triton_union

    monkeypatch.setattr(triton_union, "launch_config", lambda: {"num_warps": 4, "num_stages": 2})
    monkeypatch.setattr(triton_union, "_ONE_STAGE", {})
    calls = []

    class Kernel:
        def __init__(self, limit):
            self.limit = limit

        def __getitem__(self, grid):
            def run(*args, num_warps, num_stages, **consts):
                calls.append((grid, args, consts["D"], num_stages))
                if num_stages > self.limit:
                    raise triton.runtime.errors.OutOfResources(147456, 101376, "shared memory")
            return run

    big, fits = Kernel(limit=1), Kernel(limit=3)
    triton_union._launch(big, (8, 2), (1, 2), {"D": 256})
    assert calls == [((8, 2), (1, 2), 256, 2), ((8, 2), (1, 2), 256, 1)]
    calls.clear()
    triton_union._launch(big, (8, 2), (1, 2), {"D": 256})  # remembered: straight to one stage
    triton_union._launch(fits, (8, 2), (1, 2), {"D": 256})  # another kernel keeps its stages
    assert [c[3] for c in calls] == [1, 2]
    with pytest.raises(triton.runtime.errors.OutOfResources):
        triton_union._launch(Kernel(limit=0), (1,), (), {"D": 256})
