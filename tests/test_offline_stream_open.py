"""`OfflineEngine.stream` left unfinished (an iterator neither read to its end nor closed) while the same LLM takes
another call: the later call ends that stream's request (one stream at a time) instead of meeting its deltas in
its own steps (`int("stream")` failed the call and dropped the engine), and its outputs are those of a call alone."""

from __future__ import annotations

import pytest

from cpm4 import LLM, SamplingParams

PARAMS = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(tiny_checkpoint):
    return LLM(tiny_checkpoint, device="cpu", dtype="float32")


def streamed(llm, prompt):
    return [t for d in llm.engine.stream(prompt, PARAMS) for t in d.token_ids]


def test_generate_after_an_unfinished_stream(llm):
    p, q = list(range(3, 13)), list(range(20, 27))
    want_p, want_q = (llm.generate([x], PARAMS)[0].token_ids for x in (p, q))
    it = llm.engine.stream(p, PARAMS)
    got = list(next(it).token_ids)
    assert got == want_p[:len(got)]
    built = llm.engine.engine
    assert llm.generate([q], PARAMS)[0].token_ids == want_q
    assert llm.engine.engine is built  # kept: the call did not fail and drop it
    assert list(it) == []  # ended by the call: nothing more comes
    assert not built.has_work() and not built.by_id


def test_a_second_stream_ends_the_first(llm):
    p, q = list(range(3, 13)), list(range(20, 27))
    want_q = streamed(llm, q)
    it1 = llm.engine.stream(p, PARAMS)
    next(it1)
    it2 = llm.engine.stream(q, PARAMS)
    first = list(next(it2).token_ids)
    it1.close()  # closing the ended one touches nothing of the second
    assert first + [t for d in it2 for t in d.token_ids] == want_q
    assert list(it1) == []
    assert streamed(llm, p) == llm.generate([p], PARAMS)[0].token_ids
