"""InfLLM v2 sparse attention: one entry point for the model code.

`sparse_attention` runs the Triton kernels on CUDA tensors in fp16/bf16 and plain PyTorch everywhere else (CPU,
float32/float64): the reference's stages 1-3 with `cpu.block_sparse_attention` as stage 4. The reference is the
definition the kernels are tested against.
"""

from __future__ import annotations

import contextlib
import functools
import math

import torch

from cpm4.model.config import SparseConfig

from . import cpu
from .reference import compress_keys, decode_rows, infllm_v2_attention, kernel_means, num_kernels

__all__ = ["sparse_attention", "compress_keys", "kernel_means", "num_kernels", "uses_triton", "triton_pipeline",
           "shared_window", "sparse_attention_rows", "triton_pipeline_rows", "sparse_attention_varlen",
           "sparse_decode_rows", "make_opaque_to_compile", "selection_widths", "warm_widths",
           "warm_prefill_kernels"]


def uses_triton(q: torch.Tensor) -> bool:
    if not (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)):
        return False
    return _triton_device(q.device.index if q.device.index is not None else torch.cuda.current_device())


@functools.cache
def _triton_device(index: int) -> bool:
    """Triton importable and the GPU sm80+ (asked once per device: the model asks every layer)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.get_device_capability(index) >= (8, 0)


def triton_pipeline(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: SparseConfig, scale: float,
                    k1: torch.Tensor | None = None, k2: torch.Tensor | None = None,
                    return_blocks: bool = False):
    """Stages 1-4 on the GPU for the last Tq of Tk tokens of one sequence (differentiable in q, k, v)."""
    from .triton_attention import block_sparse_attention
    from .triton_select import block_scores, compress, select_blocks

    tq, tk = q.shape[0], k.shape[0]
    with torch.no_grad():
        if k1 is None:
            k1 = compress(k, cfg.kernel_size, cfg.kernel_stride)
            k2 = compress(k, cfg.coarse_kernel_size, cfg.coarse_kernel_stride) if cfg.variant == "gen-b" else None
        scores = block_scores(q, k1, k2, tk - tq, cfg, scale)
        idx = select_blocks(scores, tk - tq, tq, k1.shape[0], cfg)
    out = block_sparse_attention(q, k, v, idx, cfg.block_size, scale, cfg.init_blocks, shared_window(cfg))
    return (out, idx) if return_blocks else out


def sparse_attention_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n_new: list[int], kv_lens: list[int],
                          cfg: SparseConfig, scale: float, k1: torch.Tensor | list[torch.Tensor],
                          k2: torch.Tensor | list[torch.Tensor] | None, n1: list[int] | None = None,
                          n2: list[int] | None = None, memo: dict | None = None) -> torch.Tensor:
    """InfLLM v2 attention of several sequences at once: row r's queries q[r, :n_new[r]] are the last n_new[r] of
    its kv_lens[r] tokens k[r], v[r] ([R, S, hkv, d], right-padded); k1/k2 its semantic-kernel keys, a list per row
    or right-padded [R, N, hkv, d] with counts n1/n2. -> [R, max(n_new), hq, d], zero past each row's queries.
    memo: a dict kept for every layer of a step, so the per-row numbers go to the GPU once a step.
    On the GPU one launch per stage for all rows (inference: no gradient); elsewhere row by row
    (`sparse_attention`)."""
    if len(n_new) != q.shape[0] or len(kv_lens) != q.shape[0]:
        raise ValueError(f"{q.shape[0]} rows but {len(n_new)} query counts and {len(kv_lens)} key counts")
    if isinstance(k1, (list, tuple)):
        n1 = [x.shape[0] for x in k1]
        n2 = None if k2 is None else [x.shape[0] for x in k2]
    if uses_triton(q):
        return triton_pipeline_rows(q, k, v, n_new, kv_lens, cfg, scale, k1, k2, n1, n2, memo=memo)
    out = q.new_zeros((q.shape[0], max(n_new), *q.shape[2:]))
    for r, (n, kl) in enumerate(zip(n_new, kv_lens)):
        out[r, :n] = sparse_attention(q[r, :n], k[r, :kl], v[r, :kl], cfg, scale, k1[r][:n1[r]],
                                      None if k2 is None else k2[r][:n2[r]])
    return out


def triton_pipeline_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n_new: list[int], kv_lens: list[int],
                         cfg: SparseConfig, scale: float, k1: torch.Tensor | list[torch.Tensor],
                         k2: torch.Tensor | list[torch.Tensor] | None, n1: list[int], n2: list[int] | None,
                         return_blocks: bool = False, memo: dict | None = None):
    """`sparse_attention_rows` in the Triton kernels: stages 1, 3 and 4, each one launch for every row
    (return_blocks: also the selection [R, hkv, T, K], as `select_blocks` with rows)."""
    from .triton_attention import sparse_fwd
    from .triton_select import Rows, block_scores, select_blocks

    if isinstance(k1, (list, tuple)):
        pad = torch.nn.utils.rnn.pad_sequence
        k1 = pad(list(k1), batch_first=True)
        k2 = None if k2 is None else pad(list(k2), batch_first=True)
    key = ("rows", tuple(n_new), tuple(kv_lens), tuple(n1), None if n2 is None else tuple(n2))
    rows = None if memo is None else memo.get(key)
    if rows is None:
        rows = Rows(n_new, kv_lens, n1, n2, q.device)
        if memo is not None:
            memo[key] = rows
    q = q[:, :rows.tq]
    with torch.no_grad():
        scores = block_scores(q, k1, k2, 0, cfg, scale, rows=rows)
        idx = select_blocks(scores, 0, 0, 0, cfg, rows=rows)
        out = sparse_fwd(q, k, v, idx, cfg.block_size, scale, cfg.init_blocks, shared_window(cfg), rows=rows)[0]
    return (out, idx) if return_blocks else out


def shared_window(cfg: SparseConfig) -> int:
    """Blocks before the query's own block that every query of a block attends to: the forced local
    window (Gen-B: qb-local .. qb) or the attention's sliding window (Gen-A: qb-local+1 .. qb)."""
    return cfg.local_blocks if cfg.variant == "gen-b" else cfg.local_blocks - 1


def selection_widths(cfg: SparseConfig, start_blocks: int, max_blocks: int) -> list[int]:
    """The smallest block count, from start_blocks up to max_blocks, of each width the prefill kernels are
    compiled for: a context of n blocks selects min(num_selected, n) a query, a lane of the next power of two
    (NSEL_PAD, K_PAD); the count itself is a runtime argument."""
    import triton

    out, n = [], max(start_blocks, 1)
    while n <= max_blocks:
        out.append(n)
        width = triton.next_power_of_2(min(cfg.num_selected, n))
        if width >= cfg.num_selected:  # longer contexts keep this width
            break
        n = width + 1
    return out


def warm_widths(cfg: SparseConfig, hq: int, hkv: int, d: int, context: int, device: torch.device | str,
                dtype: torch.dtype, start_blocks: int = 1, queries: int = 1024, seed: int = 0) -> None:
    """Compile (and autotune) the prefill kernels for each selection width (`selection_widths`) a context of up
    to `context` tokens reaches past start_blocks, one sequence and several rows: a short context (fewer blocks
    than num_selected, a small dense_len) otherwise compiles a new width inside a request. The last `queries`
    tokens of random q/k/v, so the autotuning times a spread of scores as a random model's."""
    from . import triton_union
    from .triton_select import compress

    gen = torch.Generator(device=device).manual_seed(seed)
    scale = 1 / math.sqrt(d)
    for nb in selection_widths(cfg, start_blocks, -(-context // cfg.block_size)):
        n = min(nb * cfg.block_size, context)
        tq = min(queries, n)
        q, k, v = (torch.randn(t, h, d, generator=gen, device=device).to(dtype)
                   for t, h in ((tq, hq), (n, hkv), (n, hkv)))
        with torch.no_grad():
            k1 = compress(k, cfg.kernel_size, cfg.kernel_stride)
            k2 = compress(k, cfg.coarse_kernel_size, cfg.coarse_kernel_stride) if cfg.variant == "gen-b" else None
            # With UNION_TOKENS set: the union kernels (forced: random inputs would decline them) and the token
            # kernel both with a plan (forced, and calls of UNION_MIN_QUERIES queries) and without (shorter calls:
            # this one too when it is shorter).
            modes = [contextlib.nullcontext]
            if triton_union.UNION_TOKENS:
                modes.append(triton_union.forced)
                if tq >= triton_union.UNION_MIN_QUERIES:
                    modes.append(triton_union.declined)
            for mode in modes:
                with mode():
                    triton_pipeline(q, k, v, cfg, scale, k1, k2)
                    triton_pipeline_rows(q[None], k[None], v[None], [tq], [n], cfg, scale, [k1],
                                         None if k2 is None else [k2], [k1.shape[0]],
                                         None if k2 is None else [k2.shape[0]])


def warm_prefill_kernels(cfg: SparseConfig, hq: int, hkv: int, d: int, context: int, device: torch.device | str,
                         dtype: torch.dtype, queries: int = 1024) -> None:
    """Compile (and autotune) every variant of the prefill kernels a prompt of dense_len to `context` tokens can
    need, lengths being runtime arguments: the selection's lanes (`warm_select`), stage 1 for a few queries
    after a long context (`warm_scores`) and each selection width (`warm_widths`). The engine runs this in
    warm_up, so that no request compiles one."""
    from .triton_select import warm_scores, warm_select

    start = max(1, -(-cfg.dense_len // cfg.block_size))  # the blocks of the shortest sparse prompt (dense_len)
    warm_select(cfg, hkv, context, device, dtype, start=start, queries=queries)
    warm_scores(cfg, hq, hkv, d, device, dtype)
    warm_widths(cfg, hq, hkv, d, context, device, dtype, start, queries=queries)


def sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: SparseConfig,
                     scale: float | None = None, k1: torch.Tensor | None = None,
                     k2: torch.Tensor | None = None) -> torch.Tensor:
    """InfLLM v2 attention of the last q.shape[0] tokens of one sequence: q [Tq, hq, d], k/v [Tk, hkv, d]."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    if uses_triton(q):
        return triton_pipeline(q, k, v, cfg, scale, k1, k2)
    return infllm_v2_attention(q, k, v, cfg, scale=scale, k1=k1, k2=k2, attend=cpu.block_sparse_attention)


def sparse_decode_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lens: list[int], cfg: SparseConfig,
                       scale: float, k1: list[torch.Tensor], k2: list[torch.Tensor] | None) -> torch.Tensor:
    """One decode step of several sequences: q [R, hq, d] (row r's query is the last of its lens[r] tokens),
    k/v [R, Tmax, hkv, d] right-padded, k1/k2 each row's semantic-kernel keys -> [R, hq, d]. Off the GPU in
    one pass over all rows (`reference.decode_rows`); with the Triton kernels one launch per stage for all rows
    (`triton_pipeline_rows`; the engine's CUDA decode runs on the paged cache instead)."""
    if uses_triton(q):
        return triton_pipeline_rows(q[:, None], k, v, [1] * len(lens), lens, cfg, scale, k1, k2,
                                    [x.shape[0] for x in k1], None if k2 is None else [x.shape[0] for x in k2])[:, 0]
    pad = torch.nn.utils.rnn.pad_sequence
    return decode_rows(q, k, v, torch.tensor(lens), cfg, scale, pad(k1, batch_first=True),
                       None if k2 is None else pad(k2, batch_first=True), attend=cpu.decode_attention)


def make_opaque_to_compile() -> None:
    """Make `sparse_attention` a graph break for torch.compile: inductor's tracing of user Triton kernels
    re-types their loop variables (fp32 accumulators promoted by Python float constants) and fails to build
    them. Called by whoever compiles model code (imports torch._dynamo, about a second: not at import)."""
    global sparse_attention
    if not getattr(sparse_attention, "_cpm4_opaque", False):
        sparse_attention = torch.compiler.disable(sparse_attention)
        sparse_attention._cpm4_opaque = True


def sparse_attention_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                            cu_seqlens_k: torch.Tensor, cfg: SparseConfig, scale: float | None = None) -> torch.Tensor:
    """A packed batch of sequences: q [sum Tq, hq, d], k/v [sum Tk, hkv, d], with cumulative lengths
    cu_seqlens_q/k [B + 1] (flash-attention convention); each sequence's queries are its last Tq tokens.
    One launch per sequence for now (the kernels take one sequence)."""
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    if len(cq) != len(ck) or cq[0] != 0 or ck[0] != 0 or cq[-1] != q.shape[0] or ck[-1] != k.shape[0]:
        raise ValueError(f"cu_seqlens must start at 0 and end at the packed lengths ({q.shape[0]}, {k.shape[0]}); "
                         f"got {cq}, {ck}")
    out = torch.empty_like(q)
    for i in range(len(cq) - 1):
        if cq[i + 1] - cq[i] > ck[i + 1] - ck[i]:
            raise ValueError(f"sequence {i}: {cq[i + 1] - cq[i]} queries but {ck[i + 1] - ck[i]} keys")
        if cq[i + 1] > cq[i]:
            out[cq[i]:cq[i + 1]] = sparse_attention(q[cq[i]:cq[i + 1]], k[ck[i]:ck[i + 1]], v[ck[i]:ck[i + 1]], cfg,
                                                    scale)
    return out
