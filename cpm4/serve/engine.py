"""An asyncio front end to the synchronous generate loop.

The model runs on one background worker thread; the asyncio side only queues requests and reads deltas.
By default the worker drives the continuous-batching scheduler over a paged KV cache
(`cpm4.engine.scheduler`): requests join between decode steps and free their pages when they end. With
`continuous=False` it takes up to `max_batch_size` waiting requests and runs them together through
`generate_stream` (requests arriving meanwhile wait for that batch).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass

import torch

from cpm4.engine.generate import (
    DetachedText,
    PromptTooLongError,
    StreamDelta,
    TokenLogprob,
    check_prompt_ids,
    context_length,
    fit_to_context,
    generate_stream,
    prompt_logprobs,
)
from cpm4.engine.params import check_priority, check_scheduling_policy
from cpm4.engine.sampling import SamplingParams
from cpm4.engine.scheduler import (
    LLMEngine,
    RequestError,
    build_engine,
    cache_capacity,
    default_chunk_tokens,
    default_kv_cache_tokens,
)
from cpm4.model.config import is_int
from cpm4.model.modeling import MiniCPM4ForCausalLM
from cpm4.model.tokenizer import Tokenizer

log = logging.getLogger(__name__)

__all__ = ["AsyncEngine", "EngineClosedError", "EngineError", "PromptTooLongError", "RequestStats"]

# How many finished request ids (with their finish reasons) are remembered for inspection.
_HISTORY = 1024


class EngineError(RuntimeError):
    """Generation failed inside the worker: for the batch this request was in, or for this request alone (its
    logits processor raised: the error's cause)."""


class EngineClosedError(RuntimeError):
    """The engine was shut down before the request finished."""


_END = object()  # queued after a request's last delta


@dataclass(frozen=True)
class RequestStats:
    """One finished request as `AsyncEngine.request_observers` receive it. ttft: seconds from queueing to the
    first generated token (None when none came); e2e: seconds from queueing to the end; finish_reason: the
    last delta's ("stop", "length", "abort", ...), "error" when it failed; cached_tokens: prompt tokens the paged
    cache's shared prefixes held at admission (None: never admitted, or no paged cache)."""

    prompt_tokens: int
    generation_tokens: int
    ttft: float | None
    e2e: float
    finish_reason: str
    cached_tokens: int | None = None


@dataclass(eq=False)
class _Request:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    # Written by the loop thread, read by the worker between steps; a bool store is atomic under the GIL.
    aborted: bool = False
    finish_reason: str | None = None
    # False: the reader takes the text only at the end (a response that is not streamed), so the engine decodes
    # it once when the request ends instead of id by id every step (`LLMEngine.add_request`'s stream_text).
    stream_text: bool = True
    # False: the engine sends this request's token ids without text (`LLMEngine.add_request`'s detokenize); the
    # process that reads them decodes it (`ProcessEngine`, which passes stream_text=False with it).
    detokenize: bool = True
    detached: DetachedText | None = None  # what the reader of such a request's ids decodes them with


def _join(a: StreamDelta, b: StreamDelta) -> StreamDelta:
    """Two consecutive deltas of one request as one."""
    lps = None if a.logprobs is None and b.logprobs is None else (a.logprobs or []) + (b.logprobs or [])
    cached = a.cached_tokens if b.cached_tokens is None else b.cached_tokens
    return StreamDelta(a.index, a.text + b.text, a.token_ids + b.token_ids, b.finish_reason, lps, cached,
                       b.stop_reason)


def _deliver(batch: list[tuple[asyncio.Queue, object]]) -> None:
    for queue, item in batch:
        queue.put_nowait(item)


def check_engine_options(max_batch_size: int, cpu_threads: int | None) -> None:
    if cpu_threads is not None and (not is_int(cpu_threads)
                                    or cpu_threads < 1):
        raise ValueError(f"cpu_threads must be a positive int, got {cpu_threads!r}")
    if not is_int(max_batch_size) or max_batch_size < 1:
        raise ValueError(f"max_batch_size must be a positive int, got {max_batch_size!r}")


class AsyncEngine:
    """Serve generation requests from asyncio code; one worker thread owns the model."""

    def __init__(self, model: MiniCPM4ForCausalLM, tokenizer: Tokenizer, max_batch_size: int = 16,
                 continuous: bool = True, kv_cache_tokens: int | None = None, chunk_tokens: int | None = None,
                 gpu_memory_utilization: float | None = None, cuda_graphs: bool | None = None,
                 compile: bool = False, async_output: bool | None = None, max_model_len: int | None = None,
                 cpu_threads: int | None = None, enable_prefix_caching: bool = True,
                 cascade_decode: bool | None = None, scheduling_policy: str = "fcfs") -> None:
        """continuous: run the paged-cache scheduler (requests join between decode steps); False runs
        whole batches through the plain generate loop. kv_cache_tokens: KV cache size in tokens (default: see
        `default_kv_cache_tokens`; on CUDA what gpu_memory_utilization (0.9) of the device leaves, elsewhere
        max_batch_size sequences of up to 8192 tokens or the context, whichever is shorter). cuda_graphs:
        see `LLMEngine` (default: on CUDA); compile: torch.compile the captured decode step; async_output: see
        `LLMEngine` (default: on with CUDA graphs); max_model_len: the longest request served, prompt and
        output (default: the model's context; see `context_length`). cpu_threads: torch's intra-op threads
        on the worker thread (set there before its first step; other threads keep theirs; None: the
        default). enable_prefix_caching: see `PagedKVCache` (vLLM's option); cascade_decode, scheduling_policy:
        see `LLMEngine` (the plain loop takes a batch of the lowest priority values first)."""
        check_engine_options(max_batch_size, cpu_threads)
        check_scheduling_policy(scheduling_policy)
        self.scheduling_policy = scheduling_policy
        self.cpu_threads = cpu_threads
        self.continuous = continuous
        self.enable_prefix_caching = enable_prefix_caching
        self.cascade_decode = cascade_decode
        self.cuda_graphs = cuda_graphs
        self.compile = compile
        self.async_output = async_output
        self.context_length = context_length(model, max_model_len)  # validated before any allocation
        self.max_model_len = max_model_len
        chunk_tokens = default_chunk_tokens(model.device, chunk_tokens)
        if kv_cache_tokens is None:
            kv_cache_tokens = default_kv_cache_tokens(model, max_batch_size, chunk_tokens, gpu_memory_utilization,
                                                      max_model_len)
        self.kv_cache_tokens = kv_cache_tokens
        # The paged cache's whole size bounds a prompt; the plain loop (continuous=False) sizes a cache per batch.
        self.cache_tokens = cache_capacity(model.config, kv_cache_tokens) if continuous else None
        self.chunk_tokens = chunk_tokens
        self.model = model
        self.config = model.config
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.vocab_size = model.config.vocab_size
        self._init_front()
        self._sched: LLMEngine | None = None  # the continuous scheduler (for its cache and preemption counts)
        self._preempted_before = 0  # preemptions of schedulers replaced after a failed step
        target = self._continuous_loop if continuous else self._worker_loop
        self._thread = threading.Thread(target=self._run, args=(target,), name="cpm4-engine", daemon=True)
        self._thread.start()

    def _init_front(self) -> None:
        """The request bookkeeping, counters and observers (also `ProcessEngine`'s, whose worker is elsewhere)."""
        self._cond = threading.Condition()
        # Held by whoever runs the model: the worker for each step, `prompt_logprobs` for its forward pass.
        self._model_lock = threading.Lock()
        self._waiting: collections.deque[_Request] = collections.deque()
        self._requests: dict[str, _Request] = {}  # waiting or running, by id
        self._finished: collections.OrderedDict[str, str] = collections.OrderedDict()
        self._closed = False
        self._failure: str | None = None  # why the engine stopped, when it was not shut down
        # Counters, mainly for monitoring and tests.
        self.num_finished = 0
        self.num_aborted = 0
        self.num_batches = 0
        self.num_prompt_tokens = 0  # of the requests accepted
        self.num_generation_tokens = 0  # streamed to requests so far
        # Called on the requesting event loop as each stream ends (metrics); they must not raise.
        self.request_observers: list[Callable[[RequestStats], None]] = []

    # ----- asyncio side -----

    def check_prompt(self, prompt_ids: Sequence[int], scoring: bool = False) -> list[int]:
        """Validate a prompt (ValueError / PromptTooLongError, also for one the whole KV cache cannot hold) so bad
        input never reaches a batch. scoring: one only scored (`prompt_logprobs`), which may fill the context."""
        return check_prompt_ids(prompt_ids, self.context_length, self.vocab_size, self.cache_tokens, scoring)

    def check_params(self, params: SamplingParams) -> None:
        """Reject settings that would only fail inside the batch (and so take its other requests down)."""
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be SamplingParams, got {type(params).__name__}")
        if params.seed is not None:
            try:
                torch.Generator().manual_seed(params.seed)
            except (ValueError, RuntimeError, OverflowError):
                raise ValueError(f"seed {params.seed} is out of range (64-bit)") from None
        check_priority(params, self.scheduling_policy)
        if params.guided:  # a schema that does not compile fails here, not in the worker
            from cpm4.engine.guided import compile_grammar

            compile_grammar(self.tokenizer, self.vocab_size, self.config.eos_token_ids, params)

    @property
    def is_running(self) -> bool:
        return self._thread.is_alive() and not self._closed

    @property
    def num_waiting(self) -> int:
        """Requests not yet scheduled (vLLM's waiting gauge): queued here, or in the scheduler's queue when the
        batch is full (preempted ones too). The worker moves this queue into the scheduler every step: counting
        it alone, waiting read 0 and running every request."""
        sched = self._sched
        return len(self._waiting) + (len(sched.waiting) if sched is not None else 0)

    @property
    def num_running(self) -> int:
        """Requests in the running batch (at most max_batch_size; prefilling or decoding)."""
        sched = self._sched
        if sched is not None:
            return len(sched.running)
        with self._cond:  # one batch at a time (continuous=False): whatever the worker took
            return len(self._requests) - len(self._waiting)

    @property
    def num_preempted(self) -> int:
        """Sequences preempted (pages taken back, recomputed later) since start."""
        sched = self._sched
        return self._preempted_before + (sched.num_preempted if sched is not None else 0)

    def kv_cache_usage(self) -> float | None:
        """Share of the paged KV cache's pages in use (pages that only hold reusable prefixes count as free);
        None before the scheduler exists or without one (continuous=False)."""
        sched = self._sched
        if sched is None:
            return None
        cache = sched.cache
        # Read on the caller's thread (metrics, the stats log) while the worker may take or publish pages: two
        # counters (`num_free`), never a walk the worker could interrupt; a read between a reclaim's two updates
        # is off by a page, hence the clamp.
        return min(1.0, max(0.0, 1.0 - cache.num_free / cache.num_pages))

    def finish_reason(self, request_id: str) -> str | None:
        """Finish reason of a recently finished request (None if unknown or still running)."""
        return self._finished.get(request_id)

    async def stream(self, prompt_ids: Sequence[int], params: SamplingParams, request_id: str,
                     coalesce: bool = True, stream_text: bool = True) -> AsyncIterator[StreamDelta]:
        """Queue one request and yield its deltas (index 0) until one carries a finish reason.

        coalesce: when the reader falls behind the engine (several steps' deltas waiting), hand them over as
        one delta (text, token ids and logprobs joined, the last finish reason), as vLLM's output collector
        does: a busy server then formats and sends fewer, larger chunks instead of falling further behind.
        False: one delta per engine step, always (readers that need each step's tokens apart).
        stream_text=False: the text comes whole with the last delta (the others carry token ids, logprobs and
        counts), decoded once instead of id by id each step: for readers that use it only at the end. The text is
        the same (stop strings keep it streamed inside the engine: `SequenceState`).

        Raises ValueError (PromptTooLongError for an over-long prompt) before queueing. Closing the iterator
        early, or cancelling the task reading it, aborts the request."""
        ids = self.check_prompt(prompt_ids)
        self.check_params(params)
        params = fit_to_context(len(ids), params, self.context_length)  # the plain-loop mode stops there too
        req = _Request(request_id, ids, params, asyncio.get_running_loop(), asyncio.Queue(), stream_text=stream_text)
        self._submit(req)
        self.num_prompt_tokens += len(ids)
        ended = False
        t0 = time.monotonic()
        ttft, generated, reason, cached = None, 0, "abort", None
        held: object = None  # an item taken from the queue while coalescing, not yet handled
        try:
            while True:
                if held is not None:
                    item, held = held, None
                else:
                    item = await req.queue.get()
                while coalesce and isinstance(item, StreamDelta) and item.finish_reason is None \
                        and not req.queue.empty():
                    nxt = req.queue.get_nowait()
                    if not isinstance(nxt, StreamDelta):
                        held = nxt
                        break
                    item = _join(item, nxt)
                if item is _END:
                    ended = True
                    return
                if isinstance(item, BaseException):
                    ended, reason = True, "error"
                    try:
                        raise item
                    finally:  # the error keeps this frame: naming it here made a cycle that held its cause's frames
                        item = None
                if item.token_ids:
                    if ttft is None:
                        ttft = time.monotonic() - t0
                    generated += len(item.token_ids)
                    self.num_generation_tokens += len(item.token_ids)
                reason = item.finish_reason or reason
                if item.cached_tokens is not None:
                    cached = item.cached_tokens
                yield item
        finally:
            if not ended:  # consumer went away (disconnect, cancellation): free the batch slot now
                self.abort(request_id)
            if self.request_observers:
                stats = RequestStats(len(ids), generated, ttft, time.monotonic() - t0, reason, cached)
                for observe in self.request_observers:
                    observe(stats)

    def _submit(self, req: _Request) -> None:
        """Hand a request to the worker."""
        with self._cond:
            self._register(req)
            self._waiting.append(req)
            self._cond.notify()

    @property
    def failure(self) -> str | None:
        """Why the engine stopped when it was not shut down (its worker, or the engine process, died); None while
        it runs and after `shutdown`."""
        return self._failure

    @property
    def stopped_because(self) -> str:
        """Why the engine does not run (shut down, or how the worker or the engine process died)."""
        return "the engine is shut down" if self._failure is None else f"the engine is not running: {self._failure}"

    def _check_open(self) -> None:
        """EngineClosedError once shut down, or once the worker (or the engine process) died, saying why."""
        if self._closed:
            raise EngineClosedError(self.stopped_because)

    def _register(self, req: _Request) -> None:
        """Record a new request (caller holds the lock): EngineClosedError once shut down or dead, ValueError
        for an id in use."""
        self._check_open()
        if req.request_id in self._requests:
            raise ValueError(f"request id {req.request_id!r} is already in use")
        self._requests[req.request_id] = req

    async def prompt_logprobs(self, prompt_ids: Sequence[int], k: int) -> list[TokenLogprob]:
        """Each prompt token's log-probability and its k most likely alternatives (`generate.prompt_logprobs`),
        computed between the worker's steps (the model runs one thing at a time)."""
        ids = self.check_prompt(prompt_ids, scoring=True)
        self._check_open()

        def run() -> list[TokenLogprob]:
            with self._model_lock:
                return prompt_logprobs(self.model, ids, k)

        return await asyncio.to_thread(run)

    def abort(self, request_id: str) -> bool:
        """Stop a request: a waiting one leaves the queue, a running one ends at the next step.
        Returns False when the id is unknown or already finished. Thread-safe."""
        with self._cond:
            req = self._requests.get(request_id)
            if req is None:
                return False
            req.aborted = True
            if req in self._waiting:
                self._waiting.remove(req)
                self._finish(req, "abort")
                self._post(req, StreamDelta(0, "", [], "abort"))
                self._post(req, _END)
        return True

    def shutdown(self, timeout: float | None = 30.0) -> None:
        """Abort everything, stop the worker and wait for it (up to `timeout` seconds)."""
        with self._cond:
            self._closed = True
            pending = list(self._waiting)
            self._waiting.clear()
            for req in pending:
                self._finish(req, "abort")
                self._post(req, EngineClosedError("the engine was shut down"))
            self._cond.notify_all()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    # ----- worker side -----

    def _post(self, req: _Request, item: object) -> None:
        self._post_all([(req, item)])

    @staticmethod
    def _post_all(items: list[tuple[_Request, object]]) -> None:
        """Hand items to their requests' queues, in order. asyncio.Queue is not thread-safe, so each event loop
        gets one callback with all of its items: one wake-up of the loop per step, not one per token."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, object]]] = {}
        for req, item in items:
            by_loop.setdefault(req.loop, []).append((req.queue, item))
        for loop, batch in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, batch)
            except RuntimeError:  # that loop is closed: nobody is listening any more
                pass

    def _finish(self, req: _Request, reason: str) -> None:
        """Record a request's end (caller holds the lock or is the worker)."""
        req.finish_reason = reason
        self._requests.pop(req.request_id, None)
        self._finished[req.request_id] = reason
        while len(self._finished) > _HISTORY:
            self._finished.popitem(last=False)
        self.num_finished += 1
        if reason == "abort":
            self.num_aborted += 1

    def _next_batch(self) -> list[_Request] | None:
        """Block until requests wait; take up to max_batch_size of them. None once shut down."""
        with self._cond:
            while not self._waiting and not self._closed:
                self._cond.wait()
            if self._closed:
                return None
            n = min(len(self._waiting), self.max_batch_size)
            if self.scheduling_policy == "priority":
                ranked = sorted(range(len(self._waiting)), key=lambda i: (self._waiting[i].params.priority, i))
                take = set(ranked[:n])
                batch = [r for i, r in enumerate(self._waiting) if i in take]
                left = [r for i, r in enumerate(self._waiting) if i not in take]
                self._waiting.clear()
                self._waiting.extend(left)
                return batch
            return [self._waiting.popleft() for _ in range(n)]

    def _new_scheduler(self) -> LLMEngine:
        if self._sched is not None:
            self._preempted_before += self._sched.num_preempted
            self._sched = None
        sched = build_engine(self.model, self.tokenizer, self.kv_cache_tokens, self.max_batch_size,
                             self.chunk_tokens, cuda_graphs=self.cuda_graphs, compile=self.compile,
                             async_output=self.async_output, max_model_len=self.max_model_len,
                             enable_prefix_caching=self.enable_prefix_caching, cascade_decode=self.cascade_decode,
                             scheduling_policy=self.scheduling_policy)
        # Every decode graph captured (and compiled) before the first request rather than in the middle of
        # serving; requests arriving meanwhile wait in the queue. A failure leaves capture to first use.
        try:
            sched.warm_up(stop=lambda: self._closed)  # a shutdown meanwhile ends it between captures
        except Exception:
            log.exception("decode graph warm-up failed; graphs are captured on first use instead")
        self._sched = sched
        return sched

    def _run(self, loop: Callable[[], None]) -> None:
        try:
            if self.cpu_threads is not None:
                torch.set_num_threads(self.cpu_threads)
            self.worker_threads = torch.get_num_threads()
            loop()
        except BaseException as err:  # noqa: BLE001 - e.g. no memory for a new scheduler after a failed step
            log.exception("the engine worker failed; the engine is stopped")
            self._die(f"the engine worker failed: {type(err).__name__}: {err}")

    def _die(self, reason: str) -> None:
        """The worker is gone: nothing would ever end the requests it held or queue new ones, so fail them all
        with EngineError(reason) and refuse later ones (`is_running` turns False: the health check says so)."""
        with self._cond:
            self._failure = reason
            self._closed = True
            left = list(self._requests.values())
            self._waiting.clear()
            for req in left:
                self._finish(req, "error")
        self._post_all([(req, EngineError(reason)) for req in left])

    def _continuous_loop(self) -> None:
        """Continuous batching: new requests enter the scheduler between steps; every step's deltas are
        delivered at once."""
        with self._model_lock:
            sched = self._new_scheduler()
        active: dict[str, _Request] = {}
        while True:
            with self._cond:
                while not self._waiting and not active and not self._closed:
                    self._cond.wait()
                if self._closed:
                    for req in active.values():
                        self._finish(req, "abort")
                        self._post(req, EngineClosedError("the engine was shut down"))
                    return
                new = list(self._waiting)
                self._waiting.clear()
            for req in new:
                try:
                    sched.add_request(req.request_id, req.prompt_ids, req.params, stream_text=req.stream_text,
                                      detokenize=req.detokenize)
                    active[req.request_id] = req
                except Exception as err:  # noqa: BLE001 - whatever one request's set-up raises fails it alone
                    with self._cond:
                        self._finish(req, "error")
                    self._post(req, err)
            for rid, req in active.items():
                if req.aborted:
                    sched.abort(rid)
            try:
                with self._model_lock:
                    deltas = sched.step()
            except RequestError as err:
                self._fail_requests(err, active)
                continue
            except Exception as err:  # fail the requests in flight, keep serving later ones
                log.exception("generation step failed for %s", list(active))
                # Logged: the traceback goes, for its frames hold the failed scheduler (and its KV cache) alive
                # for as long as the requests keep the error.
                err.with_traceback(None)
                for req in active.values():
                    with self._cond:
                        self._finish(req, "error")
                    exc = EngineError(f"generation failed: {type(err).__name__}: {err}")
                    exc.__cause__ = err
                    self._post(req, exc)
                active.clear()
                # The failed scheduler's cache is freed before the new one is allocated: a GPU sized for one cache
                # has no room for two (the rebuild would fail, and the worker with it).
                sched = None
                with self._model_lock:
                    sched = self._new_scheduler()
                continue
            self.num_batches += 1
            out: list[tuple[_Request, object]] = []
            for rid, d in deltas:
                req = active.get(rid)
                if req is None:
                    continue
                out.append((req, d))
                if d.finish_reason is not None:
                    with self._cond:
                        self._finish(req, d.finish_reason)
                    out.append((req, _END))
                    del active[rid]
            self._post_all(out)

    def _fail_requests(self, err: RequestError, active: dict[str, _Request]) -> None:
        """Requests whose logits processor raised: each ends with an EngineError caused by that error; the scheduler
        and the others go on (their deltas of that step come with the next one). In a frame of its own: the worker
        loop's, which never returns, kept the last error named (and with it the frames and logits it holds)."""
        for rid, cause in err.errors.items():
            req = active.pop(rid, None)
            if req is None:
                continue
            with self._cond:
                self._finish(req, "error")
            exc = EngineError(RequestError.describe(rid, cause))
            exc.__cause__ = cause
            self._post(req, exc)

    def _worker_loop(self) -> None:
        while (batch := self._next_batch()) is not None:
            self.num_batches += 1
            self._run_batch(batch)

    def _run_batch(self, batch: list[_Request]) -> None:
        def cancelled(i: int) -> bool:
            return batch[i].aborted or self._closed

        try:
            steps = generate_stream(self.model, self.tokenizer, [r.prompt_ids for r in batch],
                                    [r.params for r in batch], cancelled=cancelled)
            while True:
                with self._model_lock:  # one generation step at a time holds the model
                    step = next(steps, None)
                if step is None:
                    break
                for d in step:
                    req = batch[d.index]
                    if d.finish_reason is not None:
                        with self._cond:
                            self._finish(req, d.finish_reason)
                    self._post(req, dataclasses.replace(d, index=0))
                    if d.finish_reason is not None:
                        self._post(req, _END)
        except Exception as err:  # one bad batch must not take the worker (and every later request) down
            log.exception("generation failed for batch %s", [r.request_id for r in batch])
            for req in batch:
                if req.finish_reason is None:
                    with self._cond:
                        self._finish(req, "error")
                    exc = EngineError(f"generation failed: {type(err).__name__}: {err}")
                    exc.__cause__ = err
                    self._post(req, exc)
            return
        for req in batch:  # generate_stream always ends each sequence; this is only a safety net
            if req.finish_reason is None:
                with self._cond:
                    self._finish(req, "abort")
                self._post(req, StreamDelta(0, "", [], "abort"))
                self._post(req, _END)
