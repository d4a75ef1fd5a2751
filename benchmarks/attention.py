"""InfLLM v2 kernels against dense SDPA on the MiniCPM4-8B attention shape (one layer, batch 1).

    python benchmarks/attention.py --lengths 8192 32768 65536 131072 --out benchmarks/results

Prints a table and writes benchmarks/results/attention-<date>.json. Rows: prefill (selection + sparse
attention vs causal SDPA), its stages, decode step (sparse paged decode vs SDPA over the whole cache, and
our dense paged decode), backward (sparse vs SDPA backward). Ceilings (copy bandwidth, bf16 matmul rate)
are measured in the same run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys

import torch
import torch.nn.functional as F
import triton

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import bench, cold_graph_ms, paged_decode_state, print_rows, write_json  # noqa: E402

from cpm4.model.config import SparseConfig  # noqa: E402


def ceilings() -> dict:
    x = torch.empty(2 * 1024**3 // 2, dtype=torch.bfloat16, device="cuda").normal_()
    y = torch.empty_like(x)
    ms = bench(lambda: y.copy_(x))
    copy_tbs = 2 * x.numel() * 2 / ms / 1e9
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    ms = bench(lambda: a @ b)
    return {"copy_TBps": copy_tbs, "matmul_TFLOPs": 2 * 8192**3 / ms / 1e9}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768, 65536, 131072])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--skip-backward", action="store_true")
    ap.add_argument("--decode-only", action="store_true", help="only the decode rows")
    ap.add_argument("--sweeps", action="store_true", help="also each decode stage at several split counts")
    args = ap.parse_args()

    from cpm4.kernels.infllm_v2 import triton_pipeline, triton_select
    from cpm4.kernels.infllm_v2.triton_attention import SparseAttentionFn, sparse_fwd
    from cpm4.kernels.infllm_v2.triton_decode import (
        _attend,
        _default_splits,
        _score_select,
        append_kv,
        decode_lse,
        paged_decode,
        paged_sparse_decode,
    )
    from cpm4.kernels.infllm_v2.triton_select import block_scores, compress, select_blocks

    torch.manual_seed(0)
    dev = torch.cuda.get_device_name()
    ceil = ceilings()
    hq, hkv, d = 32, 2, 128
    cfg = SparseConfig(variant="gen-b", dense_len=-1)  # released sparse_config, always sparse here
    scale = d ** -0.5
    rows = []

    def row(phase, n, ours, peer, **extra):
        r = {"phase": phase, "seqlen": n, "ours_ms": round(ours, 4),
             "peer_ms": None if peer is None else round(peer, 4),
             "speedup": None if peer is None else round(peer / ours, 3)}
        r.update({k: (round(v, 3) if isinstance(v, float) else v) for k, v in extra.items()})
        rows.append(r)
        print(json.dumps(r), flush=True)

    def run_length(n: int) -> None:
        q = torch.randn(n, hq, d, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(n, hkv, d, device="cuda", dtype=torch.bfloat16)
        v = torch.randn(n, hkv, d, device="cuda", dtype=torch.bfloat16)
        qd, kd, vd = (x.transpose(0, 1).unsqueeze(0) for x in (q, k, v))
        k1 = compress(k, cfg.kernel_size, cfg.kernel_stride)
        k2 = compress(k, cfg.coarse_kernel_size, cfg.coarse_kernel_stride)
        if not args.decode_only:
            prefill_and_backward(n, q, k, v, qd, kd, vd, k1, k2)
        decode(n, q, k, v, kd, vd, k1, k2)

    def prefill_and_backward(n, q, k, v, qd, kd, vd, k1, k2):
        dense = bench(lambda: F.scaled_dot_product_attention(qd, kd, vd, is_causal=True, enable_gqa=True))
        dense_flops = 4 * n * n / 2 * hq * d
        # Stages of ours.
        t_comp = bench(lambda: (compress(k, 32, 16), compress(k, 128, 64)))
        scores = block_scores(q, k1, k2, 0, cfg, scale)
        t_s1 = bench(lambda: block_scores(q, k1, k2, 0, cfg, scale))
        idx = select_blocks(scores, 0, n, k1.shape[0], cfg)
        t_sel = bench(lambda: select_blocks(scores, 0, n, k1.shape[0], cfg))
        blocks = idx
        t_s2 = bench(lambda: sparse_fwd(q, k, v, blocks, 64, scale, cfg.init_blocks, cfg.local_blocks))
        total = bench(lambda: triton_pipeline(q, k, v, cfg, scale))
        attended = int((blocks >= 0).sum()) * 64 / (hkv * n)  # mean attended tokens per query (upper bound)
        s2_flops = 4 * n * attended * hq * d
        s1_flops = 2 * n * (k1.shape[0] / 2) * hq * d + 2 * n * (k2.shape[0] / 2) * hq * d
        row("prefill", n, total, dense, dense_TFLOPs=dense_flops / dense / 1e9)
        row("prefill.compress", n, t_comp, None)
        row("prefill.stage1_scores", n, t_s1, None, TFLOPs=s1_flops / t_s1 / 1e9)
        # the other layout of the score pass (SCORE_KEYS_FIRST), checked against the default's scores first
        try:
            other = not triton_select.SCORE_KEYS_FIRST
            flipped = block_scores(q, k1, k2, 0, cfg, scale, keys_first=other)
            t = torch.arange(0, n, 97, device="cuda")  # a sample of the tokens, the kernels each can see
            vis = torch.arange(k1.shape[0], device="cuda")[None, :] * 16 + 31 <= t[:, None]
            # where, not a product: kernels a token cannot see hold -inf (inf * 0 is NaN)
            err = torch.where(vis, (flipped[:, t].float() - scores[:, t].float()).abs(), 0.0).max().item()
            t_other = bench(lambda: block_scores(q, k1, k2, 0, cfg, scale, keys_first=other))
            row(f"prefill.stage1_scores.{'keys_first' if other else 'rows_first'}", n, t_other, None,
                TFLOPs=s1_flops / t_other / 1e9, max_abs_diff=err)
            del flipped, vis
        except Exception as e:  # noqa: BLE001 - the row only
            print(f"prefill.stage1_scores keys_first failed: {e!r}"[:300])
        row("prefill.select", n, t_sel, None)
        # the selection's binary search over every key value (before SELECT_NARROW)
        row("prefill.select.full_range", n,
            bench(lambda: select_blocks(scores, 0, n, k1.shape[0], cfg, narrow=False)), None)
        row("prefill.stage2_attention", n, t_s2, None, TFLOPs=s2_flops / t_s2 / 1e9, attended_tokens=attended)
        # the shared blocks two heads a program (SHARED_HEADS=2), checked against the default's output first
        try:
            ref_o = sparse_fwd(q, k, v, blocks, 64, scale, cfg.init_blocks, cfg.local_blocks)[0]
            two_o = sparse_fwd(q, k, v, blocks, 64, scale, cfg.init_blocks, cfg.local_blocks, shared_heads=2)[0]
            err = (two_o.float() - ref_o.float()).abs().max().item()
            t_two = bench(lambda: sparse_fwd(q, k, v, blocks, 64, scale, cfg.init_blocks, cfg.local_blocks,
                                             shared_heads=2))
            row("prefill.stage2_attention.shared_heads2", n, t_two, None, max_abs_diff=err)
            del ref_o, two_o
        except Exception as e:  # noqa: BLE001 - the row only
            print(f"prefill.stage2_attention.shared_heads2 failed: {e!r}"[:300])
        # Backward of the sparse attention (selection fixed) vs dense SDPA backward.
        if not args.skip_backward:
            qs, ks, vs = (x.clone().requires_grad_() for x in (q, k, v))
            o = SparseAttentionFn.apply(qs, ks, vs, blocks, 64, scale, cfg.init_blocks, cfg.local_blocks)
            do = torch.randn_like(o)
            t_bwd = bench(lambda: torch.autograd.grad(o, (qs, ks, vs), do, retain_graph=True), warmup=2, rep=5)
            qg, kg, vg = (x.clone().requires_grad_() for x in (qd, kd, vd))
            od = F.scaled_dot_product_attention(qg, kg, vg, is_causal=True, enable_gqa=True)
            dod = torch.randn_like(od)
            t_dbwd = bench(lambda: torch.autograd.grad(od, (qg, kg, vg), dod, retain_graph=True), warmup=2, rep=5)
            row("backward", n, t_bwd, t_dbwd)
            row("forward+backward", n, t_s2 + t_bwd + t_comp + t_s1 + t_sel, dense + t_dbwd)
            # the shared blocks' dq two heads a program (SHARED_HEADS=2), gradients checked against the default's
            from cpm4.kernels.infllm_v2 import triton_attention

            ref_g = torch.autograd.grad(o, (qs, ks, vs), do, retain_graph=True)
            before, triton_attention.SHARED_HEADS = triton_attention.SHARED_HEADS, 2
            try:
                two_g = torch.autograd.grad(o, (qs, ks, vs), do, retain_graph=True)
                err = max((a.float() - b.float()).abs().max().item() for a, b in zip(ref_g, two_g))
                t_two = bench(lambda: torch.autograd.grad(o, (qs, ks, vs), do, retain_graph=True), warmup=2, rep=5)
                row("backward.shared_heads2", n, t_two, t_dbwd, max_abs_diff=err)
            except Exception as e:  # noqa: BLE001 - the row only
                print(f"backward.shared_heads2 failed: {e!r}"[:300])
            finally:
                triton_attention.SHARED_HEADS = before
            del ref_g
    def decode(n, q, k, v, kd, vd, k1, k2):
        # Decode step with n tokens in a paged cache (64-token pages), as the engine runs it: pool the kernel
        # keys the new token completes, stage 1 + selection + sparse attention on the pages in place
        # (`paged_sparse_decode`); peer: SDPA of one query over the whole cache.
        pages = math.ceil(n / 64)
        kc, vc, table, lens, fine, coarse = paged_decode_state(k, v, k1, k2, cfg)
        q1 = q[-1:]

        slot = torch.tensor([(pages - 1) * 64 + (n - 1) % 64], device="cuda")
        k_new, v_new = k[-1:].clone(), v[-1:].clone()

        def sparse_step(q=None, **kw):  # as the engine runs it: the token stored inside the step's first kernel
            return paged_sparse_decode(q1 if q is None else q, kc, vc, table, lens, fine, coarse, cfg,
                                       scale, new_kv=(k_new, v_new, slot), **kw)

        def separate_store_step():  # the store and pooling as their own launch before the step
            append_kv(k_new, v_new, kc, vc, slot, table, lens, fine, coarse, cfg)
            return paged_sparse_decode(q1, kc, vc, table, lens, fine, coarse, cfg, scale)

        q1d = q1.transpose(0, 1).unsqueeze(0)
        t_dec_dense_peer = bench(lambda: F.scaled_dot_product_attention(q1d, kd, vd, enable_gqa=True), rep=50)
        t_dec = bench(sparse_step, rep=50)
        t_dec_ours_dense = bench(lambda: paged_decode(q1, kc, vc, table, lens), rep=50)
        kv_bytes = 2 * n * hkv * d * 2
        sel_bytes = 2 * min(n, cfg.num_selected * 64) * hkv * d * 2 + (k1.shape[0] + k2.shape[0]) * hkv * d * 2
        row("decode", n, t_dec, t_dec_dense_peer, floor_ms=sel_bytes / ceil["copy_TBps"] / 1e9)
        row("decode.dense_paged", n, t_dec_ours_dense, t_dec_dense_peer, GBps=kv_bytes / t_dec_ours_dense / 1e6)
        # The same steps from CUDA graphs with a cold L2 (how the engine runs decode), against the peer's graph.
        try:
            t_peer_graph = cold_graph_ms(lambda: F.scaled_dot_product_attention(q1d, kd, vd, enable_gqa=True))
            row("decode.cuda_graph", n, cold_graph_ms(sparse_step), t_peer_graph,
                floor_ms=sel_bytes / ceil["copy_TBps"] / 1e9)
            row("decode.dense_paged.cuda_graph", n, cold_graph_ms(lambda: paged_decode(q1, kc, vc, table, lens)),
                t_peer_graph, floor_ms=kv_bytes / ceil["copy_TBps"] / 1e9)
            # Variants beside the engine's path, each on its own (a failure loses only its row): the store as
            # its own launch (the path before 2026-11-29), other pages per attention step, and, not yet on the
            # engine's path, persistent arrival counters and programmatic dependent launches (Hopper).
            def variant(name, fn, floor=None):
                try:
                    row(name, n, cold_graph_ms(fn), t_peer_graph, **({"floor_ms": floor} if floor else {}))
                except Exception as e:  # noqa: BLE001
                    print(f"{name} failed: {e!r}")

            variant("decode.cuda_graph.separate_store", separate_store_step)
            for tp in (1, 4):
                variant(f"decode.cuda_graph.tile{tp}", lambda tp=tp: sparse_step(tile_pages=tp))
                variant(f"decode.dense_paged.cuda_graph.tile{tp}",
                        lambda tp=tp: paged_decode(q1, kc, vc, table, lens, tile_pages=tp))
            variant("decode.cuda_graph.persistent_counters", lambda: sparse_step(persistent_counters=True))
            variant("decode.cuda_graph.pdl", lambda: sparse_step(pdl=True))
            variant("decode.cuda_graph.pdl_persistent", lambda: sparse_step(pdl=True, persistent_counters=True))
            # The threshold searches: binary over the unforced keys' range (SELECT_NARROW, the default) or over
            # every bf16 key value (full_range, before); on these random queries and on a zero query, whose pooled
            # scores are all equal (an empty range: a model's scores crowd into a few exponents).
            q0 = torch.zeros_like(q1)
            variant("decode.cuda_graph.full_range_select", lambda: sparse_step(narrow=False))
            variant("decode.cuda_graph.uniform_q", lambda: sparse_step(q=q0))
            variant("decode.cuda_graph.uniform_q.full_range_select", lambda: sparse_step(q=q0, narrow=False))
            # the split outputs merged by the last split, as before SEPARATE_MERGE, sparse and dense paged
            variant("decode.cuda_graph.fused_merge", lambda: sparse_step(separate_merge=False))
            variant("decode.dense_paged.cuda_graph.fused_merge",
                    lambda: paged_decode(q1, kc, vc, table, lens, separate_merge=False))
            # The split between the decode stages, each replayed alone from its own graph.
            lse = decode_lse(q1, coarse, table, lens, cfg, cfg.coarse_kernel_size, cfg.coarse_kernel_stride, scale)
            counters = torch.zeros((1, hkv), device="cuda", dtype=torch.int32)
            _, att, natt = _score_select(q1, fine, table, lens, lse, cfg, scale, counters=counters)
            splits = _default_splits(q1.device, hkv, triton.cdiv(att.shape[2], 2))  # as paged_sparse_decode
            for name, fn in (
                    ("append_kv", lambda: append_kv(k_new, v_new, kc, vc, slot, table, lens, fine, coarse, cfg)),
                    ("stage1_lse", lambda: decode_lse(q1, coarse, table, lens, cfg, cfg.coarse_kernel_size,
                                                      cfg.coarse_kernel_stride, scale)),
                    ("stage1_scores_select", lambda: _score_select(q1, fine, table, lens, lse, cfg, scale,
                                                                   counters=counters.zero_())),
                    ("stage1_scores", lambda: _score_select(q1, fine, table, lens, lse, cfg, scale)),  # no selection
                    # the search over every key value
                    ("stage1_scores_select_full_range", lambda: _score_select(q1, fine, table, lens, lse, cfg, scale,
                                                                              counters=counters.zero_(), narrow=False)),
                    ("attend_merge", lambda: _attend(q1, kc, vc, table, lens, splits, 2, blk=att, nblk=natt,
                                                     dense_len=cfg.dense_len, scale=scale)),
                    # last: not on the engine's path yet
                    ("stage1_lse_with_append", lambda: decode_lse(
                        q1, coarse, table, lens, cfg, cfg.coarse_kernel_size, cfg.coarse_kernel_stride, scale,
                        append=(k_new, v_new, kc, vc, slot, table, lens, fine, coarse, cfg)))):
                row(f"decode.cuda_graph.{name}", n, cold_graph_ms(fn), None)
            # Each stage's split count (programs per KV head; the engine's: `_default_splits`, printed first):
            # more splits, more parallel loads but a longer merge by the last program.
            print(f"decode splits at {n}: attend {splits}, LSE {lse.shape[2]}, scores "
                  f"{_default_splits(q1.device, hkv, triton.cdiv(table.shape[1], 16))}")
            for sp in (8, 16, 32, 64, 128) if args.sweeps else ():  # dense paged (engine: 132 on an H200)
                variant(f"decode.dense_paged.cuda_graph.splits{sp}",
                        lambda sp=sp: paged_decode(q1, kc, vc, table, lens, splits=sp))
            for sp in (4, 8, 16, 24, 32, 64) if args.sweeps else ():
                variant(f"decode.cuda_graph.attend_merge.splits{sp}", lambda sp=sp: _attend(
                    q1, kc, vc, table, lens, sp, 2, blk=att, nblk=natt, dense_len=cfg.dense_len, scale=scale))
                variant(f"decode.cuda_graph.stage1_scores_select.splits{sp}", lambda sp=sp: _score_select(
                    q1, fine, table, lens, lse, cfg, scale, splits=sp, counters=counters.zero_()))
                variant(f"decode.cuda_graph.stage1_lse.splits{sp}", lambda sp=sp: decode_lse(
                    q1, coarse, table, lens, cfg, cfg.coarse_kernel_size, cfg.coarse_kernel_stride, scale, splits=sp))
        except Exception as e:  # noqa: BLE001
            print(f"graph capture failed: {e!r}")

    date = datetime.date.today().isoformat()

    def save(done: list[int]) -> None:
        # After every length, so that a run stopped by a time limit keeps the lengths it finished.
        write_json({"device": dev, "date": date, "ceilings": ceil, "shape": {"hq": hq, "hkv": hkv, "d": d},
                    "sparse_config": cfg.to_dict(), "lengths_done": done, "rows": rows},
                   f"attention-{date}.json", args.out)

    for i, n in enumerate(args.lengths):
        run_length(n)
        torch.cuda.empty_cache()
        save(args.lengths[:i + 1])

    print()
    print(f"device: {dev}; copy {ceil['copy_TBps']:.2f} TB/s; bf16 matmul {ceil['matmul_TFLOPs']:.0f} TFLOP/s")
    print_rows(rows)


if __name__ == "__main__":
    main()
