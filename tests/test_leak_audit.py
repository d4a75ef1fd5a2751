"""State left behind by ended requests: after requests end every way (finished, aborted, left mid-stream, cancelled,
refused, failed in a logits processor, n > 1, prompt logprobs, a grammar, preempted in a small cache, prefix-cached),
every per-request structure of the scheduler, the engine, AsyncLLM and the KV cache is back to its baseline, and a
failed request's error (with the frames and logits it keeps) is freed by reference counting alone."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import random
import time
import weakref
from collections.abc import Iterator

import pytest
import torch

from cpm4 import LLM, AsyncLLM, SamplingParams
from cpm4.engine.scheduler import RequestError, build_engine
from cpm4.serve import AsyncEngine
from cpm4.serve import engine as engine_module
from cpm4.serve.streaming import merge_streams


@pytest.fixture(scope="module")
def llm(tiny_checkpoint):
    return LLM(tiny_checkpoint, device="cpu", dtype="float32")


class ProcessorError(RuntimeError):
    """(A class of its own: built-in exceptions take no weak references.)"""


class Failing:
    """A logits processor that raises, keeping a weak reference to each error it raised."""

    def __init__(self) -> None:
        self.errors: list[weakref.ref] = []

    def __call__(self, ids: list[int], row: torch.Tensor) -> torch.Tensor:
        try:
            raise ProcessorError("processor failed")
        except ProcessorError as e:  # (not named past here: the error keeps this frame)
            self.errors.append(weakref.ref(e))
            raise


@contextlib.contextmanager
def no_collector() -> Iterator[None]:
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def freed(refs: list[weakref.ref], wait: float = 10.0) -> bool:
    """Whether every referent dies (by reference counting: the collector is off), waiting for the worker thread to
    leave the frames that still name them."""
    deadline = time.monotonic() + wait
    while any(r() is not None for r in refs):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_failed_processor_errors_are_freed_without_the_collector(llm):
    """A processor's error keeps the frames it passed through; a frame naming it (the scheduler's sampling frames,
    the engine stream, the merged streams, AsyncLLM, the worker loop) made a cycle or a lasting reference that held
    the step's logits and the batch's requests until a full collection (or the next failure)."""
    eng = AsyncEngine(llm.model, llm.tokenizer, max_batch_size=4, kv_cache_tokens=640, cpu_threads=1)
    allm = AsyncLLM.from_engine(eng)
    proc = Failing()

    async def run() -> None:
        async def merged(i: int) -> None:  # two streams of one HTTP request, both failing
            sp = SamplingParams(max_tokens=3, logits_processors=[proc])
            with contextlib.suppress(engine_module.EngineError):
                async for _ in merge_streams([eng.stream([5, 6, 7 + i], sp, f"m{i}-{j}") for j in range(2)]):
                    pass

        async def generated(i: int) -> None:  # n=2 through AsyncLLM
            sp = SamplingParams(max_tokens=3, n=2, logits_processors=[proc])
            with contextlib.suppress(engine_module.EngineError):
                async for _ in allm.generate([5, 6, 9 + i], sp, f"a{i}"):
                    pass

        async def fine(i: int) -> None:
            async for _ in eng.stream([5, 8, 7 + i], SamplingParams(max_tokens=3), f"ok{i}"):
                pass

        await asyncio.gather(*[f(i) for i in range(3) for f in (merged, generated, fine)])

    try:
        with no_collector():
            asyncio.run(run())
            assert len(proc.errors) >= 6
            assert freed(proc.errors)
    finally:
        eng.shutdown()


def test_an_idle_engine_holds_no_ended_request(llm):
    """The last sampled batch is cached for the next step; once nothing runs it must not keep the ended requests'
    params, logits processors and states alive."""
    eng = build_engine(llm.model, llm.tokenizer, kv_cache_tokens=640, max_batch_size=4)

    class Keep:
        def __call__(self, ids: list[int], row: torch.Tensor) -> torch.Tensor:
            return row

    proc = Keep()
    ref = weakref.ref(proc)
    for i in range(3):
        eng.add_request(f"r{i}", [5, 6, 7 + i], SamplingParams(max_tokens=4, logits_processors=[proc]))
    del proc
    eng.run_to_completion()
    gc.collect()
    assert ref() is None


def _check_idle(allm: AsyncLLM) -> None:
    eng = allm.engine
    sched = eng._sched
    cache = sched.cache
    assert not allm._active
    assert not eng._requests and not eng._waiting
    assert len(eng._finished) <= engine_module._HISTORY
    assert not sched.by_id and not sched.waiting and not sched.running
    assert not sched._computing and not sched._pending and not sched._failed and not sched._held
    assert sched._inflight is None and sched._sampling is None and not sched._aborts
    assert cache.num_free == cache.num_pages  # every page free or a reclaimable prefix page
    assert len(cache.prefix) <= cache.num_pages and len(cache._lru) <= 2 * cache.num_pages + 64
    assert sorted(cache.free + [p for p in cache.prefix.values()]) == list(range(cache.num_pages))


def test_mixed_workload_leaves_every_structure_at_its_baseline(tiny_checkpoint):
    """Rounds of requests ending every way through AsyncLLM on the thread engine, with a cache small enough to
    preempt and a shared prefix: after each round everything is back to its baseline, and the objects alive do
    not grow from round to round."""
    pytest.importorskip("xgrammar")
    allm = AsyncLLM(tiny_checkpoint, device="cpu", dtype="float32", engine_process=False, max_num_seqs=6,
                    kv_cache_tokens=320, chunk_tokens=64, cpu_threads=1)
    rng = random.Random(0)
    shared = [rng.randrange(3, 500) for _ in range(40)]
    proc = Failing()

    async def one(i: int, k: int) -> None:
        kind = i % 10
        prompt = (shared if kind % 2 else []) + [rng.randrange(3, 500) for _ in range(rng.randrange(3, 60))]
        kw: dict = {"max_tokens": rng.randrange(1, 50), "temperature": 1.0, "seed": i, "ignore_eos": True}
        kw.update([{"n": 3}, {"prompt_logprobs": 2, "logprobs": 2}, {"logits_processors": [proc]},
                   {"guided_json": {"type": "object"}, "ignore_eos": False}, {"stop": ["a"]},
                   {"max_tokens": 5, "temperature": -1}, {}, {}, {}, {}][kind])
        if kind == 6:
            prompt = prompt * 200  # longer than the context
        rid = f"{k}-{i}"
        with contextlib.suppress(ValueError, engine_module.EngineError):
            outs = allm.generate(prompt, SamplingParams(**kw), rid)
            n = 0
            async for _ in outs:
                n += 1
                if kind == 7 and n == 2:
                    break  # the reader leaves mid-stream
                if kind == 8:
                    await allm.abort(rid)
            await outs.aclose()

    async def cancelled(i: int, k: int) -> None:
        task = asyncio.ensure_future(one(i, k))
        for _ in range(i % 4):
            await asyncio.sleep(0)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    async def rounds(k: int) -> None:
        await asyncio.gather(*[one(i, k) for i in range(30)], *[cancelled(i, k) for i in range(4)])

    def settle() -> None:  # a request aborted from a closed stream leaves at the worker's next step
        deadline = time.monotonic() + 10
        while (allm.engine._requests or allm.engine._sched.running) and time.monotonic() < deadline:
            time.sleep(0.01)
        gc.collect()

    try:
        counts = []
        for k in range(3):
            asyncio.run(rounds(k))
            settle()
            _check_idle(allm)
            counts.append(len(gc.get_objects()))
        assert allm.engine.num_preempted > 0  # the cache was small enough to preempt
        assert counts[2] - counts[1] < 300, counts  # ~30 requests a round: 10 objects each would show
        assert proc.errors and freed(proc.errors, 0)
    finally:
        allm.shutdown()


def test_scheduler_alone_after_preemption_aborts_and_failures(llm):
    """The scheduler without an engine around it: aborts in every state, failures, preemption (priority policy)
    and prefix sharing leave no request, page or computing entry behind."""
    eng = build_engine(llm.model, llm.tokenizer, kv_cache_tokens=320, max_batch_size=6, chunk_tokens=64,
                       scheduling_policy="priority")
    rng = random.Random(1)
    shared = [rng.randrange(3, 500) for _ in range(70)]
    proc = Failing()
    live = []
    for i in range(40):
        prompt = (shared if i % 3 == 0 else []) + [rng.randrange(3, 500) for _ in range(rng.randrange(3, 90))]
        sp = SamplingParams(max_tokens=rng.randrange(1, 80), ignore_eos=True, priority=rng.randrange(3),
                            logits_processors=[proc] if i % 7 == 3 else None, logprobs=1 if i % 5 == 0 else None)
        eng.add_request(f"r{i}", prompt, sp)
        live.append(f"r{i}")
    steps = 0
    while eng.has_work():
        steps += 1
        if steps % 4 == 0 and live:
            eng.abort(live.pop(rng.randrange(len(live))))
        with contextlib.suppress(RequestError):
            eng.step()
    cache = eng.cache
    assert eng.num_preempted > 0
    assert not eng.by_id and not eng.waiting and not eng.running and not eng._computing
    assert not eng._failed and not eng._held and not eng._pending and eng._sampling is None
    assert cache.num_free == cache.num_pages
    assert sorted(cache.free + list(cache.prefix.values())) == list(range(cache.num_pages))
