"""`LLMEngine(async_output=True)`: decode steps launched before the previous step's tokens are read back give
the same outputs as each request run alone, through arrivals, stops mid-stream, aborts and preemption."""

import functools

import pytest
import torch
from conftest import random_model

from cpm4 import SamplingParams
from cpm4.engine.generate import generate_ids
from cpm4.engine.paged import PagedKVCache
from cpm4.engine.scheduler import LLMEngine
from cpm4.model.tokenizer import build_tokenizer


@functools.cache
def tok():
    return build_tokenizer(1024)


def sparse():
    return {"kernel_size": 8, "kernel_stride": 4, "init_blocks": 1, "block_size": 16, "window_size": 32,
            "topk": 2, "dense_len": 96, "variant": "gen-b"}


def prompts(n, seed=0, lo=3, hi=120):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 1000, (k,), generator=g).tolist() for k in torch.randint(lo, hi, (n,), generator=g)]


def alone(model, p, params):
    return generate_ids(model, tok(), [p], [params])[0]


def counting(eng: LLMEngine) -> list[int]:
    """Counts the decode steps launched ahead of reading the previous one's tokens."""
    n = [0]
    cont = eng._continue

    def wrapped(keep):
        n[0] += 1
        return cont(keep)

    eng._continue = wrapped
    return n


def collect(eng, arrivals: dict[int, list[tuple[str, list[int], SamplingParams]]], abort_at: dict[int, str]):
    res: dict[str, list] = {}
    step = 0
    while arrivals or eng.has_work():
        for rid, p, sp in arrivals.pop(step, []):
            eng.add_request(rid, p, sp)
        if step in abort_at:
            eng.abort(abort_at[step])
        for rid, d in eng.step():
            r = res.setdefault(rid, ["", [], None])
            r[0] += d.text
            r[1] += d.token_ids
            r[2] = d.finish_reason or r[2]
        step += 1
    return res


@pytest.mark.parametrize("sc", [None, sparse()])
def test_async_equals_alone_with_arrivals_stops_and_abort(sc):
    model = random_model("tiny", dtype=torch.float32, sparse_config=sc)
    ps = prompts(6, seed=7, lo=20, hi=130)
    free = alone(model, ps[0], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))
    params = [
        SamplingParams(temperature=0, max_tokens=30, stop_token_ids=[free.token_ids[9]]),  # stops mid-stream
        SamplingParams(temperature=0, max_tokens=25, ignore_eos=True),
        SamplingParams(temperature=0.8, top_p=0.9, seed=11, max_tokens=20, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=1, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=40, ignore_eos=True),  # aborted
        SamplingParams(temperature=0.7, seed=3, max_tokens=18, ignore_eos=True),
    ]
    cache = PagedKVCache(model.config, num_pages=200, page_size=16)
    eng = LLMEngine(model, tok(), cache, max_batch_size=4, chunk_tokens=64, async_output=True)
    launched = counting(eng)
    arrivals = {0: [("r0", ps[0], params[0]), ("r1", ps[1], params[1])], 6: [("r2", ps[2], params[2])],
                7: [("r3", ps[3], params[3]), ("r4", ps[4], params[4])], 20: [("r5", ps[5], params[5])]}
    res = collect(eng, arrivals, {12: "r4"})
    assert launched[0] > 10
    for i in (0, 1, 2, 3, 5):
        ref = alone(model, ps[i], params[i])
        assert (res[f"r{i}"][1], res[f"r{i}"][0], res[f"r{i}"][2]) == (ref.token_ids, ref.text, ref.finish_reason), i
    assert res["r0"][2] == "stop" and res["r0"][1] == free.token_ids[:10]  # the stop id last
    assert res["r4"][2] == "abort"
    assert cache.num_free == cache.num_pages and eng._inflight is None


def test_async_with_preemption_and_sync_only_params():
    model = random_model("tiny", dtype=torch.float32)
    ps = prompts(5, seed=1, lo=20, hi=60)
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    cache = PagedKVCache(model.config, num_pages=14, page_size=16)  # too small for all at once
    eng = LLMEngine(model, tok(), cache, max_batch_size=8, chunk_tokens=64, async_output=True)
    launched = counting(eng)
    for i, p in enumerate(ps):
        eng.add_request(f"r{i}", p, params)
    res = eng.run_to_completion()
    assert eng.num_preempted > 0 and launched[0] > 0
    for i, p in enumerate(ps):
        assert res[f"r{i}"][1] == alone(model, p, params).token_ids
    # Repetition/presence/frequency penalties and logprobs need the host to know each token before the next:
    # synchronous steps.
    for sp in (SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, repetition_penalty=1.3),
               SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, frequency_penalty=1.0),
               SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=2)):
        eng = LLMEngine(model, tok(), PagedKVCache(model.config, num_pages=40, page_size=16), async_output=True)
        launched = counting(eng)
        eng.add_request("a", ps[0], sp)
        assert eng.run_to_completion()["a"][1] == alone(model, ps[0], sp).token_ids and launched[0] == 0


def test_async_paged_decode_kernels():
    """The device-fed ids through the paged decode path (Triton kernels, in the interpreter on the CPU)."""
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        pytest.skip("interpreter test: runs on CPU only")
    model = random_model("tiny", dtype=torch.float32, num_hidden_layers=2, sparse_config=None)
    eng = LLMEngine(model, tok(), PagedKVCache(model.config, num_pages=30, page_size=16), max_batch_size=2,
                    paged_decode=True, async_output=True)
    launched = counting(eng)
    ps = prompts(2, seed=5, lo=10, hi=40)
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    for i, p in enumerate(ps):
        eng.add_request(f"r{i}", p, params)
    res = eng.run_to_completion()
    assert launched[0] > 0
    for i, p in enumerate(ps):
        assert res[f"r{i}"][1] == alone(model, p, params).token_ids


def test_fill_holes_moves_only_rows_past_the_new_count():
    """Each row kept stays in its place unless it lies past the new count; those fill the ended rows' places, in
    order: a permutation of the rows kept, with as many places changed as rows ended before the new count."""
    import random

    from cpm4.engine.scheduler import fill_holes

    rng = random.Random(0)
    assert fill_holes([0, 1, 2, 4, 5]) == [0, 1, 2, 5, 4] and fill_holes([0, 2, 5, 7]) == [0, 5, 2, 7]
    assert fill_holes([]) == [] and fill_holes([0, 1, 2]) == [0, 1, 2] and fill_holes([3]) == [3]
    for _ in range(500):
        n = rng.randint(1, 40)
        keep = sorted(rng.sample(range(n), rng.randint(0, n)))
        got = fill_holes(keep)
        m = len(keep)
        assert sorted(got) == keep
        assert all(got[i] == i for i in range(m) if i in keep)
        assert sum(got[i] != i for i in range(m)) == sum(1 for i in range(m) if i not in keep)


def test_block_table_rewrites_only_the_ended_rows_places():
    """Rows in `fill_holes` order after two of eight ended: the decode graphs' block table puts new sequences in
    the two places only, and holds every row's pages."""
    from cpm4.engine.paged import HostBlockTable, SeqPages
    from cpm4.engine.scheduler import fill_holes

    seqs = [SeqPages([10 * i + j for j in range(i % 3 + 1)], 16 * (i % 3 + 1)) for i in range(8)]
    t = HostBlockTable(8, 4, 99)
    t.update(seqs, 8)
    before = list(t.owners)
    order = fill_holes([0, 1, 3, 4, 6, 7])  # rows 2 and 5 ended
    rows = [seqs[i] for i in order]
    t.update(rows, 8)
    assert sum(a is not b for a, b in zip(before[:6], t.owners[:6])) == 2
    for i, s in enumerate(rows):
        assert t.table[i, :len(s.pages)].tolist() == s.pages
    assert t.owners[6:] == [None, None] and (t.table[6:, 0] == 99).all()


def test_async_rows_ending_out_of_order_equal_alone(monkeypatch):
    """Rows ending before later ones in steps launched ahead (their places filled by the last rows): every
    request's tokens are those of the request alone."""
    from cpm4.engine import scheduler

    moved = []
    real = scheduler.fill_holes
    monkeypatch.setattr(scheduler, "fill_holes", lambda keep: moved.append(real(keep) != keep) or real(keep))
    model = random_model("tiny", dtype=torch.float32)
    ps = prompts(6, seed=9, lo=20, hi=90)
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (5, 30, 9, 30, 14, 30)]
    eng = LLMEngine(model, tok(), PagedKVCache(model.config, num_pages=200, page_size=16), max_batch_size=6,
                    async_output=True)
    for i, (p, sp) in enumerate(zip(ps, params)):
        eng.add_request(f"r{i}", p, sp)
    res = eng.run_to_completion()
    assert any(moved)
    for i, (p, sp) in enumerate(zip(ps, params)):
        assert res[f"r{i}"][1] == alone(model, p, sp).token_ids, i
