"""How much neighbouring tokens' InfLLM v2 selections overlap, in a trained model and on random inputs (CPU).

Stage 2 reads each query token's own selected blocks (those outside the blocks every token of its query block
shares: the initial and local blocks) once per token. A kernel that handled T consecutive tokens together
would read the union of their own blocks once per tile instead. This script measures, per tile size T, the
ratio (sum over tiles of |union of the tile's own blocks|) / (sum over tokens of |own blocks|): 1 / T is the
best case (all T tokens choose the same blocks), 1 the worst (none shared) — with random inputs it is close to
1, which is why `attention.py`'s stage 2 is bound by those per-token reads.

The model's selections are recorded from a forward pass of --tokens tokens of text (default: the docstrings of
the Python standard library, offline) through the reference InfLLM v2 path, every layer and KV head; the random
rows use random q/k of the same shapes through the same selection. Prints a table and writes
`benchmarks/results/selection_overlap-<date>.json`.

    python benchmarks/selection_overlap.py                        # the bundled demo model
    python benchmarks/selection_overlap.py --model DIR --tokens 8192 --text FILE
    python benchmarks/selection_overlap.py --model MiniCPM4-8B --tokens 131072 --text FILE --device cuda --skip 65536
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import write_rows  # noqa: E402

from cpm4.kernels import infllm_v2  # noqa: E402
from cpm4.kernels.infllm_v2 import reference as R  # noqa: E402
from cpm4.model.config import SparseConfig  # noqa: E402


def own_blocks(idx: torch.Tensor, pos: torch.Tensor, cfg: SparseConfig) -> torch.Tensor:
    """[hkv, T, K] selection -> bool [hkv, T, n_blocks]: the blocks each token reads beyond the shared ones."""
    n_blocks = int(pos.max()) // cfg.block_size + 1
    qb = (pos // cfg.block_size)[None, :, None]
    own = (idx >= cfg.init_blocks) & (idx < qb - infllm_v2.shared_window(cfg))
    mask = torch.zeros(idx.shape[0], idx.shape[1], n_blocks + 1, dtype=torch.bool)
    mask.scatter_(2, torch.where(own, idx, n_blocks).long(), True)  # column n_blocks: the unused entries
    return mask[..., :n_blocks]


def union_ratio(own: torch.Tensor, tile: int) -> float:
    """sum over tiles of `tile` consecutive tokens (aligned) of |union of own blocks| / sum over tokens of |own|."""
    hkv, t, nb = own.shape
    t_cut = t - t % tile
    tiles = own[:, :t_cut].reshape(hkv, t_cut // tile, tile, nb).any(2)
    per_token = own[:, :t_cut].sum()
    return float(tiles.sum()) / max(float(per_token), 1.0)


def model_selections(model_dir: str, text: str, tokens: int, device: str = "cpu"
                     ) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], SparseConfig, tuple[int, int, int]]:
    """The selection [hkv, T, K] and positions of every attention call of one forward pass over `tokens` tokens
    (on the CPU through the reference in float32; on CUDA through the Triton kernels in bf16)."""
    from cpm4.kernels.infllm_v2 import triton_select
    from cpm4.model.checkpoint import load_checkpoint
    from cpm4.model.tokenizer import Tokenizer

    model = load_checkpoint(model_dir, device=device, dtype=torch.float32 if device == "cpu" else torch.bfloat16)
    cfg = model.config.sparse_config
    if cfg is None:
        raise SystemExit(f"{model_dir} has no sparse_config: nothing to measure")
    ids = Tokenizer.from_dir(model_dir).encode(text)
    limit = min(tokens, model.config.max_position_embeddings)
    if len(ids) < limit:
        raise SystemExit(f"the text has {len(ids)} tokens, fewer than the {limit} asked for")
    calls = []
    select, select_gpu = R.select_blocks, triton_select.select_blocks

    def recording(scores, q_pos, c):
        idx = select(scores, q_pos, c)
        calls.append((idx.cpu(), q_pos.cpu()))
        return idx

    def recording_gpu(scores, q_start, tq, n_kernels, c, **kw):  # triton_pipeline imports it at each call
        idx = select_gpu(scores, q_start, tq, n_kernels, c, **kw)
        calls.append((idx.long().cpu(), torch.arange(q_start, q_start + tq)))
        return idx
    R.select_blocks, triton_select.select_blocks = recording, recording_gpu
    try:
        with torch.no_grad():
            model.hidden_states(torch.tensor([ids[:limit]], device=device))
    finally:
        R.select_blocks, triton_select.select_blocks = select, select_gpu
    shape = (model.config.num_attention_heads, model.config.num_key_value_heads, model.config.head_dim)
    return calls, cfg, shape


def layer_selections(calls: list[tuple[torch.Tensor, torch.Tensor]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Join each layer's chunked calls (positions restart at 0 with every layer) into one [hkv, T, K] each."""
    layers, cur = [], []
    for idx, pos in calls:
        if cur and int(pos[0]) == 0:
            layers.append(cur)
            cur = []
        cur.append((idx, pos))
    if cur:
        layers.append(cur)
    out = []
    for parts in layers:
        width = max(i.shape[-1] for i, _ in parts)
        idx = torch.cat([torch.nn.functional.pad(i, (0, width - i.shape[-1]), value=-1) for i, _ in parts], 1)
        out.append((idx, torch.cat([p for _, p in parts])))
    return out


def random_selection(n: int, shape: tuple[int, int, int], cfg: SparseConfig, seed: int, device: str = "cpu"
                     ) -> torch.Tensor:
    """The selection [hkv, n, K] of random q/k (CPU: the reference; CUDA: the kernels, bf16)."""
    hq, hkv, d = shape
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(n, hq, d, generator=g), torch.randn(n, hkv, d, generator=g)
    if device == "cpu":
        return R.infllm_v2_attention(q, k, torch.zeros_like(k), cfg, return_blocks=True)[1]
    q, k = q.to(device, torch.bfloat16), k.to(device, torch.bfloat16)
    return infllm_v2.triton_pipeline(q, k, torch.zeros_like(k), cfg, d ** -0.5, return_blocks=True)[1].long().cpu()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="models/cpm4-demo")
    ap.add_argument("--text", help="a UTF-8 text file (default: the Python standard library's docstrings)")
    ap.add_argument("--tokens", type=int, default=2048, help="tokens of the forward pass (at most the model's "
                    "max_position_embeddings)")
    ap.add_argument("--tiles", type=int, nargs="+", default=[2, 4, 8, 16, 64])
    ap.add_argument("--skip", type=int, default=0, help="leave out the first SKIP tokens: early tokens have few "
                    "blocks to choose from, so their selections overlap whatever the inputs")
    ap.add_argument("--device", default="cpu", help="cpu (the reference, float32) or cuda (the kernels, bf16)")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    if args.text:
        with open(args.text, encoding="utf-8") as f:
            text = f.read()
    else:
        from cpm4.model.tokenizer import default_corpus

        text = "\n\n".join(default_corpus())
    calls, cfg, shape = model_selections(args.model, text, args.tokens, args.device)
    layers = layer_selections(calls)
    n = int(layers[0][1][-1]) + 1
    sources = [(f"model.layer{i}", idx, pos) for i, (idx, pos) in enumerate(layers)]
    sources.append(("random", random_selection(n, shape, cfg, 0, args.device), torch.arange(n)))
    rows = []
    print(f"{args.model}: {len(layers)} layers, tokens {args.skip}..{n - 1} of {n}, top-{cfg.topk} of blocks of "
          f"{cfg.block_size}; own blocks = selected beyond the initial and local blocks")
    print(f"{'source':16s} {'own/token':>9s} " + " ".join(f"{'T=' + str(t):>7s}" for t in args.tiles))
    totals: dict[int, list[float]] = {t: [] for t in args.tiles}
    for name, idx, pos in sources:
        own = own_blocks(idx, pos, cfg)[:, args.skip:]
        per_token = float(own.sum()) / (own.shape[0] * own.shape[1])
        ratios = [union_ratio(own, t) for t in args.tiles]
        if name.startswith("model"):
            for t, r in zip(args.tiles, ratios):
                totals[t].append(r)
        print(f"{name:16s} {per_token:9.2f} " + " ".join(f"{r:7.3f}" for r in ratios))
        rows += [{"phase": f"overlap.{name}.tile{t}", "seqlen": n, "skip": args.skip,
                  "own_blocks_per_token": round(per_token, 3),
                  "loads_ratio": round(r, 4)} for t, r in zip(args.tiles, ratios)]
    mean = [sum(v) / len(v) for v in totals.values()]
    print(f"{'model (mean)':16s} {'':9s} " + " ".join(f"{r:7.3f}" for r in mean))
    rows += [{"phase": f"overlap.model_mean.tile{t}", "seqlen": n, "skip": args.skip, "loads_ratio": round(r, 4)}
             for t, r in zip(args.tiles, mean)]
    write_rows("selection_overlap", args.device, rows, args.out, model=args.model,
               sparse_config=dataclasses.asdict(cfg))


if __name__ == "__main__":
    main()
