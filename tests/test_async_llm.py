"""`cpm4.AsyncLLM` (vLLM's AsyncLLM): outputs of `generate` against `LLM.generate` run on the same weights (greedy,
and seeded sampling with n > 1), the three output kinds against each other, many tasks at once, abort and early
exit freeing the engine, and bad input refused before anything is queued."""

from __future__ import annotations

import asyncio
import dataclasses
import time

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


def test_abort_ends_the_request_and_frees_it(allm):
    async def run():
        seen = []
        async for o in allm.generate("abc", greedy(400), "to-abort"):
            seen.append(o)
            if len(seen) == 2:
                assert allm.abort("to-abort")
        return seen

    seen = asyncio.run(run())
    assert seen[-1].finished and seen[-1].finish_reason == "abort"
    assert len(seen[-1].token_ids) < 400
    assert not allm.abort("to-abort")  # ended
    assert idle(allm)


def test_leaving_early_aborts(allm):
    aborted = allm.engine.num_aborted

    async def run():
        async for _ in allm.generate("abc", greedy(400, n=2), "left"):
            break
        task = asyncio.ensure_future(consume())
        await asyncio.sleep(0.2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

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
    assert not a.is_running and not a.errored
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
                a.abort("child-abort")
            return outs[-1]

        last = asyncio.run(run())
        assert last.finish_reason == "abort" and last.finished
        assert idle(a)
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
