"""Prometheus metrics of a server (`GET /metrics`), named and shaped like vLLM's so the same dashboards
and alerts apply with the `cpm4_` prefix: requests running and waiting, KV cache usage, preemptions, prompt
and generation tokens, prefix cache queries and hits, finished requests by reason, and histograms of time to
first token, request latency, time per output token and each request's token counts. The engine's state is read
when Prometheus scrapes; the latencies are observed as requests end.

Needs `prometheus-client` (in the `serve` extra)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from contextvars import ContextVar
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from .engine import AsyncEngine, RequestStats

if TYPE_CHECKING:
    from cpm4.engine.beam_search import BeamSearchOutput

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# vLLM's buckets (seconds).
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0, 2560.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
               480.0, 960.0, 1920.0, 7680.0)


TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
                80.0)


def token_buckets(limit: int) -> tuple[int, ...]:
    """vLLM's 1-2-5 buckets for token counts: 1, 2, 5, 10, 20, 50, ... up to `limit` (the context)."""
    out, mag = [], 1
    while True:
        for m in (1, 2, 5):
            if m * mag > limit:
                return tuple(out)
            out.append(m * mag)
        mag *= 10


class _EngineState(Collector):
    """Gauges and counters read from the engine at scrape time (no bookkeeping on the hot path)."""

    def __init__(self, engine: AsyncEngine, model_name: str):
        self.engine = engine
        self.labels = {"model_name": model_name}

    def _one(self, family, value: float):
        family.add_metric(list(self.labels.values()), value)
        return family

    def collect(self) -> Iterator:
        e, names = self.engine, list(self.labels)
        yield self._one(GaugeMetricFamily("cpm4_num_requests_running", "Requests being generated.", labels=names),
                        e.num_running)
        yield self._one(GaugeMetricFamily("cpm4_num_requests_waiting", "Requests queued for the engine.",
                                          labels=names), e.num_waiting)
        usage = e.kv_cache_usage()
        if usage is not None:
            yield self._one(GaugeMetricFamily("cpm4_kv_cache_usage_perc",
                                              "Share of the paged KV cache in use (1 = full).", labels=names), usage)
        yield self._one(CounterMetricFamily("cpm4_num_preemptions", "Sequences preempted for lack of KV pages.",
                                            labels=names), e.num_preempted)
        # The engine's work, as vLLM counts it: a beam search's steps each count their sequences as prompts.
        yield self._one(CounterMetricFamily("cpm4_prompt_tokens", "Prompt tokens of the requests accepted.",
                                            labels=names), e.num_prompt_tokens)
        yield self._one(CounterMetricFamily("cpm4_generation_tokens", "Tokens generated and streamed.",
                                            labels=names), e.num_generation_tokens)


class ServerMetrics:
    """The registry behind one app's `/metrics` (a registry per app: several apps in one process stay apart)."""

    def __init__(self, engine: AsyncEngine, model_name: str):
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(_EngineState(engine, model_name))
        labels = ["model_name"]
        self.ttft = Histogram("cpm4_time_to_first_token_seconds", "Seconds from queueing to the first token.",
                              labels, buckets=TTFT_BUCKETS, registry=self.registry).labels(model_name)
        self.e2e = Histogram("cpm4_e2e_request_latency_seconds", "Seconds from queueing to the request's end.",
                             labels, buckets=E2E_BUCKETS, registry=self.registry).labels(model_name)
        self._finished = Counter("cpm4_request_success", "Finished requests by finish reason.",
                                 ["model_name", "finished_reason"], registry=self.registry)
        # As vLLM's: prompt tokens looked up in the prefix cache, and those found (per admitted request).
        self.prefix_queries = Counter("cpm4_prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
                                      labels, registry=self.registry).labels(model_name)
        self.prefix_hits = Counter("cpm4_prefix_cache_hits", "Prompt tokens found in the prefix cache.",
                                   labels, registry=self.registry).labels(model_name)
        # Per request, as vLLM's: prompt and generated token counts, and the mean time per output token after the
        # first (requests with two tokens or more).
        tokens = token_buckets(getattr(engine, "context_length", None) or 1 << 20)
        self.req_prompt = Histogram("cpm4_request_prompt_tokens", "Prompt tokens of each finished request.",
                                    labels, buckets=tokens, registry=self.registry).labels(model_name)
        self.req_generation = Histogram("cpm4_request_generation_tokens", "Tokens each finished request generated.",
                                        labels, buckets=tokens, registry=self.registry).labels(model_name)
        self.tpot = Histogram("cpm4_request_time_per_output_token_seconds",
                              "Each request's mean seconds per output token after its first.", labels,
                              buckets=TPOT_BUCKETS, registry=self.registry).labels(model_name)
        self.model_name = model_name
        engine.request_observers.append(self.observe)

    def observe(self, stats: RequestStats) -> None:
        """An engine request ended (the engine's observer)."""
        search = _beam_step.get()
        if search is not None:  # a beam search's step: part of the search, which is counted as itself
            search.started = True
            return
        self._record(stats, stats.generation_tokens)

    def _record(self, stats: RequestStats, output_tokens: int) -> None:
        """One request's histograms and counters; output_tokens: what its time per output token is over."""
        if stats.ttft is not None:
            self.ttft.observe(stats.ttft)
        self.e2e.observe(stats.e2e)
        self.req_prompt.observe(stats.prompt_tokens)
        self.req_generation.observe(stats.generation_tokens)
        if stats.ttft is not None and output_tokens > 1:
            self.tpot.observe((stats.e2e - stats.ttft) / (output_tokens - 1))
        self._finished.labels(self.model_name, stats.finish_reason).inc()
        if stats.cached_tokens is not None:
            self.prefix_queries.inc(stats.prompt_tokens)
            self.prefix_hits.inc(stats.cached_tokens)

    def beam_search(self, prompts: Sequence[Sequence[int]]) -> BeamSearchMetrics:
        """The metrics of one API beam search over `prompts`, starting now."""
        return BeamSearchMetrics(self, prompts)

    def render(self) -> bytes:
        return generate_latest(self.registry)


# The beam search whose step runs in this context (the step's engine requests, and the tasks reading them, see it):
# `ServerMetrics.observe` leaves those requests to it.
_beam_step: ContextVar[BeamSearchMetrics | None] = ContextVar("cpm4_beam_step", default=None)


class BeamSearchMetrics:
    """How an API beam search (`use_beam_search`) counts in the request metrics: as one request per prompt
    searched, what the client asked for, not as its steps' engine requests (one per live beam per token: a search
    of width 4 for 100 tokens was 400 requests in the counts and histograms). Its generation tokens are its
    returned beams' (the response's usage.completion_tokens); its time to first token is the first step's, its
    time per output token per step (each step grows every beam by one token). The token counters stay the
    engine's work, as vLLM's."""

    def __init__(self, metrics: ServerMetrics, prompts: Sequence[Sequence[int]]) -> None:
        self.metrics = metrics
        self.prompt_lens = [len(p) for p in prompts]
        self.t0 = time.monotonic()
        self.ttft: float | None = None
        self.cached: list[int | None] = [None] * len(prompts)
        # Whether the engine took one of its requests (`ServerMetrics.observe` saw it end): one refused before any
        # ran (the engine shut down meanwhile) is not counted, as a plain request refused so is not.
        self.started = False

    @contextlib.contextmanager
    def step(self) -> Iterator[None]:
        """Around one step's engine requests: `ServerMetrics.observe` leaves them out."""
        token = _beam_step.set(self)
        try:
            yield
        finally:
            _beam_step.reset(token)

    def stepped(self, cached: Sequence[int | None]) -> None:
        """A step ended; `cached`: its requests' cached prompt tokens (the first step's are the prompts')."""
        if self.ttft is None:
            self.ttft = time.monotonic() - self.t0
            self.cached = list(cached)

    def finish(self, beams: Sequence[BeamSearchOutput], reason: str | None = None) -> None:
        """The search ended with `beams` (each prompt's best, as returned or as they stood); reason: "abort" or
        "error" where it did not end by itself (each prompt's own: its best beam's)."""
        if not self.started:
            return
        e2e = time.monotonic() - self.t0
        for n, out, cached in zip(self.prompt_lens, beams, self.cached):
            lens = [len(s.tokens) - n for s in out.sequences]
            ended = reason or (out.sequences[0].finish_reason if out.sequences else None) or "length"
            self.metrics._record(RequestStats(n, sum(lens), self.ttft, e2e, ended, cached), max(lens, default=0))
