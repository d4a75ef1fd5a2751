"""A paged KV cache: fixed pages of `page_size` tokens (the InfLLM v2 block size, 64) allocated once from a
budget, a block table per sequence, reference-counted pages shared by sequences with the same prefix.

`PagedKVCache.batch(seqs)` gives the model the same cache interface as the contiguous `KVCache` for the
sequences of one step (any subset, in any order), so the model does not know about pages. On the CPU the
attention reads the sequences' pages gathered into contiguous tensors; GPU paged kernels can read the pages
in place (`cpm4.kernels.infllm_v2.triton_decode`).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from cpm4.kernels.infllm_v2 import kernel_means, num_kernels
from cpm4.model.config import MiniCPM4Config, SparseConfig

from .kv_cache import CacheFullError


class OutOfPages(RuntimeError):
    pass


@dataclass
class SeqPages:
    """One sequence's view of the cache: its pages in order and how many tokens they hold."""

    pages: list[int] = field(default_factory=list)
    length: int = 0
    # Semantic-kernel keys pooled so far, per layer (InfLLM v2): (fine, coarse) tensors and counts.
    fine: dict[int, torch.Tensor] = field(default_factory=dict)
    coarse: dict[int, torch.Tensor] = field(default_factory=dict)


class PagedKVCache:
    def __init__(self, config: MiniCPM4Config, num_pages: int, page_size: int = 64,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        if num_pages < 1 or page_size < 1:
            raise ValueError(f"need num_pages >= 1 and page_size >= 1, got {num_pages}, {page_size}")
        self.config = config
        self.page_size = page_size
        self.num_pages = num_pages
        shape = (num_pages, page_size, config.num_key_value_heads, config.dim_head)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.refs = [0] * num_pages
        self.free: list[int] = list(range(num_pages - 1, -1, -1))
        # Full pages by the hash of all tokens up to their end: prefix sharing. Held pages keep one reference
        # each; least recently used ones are dropped when pages run out.
        self.prefix: OrderedDict[bytes, int] = OrderedDict()

    @classmethod
    def from_budget(cls, config: MiniCPM4Config, budget_bytes: int, page_size: int = 64,
                    device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> PagedKVCache:
        """As many pages as fit in `budget_bytes` (K and V of every layer)."""
        per_page = (2 * config.num_hidden_layers * page_size * config.num_key_value_heads * config.dim_head
                    * torch.empty((), dtype=dtype).element_size())
        n = budget_bytes // per_page
        if n < 1:
            raise ValueError(f"KV cache budget {budget_bytes} B is below one page ({per_page} B)")
        return cls(config, int(n), page_size, device, dtype)

    # ---- pages ----
    @property
    def num_free(self) -> int:
        return len(self.free) + sum(1 for p in self.prefix.values() if self.refs[p] == 1)

    def _take(self) -> int:
        if not self.free:
            # Reclaim a cached prefix page nobody else holds (least recently used first).
            for h, p in self.prefix.items():
                if self.refs[p] == 1:
                    del self.prefix[h]
                    self.refs[p] = 0
                    self.free.append(p)
                    break
        if not self.free:
            raise OutOfPages("no free KV cache page")
        p = self.free.pop()
        self.refs[p] = 1
        return p

    def _release(self, p: int) -> None:
        self.refs[p] -= 1
        if self.refs[p] == 0:
            self.free.append(p)

    @staticmethod
    def _chain(prev: bytes, tokens: list[int]) -> bytes:
        return hashlib.blake2b(prev + torch.tensor(tokens, dtype=torch.int64).numpy().tobytes(),
                               digest_size=16).digest()

    def new_sequence(self, tokens: list[int]) -> tuple[SeqPages, int]:
        """A sequence whose cache starts with the longest cached prefix of `tokens` (whole pages, leaving at
        least one token to compute); returns it and how many tokens are already cached."""
        seq = SeqPages()
        h = b""
        ps = self.page_size
        for i in range((len(tokens) - 1) // ps):
            h = self._chain(h, tokens[i * ps:(i + 1) * ps])
            p = self.prefix.get(h)
            if p is None:
                break
            self.prefix.move_to_end(h)
            self.refs[p] += 1
            seq.pages.append(p)
            seq.length += ps
        return seq, seq.length

    def reserve(self, seq: SeqPages, n_tokens: int) -> None:
        """Make room for `n_tokens` more tokens of `seq` (all or nothing)."""
        need = -(-(seq.length + n_tokens) // self.page_size) - len(seq.pages)
        if need > self.num_free:
            raise OutOfPages(f"{need} pages needed, {self.num_free} free")
        for _ in range(need):
            seq.pages.append(self._take())

    def pages_needed(self, seq: SeqPages, n_tokens: int) -> int:
        return max(0, -(-(seq.length + n_tokens) // self.page_size) - len(seq.pages))

    def publish(self, seq: SeqPages, tokens: list[int]) -> None:
        """Offer the sequence's full pages (holding `tokens`) for prefix sharing."""
        h = b""
        ps = self.page_size
        for i in range(min(len(tokens), seq.length) // ps):
            h = self._chain(h, tokens[i * ps:(i + 1) * ps])
            if h not in self.prefix:
                self.prefix[h] = seq.pages[i]
                self.refs[seq.pages[i]] += 1

    def release(self, seq: SeqPages) -> None:
        for p in seq.pages:
            self._release(p)
        seq.pages.clear()
        seq.length = 0
        seq.fine.clear()
        seq.coarse.clear()

    def batch(self, seqs: list[SeqPages]) -> PagedBatch:
        return PagedBatch(self, seqs)


class PagedBatch:
    """The model's cache interface (see cpm4.engine.kv_cache.KVCache) over some sequences of a paged cache."""

    def __init__(self, cache: PagedKVCache, seqs: list[SeqPages]):
        self.cache = cache
        self.seqs = seqs
        dev = cache.k[0].device
        self.lens = torch.tensor([s.length for s in seqs], dtype=torch.long, device=dev)
        self._gathered: dict[int, torch.Tensor] = {}

    def check_room(self, starts: torch.Tensor, n_new: int, new_lens: torch.Tensor | None = None) -> None:
        # Only real tokens are written (padding is not): each row needs room for its own new tokens.
        lens = new_lens.tolist() if new_lens is not None else [n_new] * len(self.seqs)
        for s, n in zip(self.seqs, lens):
            if n and s.length + n > len(s.pages) * self.cache.page_size:
                raise CacheFullError(f"sequence needs {s.length + n} positions, has "
                                     f"{len(s.pages) * self.cache.page_size} reserved")

    def _slots(self, positions: torch.Tensor, rows: list[int]) -> torch.Tensor:
        """Flat slot index (page * page_size + offset) of positions [R, T] of the given batch rows."""
        ps = self.cache.page_size
        width = max(len(self.seqs[r].pages) for r in rows)
        table = torch.zeros(len(rows), max(width, 1), dtype=torch.long, device=positions.device)
        for i, r in enumerate(rows):
            pages = self.seqs[r].pages
            if pages:
                table[i, : len(pages)] = torch.tensor(pages, device=positions.device)
        page_idx = (positions // ps).clamp_max(table.shape[1] - 1)
        return torch.gather(table, 1, page_idx) * ps + positions % ps

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, starts: torch.Tensor, new_lens: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
        b, t = k.shape[:2]
        kc = self.cache.k[layer].view(-1, *k.shape[2:])
        vc = self.cache.v[layer].view(-1, *v.shape[2:])
        rows = [i for i in range(b) if int(new_lens[i]) > 0]
        if rows:
            r = torch.tensor(rows, device=k.device)
            pos = starts[r, None] + torch.arange(t, device=k.device)[None, :]
            real = torch.arange(t, device=k.device)[None, :] < new_lens[r, None]
            slots = self._slots(pos, rows)[real]
            kc[slots] = k[r][real]
            vc[slots] = v[r][real]
        # Contiguous view of every row's keys/values up to the longest end (padding reads a valid slot).
        end = int(starts.max()) + t
        all_rows = list(range(b))
        pos = torch.arange(end, device=k.device)[None, :].expand(b, -1)
        slots = self._slots(pos, all_rows) if any(s.pages for s in self.seqs) else torch.zeros_like(pos)
        k_all, v_all = kc[slots], vc[slots]
        self._gathered[layer] = k_all
        return k_all, v_all

    def advance(self, new_lens: torch.Tensor) -> None:
        for s, n in zip(self.seqs, new_lens.tolist()):
            s.length += n
        self.lens = self.lens + new_lens.to(self.lens.device)

    def compressed_keys(self, layer: int, seq: int, length: int, sc: SparseConfig
                        ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Semantic-kernel keys of batch row `seq` over its first `length` tokens, pooling only new kernels."""
        s = self.seqs[seq]
        keys = self._gathered[layer][seq, :length]
        k1 = _extend(s.fine, layer, keys, sc.kernel_size, sc.kernel_stride)
        if sc.variant != "gen-b":
            return k1, None
        return k1, _extend(s.coarse, layer, keys, sc.coarse_kernel_size, sc.coarse_kernel_stride)


def _extend(store: dict[int, torch.Tensor], layer: int, keys: torch.Tensor, size: int, stride: int) -> torch.Tensor:
    have = store.get(layer)
    done = 0 if have is None else have.shape[0]
    n = num_kernels(keys.shape[0], size, stride)
    if n > done:
        new = kernel_means(keys, size, stride, done, n)
        have = new if have is None else torch.cat([have, new], 0)
        store[layer] = have
    return have if have is not None else keys.new_empty((0,) + tuple(keys.shape[1:]))
