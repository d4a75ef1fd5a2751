"""The streaming side of the OpenAI-compatible API: running a request's choices (engine streams merged, aborted
when the client goes away), each choice's accumulated output, and Server-Sent Events framing."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request

from cpm4.engine.generate import StreamDelta, TokenLogprob

from .engine import AsyncEngine
from .protocol import ChatCompletionRequest, CompletionRequest
from .reasoning import ReasoningStream
from .tool_calls import ToolCallCollector


async def merge_streams(streams: Sequence[AsyncIterator[StreamDelta]]) -> AsyncIterator[tuple[int, StreamDelta]]:
    """Interleave several engine streams as (stream index, delta). Closing this closes (aborts) them all."""
    if len(streams) == 1:  # the usual n=1 request: no pump task and queue hop per token
        async with contextlib.aclosing(streams[0]) as s:
            async for d in s:
                yield 0, d
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i: int, s: AsyncIterator[StreamDelta]) -> None:
        try:
            async with contextlib.aclosing(s):  # cancellation closes the engine stream, which aborts it
                async for d in s:
                    queue.put_nowait((i, d))
        except Exception as err:
            queue.put_nowait((i, err))
        queue.put_nowait((i, done))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        left = len(tasks)
        while left:
            i, item = await queue.get()
            if item is done:
                left -= 1
            elif isinstance(item, Exception):
                try:
                    raise item
                finally:  # the error keeps this frame: naming it here made a cycle that held its cause's frames
                    item = None
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        # Let the aborts run now rather than whenever the tasks are next scheduled.
        await asyncio.gather(*tasks, return_exceptions=True)
        # Another stream's error left unread keeps its frames, the pumps' among them, which name this queue: a
        # cycle that held the error's cause (a failed step's logits) until the garbage collector ran.
        while not queue.empty():
            queue.get_nowait()


class DisconnectWatch:
    """Abort an HTTP request's engine requests as soon as its client disconnects.

    Reading `receive` directly notices the disconnect at once, whatever the response is doing (waiting in
    the queue, in prefill, or between SSE chunks), for streaming and non-streaming responses alike."""

    def __init__(self, request: Request, engine: AsyncEngine, request_ids: list[str]) -> None:
        self.request, self.engine, self.request_ids = request, engine, request_ids
        self.disconnected = False
        self._task: asyncio.Future | None = None

    async def _watch(self) -> None:
        while (await self.request.receive())["type"] != "http.disconnect":
            pass
        self.disconnected = True
        for rid in self.request_ids:
            self.engine.abort(rid)

    async def __aenter__(self) -> DisconnectWatch:
        self._task = asyncio.ensure_future(self._watch())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()


@dataclass
class Choice:
    pieces: list[str] = field(default_factory=list)
    n_tokens: int = 0
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None  # vLLM's: the stop string or stop_token_ids id that ended it
    tools: ToolCallCollector | None = None
    think: ReasoningStream | None = None  # chat with a reasoning parser
    reasoning: list[str] = field(default_factory=list)
    new_reasoning: str = ""  # what the last delta added to the reasoning
    undecided: list[tuple[str, list[int]]] = field(default_factory=list)  # deltas read while `think` was undecided
    cached_tokens: int | None = None  # prompt tokens the paged cache held at admission (None: not known)
    open_tokens: int = 0  # output tokens fed before the reasoning parser reached the answer

    @property
    def reasoning_tokens(self) -> int:
        """Output tokens of the reasoning block, its tags included (OpenAI's completion_tokens_details): those
        fed before the answer began, when the output opened one. Exact while deltas are one step each, as they
        are with a reasoning parser."""
        return self.open_tokens if self.think is not None and self.think.reasoned else 0

    def take(self, d: StreamDelta) -> str:
        """Absorb a delta; return the text it adds to the output (content, for chat; the reasoning it adds
        goes to `new_reasoning`)."""
        self.n_tokens += len(d.token_ids)
        if d.cached_tokens is not None:
            self.cached_tokens = d.cached_tokens
        if d.logprobs:
            self.logprobs.extend(d.logprobs)
        if d.finish_reason is not None:
            self.finish_reason, self.stop_reason = d.finish_reason, d.stop_reason
        text, ids = d.text, d.token_ids
        piece = ""
        if self.think is not None:
            if not self.think.in_content:
                self.open_tokens += len(d.token_ids)
            parts = self.think.feed(d.text, d.token_ids)
            if d.finish_reason is not None:
                parts += self.think.finish()
            self.new_reasoning = "".join(t for kind, t in parts if kind == "reasoning")
            self.reasoning.append(self.new_reasoning)
            text = "".join(t for kind, t in parts if kind == "content")
            if self.think.undecided and d.finish_reason is None:
                # Perhaps the answer's start: an output that opens with a tool call (thinking off, or a forced
                # tool_choice) has the marker, a special token without text, before any text decides.
                self.undecided.append((d.text, ids))
                ids = []
            elif not self.think.in_content and not self.think.undecided:
                self.undecided, ids = [], []  # a tool-call marker inside the reasoning is not a call
            elif self.undecided:
                # The answer after all: the collector gets the held deltas again, each text with its ids in the
                # order they came (it takes a delta's text as coming before a marker among its ids, so text held
                # before the marker, "<thi", stays content), less what the reasoning parser dropped in front.
                held, self.undecided = [*self.undecided, (d.text, ids)], []
                if self.tools is not None:
                    cut = sum(len(t) for t, _ in held) - len(text)
                    for t, i in held:
                        drop = min(max(cut, 0), len(t))
                        cut -= drop
                        piece += self.tools.feed(t[drop:], i)
                    self.pieces.append(piece)
                    return piece
        piece += self.tools.feed(text, ids) if self.tools is not None else text
        self.pieces.append(piece)
        return piece


def usage_options(req: CompletionRequest | ChatCompletionRequest) -> tuple[bool, bool]:
    """(include_usage: a usage chunk at the end, and the usage field in every chunk; continuous: with it, that
    field holds the usage so far instead of null, vLLM's continuous_usage_stats)."""
    o = req.stream_options
    include = bool(o and o.include_usage)
    return include, include and bool(o.continuous_usage_stats)


def usage_counts(prompt_tokens: int, choices: Sequence[Choice], n: int = 1) -> dict[str, Any]:
    """OpenAI's usage of a request whose choices are `n` per prompt: the completion tokens of all of them, (as
    OpenAI's prompt_tokens_details) the prompt tokens the paged cache's shared prefixes held, one choice per
    prompt counted (its first), once every prompt's first choice knows it, and with a reasoning parser (as
    completion_tokens_details) the output tokens of the reasoning."""
    completion = sum(c.n_tokens for c in choices)
    usage: dict[str, Any] = {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                             "total_tokens": prompt_tokens + completion}
    cached = [c.cached_tokens for c in choices[::n]]
    if cached and all(c is not None for c in cached):
        usage["prompt_tokens_details"] = {"cached_tokens": sum(cached)}
    if any(c.think is not None for c in choices):  # a reasoning parser splits the output: its share counted
        usage["completion_tokens_details"] = {"reasoning_tokens": sum(c.reasoning_tokens for c in choices)}
    return usage


_DONE = "data: [DONE]\n\n"


def stream_error(err: Exception) -> str:
    return sse_event({"error": {"message": str(err), "type": "server_error", "param": None, "code": None}})


async def sse_stream(body: AsyncIterator[str], usage: Callable[[], dict[str, Any]] | None) -> AsyncIterator[str]:
    """A stream's events, then the usage chunk when asked for, then [DONE]. An error after the headers went
    out is reported inside the stream, as OpenAI does. Closing the stream closes `body` at once (its
    clean-up aborts the requests of a client that went away)."""
    try:
        async for event in body:
            yield event
        if usage is not None:
            yield sse_event(usage())
    except Exception as err:
        yield stream_error(err)
    finally:
        await body.aclose()
    yield _DONE


def sse_event(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, allow_nan=False)}\n\n"
