"""Offline batch generation on the continuous-batching engine, as vLLM's `LLM.generate` runs its engine.

Every prompt of a call is queued at once; the scheduler keeps up to `max_num_seqs` of them in flight (new ones
join as others finish, long prompts prefill in chunks, preemption when pages run short) and each prompt's
deltas are gathered into one `GenerationOutput`, in input order. Outputs are those of the plain generate loop
(`generate_ids`): greedy token for token, seeded sampling draw for draw.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NoReturn

from cpm4.model.config import is_int, is_number
from cpm4.model.modeling import MiniCPM4ForCausalLM
from cpm4.model.tokenizer import Tokenizer

from .generate import (
    GenerationOutput,
    PromptTooLongError,
    StreamDelta,
    check_prompt,
    check_prompt_ids,
    context_length,
    finish_texts,
    prompt_logprobs,
)
from .paged import page_size_for
from .params import check_priority, check_scheduling_policy
from .sampling import SamplingParams, nth_seed
from .scheduler import (
    LLMEngine,
    RequestError,
    build_engine,
    default_chunk_tokens,
    default_kv_cache_tokens,
    host_kv_cache_tokens,
)


def check_batch(prompts: Sequence[Sequence[int]], params: Sequence[SamplingParams], context: int,
                vocab: int | None = None) -> None:
    """Reject a malformed batch before any work starts: one SamplingParams per prompt, every prompt
    non-empty and shorter than the context with its ids within `vocab` (`check_prompt_ids`), token ids in the
    params within `vocab`."""
    if len(prompts) != len(params):
        raise ValueError(f"{len(prompts)} prompts but {len(params)} sampling params")
    for sp in params:
        if not isinstance(sp, SamplingParams):
            raise TypeError(f"params must be SamplingParams, got {type(sp).__name__}")
        if vocab is not None:
            sp.check_vocab(vocab)
    for p in prompts:
        check_prompt_ids(p, context, vocab)


def check_options(max_num_seqs: int, chunk_tokens: int, kv_cache_tokens: int | None,
                  gpu_memory_utilization: float | None = None) -> None:
    """Engine sizes must be positive ints, gpu_memory_utilization a share in (0, 1] (callers check before
    loading a model)."""
    for name, v in (("max_num_seqs", max_num_seqs), ("chunk_tokens", chunk_tokens),
                    ("kv_cache_tokens", kv_cache_tokens)):
        if v is not None and (not is_int(v) or v < 1):
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    u = gpu_memory_utilization
    if u is not None and (not is_number(u) or not 0 < u <= 1):
        raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {u!r}")


def tokens_needed(prompt: Sequence[int], params: SamplingParams, context: int) -> int:
    """KV cache slots a sequence may take: its prompt and every token it may generate (max_tokens is cut to
    the context, as `SequenceState` does). One more than strictly needed (the last token is never fed), as
    `LLMEngine.add_request` counts."""
    return len(prompt) + min(params.max_tokens or context, context - len(prompt))


def progress_bar(total: int, factory: Callable[..., Any] | None = None):
    """vLLM's "Processed prompts" bar (tqdm, on stderr); factory: vLLM's callable use_tqdm, which makes the bar
    instead of tqdm (called with tqdm's arguments)."""
    if factory is not None:
        return factory(total=total, desc="Processed prompts", unit="prompt", dynamic_ncols=True)
    try:
        from tqdm import tqdm
    except ImportError:
        raise ImportError("use_tqdm needs tqdm: pip install tqdm") from None
    return tqdm(total=total, desc="Processed prompts", unit="prompt", dynamic_ncols=True)


class OfflineEngine:
    """One `LLMEngine`, built on first use and kept across calls, that runs batches to completion.

    Cache size: `kv_cache_tokens` if given; else, with `device_budget` on CUDA (or whenever
    gpu_memory_utilization is given), what the device budget leaves (`default_kv_cache_tokens`, as the
    server sizes its cache); else sized to each batch (room for the `max_num_seqs` longest sequences, within
    `host_kv_cache_tokens`, never less than the longest one), rebuilt larger when a later batch needs more."""

    def __init__(self, model: MiniCPM4ForCausalLM, tokenizer: Tokenizer, max_num_seqs: int = 256,
                 chunk_tokens: int | None = None, kv_cache_tokens: int | None = None,
                 gpu_memory_utilization: float | None = None, device_budget: bool = True,
                 cuda_graphs: bool | None = None, compile: bool = False, max_model_len: int | None = None,
                 enable_prefix_caching: bool = True, cascade_decode: bool | None = None,
                 warm_up: bool = False, scheduling_policy: str = "fcfs") -> None:
        """warm_up: each engine built runs `LLMEngine.warm_up` (every decode-graph bucket captured, compiled with
        compile) before its first request, as vLLM's `LLM` does at start-up (see `prepare`). scheduling_policy:
        see `LLMEngine` (with "priority", prompts beyond max_num_seqs start in their params' priority order)."""
        check_options(max_num_seqs, chunk_tokens, kv_cache_tokens, gpu_memory_utilization)
        check_scheduling_policy(scheduling_policy)
        self.scheduling_policy = scheduling_policy
        if gpu_memory_utilization is not None and kv_cache_tokens is None and model.device.type != "cuda":
            raise ValueError("gpu_memory_utilization sizes a CUDA cache; give kv_cache_tokens on other devices")
        self.model = model
        self.tokenizer = tokenizer
        self.max_num_seqs = max_num_seqs
        self.chunk_tokens = default_chunk_tokens(model.device, chunk_tokens)
        self.kv_cache_tokens = kv_cache_tokens
        self.gpu_memory_utilization = gpu_memory_utilization
        self.fixed_size = kv_cache_tokens is not None or (
            device_budget and (gpu_memory_utilization is not None or model.device.type == "cuda"))
        self.cuda_graphs = cuda_graphs
        self.compile = compile
        self.context = context_length(model, max_model_len)
        self.max_model_len = max_model_len
        self.enable_prefix_caching = enable_prefix_caching
        self.cascade_decode = cascade_decode
        self.warm = warm_up
        self.engine: LLMEngine | None = None
        self.request_ids = itertools.count()  # the outputs' request_id, as vLLM's LLM numbers its requests
        # The one `stream` whose request may be on the engine (an iterator not read to its end nor closed); a later
        # call ends it, so its request never mixes into that call's steps.
        self._open_stream: str | None = None
        self._stream_ids = itertools.count()

    def prepare(self) -> LLMEngine:
        """The engine built now rather than at the first batch (with `warm_up`, warmed up too): its cache at
        the fixed size (kv_cache_tokens, or what the device budget leaves), as vLLM's `LLM` allocates it and
        captures its graphs at start-up. A cache sized to each batch has no size before the batch."""
        if not self.fixed_size:
            raise ValueError("prepare needs a fixed cache size: give kv_cache_tokens (or a CUDA device budget)")
        return self._engine_for([], [])

    def _cache_tokens(self, needs: list[int]) -> int:
        if self.fixed_size:
            if self.kv_cache_tokens is None:  # measured once: it runs a prefill chunk on the device
                self.kv_cache_tokens = default_kv_cache_tokens(self.model, self.max_num_seqs, self.chunk_tokens,
                                                               self.gpu_memory_utilization)
            return self.kv_cache_tokens
        ps = page_size_for(self.model.config)
        together = sum(-(-n // ps) * ps for n in sorted(needs, reverse=True)[:self.max_num_seqs])
        return max(max(needs), min(together, host_kv_cache_tokens(self.model, self.max_num_seqs, self.max_model_len)))

    def _engine_for(self, prompts: Sequence[Sequence[int]], needs: list[int]) -> LLMEngine:
        """The engine, its cache sized for `needs` (each prompt's `tokens_needed`) unless its size is fixed.
        As `LLMEngine.add_request` (and vLLM): only a prompt the whole cache cannot hold is refused
        (PromptTooLongError), before any request starts; an output that outgrows it ends with "length"."""
        tokens = self._cache_tokens(needs)
        ps = page_size_for(self.model.config)
        if self.engine is None or self.engine.cache.num_pages * ps < tokens:
            self.engine = None  # free the old cache before allocating its successor
            # Outputs are read once complete: text is detokenized after the run, every ended request's at once
            # (stream_text=False, detokenize=False; `finish_texts`).
            self.engine = build_engine(self.model, self.tokenizer, tokens, self.max_num_seqs, self.chunk_tokens,
                                       cuda_graphs=self.cuda_graphs, compile=self.compile, stream_text=False,
                                       detokenize=False,
                                       max_model_len=self.max_model_len,
                                       enable_prefix_caching=self.enable_prefix_caching,
                                       cascade_decode=self.cascade_decode,
                                       scheduling_policy=self.scheduling_policy)
            if self.warm:
                self.engine.warm_up()
        cap = self.engine.cache.num_pages * ps
        for i, p in enumerate(prompts):
            try:
                check_prompt(len(p), self.context, cap)
            except PromptTooLongError as e:
                raise PromptTooLongError(f"prompt {i}: {e}; raise kv_cache_tokens or gpu_memory_utilization for a "
                                         "larger cache") from None
        return self.engine

    def generate(self, prompts: Sequence[Sequence[int]], params: Sequence[SamplingParams],
                 use_tqdm: bool | Callable[..., Any] = False) -> list[GenerationOutput]:
        """Token-id prompts, one SamplingParams each -> one output per prompt, in order. use_tqdm: a progress
        bar of finished prompts on stderr, with the output tokens/s (as vLLM's; a callable makes the bar, as
        vLLM's: e.g. a tqdm subclass)."""
        if len(prompts) == len(params):  # vLLM's truncate_prompt_tokens, before the length checks
            prompts = [sp.truncate(list(p), self.context)
                       if isinstance(sp, SamplingParams) and sp.truncate_prompt_tokens else p
                       for p, sp in zip(prompts, params)]
        check_batch(prompts, params, self.context, self.model.config.vocab_size)
        for sp in params:  # before any request is queued
            check_priority(sp, self.scheduling_policy)
        if not prompts:
            return []
        self._end_open_stream()
        if any(sp.n > 1 for sp in params):
            return self._generate_n(prompts, params, use_tqdm)
        prompts = [[int(t) for t in p] for p in prompts]
        engine = self._engine_for(prompts, [tokens_needed(p, sp, self.context) for p, sp in zip(prompts, params)])
        outs = [GenerationOutput(prompt_token_ids=list(p)) for p in prompts]
        bar = progress_bar(len(prompts), use_tqdm if callable(use_tqdm) else None) if use_tqdm else None
        try:
            states = []
            for i, (p, sp) in enumerate(zip(prompts, params)):
                states.append(engine.add_request(str(i), p, sp))
            generated, t0 = 0, time.perf_counter()
            while engine.has_work():
                done = 0
                for rid, d in engine.step():
                    outs[int(rid)].add(d)
                    generated += len(d.token_ids)
                    done += d.finish_reason is not None
                if bar is not None:
                    bar.set_postfix_str(f"output {generated / (time.perf_counter() - t0):,.0f} tok/s", refresh=False)
                    bar.update(done)
            for o, text, sp in zip(outs, finish_texts(states), params):
                o.text = o.text + text if sp.detokenize else ""  # vLLM's detokenize=False: token ids only
        except RequestError as err:
            # A logits processor raised: the call fails with its error, as vLLM's; the batch's other requests
            # are aborted, and the engine (sound: the failed request has ended) kept for the next call.
            for i in range(len(prompts)):
                engine.abort(str(i))
            self._drain(engine)
            _raise_processor_error(err)
        except BaseException:
            # A failed or interrupted step leaves requests (and maybe half-advanced state) behind: start over
            # with a fresh engine next call, as the server does.
            self.engine = None
            raise
        finally:
            if bar is not None:
                bar.close()
        for o, p, sp in zip(outs, prompts, params):
            if sp.prompt_logprobs is not None:
                o.prompt_logprobs = prompt_logprobs(self.model, p, sp.prompt_logprobs)
        return outs

    def _generate_n(self, prompts: Sequence[Sequence[int]], params: Sequence[SamplingParams],
                    use_tqdm: bool | Callable[..., Any]) -> list[GenerationOutput]:
        """Prompts with n > 1: one request per completion (the prompt's pages are shared by prefix caching),
        completion j seeded with `nth_seed` as the server does; grouped back per prompt."""
        flat_p, flat_sp, owner = [], [], []
        for i, (p, sp) in enumerate(zip(prompts, params)):
            for j in range(sp.n):
                flat_p.append(p)
                flat_sp.append(dataclasses.replace(sp, n=1, seed=nth_seed(sp.seed, j)))
                owner.append(i)
        flat = self.generate(flat_p, flat_sp, use_tqdm)
        outs: list[GenerationOutput] = []
        for i in range(len(prompts)):
            mine = [o for o, k in zip(flat, owner) if k == i]
            for j, o in enumerate(mine):
                o.index = j
            first = dataclasses.replace(mine[0], choices=mine if len(mine) > 1 else None)
            outs.append(first)
        return outs

    def stream(self, prompt: Sequence[int], params: SamplingParams) -> Iterator[StreamDelta]:
        """One prompt's deltas as the engine produces them, its text every step (on the same engine and cache
        as `generate`: CUDA graphs, paged sparse decode). Closing the iterator early aborts the request, and so
        does a later call (`generate`, another stream) while it is unfinished: one stream at a time, whose
        iterator then ends. A failed or interrupted step drops the engine (the next call builds a fresh one)."""
        if isinstance(params, SamplingParams) and params.truncate_prompt_tokens:
            prompt = params.truncate(list(prompt), self.context)
        check_batch([prompt], [params], self.context, self.model.config.vocab_size)
        prompt = [int(t) for t in prompt]
        self._end_open_stream()
        engine = self._engine_for([prompt], [tokens_needed(prompt, params, self.context)])
        rid = f"stream-{next(self._stream_ids)}"
        ended = False
        try:
            engine.add_request(rid, prompt, params, stream_text=True)
            self._open_stream = rid
            while not ended and engine.has_work():
                if self._open_stream != rid:  # a later call ended it (aborted): nothing more comes
                    return
                for r, d in engine.step():
                    if r == rid:
                        ended = d.finish_reason is not None
                        yield d
        except GeneratorExit:  # the reader stopped: the request leaves, the engine stays
            if self._open_stream == rid:
                self._open_stream = None
                engine.abort(rid)
                self._drain(engine)
            raise
        except RequestError as err:  # its logits processor raised: the request has ended, the engine stays
            self._open_stream = None if self._open_stream == rid else self._open_stream
            self._drain(engine)
            _raise_processor_error(err)
        except BaseException:
            self._open_stream = None if self._open_stream == rid else self._open_stream
            self.engine = None
            raise
        if self._open_stream == rid:
            self._open_stream = None
            self._drain(engine)  # with async output a step may have run past the end: its result is discarded

    def _end_open_stream(self) -> None:
        """Abort the request of a `stream` left unfinished (its iterator then ends without more deltas)."""
        rid, self._open_stream = self._open_stream, None
        if rid is not None and self.engine is not None:
            self.engine.abort(rid)
            self._drain(self.engine)

    def _drain(self, engine: LLMEngine) -> None:
        """Step until the engine is idle, its outputs dropped (what aborted or ended requests still owe)."""
        try:
            while engine.has_work():
                engine.step()
        except BaseException:
            self.engine = None
            raise


def _raise_processor_error(err: RequestError) -> NoReturn:
    """Raise what an offline call raises for a request whose logits processor raised: that processor's own exception
    (the first, where several failed), as vLLM's engine let it through, its chain as the processor left it."""
    first = next(iter(err.errors.values()))
    chain = first.__cause__, first.__context__, first.__suppress_context__
    try:
        raise first  # (raised while err is handled: its context would become err, whose cause it is)
    finally:
        first.__cause__, first.__context__, first.__suppress_context__ = chain
