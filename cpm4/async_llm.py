"""`AsyncLLM`: vLLM's AsyncLLM for asyncio code — one engine serving the requests of an application's own tasks.

    from cpm4 import AsyncLLM, SamplingParams
    llm = AsyncLLM("path/to/MiniCPM4-0.5B")
    async for out in llm.generate("The capital of France is", SamplingParams(max_tokens=16), "req-1"):
        print(out.outputs[0].text)          # the text so far (vLLM's default output kind, cumulative)
    llm.shutdown()

It runs the server's engine (`cpm4.serve.load_engine`: the continuous-batching scheduler on a worker thread, or in
a child process on CUDA), so requests started from many tasks are batched together; a task that stops reading
(break, cancellation) aborts its request and frees its pages.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import os
import uuid
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from typing import Any

from .engine.generate import GenerationOutput, StreamDelta, name_logprobs, output_logprobs
from .engine.params import RequestOutputKind, SamplingParams, check_no_lora, nth_seed
from .model.config import is_int


def _copy(o: GenerationOutput, text: bool) -> GenerationOutput:
    """A snapshot the caller may keep: the accumulating lists are not shared with later outputs."""
    return dataclasses.replace(o, text=o.text if text else "", token_ids=list(o.token_ids),
                               logprobs=None if o.logprobs is None else list(o.logprobs), choices=None)


def _request_output(choices: list[GenerationOutput], finished: bool) -> GenerationOutput:
    """One output object as `LLM.generate` returns them: the first completion's fields, all of them in `outputs`."""
    first = dataclasses.replace(choices[0], choices=choices if len(choices) > 1 else None, request_finished=finished)
    return first


# Numbers every engine request an AsyncLLM makes (its id: the caller's, "#", this number), so that none is one in use
# or one just aborted (whose engine request lives on until the worker's next step), whatever ids callers choose
# and reuse.
_ENGINE_SEQ = itertools.count()


@dataclasses.dataclass(eq=False)
class _Running:
    """One `generate` call: its engine requests (one per completion), and whether `abort` asked it to end (heeded
    by completions not queued yet, which then end at once)."""

    engine_ids: list[str]
    aborted: bool = False


def _check_tokenization_kwargs(kwargs: Mapping[str, Any] | None) -> None:
    """vLLM's tokenization_kwargs: only add_special_tokens=True, which is what cpm4's tokenizing does (the BOS);
    anything else would tokenize otherwise, so it is refused."""
    if kwargs is not None and not isinstance(kwargs, Mapping):
        raise ValueError(f"tokenization_kwargs must be a dict or None, got {type(kwargs).__name__}")
    other = sorted(k for k, v in (kwargs or {}).items() if not (k == "add_special_tokens" and v is True))
    if other:
        raise ValueError(f"tokenization_kwargs {other} are not supported: give token ids (prompt_token_ids) to "
                         "tokenize otherwise, or SamplingParams.truncate_prompt_tokens to truncate")


class AsyncLLM:
    """A loaded model serving asyncio code: `generate` is an async iterator of outputs per request.

    model: a checkpoint folder or Hugging Face Hub model id (fetched at `revision`). Options, as vLLM's (and
    `cpm4 serve`'s): max_num_seqs (sequences decoded together; default 16, the server's), gpu_memory_utilization,
    enforce_eager, kv_cache_tokens, chunk_tokens, compile, max_model_len, enable_prefix_caching, cascade_decode,
    scheduling_policy, tokenizer, chat_template; engine_process: the model in a child process (None: on CUDA), so
    the application's event loop and the engine's host work do not share one GIL. generation_config: where the
    defaults of calls without SamplingParams come from ("auto": the checkpoint's generation_config.json; "vllm":
    SamplingParams' own). vllm_args: vLLM engine arguments that cannot change the outputs (see `cpm4.LLM`)."""

    def __init__(self, model: str | os.PathLike, *, device: str | None = None, dtype: str | None = None,
                 tokenizer: str | os.PathLike | None = None, revision: str | None = None, max_num_seqs: int = 16,
                 gpu_memory_utilization: float | None = None, enforce_eager: bool = False,
                 kv_cache_tokens: int | None = None, chunk_tokens: int | None = None, compile: bool = False,
                 max_model_len: int | None = None, generation_config: str | os.PathLike | None = "auto",
                 enable_prefix_caching: bool = True, cascade_decode: bool | None = None,
                 scheduling_policy: str = "fcfs", engine_process: bool | None = None,
                 chat_template: str | None = None, cpu_threads: int | None = None, **vllm_args: Any) -> None:
        from .engine.params import check_scheduling_policy
        from .llm import _check_vllm_args
        from .serve import checked_model, load_engine
        from .serve.engine import check_engine_options

        _check_vllm_args(vllm_args)
        check_engine_options(max_num_seqs, cpu_threads)
        check_scheduling_policy(scheduling_policy)
        if compile and enforce_eager:
            raise ValueError("compile applies to the CUDA-graph decode step: it cannot go with enforce_eager")
        folder, defaults = checked_model(model, revision, chat_template, generation_config)  # before torch loads
        engine = load_engine(folder, device=device, dtype=dtype, tokenizer=tokenizer, chat_template=chat_template,
                             engine_process=engine_process, cpu_threads=cpu_threads, max_batch_size=max_num_seqs,
                             kv_cache_tokens=kv_cache_tokens, chunk_tokens=chunk_tokens,
                             gpu_memory_utilization=gpu_memory_utilization,
                             cuda_graphs=False if enforce_eager else None, compile=compile,
                             max_model_len=max_model_len, enable_prefix_caching=enable_prefix_caching,
                             cascade_decode=cascade_decode, scheduling_policy=scheduling_policy)
        self._init(engine, defaults)

    @classmethod
    def from_engine(cls, engine: Any, sampling_defaults: Mapping[str, Any] | None = None) -> AsyncLLM:
        """Wrap a running `AsyncEngine` or `ProcessEngine` (this object's `shutdown` stops it)."""
        self = cls.__new__(cls)
        self._init(engine, dict(sampling_defaults or {}))
        return self

    def _init(self, engine: Any, defaults: dict[str, Any]) -> None:
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.sampling_defaults = defaults
        # Request id -> its call, from the start of `generate` until its final output is given (or it is left).
        self._active: dict[str, _Running] = {}

    # ----- vLLM's accessors -----

    def get_tokenizer(self) -> Any:
        return self.tokenizer

    def get_default_sampling_params(self) -> SamplingParams:
        """What calls without SamplingParams use: the checkpoint's generation_config values."""
        return SamplingParams(**self.sampling_defaults)

    @property
    def is_running(self) -> bool:
        return self.engine.is_running

    @property
    def errored(self) -> bool:
        """The engine cannot take requests, having failed or been shut down (vLLM's: new requests fail with
        EngineClosedError)."""
        return self.engine.failure is not None or not self.engine.is_running

    @property
    def context_length(self) -> int:
        """Tokens one request may hold, prompt and output (max_model_len, or the model's context)."""
        return self.engine.context_length

    # ----- requests -----

    async def generate(self, prompt: str | Sequence[int] | Mapping[str, Any],
                       sampling_params: SamplingParams | None = None, request_id: str | None = None, *,
                       prompt_text: str | None = None, lora_request: Any = None,
                       tokenization_kwargs: Mapping[str, Any] | None = None,
                       trace_headers: Mapping[str, str] | None = None, priority: int = 0,
                       data_parallel_rank: int | None = None) -> AsyncIterator[GenerationOutput]:
        """Generate for one prompt (text, token ids, or vLLM's prompt dict), yielding outputs as the engine makes
        them (what `sampling_params.output_kind` says: cumulative by default, as vLLM's), the last, and only it, with
        `finished` true. Each output is shaped as `LLM.generate`'s: the first completion's fields, all n in `outputs`
        (a delta output: those that changed; prompt_logprobs only in the first, as vLLM's).
        request_id: unique among running requests (default: a fresh one), free again once the final output is given
        or the generator is closed (`aclose()`; one dropped unclosed: when asyncio finalizes it, a few loop turns
        later); `abort(request_id)` ends it with finish_reason "abort". Bad input (a prompt too long, bad params, an
        id in use) raises ValueError before anything is queued. Stopping the iteration early (break, cancellation)
        aborts the request.
        vLLM's other arguments: prompt_text (the outputs' prompt, for a prompt given as ids); tokenization_kwargs
        (only add_special_tokens=True, what cpm4 does); trace_headers (taken, unused: cpm4 does not trace);
        data_parallel_rank (None or 0: one engine); lora_request (None)."""
        from .llm import _as_ids, _prompt_text

        check_no_lora(lora_request)
        _check_tokenization_kwargs(tokenization_kwargs)
        if data_parallel_rank not in (None, 0) or isinstance(data_parallel_rank, bool):
            raise ValueError(f"data_parallel_rank must be None or 0 (one engine), got {data_parallel_rank!r}")
        if trace_headers is not None and not isinstance(trace_headers, Mapping):
            raise ValueError(f"trace_headers must be a mapping or None, got {type(trace_headers).__name__}")
        if prompt_text is not None and not isinstance(prompt_text, str):
            raise ValueError(f"prompt_text must be a str or None, got {type(prompt_text).__name__}")
        params = sampling_params if sampling_params is not None else self.get_default_sampling_params()
        if not isinstance(params, SamplingParams):
            raise TypeError(f"sampling_params must be SamplingParams, got {type(params).__name__}")
        kind = params.output_kind
        if priority != 0:  # vLLM's argument beside the params
            if not is_int(priority):
                raise ValueError(f"priority must be an int, got {priority!r}")
            params = dataclasses.replace(params, priority=priority)
        rid = uuid.uuid4().hex if request_id is None else request_id
        if not isinstance(rid, str) or not rid:
            raise ValueError(f"request_id must be a non-empty str, got {rid!r}")
        if rid in self._active:
            raise ValueError(f"request id {rid!r} is already in use")
        ids = _as_ids(self.tokenizer, prompt)
        if params.truncate_prompt_tokens:
            ids = params.truncate(ids, self.engine.context_length)
        ids = self.engine.check_prompt(ids)
        # One engine request per completion, seeded as `LLM.generate` and the server seed them (the prompt's pages
        # are shared by prefix caching).
        parts = [params] if params.n == 1 else \
            [dataclasses.replace(params, n=1, seed=nth_seed(params.seed, j)) for j in range(params.n)]
        for p in parts[:1]:  # the same checks for all: a bad one raises here, before anything is queued
            self.engine.check_params(p)
        text = prompt_text if prompt_text is not None else _prompt_text(prompt)
        outs = [GenerationOutput(prompt_token_ids=list(ids), prompt=text, index=j, request_id=rid)
                for j in range(len(parts))]
        queue: asyncio.Queue[tuple[int, StreamDelta | BaseException | None]] = asyncio.Queue()
        tasks: list[asyncio.Task] = []
        run = _Running([f"{rid}#{next(_ENGINE_SEQ)}" for _ in parts])
        if self._active.setdefault(rid, run) is not run:  # one step: two threads' loops may start one id at once
            raise ValueError(f"request id {rid!r} is already in use")
        try:
            if params.prompt_logprobs is not None:
                lps = await self.engine.prompt_logprobs(ids, params.prompt_logprobs)
                for o in outs:
                    o.prompt_logprobs = lps
            for j, (p, eid) in enumerate(zip(parts, run.engine_ids)):  # queued in this order as the tasks start
                tasks.append(asyncio.ensure_future(self._pump(j, ids, p, eid, run, queue)))
            # A completion ends with its delta that has a finish reason: the end of its stream may come later
            # (the engine hands both over apart at times), and waiting for it gave that delta again as a last one.
            ended = [False] * len(parts)
            prompt_logprobs_given = False
            while not all(ended):
                changed: dict[int, GenerationOutput] = {}  # the completions that moved (DELTA: what is new)
                item = await queue.get()
                while True:  # what else has arrived, given in one output
                    j, d = item
                    if isinstance(d, BaseException):
                        try:
                            raise d
                        finally:  # the error keeps this frame: naming it here made a cycle that held its cause's
                            item = d = None  # frames (a failed step's logits) until the garbage collector ran
                    if not ended[j]:
                        if j not in changed:
                            changed[j] = outs[j] if kind is not RequestOutputKind.DELTA else \
                                dataclasses.replace(outs[j], text="", token_ids=[], logprobs=None, choices=None,
                                                    logprob_before=outs[j].cumulative_logprob)
                        if d is not None:
                            outs[j].add(d)
                            if kind is RequestOutputKind.DELTA:
                                changed[j].add(d)
                        ended[j] = d is None or d.finish_reason is not None
                    if queue.empty():
                        break
                    item = queue.get_nowait()
                if not changed:
                    continue
                finished = all(ended)
                if finished and self._active.get(rid) is run:  # the id may be used again from the final output on
                    self._active.pop(rid, None)
                if kind is RequestOutputKind.DELTA:
                    choices = [_copy(changed[j], params.detokenize) for j in sorted(changed)]
                    if prompt_logprobs_given:
                        for c in choices:
                            c.prompt_logprobs = None
                    prompt_logprobs_given = True
                elif kind is RequestOutputKind.CUMULATIVE or finished:
                    choices = [_copy(o, params.detokenize) for o in outs]
                else:
                    continue
                out = _request_output(choices, finished)
                name_logprobs(output_logprobs([out]), self.tokenizer.token_text)
                yield out
        finally:
            if self._active.get(rid) is run:  # not a later call's that reused the id
                self._active.pop(rid, None)
            for t in tasks:
                t.cancel()
            for t in tasks:  # each stream aborts its engine request as it closes
                with contextlib.suppress(BaseException):
                    await t
            # Another completion's error left unread keeps its frames, the pumps' among them, which name this queue:
            # a cycle that held the error's cause (a failed step's logits) until the garbage collector ran.
            while not queue.empty():
                queue.get_nowait()

    async def chat(self, messages: list[dict[str, Any]], sampling_params: SamplingParams | None = None,
                   request_id: str | None = None, *, add_generation_prompt: bool = True,
                   continue_final_message: bool = False, tools: list[dict[str, Any]] | None = None,
                   chat_template_kwargs: Mapping[str, Any] | None = None, priority: int = 0,
                   **template_kwargs: Any) -> AsyncIterator[GenerationOutput]:
        """`generate` for the assistant's reply to one conversation, rendered with the chat template (the options
        as `LLM.chat`'s)."""
        from .llm import chat_prompt_ids

        if isinstance(messages, (str, Mapping)) or not isinstance(messages, Sequence):
            raise ValueError("messages must be a list of {'role': ..., 'content': ...} dicts, got "
                             f"{type(messages).__name__}")
        ids = chat_prompt_ids(self.tokenizer, list(messages), add_generation_prompt, continue_final_message, tools,
                              chat_template_kwargs, **template_kwargs)
        # Closed with this one: left alone, `generate` ended (its request aborted, its id freed) only when collected
        async with contextlib.aclosing(self.generate(ids, sampling_params, request_id, priority=priority)) as outs:
            async for out in outs:
                yield out

    async def _pump(self, j: int, ids: list[int], params: SamplingParams, engine_id: str, run: _Running,
                    queue: asyncio.Queue) -> None:
        """Completion j's deltas into the request's queue, then None; an error (a closed engine, a failed step) in
        its place, for the reader to raise."""
        if run.aborted:  # aborted before it was queued: it ends as the engine ends a waiting request
            queue.put_nowait((j, StreamDelta(0, "", [], "abort")))
            return
        stream = self.engine.stream(ids, params, engine_id)
        told = False
        try:
            async for d in stream:  # queued by its first step, so an abort from now on finds it in the engine
                if run.aborted and not told:  # one from another thread while it was being queued
                    told = True
                    self.engine.abort(engine_id)
                queue.put_nowait((j, d))
            queue.put_nowait((j, None))
        except Exception as e:  # noqa: BLE001
            queue.put_nowait((j, e))
        finally:
            await stream.aclose()  # a cancelled reader: the engine request is aborted here

    async def abort(self, request_id: str | Iterable[str]) -> bool:
        """End a request (all its completions; or each of an iterable of ids, as vLLM's) with finish_reason
        "abort"; False if none was running (its final output given already, or an unknown id). A coroutine, as
        vLLM's (from another thread: `asyncio.run_coroutine_threadsafe`)."""
        hit = False
        for rid in (request_id,) if isinstance(request_id, str) else request_id:
            run = self._active.get(rid)
            if run is None:
                continue
            run.aborted = True
            for eid in run.engine_ids:  # those not queued yet see the flag instead
                self.engine.abort(eid)
            hit = True
        return hit

    def shutdown(self) -> None:
        """Stop the engine; running requests end with EngineClosedError."""
        self.engine.shutdown()

    async def __aenter__(self) -> AsyncLLM:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.shutdown()
