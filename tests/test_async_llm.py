"""`cpm4.AsyncLLM` (vLLM's AsyncLLM): outputs of `generate` against `LLM.generate` run on the same weights (greedy,
and seeded sampling with n > 1), the three output kinds against each other, many tasks (and threads) at once, abort
and early exit freeing the engine, request ids free again at once, failures ending requests cleanly, vLLM's
arguments, and bad input refused before anything is queued."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import itertools
import json
import logging
import shutil
import time
import warnings

import pytest

from cpm4 import LLM, AsyncLLM, RequestOutputKind, SamplingParams
from cpm4.engine.generate import PromptTooLongError


@pytest.fixture(scope="module")
def llm(tiny_checkpoint):
    return LLM(tiny_checkpoint, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def allm(tiny_checkpoint):
    a = AsyncLLM(tiny_checkpoint, device="cpu", dtype="float32", engine_process=False, max_num_seqs=8,
                 cpu_threads=1)
    yield a
    a.shutdown()


def collect(allm, prompt, params, request_id=None, **kw) -> list:
    async def run():
        return [o async for o in allm.generate(prompt, params, request_id, **kw)]

    return asyncio.run(run())


def idle(allm, wait: float = 10.0) -> bool:
    """Nothing left in the engine (a running request aborted leaves at the worker's next step)."""
    deadline = time.monotonic() + wait
    while allm.engine._requests or allm.engine.num_running or allm._active:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def runs_cleanly(allm, run, caplog) -> None:
    """asyncio.run(run()) then a collection leave no warning, no asyncio log (a task failing unseen, one pending at
    the loop's end) and the engine idle with its cache empty."""
    with warnings.catch_warnings(record=True) as seen, caplog.at_level(logging.WARNING, logger="asyncio"):
        warnings.simplefilter("always")
        asyncio.run(run())
        gc.collect()
    assert not seen and not caplog.records
    assert idle(allm) and allm.engine.kv_cache_usage() == 0.0


async def cancelled_after(coro, seconds: float) -> None:
    """Run coro as a task, cancel it after `seconds` and see it end cancelled."""
    task = asyncio.ensure_future(coro)
    await asyncio.sleep(seconds)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


def greedy(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, **kw)


def test_cumulative_outputs_grow_to_llm_generate(allm, llm):
    outs = collect(allm, "Hello world", greedy(12))
    ref = llm.generate("Hello world", greedy(12))[0]
    assert len(outs) >= 2
    assert [o.finished for o in outs] == [False] * (len(outs) - 1) + [True]
    last = outs[-1]
    assert (last.text, last.token_ids, last.finish_reason) == (ref.text, ref.token_ids, "length")
    assert last.prompt == "Hello world" and last.prompt_token_ids == ref.prompt_token_ids
    for a, b in zip(outs, outs[1:]):  # each a prefix of the next, and kept as it was given (a snapshot)
        assert b.token_ids[:len(a.token_ids)] == a.token_ids and len(b.token_ids) > len(a.token_ids)
        assert b.text.startswith(a.text)
    assert len({o.request_id for o in outs}) == 1
    assert idle(allm)


def test_delta_and_final_only_give_the_same_completion(allm):
    cum = collect(allm, [5, 6, 7, 8], greedy(10))[-1]
    deltas = collect(allm, [5, 6, 7, 8], greedy(10, output_kind=RequestOutputKind.DELTA))
    assert "".join(d.text for d in deltas) == cum.text
    assert [t for d in deltas for t in d.token_ids] == cum.token_ids
    assert [d.finished for d in deltas][-1] and not any(d.finished for d in deltas[:-1])
    final = collect(allm, {"prompt_token_ids": [5, 6, 7, 8]}, greedy(10, output_kind="final_only"))
    assert len(final) == 1 and final[0].finished
    assert (final[0].text, final[0].token_ids) == (cum.text, cum.token_ids)


def test_n_with_seed_equals_llm_generate(allm, llm):
    sp = SamplingParams(temperature=1.0, max_tokens=8, seed=77, n=3, logprobs=2)
    ref = llm.generate("Once upon", sp)[0]
    outs = collect(allm, "Once upon", sp)
    last = outs[-1]
    assert last.finished and len(last.outputs) == 3
    assert [c.index for c in last.outputs] == [0, 1, 2]
    assert [c.token_ids for c in last.outputs] == [c.token_ids for c in ref.outputs]
    assert [c.text for c in last.outputs] == [c.text for c in ref.outputs]
    for c, r in zip(last.outputs, ref.outputs):
        assert c.cumulative_logprob == pytest.approx(r.cumulative_logprob, abs=1e-4)
    # Until the last output some completion is unfinished; delta outputs carry only the completions that changed.
    assert not any(o.finished for o in outs[:-1])
    deltas = collect(allm, "Once upon", dataclasses.replace(sp, output_kind=RequestOutputKind.DELTA))
    for j in range(3):
        assert [t for d in deltas for c in d.outputs if c.index == j for t in c.token_ids] == ref.outputs[j].token_ids
    assert deltas[-1].finished and not any(d.finished for d in deltas[:-1])


def test_many_tasks_at_once_equal_each_alone(allm, llm):
    prompts = [[3 + i, 40 + 7 * i, 9, 100 + i] * (1 + i % 3) for i in range(10)]
    params = [greedy(4 + i % 5) for i in range(10)]
    refs = [llm.generate(p, sp)[0].token_ids for p, sp in zip(prompts, params)]

    async def one(i):
        last = None
        async for o in allm.generate(prompts[i], params[i], f"task-{i}"):
            last = o
        return last.token_ids

    async def run():
        return await asyncio.gather(*(one(i) for i in range(10)))

    assert asyncio.run(run()) == refs
    assert idle(allm)


def test_two_threads_each_with_its_loop(allm, llm):
    """Two threads, each running its own event loop, using one AsyncLLM at once (n=2 each)."""
    import threading

    sp = SamplingParams(temperature=1.0, max_tokens=6, seed=3, n=2)
    got: dict[int, list[list[int]]] = {}

    def work(i: int) -> None:
        got[i] = [c.token_ids for c in collect(allm, [5, 6, 7 + i], sp, f"thread-{i}")[-1].outputs]

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert got == {i: [c.token_ids for c in llm.generate([5, 6, 7 + i], sp)[0].outputs] for i in range(2)}
    assert idle(allm)


def test_abort_ends_the_request_and_frees_it(allm):
    async def run():
        seen = []
        async for o in allm.generate("abc", greedy(400), "to-abort"):
            seen.append(o)
            if len(seen) == 2:
                assert await allm.abort("to-abort")
        return seen

    seen = asyncio.run(run())
    assert seen[-1].finished and seen[-1].finish_reason == "abort"
    assert len(seen[-1].token_ids) < 400
    assert not asyncio.run(allm.abort("to-abort"))  # ended
    assert idle(allm)


def test_leaving_early_aborts(allm):
    aborted = allm.engine.num_aborted

    async def run():
        async for _ in allm.generate("abc", greedy(400, n=2), "left"):
            break
        await cancelled_after(consume(), 0.2)

    async def consume():
        async for _ in allm.generate("xyz", greedy(400), "cancelled"):
            pass

    asyncio.run(run())
    assert idle(allm)
    assert allm.engine.num_aborted == aborted + 3  # both completions of the first, the cancelled one


def test_prompt_options(allm, llm):
    sp = greedy(5, prompt_logprobs=2)
    ref = llm.generate("The quick brown fox", sp)[0]
    out = collect(allm, "The quick brown fox", sp)[-1]
    assert out.token_ids == ref.token_ids
    assert [(p.token_id, p.logprob) for p in out.prompt_logprobs[1:]] == \
        [(p.token_id, pytest.approx(r.logprob, abs=1e-4)) for p, r in zip(out.prompt_logprobs[1:],
                                                                           ref.prompt_logprobs[1:])]
    ids = llm.tokenizer.encode("one two three four five six")
    cut = collect(allm, ids, greedy(4, truncate_prompt_tokens=3))[-1]
    assert cut.prompt_token_ids == ids[-3:]
    assert cut.token_ids == llm.generate(ids[-3:], greedy(4))[0].token_ids
    silent = collect(allm, ids, greedy(4, detokenize=False))[-1]
    assert silent.text == "" and len(silent.token_ids) == 4


def test_bad_input_is_refused_before_queueing(allm):
    too_long = [5] * (allm.context_length + 1)
    with pytest.raises(PromptTooLongError):
        collect(allm, too_long, greedy(2))
    with pytest.raises(ValueError, match="LoRA"):
        collect(allm, "x", greedy(2), lora_request=object())
    with pytest.raises(ValueError, match="output_kind"):
        greedy(2, output_kind="sometimes")
    with pytest.raises(ValueError, match="output_kind"):
        greedy(2, output_kind=3)
    with pytest.raises(TypeError, match="SamplingParams"):
        collect(allm, "x", {"max_tokens": 2})
    with pytest.raises(ValueError, match="priority"):  # fcfs: vLLM refuses a priority too
        collect(allm, "x", greedy(2), priority=3)
    with pytest.raises(ValueError, match="request_id"):
        collect(allm, "x", greedy(2), request_id="")

    async def twice():
        gen = allm.generate("abc", greedy(200), "same")
        await anext(gen)
        try:
            with pytest.raises(ValueError, match="already in use"):
                await anext(allm.generate("abc", greedy(2), "same"))
        finally:
            await gen.aclose()

    asyncio.run(twice())
    assert idle(allm)
    assert collect(allm, "ok", greedy(2))[-1].finished  # still serving


def test_from_engine_and_errors_after_shutdown(llm):
    from cpm4.serve import AsyncEngine
    from cpm4.serve.engine import EngineClosedError

    a = AsyncLLM.from_engine(AsyncEngine(llm.model, llm.tokenizer, max_batch_size=2))
    assert a.get_tokenizer() is llm.tokenizer and a.is_running
    assert collect(a, "Hi", greedy(3))[-1].token_ids == llm.generate("Hi", greedy(3))[0].token_ids
    a.shutdown()
    assert not a.is_running and a.errored  # vLLM's: a shut-down engine counts as errored
    with pytest.raises(EngineClosedError):
        collect(a, "Hi", greedy(3))


def test_constructor_checks_before_loading(tmp_path):
    with pytest.raises(Exception, match="not found"):
        AsyncLLM(tmp_path / "missing")
    with pytest.raises(TypeError, match="unexpected keyword"):
        AsyncLLM(tmp_path, no_such_option=1)
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        AsyncLLM(tmp_path, tensor_parallel_size=2)


def test_engine_in_a_child_process(tiny_checkpoint, llm):
    """engine_process=True (the default on CUDA): the same outputs from the child's engine, abort included."""
    a = AsyncLLM(tiny_checkpoint, device="cpu", dtype="float32", engine_process=True, max_num_seqs=4,
                 cpu_threads=1)
    try:
        sp = SamplingParams(temperature=1.0, max_tokens=6, seed=5, n=2)
        assert [c.token_ids for c in collect(a, "Once upon", sp)[-1].outputs] == \
            [c.token_ids for c in llm.generate("Once upon", sp)[0].outputs]

        async def run():
            outs = []
            async for o in a.generate("abc", greedy(400), "child-abort"):
                outs.append(o)
                await a.abort("child-abort")
            return outs[-1]

        last = asyncio.run(run())
        assert last.finish_reason == "abort" and last.finished
        assert idle(a)

        async def more():
            with pytest.raises(ValueError, match="logits_processors"):  # refused here, not in the child
                await anext(a.generate("abc", greedy(2, logits_processors=[lambda ids, logits: logits])))
            gen = a.generate("abc", greedy(400, n=2), "child-early")
            first = asyncio.ensure_future(anext(gen))
            await asyncio.sleep(0)  # not queued yet
            assert await a.abort(["child-early"])
            assert [c.finish_reason for c in [await first, *[o async for o in gen]][-1].outputs] == ["abort"] * 2
            async for _ in a.generate("abc", greedy(400, n=2), "child-left"):
                break
            # Cancelled while the child scores its prompt: the reply, come later, stopped the engine process.
            scoring = asyncio.ensure_future(anext(a.generate([5 + i % 900 for i in range(600)],
                                                             greedy(2, prompt_logprobs=1))))
            await asyncio.sleep(0)
            scoring.cancel()
            with pytest.raises(asyncio.CancelledError):
                await scoring
            out = [o async for o in a.generate([5 + i % 900 for i in range(600)], greedy(2, prompt_logprobs=1))]
            assert out[-1].finished and len(out[-1].prompt_logprobs) == 600

        asyncio.run(more())
        assert a.is_running
        assert idle(a)
        deadline = time.monotonic() + 10
        while a.engine.kv_cache_usage() and time.monotonic() < deadline:  # as the child reports it
            time.sleep(0.01)
        assert a.engine.kv_cache_usage() == 0.0
    finally:
        a.shutdown()


def test_one_final_output_when_the_engine_ends_a_completion_apart(llm):
    """An engine that hands a completion's last delta and the end of its stream over apart (the plain loop,
    continuous=False, posts them one by one): the last delta is given once, and only the last output is finished
    (the end marker alone gave a DELTA reader the whole completion again, and a cumulative one a repeat)."""
    from cpm4.serve import AsyncEngine

    a = AsyncLLM.from_engine(AsyncEngine(llm.model, llm.tokenizer, max_batch_size=2, continuous=False))
    try:
        for i in range(4):
            deltas = collect(a, [5, 6, 7 + i], greedy(4, output_kind=RequestOutputKind.DELTA))
            assert len([t for d in deltas for t in d.token_ids]) == 4
            cum = collect(a, [5, 6, 7 + i], greedy(4))
            for outs in (deltas, cum):
                assert [o.finished for o in outs] == [False] * (len(outs) - 1) + [True]
                assert [o.finish_reason for o in outs] == [None] * (len(outs) - 1) + ["length"]
            assert [t for d in deltas for t in d.token_ids] == cum[-1].token_ids
    finally:
        a.shutdown()


def test_request_ids_free_again_and_never_colliding(allm):
    """A request id is the caller's: one that ends with `#0` beside an n=2 request, and one used again right after
    its request was closed, cancelled or gave its final output (the engine request of a closed one lives on until the
    worker's next step; its id was the caller's, so the new one was refused as "already in use")."""
    async def run():
        mine = allm.generate("abc", greedy(300), "x#0")
        await anext(mine)
        both = [o async for o in allm.generate("abc", greedy(3, n=2), "x")][-1]
        assert [c.finish_reason for c in both.outputs] == ["length", "length"]
        await mine.aclose()
        assert [o async for o in allm.generate("abc", greedy(2), "x#0")][-1].finish_reason == "length"

        closed = allm.generate("abc", greedy(300, n=2), "again")
        await anext(closed)
        await closed.aclose()
        assert [o async for o in allm.generate("abc", greedy(2), "again")][-1].finished

        async def consume():
            async for _ in allm.generate("abc", greedy(300), "cancelled"):
                pass

        await cancelled_after(consume(), 0.2)
        assert [o async for o in allm.generate("abc", greedy(2), "cancelled")][-1].finished

        held = allm.generate("abc", greedy(2), "done")  # read up to its final output, not closed
        async for o in held:
            if o.finished:
                break
        assert not await allm.abort("done")  # it ended
        assert [o async for o in allm.generate("abc", greedy(2), "done")][-1].finished
        await held.aclose()

        chat = allm.chat([{"role": "user", "content": "hi"}], greedy(300), "chat")
        await anext(chat)
        await chat.aclose()  # its generate closed with it: the request aborted, the id free
        assert not await allm.abort("chat")
        assert [o async for o in allm.chat([{"role": "user", "content": "hi"}], greedy(2), "chat")][-1].finished

    asyncio.run(run())
    assert idle(allm)


def test_abort_before_the_engine_has_the_request(allm):
    """An abort between `generate`'s start and its engine requests' queueing (the prompt's logprobs being computed,
    or the tasks not started yet) ends it; it was lost (False, and the request ran to max_tokens). vLLM's forms:
    `await llm.abort(id)`, a list of ids."""
    async def early(**kw):
        gen = allm.generate("abc", greedy(300, n=2, **kw), "early")
        first = asyncio.ensure_future(anext(gen))
        await asyncio.sleep(0)  # generate runs up to its first wait
        assert await allm.abort("early")
        outs = [await first] + [o async for o in gen]
        assert [(c.token_ids, c.finish_reason) for c in outs[-1].outputs] == [([], "abort")] * 2
        assert outs[-1].finished and len(outs) == 1

    async def several():
        gens = [allm.generate("abc", greedy(300), f"s{i}") for i in range(3)]
        for g in gens:
            await anext(g)
        assert await allm.abort(["s0", "s2", "unknown"])
        assert not await allm.abort(iter(["unknown"]))
        ends = []
        for g in gens:
            ends.append([o.finish_reason async for o in g][-1])
        return ends

    asyncio.run(early())
    asyncio.run(early(prompt_logprobs=1))
    assert asyncio.run(several()) == ["abort", "length", "abort"]
    assert idle(allm)


def test_delta_outputs_give_each_thing_once(allm):
    """DELTA with logprobs: each output's logprobs are its new tokens' only; the prompt's logprobs come with the
    first output alone (vLLM's; they were repeated in every delta)."""
    sp = greedy(6, logprobs=1, prompt_logprobs=1, output_kind=RequestOutputKind.DELTA)
    deltas = collect(allm, [5, 6, 7, 8], sp)
    cum = collect(allm, [5, 6, 7, 8], dataclasses.replace(sp, output_kind=RequestOutputKind.CUMULATIVE))[-1]
    assert len(deltas) >= 2
    assert [len(d.logprobs) for d in deltas] == [len(d.token_ids) for d in deltas]
    assert [lp.token_id for d in deltas for lp in d.logprobs] == cum.token_ids
    assert len(deltas[0].prompt_logprobs) == 4 and all(d.prompt_logprobs is None for d in deltas[1:])
    # cumulative_logprob is the running total (vLLM's), not the piece's sum
    totals = list(itertools.accumulate(sum(lp.logprob for lp in d.logprobs) for d in deltas))
    assert [d.cumulative_logprob for d in deltas] == pytest.approx(totals, abs=1e-9)
    assert deltas[-1].cumulative_logprob == pytest.approx(cum.cumulative_logprob, abs=1e-9)


def test_vllm_generate_arguments(allm):
    """vLLM's keyword arguments of generate: taken where they change nothing cpm4 does, refused clearly where they
    would."""
    ids = allm.tokenizer.encode("Hello")
    out = collect(allm, ids, greedy(2), prompt_text="Hello", trace_headers={"traceparent": "00-ab-cd-01"},
                  data_parallel_rank=0, tokenization_kwargs={"add_special_tokens": True})[-1]
    assert out.prompt == "Hello" and out.prompt_token_ids == ids
    with pytest.raises(ValueError, match="data_parallel_rank"):
        collect(allm, ids, greedy(2), data_parallel_rank=1)
    with pytest.raises(ValueError, match="tokenization_kwargs"):
        collect(allm, "Hello", greedy(2), tokenization_kwargs={"truncation": True, "max_length": 2})
    assert idle(allm)


def test_generator_dropped_unclosed_leaves_nothing(allm, caplog):
    """A generator dropped after its first output, its loop then ending: the request aborted, no task left pending
    or failing unseen (asyncio logs those), no warnings."""
    async def run():
        gen = allm.generate("abc", greedy(300, n=2), "dropped")
        await anext(gen)
        del gen

    runs_cleanly(allm, run, caplog)


def test_one_failing_completion_ends_the_request_cleanly(allm, caplog):
    """A logits processor raising in one completion of n=2 (the engine fails that engine request alone): the
    request raises EngineError, the other completion is aborted, no task error is left unseen."""
    from cpm4.serve.engine import EngineError

    calls = []

    def flaky(ids, logits):
        calls.append(len(ids))
        if len(calls) == 5:
            raise RuntimeError("boom")
        return logits

    async def run():
        with pytest.raises(EngineError, match="boom"):
            async for _ in allm.generate("abc", greedy(300, n=2, logits_processors=[flaky]), "flaky"):
                pass

    runs_cleanly(allm, run, caplog)


def test_errored_after_the_worker_died(llm, caplog):
    """The worker dying with requests in flight (n=2): the request fails with EngineError, the other completion's
    task ends unseen, `errored` turns true (`AsyncEngine.failure`), later requests get EngineClosedError."""
    from cpm4.serve import AsyncEngine
    from cpm4.serve.engine import EngineClosedError, EngineError

    class Fatal(BaseException):
        pass

    a = AsyncLLM.from_engine(AsyncEngine(llm.model, llm.tokenizer, max_batch_size=2))

    async def run():
        gen = a.generate("abc", greedy(300, n=2), "dies")
        await anext(gen)

        def step():
            raise Fatal("gone")

        a.engine._sched.step = step
        with pytest.raises(EngineError, match="Fatal"):
            async for _ in gen:
                pass

    try:
        logging.getLogger("cpm4.serve.engine").disabled = True  # its traceback of the worker's failure
        with warnings.catch_warnings(record=True) as seen, caplog.at_level(logging.WARNING, logger="asyncio"):
            warnings.simplefilter("always")
            asyncio.run(run())
            gc.collect()
        assert not seen and not caplog.records
        assert a.errored and not a.is_running and a.engine.failure is not None and not a._active
        with pytest.raises(EngineClosedError, match="Fatal"):
            collect(a, "Hi", greedy(2))
    finally:
        logging.getLogger("cpm4.serve.engine").disabled = False
        a.shutdown()


def test_defaults_from_the_checkpoint_generation_config(tiny_checkpoint, tmp_path, llm):
    """generate without SamplingParams: the checkpoint's generation_config.json values (generation_config="auto")."""
    folder = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, folder)
    cfg = json.loads((folder / "generation_config.json").read_text())
    (folder / "generation_config.json").write_text(json.dumps({**cfg, "temperature": 0.0, "max_new_tokens": 3}))
    a = AsyncLLM(folder, device="cpu", dtype="float32", engine_process=False, max_num_seqs=2, cpu_threads=1)
    try:
        assert a.get_default_sampling_params().max_tokens == 3
        out = collect(a, "Once upon", None)[-1]
        ref = llm.generate("Once upon", SamplingParams(temperature=0, max_tokens=3))[0]
        assert out.token_ids == ref.token_ids and len(out.token_ids) <= 3
    finally:
        a.shutdown()


@pytest.mark.gpu
def test_async_llm_on_cuda(tiny_checkpoint):
    """The default on CUDA (the engine in a child process, CUDA graphs) against `LLM` on the same GPU, greedy;
    then many tasks at once."""
    import gc

    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA")
    gpu = LLM(tiny_checkpoint, device="cuda", dtype="float32", kv_cache_tokens=4096)
    a = AsyncLLM(tiny_checkpoint, device="cuda", dtype="float32", max_num_seqs=4, kv_cache_tokens=4096)
    try:
        assert type(a.engine).__name__ == "ProcessEngine"
        prompts = ["The sky is", "Once upon a time", "def main():", "1, 2, 3,"]
        # One at a time, so both run the same batches (a GPU's kernels may round differently by batch size).
        for p in prompts:
            assert collect(a, p, greedy(24))[-1].token_ids == gpu.generate(p, greedy(24))[0].token_ids

        async def one(p):
            return [o async for o in a.generate(p, greedy(24))][-1].token_ids

        async def run():
            return await asyncio.gather(*(one(p) for p in prompts * 3))

        assert [len(t) for t in asyncio.run(run())] == [24] * 12
        assert idle(a)
    finally:
        a.shutdown()
        del gpu
        gc.collect()
        torch.cuda.empty_cache()


def test_chat_equals_llm_chat(allm, llm):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    ref = llm.chat(msgs, greedy(8))[0]

    async def run():
        return [o async for o in allm.chat(msgs, greedy(8), "chat-1")]

    last = asyncio.run(run())[-1]
    assert (last.prompt_token_ids, last.token_ids, last.text) == (ref.prompt_token_ids, ref.token_ids, ref.text)
    async def bad():
        return await anext(allm.chat("hello"))

    with pytest.raises(ValueError, match="messages"):
        asyncio.run(bad())
