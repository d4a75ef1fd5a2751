"""vLLM's per-request logits processors (`SamplingParams.logits_processors`, its V0 form) and `lora_request=None`, on
the tiny random model: each processor checked against an independent reference (the same ban through
allowed_token_ids or logit_bias, a forced sequence, the exact prompt), through the offline engine's batching,
preemption, prefix caching and n > 1, and in the in-process AsyncEngine, where a processor that raises fails its
request alone."""

import asyncio
import copy
import dataclasses
import functools

import pytest
import torch
from conftest import random_model

from cpm4 import LLM, SamplingParams
from cpm4.engine.sampling import SamplingPlan, process_logits
from cpm4.model.tokenizer import build_tokenizer
from cpm4.serve.engine import AsyncEngine, EngineError
from cpm4.serve.engine_proc import ProcessEngine

VOCAB = 1024


@functools.cache
def tok():
    return build_tokenizer(VOCAB)


@functools.cache
def model():
    return random_model("tiny", dtype=torch.float32)


def prompts(n, seed=0, lo=3, hi=60, prefix=()):
    g = torch.Generator().manual_seed(seed)
    return [list(prefix) + torch.randint(3, 1000, (k,), generator=g).tolist()
            for k in torch.randint(lo, hi, (n,), generator=g)]


def ban(token):
    def fn(output_token_ids, logits):
        logits[token] = float("-inf")
        return logits
    return fn


def all_but(token):
    return [t for t in range(VOCAB) if t != token]


def force(target):
    """A processor that leaves only target[len(output)] possible (then EOS)."""
    def fn(output_token_ids, logits):
        keep = target[len(output_token_ids)] if len(output_token_ids) < len(target) else 2
        forced = torch.full_like(logits, float("-inf"))
        forced[keep] = 0.0
        return forced  # a new tensor: the engine copies it in
    return fn


class Recorder:
    """A processor (a callable object) that records each call's output ids and changes nothing."""

    def __init__(self):
        self.calls = []

    def __call__(self, output_token_ids, logits):
        self.calls.append(output_token_ids)
        return logits


def ids(outs):
    return [o.token_ids for o in outs]


def test_validation_clone_and_replace():
    for bad, match in ((lambda o, x: x, "logits_processors must be a list of callables, got function"),
                       ("fn", "logits_processors must be a list"), ([1], r"logits_processors\[0\] must be callable"),
                       ([ban(3), lambda x: x], r"logits_processors\[1\] must take \(output_token_ids, logits\)"),
                       ([lambda a, b, c, d: d], r"logits_processors\[0\] must take")):
        with pytest.raises(ValueError, match=match):
            SamplingParams(logits_processors=bad)
    fn, rec = ban(3), Recorder()
    sp = SamplingParams(logits_processors=(fn, rec))
    assert sp.logits_processors == [fn, rec]  # a tuple taken as a list
    assert SamplingParams(logits_processors=[]).logits_processors is None
    assert SamplingParams(logits_processors=[lambda *a: a[-1]]).logits_processors  # (2 args through *args)

    # clone: a deep copy whose processors are the same objects, or their own clone()'s copies (vLLM's rule).
    class Cloned(Recorder):
        def clone(self):
            return Cloned()

    own = Cloned()
    sp = SamplingParams(logits_processors=[fn, rec, own], stop=["x"])
    c = sp.clone()
    assert c.logits_processors[:2] == [fn, rec] and c.logits_processors[0] is fn and c.logits_processors[1] is rec
    assert isinstance(c.logits_processors[2], Cloned) and c.logits_processors[2] is not own
    assert c.stop == sp.stop and c.stop is not sp.stop and c.logits_processors is not sp.logits_processors
    r = dataclasses.replace(sp, n=2)
    assert r.logits_processors == sp.logits_processors and r.logits_processors[1] is rec
    assert sp == copy.copy(sp) and sp != SamplingParams(logits_processors=[fn], stop=["x"])


def test_signatures_take_the_form_they_can_be_called_in():
    """vLLM's rule, three parameters take the prompt first, except where three cannot be passed by position: a
    functools.partial with a keyword, a keyword-only option or **kwargs (vLLM called those with three and failed;
    they were refused here) take (output_token_ids, logits), as do a bound method, a callable object and *args; a
    three-parameter form with *args still gets the prompt, as in vLLM."""
    def scaled(output_token_ids, logits, scale=1.0):
        logits[3] = float("-inf")
        return logits * scale

    def kw_only(output_token_ids, logits, *, token=3):
        logits[token] = float("-inf")
        return logits

    def var_kw(output_token_ids, logits, **options):
        logits[3] = float("-inf")
        return logits

    class Banner:
        def ban(self, output_token_ids, logits):
            logits[3] = float("-inf")
            return logits

    seen = []

    def rest(prompt_token_ids, output_token_ids, *more):
        seen.append((prompt_token_ids, output_token_ids))
        more[-1][3] = float("-inf")
        return more[-1]

    raw = torch.randn(1, VOCAB, generator=torch.Generator().manual_seed(1))
    want = process_logits(raw, [SamplingParams(allowed_token_ids=all_but(3))], [[7, 8, 9]], outputs=[[9]])
    for fn in (functools.partial(scaled, scale=1.0), kw_only, var_kw, Banner().ban, ban(3), lambda *a: ban(3)(*a),
               rest):
        got = process_logits(raw, [SamplingParams(logits_processors=[fn])], [[7, 8, 9]], outputs=[[9]])
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert seen == [([7, 8], [9])]


def test_processors_run_first_on_the_raw_logits():
    """process_logits with a processor that swaps in fixed logits equals process_logits of those logits without
    it: the processor ran before the grammar, bias, penalties, temperature and filters; rows without one and a
    greedy row are processed as they are alone. A 3-argument processor gets the prompt (history minus output)."""
    g = torch.Generator().manual_seed(0)
    raw, fixed = torch.randn(3, VOCAB, generator=g), torch.randn(VOCAB, generator=g)
    hist, outs = [[5, 6, 7, 8, 9], [4, 4], [1, 2, 3]], [[8, 9], [], [3]]
    seen = []

    def swap(prompt_token_ids, output_token_ids, logits):
        seen.append((prompt_token_ids, output_token_ids))
        return fixed.clone()

    common = dict(temperature=0.7, top_k=50, top_p=0.9, repetition_penalty=1.3, presence_penalty=0.5,
                  logit_bias={7: 3.0}, allowed_token_ids=list(range(0, VOCAB, 2)))
    params = [SamplingParams(**common, logits_processors=[swap]), SamplingParams(**common),
              SamplingParams(temperature=0, logits_processors=[swap], repetition_penalty=1.3)]
    got = process_logits(raw, params, hist, outputs=outs)
    assert seen == [([5, 6, 7], [8, 9]), ([1, 2], [3])]
    plain = [dataclasses.replace(p, logits_processors=None) for p in params]
    want = process_logits(torch.stack([fixed, raw[1], fixed]), plain, hist, outputs=outs)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert SamplingPlan(plain, VOCAB).processed == []  # rows without processors: nothing to walk

    # failed: a raising row is recorded and the others processed on; without it the error propagates.
    def boom(output_token_ids, logits):
        raise KeyError("boom")

    params[0] = SamplingParams(**common, logits_processors=[boom])
    failed = []
    got = process_logits(raw, params, hist, outputs=outs, failed=failed)
    assert [(i, type(e)) for i, e in failed] == [(0, KeyError)]
    torch.testing.assert_close(got[1:], want[1:], rtol=0, atol=0)
    with pytest.raises(KeyError, match="boom"):
        process_logits(raw, params, hist, outputs=outs)
    with pytest.raises(ValueError, match="need each row's generated ids"):
        process_logits(raw, params, hist)
    none = SamplingParams(logits_processors=[lambda o, x: None])
    with pytest.raises(TypeError, match=r"returned NoneType: it must return the logits row, a tensor of shape \(1024"):
        process_logits(raw[:1], [none], [[1]], outputs=[[]])


@pytest.mark.parametrize("sampled", [False, True])
def test_a_ban_equals_allowed_token_ids_and_logit_bias(sampled):
    """A processor that bans the token the free run uses most: it never appears, and the outputs are those of the
    same ban through allowed_token_ids (every other id, the same -inf) in the same batch, greedy or seeded."""
    llm = LLM(model(), tokenizer=tok(), max_num_seqs=4)
    ps = prompts(4, seed=1)
    kw = dict(temperature=0.9, top_p=0.95, seed=7) if sampled else dict(temperature=0)
    free = llm.generate(ps, SamplingParams(max_tokens=10, ignore_eos=True, **kw))
    flat = [t for o in free for t in o.token_ids]
    t = max(set(flat), key=flat.count)
    banned = llm.generate(ps, SamplingParams(max_tokens=10, ignore_eos=True, logits_processors=[ban(t)], **kw))
    assert all(t not in o.token_ids for o in banned) and ids(banned) != ids(free)
    ref = llm.generate(ps, SamplingParams(max_tokens=10, ignore_eos=True, allowed_token_ids=all_but(t), **kw))
    assert ids(banned) == ids(ref) and [o.text for o in banned] == [o.text for o in ref]
    if not sampled:  # a bias of -100 is no -inf, but no greedy pick takes it either
        bias = llm.generate(ps, SamplingParams(max_tokens=10, ignore_eos=True, logit_bias={t: -100}, **kw))
        assert ids(banned) == ids(bias)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_a_forced_sequence_and_the_exact_prompt(temperature):
    """A processor that forces a sequence from output_token_ids gives exactly that sequence (then EOS), greedy or
    sampled; the 3-argument form, a function or a callable object, receives the prompt's exact ids (text prompts
    encoded, truncate_prompt_tokens applied) at every call."""
    llm = LLM(model(), tokenizer=tok(), max_num_seqs=2)
    target = [17, 17, 900, 3, 42, 511, 17]
    prompt_seen = []

    def prompt_form(prompt_token_ids, output_token_ids, logits):
        prompt_seen.append(prompt_token_ids)
        return logits

    class PromptForm:
        def __init__(self):
            self.seen = []

        def __call__(self, prompt_token_ids, output_token_ids, logits):
            self.seen.append(prompt_token_ids)
            return logits

    obj = PromptForm()
    ps = ["a text prompt", prompts(1, seed=2)[0], list(range(10, 40))]
    params = [SamplingParams(temperature=temperature, seed=3, max_tokens=20,
                             logits_processors=[prompt_form, force(target), obj])] * 2 + \
        [SamplingParams(temperature=temperature, seed=3, max_tokens=20, truncate_prompt_tokens=8,
                        logits_processors=[force(target), prompt_form, obj])]
    outs = llm.generate(ps, params)
    assert all(o.token_ids == target + [2] and o.finish_reason == "stop" for o in outs)
    want = [tok().encode(ps[0]), ps[1], ps[2][-8:]]
    assert [o.prompt_token_ids for o in outs] == want
    assert sorted(map(tuple, prompt_seen)) == sorted(map(tuple, obj.seen)) == \
        sorted(tuple(p) for p in want for _ in range(len(target) + 1))


def test_calls_grow_by_one_through_preemption_and_prefix_caching():
    """Each request's processor is called once per sampled token with the output so far (one longer each call),
    also across preemptions in a cache too small for the batch, with prompts sharing cached prefix pages; an
    identity processor changes no output (the run without processors)."""
    llm = LLM(model(), tokenizer=tok(), max_num_seqs=4, kv_cache_tokens=96)  # 6 pages of 16
    ps = prompts(4, seed=3, lo=4, hi=20, prefix=range(100, 120))
    base = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    free = llm.generate(ps, base)
    assert llm.engine.engine.num_preempted > 0
    recs = [Recorder() for _ in ps]
    before = llm.engine.engine.num_preempted
    outs = llm.generate(ps, [dataclasses.replace(base, logits_processors=[r]) for r in recs])
    assert llm.engine.engine.num_preempted > before
    assert ids(outs) == ids(free)
    for o, r in zip(outs, recs, strict=True):
        assert r.calls == [o.token_ids[:k] for k in range(len(o.token_ids))]
    assert any(o.num_cached_tokens for o in outs)


def test_rows_without_processors_are_unchanged_and_n_completions():
    """A batch mixing rows with and without processors (greedy and seeded): the rows without equal a run with no
    processor at all, the rows with equal their allowed_token_ids reference. n > 1: each completion calls the
    (shared) processor with its own output, and equals the reference's completion."""
    llm = LLM(model(), tokenizer=tok(), max_num_seqs=4)
    ps = prompts(6, seed=4)
    kinds = [dict(temperature=0), dict(temperature=1.0, seed=11), dict(temperature=0.8, top_k=40, seed=12)]
    plain = [SamplingParams(max_tokens=10, ignore_eos=True, **kinds[i % 3]) for i in range(6)]
    free = llm.generate(ps, plain)
    t = free[0].token_ids[1]
    mixed = [dataclasses.replace(p, logits_processors=[ban(t)]) if i % 2 else p for i, p in enumerate(plain)]
    outs = llm.generate(ps, mixed)
    ref = llm.generate(ps, [dataclasses.replace(p, allowed_token_ids=all_but(t)) if i % 2 else p
                            for i, p in enumerate(plain)])
    assert ids(outs) == ids(ref)
    assert [outs[i].token_ids for i in (0, 2, 4)] == [free[i].token_ids for i in (0, 2, 4)]

    rec = Recorder()
    many = llm.generate(ps[0], SamplingParams(n=3, seed=5, max_tokens=8, ignore_eos=True,
                                              logits_processors=[ban(t), rec]))[0]
    want = llm.generate(ps[0], SamplingParams(n=3, seed=5, max_tokens=8, ignore_eos=True,
                                              allowed_token_ids=all_but(t)))[0]
    assert [c.token_ids for c in many.outputs] == [c.token_ids for c in want.outputs]
    assert len({tuple(c.token_ids) for c in many.outputs}) > 1
    assert sorted(map(tuple, rec.calls)) == sorted(tuple(c.token_ids[:k]) for c in many.outputs for k in range(8))


def test_a_raising_processor_fails_the_call_and_leaves_the_engine():
    """LLM.generate raises the processor's own exception (its other prompts are dropped), the engine is kept and
    serves the next call as before; a processor returning None fails with a TypeError saying what it must return;
    the offline engine's stream and the plain-loop stream raise it too."""
    class Stop(Exception):
        pass

    def late(output_token_ids, logits):
        if len(output_token_ids) == 3:
            raise Stop("at 3")
        return logits

    llm = LLM(model(), tokenizer=tok(), max_num_seqs=2)
    ps = prompts(4, seed=5)
    base = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    free = llm.generate(ps, base)
    engine = llm.engine.engine
    for rows in ([2], [0, 3]):
        params = [dataclasses.replace(base, logits_processors=[late]) if i in rows else base for i in range(4)]
        with pytest.raises(Stop, match="at 3"):
            llm.generate(ps, params)
        assert llm.engine.engine is engine and not engine.has_work()
        assert ids(llm.generate(ps, base)) == ids(free)
    with pytest.raises(TypeError, match="must return the logits row"):
        llm.generate(ps[0], dataclasses.replace(base, logits_processors=[lambda o, x: None]))
    with pytest.raises(Stop):
        list(llm.engine.stream(ps[1], dataclasses.replace(base, logits_processors=[late])))
    assert llm.engine.engine is engine and not engine.has_work()
    with pytest.raises(Stop):  # LLM.stream off CUDA: the plain loop
        list(llm.stream(ps[1], dataclasses.replace(base, logits_processors=[late])))
    assert ids(llm.generate(ps, base)) == ids(free)


def test_the_raised_error_keeps_its_own_chain():
    """LLM.generate and the offline stream raise the processor's exception with the chain it was raised with (its
    cause, or the exception it was raised while handling); they cut it (raised `from None`), so the traceback lost
    why the processor failed."""
    why = KeyError("vocab entry")

    def caused(output_token_ids, logits):
        raise ValueError("caused") from why

    def during(output_token_ids, logits):
        try:
            {}["x"]
        except KeyError:
            raise ValueError("during")  # noqa: B904 - the implicit context is what is checked

    llm = LLM(model(), tokenizer=tok())
    sp = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    for call in (lambda p: llm.generate([5, 6, 7], p), lambda p: list(llm.engine.stream([5, 6, 7], p))):
        with pytest.raises(ValueError, match="caused") as info:
            call(dataclasses.replace(sp, logits_processors=[caused]))
        assert info.value.__cause__ is why and info.value.__suppress_context__
        with pytest.raises(ValueError, match="during") as info:
            call(dataclasses.replace(sp, logits_processors=[during]))
        assert info.value.__cause__ is None and not info.value.__suppress_context__
        assert isinstance(info.value.__context__, KeyError)


def test_async_engine_fails_only_the_raising_request():
    """In the in-process AsyncEngine a request whose processor raises ends with an EngineError caused by it; the
    requests beside it finish as they would have, a processed one as offline, and the engine serves on."""
    m = model()
    llm = LLM(m, tokenizer=tok(), max_num_seqs=4)
    ps = prompts(3, seed=6)
    base = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    t = llm.generate(ps[2], base)[0].token_ids[0]
    good = [base, dataclasses.replace(base, logits_processors=[ban(t)])]
    want = ids(llm.generate(ps[:2] + [ps[2]], good + [good[1]]))

    def late(output_token_ids, logits):
        if len(output_token_ids) == 4:
            raise ZeroDivisionError("bad row")
        return logits

    eng = AsyncEngine(m, tok(), max_batch_size=4)
    try:
        async def one(p, sp, rid):
            out = []
            async for d in eng.stream(p, sp, rid):
                out += d.token_ids
            return out

        async def main():
            return await asyncio.gather(one(ps[0], good[0], "a"), one(ps[1], good[1], "b"),
                                        one(ps[2], dataclasses.replace(base, logits_processors=[late]), "bad"),
                                        return_exceptions=True)

        a, b, bad = asyncio.run(main())
        assert [a, b] == want[:2]
        assert isinstance(bad, EngineError) and isinstance(bad.__cause__, ZeroDivisionError)
        assert "request 'bad' failed: its logits processor raised ZeroDivisionError: bad row" in str(bad)
        assert eng.is_running and eng.finish_reason("bad") == "error"
        assert asyncio.run(one(ps[2], good[1], "c")) == want[2]
    finally:
        eng.shutdown()


def test_logprobs_stay_the_models_raw_ones():
    """logprobs are the raw model's under a processor too (as under bias and allowed_token_ids: vLLM V1's default):
    the banned greedy pick is still the top alternative, with its logprob of the run without the processor, and
    the token taken instead reports its own raw logprob."""
    llm = LLM(model(), tokenizer=tok())
    p = prompts(1, seed=7)[0]
    sp = SamplingParams(temperature=0, max_tokens=1, logprobs=3)
    free = llm.generate(p, sp)[0]
    t = free.token_ids[0]
    banned = llm.generate(p, dataclasses.replace(sp, logits_processors=[ban(t)]))[0]
    second = free.logprobs[0].top[1]
    assert banned.token_ids == [second[0]]
    assert [i for i, _ in banned.logprobs[0].top] == [i for i, _ in free.logprobs[0].top]
    # (the second run reads the prompt's pages from the prefix cache: the same values to float rounding)
    assert [v for _, v in banned.logprobs[0].top] == pytest.approx([v for _, v in free.logprobs[0].top], abs=1e-5)
    assert banned.logprobs[0].logprob == pytest.approx(second[1], abs=1e-5)


def test_process_engine_refuses_processors():
    """ProcessEngine sends params to its child by pickling: processors are refused with a ValueError naming them
    (the check, not the pickle, on an engine without a child)."""
    eng = object.__new__(ProcessEngine)
    eng.scheduling_policy = "fcfs"
    eng.check_params(SamplingParams())
    with pytest.raises(ValueError, match="logits_processors cannot be sent to an engine in another process"):
        eng.check_params(SamplingParams(logits_processors=[ban(3)]))


def test_lora_request_none_only():
    """vLLM's lora_request: None is taken by generate and chat (by name or in its place after use_tqdm), an
    adapter is refused before any work."""
    llm = LLM(model(), tokenizer=tok())
    sp = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    msgs = [{"role": "user", "content": "hi"}]
    want = llm.generate("abc", sp)[0].token_ids
    assert llm.generate("abc", sp, lora_request=None)[0].token_ids == want
    assert llm.generate("abc", sp, False, None)[0].token_ids == want
    assert llm.chat(msgs, sp, lora_request=None)[0].token_ids == llm.chat(msgs, sp)[0].token_ids
    for call in (lambda: llm.generate("abc", sp, lora_request=object()),
                 lambda: llm.chat(msgs, sp, False, "adapter")):
        with pytest.raises(ValueError, match="LoRA adapters are not supported: lora_request must be None"):
            call()


@pytest.mark.gpu
def test_processors_on_cuda(tiny_checkpoint):
    """On CUDA (decode steps from CUDA graphs, launched ahead for rows without processors): a ban equals the same
    ban through allowed_token_ids, a forced sequence comes out exactly, and rows without processors in the same
    batch equal their run without any."""
    import gc

    if not torch.cuda.is_available():
        pytest.skip("no CUDA")
    llm = LLM(tiny_checkpoint, device="cuda", dtype="float32", kv_cache_tokens=4096, max_num_seqs=8)
    try:
        vocab = llm.model.config.vocab_size
        ps = ["The sky is", "Once upon a time", "def main():", "1, 2, 3,"]
        plain = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
        free = llm.generate(ps, plain)
        flat = [t for o in free for t in o.token_ids]
        t = max(set(flat), key=flat.count)
        banned = llm.generate(ps, dataclasses.replace(plain, logits_processors=[ban(t)]))
        assert all(t not in o.token_ids for o in banned)
        ref = llm.generate(ps, dataclasses.replace(plain, allowed_token_ids=[i for i in range(vocab) if i != t]))
        assert ids(banned) == ids(ref)
        target = [17, 17, 900, 3, 42]
        mixed = llm.generate(ps, [dataclasses.replace(plain, logits_processors=[force(target)]), plain,
                                  dataclasses.replace(plain, logits_processors=[ban(t)]), plain])
        assert mixed[0].token_ids[:len(target)] == target
        assert [mixed[1].token_ids, mixed[3].token_ids] == [free[1].token_ids, free[3].token_ids]
        assert mixed[2].token_ids == banned[2].token_ids
    finally:
        del llm
        gc.collect()
        torch.cuda.empty_cache()
