"""InfLLM v2 stage 2 with the per-token part over the union of neighbouring tokens' blocks
(`cpm4.kernels.infllm_v2.triton_union`) against the token kernel, MiniCPM4-8B attention shape (one layer, batch 1,
bf16, 32 query heads, 2 KV heads, head dim 128, blocks of 64, 96 selected, init 1, window 32 blocks).

    python benchmarks/stage2_union.py [--lengths 32768 131072] [--tokens 2 4 8] [--noise 0 0.5 1 100]

Selections are drawn, not computed from q and k: each token's own blocks are the top 62 of base[head, block] +
noise * uniform[head, token, block] over the blocks it may choose (1 <= b < its block - 32), plus the forced ones —
noise 0: every token the same "vertical" blocks (as many queries of a trained model attend to the same keys);
large noise: independent draws (random inputs). Rows: `sparse_fwd` (shared blocks + own blocks) with the union
path forced (ours) against the token kernel (peer), with the unions' share of the tokens' own blocks; and rows
`*.auto4` with UNION_TOKENS = 4 and the library deciding on the device (`triton_union.choose`: a sample, then the
whole count where it passes, judged by UNION_MAX_SHARE; where it declines, what the question costs), `decide.*` and
`count.*` rows timing that question and the whole count (`union_blocks`) alone; rows `*.wWsS` with the union kernels
launched as given (`--configs`); and rows `backward.*` of the whole backward (`sparse_bwd`: dq's own blocks over the
unions, forced; dk/dv unchanged) against it with the token kernels. CUDA only.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import bench, print_rows, write_rows  # noqa: E402

BLOCK, INIT, WINDOW, NSEL, HQ, HKV, D = 64, 1, 32, 96, 32, 2, 128


def draw(n: int, noise: float, seed: int, chunk: int = 8192, device: str = "cuda") -> torch.Tensor:
    """[HKV, n, NSEL] int32 selections (ascending, -1 last) for queries 0..n-1 of an n-token prefill."""
    g = torch.Generator(device=device).manual_seed(seed)
    n_blocks = -(-n // BLOCK)
    base = torch.rand(HKV, 1, n_blocks, device=device, generator=g)
    own_k = NSEL - INIT - WINDOW - 1
    out = torch.full((HKV, n, NSEL), -1, dtype=torch.int32, device=device)
    blocks = torch.arange(n_blocks, device=device)
    for t0 in range(0, n, chunk):
        t = torch.arange(t0, min(n, t0 + chunk), device=device)
        qb = t // BLOCK
        score = base + noise * torch.rand(HKV, len(t), n_blocks, device=device, generator=g)
        own = (blocks[None, :] >= INIT) & (blocks[None, :] < (qb - WINDOW)[:, None])
        top = score.masked_fill(~own[None], -1.0).topk(min(own_k, n_blocks), dim=-1)
        own_sel = torch.where(top.values >= 0, top.indices, -1)
        window = qb[:, None] - torch.arange(WINDOW, -1, -1, device=device)[None, :]
        forced = torch.cat([torch.zeros_like(qb)[:, None], window], 1)
        forced = torch.where(forced >= 0, forced, -1)[None].expand(HKV, -1, -1)
        sel = torch.cat([own_sel, forced], -1)
        sel = torch.where(sel < 0, 1 << 30, sel).sort(-1).values  # ascending, unused last
        sel[..., 1:] = torch.where(sel[..., 1:] == sel[..., :-1], 1 << 30, sel[..., 1:])  # block 0 forced twice
        sel = sel.sort(-1).values
        out[:, t0:t0 + len(t)] = torch.where(sel >= 1 << 30, -1, sel)[..., :NSEL].to(torch.int32)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[32768, 131072])
    ap.add_argument("--tokens", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--noise", type=float, nargs="+", default=[0.0, 0.5, 1.0, 100.0])
    ap.add_argument("--auto", type=int, default=4, choices=[0, 2, 4, 8],
                    help="also rows with UNION_TOKENS at this and the library's UNION_MAX_SHARE deciding (0: none)")
    ap.add_argument("--backward", type=int, default=4, choices=[0, 2, 4, 8],
                    help="also rows of the whole backward (sparse_bwd) with dq over the unions of this many tokens, "
                         "forced, against the token kernels (0: none)")
    ap.add_argument("--configs", nargs="*", default=[],
                    help="also forced rows with the union kernels launched as WARPS,STAGES (triton_union.UNION_LAUNCH; "
                         "e.g. 4,2 8,2 4,3 8,3), phase *.wWsS")
    ap.add_argument("--tag", default="")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("stage2_union.py measures CUDA kernels: no CUDA device here")
    from cpm4.kernels.infllm_v2 import triton_union
    from cpm4.kernels.infllm_v2.triton_attention import sparse_bwd, sparse_fwd

    rows = []
    for n in args.lengths:
        q = torch.randn(n, HQ, D, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(n, HKV, D, device="cuda", dtype=torch.bfloat16)
        v = torch.randn(n, HKV, D, device="cuda", dtype=torch.bfloat16)
        for noise in args.noise:
            idx = draw(n, noise, seed=n)
            run = (q, k, v, idx, BLOCK, D ** -0.5, INIT, WINDOW)
            saved = triton_union.UNION_TOKENS
            triton_union.UNION_TOKENS = 0
            peer = bench(lambda run=run: sparse_fwd(*run), warmup=2, rep=5)
            ref, _ = sparse_fwd(*run)
            sizes = torch.tensor([[n], [0]], dtype=torch.int32, device="cuda")
            for tokens in args.tokens:
                _, _, total, own = triton_union.union_blocks(idx[None], sizes, BLOCK, INIT, WINDOW, tokens)
                share = total / max(own, 1)
                triton_union.UNION_TOKENS = tokens
                try:
                    with triton_union.forced():
                        ours = bench(lambda run=run: sparse_fwd(*run), warmup=2, rep=5)
                        out, _ = sparse_fwd(*run)
                finally:
                    triton_union.UNION_TOKENS = saved
                diff = (out.float() - ref.float()).abs().max().item()
                rows.append({"phase": f"stage2.noise{noise:g}.T{tokens}", "seqlen": n, "ours_ms": ours,
                             "peer_ms": peer, "speedup": peer / ours, "union_share": share, "max_diff": diff})
                print(f"n={n} noise={noise:g} T={tokens}: union share {share:.2f}, max diff {diff:.3g}")
                launch = triton_union.UNION_LAUNCH
                for config in args.configs:  # the union kernels' fixed launch, each candidate forced
                    warps, stages = map(int, config.split(","))
                    triton_union.UNION_TOKENS, triton_union.UNION_LAUNCH = tokens, (warps, stages)
                    try:
                        with triton_union.forced():
                            ours = bench(lambda run=run: sparse_fwd(*run), warmup=2, rep=5)
                    finally:
                        triton_union.UNION_TOKENS, triton_union.UNION_LAUNCH = saved, launch
                    rows.append({"phase": f"stage2.noise{noise:g}.T{tokens}.w{warps}s{stages}", "seqlen": n,
                                 "ours_ms": ours, "peer_ms": peer, "speedup": peer / ours, "union_share": share})
            if args.backward:  # the whole backward (dq's own blocks over the unions; dk/dv the same pass) at T
                o, lse = ref, sparse_fwd(*run)[1]
                do = torch.randn_like(q)
                grads = (do, q, k, v, o, lse, idx, BLOCK, D ** -0.5, INIT, WINDOW)
                bwd_peer = bench(lambda grads=grads: sparse_bwd(*grads), warmup=1, rep=3)
                triton_union.UNION_TOKENS = args.backward
                try:
                    with triton_union.forced():
                        bwd_ours = bench(lambda grads=grads: sparse_bwd(*grads), warmup=1, rep=3)
                finally:
                    triton_union.UNION_TOKENS = saved
                rows.append({"phase": f"backward.noise{noise:g}.T{args.backward}", "seqlen": n, "ours_ms": bwd_ours,
                             "peer_ms": bwd_peer, "speedup": bwd_peer / bwd_ours})
                del do, grads
            if args.auto:  # the library deciding at T = args.auto: the union where it pays, the sample's cost where not
                triton_union.UNION_TOKENS = args.auto
                try:
                    ours = bench(lambda run=run: sparse_fwd(*run), warmup=2, rep=5)
                    taken = triton_union.taken(triton_union.choose(idx[None], n, 0, None, BLOCK, INIT, WINDOW))
                finally:
                    triton_union.UNION_TOKENS = saved
                rows.append({"phase": f"stage2.noise{noise:g}.auto{args.auto}", "seqlen": n, "ours_ms": ours,
                             "peer_ms": peer, "speedup": peer / ours, "taken": taken})
                # The decision's own cost: `choose` (the sample, and the whole count where the sample passes; no host
                # read) against the call it decides for (the token kernel): "speedup" here is how many times cheaper.
                triton_union.UNION_TOKENS = args.auto
                try:
                    ask = bench(lambda idx=idx, n=n: triton_union.choose(idx[None], n, 0, None, BLOCK, INIT, WINDOW),
                                warmup=3, rep=10)
                finally:
                    triton_union.UNION_TOKENS = saved
                rows.append({"phase": f"decide.noise{noise:g}.T{args.auto}", "seqlen": n, "ours_ms": ask,
                             "peer_ms": peer, "speedup": peer / ask})
                # The whole count that builds the unions where the sample accepts (`union_blocks`), alike.
                count = bench(lambda idx=idx, sizes=sizes: triton_union.union_blocks(
                    idx[None], sizes, BLOCK, INIT, WINDOW, args.auto), warmup=3, rep=10)
                rows.append({"phase": f"count.noise{noise:g}.T{args.auto}", "seqlen": n, "ours_ms": count,
                             "peer_ms": peer, "speedup": peer / count})
        del q, k, v
    print_rows(rows)
    write_rows(f"stage2_union{args.tag}", torch.cuda.get_device_name(), rows, args.out)


if __name__ == "__main__":
    main()
