"""The MiniCPM4 decoder (spec/model.md): a µP-scaled Llama-style transformer whose attention switches
between dense and InfLLM v2 by sequence length.

Parameter names match the Hugging Face checkpoints (`model.layers.{i}.self_attn.q_proj.weight`, ...).
The forward pass optionally reads and writes a KV cache (`cpm4.engine.kv_cache.KVCache` or anything
with the same attributes); see `Attention.forward` for the batch/padding contract.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

# Module import (not the function): cpm4.kernels.infllm_v2 imports cpm4.model.config, so either package may
# be imported first.
from cpm4.kernels import infllm_v2

from . import fused
from .config import MiniCPM4Config
from .rope import RotaryEmbedding
from .transfer import to_device
from .varlen import attention_lse, merge_attention, varlen_flash_ok


def ragged_index(lens: list[int], starts: list[int]) -> torch.Tensor:
    """int64 [sum(lens)] on the host: starts[i] + 0 .. lens[i] - 1 for each i in turn."""
    n = np.asarray(lens, dtype=np.int64)
    ends = np.cumsum(n)
    total = int(ends[-1]) if len(n) else 0
    return torch.from_numpy(np.arange(total, dtype=np.int64) + np.repeat(np.asarray(starts, dtype=np.int64)
                                                                         - (ends - n), n))


def _step_memo(cache) -> dict:
    """What every layer of a step shares (index tensors built once): the paged cache view's memo, else a fresh dict."""
    memo = getattr(cache, "memo", None)
    return {} if memo is None else memo


class Packing:
    """The real tokens of a right-padded [rows, t] batch laid end to end as [1, n]. A multi-row prefill with
    rows of different lengths then runs the per-token work (embedding, projections, MLP, norms, RoPE) on its
    n real tokens only; attention takes them as they are when every row is dense (`Attention._packed_dense`),
    else pads q/k/v back to [rows, t] around itself (the other attention paths keep their row layout). Padding
    positions of the padded tensors hold zeros, never read."""

    def __init__(self, new_lens: list[int], t: int, device: torch.device):
        self.rows, self.t = len(new_lens), t
        self.index = to_device(self.flat_index(new_lens, t), device)  # [n]: each packed token's place in [rows * t]
        self.last = to_device(np.cumsum(new_lens) - 1, device, torch.long)  # [rows]: each row's last, packed order

    @staticmethod
    def flat_index(new_lens: list[int], t: int) -> torch.Tensor:
        """Positions of the real tokens in the flattened [rows * t] batch, row by row (on the host): row i's
        n_i tokens from i * t. Through numpy: torch's small CPU ops cost ~5x as much in launches."""
        return ragged_index(new_lens, [i * t for i in range(len(new_lens))])

    @staticmethod
    def worth(new_lens: list[int], t: int) -> bool:
        """Packing pays when there is padding to skip; rows without new tokens keep the padded layout."""
        return len(new_lens) > 1 and min(new_lens) > 0 and sum(new_lens) < len(new_lens) * t

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """[1, n, ...] -> [rows, t, ...]."""
        out = x.new_zeros((self.rows * self.t,) + tuple(x.shape[2:]))
        out[self.index] = x[0]
        return out.view((self.rows, self.t) + tuple(x.shape[2:]))

    def unpad(self, x: torch.Tensor) -> torch.Tensor:
        """[rows, t, ...] -> [1, n, ...]."""
        return x.reshape((self.rows * self.t,) + tuple(x.shape[2:]))[self.index].unsqueeze(0)


class RMSNorm(nn.Module):
    ops = fused.EAGER  # the elementwise ops of every module; see MiniCPM4ForCausalLM.fuse_elementwise

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops.rms_norm(x, self.weight, self.eps)


class MLP(nn.Module):
    ops = fused.EAGER

    def __init__(self, config: MiniCPM4Config):
        super().__init__()
        h, i = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(h, i, bias=False)
        self.up_proj = nn.Linear(h, i, bias=False)
        self.down_proj = nn.Linear(i, h, bias=False)

        self.gate_up: torch.Tensor | None = None  # see fuse_projections
        self.gemv_in = self.gemv_out = None  # gate/up and down: see MiniCPM4ForCausalLM.use_gemv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up is not None:
            gate, up = (self.gemv_in or F.linear)(x, self.gate_up).chunk(2, dim=-1)
            h = self.ops.silu_mul(gate, up)
        else:
            h = self.ops.silu_mul(self.gate_proj(x), self.up_proj(x))
        return self.down_proj(h) if self.gemv_out is None else self.gemv_out(h, self.down_proj.weight)


# cuDNN attention (PyTorch's first choice for causal GQA on Hopper) builds a plan for every new shape: 47 ms on
# the first call of each (rows, T) against 0.1-0.15 ms after (benchmarks/sdpa_shapes.py, H200). The engine's
# multi-row prefill brings a new shape nearly every step, so that call leaves cuDNN out (FlashAttention takes it,
# no plan). Only the enabled set changes here: `set_priority=True` would leave its order behind after the call.
NO_PLAN_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


class Attention(nn.Module):
    ops = fused.EAGER
    # Several sparse rows decoding one token each take one InfLLM v2 pass together; False: row by row
    # (benchmarks/cpu_engine_decode.py's peer).
    batch_sparse_decode = True
    # Dense rows that continue cached tokens (a shared prefix, a later prompt chunk beside other rows) take one
    # variable-length flash call together on CUDA in fp16/bf16; False: row by row (each a bottom-right causal
    # SDPA call, ~0.2 ms of launches: 32 rows after a cached prefix took ~200 ms a step on the 0.5B shape).
    batch_continuing_rows = True
    # Several sparse rows of a step with a cache on the GPU (after a cached prefix, chunks beside other prompts)
    # take one launch per InfLLM v2 stage together; False: a pipeline per row (~6 launches and host work each:
    # 8 requests after a 30K cached prefix, 8B shape, H200: time to first token 288 -> 122 ms).
    batch_sparse_rows = True
    # Dense rows that continue the same cached pages (requests after one prefix, prefix caching; a group per
    # prefix) attend those keys in one call for all the groups (each its own sequence of it) and their own keys in
    # a second, merged by log-sum-exp (`_cascade`), when a group's shared part holds at least cascade_min_tokens;
    # False: the variable-length call over each row's whole keys.
    cascade_prefix = True
    cascade_min_tokens = 1024
    cascade_groups = 4  # the most groups (prefixes) a step takes the cascade for, most keys shared first
    # The variable-length paths (continuing rows, cascade) off the GPU too, in float math (`varlen.attention_lse`):
    # for tests; the CPU's default is a fused SDPA call per row.
    varlen_on_cpu = False
    # A packed multi-row step whose rows are all dense: one variable-length call on the packed tokens
    # (`_packed_dense`); False: padded back to [rows, t] around the attention as any other step.
    packed_prefill = True

    def __init__(self, config: MiniCPM4Config, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv, self.head_dim = (config.num_attention_heads, config.num_key_value_heads,
                                                  config.dim_head)
        h = config.hidden_size
        self.q_proj = nn.Linear(h, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(h, self.n_kv * self.head_dim, bias=False)
        self.v_proj = nn.Linear(h, self.n_kv * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, h, bias=False)
        self.scale = self.head_dim ** -0.5
        self.qkv: torch.Tensor | None = None  # see fuse_projections
        self.gemv_in = self.gemv_out = None  # q/k/v and o: see MiniCPM4ForCausalLM.use_gemv

    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k (RoPE applied) and v, [B, T, heads, d] each. With the projections fused, q and k are rotated in
        one call over their heads side by side (one launch a layer fewer; q and k come back as views)."""
        b, t, _ = x.shape
        if self.qkv is not None:
            return self.rotate((self.gemv_in or F.linear)(x, self.qkv), cos, sin)
        q = self.q_proj(x).view(b, t, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(b, t, self.n_kv, self.head_dim)
        v = self.v_proj(x).view(b, t, self.n_kv, self.head_dim)
        return self.ops.rotary(q, cos, sin), self.ops.rotary(k, cos, sin), v

    def rotate(self, y: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k (RoPE applied) and v from the fused q/k/v projection's output y [B, T, (hq + 2 hkv) d]."""
        hq, hkv = self.n_heads, self.n_kv
        y = y.view(*y.shape[:2], hq + 2 * hkv, self.head_dim)
        return self.split_heads(y, rotated=self.ops.rotary(y[:, :, :hq + hkv], cos, sin))

    def split_heads(self, y: torch.Tensor, rotated: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v as views of the q/k/v projection's output y [B, T, (hq + 2 hkv) d]; rotated: q and k side by
        side when they were rotated apart from y."""
        hq, hkv = self.n_heads, self.n_kv
        y = y.view(*y.shape[:2], hq + 2 * hkv, self.head_dim)
        qk = y[:, :, :hq + hkv] if rotated is None else rotated
        return qk[:, :, :hq], qk[:, :, hq:], y[:, :, hq + hkv:]

    def _out(self, x: torch.Tensor) -> torch.Tensor:
        return self.o_proj(x) if self.gemv_out is None else self.gemv_out(x, self.o_proj.weight)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, starts: torch.Tensor,
                new_lens: torch.Tensor, cache=None, docs: list[list[int]] | None = None,
                host: tuple[list[int], list[int]] | None = None, pack: Packing | None = None) -> torch.Tensor:
        """x [B, T, H]. Sequence b has new_lens[b] real tokens (right padding after them) starting at
        absolute position starts[b] (its cache length before this call). Padded rows produce values
        that are never read: their keys land beyond the sequence's length and are overwritten later.
        `host`: (starts, new_lens) as lists, read once per forward by the caller (each read of a device
        tensor here would wait for the GPU, once per layer); None: read here.

        `docs` (training on packed rows, no cache): docs[b] lists the lengths of the documents packed in
        row b; each attends only within itself, exactly as if it were a sequence of its own.
        `pack` (multi-row prefill with a cache): x is [1, n, H], the batch's real tokens end to end; the
        result is laid out the same way."""
        q, k, v = self.project(x, cos, sin)
        return self._out(self.attend(q, k, v, starts, new_lens, cache, docs, host, pack))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, starts: torch.Tensor, new_lens: torch.Tensor,
               cache=None, docs: list[list[int]] | None = None, host: tuple[list[int], list[int]] | None = None,
               pack: Packing | None = None) -> torch.Tensor:
        """The attention of `forward` on its projected q, k, v ([B, T, heads, d]; packed: [1, n, heads, d]), before
        the o projection: [B, T, heads * d] (packed: [1, n, heads * d]). Same arguments as `forward`."""
        b, t = q.shape[:2]
        if docs is None and not getattr(cache, "decoding", False) and host is None:
            host = (starts.tolist(), new_lens.tolist())
        modes = None
        if pack is not None:
            b, t = pack.rows, pack.t
            modes = self._row_modes(cache, q, host)
            if self._packed_ok(q, cache, modes[1], modes[2], any(host[0])):
                # Every row dense, no cascade: one variable-length call on the packed tokens as they are.
                out = self._packed_dense(q, k, v, host, modes[0], cache)
                return out.reshape(1, -1, self.n_heads * self.head_dim)
            q, k, v = pack.pad(q), pack.pad(k), pack.pad(v)
        if docs is None and cache is None and all(n == t for n in host[1]) and not any(host[0]):
            docs = [[t]] * b  # full rows without a cache (training, scoring): the batched path below
        if docs is not None:
            out = self._packed(q, k, v, docs)
            return out.reshape(b, t, self.n_heads * self.head_dim)
        if getattr(cache, "decoding", False):  # engine decode step: attention on the paged cache in place
            out = cache.decode(self.layer_idx, q, k, v, self.scale)
            return out.reshape(b, t, self.n_heads * self.head_dim)
        h_starts, h_new = host
        kv_lens, sparse, groups = modes or self._row_modes(cache, q, host)
        sc = self.config.sparse_config
        # Every row in a cascade (one prefix, or several: system prompts): keys gathered from after the pages each
        # group shares at least, when the cache allows it (32 rows over 2 cached 4K prefixes would gather 4K keys
        # a row a layer that the cascades read from the shared pages).
        whole = groups if groups and sum(len(g) for g, _ in groups) == b else None
        skip = cache.skip_pages([i for g, _ in whole for i in g], min(c for _, c in whole)) if whole else 0
        if cache is not None:
            k_all, v_all = cache.write(self.layer_idx, k, v, starts, new_lens, host, skip_pages=skip)
        else:
            k_all, v_all = k, v
        ps = cache.cache.page_size if groups else 0
        if whole:
            out = q.new_zeros(q.shape)  # contiguous (written through a flat view)
            self._cascade(q, k_all, v_all, out, whole, h_new, kv_lens, skip * ps, cache)
        elif not any(sparse) and (not any(h_starts) or b == 1 or t == 1):
            # Every row from position 0 (padding only after real tokens): plain causal attention is exact. One
            # row after its cache, or one new token per row (decoding on the gathering path): a mask or none.
            out = self._dense(q, k_all, v_all, starts, not any(h_starts), h_starts[0])
        elif b == 1 and sparse[0] and h_new[0] == t:
            # One sparse row, no padding (a long prompt's chunk, a lone decode step): its output as it comes, not
            # copied into a zeroed buffer (at 128K on the 8B shape that was 1 GB filled and 1 GB copied a layer).
            out = self._sparse_row(q, k_all, v_all, 0, t, kv_lens[0], cache)[None]
        else:
            # Sparse rows, or a multi-token step where some rows continue cached tokens. The dense rows that
            # start at 0 take one causal call together; the others go row by row, each in the fused kernels
            # (bottom-right causal) over exactly its keys, where one padded call would need a [rows, T, S] mask
            # (no fused GQA kernel takes one) and compute the padding.
            out = q.new_zeros(q.shape)  # contiguous (`_dense_varlen` writes through a flat view)
            fresh = [i for i in range(b) if h_new[i] and not sparse[i] and not h_starts[i]]
            if len(fresh) > 1:
                idx = to_device(fresh, q.device)
                out[idx] = self._dense(q[idx], k_all[idx, :t], v_all[idx, :t], starts[idx], True, 0)
            else:
                fresh = []
            if groups:  # rows after shared cached prefixes, beside others that do not share them
                self._cascade(q, k_all, v_all, out, groups, h_new, kv_lens, 0, cache)
                fresh += [i for g, _ in groups for i in g]
            # Sparse rows with a cache on the GPU (chunks after a cached prefix, prompts beside others, decode
            # steps): one launch per InfLLM v2 stage for all of them, not a pipeline per row.
            rows = [i for i in range(b) if sparse[i] and h_new[i]] if cache is not None and \
                self.batch_sparse_rows and infllm_v2.uses_triton(q) else []
            if len(rows) > 1:
                self._sparse_rows(q, k_all, v_all, out, rows, [h_new[i] for i in rows], [kv_lens[i] for i in rows],
                                  cache)
                fresh += rows
            # Sparse rows decoding one token each: one InfLLM v2 pass for all of them (not one per row).
            steps = [i for i in range(b) if sparse[i] and h_new[i] == 1 and i not in fresh] \
                if cache is not None and self.batch_sparse_decode else []
            if len(steps) > 1:
                lens = [kv_lens[i] for i in steps]
                keys = [cache.compressed_keys(self.layer_idx, i, kv_lens[i], sc) for i in steps]
                idx = to_device(steps, q.device)
                end = max(lens)
                out[idx, 0] = infllm_v2.sparse_decode_rows(
                    q[idx, 0], k_all[idx, :end], v_all[idx, :end], lens, sc, self.scale, [k1 for k1, _ in keys],
                    None if keys[0][1] is None else [k2 for _, k2 in keys])
                fresh += steps
            cont = [i for i in range(b) if h_new[i] and not sparse[i] and i not in fresh]
            if len(cont) > 1 and self.batch_continuing_rows and (varlen_flash_ok(q) or self.varlen_on_cpu):
                self._dense_varlen(q, k_all, v_all, out, cont, [h_new[i] for i in cont], [kv_lens[i] for i in cont],
                                   cache)
                fresh += cont
            for i in range(b):
                n, L, s = h_new[i], kv_lens[i], h_starts[i]
                if n == 0 or i in fresh:
                    continue
                if sparse[i]:
                    out[i, :n] = self._sparse_row(q, k_all, v_all, i, n, L, cache)
                else:
                    out[i:i + 1, :n] = self._dense(q[i:i + 1, :n], k_all[i:i + 1, :L], v_all[i:i + 1, :L],
                                                   starts[i:i + 1], s == 0 and L == n, s)
        if pack is not None:
            out = pack.unpad(out)
        return out.reshape(*out.shape[:2], self.n_heads * self.head_dim)

    def _row_modes(self, cache, q: torch.Tensor, host: tuple[list[int], list[int]]
                   ) -> tuple[list[int], list[bool], list[tuple[list[int], int]]]:
        """Each row's keys after this step (kv_lens), whether it attends sparsely, and the cascade groups
        (`_cascade_groups`). A chunk of a prompt decides by the whole prompt (`prompt_lens`, set by the engine): a
        prompt of >= dense_len tokens is sparse for all its queries (spec 4.1), however it is cut into chunks."""
        h_starts, h_new = host
        kv_lens = [s + n for s, n in zip(h_starts, h_new)]
        sc = self.config.sparse_config
        whole = getattr(cache, "prompt_lens", None) or [0] * len(h_new)
        sparse = [sc is not None and n > 0 and sc.is_sparse(max(L, w)) for n, L, w in zip(h_new, kv_lens, whole)]
        return kv_lens, sparse, self._cascade_groups(cache, q, h_new, sparse)

    def _packed_ok(self, q: torch.Tensor, cache, sparse: list[bool], groups: list[tuple[list[int], int]],
                   continuing: bool) -> bool:
        """Whether a packed multi-row step takes `_packed_dense`: every row dense, no cascade group, a paged
        cache, and the variable-length attention available (flash on the GPU; the float path off it for tests);
        rows that continue cached tokens (`continuing`) only while `batch_continuing_rows` takes them together."""
        return (self.packed_prefill and not any(sparse) and not groups and hasattr(cache, "write_packed")
                and (varlen_flash_ok(q) or self.varlen_on_cpu) and (self.batch_continuing_rows or not continuing))

    def _packed_dense(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, host: tuple[list[int], list[int]],
                      kv_lens: list[int], cache) -> torch.Tensor:
        """Dense attention of a packed multi-row step ([1, n, heads, d]: each row's new tokens end to end) in one
        variable-length call over each row's keys, causal bottom-right; [1, n, hq, d] in the same layout. The
        padded way (q, k and v scattered into [rows, t], the fresh rows gathered for one padded causal call, the
        result gathered back) computed the padding too: prompts of 100-1024 tokens padded to the longest did
        ≈ 2.6x the attention's work, and ≈ 8 more launches a layer."""
        h_new = host[1]
        memo = _step_memo(cache)
        key = ("packed", tuple(h_new), tuple(kv_lens))
        if key not in memo:
            cu_q = to_device(np.cumsum([0, *h_new]), q.device, torch.int32)
            cu_k = cu_q if kv_lens == h_new else to_device(np.cumsum([0, *kv_lens]), q.device, torch.int32)
            memo[key] = cu_q, cu_k
        cu_q, cu_k = memo[key]
        kp, vp = cache.write_packed(self.layer_idx, k[0], v[0], host)
        return attention_lse(q[0], kp, vp, cu_q, cu_k, max(h_new), max(kv_lens), True, self.scale)[0][None]

    def _sparse_rows(self, q: torch.Tensor, k_all: torch.Tensor, v_all: torch.Tensor, out: torch.Tensor,
                     rows: list[int], n_new: list[int], kv_lens: list[int], cache) -> None:
        """InfLLM v2 attention of several rows' new queries (row i: its n_new last of kv_lens keys) in one launch
        per stage (`infllm_v2.sparse_attention_rows`), written into `out`."""
        sc = self.config.sparse_config
        end = max(kv_lens)
        if hasattr(cache, "compressed_keys_rows"):  # the paged cache: every row's kernel keys in one gather
            k1, k2, n1, n2 = cache.compressed_keys_rows(self.layer_idx, rows, kv_lens, sc)
        else:
            keys = [cache.compressed_keys(self.layer_idx, i, L, sc) for i, L in zip(rows, kv_lens)]
            k1, k2 = [a for a, _ in keys], None if keys[0][1] is None else [c for _, c in keys]
            n1 = n2 = None
        # Every row of the step: views, no copies of the keys.
        sel = slice(None) if rows == list(range(q.shape[0])) else to_device(rows, q.device)
        o = infllm_v2.sparse_attention_rows(q[sel], k_all[sel, :end], v_all[sel, :end], n_new, kv_lens, sc,
                                            self.scale, k1, k2, n1, n2, memo=getattr(cache, "memo", None))
        out[sel, :o.shape[1]] = o

    def _sparse_row(self, q: torch.Tensor, k_all: torch.Tensor, v_all: torch.Tensor, i: int, n: int, kv_len: int,
                    cache) -> torch.Tensor:
        """InfLLM v2 attention of row i's n new queries over its first kv_len keys (the cache's kernel keys when
        there is one): [n, heads, d]."""
        sc = self.config.sparse_config
        k1 = k2 = None
        if cache is not None:
            k1, k2 = cache.compressed_keys(self.layer_idx, i, kv_len, sc)
        return infllm_v2.sparse_attention(q[i, :n], k_all[i, :kv_len], v_all[i, :kv_len], sc, self.scale, k1, k2)

    def _packed(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, docs: list[list[int]]) -> torch.Tensor:
        """Attention of rows of whole documents (no cache). Sparse documents of equal length run as one
        InfLLM v2 call with the documents folded into the head axis (query head j of document m maps to KV
        head (m*hq + j) // G = m*hkv + j // G, so GQA and per-head selection are unchanged); dense documents
        take one SDPA over their rows with a block-diagonal causal mask."""
        sc = self.config.sparse_config
        b, t = q.shape[:2]
        sparse: dict[int, list[tuple[int, int, int]]] = {}
        dense_rows = []
        for i, lens in enumerate(docs):
            s, has_dense = 0, False
            for n in lens:
                if sc is not None and sc.is_sparse(n):
                    sparse.setdefault(n, []).append((i, s, s + n))
                else:
                    has_dense = True
                s += n
            if has_dense:
                dense_rows.append(i)
        if not sparse and all(len(d) == 1 for d in docs):
            return self._dense(q, k, v, torch.zeros(b, dtype=torch.long, device=q.device), True, 0)
        out = self._dense_docs(q, k, v, docs, dense_rows) if dense_rows else torch.zeros_like(q)
        for n, segs in sparse.items():
            if len(segs) == b and n == t:  # whole rows: a view, no gather
                qs, ks, vs = (x.transpose(0, 1) for x in (q, k, v))
            else:
                qs, ks, vs = (torch.stack([x[r, s:e] for r, s, e in segs], 1) for x in (q, k, v))
            m = len(segs)
            o = infllm_v2.sparse_attention(qs.reshape(n, m * self.n_heads, self.head_dim),
                                           ks.reshape(n, m * self.n_kv, self.head_dim),
                                           vs.reshape(n, m * self.n_kv, self.head_dim), sc, self.scale)
            o = o.view(n, m, self.n_heads, self.head_dim)
            if len(segs) == b and n == t:
                out = o.transpose(0, 1)
            else:
                for j, (r, s, e) in enumerate(segs):
                    out[r, s:e] = o[:, j]
        return out

    def _dense_docs(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, docs: list[list[int]],
                    rows: list[int]) -> torch.Tensor:
        """Dense attention inside each document for the given rows (others left zero). The mask is
        [rows, T, T]: meant for training lengths, not for very long rows."""
        t = q.shape[1]
        out = torch.zeros_like(q)
        doc_id = torch.stack([torch.repeat_interleave(torch.arange(len(docs[i])), torch.tensor(docs[i]))
                              for i in rows]).to(q.device)  # [R, T]
        pos = torch.arange(t, device=q.device)
        mask = (doc_id[:, :, None] == doc_id[:, None, :]) & (pos[None, None, :] <= pos[:, None])  # [R, T, T]
        g = self.n_heads // self.n_kv
        idx = torch.tensor(rows, device=q.device)
        qh = q[idx].transpose(1, 2)
        # KV heads expanded explicitly: SDPA's fused kernels with a mask do not all take enable_gqa.
        kh, vh = (x[idx].repeat_interleave(g, dim=2).transpose(1, 2) for x in (k, v))
        o = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask[:, None], scale=self.scale)
        out[idx] = o.transpose(1, 2)
        return out

    def _cascade_groups(self, cache, q: torch.Tensor, h_new: list[int], sparse: list[bool]
                        ) -> list[tuple[list[int], int]]:
        """The groups of rows that take `_cascade` (each at least two dense rows with new tokens sharing leading
        cached pages, cascade_min_tokens of them at least) with how many pages each shares; [] when none do."""
        if not (self.cascade_prefix and self.batch_continuing_rows and len(h_new) > 1
                and hasattr(cache, "shared_groups") and (varlen_flash_ok(q) or self.varlen_on_cpu)):
            return []
        found = cache.shared_groups([i for i, (n, sp) in enumerate(zip(h_new, sparse)) if n and not sp])
        return [(rows, c) for rows, c in found if c * cache.cache.page_size >= self.cascade_min_tokens
                ][:self.cascade_groups]

    def _cascade(self, q: torch.Tensor, k_all: torch.Tensor, v_all: torch.Tensor, out: torch.Tensor,
                 groups: list[tuple[list[int], int]], h_new: list[int], kv_lens: list[int], skipped: int,
                 cache) -> None:
        """Dense attention of the new queries of the groups' rows (row i: its h_new[i] last positions of kv_lens[i]
        keys) when each group's rows share their first cached pages (group (rows, c): c pages): every group's
        queries attend its shared keys in one variable-length call (a group one sequence of it: its pages read
        once, not gathered and read per row), then each row's own keys after them in a second, causal bottom-right;
        the two merged by their log-sum-exps (cascade attention, as FlashInfer and vLLM run shared prefixes). Two
        calls a layer whatever the number of groups. k_all/v_all: each row's keys from key `skipped` on (the write
        skipped the pages every group shares when every row is in a cascade). Written into `out`."""
        b, t, hq, d = q.shape
        s = k_all.shape[1]
        ps = cache.cache.page_size
        memo = _step_memo(cache)
        rows = [i for g, _ in groups for i in g]
        p_row = [c * ps for g, c in groups for _ in g]
        n_new = [h_new[i] for i in rows]
        own = [kv_lens[i] - p for i, p in zip(rows, p_row)]
        key = ("cascade", tuple((tuple(g), c) for g, c in groups), tuple(n_new), tuple(own), t, s, skipped)
        if key not in memo:
            n_group = [sum(h_new[i] for i in g) for g, _ in groups]
            p_group = [c * ps for _, c in groups]
            host = (ragged_index(n_new, [i * t for i in rows]),
                    ragged_index(own, [i * s + p - skipped for i, p in zip(rows, p_row)]),
                    *(torch.tensor(np.cumsum([0, *x]), dtype=torch.int32) for x in (n_group, p_group, n_new, own)))
            memo[key] = (tuple(to_device(x, q.device) for x in host), max(n_group), max(p_group))
        (qidx, kidx, cu_gq, cu_p, cu_q, cu_k), max_gq, max_p = memo[key]
        qp = q.reshape(b * t, hq, d).index_select(0, qidx)
        pk, pv = cache.shared_kv(self.layer_idx, [(g[0], c) for g, c in groups])
        o1, l1 = attention_lse(qp, pk, pv, cu_gq, cu_p, max_gq, max_p, False, self.scale)
        kp = k_all.reshape(b * s, *k_all.shape[2:]).index_select(0, kidx)
        vp = v_all.reshape(b * s, *v_all.shape[2:]).index_select(0, kidx)
        o2, l2 = attention_lse(qp, kp, vp, cu_q, cu_k, max(n_new), max(own), True, self.scale)
        out.view(b * t, hq, d).index_copy_(0, qidx, merge_attention(o1, l1, o2, l2))

    def _dense_varlen(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, rows: list[int],
                      n_new: list[int], kv_lens: list[int], cache: object) -> None:
        """Dense attention of several rows' new queries (row i: its n_new last positions of kv_lens keys) as one
        variable-length flash-attention call, written into `out`: the rows packed without padding, causal
        aligned bottom-right (query j of a row sees its first kv_len - n_new + j + 1 keys), GQA native."""
        b, t, hq, d = q.shape
        s = k.shape[1]
        # The same for every layer of a step: built once, kept on the step's cache view (`PagedBatch.memo`).
        memo = _step_memo(cache)
        key = ("varlen", tuple(rows), tuple(n_new), tuple(kv_lens), t, s)
        if key not in memo:
            host = (ragged_index(n_new, [i * t for i in rows]), ragged_index(kv_lens, [i * s for i in rows]),
                    torch.tensor(np.cumsum([0, *n_new]), dtype=torch.int32),
                    torch.tensor(np.cumsum([0, *kv_lens]), dtype=torch.int32))
            memo[key] = tuple(to_device(x, q.device) for x in host)
        qidx, kidx, cu_q, cu_k = memo[key]
        qp = q.reshape(b * t, hq, d).index_select(0, qidx)
        kp = k.reshape(b * s, *k.shape[2:]).index_select(0, kidx)
        vp = v.reshape(b * s, *v.shape[2:]).index_select(0, kidx)
        o = attention_lse(qp, kp, vp, cu_q, cu_k, max(n_new), max(kv_lens), True, self.scale)[0]
        out.view(b * t, hq, d).index_copy_(0, qidx, o)

    def _dense(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, starts: torch.Tensor,
               plain_causal: bool, start0: int) -> torch.Tensor:
        """Dense GQA attention; query i of sequence b sees keys j <= starts[b] + i (start0: starts[0], read on
        the host already)."""
        qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if plain_causal and q.shape[0] > 1 and q.is_cuda:
            with sdpa_kernel(NO_PLAN_BACKENDS):
                o = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=self.scale, enable_gqa=True)
        elif plain_causal:
            o = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=self.scale, enable_gqa=True)
        elif q.shape[0] == 1 and q.shape[1] == 1 and k.shape[1] == start0 + 1:
            # One sequence's next token: it sees every key, no mask (decoding on the gathering path).
            o = F.scaled_dot_product_attention(qh, kh, vh, scale=self.scale, enable_gqa=True)
        elif q.shape[0] == 1 and k.shape[1] == start0 + q.shape[1]:
            # One sequence's chunk after its cached tokens (chunked prefill): bottom-right aligned causal
            # attention runs in the fused kernels, where a [T, S] mask would not (16 GB at 128K). That bias
            # takes no GQA, so the KV heads are expanded.
            from torch.nn.attention.bias import causal_lower_right  # imports dynamo (~0.5 s): not at start-up

            g = self.n_heads // self.n_kv
            kh, vh = kh.repeat_interleave(g, dim=1), vh.repeat_interleave(g, dim=1)
            o = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=causal_lower_right(q.shape[1], k.shape[1]),
                                               scale=self.scale)
        else:
            t, s = q.shape[1], k.shape[1]
            qpos = starts[:, None] + torch.arange(t, device=q.device)[None, :]
            mask = torch.arange(s, device=q.device)[None, None, :] <= qpos[:, :, None]  # [B, T, S]
            o = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask[:, None], scale=self.scale,
                                               enable_gqa=True)
        return o.transpose(1, 2)


class DecoderLayer(nn.Module):
    ops = fused.EAGER

    def __init__(self, config: MiniCPM4Config, layer_idx: int):
        super().__init__()
        self.self_attn = Attention(config, layer_idx)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.residual_scale = config.residual_scale

    # Rows up to which the layer's four projections run as fused GEMVs (`use_gemv(fuse=True)`); None: never.
    fused_rows: int | None = None

    def forward(self, x, cos, sin, starts, new_lens, cache=None, docs=None, host=None, pack=None):
        if self.fused_rows is not None and self._fusable(x):
            return self._fused(x, cos, sin, starts, new_lens, cache, docs, host, pack)
        a = self.self_attn(self.input_layernorm(x), cos, sin, starts, new_lens, cache, docs, host, pack)
        return self.after_attention(x, a)

    def _fusable(self, x: torch.Tensor) -> bool:
        """The projections fused (`fuse_projections`), o and down plain weights of x's dtype (not a quantized
        module's), and x few enough rows for the kernel (`fused_takes`)."""
        from cpm4.kernels.gemv import fused_takes

        attn, mlp = self.self_attn, self.mlp
        if attn.qkv is None or mlp.gate_up is None or not fused_takes(x, attn.qkv, self.fused_rows):
            return False
        o, down = getattr(attn.o_proj, "weight", None), getattr(mlp.down_proj, "weight", None)
        return all(isinstance(w, torch.Tensor) and w.dtype == x.dtype and w.stride(-1) == 1
                   for w in (o, down, mlp.gate_up))

    def _fused(self, x, cos, sin, starts, new_lens, cache, docs, host, pack) -> torch.Tensor:
        """`forward` for a few rows (decoding) as four GEMVs with the element-wise work inside them: the input
        norm and RoPE in q/k/v's, the residual in o's, the post-attention norm in gate/up's, SiLU·up and the
        residual in down's (`cpm4.kernels.gemv.fused_linear`; the same roundings)."""
        from cpm4.kernels.gemv import fused_linear

        attn, mlp, rs = self.self_attn, self.mlp, self.residual_scale
        ln1, ln2 = self.input_layernorm, self.post_attention_layernorm
        d = attn.head_dim
        y = fused_linear(x, attn.qkv, norm=(ln1.weight, ln1.eps), rope=(cos, sin, (attn.n_heads + attn.n_kv) * d, d))
        q, k, v = attn.split_heads(y)
        a = attn.attend(q, k, v, starts, new_lens, cache, docs, host, pack)
        x = fused_linear(a, attn.o_proj.weight, residual=x, scale=rs)
        h = fused_linear(x, mlp.gate_up, norm=(ln2.weight, ln2.eps))
        return fused_linear(h, mlp.down_proj.weight, glu=True, residual=x, scale=rs)

    def after_attention(self, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """The layer's work after its attention: a (o-projected) into the residual x, the norm, the MLP."""
        norm = self.post_attention_layernorm
        x, h = self.ops.add_rms_norm(x, a, self.residual_scale, norm.weight, norm.eps)
        return self.ops.add_scaled(x, self.mlp(h), self.residual_scale)


class Backbone(nn.Module):
    """Holds the tensors under the `model.` prefix of the checkpoint."""

    def __init__(self, config: MiniCPM4Config):
        super().__init__()
        # Weight made here rather than by nn.Embedding: its initialiser on a meta tensor imports
        # torch._dynamo (about a second of start-up for every checkpoint load).
        w = torch.empty(config.vocab_size, config.hidden_size)
        if w.device.type != "meta":
            nn.init.normal_(w, std=config.initializer_range)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, _weight=w)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class MTPLayer(nn.Module):
    """One multi-token-prediction module (spec/training.md): from the trunk's state h_i and the embedding of
    x_{i+1}, h'_i = layer(Linear([norm(h_i); norm(emb(x_{i+1}))])); the shared output head reads norm(h'_i)
    and predicts x_{i+2}. Kept in the checkpoint (`mtp.{j}.*`) to serve later as a speculative draft."""

    def __init__(self, config: MiniCPM4Config):
        super().__init__()
        h = config.hidden_size
        self.hnorm = RMSNorm(h, config.rms_norm_eps)
        self.enorm = RMSNorm(h, config.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * h, h, bias=False)
        self.layer = DecoderLayer(config, config.num_hidden_layers)
        self.norm = RMSNorm(h, config.rms_norm_eps)


class MiniCPM4ForCausalLM(nn.Module):
    def __init__(self, config: MiniCPM4Config):
        super().__init__()
        config.validate()
        self.config = config
        self.model = Backbone(config)
        self.lm_head = None if config.tie_word_embeddings else nn.Linear(config.hidden_size, config.vocab_size,
                                                                          bias=False)
        self.rotary = RotaryEmbedding(config)
        if config.num_mtp_layers:
            self.mtp = nn.ModuleList(MTPLayer(config) for _ in range(config.num_mtp_layers))
        self.gemv = None  # see use_gemv
        # Packed prefill steps through CUDA graphs between their attention calls (`cpm4.engine.prefill_graphs`;
        # the engine sets it); None: layer by layer.
        self.prefill_graphs = None

    GEMV_PROJECTIONS = ("qkv", "o", "gate_up", "down", "lm_head")

    def use_gemv(self, enabled: bool = True, only: Iterable[str] | None = None, max_rows: int | None = None,
                 fuse: bool = False) -> None:
        """Run the projections and the output head through `cpm4.kernels.gemv.linear` (the Triton GEMV for a few
        rows of 16-bit CUDA tensors, F.linear otherwise) instead of cuBLAS; for decoding, set before the decode
        graphs are captured. only: a subset of GEMV_PROJECTIONS (the others keep cuBLAS; on the H200 at one row, with
        its best tiles, the kernel won on q/k/v and o at both sizes, on the 0.5B's down and the 8B's gate/up and
        head, and lost a little on the 8B's down: `gemv.decode_plan`).
        max_rows: the most rows the kernel takes (default `gemv.MAX_ROWS`; more go to cuBLAS). fuse: a decoder
        layer's steps of up to max_rows rows run its four projections as GEMVs with the norms, SiLU·up and
        residual adds inside them (`DecoderLayer._fused`; needs `fuse_projections`), whatever `only` says. Calls
        the nn.Linear weights directly, so not for training (FP8 training swaps those modules)."""
        names = set(self.GEMV_PROJECTIONS if only is None else only)
        if names - set(self.GEMV_PROJECTIONS):
            raise ValueError(f"unknown projections {sorted(names - set(self.GEMV_PROJECTIONS))} for use_gemv: "
                             f"choose from {', '.join(self.GEMV_PROJECTIONS)}")
        fn, rows = None, None
        if enabled:
            from cpm4.kernels.gemv import MAX_ROWS
            from cpm4.kernels.gemv import linear as fn

            rows = MAX_ROWS
            if max_rows is not None:
                if not 1 <= max_rows <= MAX_ROWS:
                    raise ValueError(f"max_rows must be in [1, {MAX_ROWS}], got {max_rows}")
                fn, rows = functools.partial(fn, max_rows=max_rows), max_rows

        def pick(name: str):
            return fn if name in names else None

        self.gemv = pick("lm_head")
        for m in self.modules():
            if isinstance(m, DecoderLayer):
                m.fused_rows = rows if fuse else None
            elif isinstance(m, Attention):
                m.gemv_in, m.gemv_out = pick("qkv"), pick("o")
            elif isinstance(m, MLP):
                m.gemv_in, m.gemv_out = pick("gate_up"), pick("down")

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    @torch.no_grad()
    def fuse_projections(self) -> None:
        """One weight for q/k/v and one for gate/up per layer (one GEMM each: at batch 1 the small k and v
        products cost a launch and a split-K reduction apiece). The separate parameters become views into
        the fused weights, so nothing is duplicated and the checkpoint names stay. Idempotent; for inference:
        call it again after replacing any of those parameters."""
        layers = list(self.model.layers) + [m.layer for m in getattr(self, "mtp", [])]
        for layer in layers:
            for owner, attr, mods in ((layer.self_attn, "qkv", ("q_proj", "k_proj", "v_proj")),
                                      (layer.mlp, "gate_up", ("gate_proj", "up_proj"))):
                lins = [getattr(owner, m) for m in mods]
                if not all(type(lin) is nn.Linear and lin.bias is None for lin in lins):
                    continue  # replaced modules (quantized, float8 training) keep their own forward
                fused = getattr(owner, attr)
                if fused is not None and all(lin.weight.untyped_storage().data_ptr()
                                             == fused.untyped_storage().data_ptr() for lin in lins):
                    continue  # already fused: keep the tensor (captured CUDA graphs read it by address)
                fused = torch.cat([lin.weight for lin in lins])
                row = 0
                for lin in lins:
                    n = lin.weight.shape[0]
                    lin.weight = nn.Parameter(fused[row:row + n], requires_grad=lin.weight.requires_grad)
                    row += n
                setattr(owner, attr, fused)

    def fuse_elementwise(self, enabled: bool = True, backend: str = "inductor") -> None:
        """Run the norms, RoPE, SiLU·up and residual adds through torch.compile (`fused.compiled`: fused
        kernels, one graph for all layers and lengths) instead of op by op. For long prefills on the GPU
        (the engine turns it on with compile=True); eager per-call overhead makes it slower for short
        eager steps on the CPU. backend "triton": one hand-written Triton kernel per op instead, nothing to
        compile (`cpm4.kernels.elementwise`; CUDA, the reference elsewhere)."""
        if not enabled:
            ops = fused.EAGER
        elif backend == "triton":  # one hand-written kernel per op, no compilation step (cpm4.kernels.elementwise)
            from cpm4.kernels.elementwise import triton_ops

            ops = triton_ops()
        else:
            ops = fused.compiled(backend)
        for m in self.modules():
            if isinstance(m, (RMSNorm, MLP, Attention, DecoderLayer)):
                m.ops = ops

    def _apply(self, fn, recurse=True):
        # Moving or casting copies each parameter on its own: fuse again so the fused weights follow. Prefill graphs
        # belong to the old placement (their buffers, the weights they read): dropped.
        fused = self.model.layers[0].self_attn.qkv is not None if len(self.model.layers) else False
        self.prefill_graphs = None
        out = super()._apply(fn, recurse)
        if fused:
            self.fuse_projections()
        return out

    @torch.no_grad()
    def unfuse_projections(self) -> None:
        """Undo `fuse_projections`: each projection its own weight again (copied out of the fused tensor), the fused
        weights dropped. Idempotent."""
        layers = list(self.model.layers) + [m.layer for m in getattr(self, "mtp", [])]
        for layer in layers:
            for owner, attr, mods in ((layer.self_attn, "qkv", ("q_proj", "k_proj", "v_proj")),
                                      (layer.mlp, "gate_up", ("gate_proj", "up_proj"))):
                if getattr(owner, attr) is None:
                    continue
                for m in mods:
                    lin = getattr(owner, m)
                    lin.weight = nn.Parameter(lin.weight.detach().clone(), requires_grad=lin.weight.requires_grad)
                setattr(owner, attr, None)

    def output_weight(self) -> torch.Tensor:
        return self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def hidden_states(self, input_ids: torch.Tensor, cache=None, new_lens: torch.Tensor | None = None
                      ) -> torch.Tensor:
        """Final-norm hidden states [B, T, H]. With a cache, tokens go after each sequence's cached ones."""
        return self.model.norm(self.trunk(input_ids, cache, new_lens))

    # Multi-row prefill runs on the real tokens only (see `Packing`); False keeps the padded layout (tests).
    pack_rows = True

    def trunk(self, input_ids: torch.Tensor, cache=None, new_lens: torch.Tensor | None = None,
              docs: list[list[int]] | None = None) -> torch.Tensor:
        """Last decoder layer's output [B, T, H], before the final norm. `docs` (training, no cache):
        lengths of the documents packed in each row; positions restart at each document and attention
        stays inside it."""
        x, pack = self._trunk(input_ids, cache, new_lens, docs)
        return pack.pad(x) if pack is not None else x

    def _trunk(self, input_ids: torch.Tensor, cache=None, new_lens: torch.Tensor | None = None,
               docs: list[list[int]] | None = None) -> tuple[torch.Tensor, Packing | None]:
        """`trunk`, with a multi-row prefill's output left packed ([1, n, H] and its `Packing`)."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, tokens], got shape {tuple(input_ids.shape)}")
        b, t = input_ids.shape
        decoding = getattr(cache, "decoding", False)
        if not decoding:  # engine decode steps feed sampled ids: no host sync
            self._check_ids(input_ids)  # the engine's prefill ids are host tensors: checked without a device read
        # Host tensors (the engine's ids and lengths) go to the model's device here, through pinned memory, and
        # their values are read on the host: every device read in a step (.tolist(), a pageable copy) makes the
        # host wait for the GPU's queued work while the GPU then waits for the host's next launches.
        dev = self.device if input_ids.device.type == "cpu" else input_ids.device
        input_ids = to_device(input_ids, dev)
        full_rows = new_lens is None and cache is None  # lengths known without reading the device
        new_host = None if decoding or new_lens is None or new_lens.device.type != "cpu" else new_lens.tolist()
        if new_lens is None:
            new_lens = torch.full((b,), t, dtype=torch.long, device=dev)
        new_lens = to_device(new_lens, dev)
        starts = cache.lens.to(dev) if cache is not None else torch.zeros(b, dtype=torch.long, device=dev)
        if cache is not None and docs is not None:
            raise ValueError("docs (packed training rows) cannot be used with a KV cache")
        host = None  # the lengths on the host, read once for all layers (decode steps never read them)
        if full_rows:
            host = ([0] * b, [t] * b)
        elif docs is None and not decoding:
            host_starts = cache.host_lens() if hasattr(cache, "host_lens") else None
            host = (starts.tolist() if host_starts is None else host_starts,
                    new_lens.tolist() if new_host is None else new_host)
        if host is not None and any(n < 0 or n > t for n in host[1]):
            raise ValueError(f"new_lens must lie in [0, {t}] (the tokens given per row), got {host[1]}")
        if cache is not None:
            cache.check_room(starts, t, new_lens, host)
        if docs is not None:
            positions = doc_positions(docs, t, dev)
        else:
            positions = starts[:, None] + torch.arange(t, device=dev)[None, :]
        pack, graphs = None, None
        if cache is not None and host is not None:  # (never read in decode steps: nothing for dynamo to guard)
            graphs = self.prefill_graphs
            if graphs is not None and not (self.pack_rows and graphs.takes(cache, host, t)
                                           and graphs.ready(sum(host[1]))):
                graphs = None
            if self.pack_rows and (graphs is not None or Packing.worth(host[1], t)):
                pack = Packing(host[1], t, dev)
                input_ids, positions = pack.unpad(input_ids), pack.unpad(positions)
        if graphs is not None:  # the step's work between attention calls from its CUDA graphs
            x = graphs.run(input_ids[0], positions[0], starts, new_lens, cache, host, pack)
        else:
            cos, sin = self.rotary(positions, self.dtype)
            x = self.embed(input_ids)
            for layer in self.model.layers:
                x = layer(x, cos, sin, starts, new_lens, cache, docs, host, pack)
        if cache is not None:
            cache.advance(new_lens, host)
        return x, pack

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The µP-scaled token embeddings."""
        return self.model.embed_tokens(input_ids) * self.config.scale_emb

    def _check_ids(self, input_ids: torch.Tensor) -> None:
        vocab = self.config.vocab_size
        if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab):
            raise ValueError(f"token id out of range [0, {vocab}): min {int(input_ids.min())}, "
                             f"max {int(input_ids.max())}")

    def mtp_hidden_states(self, h: torch.Tensor, input_ids: torch.Tensor, docs: list[list[int]] | None = None
                          ) -> list[torch.Tensor]:
        """Final-norm states of each MTP module from the trunk output h [B, T, H] (pre-norm). Module j's
        row i predicts token i+2+j; its last 1+j rows have no next-token input and read token 0 instead
        (their targets are masked by the loss)."""
        b, t = input_ids.shape
        positions = doc_positions(docs, t, h.device) if docs is not None else \
            torch.arange(t, device=h.device)[None, :].expand(b, t)
        cos, sin = self.rotary(positions, self.dtype)
        zeros = torch.zeros(b, dtype=torch.long, device=h.device)
        full = torch.full((b,), t, dtype=torch.long, device=h.device)
        outs = []
        for j, mod in enumerate(self.mtp):
            nxt = torch.roll(input_ids, -(1 + j), dims=1)
            nxt[:, t - 1 - j:] = 0
            e = self.embed(nxt)
            h = mod.eh_proj(torch.cat([mod.hnorm(h), mod.enorm(e)], dim=-1))
            h = mod.layer(h, cos, sin, zeros, full, None, docs, ([0] * b, [t] * b))
            outs.append(mod.norm(h))
        return outs

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """µP output: the head reads h / (hidden_size / dim_model_base); logits in float32 (float64 models:
        float64)."""
        out = (self.gemv or F.linear)(h / self.config.logit_divisor, self.output_weight())
        return out if out.dtype == torch.float64 else out.float()

    def forward(self, input_ids: torch.Tensor, cache=None, new_lens: torch.Tensor | None = None,
                last_only: bool = False) -> torch.Tensor:
        """Logits [B, T, V] (float32), or [B, V] at each sequence's last real token with last_only."""
        x, pack = self._trunk(input_ids, cache, new_lens)
        h = self.model.norm(x)
        if pack is not None:
            return self.logits(h[0, pack.last] if last_only else pack.pad(h))
        if last_only:
            last = (new_lens if new_lens is not None else torch.full((h.shape[0],), h.shape[1])) - 1
            h = h[torch.arange(h.shape[0], device=h.device), to_device(last, h.device)]
        return self.logits(h)


def doc_positions(docs: list[list[int]], t: int, device: torch.device) -> torch.Tensor:
    """Positions [B, T] restarting at 0 at each packed document."""
    rows = []
    for lens in docs:
        if sum(lens) != t or any(n <= 0 for n in lens):
            raise ValueError(f"document lengths {lens} must be positive and sum to the row length {t}")
        rows.append(torch.cat([torch.arange(n) for n in lens]))
    return torch.stack(rows).to(device)
