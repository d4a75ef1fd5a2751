"""The dense paged decode attention of one layer at many rows (the batched decode step's biggest part), its
store variants against dense SDPA over the same keys in contiguous memory.

    python benchmarks/batched_decode.py --config minicpm4-0.5b --batches 1 16 64 128 256 --lengths 512 1024 2048

Rows per (batch, length), every row of the batch holding `length` tokens in 64-token pages (page ids shuffled,
as a running engine's are), the current token the last; a variant is a base and options joined by dots:
- `apart`: `append_kv` stores the step's new keys/values, then `paged_decode` attends (two launches);
- `fused`: `paged_decode(new_kv=...)` stores them in its own launch, the token swapped into its tile from
  new_kv (what steps of up to `triton_decode.FUSE_DENSE_STORE_ROWS` rows do);
- options: `peel` (`triton_decode.STORE_PEEL`: the token left out of the tiles, added after the loop), `tile<N>`
  (N pages a loop step; the default `TILE_PAGES` is 2), `w<N>` (warps, `ATTEND_WARPS`; default 4), `s<N>`
  (pipeline stages, `ATTEND_STAGES`; default Triton's), `sp<N>` (N splits a row; default about two waves of
  programs over the SMs), `lastmerge` (the last split merges the partials, not `_merge_kernel`: SEPARATE_MERGE off).
The peer: `scaled_dot_product_attention` of the rows' queries over contiguous [batch, kv heads, length, d] keys
and values (GQA), which reads the same bytes and stores nothing. Times: CUDA-graph replays with a cold L2
(`cold_graph_ms`); `TBps` counts the keys and values read once. Each variant's output is checked against the
peer's (bf16 tolerance) before it is timed. Prints a table and writes batched_decode-<config>-<date>.json.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import bench, cold_graph_ms, write_rows  # noqa: E402

from cpm4.kernels.infllm_v2 import triton_decode  # noqa: E402
from cpm4.kernels.infllm_v2.triton_decode import append_kv, paged_decode  # noqa: E402
from cpm4.model.config import preset  # noqa: E402

VARIANTS = ("apart", "fused", "fused.peel", "apart.tile1", "apart.tile4", "apart.w8", "apart.s2", "apart.tile1.s2",
            "apart.tile1.w2", "apart.sp1", "apart.lastmerge")
PAGE = 64


def copy_tbps() -> float:
    x = torch.empty(1024**3, dtype=torch.bfloat16, device="cuda").normal_()
    y = torch.empty_like(x)
    return 2 * x.numel() * 2 / bench(lambda: y.copy_(x)) / 1e9


def state(batch: int, length: int, hq: int, hkv: int, d: int, seed: int = 0, device: str = "cuda",
          dtype: torch.dtype = torch.bfloat16) -> dict:
    """A paged cache of `batch` rows of `length` tokens each (the last one the current token, not yet stored),
    and the same keys/values contiguous for the peer."""
    g = torch.Generator(device=device).manual_seed(seed)
    per = -(-length // PAGE)
    pages = batch * per
    k = torch.randn(batch, length, hkv, d, generator=g, device=device, dtype=dtype)
    v = torch.randn(batch, length, hkv, d, generator=g, device=device, dtype=dtype)
    ids = torch.randperm(pages, generator=g, device=device).to(torch.int32).view(batch, per)
    kc = torch.zeros(pages + 1, PAGE, hkv, d, device=device, dtype=dtype)
    vc = torch.zeros_like(kc)
    pos = torch.arange(length - 1, device=device)
    flat = (ids[:, pos // PAGE].long() * PAGE + pos % PAGE)  # [batch, length - 1]: every token but the current
    kc.view(-1, hkv, d)[flat] = k[:, :-1]
    vc.view(-1, hkv, d)[flat] = v[:, :-1]
    slots = ids[:, (length - 1) // PAGE].long() * PAGE + (length - 1) % PAGE
    return {"q": torch.randn(batch, hq, d, generator=g, device=device, dtype=dtype), "kc": kc, "vc": vc,
            "table": ids, "lens": torch.full((batch,), length, device=device, dtype=torch.int32),
            "nk": k[:, -1].contiguous(), "nv": v[:, -1].contiguous(), "slots": slots,
            "k": k.transpose(1, 2).contiguous(), "v": v.transpose(1, 2).contiguous()}


def parse_variant(name: str) -> dict:
    """`apart.tile1.w8` -> {"base": "apart", "tile": 1, "warps": 8, "stages": None, "peel": False}."""
    base, *opts = name.split(".")
    if base not in ("apart", "fused"):
        raise ValueError(f"variant {name!r}: the base must be apart or fused")
    out = {"base": base, "tile": None, "warps": 4, "stages": None, "peel": False, "splits": None, "merge": None}
    for o in opts:
        if o == "peel" and base == "fused":
            out["peel"] = True
        elif o == "lastmerge":
            out["merge"] = False
        elif o[:4] == "tile" and o[4:].isdigit() and int(o[4:]) > 0:
            out["tile"] = int(o[4:])
        elif o[:2] == "sp" and o[2:].isdigit() and int(o[2:]) > 0:
            out["splits"] = int(o[2:])
        elif o[:1] in "ws" and o[1:].isdigit() and int(o[1:]) > 0:
            out["warps" if o[0] == "w" else "stages"] = int(o[1:])
        else:
            raise ValueError(f"variant {name!r}: unknown option {o!r} (peel with fused, tile<N>, w<N>, s<N>, "
                             "sp<N>, lastmerge)")
    return out


def variant_fn(name: str, s: dict):
    """A call of the variant over state `s` (the module switches it needs set while it runs: the benchmark
    captures it into a graph with them set, see `switches`)."""
    if name == "sdpa":
        return lambda: F.scaled_dot_product_attention(s["q"][:, :, None], s["k"], s["v"], enable_gqa=True)[:, :, 0]
    v = parse_variant(name)
    kw = {"tile_pages": v["tile"], "splits": v["splits"], "separate_merge": v["merge"]}
    if v["base"] == "apart":
        def fn():
            append_kv(s["nk"], s["nv"], s["kc"], s["vc"], s["slots"], s["table"], s["lens"])
            return paged_decode(s["q"], s["kc"], s["vc"], s["table"], s["lens"], **kw)
        return fn
    return lambda: paged_decode(s["q"], s["kc"], s["vc"], s["table"], s["lens"], **kw,
                                new_kv=(s["nk"], s["nv"], s["slots"]))


def switches(name: str) -> None:
    """Set triton_decode's module switches for variant `name` (the defaults for "sdpa")."""
    v = parse_variant(name) if name != "sdpa" else {"peel": False, "warps": 4, "stages": None}
    triton_decode.STORE_PEEL, triton_decode.ATTEND_WARPS, triton_decode.ATTEND_STAGES = \
        v["peel"], v["warps"], v["stages"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="minicpm4-0.5b", help="model preset whose attention shape is used")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64, 128, 256])
    ap.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS),
                    help="apart or fused, with options joined by dots: peel, tile<N>, w<N>, s<N>, sp<N>, lastmerge")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        ap.error("needs CUDA (the kernels' values are tested on the CPU by the test suite)")
    if min(args.batches) < 1 or min(args.lengths) < 2:
        ap.error("batches must be >= 1 and lengths >= 2")
    for name in args.variants:
        try:
            parse_variant(name)
        except ValueError as e:
            ap.error(str(e))
    cfg = preset(args.config)
    hq, hkv = cfg.num_attention_heads, cfg.num_key_value_heads
    d = cfg.hidden_size // hq
    floor = copy_tbps()
    print(f"{args.config}: {hq} query heads, {hkv} KV heads, d {d}; copy {floor:.2f} TB/s")
    rows = []
    print(f"{'phase':26s} {'length':>6s} {'ours ms':>9s} {'peer ms':>9s} {'speedup':>8s} {'TB/s':>6s} {'max err':>8s}")
    for batch in args.batches:
        for length in args.lengths:
            s = state(batch, length, hq, hkv, d)
            peer_fn = variant_fn("sdpa", s)
            want = peer_fn()
            peer = cold_graph_ms(peer_fn)
            read = 2 * batch * length * hkv * d * 2
            for name in args.variants:
                switches(name)
                fn = variant_fn(name, s)
                try:
                    got = fn()
                except Exception as e:  # noqa: BLE001  (a config the GPU cannot hold: out of shared memory)
                    phase = f"decode.b{batch}.{name}"
                    print(f"{phase:26s} {length:6d}  failed: {type(e).__name__}: {e}"[:200])
                    continue
                err = (got.float() - want.float()).abs().max().item()
                if not err < 3e-2:
                    raise SystemExit(f"{name} at batch {batch}, length {length}: max error {err:.3g} against SDPA")
                ms = cold_graph_ms(fn)
                row = {"phase": f"decode.b{batch}.{name}", "seqlen": length, "ours_ms": round(ms, 5),
                       "peer_ms": round(peer, 5), "speedup": round(peer / ms, 3), "batch": batch,
                       "TBps": round(read / ms / 1e9, 3), "of_copy": round(read / ms / 1e9 / floor, 3),
                       "max_err": err}
                rows.append(row)
                print(f"{row['phase']:26s} {length:6d} {ms:9.4f} {peer:9.4f} {row['speedup']:7.2f}x "
                      f"{row['TBps']:6.2f} {err:8.1e}")
            switches("sdpa")
    write_rows(f"batched_decode-{args.config}", torch.cuda.get_device_name(), rows, args.out, copy_TBps=floor,
               heads=[hq, hkv, d])


if __name__ == "__main__":
    main()
