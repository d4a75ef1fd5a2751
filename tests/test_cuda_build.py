"""The Triton kernels built for sm_80 and sm_90 here (tests/cuda_build.py): the launches their interpreter tests make
are captured and compiled with Triton's bundled ptxas, so a kernel cannot reach a GPU unbuilt, and the "sm80+"
promise of the InfLLM v2 kernels is checked in CI. (The interpreter checks their values; this, that they build.)"""

from __future__ import annotations

import os
from unittest import mock

import cuda_build
import pytest
import torch

pytestmark = pytest.mark.skipif(torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") != "1"
                                or not cuda_build.available(), reason="CPU-only check with Triton's bundled ptxas")


def test_elementwise_kernels_build_for_sm80_and_sm90():
    from test_elementwise_triton import _check_all, _inputs

    from cpm4.kernels.elementwise import triton_ops

    ops = triton_ops()
    with cuda_build.capture() as launches:
        _check_all("cpu", torch.float32)
        a = _inputs("cpu", torch.bfloat16)  # the model's dtype (values unchecked: the interpreter truncates bf16)
        ops.rms_norm(a["x"], a["w"], 1e-6), ops.add_rms_norm(a["x"], a["y"], 0.3, a["w"], 1e-6)
        ops.add_scaled(a["x"], a["y"], 0.3), ops.silu_mul(a["gate"], a["up"]), ops.rotary(a["q"], a["cos"], a["sin"])
    built = cuda_build.build(launches)
    assert len(built) >= 10  # float32 and bfloat16 variants of each
    assert {"_rms_norm_kernel", "_add_rms_norm_kernel", "_add_scaled_kernel", "_silu_mul_kernel",
            "_rotary_kernel"} <= set(built)


def test_gemv_kernel_builds_for_sm80_and_sm90():
    from cpm4.kernels.gemv.triton_gemv import gemv

    with cuda_build.capture() as launches:
        for split, m in ((1, 1), (2, 3)):
            x, w = torch.randn(m, 96).to(torch.bfloat16), torch.randn(40, 96).to(torch.bfloat16)
            gemv(x, w, config={"BLOCK_N": 16, "BLOCK_K": 32, "SPLIT": split})
            # the fused decode layer's three variants (norm before; SiLU·up before with the residual after)
            r = torch.randn(m, 40).to(torch.bfloat16)
            gemv(x, w, config={"BLOCK_N": 4, "BLOCK_K": 64, "SPLIT": split}, norm=(torch.ones(96, dtype=x.dtype), 1e-6))
            gemv(x, w, config={"BLOCK_N": 4, "BLOCK_K": 64, "SPLIT": split}, residual=r, scale=0.3)
            gemv(torch.cat([x, x], 1), w, config={"BLOCK_N": 4, "BLOCK_K": 64, "SPLIT": split}, glu=True,
                 residual=r, scale=0.3)
            tab = torch.ones(m, 8)  # heads of 8, the first 3 of 5 rotated, the input normed (the q/k/v projection)
            gemv(x, w, config={"BLOCK_N": 4, "BLOCK_K": 64, "SPLIT": split}, norm=(torch.ones(96, dtype=x.dtype), 1e-6),
                 rope=(tab, tab, 24, 8))
    assert cuda_build.build(launches).count("_gemv_kernel") == 10


def test_selection_kernel_builds_for_sm80_and_sm90():
    from test_infllm_v2_triton import small_cfg

    from cpm4.kernels.infllm_v2 import reference as R
    from cpm4.kernels.infllm_v2.triton_select import select_blocks

    cfg = small_cfg("gen-b", topk=5)
    n1 = R.num_kernels(400, cfg.kernel_size, cfg.kernel_stride)
    with cuda_build.capture() as launches:
        select_blocks(torch.rand(2, 5, n1).to(torch.bfloat16), 395, 5, n1, cfg)
    assert "_select_kernel" in cuda_build.build(launches)


@pytest.mark.slow
def test_infllm_v2_kernels_build_for_sm80_and_sm90(monkeypatch):
    """Every InfLLM v2 kernel: prefill stages 1-4 with the backward (Gen-B and Gen-A; Gen-A's with the dk/dv work
    split, its dk/dv and stage 1 scores as [keys, rows] and two heads a shared-blocks tile), and the paged sparse
    decode step with the fused append."""
    from test_infllm_v2_triton import check_pipeline, check_sparse_decode, small_cfg

    from cpm4.kernels.infllm_v2 import triton_attention, triton_decode, triton_select

    monkeypatch.setattr(triton_decode, "STORE_PEEL", False)  # the store's token swapped into the LSE tiles first
    with cuda_build.capture() as launches:
        for variant in ("gen-b", "gen-a"):
            monkeypatch.setattr(triton_attention, "DKDV_CHUNK", None if variant == "gen-b" else 5)
            monkeypatch.setattr(triton_attention, "DKDV_KEYS_FIRST", variant == "gen-a")
            monkeypatch.setattr(triton_select, "SCORE_KEYS_FIRST", variant == "gen-a")
            monkeypatch.setattr(triton_attention, "SHARED_HEADS", 2 if variant == "gen-a" else 1)
            check_pipeline(small_cfg(variant), 70, 70, 4, 2, 16, torch.float32, "cpu", 1e-5)
            check_sparse_decode(small_cfg(variant, dense_len=40), [150, 7, 200, 64], 4, 2, 16, torch.float32, "cpu",
                                1e-4, splits=3, fuse_append=True)
        check_sparse_decode(small_cfg("gen-b", dense_len=40), [150, 7, 200, 64], 4, 2, 16, torch.float32, "cpu", 1e-4,
                            splits=3, separate_merge=False, narrow=False)  # the other paths
        monkeypatch.setattr(triton_decode, "STORE_PEEL", True)  # the store's token peeled out of the LSE tiles
        check_sparse_decode(small_cfg("gen-b", dense_len=40), [150, 7, 200, 64], 4, 2, 16, torch.float32, "cpu", 1e-4,
                            splits=3, fuse_append=True)
    assert {consts.get("PEEL") for fn, _, consts, _ in launches if fn.__name__ == "_lse_kernel"} >= {False, True}
    built = cuda_build.build(launches)
    for name in ("_select_kernel", "_fwd_token_kernel", "_bwd_dkdv_kernel", "_bwd_dkdv_sum_kernel", "_delta_kernel",
                 "_score_kernel", "_attend_kernel", "_merge_kernel"):
        assert name in built, name


def test_decode_step_with_programmatic_launches_builds_for_sm90():
    """Every kernel of the decode step as a programmatic dependent (PDL, Hopper and later: the interpreter runs
    them without it) builds for sm_90: the sparse step's (the store in the LSE launch, scores and selection, the
    attention, the separate merge), the dense step's store, and the GEMV (plain and with each fused flag)."""
    from test_infllm_v2_triton import check_sparse_decode, small_cfg

    from cpm4.kernels.gemv.triton_gemv import gemv
    from cpm4.kernels.infllm_v2 import triton_decode
    from cpm4.kernels.infllm_v2.triton_decode import append_kv, paged_decode

    with cuda_build.capture() as launches:
        check_sparse_decode(small_cfg("gen-b", dense_len=40), [150, 7, 200, 64], 4, 2, 16, torch.float32, "cpu",
                            1e-4, splits=3)
        kc = torch.zeros(6, 16, 2, 16)
        table, ends = torch.tensor([[0, 1, 2], [3, 4, 5]], dtype=torch.int32), torch.tensor([4, 9], dtype=torch.int32)
        append_kv(torch.randn(2, 2, 16), torch.randn(2, 2, 16), kc, kc.clone(), torch.tensor([3, 40]), table, ends)
        # the dense decode storing the new token in its attention launch, swapped into its tile
        with mock.patch.object(triton_decode, "STORE_PEEL", False):
            paged_decode(torch.randn(2, 4, 16), kc, kc.clone(), table, ends, splits=2,
                         new_kv=(torch.randn(2, 2, 16), torch.randn(2, 2, 16), torch.tensor([3, 40])))
        with mock.patch.object(triton_decode, "STORE_PEEL", True):  # and with the current token peeled
            paged_decode(torch.randn(2, 4, 16), kc, kc.clone(), table, ends, splits=2,
                         new_kv=(torch.randn(2, 2, 16), torch.randn(2, 2, 16), torch.tensor([3, 40])))
        x, w = torch.randn(1, 96).to(torch.bfloat16), torch.randn(40, 96).to(torch.bfloat16)
        r, tab = torch.randn(1, 40).to(torch.bfloat16), torch.ones(1, 8)
        for cfg in ({"BLOCK_N": 4, "BLOCK_K": 64, "SPLIT": 2}, {"BLOCK_N": 8, "BLOCK_K": 32, "SPLIT": 1}):
            gemv(x, w, config=cfg)
            gemv(x, w, config=cfg, norm=(torch.ones(96, dtype=x.dtype), 1e-6), rope=(tab, tab, 24, 8))
            gemv(torch.cat([x, x], 1), w, config=cfg, glu=True, residual=r, scale=0.3)
    pdl = [(fn, sig, {**consts, "PDL": True}, options) for fn, sig, consts, options in launches if "PDL" in consts]
    names = {"_attend_kernel", "_score_kernel", "_lse_kernel", "_merge_kernel", "_append_kernel", "_gemv_kernel"}
    assert {fn.__name__ for fn, *_ in pdl} == names
    built = cuda_build.build(pdl, archs=(90,))
    assert set(built) == names and built.count("_gemv_kernel") == 6
    store = [launch for launch in launches if launch[2].get("STORE")]
    assert [launch[2].get("PEEL") for launch in store] == [False, True]
    assert cuda_build.build(store) == ["_attend_kernel"] * 2  # sm_80 and sm_90, without PDL


def test_cascade_decode_kernels_build_for_sm80_and_sm90(monkeypatch):
    """Cascade decode's shared-pages kernel (two groups, rows by group and in arrival order) beside the paged decode
    that skips each row's shared pages."""
    from test_cascade_decode import _check_groups

    from cpm4.kernels.infllm_v2 import triton_cascade

    monkeypatch.setattr(triton_cascade, "TILE_QUERIES", 16)
    with cuda_build.capture() as launches:
        _check_groups("cpu", torch.float32, 1e-5)
    built = cuda_build.build(launches)
    assert {"_shared_kernel", "_attend_kernel"} <= set(built)


@pytest.mark.slow
def test_union_kernel_builds_for_sm80_and_sm90(monkeypatch):
    """Stage 2 over neighbouring tokens' union of blocks (`triton_union`), forward and dq, at the 8B's group (16
    heads, d 128, blocks of 64), 4 tokens a program (the default; 2 and 8 differ in sizes only, and run in the GPU
    tests), bf16; the counts that decide for it and build the unions (the whole count after a sample, and alone);
    and the token kernel reading a plan (its early return). ≈ 50 s of building here, cold."""
    from test_infllm_v2_union import selections

    from cpm4.kernels.infllm_v2 import triton_union
    from cpm4.kernels.infllm_v2.triton_attention import sparse_fwd

    q = torch.randn(64, 32, 128).to(torch.bfloat16)
    k, v = (torch.randn(384, 2, 128).to(torch.bfloat16) for _ in range(2))
    idx = selections(2, 64, 320, 64, 6, 0.5, seed=0)
    monkeypatch.setattr(triton_union, "UNION_MIN_QUERIES", 0)  # (64 queries)
    monkeypatch.setattr(triton_union, "UNION_TOKENS", 4)
    with cuda_build.capture() as launches:
        triton_union.choose(idx[None], 64, 320, None, 64, 1, 2)  # sampled: the whole count behind the sample
        with triton_union.forced():
            sparse_fwd(q, k, v, idx, 64, 128 ** -0.5, 1, 2)
            # The dq kernels alone (sparse_bwd's other passes at this shape are slow in the interpreter).
            plan = triton_union.choose(idx[None], 64, 320, None, 64, 1, 2)
            zeros = torch.zeros(64, 32)
            triton_union.bwd_dq_union(q, k, v, idx, plan, q, zeros, zeros, torch.zeros(64, 32, 128),
                                      torch.empty_like(q), 64, 128 ** -0.5, 1, 2)
    names = ("_union_kernel", "_fwd_union_kernel", "_bwd_dq_union_kernel", "_count_kernel", "_fwd_token_kernel")
    union = [launch for launch in launches if launch[0].__name__ in names]
    # (launches of one signature captured once: the sample, the whole count with and without one, the forward and dq
    # union kernels, the token kernel with a plan)
    assert len(union) == 6
    assert {launch[2]["UNION"] for launch in union if launch[0].__name__ == "_fwd_token_kernel"} == {True}
    built = cuda_build.build(union)  # each for sm_80 and sm_90
    assert built == [launch[0].__name__ for launch in union] and set(built) == set(names)
