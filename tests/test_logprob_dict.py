"""Logprobs read as vLLM's `list[dict[int, Logprob]]` (`TokenLogprob` as a Mapping): the sampled token first, its
rank among the vocabulary, the alternatives' ranks, each entry's decoded_token — checked against float64
log-softmax and a naive rank count, through `LLM.generate`, `AsyncLLM.generate`, prompt logprobs and beam search."""

from __future__ import annotations

import asyncio
import math

import pytest
import torch

from cpm4 import LLM, AsyncLLM, BeamSearchParams, SamplingParams
from cpm4.engine.generate import Logprob, TokenLogprob, prompt_logprobs, token_logprobs, token_logprobs_batch


@pytest.fixture(scope="module")
def llm(tiny_checkpoint):
    return LLM(tiny_checkpoint, device="cpu", dtype="float32")


def naive_rank(logits: torch.Tensor, token: int) -> int:
    lp = torch.log_softmax(logits.double(), -1)
    return 1 + sum(1 for v in lp.tolist() if v > lp[token].item())


def test_mapping_view_of_an_entry():
    lp = TokenLogprob(7, -2.0, [(3, -0.5), (7, -2.0), (9, -2.5)], rank=2)
    assert list(lp) == [7, 3, 9]  # the sampled token first, then the alternatives
    assert len(lp) == 3 and 9 in lp and 4 not in lp
    assert lp[7] == Logprob(-2.0, 2, None)
    assert lp[3] == Logprob(-0.5, 1, None) and lp[9].rank == 3
    assert dict(lp)[9].logprob == -2.5
    with pytest.raises(KeyError):
        lp[4]
    # Its rank from the alternatives when not given; unknown (None) when outside them.
    assert TokenLogprob(9, -2.5, [(3, -0.5), (9, -2.5)])[9].rank == 2
    assert TokenLogprob(5, -4.0, [(3, -0.5)])[5].rank is None
    # A prompt's first token: nothing predicts it (vLLM has None there): no entries.
    assert len(TokenLogprob(1, None, [])) == 0
    named = TokenLogprob(7, -2.0, [(3, -0.5)], 2, text_of=lambda t: f"<{t}>")
    assert named[3].decoded_token == "<3>" and named[7].decoded_token == "<7>"
    # The dataclass's fields and equality are as before (the mapping methods added nothing to compare).
    assert TokenLogprob(7, -2.0, [], 1) == TokenLogprob(7, -2.0, [], 1, text_of=str)


def test_token_logprobs_value_and_rank_against_float64():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(500, generator=g) * 3
    ref = torch.log_softmax(logits.double(), -1)
    order = torch.argsort(ref, descending=True).tolist()
    for token in (order[0], order[1], order[37], order[-1]):
        lp = token_logprobs(logits, token, 4)
        assert lp.rank == naive_rank(logits, token) == order.index(token) + 1
        assert math.isclose(lp.logprob, ref[token].item(), abs_tol=1e-5)
        assert [t for t, _ in lp.top] == order[:4]
        for t, entry in lp.items():
            assert math.isclose(entry.logprob, ref[t].item(), abs_tol=1e-5)
            assert entry.rank == order.index(t) + 1
    assert token_logprobs(logits, order[3], 0).top == [] and token_logprobs(logits, order[3], 0).rank == 4


def test_batch_of_rows_with_their_own_k_against_float64():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(5, 300, generator=g) * 2
    ref = torch.log_softmax(logits.double(), -1)
    tokens, ks = [3, 17, 250, 0, 99], [0, 2, 5, 1, 0]
    got = token_logprobs_batch(logits, tokens, ks)
    for r, (lp, t, k) in enumerate(zip(got, tokens, ks)):
        order = torch.argsort(ref[r], descending=True).tolist()
        assert lp.token_id == t and lp.rank == naive_rank(logits[r], t)
        assert math.isclose(lp.logprob, ref[r, t].item(), abs_tol=1e-5)
        assert [i for i, _ in lp.top] == order[:k]
        assert [v for _, v in lp.top] == pytest.approx(ref[r, order[:k]].tolist(), abs=1e-5)
        assert lp == token_logprobs(logits[r], t, k)  # one row alone: the same entry
    assert token_logprobs_batch(logits[:0], [], []) == []


def test_prompt_logprobs_ranks_against_naive(llm):
    ids = llm.tokenizer.encode("The quick brown fox jumps over the lazy dog")
    got = prompt_logprobs(llm.model, ids, 3, chunk=4)
    with torch.no_grad():
        logits = llm.model.logits(llm.model.hidden_states(torch.tensor([ids]))[0])
    assert got[0].rank is None and len(got[0]) == 0
    for i in range(1, len(ids)):
        assert got[i].rank == naive_rank(logits[i - 1], ids[i])
        assert got[i][ids[i]].rank == got[i].rank


def test_generate_logprobs_as_vllm_dicts(llm):
    sp = SamplingParams(max_tokens=4, temperature=0, logprobs=3, prompt_logprobs=2)
    out = llm.generate("Hello there", sp)[0].outputs[0]
    assert len(out.logprobs) == len(out.token_ids) == 4
    for tok, entry in zip(out.token_ids, out.logprobs):
        d = dict(entry)
        assert 3 <= len(d) <= 4 and next(iter(d)) == tok
        assert d[tok].logprob == entry.logprob
        assert d[tok].rank == 1  # greedy: the most likely
        for t, e in d.items():
            assert e.decoded_token == llm.tokenizer.decode([t], skip_special_tokens=False)
        assert sorted(e.rank for e in d.values()) == [1, 2, 3]
    sampled = SamplingParams(max_tokens=8, temperature=5.0, seed=1, logprobs=1)
    out = llm.generate("Hello there", sampled)[0]
    ranks = [entry[tok].rank for tok, entry in zip(out.token_ids, out.logprobs)]
    assert all(r >= 1 for r in ranks) and any(r > 1 for r in ranks)  # hot sampling leaves the top token
    assert out.cumulative_logprob == pytest.approx(sum(entry[tok].logprob
                                                       for tok, entry in zip(out.token_ids, out.logprobs)))
    prompt = llm.generate("Hello there", sp)[0].prompt_logprobs
    assert all(e.decoded_token is not None for lp in prompt[1:] for e in lp.values())


def test_async_llm_logprobs_have_text(tiny_checkpoint, llm):
    allm = AsyncLLM(tiny_checkpoint, device="cpu", dtype="float32", engine_process=False, max_num_seqs=4,
                    cpu_threads=1)
    sp = SamplingParams(max_tokens=3, temperature=0, logprobs=2)
    try:
        async def run():
            return [o async for o in allm.generate("Hello there", sp, "r1")]

        final = asyncio.run(run())[-1]
    finally:
        allm.shutdown()
    want = llm.generate("Hello there", sp)[0]
    assert final.token_ids == want.token_ids
    for tok, entry in zip(final.token_ids, final.logprobs):
        assert entry[tok].rank == 1
        assert entry[tok].decoded_token == llm.tokenizer.decode([tok], skip_special_tokens=False)


def test_beam_search_logprobs_as_dicts(llm):
    outs = llm.beam_search(["Hello"], BeamSearchParams(beam_width=2, max_tokens=3))
    for seq in outs[0].sequences:
        gen = seq.tokens[-len(seq.logprobs):]
        for tok, entry in zip(gen, seq.logprobs):
            assert entry[tok].logprob == entry.logprob
            assert entry[tok].rank is not None and entry[tok].decoded_token is not None


@pytest.mark.gpu
def test_gpu_engine_logprob_ranks_against_float64(tiny_checkpoint):
    """On CUDA (graphs, paged decode): each sampled token's rank and log-probability against float64 log-softmax of
    the same model's logits recomputed on the CPU over the prompt and the tokens before it."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    llm = LLM(tiny_checkpoint, device="cuda", dtype="float32", max_num_seqs=4, gpu_memory_utilization=0.2)
    sp = SamplingParams(max_tokens=6, temperature=1.5, seed=3, logprobs=2, ignore_eos=True)
    outs = llm.generate(["Hello there", "The quick brown fox"], sp)
    model = llm.model.to("cpu")
    for o in outs:
        ids = o.prompt_token_ids + o.token_ids
        with torch.no_grad():
            logits = model.logits(model.hidden_states(torch.tensor([ids]))[0]).double()
        for i, (tok, entry) in enumerate(zip(o.token_ids, o.logprobs)):
            row = logits[len(o.prompt_token_ids) - 1 + i]
            lp = torch.log_softmax(row, -1)
            # float32 on the GPU: a rank between those of a token 1e-4 more and 1e-4 less likely
            lo, hi = (1 + int((lp > lp[tok] + e).sum()) for e in (1e-4, -1e-4))
            assert lo <= entry[tok].rank <= hi
            assert entry[tok].logprob == pytest.approx(torch.log_softmax(row, -1)[tok].item(), abs=1e-3)
            assert entry[tok].decoded_token == llm.tokenizer.decode([tok], skip_special_tokens=False)
