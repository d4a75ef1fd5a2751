"""A paged KV cache: fixed pages of `page_size` tokens (the InfLLM v2 block size, 64) allocated once from a
budget, a block table per sequence, reference-counted pages shared by sequences with the same prefix (and
the same attention mode: dense, or InfLLM v2 for prompts of at least dense_len tokens).

For InfLLM v2 models the semantic-kernel keys live beside the pages (`fine`, `coarse`: kernel j in the page
holding its last token, `reference.kernel_page_slots`) and are pooled as tokens are written, so shared
prefix pages share them and nothing is pooled twice.

`PagedKVCache.batch(seqs)` gives the model the KV cache interface (see cpm4.engine.kv_cache.KVCache) for
the sequences of one step: attention reads the sequences' pages gathered into contiguous tensors (prefill
chunks, and every step on the CPU). `batch(seqs, decode=True)` gives a `DecodeBatch`: one new token per
sequence, attention straight from the pages with the paged Triton kernels, no host synchronisation, so the
step can be replayed from a CUDA graph (`cpm4.engine.cuda_graph`).
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
import weakref
from array import array
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch

from cpm4.kernels.infllm_v2 import num_kernels
from cpm4.kernels.infllm_v2.reference import kernel_page_slots, kernel_slots
from cpm4.model.config import MiniCPM4Config, SparseConfig
from cpm4.model.modeling import Packing
from cpm4.model.transfer import to_device

from .kv_cache import CacheFullError


class OutOfPages(RuntimeError):
    pass


@dataclass
class SeqPages:
    """One sequence's view of the cache: its pages in order and how many tokens they hold."""

    pages: list[int] = field(default_factory=list)
    length: int = 0


def page_size_for(config: MiniCPM4Config) -> int:
    """Pages hold one InfLLM v2 block (64 tokens in MiniCPM4); 64 for dense models too."""
    return config.sparse_config.block_size if config.sparse_config is not None else 64


def kv_budget_bytes(model, utilization: float, chunk_tokens: int, graph_tokens: int = 0) -> int:
    """Device memory for the KV cache, as vLLM's gpu_memory_utilization: that share of the device, minus what
    is in use now (weights, other processes) and the activation peak of one prefill chunk, measured by
    running one, and the prefill graphs' private pool: the activations of a step of graph_tokens (their capture
    limit; activations grow with the tokens, so the chunk's peak scaled)."""
    if not 0 < utilization <= 1:
        raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {utilization}")
    dev = model.device
    if dev.type != "cuda":
        raise ValueError("gpu_memory_utilization sizes a CUDA cache; give kv_cache_tokens on other devices")
    torch.cuda.synchronize(dev)
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    base = torch.cuda.memory_allocated(dev)
    n = max(1, min(chunk_tokens, model.config.max_position_embeddings - 1))
    with torch.inference_mode():
        model(torch.zeros(1, n, dtype=torch.long, device=dev), last_only=True)
    peak = torch.cuda.max_memory_allocated(dev) - base
    torch.cuda.empty_cache()
    return budget_left(utilization, free, total, peak, n, graph_tokens)


def budget_left(utilization: float, free: int, total: int, peak: int, n: int, graph_tokens: int = 0) -> int:
    """`kv_budget_bytes`'s arithmetic: utilization of total, less what is in use (total - free), the peak of an
    n-token chunk and that peak scaled to graph_tokens (the prefill graphs' pool); raises when nothing is left."""
    graphs = peak * graph_tokens // n
    budget = int(utilization * total) - (total - free) - peak - graphs
    if budget <= 0:
        raise ValueError(f"no device memory left for the KV cache at gpu_memory_utilization {utilization}: "
                         f"{(total - free) / 2**30:.1f} GiB in use of {total / 2**30:.1f} GiB, "
                         f"{peak / 2**30:.2f} GiB needed for a {n}-token prefill chunk"
                         + (f" and {graphs / 2**30:.2f} GiB for the prefill graphs" if graphs else ""))
    return budget


# Every cache by its uid: the compiled decode step's custom op names its cache by number (an op's arguments
# are tensors and numbers).
_CACHES: weakref.WeakValueDictionary[int, PagedKVCache] = weakref.WeakValueDictionary()
_next_uid = itertools.count()


class PagedKVCache:
    def __init__(self, config: MiniCPM4Config, num_pages: int, page_size: int = 64,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 prefix_caching: bool = True):
        """prefix_caching: share the pages of a prompt's cached prefix with later sequences (vLLM's
        enable_prefix_caching); False: every sequence computes its whole prompt."""
        if num_pages < 1 or page_size < 1:
            raise ValueError(f"need num_pages >= 1 and page_size >= 1, got {num_pages}, {page_size}")
        self.config = config
        self.prefix_caching = prefix_caching
        self.cascade_decode: bool | None = None  # the engine's choice; None: CASCADE_DECODE (`cascade_on`)
        self.page_size = page_size
        self.num_pages = num_pages
        self.uid = next(_next_uid)
        _CACHES[self.uid] = self
        # One extra page, never handed out: padded rows of a captured decode batch write and read there.
        self.scratch = num_pages
        n_layers, hkv, d = config.num_hidden_layers, config.num_key_value_heads, config.dim_head
        shape = (num_pages + 1, page_size, hkv, d)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.fine = self.coarse = None
        sc = config.sparse_config
        if sc is not None:
            if page_size != sc.block_size:
                raise ValueError(f"InfLLM v2 needs pages of one block: page_size {page_size}, "
                                 f"sparse_config.block_size {sc.block_size}")
            self.fine = [torch.zeros((num_pages + 1, kernel_slots(page_size, sc.kernel_stride), hkv, d),
                                     device=device, dtype=dtype) for _ in range(n_layers)]
            if sc.variant == "gen-b":
                self.coarse = [torch.zeros((num_pages + 1, kernel_slots(page_size, sc.coarse_kernel_stride), hkv, d),
                                           device=device, dtype=dtype) for _ in range(n_layers)]
        self.refs = [0] * num_pages
        self.free: list[int] = list(range(num_pages - 1, -1, -1))
        # Prefix entries naming each page, and how many published pages nobody else holds (refs == 1: free to
        # reclaim), kept as references change: `num_free` counted them by walking every prefix page, and a
        # serving cache is soon full of such pages (the 0.5B offline row: ~4K pages walked per admission check,
        # 14 ms of a 36 ms prefill step's host time).
        self._pubs = [0] * num_pages
        self._reclaimable = 0
        # Full pages by the hash of all tokens up to their end: prefix sharing. Held pages keep one reference
        # each; least recently used ones are dropped when pages run out.
        self.prefix: dict[bytes, int] = {}
        # Recency: each published page's key and the number of its last use (`_touch`), and a heap of (that
        # number, page) pushed whenever a published page becomes reclaimable: `_take` pops the least recently
        # used one. Walking the table in use order instead passed every held page before the first reclaimable
        # one, at every page taken (a long prompt's pages, held while it decodes, drift to the front).
        self._key: list[bytes | None] = [None] * num_pages
        self._used = [0] * num_pages
        self._clock = 0
        self._lru: list[tuple[int, int]] = []
        # The last few chains hashed from int64 token arrays, newest first: (root, tokens, keys of their pages).
        # A burst of requests with one long prefix hashed it once, not once a request (`chain`).
        self._recent: list[tuple[bytes, np.ndarray, list[bytes]]] = []

    @property
    def device(self) -> torch.device:
        return self.k[0].device

    @staticmethod
    def bytes_per_page(config: MiniCPM4Config, page_size: int, dtype: torch.dtype) -> int:
        """K and V of every layer, plus the semantic-kernel keys stored beside them (InfLLM v2)."""
        rows = 2 * page_size
        sc = config.sparse_config
        if sc is not None:
            rows += kernel_slots(page_size, sc.kernel_stride)
            if sc.variant == "gen-b":
                rows += kernel_slots(page_size, sc.coarse_kernel_stride)
        return (rows * config.num_hidden_layers * config.num_key_value_heads * config.dim_head
                * torch.empty((), dtype=dtype).element_size())

    @classmethod
    def from_budget(cls, config: MiniCPM4Config, budget_bytes: int, page_size: int = 64,
                    device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> PagedKVCache:
        """As many pages as fit in `budget_bytes` (the scratch page included)."""
        per_page = cls.bytes_per_page(config, page_size, dtype)
        n = budget_bytes // per_page - 1
        if n < 1:
            raise ValueError(f"KV cache budget {budget_bytes} B is below two pages ({2 * per_page} B)")
        return cls(config, int(n), page_size, device, dtype)

    # ---- pages ----
    def has_free(self, n: int) -> bool:
        """Whether n pages can be handed out (free, or reclaimable prefix pages)."""
        return n <= self.num_free

    @property
    def num_free(self) -> int:
        """Pages that can be handed out: free, or published and held by the prefix table alone."""
        return len(self.free) + self._reclaimable

    def _ref(self, p: int, d: int) -> None:
        """Add d to page p's references, keeping the count of reclaimable published pages and queueing a page
        that becomes one for `_reclaim`."""
        r = self.refs[p]
        self.refs[p] = r + d  # before `_queue`, whose rebuild of the heap keeps the pages with refs == 1 now
        if self._pubs[p]:
            self._reclaimable += (r + d == 1) - (r == 1)
            if r + d == 1:
                self._queue(p)

    def _queue(self, p: int) -> None:
        """Offer reclaimable page p at its last use. Entries of pages held again, reused since or reclaimed stay
        behind and are skipped when popped; past twice the pages, the heap is built again from what is
        reclaimable now (a popular prefix is held and let go by every request that reads it)."""
        heapq.heappush(self._lru, (self._used[p], p))
        if len(self._lru) > 2 * self.num_pages + 64:
            self._lru = [(self._used[q], q) for q in set(self.prefix.values()) if self.refs[q] == 1]
            heapq.heapify(self._lru)

    def _reclaim(self) -> None:
        """Free the least recently used published page nobody else holds, if there is one."""
        while self._lru:
            used, p = heapq.heappop(self._lru)
            if self.refs[p] == 1 and self._pubs[p] and self._used[p] == used:
                self._evict(p)
                return

    def _evict(self, p: int) -> None:
        """Drop published page p, held by the prefix table alone, from the table to the free list."""
        del self.prefix[self._key[p]]
        self._ref(p, -1)
        self._pubs[p] -= 1
        self._key[p] = None
        self.free.append(p)

    def _take(self) -> int:
        if not self.free:
            self._reclaim()
        if not self.free:
            raise OutOfPages("no free KV cache page")
        p = self.free.pop()
        self.refs[p] = 1  # a free page is in no prefix entry
        return p

    def _release(self, p: int) -> None:
        self._ref(p, -1)
        if self.refs[p] == 0:
            self.free.append(p)

    @staticmethod
    def _chain(prev: bytes, page: bytes) -> bytes:
        """The key of a page holding `page` (its ids as int64 bytes) after the page keyed `prev`."""
        return hashlib.blake2b(prev + page, digest_size=16).digest()

    @staticmethod
    def _root(sparse: bool) -> bytes:
        # A prompt of >= dense_len tokens attends sparsely at every position, a shorter one densely: the same
        # tokens hold other keys and values (past the first layer) in the two modes, so pages of one are not
        # shared with the other (a chat's turn growing past dense_len reused its dense prefix: 6e-3 off).
        return b"sparse" if sparse else b""

    def chain(self, tokens: list[int], n_pages: int, sparse: bool = False, known: list[bytes] | None = None,
              ids: np.ndarray | None = None) -> list[bytes]:
        """The prefix keys of the first n_pages whole pages of `tokens` (each names a page's tokens and all
        before them, in one attention mode); known: the keys of its first pages, hashed already. ids: the first
        tokens (all, or the prompt's) as an int64 array: pages in it are hashed from it, and the keys of pages it
        shares with a chain hashed recently are taken from that one (`_recall`)."""
        out = list(known or [])[:n_pages]
        root = self._root(sparse)
        ps = self.page_size
        in_ids = 0 if ids is None else min(n_pages, len(ids) // ps)  # pages held by `ids`
        if in_ids > len(out):
            out = self._recall(root, ids, in_ids, out)
        h = out[-1] if out else root
        for i in range(len(out), n_pages):
            page = ids[i * ps:(i + 1) * ps] if i < in_ids else array("q", tokens[i * ps:(i + 1) * ps])
            h = self._chain(h, page.tobytes())
            out.append(h)
        if in_ids:
            self._remember(root, ids[:in_ids * ps], out[:in_ids])
        return out

    _RECENT = 8  # chains kept by `_remember`

    def _recall(self, root: bytes, ids: np.ndarray, n_pages: int, out: list[bytes]) -> list[bytes]:
        """`out` extended with the keys of the leading pages `ids` shares with a recent chain of the same root
        (up to n_pages): the same tokens after the same root have the same keys, found by comparing ids instead of
        hashing them (a 16K-token page run: ~20 µs against ~0.5 ms)."""
        ps = self.page_size
        best = out
        for r, prev, keys in self._recent:
            m = min(n_pages, len(keys))
            if r != root or m <= len(best):
                continue
            # Past the pages matched so far only: a chain whose key differs at the last of them shares fewer.
            start = len(best)
            if start and keys[start - 1] != best[-1]:
                continue
            diff = np.flatnonzero(prev[start * ps:m * ps] != ids[start * ps:m * ps])
            same = m if diff.size == 0 else start + int(diff[0]) // ps
            if same > len(best):
                best = keys[:same]
        return best

    def _remember(self, root: bytes, ids: np.ndarray, keys: list[bytes]) -> None:
        """Keep (root, ids, keys) first in the recent chains; a kept chain that is a prefix of this one goes."""
        kept = [(r, a, k) for r, a, k in self._recent
                if not (r == root and len(k) <= len(keys) and k[-1:] == keys[len(k) - 1:len(k)])]
        self._recent = [(root, ids, keys)] + kept[:self._RECENT - 1]

    def lookup_chain(self, tokens: list[int], sparse: bool = False, ids: np.ndarray | None = None) -> list[bytes]:
        """The keys `new_sequence` looks up for `tokens`: its whole pages, a token always left to compute. ids: as
        `chain`'s."""
        return self.chain(tokens, (len(tokens) - 1) // self.page_size, sparse, ids=ids)

    def new_sequence(self, tokens: list[int], sparse: bool = False, chain: list[bytes] | None = None
                     ) -> tuple[SeqPages, int]:
        """A sequence whose cache starts with the longest cached prefix of `tokens` (whole pages, leaving at
        least one token to compute) published in the same attention mode (sparse: the prompt is at least
        dense_len long, see `publish`); returns it and how many tokens are already cached. chain: the tokens'
        `lookup_chain`, when the caller has it."""
        ps = self.page_size
        n = (len(tokens) - 1) // ps
        if chain is None:  # hashed here, up to the first page not cached
            chain, h = [], self._root(sparse)
            for i in range(n):
                h = self._chain(h, array("q", tokens[i * ps:(i + 1) * ps]).tobytes())
                if h not in self.prefix:
                    break
                chain.append(h)
        # Page lookups and LRU moves in C loops (map): a 16K-token prefix is 256 pages a request.
        found = list(map(self.prefix.get, chain[:n]))
        k = found.index(None) if None in found else len(found)
        seq = SeqPages(pages=found[:k], length=k * ps)
        for p in seq.pages:
            self._ref(p, 1)
        self._touch(chain[:k])
        return seq, seq.length

    def _touch(self, chain: list[bytes]) -> None:
        """Mark a prefix chain's pages used now, its first page last: reclaiming takes the least recently used
        page first, and a chain cut at its first page loses every later page with it (they are reachable only
        through it), so the deepest pages go first."""
        used, clock = self._used, self._clock
        for p in map(self.prefix.__getitem__, reversed(chain)):
            clock += 1
            used[p] = clock
            if self.refs[p] == 1:  # reclaimable at its new use (the engine holds what it touches)
                self._queue(p)
        self._clock = clock

    def reserve(self, seq: SeqPages, n_tokens: int) -> None:
        """Make room for `n_tokens` more tokens of `seq` (all or nothing)."""
        need = -(-(seq.length + n_tokens) // self.page_size) - len(seq.pages)
        if need > self.num_free:
            raise OutOfPages(f"{need} pages needed, {self.num_free} free")
        for _ in range(need):
            seq.pages.append(self._take())

    def pages_needed(self, seq: SeqPages, n_tokens: int) -> int:
        return max(0, -(-(seq.length + n_tokens) // self.page_size) - len(seq.pages))

    def publish(self, seq: SeqPages, tokens: list[int], sparse: bool = False, known: list[bytes] | None = None
                ) -> None:
        """Offer the sequence's full pages (holding `tokens`) for prefix sharing; sparse: they were computed
        with sparse attention (an InfLLM v2 prompt of at least dense_len tokens); known: as `chain`'s."""
        if not self.prefix_caching:  # nothing published, so `new_sequence` never finds a prefix
            return
        chain = self.chain(tokens, min(len(tokens), seq.length) // self.page_size, sparse, known)
        for i, h in enumerate(chain):
            if h in self.prefix:
                continue
            p = seq.pages[i]
            if self._key[p] is not None:
                # Entered under another key already (the other attention mode: its keys and values are not this
                # one's), and a second entry would hold the page for good (`_evict` drops one): the chain stops,
                # as its later keys are reachable only through this one.
                chain = chain[:i]
                break
            self.prefix[h] = p
            self._ref(p, 1)  # before counting the entry: the sequence holds p, so it is not reclaimable
            self._pubs[p] += 1
            self._key[p] = h
        self._touch(chain)

    def release(self, seq: SeqPages) -> None:
        # Last page first: the free list hands pages out last-in first-out, so the next sequence gets these
        # back in ascending order, consecutive when they were (a lone sequence's keys are then a view).
        for p in reversed(seq.pages):
            self._release(p)
        seq.pages.clear()
        seq.length = 0

    def batch(self, seqs: list[SeqPages], decode: bool = False, width: int | None = None) -> PagedBatch | DecodeBatch:
        """The model's cache view for one step over `seqs`; decode=True: each feeds exactly one token and
        attention runs on the pages in place (CUDA, or the Triton interpreter in tests). width: the decode
        block table's columns (the scratch page past each row's pages; padded on the device, so the host builds
        only the rows' own pages); default the longest row's pages."""
        if decode:
            own = max(len(s.pages) for s in seqs)
            if width is not None and width < own:
                raise ValueError(f"a sequence holds {own} pages, block table width is {width}")
            host = decode_inputs(self, seqs, own, "cpu")
            table, *rest = (t.to(self.device, non_blocking=True) for t in host)
            if width is not None and width > own:
                table = torch.nn.functional.pad(table, (0, width - own), value=self.scratch)
            batch = DecodeBatch(self, table, *rest)
            batch.shared = decode_shared(self, seqs, host[0], host[3], self.device, width)
            return batch
        return PagedBatch(self, seqs)

    def block_table(self, seqs: list[SeqPages], width: int, rows: int | None = None) -> torch.Tensor:
        """int32 [rows (default len(seqs)), width] on the CPU: each sequence's pages, then the scratch page."""
        pad = [self.scratch] * width
        table = []
        for s in seqs:
            if len(s.pages) > width:
                raise ValueError(f"sequence holds {len(s.pages)} pages, block table width is {width}")
            table.append(s.pages + pad[len(s.pages):])
        table += [pad] * ((rows or len(seqs)) - len(seqs))
        return torch.tensor(table, dtype=torch.int32).view(-1, width)


class PagedBatch:
    """The model's cache interface (see cpm4.engine.kv_cache.KVCache) over some sequences of a paged cache;
    attention reads the pages gathered into contiguous tensors."""

    def __init__(self, cache: PagedKVCache, seqs: list[SeqPages]):
        self.cache = cache
        self.seqs = seqs
        dev = cache.device
        self.lens = to_device([s.length for s in seqs], dev, torch.long)
        width = max([len(s.pages) for s in seqs] + [1])
        self.table = to_device(cache.block_table(seqs, width), dev, torch.long)
        self._slots: tuple[torch.Tensor | slice, torch.Tensor | None, tuple[torch.Tensor | slice, int]] | None = None
        self._pool_plan: list[tuple] | None = None
        self._key_slots: dict[tuple[int, int, int, int], torch.Tensor] = {}
        self.memo: dict = {}  # what every layer of the step shares (the attention's index tensors)
        # Each row's whole prompt length when the step continues prompts in chunks (the engine sets it): the
        # attention's dense/sparse switch decides by it, so the chunking does not change the output.
        self.prompt_lens: list[int] | None = None

    def host_lens(self) -> list[int]:
        """Each row's cached length, from the host's page records (`lens` holds the same on the device)."""
        return [s.length for s in self.seqs]

    def shared_groups(self, rows: list[int]) -> list[tuple[list[int], int]]:
        """Among `rows`, the groups (two rows at least) starting with the same cached page (prefix caching's shared
        pages), each with how many leading pages its rows hold in common, each wholly cached before every member's
        new tokens; most keys shared (members x pages) first, [] when no two rows share a page. (`shared_groups`
        over the rows' page lists: a row's cached length counts as its tokens before a current one.)"""
        key = ("shared_groups", tuple(rows))
        if key not in self.memo:
            found = []
            if len(rows) > 1:
                pages = [self.seqs[i].pages for i in rows]
                table = np.full((len(rows), max(map(len, pages))), -1, dtype=np.int64)
                for j, p in enumerate(pages):
                    table[j, :len(p)] = p
                lens = np.array([self.seqs[i].length + 1 for i in rows])
                found = [([rows[j] for j in np.flatnonzero(m)], c)
                         for m, c in shared_groups(table, lens, self.cache.page_size, 1, max_groups=len(rows))]
            self.memo[key] = found
        return self.memo[key]

    def skip_pages(self, group: list[int], n_pages: int) -> int:
        """Pages `write` may leave out of every row's gathered keys when all rows (`group`: the rows of one or more
        `shared_groups`, the whole batch) read their first n_pages (the groups' fewest) through `shared_kv`: none
        when kernel keys are pooled (the pooling reads every row's keys from its first token)."""
        return n_pages if len(set(group)) == len(self.seqs) and self.cache.fine is None else 0

    def shared_kv(self, layer: int, groups: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values [pages * page_size, hkv, d] of each (row, n_pages)'s first n_pages pages (a
        `shared_groups`' rows and pages), one group after the other."""
        key = ("shared_kv", tuple(groups))
        if key not in self.memo:
            own = [p for row, n in groups for p in self.seqs[row].pages[:n]]
            # Consecutive pages (a prefix computed into a fresh cache) are a view; others one gather a layer.
            self.memo[key] = slice(own[0], own[0] + len(own)) if own == list(range(own[0], own[0] + len(own))) \
                else to_device(own, self.cache.device, torch.long)
        pages = self.memo[key]
        if isinstance(pages, slice):
            return self.cache.k[layer][pages].flatten(0, 1), self.cache.v[layer][pages].flatten(0, 1)
        return tuple(x[layer].index_select(0, pages).flatten(0, 1) for x in (self.cache.k, self.cache.v))

    def check_room(self, starts: torch.Tensor, n_new: int, new_lens: torch.Tensor | None = None,
                   host: tuple[list[int], list[int]] | None = None) -> None:
        """`host`: (starts, new_lens) as lists when the caller has them (else new_lens is read here)."""
        # Only real tokens are written (padding is not): each row needs room for its own new tokens.
        if host is not None:
            lens = host[1]
        else:
            lens = new_lens.tolist() if new_lens is not None else [n_new] * len(self.seqs)
        for s, n in zip(self.seqs, lens):
            if n and s.length + n > len(s.pages) * self.cache.page_size:
                raise CacheFullError(f"sequence needs {s.length + n} positions, has "
                                     f"{len(s.pages) * self.cache.page_size} reserved")

    def _slot_of(self, positions: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Flat slot index (page * page_size + offset) of positions [R, T] of the given batch rows."""
        ps = self.cache.page_size
        page_idx = (positions // ps).clamp_max(self.table.shape[1] - 1)
        return torch.gather(self.table[rows], 1, page_idx) * ps + positions % ps

    def _plan(self, starts: torch.Tensor, new_lens: torch.Tensor, t: int, dev: torch.device,
              host: tuple[list[int], list[int]] | None = None):
        """(slots of the real new tokens, their flat indices in the [B * T] new tokens (a slice and None for one
        sequence on consecutive pages without padding), (pages [B, n] holding every row's keys up to the longest
        end, that end)); the same for every layer of a step, so computed
        once, with the lengths read on the host once (a boolean-mask index per layer would wait for the GPU
        every layer)."""
        if self._slots is None:
            b = len(self.seqs)
            self._host = (list(host[0]), list(host[1])) if host is not None else (starts.tolist(), new_lens.tolist())
            real = to_device(Packing.flat_index(self._host[1], t), dev)
            rows = torch.arange(b, device=dev)
            pos = starts[:, None] + torch.arange(t, device=dev)[None, :]
            new_slots = self._slot_of(pos, rows).view(-1)[real]
            end = max(self._host[0]) + t
            n = -(-end // self.cache.page_size)
            own = self.seqs[0].pages[:n] if b == 1 else []
            if own and own == list(range(own[0], own[0] + n)):
                pages = slice(own[0], own[0] + n)  # one sequence on consecutive pages: a view, no gather
                if self._host[1][0] == t:  # and every new token real: their slots are one run, a slice
                    first = own[0] * self.cache.page_size + self._host[0][0]
                    new_slots, real = slice(first, first + t), None
            else:
                pages = self.table[:, :n].contiguous()  # rows past their pages read the scratch page
            self._slots = (new_slots, real, (pages, end))
        return self._slots

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, starts: torch.Tensor, new_lens: torch.Tensor,
              host: tuple[list[int], list[int]] | None = None, skip_pages: int = 0
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the real new tokens, pool the semantic kernels they complete, and return every row's keys
        and values up to the longest end, contiguous (padding reads valid slots, never used). `host`: starts and
        new_lens as lists (read from the device otherwise). skip_pages: the returned keys start after that many
        pages (the `shared_groups` pages every row shares, read through `shared_kv`)."""
        kc = self.cache.k[layer].view(-1, *k.shape[2:])
        vc = self.cache.v[layer].view(-1, *v.shape[2:])
        new_slots, real, (pages, end) = self._plan(starts, new_lens, k.shape[1], k.device, host)
        if real is None:  # one run of slots (`_plan`): plain copies
            kc[new_slots] = k.flatten(0, 1)
            vc[new_slots] = v.flatten(0, 1)
        else:
            kc[new_slots] = k.flatten(0, 1)[real]
            vc[new_slots] = v.flatten(0, 1)[real]
        if skip_pages:
            if isinstance(pages, slice) or self.cache.fine is not None:
                raise ValueError("skip_pages needs several rows and no kernel keys to pool (see shared_groups)")
            pages, end = pages[:, skip_pages:], end - skip_pages * self.cache.page_size
        if self.cache.fine is not None:
            self._pool(layer)
        return self.gather(self.cache.k[layer], pages, end), self.gather(self.cache.v[layer], pages, end)

    def write_packed(self, layer: int, k: torch.Tensor, v: torch.Tensor, host: tuple[list[int], list[int]]
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """`write` for a packed step: k/v [n, hkv, d] hold each row's new tokens end to end (row by row, as
        `Packing` lays them). Stores them, pools the kernels they complete, and returns every row's keys and
        values from its first token packed the same way ([sum of kv_lens, hkv, d], row by row): the new tokens
        themselves when no row has cached ones, else one gather of each row's slots."""
        starts, new_lens = host
        kc = self.cache.k[layer].view(-1, *k.shape[1:])
        vc = self.cache.v[layer].view(-1, *v.shape[1:])
        # (One row: its slots are its tokens in order; `_plan` may make them a slice.)
        new_slots, _, _ = self._plan(self.lens, None, max(new_lens), k.device, host)
        kc[new_slots] = k
        vc[new_slots] = v
        if self.cache.fine is not None:
            self._pool(layer)
        if not any(starts):
            return k, v
        key = ("packed_keys", tuple(starts), tuple(new_lens))
        if key not in self.memo:
            ps = self.cache.page_size
            lens = [s + n for s, n in zip(starts, new_lens)]
            slots = [(np.asarray(sq.pages[:-(-L // ps)], dtype=np.int64)[:, None] * ps + np.arange(ps)).ravel()[:L]
                     for sq, L in zip(self.seqs, lens)]
            self.memo[key] = to_device(np.concatenate(slots), k.device)
        idx = self.memo[key]
        return kc.index_select(0, idx), vc.index_select(0, idx)

    @staticmethod
    def gather(store: torch.Tensor, pages: torch.Tensor | slice, end: int) -> torch.Tensor:
        """[rows, end, hkv, d]: each row's tokens up to `end`, from its whole pages (page-size runs, not one
        index per token); a slice of consecutive pages (one sequence) is a view."""
        if isinstance(pages, slice):
            return store[pages].flatten(0, 1)[None, :end]
        # index_select over the flat page list: on the CPU 1.5-2x faster than indexing with the 2-D table
        # (benchmarks/cpu_engine_decode.py --peer table-gather).
        return store.index_select(0, pages.flatten()).view(pages.shape[0], -1, *store.shape[2:])[:, :end]

    def _pool(self, layer: int) -> None:
        """Pool the kernels ending among each row's new tokens (written already) into the kernel-key pages: per
        store, one gather of their tokens from the cache and one mean (the indices are the same for every
        layer)."""
        if self._pool_plan is None:
            self._pool_plan = self._plan_pool(*self._host, self.cache.device)
        keys = self.cache.k[layer].flatten(0, 1)
        for store, slots, page, slot in self._pool_plan:
            store[layer][page, slot] = keys[slots].mean(dim=1)  # as kernel_means

    def _plan_pool(self, starts: list[int], new_lens: list[int], dev: torch.device) -> list[tuple]:
        """Per kernel-key store with kernels to pool this step: (store, the cache slots of their tokens [P, size],
        physical page [P], slot [P]). Kernels complete within a row's cached tokens were pooled when their last
        token was written."""
        sc = self.cache.config.sparse_config
        stores = [(self.cache.fine, sc.kernel_size, sc.kernel_stride)]
        if self.cache.coarse is not None:
            stores.append((self.cache.coarse, sc.coarse_kernel_size, sc.coarse_kernel_stride))
        plan = []
        for store, size, stride in stores:
            rows, js = [], []
            for i, (s, n) in enumerate(zip(starts, new_lens)):
                lo, hi = num_kernels(s, size, stride), num_kernels(s + n, size, stride)
                rows += [i] * (hi - lo)
                js += range(lo, hi)
            if not js:
                continue
            r = to_device(rows, dev, torch.long)
            j = to_device(js, dev, torch.long)
            page, slot = kernel_page_slots(j, size, stride, self.cache.page_size)
            tokens = j[:, None] * stride + torch.arange(size, device=dev)[None, :]
            ps = self.cache.page_size
            slots = self.table[r[:, None], tokens // ps] * ps + tokens % ps
            plan.append((store, slots, self.table[r, page], slot))
        return plan

    def advance(self, new_lens: torch.Tensor, host: tuple[list[int], list[int]] | None = None) -> None:
        for s, n in zip(self.seqs, new_lens.tolist() if host is None else host[1]):
            s.length += n
        self.lens = self.lens + new_lens.to(self.lens.device)

    def compressed_keys(self, layer: int, seq: int, length: int, sc: SparseConfig
                        ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Semantic-kernel keys of batch row `seq` over its first `length` tokens, read from their pages."""
        k1 = self._kernel_keys(self.cache.fine[layer], seq, length, sc.kernel_size, sc.kernel_stride)
        if sc.variant != "gen-b":
            return k1, None
        return k1, self._kernel_keys(self.cache.coarse[layer], seq, length, sc.coarse_kernel_size,
                                     sc.coarse_kernel_stride)

    def compressed_keys_rows(self, layer: int, seqs: list[int], lengths: list[int], sc: SparseConfig
                             ) -> tuple[torch.Tensor, torch.Tensor | None, list[int], list[int] | None]:
        """`compressed_keys` of several batch rows at once, right-padded: (k1 [R, N1, hkv, d], k2 or None, the
        counts n1, n2) in one gather per store (padding reads a valid slot, never used)."""
        k1, n1 = self._kernel_keys_rows(self.cache.fine[layer], seqs, lengths, sc.kernel_size, sc.kernel_stride)
        if sc.variant != "gen-b":
            return k1, None, n1, None
        k2, n2 = self._kernel_keys_rows(self.cache.coarse[layer], seqs, lengths, sc.coarse_kernel_size,
                                        sc.coarse_kernel_stride)
        return k1, k2, n1, n2

    def _kernel_keys_rows(self, store: torch.Tensor, seqs: list[int], lengths: list[int], size: int, stride: int
                          ) -> tuple[torch.Tensor, list[int]]:
        counts = [num_kernels(n, size, stride) for n in lengths]
        key = (tuple(seqs), tuple(lengths), size, stride)
        idx = self._key_slots.get(key)
        if idx is None:  # the same for every layer of the step
            width = max(counts + [1])
            j = torch.arange(width, device=store.device)
            page, slot = kernel_page_slots(j, size, stride, self.cache.page_size)
            page = page.clamp_max(self.table.shape[1] - 1)  # past a row's kernels: some valid page
            rows = to_device(seqs, store.device)
            idx = self._key_slots[key] = (self.table[rows[:, None], page[None, :]] * store.shape[1] + slot).flatten()
        return store.flatten(0, 1).index_select(0, idx).view(len(seqs), -1, *store.shape[2:]), counts

    def _kernel_keys(self, store: torch.Tensor, seq: int, length: int, size: int, stride: int) -> torch.Tensor:
        # The flat slots are the same for every layer of the step: computed on the first layer only.
        key = (seq, length, size, stride)
        idx = self._key_slots.get(key)
        if idx is None:
            j = torch.arange(num_kernels(length, size, stride), device=store.device)
            page, slot = kernel_page_slots(j, size, stride, self.cache.page_size)
            idx = self._key_slots[key] = self.table[seq, page] * store.shape[1] + slot
        return store.flatten(0, 1).index_select(0, idx)


def decode_rows(cache: PagedKVCache, seqs: list[SeqPages], rows: int | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row tensors of a decode step on the CPU: starts (cache lengths before the token) int64, the new
    token's slot int64, lengths after it int32. Rows past len(seqs) (up to `rows`) use the scratch page."""
    pad = (rows or len(seqs)) - len(seqs)
    ps = cache.page_size
    starts = torch.tensor([s.length for s in seqs] + [0] * pad, dtype=torch.long)
    slots = torch.tensor([s.pages[s.length // ps] * ps + s.length % ps for s in seqs] + [cache.scratch * ps] * pad,
                         dtype=torch.long)
    return starts, slots, (starts + 1).to(torch.int32)


# Cascade decode (`cpm4.kernels.infllm_v2.triton_cascade`): the leading pages that groups of a decode step's dense
# rows share (each at least CASCADE_DECODE_MIN_TOKENS; up to CASCADE_DECODE_GROUPS groups, most reads saved first:
# several system prompts, or the `n` samples of several long prompts) are read once per tile of rows, not once per
# row. Dense rows: every row of a dense model, an InfLLM v2 model's rows below dense_len. The groups are used only
# when their members x shared tokens reach CASCADE_DECODE_MIN_READS together: below that the shared kernel's launch
# and the separate merge cost more than the reads saved; with more than 8 query heads a KV head the break-even is
# higher, 1.5x those reads (`cascade_min_reads`; H200, `cascade_decode.py --batches 16 32 48 64 96 --prefixes 2048
# 4096 8192`: the 0.5B shape 0.96-0.97x at 65K reads, 1.25-1.32x from 98K; the 8B shape 0.89-0.94x at 131K,
# 1.15-1.18x at 196K). Steps without groups run the plain decode (its own graphs). Measured end to end: one group,
# benchmarks/RESULTS.md "Twenty-first GPU pass"; two system prompts (both groups against the larger alone:
# 1.10-1.16x the offline row), "Twenty-eighth GPU pass".
CASCADE_DECODE = True
CASCADE_DECODE_MIN_TOKENS = 1024
CASCADE_DECODE_MIN_READS = 131072
CASCADE_DECODE_GROUPS = 4


def cascade_min_reads(config: MiniCPM4Config) -> int:
    """The members x shared tokens a step's groups must save for cascade decode, for this model's head layout."""
    wide = config.num_attention_heads > 8 * config.num_key_value_heads
    return CASCADE_DECODE_MIN_READS * 3 // 2 if wide else CASCADE_DECODE_MIN_READS


def cascade_on(cache: PagedKVCache) -> bool:
    """Whether decode steps over `cache` may use cascade decode: the engine's choice (`cache.cascade_decode`), else
    CASCADE_DECODE; never for an InfLLM v2 model without dense rows (dense_len < 0)."""
    on = CASCADE_DECODE if cache.cascade_decode is None else cache.cascade_decode
    return on and dense_rows_below(cache.config) is not False


_CASCADE_LIVE = True  # see cascade_paused

# Decode steps whose rows are all below an InfLLM v2 model's dense_len (every row attends all its pages) through the
# dense paged decode, the new keys stored and their kernel keys pooled inside its attention launch: two launches a
# layer (attention, merge) where the sparse step takes four (LSE with the store, scores, attention, merge). Such
# steps replay a graph of their own per bucket (`DecodeGraphs`). Off until measured on the GPU.
DENSE_STEPS = False
_DENSE_STEP = False  # see dense_step


@contextmanager
def dense_step():
    """Inside, decode steps of an InfLLM v2 cache take the dense paged decode: the caller vouches that every row
    is below dense_len (the graphs captured in here are replayed only for such steps)."""
    global _DENSE_STEP
    before, _DENSE_STEP = _DENSE_STEP, True
    try:
        yield
    finally:
        _DENSE_STEP = before


@contextmanager
def cascade_paused():
    """Inside, decode steps ignore their batch's shared prefix (each row reads all of its pages): a compiled
    decode step passes the shared buffers to its paged-attention op in both of a bucket's graphs, so one
    compilation serves both, and its plain graph is captured in here."""
    global _CASCADE_LIVE
    before, _CASCADE_LIVE = _CASCADE_LIVE, False
    try:
        yield
    finally:
        _CASCADE_LIVE = before


def cascade_groups(table: np.ndarray, lens: np.ndarray, page: int, max_len: int | None = None,
                   max_groups: int | None = None, min_reads: int | None = None
                   ) -> tuple[np.ndarray, list[int]] | None:
    """`shared_groups` with cascade decode's limits: (member [b] int32, k + 1 for a row of group k, 0 for none;
    the groups' shared page counts) of at most max_groups (default CASCADE_DECODE_GROUPS) groups worth attending
    once, or None."""
    found = shared_groups(table, lens, page, CASCADE_DECODE_MIN_TOKENS // page, max_len,
                          CASCADE_DECODE_GROUPS if max_groups is None else max_groups)
    reads = CASCADE_DECODE_MIN_READS if min_reads is None else min_reads
    if not found or sum(int(m.sum()) * p for m, p in found) * page < reads:
        return None
    member = np.zeros(len(lens), dtype=np.int32)
    for k, (m, _) in enumerate(found):
        member[m] = k + 1
    return member, [p for _, p in found]


def shared_groups(table: np.ndarray, lens: np.ndarray, page: int, min_pages: int, max_len: int | None = None,
                  max_groups: int = 1) -> list[tuple[np.ndarray, int]]:
    """The groups of rows (two at least) holding the same first page, as (member mask [b], shared pages p): the
    members' common leading run of p >= min_pages pages, each member's current token after it; most tokens read
    once (members x p) first, at most max_groups. table [b, w] (columns past a row's pages may hold anything:
    only whole pages before each member's current token are compared); lens [b]: each row's tokens, the current
    one included; max_len: rows of that many tokens or more stay out (an InfLLM v2 model's sparse rows)."""
    min_pages = max(1, min_pages)
    ok = lens > page * min_pages
    if max_len is not None:
        ok &= lens < max_len
    if ok.sum() < 2:
        return []
    col0 = table[:, 0]
    firsts = col0[ok]
    if (firsts == firsts[0]).all():  # every row after one prefix, the usual case, skips the count
        values = firsts[:1]
    else:
        values, counts = np.unique(firsts, return_counts=True)
        values = values[counts >= 2]
    found = []
    for v in values:
        member = ok & (col0 == v)
        limit = int(((lens[member] - 1) // page).min())  # whole pages before every member's current token
        block = table[member, :limit]
        same = (block == block[0]).all(0)
        p = int(np.argmin(same)) if not same.all() else limit
        if p >= min_pages:
            found.append((member, p))
    found.sort(key=lambda g: -int(g[0].sum()) * g[1])
    return found[:max_groups]


def dense_rows_below(config: MiniCPM4Config) -> int | None | bool:
    """Cascade decode's limit on row lengths: None (a dense model: no limit), an InfLLM v2 model's dense_len,
    or False (no dense rows: dense_len < 0)."""
    sc = config.sparse_config
    if sc is None:
        return None
    return sc.dense_len if sc.dense_len >= 0 else False


def decode_shared(cache: PagedKVCache, seqs: list[SeqPages], table: torch.Tensor, lens: torch.Tensor,
                  device: torch.device | str, width: int | None = None):
    """The `SharedPrefix` of a decode step over `seqs` (eager steps; captured graphs fill buffers instead),
    or None: cascade decode off, no dense rows, or no group. table [b, w] int32 and lens [b] on the host;
    width: the groups' page lists padded to that many (the step's block table width: its split count follows
    the lists' length, as in the graphs' buffer)."""
    if len(seqs) < 2 or not cascade_on(cache):
        return None
    below = dense_rows_below(cache.config)
    from cpm4.kernels.infllm_v2.triton_cascade import SharedPrefix

    found = cascade_groups(table.numpy(), lens.numpy(), cache.page_size, below,
                           min_reads=cascade_min_reads(cache.config))
    if found is None:
        return None
    member, counts = found
    pages = table[[int(np.argmax(member == k + 1)) for k in range(len(counts))]].clone()
    if width is not None and width > pages.shape[1]:
        pages = torch.nn.functional.pad(pages, (0, width - pages.shape[1]), value=cache.scratch)
    member = torch.from_numpy(member)
    # Through pinned memory: an eager decode step's inputs are built while the step before may still run.
    return SharedPrefix(to_device(pages, device), to_device(counts, device, torch.int32), to_device(member, device),
                        to_device(SharedPrefix.row_order(member), device))


def decode_inputs(cache: PagedKVCache, seqs: list[SeqPages], width: int, device: torch.device | str,
                  rows: int | None = None) -> tuple[torch.Tensor, ...]:
    """Tensors of a decode step (one new token per sequence, pages reserved): block table int32 [R, width],
    then `decode_rows`' starts, slots and ends, on `device`."""
    table = cache.block_table(seqs, width, rows)
    return tuple(t.to(device, non_blocking=True) for t in (table, *decode_rows(cache, seqs, rows)))


class HostBlockTable:
    """A block table [rows, width] kept on the host and updated in place for the decode steps of captured
    graphs: rebuilding it from Python lists every step cost 8 ms at 256 rows x 512 pages (0.6 ms for one row
    of 2049 pages). Row i holds the first `counts[i]` pages of sequence `owners[i]`; a running sequence's
    page list only grows, so a step writes only the pages added since the last one, and a sequence that moved
    to another row (the rows after one that ended shift up) is copied over from its old row in one tensor
    operation for all such rows. Columns past a row's pages keep older page ids (always valid pages): the
    kernels read only the pages below each row's length."""

    def __init__(self, rows: int, width: int, scratch: int):
        self.width, self.scratch = width, scratch
        self.table = torch.full((rows, width), scratch, dtype=torch.int32)
        # Rows written through a numpy view of the same memory: a slice set from a list costs ~0.5 µs there
        # against ~7 µs through torch.tensor (new rows of every step with prompts beside the graphs' rows).
        self._rows = self.table.numpy()
        self.owners: list[SeqPages | None] = [None] * rows
        self.counts: list[int] = [0] * rows
        # Whether the last update put another sequence in some row (rows that only grew do not count): what
        # depends on the rows' leading pages alone (cascade decode's group) holds while it stays False.
        self.replaced = True

    def reset(self) -> None:
        self.replaced = True
        self.table.fill_(self.scratch)
        self.owners = [None] * len(self.owners)
        self.counts = [0] * len(self.counts)

    def update(self, seqs: list[SeqPages], rows: int) -> int:
        """Rows [0, rows) up to date for `seqs` (rows past them: padding on the scratch page); returns the
        number of columns in use."""
        owners, counts, table, rows_np = self.owners, self.counts, self.table, self._rows
        cols = 1
        changed = []  # rows whose sequence is not the one they hold
        for i, s in enumerate(seqs):
            k = len(s.pages)
            if k > cols:
                cols = k
                if k > self.width:
                    raise ValueError(f"sequence holds {k} pages, block table width is {self.width}")
            if owners[i] is s:
                n = counts[i]
                if n == k:
                    continue
                if n < k:
                    rows_np[i, n:k] = s.pages[n:k]
                    counts[i] = k
                    continue
            changed.append(i)
        if changed:
            # Where each sequence sat before this update (rows past `rows` included: they are untouched).
            where = {id(o): r for r, o in enumerate(owners) if o is not None}
            dst, src, writes = [], [], []
            for i in changed:
                s = seqs[i]
                r = where.get(id(s))
                if r is not None and owners[r] is s and counts[r] <= len(s.pages):
                    dst.append(i)
                    src.append(r)
                    writes.append((i, counts[r]))
                else:
                    writes.append((i, 0))
            if dst:  # one gather for every moved row (the source rows are read before any is written)
                table[dst] = table[src]
            for i, n in writes:
                s = seqs[i]
                k = len(s.pages)
                if k > n:
                    rows_np[i, n:k] = s.pages[n:k]
                owners[i], counts[i] = s, k
        self.replaced = bool(changed)
        for i in range(len(seqs), rows):
            if owners[i] is not None:
                table[i, 0] = self.scratch
                owners[i], counts[i] = None, 0
                self.replaced = True
        return cols


class DecodeBatch:
    """A decode step over the pages in place: each row feeds one token. Attention is the paged Triton
    decode (InfLLM v2 above dense_len), kernel keys are pooled on the device; nothing here synchronises with
    the host. Sequence lengths are advanced by the caller (a graph replay runs no Python)."""

    decoding = True

    def __init__(self, cache: PagedKVCache, table: torch.Tensor, starts: torch.Tensor, slots: torch.Tensor,
                 ends: torch.Tensor, shared=None):
        self.cache = cache
        self.table, self.lens, self.slots, self.ends = table, starts, slots, ends
        self.shared = shared  # a triton_cascade.SharedPrefix (cascade decode) or None

    def check_room(self, starts: torch.Tensor, n_new: int, new_lens: torch.Tensor | None = None,
                   host: tuple[list[int], list[int]] | None = None) -> None:
        pass  # pages were reserved by the scheduler before the step

    def advance(self, new_lens: torch.Tensor, host: tuple[list[int], list[int]] | None = None) -> None:
        pass

    def decode(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        """q [B, 1, hq, d], k/v [B, 1, hkv, d] of the new tokens -> attention output [B, 1, hq, d]."""
        return paged_attention(self, layer, q, k, v, scale)


def _paged_attention(batch: DecodeBatch, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     scale: float) -> torch.Tensor:
    """DecodeBatch.decode: store the new keys/values, pool the kernels they complete, attend on the pages."""
    from cpm4.kernels.infllm_v2 import triton_decode
    from cpm4.kernels.infllm_v2.triton_decode import append_kv, paged_decode, paged_sparse_decode

    c = batch.cache
    kc, vc = c.k[layer], c.v[layer]
    sc = c.config.sparse_config
    fine = c.fine[layer] if sc is not None else None
    coarse = c.coarse[layer] if sc is not None and c.coarse is not None else None
    shared = batch.shared if _CASCADE_LIVE else None
    if sc is None and q.shape[0] <= triton_decode.FUSE_DENSE_STORE_ROWS:
        out = paged_decode(q[:, 0], kc, vc, batch.table, batch.ends, scale=scale, shared=shared,
                           new_kv=(k[:, 0], v[:, 0], batch.slots))
    elif sc is None:
        append_kv(k[:, 0], v[:, 0], kc, vc, batch.slots, batch.table, batch.ends, None, None, None)
        out = paged_decode(q[:, 0], kc, vc, batch.table, batch.ends, scale=scale, shared=shared)
    elif _DENSE_STEP:  # every row below dense_len (`dense_step`): all pages, the kernel keys pooled in the launch
        out = paged_decode(q[:, 0], kc, vc, batch.table, batch.ends, scale=scale, shared=shared,
                           new_kv=(k[:, 0], v[:, 0], batch.slots), kernel_keys=(fine, coarse, sc))
    else:
        # The store and pooling run inside the sparse step's first launch (H200, 128K: 40 vs 42 µs per layer).
        out = paged_sparse_decode(q[:, 0], kc, vc, batch.table, batch.ends, fine, coarse, sc, scale,
                                  new_kv=(k[:, 0], v[:, 0], batch.slots), shared=shared)
    return out[:, None]


paged_attention = _paged_attention



def _traced_paged_attention(batch: DecodeBatch, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            scale: float) -> torch.Tensor:
    sh = batch.shared
    shared = (sh.pages, sh.count, sh.member, sh.order) if sh is not None else (None,) * 4
    return torch.ops.cpm4.paged_attention(q, k, v, batch.table, batch.lens, batch.slots, batch.ends,
                                          batch.cache.uid, layer, scale, *shared)


def make_opaque_to_compile() -> None:
    """Make the paged attention one opaque custom op for torch.compile (it would otherwise trace into the
    Triton kernels), so the whole decode step compiles as one graph: no graph break per layer, no
    recompilation per layer index, norms/rope/residuals fused across layer boundaries. The op writes the
    new keys/values and kernel keys into the cache it names; the traced step never reads the cache, so that
    side effect needs no declaring. Called by whoever compiles the decode step (registration imports
    torch.library's custom-op machinery: not at import)."""
    global paged_attention
    if paged_attention is _traced_paged_attention:
        return
    if not hasattr(torch.ops.cpm4, "paged_attention"):
        @torch.library.custom_op("cpm4::paged_attention", mutates_args=())
        def _op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, table: torch.Tensor, starts: torch.Tensor,
                slots: torch.Tensor, ends: torch.Tensor, cache_id: int, layer: int, scale: float,
                shared_pages: torch.Tensor | None = None, shared_count: torch.Tensor | None = None,
                member: torch.Tensor | None = None, order: torch.Tensor | None = None) -> torch.Tensor:
            from cpm4.kernels.infllm_v2.triton_cascade import SharedPrefix

            shared = SharedPrefix(shared_pages, shared_count, member, order) if shared_pages is not None else None
            batch = DecodeBatch(_CACHES[cache_id], table, starts, slots, ends, shared)
            return _paged_attention(batch, layer, q, k, v, scale)

        @_op.register_fake
        def _(q, k, v, table, starts, slots, ends, cache_id, layer, scale, shared_pages=None, shared_count=None,
              member=None, order=None):
            return torch.empty_like(q)
    paged_attention = _traced_paged_attention
