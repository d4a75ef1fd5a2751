"""Seeded random walks over `PagedKVCache` driven the way `cpm4.engine.scheduler.LLMEngine` drives it: requests
admitted on shared prefixes (sparse and dense prompts keyed apart), prompts prefilled in chunks and outputs
decoded through `PagedBatch.write`/`advance`, prompts published once complete, requests preempted when pages
run out and readmitted from prompt + output, finished and aborted. After every operation the cache is checked
against a plain-Python model of who holds which page, which prefixes are published (in least recently used
order) and what each page holds; the keys and values read back (shared prefix pages included) and, for
InfLLM v2, the pooled kernel keys must be those the sequence's own tokens give."""

import hashlib
import random
from collections import deque
from dataclasses import dataclass

import pytest
import torch

from cpm4.engine.paged import OutOfPages, PagedKVCache, SeqPages
from cpm4.kernels.infllm_v2 import compress_keys
from cpm4.model import preset

LAYERS = 2


@pytest.fixture(autouse=True)
def one_thread():
    # Thousands of tiny tensor ops: waking a second intra-op thread for each cost 20x the work on a busy
    # 2-core machine.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def token_values(sparse: bool, tokens: list[int]) -> list[int]:
    """The value every position's key encodes: a hash of the attention mode and all tokens up to it, so a
    page's contents tell which prefix (and mode) wrote them. 40 bits: exact in float64 with small offsets."""
    h = b"sparse" if sparse else b"dense"
    out = []
    for t in tokens:
        h = hashlib.blake2b(h + t.to_bytes(4, "little"), digest_size=8).digest()
        out.append(int.from_bytes(h, "little") >> 24)
    return out


@dataclass(eq=False)
class Req:
    tokens: list[int]  # prompt, then output
    prompt_len: int
    sparse: bool
    max_new: int
    seq: SeqPages | None = None
    computed: int = 0

    @property
    def generated(self) -> int:
        return len(self.tokens) - self.prompt_len


class Walk:
    """The cache, the requests as the scheduler holds them, and the model the cache is checked against."""

    def __init__(self, seed: int, sparse_config: bool):
        self.rng = random.Random(seed)
        if sparse_config:  # InfLLM v2: pages of one block (16), kernel keys pooled beside them
            self.config = preset("tiny", num_hidden_layers=LAYERS)
            self.ps = self.config.sparse_config.block_size
        else:  # dense: any page size; small pages make many pages per prompt
            self.config = preset("tiny", num_hidden_layers=LAYERS, sparse_config=None)
            self.ps = 4
        self.num_pages = self.rng.randint(6, 14)
        self.cache = PagedKVCache(self.config, self.num_pages, self.ps, dtype=torch.float64)
        hkv, d = self.config.num_key_value_heads, self.config.dim_head
        self.offsets = torch.arange(LAYERS * hkv * d, dtype=torch.float64).view(LAYERS, hkv, d)
        self.max_batch = self.rng.randint(2, 5)
        # Half the walks admit whatever fits the batch, as if admission ignored pages: reserves then run out
        # of pages for whole chunks, and requests are preempted and readmitted with output often.
        self.greedy = self.rng.random() < 0.5
        self.running: list[Req] = []
        self.waiting: deque[Req] = deque()
        self.prompts: list[tuple[list[int], bool]] = []  # earlier prompts, to draw shared prefixes from
        # The model: published prefixes (mode, tokens up to the page's end) -> page, and the operation that
        # last used each (published it, or found it for a new sequence: (operation, -depth), so within one
        # operation a chain's deepest page counts as the least recently used, and is reclaimed before the pages
        # it hangs from); what each page holds (the prefix whose last page it is, once written full; None:
        # nothing complete since it was handed out).
        self.pub: dict[tuple[bool, tuple[int, ...]], int] = {}
        self.used: dict[tuple[bool, tuple[int, ...]], tuple[int, int]] = {}
        self.clock = 0
        self.content: dict[int, tuple[bool, tuple[int, ...]] | None] = {}
        self.ops: list[str] = []  # the operations so far, for the failure message

    # ---- expected contents ----
    def kv(self, layer: int, values: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        k = torch.tensor(values, dtype=torch.float64)[:, None, None] + self.offsets[layer]
        return k, -k

    def key(self, req: Req, i: int) -> tuple[bool, tuple[int, ...]]:
        return req.sparse, tuple(req.tokens[:(i + 1) * self.ps])

    def live(self) -> list[Req]:
        return [r for r in [*self.running, *self.waiting] if r.seq is not None]

    # ---- requests ----
    def new_prompt(self) -> tuple[list[int], bool]:
        rng, ps = self.rng, self.ps
        if self.prompts and rng.random() < 0.75:
            base, sparse = rng.choice(self.prompts)
            # Cut at a page boundary, or just off one (a prompt of whole pages leaves its last one to compute).
            cut = min(len(base), rng.choice([rng.randrange(0, 4) * ps + rng.choice([-1, 0, 0, 1]), len(base)]))
            tokens = base[:max(cut, 0)] + [rng.randrange(5) for _ in range(rng.choice([0, 0, 1, ps, 2 * ps + 3]))]
            sparse = sparse if rng.random() < 0.8 else not sparse  # the same tokens in the other mode
        else:
            n = rng.randint(1, 5) * ps if rng.random() < 0.3 else rng.randint(1, 5 * ps)  # whole pages often
            tokens = [rng.randrange(5) for _ in range(n)]
            sparse = rng.random() < 0.5
        tokens = tokens[:(self.num_pages - 1) * ps] or [rng.randrange(5)]  # the whole prompt fits the cache
        self.prompts.append((tokens, sparse))
        return tokens, sparse

    def add_request(self) -> None:
        tokens, sparse = self.new_prompt()
        self.waiting.append(Req(list(tokens), len(tokens), sparse, self.rng.randint(1, 2 * self.ps)))
        self.ops.append(f"add len={len(tokens)} sparse={sparse}")

    def new_sequence(self, req: Req) -> None:
        """`cache.new_sequence`, checked: it shares exactly the longest chain of published full pages of the
        request's tokens in its mode, leaving at least one token to compute."""
        ps = self.ps
        want = []
        self.clock += 1
        for i in range((len(req.tokens) - 1) // ps):
            p = self.pub.get(self.key(req, i))
            if p is None:
                break
            want.append(p)
            self.used[self.key(req, i)] = (self.clock, -i)
        req.seq, req.computed = self.cache.new_sequence(req.tokens, req.sparse)
        assert req.seq.pages == want, "shared pages are not the published prefix chain"
        assert req.computed == req.seq.length == len(want) * ps < len(req.tokens)
        for i, p in enumerate(want):
            assert self.content[p] == self.key(req, i), "a shared page holds another prefix or mode"
        self.ops.append(f"new_sequence len={len(req.tokens)} sparse={req.sparse} -> computed {req.computed}")

    def pages_to_admit(self, new: Req) -> int:
        # As LLMEngine._pages_to_admit.
        held = sum(self.cache.pages_needed(r.seq, len(r.tokens) - r.computed) for r in [new, *self.running]
                   if r.seq is not None and (r is new or len(r.tokens) - r.computed > 1))
        return held + len(self.running)

    def admit(self) -> None:
        # As LLMEngine._admit.
        while self.waiting and len(self.running) < self.max_batch:
            req = self.waiting[0]
            self.new_sequence(req)
            self.check()
            need = self.pages_to_admit(req)
            assert self.cache.has_free(need) == (need <= self.expected_free())
            if self.running and not self.greedy and not self.cache.has_free(need):
                self.release(req)
                self.ops.append("not admitted")
                break
            self.waiting.popleft()
            self.running.append(req)

    def release(self, req: Req) -> None:
        self.cache.release(req.seq)
        assert req.seq.pages == [] and req.seq.length == 0
        req.seq, req.computed = None, 0

    def preempt(self, req: Req) -> None:
        self.release(req)
        self.running.remove(req)
        self.waiting.appendleft(req)
        self.ops.append(f"preempt len={len(req.tokens)}")

    def finish(self, req: Req, why: str) -> None:
        if req.seq is not None:
            self.release(req)
        if req in self.running:
            self.running.remove(req)
        if req in self.waiting:
            self.waiting.remove(req)
        self.ops.append(f"finish ({why}) len={len(req.tokens)}")

    def expected_free(self) -> int:
        held = {p for r in self.live() for p in r.seq.pages}
        return self.num_pages - len(held)

    # ---- pages ----
    def reserve(self, req: Req, n: int) -> None:
        """`cache.reserve`, checked: all or nothing, free pages first, then published pages nobody holds,
        least recently used first, which stop being published (their contents are about to change)."""
        seq = req.seq
        need = self.cache.pages_needed(seq, n)
        assert need == max(0, -(-(seq.length + n) // self.ps) - len(seq.pages))
        held = {p for r in self.live() for p in r.seq.pages}
        free = [p for p in range(self.num_pages) if p not in held and p not in self.pub.values()]
        reclaimable = [k for k, p in self.pub.items() if p not in held]
        before = list(seq.pages)
        try:
            self.cache.reserve(seq, n)
        except OutOfPages:
            assert need > len(free) + len(reclaimable), "OutOfPages with enough free or reclaimable pages"
            assert seq.pages == before, "a failed reserve kept pages"
            self.check()
            raise
        assert need <= len(free) + len(reclaimable), "reserve took more pages than were free"
        new = seq.pages[len(before):]
        assert seq.pages[:len(before)] == before and len(new) == need
        n_reclaimed = max(0, need - len(free))
        assert set(new[:need - n_reclaimed]) <= set(free), "a free page was left while a published one was taken"
        by_page = {self.pub[k]: k for k in reclaimable}
        for p in new[need - n_reclaimed:]:
            assert p in by_page, "a page taken was neither free nor a published page nobody holds"
            k = by_page.pop(p)
            assert self.used[k] == min([self.used[k], *(self.used[o] for o in by_page.values())]), \
                "a published page was reclaimed before a less recently used one"
            del self.pub[k], self.used[k]
        for p in new:
            self.content[p] = None
        self.ops.append(f"reserve {n} (len={len(req.tokens)}, at {seq.length}): {need} pages, "
                        f"{n_reclaimed} reclaimed")

    def plan(self) -> list[tuple[Req, int]]:
        # As LLMEngine._plan: a token budget for prompt chunks, preempting the latest admitted when pages run out.
        budget = self.rng.choice([1, 3, self.ps, 2 * self.ps + 1, 6 * self.ps])
        feeds = []
        for req in list(self.running):
            if req.seq is None:
                continue
            n = len(req.tokens) - req.computed
            if n > 1:
                n = min(n, max(budget, 1))
                budget -= n
            while True:
                try:
                    self.reserve(req, n)
                    break
                except OutOfPages:
                    victim = self.running[-1]
                    if victim is req and len(self.running) == 1:
                        self.finish(req, "length")
                        break
                    self.preempt(victim)
                    self.check()
                    feeds = [(r, k) for r, k in feeds if r is not victim]
                    if victim is req:
                        break
            if req.seq is not None:
                feeds.append((req, n))
        return feeds

    def run(self, group: list[tuple[Req, int]]) -> None:
        """One forward over `group` as the model does it: room checked, every layer's new keys/values written
        (padding rows carry garbage that must not land anywhere), lengths advanced."""
        seqs = [r.seq for r, _ in group]
        batch = self.cache.batch(seqs)
        starts = batch.lens.clone()
        assert starts.tolist() == [r.computed for r, _ in group]
        new_lens = torch.tensor([n for _, n in group])
        t = max(n for _, n in group)
        batch.check_room(starts, t, new_lens)
        for layer in range(LAYERS):
            k = torch.full((len(group), t, *self.offsets.shape[1:]), float("nan"), dtype=torch.float64)
            v = k.clone()
            for i, (r, n) in enumerate(group):
                k[i, :n], v[i, :n] = self.kv(layer, token_values(r.sparse, r.tokens)[r.computed:r.computed + n])
            k_all, v_all = batch.write(layer, k, v, starts, new_lens)
            for i, (r, n) in enumerate(group):  # what attention reads: the whole sequence so far
                ek, ev = self.kv(layer, token_values(r.sparse, r.tokens[:r.computed + n]))
                assert torch.equal(k_all[i, :r.computed + n], ek) and torch.equal(v_all[i, :r.computed + n], ev)
        batch.advance(new_lens)
        for r, n in group:
            full_before = r.computed // self.ps
            r.computed += n
            for i in range(full_before, r.computed // self.ps):  # pages written full this step
                self.content[r.seq.pages[i]] = self.key(r, i)
        self.ops.append(f"run {[(len(r.tokens), r.computed - n, n) for r, n in group]}")

    def sample(self, req: Req) -> None:
        # As LLMEngine._run/_emit: a complete prompt is published, then a token is sampled.
        if req.generated == 0:
            self.cache.publish(req.seq, req.tokens[:req.prompt_len], req.sparse)
            self.clock += 1
            for i in range(min(req.prompt_len, req.seq.length) // self.ps):
                if self.key(req, i) not in self.pub:  # a prefix published already stays on its page
                    self.pub[self.key(req, i)] = req.seq.pages[i]
                self.used[self.key(req, i)] = (self.clock, -i)  # used now, either way
            self.ops.append(f"publish len={req.prompt_len} sparse={req.sparse}")
        req.tokens.append(self.rng.randrange(5))
        if req.generated >= req.max_new:
            self.finish(req, "max_tokens")

    def step(self) -> None:
        for _ in range(self.rng.choice([0, 0, 1, 2])):
            self.add_request()
        if self.running and self.rng.random() < 0.05:
            self.finish(self.rng.choice(self.running), "abort")
        if self.waiting and self.rng.random() < 0.03:
            self.finish(self.rng.choice(self.waiting), "abort waiting")
        if len(self.running) > 1 and self.rng.random() < 0.05:  # as when a later step runs out of pages
            self.preempt(self.running[-1])
        self.check()
        self.admit()
        self.check()
        feeds = self.plan()
        self.check()
        if not feeds:
            return
        # The engine runs decode rows and prefill rows as separate forwards; here a random split.
        cut = self.rng.randint(0, len(feeds))
        for group, later in ((feeds[:cut], feeds[cut:]), (feeds[cut:], [])):
            if group:
                if self.rng.random() < 0.3:  # rows sitting the forward out (no new tokens) among them
                    group = group + [(r, 0) for r, _ in later]
                    self.rng.shuffle(group)
                self.run(group)
                self.check()
        for r, _ in feeds:
            if r.computed == len(r.tokens):
                self.sample(r)
        self.check()

    # ---- invariants ----
    def check(self) -> None:
        c, ps = self.cache, self.ps
        live = self.live()
        holders: dict[int, list[tuple[Req, int]]] = {}
        for r in live:
            assert len(set(r.seq.pages)) == len(r.seq.pages), "a sequence holds a page twice"
            assert r.seq.length == r.computed <= len(r.seq.pages) * ps
            for i, p in enumerate(r.seq.pages):
                holders.setdefault(p, []).append((r, i))
        published = list(self.pub.values())
        assert len(set(published)) == len(published), "a page published under two prefixes"
        assert sorted(c.prefix.values()) == sorted(published), "published pages differ from the model's"
        pub_by_page = {p: k for k, p in self.pub.items()}
        for p, hs in holders.items():
            if len(hs) > 1:  # shared: only a published prefix page, at the same place of the same prefix
                assert p in pub_by_page, f"page {p} held by {len(hs)} sequences but not a published prefix"
                for r, i in hs:
                    assert self.key(r, i) == pub_by_page[p], "a shared page holds another prefix or mode"
            for r, i in hs:
                if i >= r.seq.length // ps:  # a page still being written: the writer's own
                    assert len(hs) == 1 and p not in pub_by_page, "a page being written is shared or published"
                else:
                    assert self.content[p] == self.key(r, i), "a full page holds another prefix"
        for p in range(self.num_pages):
            assert c.refs[p] == len(holders.get(p, [])) + (p in pub_by_page), f"refs of page {p}"
        free = [p for p in range(self.num_pages) if p not in holders and p not in pub_by_page]
        assert len(set(c.free)) == len(c.free) and sorted(c.free) == free, "free list"
        n_free = self.num_pages - len(holders)  # pages only published count as free: reclaimable
        assert c.num_free == n_free
        for n in (0, 1, n_free - 1, n_free, n_free + 1):
            assert c.has_free(n) == (n <= n_free)
        # Contents: every held sequence reads its own tokens' keys/values, and a published page nobody holds
        # still holds its prefix (it is published only while not handed out again).
        for layer in range(LAYERS):
            for r in live:
                if r.seq.length:
                    pages = torch.tensor(r.seq.pages)
                    ek, ev = self.kv(layer, token_values(r.sparse, r.tokens[:r.seq.length]))
                    assert torch.equal(c.k[layer][pages].flatten(0, 1)[:r.seq.length], ek)
                    assert torch.equal(c.v[layer][pages].flatten(0, 1)[:r.seq.length], ev)
            for (sparse, tokens), p in self.pub.items():
                if p not in holders:
                    ek, ev = self.kv(layer, token_values(sparse, list(tokens))[-ps:])
                    assert torch.equal(c.k[layer][p], ek) and torch.equal(c.v[layer][p], ev)
        sc = self.config.sparse_config
        if sc is not None:  # kernel keys of shared pages were pooled once, by their first writer
            for r in live:
                if r.seq.length >= sc.kernel_size:
                    batch = c.batch([r.seq])
                    for layer in range(LAYERS):
                        keys = c.k[layer][torch.tensor(r.seq.pages)].flatten(0, 1)[:r.seq.length]
                        want = compress_keys(keys, sc)
                        got = batch.compressed_keys(layer, 0, r.seq.length, sc)
                        torch.testing.assert_close(got[0], want[0], rtol=1e-12, atol=0)
                        torch.testing.assert_close(got[1], want[1], rtol=1e-12, atol=0)

    def drain(self) -> None:
        """Everything ends: every page is free again, and taking them all reclaims every published prefix,
        after which no old prompt finds a prefix."""
        for r in list(self.running) + list(self.waiting):
            self.finish(r, "drain")
        self.check()
        c = self.cache
        assert c.num_free == self.num_pages and c.has_free(self.num_pages)
        everything = Req([0] * (self.num_pages * self.ps), self.num_pages * self.ps, False, 1, SeqPages())
        self.waiting.append(everything)  # live while it holds the pages
        self.reserve(everything, self.num_pages * self.ps)
        assert not self.pub and not c.prefix and not c.free and c.num_free == 0
        self.check()
        self.finish(everything, "drain")
        for tokens, sparse in self.prompts:
            seq, computed = c.new_sequence(tokens, sparse)
            assert computed == 0 and seq.pages == []
        assert c.num_free == self.num_pages and sorted(c.free) == list(range(self.num_pages))


@pytest.mark.parametrize("sparse_config", [False, True], ids=["dense", "infllm_v2"])
@pytest.mark.parametrize("seed", range(10))
def test_random_walk_keeps_pages_consistent(seed, sparse_config):
    w = Walk(seed, sparse_config)
    steps = 60 if sparse_config else 120
    try:
        for _ in range(steps):
            w.step()
        w.drain()
    except AssertionError as e:
        raise AssertionError(f"seed {seed}, after: " + " | ".join(w.ops[-12:])) from e
    assert w.cache.num_free == w.num_pages


def test_reclaim_keeps_the_longest_reusable_prefix():
    """One page reclaimed from a cached 3-page prefix costs its last page, not all three. Found by the walk
    above: chains were published and refreshed first page first, so reclaiming (least recently used first)
    took a chain's first page, and its later pages stayed cached, unreachable."""
    cache = PagedKVCache(preset("tiny", num_hidden_layers=1, sparse_config=None), num_pages=4, page_size=4)
    prompt = list(range(13))  # three whole pages and one token
    seq, _ = cache.new_sequence(prompt)
    cache.reserve(seq, 13)
    seq.length = 13  # (the accounting reads only the length; the fuzz above writes through PagedBatch)
    cache.publish(seq, prompt)
    cache.release(seq)
    other, _ = cache.new_sequence([99] * 5)
    cache.reserve(other, 5)  # the one free page, and one cached prefix page reclaimed
    assert len(cache.prefix) == 2
    _, computed = cache.new_sequence(prompt)
    assert computed == 8, f"shares {computed} tokens while {len(cache.prefix)} of its pages are still cached"


def test_reclaim_passes_held_pages_and_its_queue_stays_bounded():
    """A long prompt's published pages, held while it decodes, become the least recently used while short
    requests come and go, and a popular prefix is held and let go by every request that reads it: reclaiming
    never takes a held page, takes the others least recently used first (a chain's deepest page first), and the
    reclaim queue stays within twice the pages however often pages are let go."""
    cache = PagedKVCache(preset("tiny", num_hidden_layers=1, sparse_config=None), num_pages=40, page_size=4)

    def publish(tokens):
        seq, _ = cache.new_sequence(tokens)
        cache.reserve(seq, len(tokens) - seq.length)
        seq.length = len(tokens)
        cache.publish(seq, tokens)
        return seq

    long = publish(list(range(1000, 1040)))  # 10 pages, held throughout
    popular = list(range(2000, 2008))  # 2 pages
    first = publish(popular + [1])
    popular_pages = first.pages[:2]
    cache.release(first)
    for i in range(300):  # read while pages are free: let go each time, nothing reclaimed
        seq, _ = cache.new_sequence(popular + [5, i])
        cache.release(seq)
        assert len(cache._lru) <= 2 * cache.num_pages + 64
    order = []  # pages by last use, least recent first
    for i in range(400):
        for _ in range(3):  # the popular prefix read and let go
            seq, computed = cache.new_sequence(popular + [7, i])
            assert computed == 8
            cache.release(seq)
        seq = publish([3000 + 10 * i + j for j in range(8)])
        if i == 399:
            order += popular_pages[::-1]
        order += seq.pages[::-1]
        cache.release(seq)
        assert len(cache._lru) <= 2 * cache.num_pages + 64
        assert cache.num_free == cache.num_pages - 10
    assert cache._pubs.count(1) == 40  # every page published: 10 held, 30 reclaimable
    expect = [p for p in order if cache._pubs[p]][-30:]
    taken = []
    for _ in range(30):  # one page at a time
        seq = SeqPages()
        cache.reserve(seq, 1)
        taken += seq.pages
    assert taken == expect
    assert not cache._reclaimable and cache.num_free == 0 and all(cache.refs[p] == 2 for p in long.pages)


def test_the_queues_rebuild_keeps_the_page_let_go_that_triggered_it():
    """A cached page read and let go again and again: each let-go queues it for reclaiming, and the push that takes
    the queue past its bound rebuilds it from the pages reclaimable now. That rebuild ran before the page's own
    reference count was lowered, so the page that triggered it was left out: counted free but never reclaimable,
    and a request that needed it failed with OutOfPages (found by the random walk at seed 13, and by the engine's
    random workloads at seed 13)."""
    cache = PagedKVCache(preset("tiny", num_hidden_layers=1, sparse_config=None), num_pages=4, page_size=4)
    prefix = [5, 6, 7, 8]
    first, _ = cache.new_sequence(prefix + [1])
    cache.reserve(first, 5)
    first.length = 5
    cache.publish(first, prefix + [1])
    (page,) = cache.prefix.values()
    cache.release(first)
    for i in range(3 * cache.num_pages + 64):  # past the bound (2 x pages + 64) at least once
        seq, computed = cache.new_sequence(prefix + [i])
        assert computed == 4
        cache.release(seq)
        assert (cache._used[page], page) in cache._lru, f"the cached page left the reclaim queue at let-go {i}"
    everything = SeqPages()
    cache.reserve(everything, 4 * cache.num_pages)  # the three free pages and the cached one reclaimed
    assert not cache.prefix and sorted(everything.pages) == list(range(cache.num_pages))


def test_a_page_is_published_under_one_key_at_most():
    """The same pages offered again under other keys (the same sequence published as sparse after dense: another
    attention mode, whose keys and values these pages do not hold) are not entered again: each page stays under its
    first key, and once released it is reclaimable (a page under two entries was held by the table for good)."""
    cache = PagedKVCache(preset("tiny", num_hidden_layers=1, sparse_config=None), num_pages=6, page_size=4)
    prompt = list(range(13))  # three whole pages and one token
    seq, _ = cache.new_sequence(prompt)
    cache.reserve(seq, 13)
    seq.length = 13
    cache.publish(seq, prompt)
    cache.publish(seq, prompt, sparse=True)
    assert len(cache.prefix) == 3 and cache._pubs[:6].count(1) == 3 and max(cache._pubs) == 1
    cache.release(seq)
    assert cache.num_free == 6  # 2 never used, the partial fourth page freed, 3 published and reclaimable
    other, _ = cache.new_sequence([99] * 24)
    cache.reserve(other, 24)  # every page: the published ones reclaimed
    assert not cache.prefix and cache.num_free == 0
    _, computed = cache.new_sequence(prompt, sparse=True)
    assert computed == 0
