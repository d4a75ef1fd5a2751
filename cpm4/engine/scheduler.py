"""Continuous batching over the paged KV cache.

Every `step()`: waiting requests are admitted while pages and batch slots allow (sharing cached prefix
pages); requests still prefilling feed their next chunk of at most `chunk_tokens` tokens, running ones feed
their last sampled token, and each request whose tokens are all in the cache samples its next token. New
requests therefore join between decode steps, long prompts are prefilled in chunks without stalling the
others, finished or aborted requests free their pages at once, and when pages run out the most recently
admitted request is preempted (pages freed, recomputed later from its prompt and output so far, so no
output is lost or changed).
"""

from __future__ import annotations

import bisect
import gc
import itertools
import operator
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from cpm4.kernels import infllm_v2
from cpm4.model.config import MiniCPM4Config
from cpm4.model.modeling import MiniCPM4ForCausalLM
from cpm4.model.tokenizer import Tokenizer
from cpm4.model.transfer import to_device

from . import prefill_graphs as prefill_graphs_module
from .cuda_graph import DecodeGraphs
from .generate import GenerationOutput, SequenceState, StreamDelta, checked_prompt, context_length, token_logprobs_batch
from .paged import OutOfPages, PagedKVCache, SeqPages, cascade_on, kv_budget_bytes, page_size_for
from .params import check_priority, check_scheduling_policy
from .sampling import Sampler, SamplingParams, SamplingPlan, sample_batch, sample_tokens


@dataclass(eq=False)
class EngineRequest:
    request_id: str
    prompt_ids: list[int]
    state: SequenceState
    pages: SeqPages | None = None
    computed: int = 0  # tokens (prompt + output) whose keys/values are in the cache
    cached_tokens: int | None = None  # prompt tokens found cached when first admitted (vLLM's num_cached_tokens)
    lookup: tuple[int, list[bytes]] | None = None  # (num_tokens, the cache's lookup_chain of its tokens then)
    prompt_array: np.ndarray | None = None  # the prompt ids as int64 (from the prompt check), for prefix keys
    computing: list[bytes] = field(default_factory=list)  # prompt pages it computes that others wait for
    aborted: bool = False
    sync_only: bool = False  # the host must see each token before the next is sampled (see async_output)
    priority: int = 0  # SamplingParams.priority (scheduling_policy "priority")
    arrival: int = 0  # order of add_request calls

    @property
    def rank(self) -> tuple[int, int]:
        """Scheduling order under the priority policy: smaller goes first, larger is preempted first."""
        return (self.priority, self.arrival)

    @property
    def tokens(self) -> list[int]:
        return self.prompt_ids + self.state.generated

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.state.generated)

    def token(self, i: int) -> int:
        n = len(self.prompt_ids)
        return self.prompt_ids[i] if i < n else self.state.generated[i - n]

    def token_slice(self, a: int, b: int) -> list[int]:
        """tokens[a:b] without joining the prompt and the output first."""
        n = len(self.prompt_ids)
        if b <= n:
            return self.prompt_ids[a:b]
        if a >= n:
            return self.state.generated[a - n:b - n]
        return self.prompt_ids[a:] + self.state.generated[:b - n]


@dataclass(eq=False)
class InflightStep:
    """A decode step launched whose sampled tokens the host has not read yet (`LLMEngine(async_output=True)`)."""

    reqs: list[EngineRequest]
    tokens: torch.Tensor  # [B] sampled ids on the model's device
    host: torch.Tensor  # [B] their copy on the host (pinned on CUDA), complete once `event` has passed
    event: torch.cuda.Event | None


class RequestError(RuntimeError):
    """Requests that failed on their own in a step: a logits processor of theirs raised (`errors`: request id ->
    its exception; the first is the cause). They have ended (finish_reason "error", pages freed); the engine and
    its other requests go on, and the step's deltas for those come with the next `LLMEngine.step`."""

    def __init__(self, errors: dict[str, Exception]) -> None:
        rid, err = next(iter(errors.items()))
        more = f" (and {len(errors) - 1} more requests)" if len(errors) > 1 else ""
        super().__init__(self.describe(rid, err) + more)
        self.errors = errors
        self.__cause__ = err

    @staticmethod
    def describe(request_id: str, err: Exception) -> str:
        """What request_id's failure says."""
        return f"request {request_id!r} failed: its logits processor raised {type(err).__name__}: {err}"


def fill_holes(keep: list[int]) -> list[int]:
    """The rows of the next step, `keep` (ascending row indices of this one) placed so that each row stays where it
    is unless it lies past the new count, which then fills the place of an ended row: the rows after an ended one do
    not all shift up, so the decode graphs' block table, whose rows follow the step's, rewrites the ended rows'
    places only (`HostBlockTable.update`; a shift rewrote every row after the first that ended)."""
    m = len(keep)
    if not m or keep[-1] == m - 1:  # nothing ended, or only rows at the end
        return keep
    kept = set(keep)
    tail = iter(i for i in keep if i >= m)
    return [i if i in kept else next(tail) for i in range(m)]


class LLMEngine:
    # One GEMM for q/k/v and one for gate/up a layer (`fuse_projections`), q and k rotated in one call: fewer,
    # larger kernels on the GPU, fewer op dispatches on the CPU (benchmarks/cpu_engine_decode.py --peer unfused).
    # False: the model's projections as they are (the benchmark's peer).
    fuse_weights = True

    def __init__(self, model: MiniCPM4ForCausalLM, tokenizer: Tokenizer, cache: PagedKVCache,
                 max_batch_size: int = 32, chunk_tokens: int | None = None, paged_decode: bool | None = None,
                 cuda_graphs: bool | None = None, compile: bool = False, async_output: bool | None = None,
                 stream_text: bool = True, max_model_len: int | None = None, elementwise: str | None = None,
                 cascade_decode: bool | None = None, detokenize: bool = True, prefill_graphs: bool | None = None,
                 gemv: bool | None = None, scheduling_policy: str = "fcfs"):
        """max_model_len: the longest sequence (prompt + output) served, at most the model's context
        (`context_length`). chunk_tokens: prompt tokens prefilled per step (default `default_chunk_tokens`).

        paged_decode: decode steps attend on the pages in place with the Triton kernels (default: on CUDA
        in fp16/bf16; elsewhere pages are gathered). cuda_graphs: replay decode steps from CUDA graphs, one per
        batch-size bucket, captured on first use (default: with paged_decode on CUDA). compile: torch.compile
        the decode step before capturing it (see `DecodeGraphs`).

        elementwise: how the layers' norms, RoPE, SiLU·up and residual adds run: "inductor" (torch.compile's fused
        kernels), "triton" (one hand-written kernel each, `cpm4.kernels.elementwise`), "eager" (op by op), or
        None: triton on CUDA (measured on the H200 without compile: 0.5B batch-1 decode 2.42 -> 1.19 ms, 8B 32K
        decode 7.62 -> 5.89 ms and prefill 1,592 -> 1,346 ms, as fast as compiled; with compile too, for the
        compiled decode step traces the ops' reference and fuses it either way, while eager prefill steps then
        launch one kernel an op instead of going through torch.compile's wrappers, whose host time left a 0.5B
        offline batch's prefill steps host-bound), else the model's own setting.

        cascade_decode: decode steps whose rows share enough leading pages (a system prompt, a few-shot
        preamble; up to paged.CASCADE_DECODE_GROUPS prefixes a step) attend them once per tile of rows
        (`paged.cascade_groups`, `triton_cascade`; CUDA graphs: each bucket's cascade variant captured beside the
        plain one, both from one compilation with compile, `paged.cascade_paused`). None: `paged.CASCADE_DECODE`
        (on). Measured on the H200, 0.5B: warm_up at 256 rows 5.9 -> 13.4 s eager, 229 -> 196 s compiled (no
        extra compilation); 256 requests after a 2,048-token system prompt, compiled, 31.6K -> 33.9K tok/s.

        async_output: launch each decode step before reading back the tokens the previous one sampled (they
        feed the next step on the device), so the host's work between steps (detokenizing, stop rules,
        scheduling) overlaps the GPU's. Outputs are unchanged; a sequence that stops on a token is computed one
        step past its end, and that step is discarded. Used while every running request decodes, none is
        waiting, and none needs the host to know its last token before sampling the next (repetition
        penalty, a grammar) or asks for logprobs; otherwise the engine steps synchronously. Default: on when decode runs
        from CUDA graphs.

        stream_text=False: the caller reads each request's text only once it has ended (offline batches):
        requests without stop strings are detokenized at their end, their whole text in their last delta,
        instead of every step (see `SequenceState`); token ids are streamed as ever. With detokenize=False too,
        the engine does not decode that text at all: its last delta carries none, and the caller takes the ended
        requests' texts together from `generate.finish_texts` (the offline LLM, after its run: one batch decode on
        every core instead of one output at a time in the step loop).

        prefill_graphs: packed all-dense prefill steps of up to `prefill_graphs.capture_limit` tokens (where a step
        stops being host-bound: 8,192 for the 0.5B, 512 for the 8B; at most chunk_tokens) replay the work between
        their attention calls from CUDA graphs, one chain per token bucket (`cpm4.engine.prefill_graphs`, vLLM's
        piecewise graphs; captured in `warm_up` or on a bucket's first use); default: with cuda_graphs (and
        `prefill_graphs.ENABLED`). Measured on the H200, 0.5B: small steps 2.8x faster, the server's mean time to
        first token 118 -> 80 ms. The graphs' memory pool (about the activations of a step at that limit) comes
        out of the headroom gpu_memory_utilization leaves, as vLLM's graphs do.

        gemv: batch-1 decode steps through the Triton GEMV rather than cuBLAS (`cpm4.kernels.gemv.decode_plan`,
        16-bit, with cuda_graphs): q/k/v, o and down (on the H200 the 8B's 32K step 5.71 -> 5.51 ms), and a small
        model's (hidden size up to 1,024) layers as four GEMVs with their norms, RoPE, SiLU·up and residuals inside
        (`gemv.FUSE_LAYERS`; the 0.5B's step 1.09 -> 0.83 ms), larger models' only with `gemv.FUSE_LARGE`; default
        `gemv.DECODE_GEMV`. False leaves the model's own `use_gemv` setting.

        scheduling_policy: "fcfs" (requests admitted in arrival order; SamplingParams.priority must be 0) or
        "priority" (lower priority values first, then arrival; when pages run out the running request with the
        largest (priority, arrival) is preempted), as vLLM's --scheduling-policy."""
        self.model = model
        self.tokenizer = tokenizer
        self.cache = cache
        self.max_batch_size = max_batch_size
        self.chunk_tokens = default_chunk_tokens(model.device, chunk_tokens)
        self.context = context_length(model, max_model_len)
        check_scheduling_policy(scheduling_policy)
        self.scheduling_policy = scheduling_policy
        self._arrivals = itertools.count()
        self.waiting: deque[EngineRequest] = deque()
        self.running: list[EngineRequest] = []
        self.by_id: dict[str, EngineRequest] = {}
        self.num_preempted = 0
        # Prefix keys of prompt pages that running requests are computing and will publish (`_hold`).
        self._computing: dict[bytes, EngineRequest] = {}
        self._pending: list[tuple[str, StreamDelta]] = []  # deltas decided outside a forward pass
        self._failed: dict[str, Exception] = {}  # requests failed in this step (`RequestError`)
        self._held: list[tuple[str, StreamDelta]] = []  # the deltas of a step that raised RequestError
        self.async_output = False  # set below, once it is known whether decode runs from CUDA graphs
        self.stream_text = stream_text
        self.detokenize = detokenize
        self._inflight: InflightStep | None = None
        self._aborts = 0  # abort() calls not yet handled by a step
        # The last sampled batch's requests and what sampling needs of them, reused while the batch is the same.
        self._sampling: tuple[list[EngineRequest], SamplingPlan, list[Sampler], list[SamplingParams],
                              list[list[int]], list[list[int]]] | None = None
        if paged_decode is None:
            paged_decode = infllm_v2.uses_triton(cache.k[0])
        self.paged_decode = paged_decode
        if cuda_graphs is None:
            cuda_graphs = paged_decode and cache.device.type == "cuda"
        if compile and not cuda_graphs:
            raise ValueError("compile applies to the captured decode step: it needs cuda_graphs")
        if cuda_graphs and not paged_decode:
            raise ValueError("cuda_graphs needs paged_decode (the gathering path synchronises with the host)")
        cache.cascade_decode = cascade_decode  # None leaves paged.CASCADE_DECODE to decide
        if self.fuse_weights:  # before any graph is captured (they read the fused weights)
            model.fuse_projections()
        if elementwise is None:
            elementwise = "triton" if cache.device.type == "cuda" else None
        if elementwise is not None:  # before the decode graphs are captured
            if elementwise not in ("inductor", "triton", "eager"):
                raise ValueError(f"elementwise must be 'inductor', 'triton' or 'eager', not {elementwise!r}")
            model.fuse_elementwise(elementwise != "eager", backend=elementwise)
        # The block table's width in paged decode steps, graphs or eager: every row padded to the context's pages,
        # so a step's kernels (their split counts and lanes follow the width) are the same at any length: one
        # compile per batch size at warm-up, none in the middle of serving. A multiple of 16 columns: the
        # kernels' table loads vectorise only for strides divisible by 16.
        self.decode_width = -(-min(-(-self.context // cache.page_size), cache.num_pages) // 16) * 16
        if cuda_graphs:  # before the decode graphs are captured
            from cpm4.kernels import gemv as gemv_module

            if gemv is None:
                gemv = gemv_module.DECODE_GEMV
            plan = gemv_module.decode_plan(model.config.hidden_size, model.dtype, model.device) if gemv else None
            if plan is not None:
                model.use_gemv(only=plan[0], max_rows=plan[1], fuse=plan[2])
        self.graphs = None
        if cuda_graphs:
            self.graphs = DecodeGraphs(model, cache, max_batch_size, self.decode_width, compile=compile)
        self.compile = compile
        if prefill_graphs is None:
            prefill_graphs = cuda_graphs and prefill_graphs_module.ENABLED
        if prefill_graphs and cache.device.type != "cuda":
            raise ValueError("prefill_graphs needs the cache on a CUDA device")
        held = model.prefill_graphs
        if not prefill_graphs:
            model.prefill_graphs = None
        else:
            limit = prefill_graphs_module.capture_limit(model, self.chunk_tokens)
            if held is None or held.max_tokens < limit:  # (another engine's, as large: shared)
                model.prefill_graphs = prefill_graphs_module.PrefillGraphs(model, limit)
        # Default on with CUDA graphs (measured on the H200: 0.5B batch-1 decode 559 -> 690 tok/s, 64 streaming
        # clients 3,981 -> 4,278 tok/s); without graphs a step's launch is the host's work, nothing to overlap.
        self.async_output = self.graphs is not None if async_output is None else async_output

    # ---- requests ----
    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                    stream_text: bool | None = None, detokenize: bool | None = None) -> SequenceState:
        """Queue a request; returns its state (text, ids and finish reason as they grow; what
        `generate.finish_texts` takes). stream_text: this request's text every step (True) or at its end (False);
        default the engine's `stream_text`. detokenize: with stream_text=False, whether the engine decodes that text at
        all (see `LLMEngine`); default the engine's `detokenize`.

        The prompt is checked as every front end checks it (`check_prompt_ids`: ids in the vocabulary, numpy
        integers converted, room for one token in the context and in the whole cache), so a bad one fails here
        alone, not in the step it would join. Its output is not: one that outgrows the cache with no other
        request left to preempt ends with "length"."""
        if request_id in self.by_id:
            raise ValueError(f"request id {request_id!r} already in use")
        prompt_ids, as_array = checked_prompt(prompt_ids, self.context, self.model.config.vocab_size,
                                              self.cache_tokens)
        params.check_vocab(self.model.config.vocab_size)
        check_priority(params, self.scheduling_policy)
        # prompt_ids is the check's own list (the caller's is never kept); SequenceState copies it.
        state = SequenceState(prompt_ids, params, self.tokenizer, self.model.device, self.context,
                              self.model.config.eos_token_ids,
                              stream_text=self.stream_text if stream_text is None else stream_text,
                              vocab_size=self.model.config.vocab_size,
                              detokenize=self.detokenize if detokenize is None else detokenize)
        # A grammar's mask for the next token depends on the last one, min_tokens on the count of tokens read
        # back, bad words on the last tokens, logits processors on the whole output: guided, min_tokens, bad_words
        # and processed rows step synchronously too.
        req = EngineRequest(request_id, prompt_ids, state,
                            sync_only=params.repetition_penalty != 1.0 or params.logprobs is not None
                            or bool(params.presence_penalty or params.frequency_penalty) or params.guided
                            or params.min_tokens > 0 or bool(params.bad_words) or bool(params.logits_processors),
                            prompt_array=as_array,
                            priority=params.priority, arrival=next(self._arrivals))
        self.by_id[request_id] = req
        self._enqueue(req)
        return state

    def _enqueue(self, req: EngineRequest) -> None:
        """Into the waiting queue: last under fcfs (a preempted one goes first, `_preempt`); by rank under
        priority (a preempted one keeps its arrival, so it goes before later requests of its priority)."""
        if self.scheduling_policy != "priority":
            self.waiting.append(req)
            return
        # A binary search of the queue (kept in rank order): a scan from its end was quadratic, 20,000 prompts
        # with random priorities took 112 s to queue.
        bisect.insort(self.waiting, req, key=lambda r: r.rank)

    @property
    def cache_tokens(self) -> int:
        """Tokens the whole KV cache holds."""
        return self.cache.num_pages * self.cache.page_size

    def abort(self, request_id: str) -> None:
        req = self.by_id.get(request_id)
        if req is not None:
            req.aborted = True
            self._aborts += 1

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self._inflight or self._held)

    # ---- one step ----
    @torch.inference_mode()
    def step(self) -> list[tuple[str, StreamDelta]]:
        """One step: the deltas of the requests that advanced. Raises `RequestError` when requests failed on their
        own (a logits processor raised): they have ended, the rest of the step's work is done and its deltas come
        first in the next step's."""
        # The whole step in inference mode, not only `_run`: a decode step launched ahead (`_launch`) outside it
        # ran the eager model with autograd recording, and its sampling then failed on the plan's tensors made
        # in inference mode ("Inference tensors cannot be saved for backward").
        out = self._step()
        if self._held:
            out, self._held = self._held + out, []
        if self._failed:
            self._held = out
            # The errors go unnamed in this frame: a processor's error keeps the frames it passed through (this one
            # too) with their locals, and one naming it made a cycle that held the step's logits and the batch's
            # requests until the garbage collector ran (by reference counting alone, as everything else is freed).
            raise RequestError(self._take_failed())
        return out

    def _take_failed(self) -> dict[str, Exception]:
        failed, self._failed = self._failed, {}
        return failed

    def _step(self) -> list[tuple[str, StreamDelta]]:
        out: list[tuple[str, StreamDelta]] = []
        self._drop_aborted(out)
        if self._inflight is not None:
            keep = self._continuing()
            if keep is not None:
                return out + self._continue(keep)
            out += self._drain(self._inflight)
        self._admit()
        feeds = self._plan()
        out += self._pending
        self._pending = []
        prefill, decode = [], []
        for r, n in feeds:
            (decode if self._decode_ok(r, n) else prefill).append((r, n))
        if prefill:
            out += self._run(prefill)
        if decode:
            reqs = [r for r, _ in decode]
            if not prefill and self._async_ok(reqs):
                self._inflight = self._launch(reqs, [r.token(r.computed) for r in reqs])
            else:
                out += self._run(decode)
        return out

    # ---- decode steps launched ahead of reading their tokens (async_output) ----
    def _async_ok(self, reqs: list[EngineRequest]) -> bool:
        # A step launched ahead samples every row: none may be feeding a token before the last one it holds (a
        # prompt, or a recomputation, cut to one token by the step's budget).
        return (self.async_output and not self.waiting and len(reqs) == len(self.running)
                and not any(r.sync_only or r.computed + 1 != r.num_tokens for r in reqs))

    def _sampling_args(self, reqs: list[EngineRequest], vocab: int
                       ) -> tuple[SamplingPlan, list[Sampler], list[SamplingParams], list[list[int]],
                                  list[list[int]]]:
        """(plan, samplers, params, histories, outputs) of `reqs`, built again only when the batch changes (the
        same requests in the same order reuse them: histories and outputs are the requests' own lists,
        appended in place)."""
        c = self._sampling
        if c is None or len(c[0]) != len(reqs) or not all(map(operator.is_, c[0], reqs)) or c[1].vocab != vocab:
            states = [r.state for r in reqs]
            params = [st.params for st in states]
            c = self._sampling = (list(reqs), SamplingPlan(params, vocab), [st.sampler for st in states], params,
                                  [st.history for st in states], [st.generated for st in states])
        return c[1:]

    def _launch(self, reqs: list[EngineRequest], ids: list[int] | torch.Tensor) -> InflightStep:
        """Run a decode step feeding `ids` (host ids, or the previous step's tokens on the device) and sample
        it; the tokens are copied back to the host without waiting for them."""
        logits = self._forward_decode([r.pages for r in reqs], ids)
        for r in reqs:
            r.computed += 1  # every row feeds its last token (`_async_ok`)
            if not r.state.generated:
                self._publish(r)
        plan, samplers, params, history, outputs = self._sampling_args(reqs, logits.shape[1])
        toks = sample_tokens(logits, samplers, params, history, plan, outputs)
        if toks.is_cuda:
            host = torch.empty(toks.shape, dtype=toks.dtype, pin_memory=True)
            host.copy_(toks, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            return InflightStep(reqs, toks, host, event)
        return InflightStep(reqs, toks, toks, None)

    def _continuing(self) -> list[int] | None:
        """Rows of the in-flight step whose next decode step can launch now (None: read it back first): every
        running request is in it, none waits, and the row's in-flight token is not its last by length.
        Reserves the room for the next token of those rows."""
        inf = self._inflight
        if self.waiting:
            return None
        # Rows still running hold pages (ended ones were released); with nothing admitted since the launch (no
        # step ran), every running request is among them when the counts agree.
        live = [i for i, r in enumerate(inf.reqs) if r.pages is not None]
        if len(live) != len(self.running):
            return None
        keep = [i for i in live if len(inf.reqs[i].state.generated) + 1 < inf.reqs[i].state.max_tokens]
        if not keep:
            return None
        ps = self.cache.page_size
        try:
            for i in keep:
                seq = inf.reqs[i].pages
                if seq.length >= len(seq.pages) * ps:  # the next token needs a new page
                    self.cache.reserve(seq, 1)
        except OutOfPages:
            return None  # the synchronous step preempts
        return keep

    def _continue(self, keep: list[int]) -> list[tuple[str, StreamDelta]]:
        inf = self._inflight
        keep = fill_holes(keep)
        # The rows' index through pinned memory: from a Python list the copy waited for the step in flight.
        ids = inf.tokens if len(keep) == len(inf.reqs) else inf.tokens[to_device(keep, inf.tokens.device, torch.long)]
        self._inflight = self._launch([inf.reqs[i] for i in keep], ids)
        return self._drain(inf)  # the host reads step n's tokens while the GPU runs step n + 1

    def _drain(self, inf: InflightStep) -> list[tuple[str, StreamDelta]]:
        if inf is self._inflight:
            self._inflight = None
        if inf.event is not None:
            inf.event.synchronize()
        # Rows that finished (a stop token read after the next step was launched) or were aborted: discarded.
        live = [(r, t) for r, t in zip(inf.reqs, inf.host.tolist()) if r.state.finish_reason is None]
        return self._emit([r for r, _ in live], [t for _, t in live])

    def _drop_aborted(self, out: list) -> None:
        if not self._aborts:
            return
        self._aborts = 0
        for req in [r for r in list(self.waiting) + self.running if r.aborted]:
            out.append((req.request_id, self._end(req, "abort")))

    def _end(self, req: EngineRequest, reason: str) -> StreamDelta:
        """End a request outside `_emit` (abort, cache full): its last delta carries what the sequence still
        held back (`SequenceState.finish`), as an end by max_tokens does."""
        text = req.state.finish(reason)
        self._finish(req, reason)
        return StreamDelta(0, text, [], req.state.finish_reason, None, req.cached_tokens, req.state.stop_reason)

    def _finish(self, req: EngineRequest, reason: str) -> None:
        req.state.finish_reason = req.state.finish_reason or reason
        self._done_computing(req)
        if req.pages is not None:
            self.cache.release(req.pages)
            req.pages = None
        if req in self.running:
            self.running.remove(req)
            if not self.running:
                # Nothing runs that could sample with the cached batch again: let its requests go (their states,
                # params, logits processors and grammar matchers stayed for as long as the engine sat idle).
                self._sampling = None
        if req in self.waiting:
            self.waiting.remove(req)
        self.by_id.pop(req.request_id, None)

    def _admit(self) -> None:
        i = 0
        running_need = None  # the running rows' share of `_pages_to_admit`: summed once, then kept up to date
        while i < len(self.waiting) and len(self.running) < self.max_batch_size:
            req = self.waiting[i]
            if req.pages is None and self._hold(req):
                i += 1  # its next pages are being computed: admitted once they are published, the others pass
                continue
            if req.pages is None:
                req.pages, req.computed = self.cache.new_sequence(req.tokens, self._sparse_prompt(req),
                                                                  self._lookup(req))
            # Room for its whole prompt (and the rest of the running ones' prompts), plus a page per running
            # request for decoding: admitting on the first chunk alone let later chunks preempt the others,
            # which were readmitted and preempted again (demo model, 7 prompts of 7-1,393 tokens in a
            # 1,500-token cache: 100 preemptions, 2.4x the time of a cache that holds them all).
            if self.running and running_need is None:
                running_need = sum(map(self._feed_pages, self.running))
            if self.running and not self.cache.has_free(self._pages_to_admit(req, running_need)):
                # Not admitted: give back the shared prefix pages `new_sequence` pinned, or a waiting request
                # holds pages the running ones need (a lone running request would then end as "length").
                self.cache.release(req.pages)
                req.pages, req.computed = None, 0
                break
            del self.waiting[i]
            self.running.append(req)
            if running_need is not None:
                running_need += self._feed_pages(req)
            if req.cached_tokens is None:  # the first admission's (a preempted request's recompute is not a hit)
                req.cached_tokens = req.computed
            self._start_computing(req)

    # ---- requests that share a prompt prefix with one being computed wait for it (n > 1, bursts) ----
    def _lookup(self, req: EngineRequest) -> list[bytes] | None:
        """The request's `lookup_chain`, hashed once for the tokens it holds (None without prefix caching)."""
        if not self.cache.prefix_caching:
            return None
        if req.lookup is None or req.lookup[0] != req.num_tokens:
            req.lookup = (req.num_tokens, self.cache.lookup_chain(req.tokens, self._sparse_prompt(req),
                                                                  req.prompt_array))
        return req.lookup[1]

    def _hold(self, req: EngineRequest) -> bool:
        """Whether the first page `req` would compute is a prompt page a running request is computing now, and
        that request's prompt ends within a step's chunk past the pages the two share: `req` then waits until it
        publishes its prompt and finds those pages cached (as vLLM V1 shares the blocks of requests with one
        prefix). Without this, n completions of a prompt, or a burst of requests with one system prompt, all
        computed the whole prefix side by side. A request sharing a short start with a long prompt being computed
        does not wait for all of it. The owner is running, so it ends, publishes or is preempted: the wait is
        bounded (`_done_computing`)."""
        if not self._computing:
            return False
        chain = self._lookup(req) or []
        prefix = self.cache.prefix
        for i, h in enumerate(chain):
            if h in prefix:
                continue
            owner = self._computing.get(h)
            if owner is None:
                return False
            shared = 0
            for h2 in chain[i:]:
                if self._computing.get(h2) is not owner:
                    break
                shared += 1
            left = len(owner.prompt_ids) - owner.computed
            return left <= shared * self.cache.page_size + self.chunk_tokens
        return False

    def _start_computing(self, req: EngineRequest) -> None:
        """Record the prompt pages `req` will compute and publish (a prompt not yet complete)."""
        if not self.cache.prefix_caching or req.state.generated:
            return
        n = len(req.prompt_ids) // self.cache.page_size  # one page more than its lookup at most (tokens = prompt)
        chain = self.cache.chain(req.prompt_ids, n, self._sparse_prompt(req), known=self._lookup(req))
        prefix = self.cache.prefix
        req.computing = [h for h in chain if h not in prefix and self._computing.setdefault(h, req) is req]

    def _done_computing(self, req: EngineRequest) -> None:
        for h in req.computing:
            if self._computing.get(h) is req:
                del self._computing[h]
        req.computing = []

    def _pages_to_admit(self, new: EngineRequest, running_need: int | None = None) -> int:
        """Pages `new` and the running requests still need to feed every token they hold (prompt, or prompt and
        output when recomputed after preemption), plus one per running request for decoding. A running row
        with one token left to feed (decoding) needs at most that one page for it: counted once, not again as
        a token it holds. running_need: the running requests' `_feed_pages` summed, when the caller keeps it
        (admitting a burst summed them again for each waiting request: 256 requests, 33K terms a step)."""
        if running_need is None:
            running_need = sum(map(self._feed_pages, self.running))
        own = 0 if new.pages is None else self.cache.pages_needed(new.pages, new.num_tokens - new.computed)
        return own + running_need + len(self.running)

    def _feed_pages(self, r: EngineRequest) -> int:
        """Pages a running request still needs for the tokens it holds and has not fed (none counted for a
        decoding row's one token: see `_pages_to_admit`)."""
        n = r.num_tokens - r.computed
        return self.cache.pages_needed(r.pages, n) if r.pages is not None and n > 1 else 0

    def _sparse_prompt(self, req: EngineRequest) -> bool:
        """Whether the request's prompt runs InfLLM v2 at every position (at least dense_len tokens)."""
        sc = self.model.config.sparse_config
        return sc is not None and sc.is_sparse(len(req.prompt_ids))

    def _decode_ok(self, req: EngineRequest, n: int) -> bool:
        """Whether the decode forward may feed this row: one token, and the dense/sparse switch the decode step
        applies (by the length so far) is the row's own. It is for a token at or past the prompt's last and for
        any token of a dense prompt (shorter than dense_len: dense either way); a sparse prompt's earlier tokens,
        fed one at a time when the step's budget ran out, go the prefill way, which sees the whole prompt. The
        budget's one-token prompt rows of dense prompts thus stay in the batched decode forward (CUDA graphs):
        moving them to the padded prefill forward cost the 0.5B 256-request row a quarter of its throughput."""
        return n == 1 and (req.computed + 1 >= len(req.prompt_ids) or not self._sparse_prompt(req))

    def _same_mode_tokens(self, req: EngineRequest) -> int:
        """How many of the tokens `req` holds from `computed` on may go in one chunk. The model decides dense
        or sparse per row of a step (by its end, or its whole prompt); the plain loop ran a short prompt dense
        and its outputs dense until the sequence reached dense_len, sparse from there. A recomputation (after
        preemption) crossing dense_len is cut there, or its dense positions would run sparse."""
        sc = self.model.config.sparse_config
        n = req.num_tokens - req.computed
        if sc is None or self._sparse_prompt(req) or req.computed + 1 >= sc.dense_len:
            return n
        return min(n, sc.dense_len - 1 - req.computed)

    def _plan(self) -> list[tuple[EngineRequest, int]]:
        """How many tokens each running request feeds this step, with pages reserved for them; preempts the
        latest admitted requests while pages are short."""
        budget = self.chunk_tokens
        feeds = []
        ps = self.cache.page_size
        for req in list(self.running):
            seq = req.pages
            if seq is None:  # preempted (or ended) while planning an earlier request: running ones hold pages
                continue
            n = req.num_tokens - req.computed
            if n == 1 and seq.length < len(seq.pages) * ps:  # decoding with room left in its last page
                feeds.append((req, 1))
                continue
            if n > 1:
                n = min(n, max(budget, 1), self._same_mode_tokens(req))
                budget -= n
            while True:
                try:
                    self.cache.reserve(req.pages, n)
                    break
                except OutOfPages:
                    # The latest admitted, or under priority the lowest priority latest arrival (vLLM's choice).
                    victim = self.running[-1] if self.scheduling_policy != "priority" else \
                        max(self.running, key=lambda r: r.rank)
                    if victim is req and len(self.running) == 1:
                        # Alone and still no room: the cache cannot hold this sequence any longer.
                        self._pending.append((req.request_id, self._end(req, "length")))
                        break
                    self._preempt(victim)
                    feeds = [(r, k) for r, k in feeds if r is not victim]
                    if victim is req:
                        break
            if req.pages is not None:
                feeds.append((req, n))
        return feeds

    def _preempt(self, req: EngineRequest) -> None:
        self._done_computing(req)
        self.cache.release(req.pages)
        req.pages, req.computed = None, 0
        self.running.remove(req)
        if self.scheduling_policy == "priority":
            self._enqueue(req)
        else:
            self.waiting.appendleft(req)
        self.num_preempted += 1

    def _forward_decode(self, seqs: list[SeqPages], ids: list[int] | torch.Tensor, shared=None) -> torch.Tensor:
        """Logits [B, V] of one decode step feeding one token per sequence (host ids or ids on the device);
        advances the pages' lengths. shared: an eager step's `SharedPrefix` in place of the group its rows
        form (`_warm_decode`)."""
        dev = self.model.device
        if self.graphs is not None and len(seqs) <= self.graphs.max_batch:
            logits = self.graphs.run(ids, seqs)
        else:
            ids = (ids.to(dev) if isinstance(ids, torch.Tensor) else torch.tensor(ids, device=dev))[:, None]
            ones = torch.ones_like(ids[:, 0])
            if not self.paged_decode:  # the gathering path: the model advances the lengths itself
                return self.model(ids, self.cache.batch(seqs), ones, last_only=True)
            batch = self.cache.batch(seqs, decode=True, width=self.decode_width)
            if shared is not None:
                batch.shared = shared
            logits = self.model(ids, batch, ones, last_only=True)
        for s in seqs:
            s.length += 1
        return logits

    def _forward(self, group: list[tuple[EngineRequest, int]]) -> torch.Tensor:
        """Logits [len(group), V] at each request's last fed token; advances the pages' lengths."""
        seqs = [req.pages for req, _ in group]
        if all(self._decode_ok(req, n) for req, n in group):
            return self._forward_decode(seqs, [req.token(req.computed) for req, _ in group])
        t = max(n for _, n in group)
        ids = np.zeros((len(group), t), dtype=np.int64)
        for i, (req, n) in enumerate(group):  # numpy: ~0.5 µs a row against ~7 µs through torch.tensor
            ids[i, :n] = req.token_slice(req.computed, req.computed + n)
        new_lens = torch.tensor([n for _, n in group])
        batch = self.cache.batch(seqs)
        batch.prompt_lens = [len(req.prompt_ids) for req, _ in group]  # the dense/sparse switch of prompt chunks
        # Host ids and lengths: the model reads them on the host and sends them once (no device reads mid-step).
        return self.model(torch.from_numpy(ids), batch, new_lens, last_only=True)

    def _run(self, group: list[tuple[EngineRequest, int]]) -> list[tuple[str, StreamDelta]]:
        logits = self._forward(group)
        ready = []
        for i, (req, n) in enumerate(group):
            if self._fed(req, n):
                ready.append(i)
        out = []
        if ready:
            reqs = [group[i][0] for i in ready]
            if len(ready) < len(group):
                logits = logits[to_device(ready, logits.device, torch.long)]
            plan, samplers, params, history, outputs = self._sampling_args(reqs, logits.shape[1])
            failed: list[tuple[int, Exception]] = []
            toks = sample_batch(logits, samplers, params, history, plan, outputs, failed)
            if failed:  # (a logits processor raised) those requests end here, the others take their tokens
                rows = [i for i, _ in failed]
                self._failed.update((reqs[i].request_id, e) for i, e in failed)
                # Emptied, and no error left named here: every sampling frame below named this list, and the errors
                # keep those frames (see `step`).
                failed.clear()
                for i in rows:
                    self._finish(reqs[i], "error")
                bad = set(rows)
                keep = [i for i in range(len(reqs)) if i not in bad]
                reqs, toks = [reqs[i] for i in keep], [toks[i] for i in keep]
                logits = logits[to_device(keep, logits.device, torch.long)]
            out = self._emit(reqs, toks, logits)
        return out

    def _fed(self, req: EngineRequest, n: int) -> bool:
        """Count n more tokens of `req` as in its pages; whether it has fed all it holds (its next token is
        sampled)."""
        req.computed += n
        if req.computed != req.num_tokens:
            return False
        if not req.state.generated:
            self._publish(req)
        return True

    def _publish(self, req: EngineRequest) -> None:
        """The prompt is complete: offer its pages for prefix sharing, whichever forward fed its last token (a
        step launched ahead too, `_launch`); the requests waiting for them may start."""
        # The lookup's keys (hashed at admission) hold for the prompt's whole pages: tokens are only appended.
        self.cache.publish(req.pages, req.prompt_ids, self._sparse_prompt(req), req.lookup and req.lookup[1])
        self._done_computing(req)

    def _emit(self, reqs: list[EngineRequest], toks: list[int], logits: torch.Tensor | None = None
              ) -> list[tuple[str, StreamDelta]]:
        """Take each request's sampled token (stop rules, detokenizing); the deltas to stream. logits: the rows
        the tokens were sampled from, for requests asking for logprobs."""
        out = []
        append = out.append
        asked: list[tuple[int, int, int]] = []  # (row, its k, its delta) of the rows whose logprobs are wanted
        for i, (req, tok) in enumerate(zip(reqs, toks)):
            st = req.state
            text, new = st.step(tok)
            reason = st.finish_reason
            if text or new or reason:
                if st.params.logprobs is not None and new:
                    asked.append((i, st.params.logprobs, len(out)))
                append((req.request_id, StreamDelta(0, text, new, reason, None, req.cached_tokens,
                                                    st.stop_reason if reason else None)))
            if reason is not None:
                self._finish(req, reason)
        if asked:  # all of the step's at once (one device read)
            rows = [i for i, _, _ in asked]
            lps = token_logprobs_batch(logits[to_device(rows, logits.device, torch.long)], [toks[i] for i in rows],
                                       [k for _, k, _ in asked])
            for (_, _, j), lp in zip(asked, lps):
                out[j][1].logprobs = [lp]
        return out

    def warm_up(self, stop: Callable[[], bool] | None = None) -> None:
        """Capture (and with compile, compile) the decode step of every batch-size bucket now, as vLLM does at
        start-up, instead of on each bucket's first use in the middle of serving (a compiled bucket takes
        seconds), and the prefill graphs of every token bucket (`prefill_graphs`). Then prefill forwards on
        throwaway pages (`_warm_prefill`), so the first requests do not pay for kernels compiled (Triton, dynamo)
        or autotuned on first use: on CUDA with graphs off too (eager decode steps still compile their kernels on
        first use); nothing to do on the CPU.

        Compiling leaves a great many Python objects (graphs, guards, generated code) that every full garbage
        collection walks again (a tiny model's few graphs: 570K objects, 240 ms per collection on a CPU core;
        the suspected cause of the 0.5-0.9 s host steps in a compiled serving run that compiled nothing). Without
        compile the imported libraries, the model and the captured graphs alone made each full collection of an
        eager serving run take 150-220 ms (H200 host, 0.5B, 256 requests: one per run, none once frozen). They
        live as long as the process, so warm_up moves them out of the collector's reach (`gc.freeze`, as vLLM
        does after its warm-up).

        stop: asked between captures (on a cold Triton cache they take tens of seconds); True ends the warm-up
        there, for an engine being shut down (its shutdown waited for every capture)."""
        if self.graphs is None and self.cache.device.type != "cuda":
            return
        if self.graphs is not None:
            self.graphs.warm_up(stop)
        if self.model.prefill_graphs is not None:  # (out of memory: it warns and steps run layer by layer)
            self.model.prefill_graphs.warm_up(stop)
        if stop is not None and stop():
            return
        if self.graphs is None and self.paged_decode:
            self._warm_decode()
        self._warm_prefill()
        gc.collect()
        gc.freeze()

    def _warm_decode(self) -> None:
        """Eager decode steps (CUDA graphs off) of every batch size on throwaway pages: a step's kernels follow
        the batch size (split counts, row counts of 1) and, with the block table at `decode_width`, nothing else,
        so these compile all that eager decoding will launch (the graphs' capture does it for theirs). With
        cascade decode, each size of two rows or more also steps as a group sharing no pages (the cascade
        kernels' variant, as the graphs capture it). A batch size whose rows do not fit in the free pages is
        left to its first use. The steps run the first layer alone: every layer launches the same kernels on
        tensors of the same shapes (their compiled variants follow those, not the layer), and the whole model's
        steps made this 26 s at 256 sizes (0.5B, H200; the first layer alone: 3.6 s, the graphs' warm-up 2.7)."""
        from cpm4.kernels.infllm_v2.triton_cascade import SharedPrefix  # (Triton: CUDA or its interpreter)

        dev = self.model.device
        cascade = cascade_on(self.cache)
        trunk = self.model.model
        layers = trunk.layers
        trunk.layers = layers[:1]  # (eager only: compile needs graphs, so no traced module sees the change)
        try:
            with torch.inference_mode():
                for b in range(1, self.max_batch_size + 1):
                    seqs = [SeqPages() for _ in range(b)]
                    steps = [None] + ([SharedPrefix.empty(self.decode_width, b, self.cache.scratch, dev)]
                                      if cascade and b > 1 else [])
                    try:
                        for s in seqs:
                            self.cache.reserve(s, 1 + len(steps))
                            s.length = 1  # one (throwaway) token stored: the steps feed the next ones
                        for shared in steps:
                            self._forward_decode(seqs, torch.full((b,), 3, device=dev), shared)
                    except OutOfPages:
                        break
                    finally:
                        for s in seqs:
                            self.cache.release(s)
        finally:
            trunk.layers = layers

    def _warm_prefill(self) -> None:
        """Prefill forwards of one row and of two (dynamo specializes sizes of 1: separate compilations with
        compile; one launch for several sparse rows is another kernel variant), of 2 tokens and, for an InfLLM v2
        model, of dense_len + 1 (its sparse prefill kernels, autotuned on first use; when the context reaches past
        dense_len). The kernels take a step's lengths unspecialized, so these stand for every length
        (`tests/jit_signatures.py`). Rows that do not fit in the free pages are left to their first use."""
        sc = self.model.config.sparse_config
        lens = [2] + ([sc.dense_len + 1] if sc is not None and 0 < sc.dense_len < self.context else [])
        dev = self.model.device
        gen = torch.Generator().manual_seed(0)
        with torch.inference_mode():
            for n in lens:
                for rows in (1, 2):
                    seqs = [SeqPages() for _ in range(rows)]
                    try:
                        for s in seqs:
                            self.cache.reserve(s, n)
                        # Random ids: kernels autotuned here time a random model's spread of scores (equal ids
                        # would make every query alike and the selection degenerate).
                        ids = torch.randint(3, self.model.config.vocab_size, (rows, n), generator=gen).to(dev)
                        self.model(ids, self.cache.batch(seqs), torch.full((rows,), n, device=dev), last_only=True)
                    except OutOfPages:
                        pass
                    finally:
                        for s in seqs:
                            self.cache.release(s)
        if sc is not None and sc.dense_len < self.context:  # (-1: always sparse)
            self._warm_sparse()

    def _warm_sparse(self) -> None:
        """The InfLLM v2 kernel variants the dense_len + 1 prefill does not reach (`warm_prefill_kernels`): each
        would otherwise compile and autotune inside the first request that needs it."""
        if not infllm_v2.uses_triton(self.cache.k[0]):
            return
        attn = self.model.model.layers[0].self_attn
        infllm_v2.warm_prefill_kernels(self.model.config.sparse_config, attn.n_heads, attn.n_kv, attn.head_dim,
                                       self.context, self.cache.device, self.cache.k[0].dtype)

    def run_to_completion(self) -> dict[str, tuple[str, list[int], str | None]]:
        """Step until idle; (text, token ids, finish reason) per request id (tests; offline batches go
        through `cpm4.engine.offline`)."""
        res: dict[str, GenerationOutput] = {}
        while self.has_work():
            for rid, d in self.step():
                res.setdefault(rid, GenerationOutput([])).add(d)
        return {k: (o.text, o.token_ids, o.finish_reason) for k, o in res.items()}


# ---- sizing and building (shared by the server's AsyncEngine and the offline LLM) ----

DEFAULT_GPU_MEMORY_UTILIZATION = 0.9
# Without a device budget, a cache holds at most this many tokens per batch slot (or the context if shorter).
HOST_TOKENS_PER_SEQ = 8192


def default_chunk_tokens(device: torch.device | str, given: int | None = None) -> int:
    """Prompt tokens prefilled per engine step: `given`, else vLLM's max_num_batched_tokens default for its
    server: 8192 on a GPU of 70 GiB or more, 2048 on a smaller one (the 0.5B serving rows of
    benchmarks/RESULTS.md ran with 8192 on an H200), and 512 on the CPU, where a prefill step holds up every
    decoding sequence for longer."""
    if given is not None:
        return given
    device = torch.device(device)
    if device.type != "cuda":
        return 512
    return 8192 if torch.cuda.get_device_properties(device).total_memory >= 70 * 2**30 else 2048


def host_kv_cache_tokens(model: MiniCPM4ForCausalLM, max_batch_size: int, max_model_len: int | None = None) -> int:
    """KV cache size in tokens where no device budget applies (CPU): max_batch_size sequences of up to 8192
    tokens or the context (`context_length`), whichever is shorter."""
    return max_batch_size * min(context_length(model, max_model_len), HOST_TOKENS_PER_SEQ)


def default_kv_cache_tokens(model: MiniCPM4ForCausalLM, max_batch_size: int, chunk_tokens: int | None = None,
                            gpu_memory_utilization: float | None = None, max_model_len: int | None = None) -> int:
    """KV cache size in tokens when none is given. On CUDA, or whenever gpu_memory_utilization is given: the
    whole pages that share of the device (default 0.9) leaves after weights, other processes and a prefill
    chunk's activations and, while `prefill_graphs.ENABLED`, the prefill graphs' pool (`kv_budget_bytes`, which
    runs one chunk; raises off CUDA). Elsewhere `host_kv_cache_tokens`."""
    if gpu_memory_utilization is None and model.device.type != "cuda":
        return host_kv_cache_tokens(model, max_batch_size, max_model_len)
    util = DEFAULT_GPU_MEMORY_UTILIZATION if gpu_memory_utilization is None else gpu_memory_utilization
    ps = page_size_for(model.config)
    chunk = default_chunk_tokens(model.device, chunk_tokens)
    graph_tokens = prefill_graphs_module.capture_limit(model, chunk) if prefill_graphs_module.ENABLED else 0
    budget = kv_budget_bytes(model, util, chunk, graph_tokens)
    pages = budget // PagedKVCache.bytes_per_page(model.config, ps, model.dtype) - 1  # less the scratch page
    return max(int(pages), 1) * ps


def cache_capacity(config: MiniCPM4Config, kv_cache_tokens: int) -> int:
    """Tokens the cache `build_engine` makes for kv_cache_tokens holds: that many, rounded up to whole pages."""
    ps = page_size_for(config)
    return -(-kv_cache_tokens // ps) * ps


def build_engine(model: MiniCPM4ForCausalLM, tokenizer: Tokenizer, kv_cache_tokens: int, max_batch_size: int,
                 chunk_tokens: int | None = None, cuda_graphs: bool | None = None, compile: bool = False,
                 async_output: bool | None = None, stream_text: bool = True,
                 max_model_len: int | None = None, enable_prefix_caching: bool = True,
                 cascade_decode: bool | None = None, detokenize: bool = True,
                 scheduling_policy: str = "fcfs") -> LLMEngine:
    """An engine over a new paged cache of kv_cache_tokens tokens (rounded up to whole pages, `cache_capacity`)
    on the model's device and dtype; enable_prefix_caching: see `PagedKVCache` (prefix_caching); cascade_decode,
    detokenize, scheduling_policy: see `LLMEngine`."""
    ps = page_size_for(model.config)
    cache = PagedKVCache(model.config, cache_capacity(model.config, kv_cache_tokens) // ps, ps, model.device,
                         model.dtype, prefix_caching=enable_prefix_caching)
    return LLMEngine(model, tokenizer, cache, max_batch_size, chunk_tokens, cuda_graphs=cuda_graphs,
                     compile=compile, async_output=async_output, stream_text=stream_text, max_model_len=max_model_len,
                     cascade_decode=cascade_decode, detokenize=detokenize, scheduling_policy=scheduling_policy)
