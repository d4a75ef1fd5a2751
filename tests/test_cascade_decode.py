"""Cascade decode (cpm4.kernels.infllm_v2.triton_cascade): rows sharing leading pages attend them once, the
rest of their pages per row, merged — against the float64 paged decode over each row's own pages. On the CPU in
Triton's interpreter (tiny shapes); the `gpu` test runs the real kernels in bf16."""

import math

import pytest
import torch

pytest.importorskip("triton")

from cpm4.kernels.infllm_v2 import reference as R  # noqa: E402
from cpm4.kernels.infllm_v2.triton_cascade import SharedPrefix, shared_prefix  # noqa: E402

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


def test_shared_prefix_finds_the_largest_group():
    page = 16
    a = [10, 11, 12, 13]
    table = [a[:3] + [20], [5, 6], a[:3] + [21, 22], a[:2] + [30], a[:3] + [40]]
    lens = [60, 30, 70, 40, 49]
    s = shared_prefix(table, lens, page, min_pages=2, width=6, device="cpu")
    # Rows 0, 2, 3 and 4 share pages 10, 11; row 3 stops there: the group's common run is 2 pages.
    assert s.member.tolist() == [1, 0, 1, 1, 1] and s.count.tolist() == [2]
    assert s.pages.tolist()[:2] == [10, 11] and len(s.pages) == 6
    # Without row 3, three pages are common; a row whose current token is in the last common page stops there.
    s = shared_prefix([table[0], table[2], table[4]], [60, 70, 49], page, 2, 6, "cpu")
    assert s.count.tolist() == [3] and s.pages.tolist()[:3] == [10, 11, 12]
    s = shared_prefix([table[0], table[2], table[4]], [60, 70, 48], page, 2, 6, "cpu")
    assert s.count.tolist() == [2]  # row 3 of 48 tokens: its current token is in page 12
    # Fewer than two rows past min_pages pages: none.
    assert shared_prefix([table[0], table[1]], [60, 30], page, 2, 6, "cpu") is None
    assert shared_prefix([a, a], [40, 40], page, 3, 6, "cpu") is None


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16])
@pytest.mark.parametrize("hq,hkv,d", [(32, 2, 128), (16, 2, 64), (12, 4, 64)])
def test_gpu_cascade_decode(dtype, hq, hkv, d):
    if not CUDA:
        pytest.skip("needs CUDA")
    lens = [3000 + 7 * i for i in range(40)] + [100, 5000, 1]
    member = [1] * 40 + [0, 0, 0]
    _check("cuda", dtype, hq, hkv, d, 64, lens, member, n_shared=2900 // 64, tol=2e-2, splits=8)
