"""OpenAI-compatible HTTP API (FastAPI): /v1/models, /v1/completions, /v1/chat/completions, /health.

Every request becomes one engine request per choice (`n`, and each prompt of a batched completion). Those
run concurrently and their deltas are merged; a client that goes away aborts all of them so their batch
slots free at once. Errors use OpenAI's body, `{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import json
import logging
import math
import random
import re
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from cpm4.engine.beam_search import BeamSearch, BeamSearchOutput, BeamSearchParams
from cpm4.engine.generate import GenerationOutput, PromptTooLongError, StreamDelta, TokenLogprob
from cpm4.engine.guided import compile_grammar, tool_call_structural_tag
from cpm4.engine.params import (
    STRUCTURED_FIELDS,
    SamplingParams,
    check_priority,
    nth_seed,
    truncate_prompt,
    valid_text,
)
from cpm4.model.config import is_int
from cpm4.model.tokenizer import Tokenizer, openai_message

from .engine import AsyncEngine, EngineClosedError
from .protocol import (
    MAX_CHOICES,
    MAX_LOGPROBS,
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    DetokenizeRequest,
    ResponseFormat,
    TokenizeRequest,
)
from .reasoning import END_THINK, THINK, ReasoningStream, check_reasoning_parser
from .responses import ResponsesRequest, responses
from .stats import StatsLogger
from .streaming import Choice, DisconnectWatch, merge_streams, sse_event, sse_stream, usage_counts, usage_options
from .tool_calls import ToolCallCollector

if TYPE_CHECKING:
    from .metrics import ServerMetrics

__all__ = ["APIError", "create_app"]

BodyT = TypeVar("BodyT", bound=BaseModel)
_log = logging.getLogger("cpm4.serve")

# JSON has no -inf; a token the model rules out entirely is reported with this log-probability (as vLLM does).
_MIN_LOGPROB = -9999.0
# Template options a request may not override through chat_template_kwargs.
_RESERVED_TEMPLATE_KWARGS = {"messages", "tools", "add_generation_prompt", "tokenize", "chat_template",
                             "return_dict", "continue_final_message"}


class APIError(Exception):
    """An error answered with OpenAI's error body."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def response(self) -> JSONResponse:
        return _error_response(self.status, self.message, self.type, self.param, self.code)


def _error_response(status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                    code: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": type, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def _param_of(message: str) -> str | None:
    # SamplingParams' messages start with the field name ("temperature must be a number in [0, 1e30], got -1").
    m = re.match(r"([a-z_]+) ", message)
    return m.group(1) if m else None


# ---------------------------------------------------------------------------------------------------------
# Token text and logprobs


def _byte_level_table() -> dict[str, int]:
    """Inverse of the GPT-2 byte-to-unicode map used by byte-level BPE vocabularies."""
    printable = {*range(33, 127), *range(161, 173), *range(174, 256)}
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[chr(b)] = b
        else:
            table[chr(256 + extra)] = b
            extra += 1
    return table


class _TokenText:
    """Per-token strings and UTF-8 bytes for logprobs output (cached: the same ids recur constantly)."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        backend = getattr(tokenizer.hf, "backend_tokenizer", None)
        decoder = getattr(backend, "decoder", None) if backend is not None else None
        self._byte_level = type(decoder).__name__ == "ByteLevel"
        self._table = _byte_level_table() if self._byte_level else {}
        self.text = functools.lru_cache(maxsize=65536)(self._text)
        self.skipped = functools.lru_cache(maxsize=65536)(self._skipped)
        self.bytes = functools.lru_cache(maxsize=65536)(self._bytes)

    def _text(self, token_id: int) -> str:
        return self.tokenizer.token_text(token_id)

    def _skipped(self, token_id: int) -> bool:
        """A special token, which decoding with skip_special_tokens leaves out of the text."""
        return self.tokenizer.decode([token_id], skip_special_tokens=True) == "" != self.text(token_id)

    def _bytes(self, token_id: int) -> list[int]:
        # A token can hold part of a UTF-8 character; its text then shows U+FFFD, its bytes stay exact.
        piece = self.tokenizer.hf.convert_ids_to_tokens(token_id)
        if isinstance(piece, str):
            m = re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", piece)  # sentencepiece byte fallback
            if m:
                return [int(m.group(1), 16)]
            if self._byte_level and all(c in self._table for c in piece):
                return [self._table[c] for c in piece]
        return list(self.text(token_id).encode("utf-8"))


def _lp(x: float) -> float:
    return max(float(x), _MIN_LOGPROB)


# ---------------------------------------------------------------------------------------------------------
# The server


class _OpenAIServer:
    def __init__(self, engine: AsyncEngine, model_name: str | Sequence[str],
                 sampling_defaults: dict[str, Any] | None = None, reasoning_parser: str | None = None,
                 log_requests: bool = False, max_log_len: int | None = None) -> None:
        self.engine = engine
        self.log_requests = log_requests  # vLLM's --enable-log-requests: a line per engine request
        self.max_log_len = max_log_len  # ... showing at most this many prompt characters and ids
        # Values for the sampling fields a request leaves unset (the checkpoint's generation_config.json).
        self.defaults = sampling_defaults or {}
        check_reasoning_parser(reasoning_parser)
        self.reasoning_parser = reasoning_parser
        self.tokenizer = engine.tokenizer
        # vLLM's several served names: responses carry the first, requests may name any of them.
        self.model_names = [model_name] if isinstance(model_name, str) else list(model_name)
        self.model_name = self.model_names[0]
        self.created = int(time.time())
        self.tokens = _TokenText(engine.tokenizer)
        self.metrics: ServerMetrics | None = None  # /metrics (create_app sets it; none without prometheus-client)
        self.seeds: random.Random | None = None
        self.max_logprobs = MAX_LOGPROBS
        self.tokens_as_ids = False

    def configure(self, seed: int | None = None, max_logprobs: int | None = None,
                  return_tokens_as_token_ids: bool = False) -> None:
        """vLLM's server-wide options (`create_app`): the seed unseeded requests' seeds are drawn from, the
        logprobs cap, logprobs' tokens as "token_id:ID" by default."""
        if max_logprobs is not None and not (is_int(max_logprobs) and 0 <= max_logprobs <= MAX_LOGPROBS):
            raise ValueError(f"max_logprobs must be an integer in [0, {MAX_LOGPROBS}], got {max_logprobs!r}")
        if seed is not None and not is_int(seed):
            raise ValueError(f"seed must be an int or None, got {seed!r}")
        self.seeds = None if seed is None else random.Random(seed)
        self.max_logprobs = MAX_LOGPROBS if max_logprobs is None else max_logprobs
        self.tokens_as_ids = bool(return_tokens_as_token_ids)

    # ----- shared request handling -----

    def model_card(self, name: str | None = None) -> dict[str, Any]:
        return {"id": name or self.model_name, "object": "model", "created": self.created, "owned_by": "cpm4",
                "root": self.model_name, "parent": None, "max_model_len": self.engine.context_length,
                "permission": [{"id": f"modelperm-{uuid.uuid4().hex}", "object": "model_permission",  # vLLM's
                                "created": self.created, "allow_create_engine": False, "allow_sampling": True,
                                "allow_logprobs": True, "allow_search_indices": False, "allow_view": True,
                                "allow_fine_tuning": False, "organization": "*", "group": None,
                                "is_blocking": False}],
                "vocab_size": self.engine.vocab_size}  # (what `cpm4 bench serve` draws its random prompts from)

    def _check_model(self, model: str | None) -> None:
        if model is not None and model not in self.model_names:
            served = ", ".join(f"`{n}`" for n in self.model_names)
            raise APIError(404, f"The model `{model}` does not exist; this server serves {served}.",
                           param="model", code="model_not_found")

    def _check_common(self, req: CompletionRequest | ChatCompletionRequest) -> None:
        self._check_model(req.model)
        if not self.engine.is_running:
            # A dead or stopped engine (vLLM: 503 on /health too): refused before a stream opens, not a 200 and
            # an error event.
            raise APIError(503, self.engine.stopped_because, type="server_error")
        if req.stream_options is not None and not req.stream:
            # As OpenAI and vLLM: the client asked for stream usage it would never get.
            raise APIError(400, "stream_options is only allowed when stream is true", param="stream_options")

    def _params(self, req: CompletionRequest | ChatCompletionRequest, max_tokens: int, logprobs: int | None,
                seed: int | None, grammar: dict[str, Any] | None = None, grammar_param: str | None = None
                ) -> SamplingParams:
        """grammar: SamplingParams' grammar fields (guided_json or structural_tag), from the request field
        grammar_param, which a 400 for a schema that does not compile names. The request's own guided_json /
        guided_regex / guided_choice / guided_grammar / structured_outputs (vLLM's) go in as they are."""
        if logprobs is not None and logprobs > self.max_logprobs:  # a 400 as vLLM's past its --max-logprobs
            param = "top_logprobs" if isinstance(req, ChatCompletionRequest) else "logprobs"
            raise APIError(400, f"{param} {logprobs} is more than this server's --max-logprobs "
                           f"{self.max_logprobs}", param=param)
        d = self.defaults
        fields = dict(grammar or {})
        where = dict.fromkeys(fields, grammar_param)  # SamplingParams field -> the request field that gave it
        for name, field, value in self._guided(req):
            if field in fields:
                raise APIError(400, f"{name} cannot be combined with {where[field]}: give one grammar",
                               param=name.split(".")[0])
            fields[field], where[field] = value, name
        try:
            params = SamplingParams(
                max_tokens=max_tokens,
                temperature=d.get("temperature", 1.0) if req.temperature is None else req.temperature,
                top_p=d.get("top_p", 1.0) if req.top_p is None else req.top_p,
                top_k=d.get("top_k", 0) if req.top_k is None else req.top_k,
                min_p=d.get("min_p", 0.0) if req.min_p is None else req.min_p,
                repetition_penalty=d.get("repetition_penalty", 1.0) if req.repetition_penalty is None
                else req.repetition_penalty,
                presence_penalty=req.presence_penalty or 0.0,
                frequency_penalty=req.frequency_penalty or 0.0,
                logit_bias=req.logit_bias or None,
                seed=seed,
                stop=req.stop,
                stop_token_ids=req.stop_token_ids,
                ignore_eos=req.ignore_eos,
                min_tokens=req.min_tokens,
                include_stop_str_in_output=req.include_stop_str_in_output,
                logprobs=logprobs,
                allowed_token_ids=req.allowed_token_ids,
                skip_special_tokens=req.skip_special_tokens,
                bad_words=req.bad_words,
                priority=req.priority,
                # a chat answer's grammar waits for the end of its reasoning, as vLLM's with a reasoning parser
                reasoning_tags=(THINK, END_THINK) if fields and self.reasoning_parser
                and isinstance(req, ChatCompletionRequest) else None,
                **fields,
            )
            params.check_vocab(self.engine.vocab_size)
            check_priority(params, getattr(self.engine, "scheduling_policy", "fcfs"))
            if params.guided:  # compiled (and cached) now, so a bad schema is this request's 400
                compile_grammar(self.tokenizer, self.engine.vocab_size, self.engine.config.eos_token_ids,
                                params)
        except ValueError as e:
            msg, param = str(e), _param_of(str(e))
            if param in where:  # name the request field, not SamplingParams'
                name = where[param]
                if name in ("response_format", "tools") and "is not a valid" in msg:
                    # A schema in the grammar the server built from that request field.
                    what = {"response_format": "json_schema.schema", "tools": "a function's parameters"}[name]
                    msg = f"{name}: invalid JSON schema in {what}: {msg.split(': ', 1)[-1]}"
                else:  # each SamplingParams field in the message's head as the request named it
                    head, sep, rest = msg.partition(": ")
                    head = re.sub(rf"\b({'|'.join(where)})\b", lambda m: where[m.group(1)], head)
                    msg = head + sep + rest
                param = name.split(".")[0]
            raise APIError(400, msg, param=param) from None
        return params

    async def _checked_params(self, req: CompletionRequest | ChatCompletionRequest, max_tokens: int,
                              logprobs: int | None, seed: int | None, grammar: dict[str, Any] | None,
                              grammar_param: str | None, inline: bool) -> None:
        """`_params` once before the choices' (its errors raised here): in a worker thread when the request has a
        grammar to compile (xgrammar compiles without the GIL and caches the result, so the choices' calls on the
        event loop find it: 100k guided_choice strings took 63 s, and every other request waited), else on the
        loop where `inline` asks for it (a request generating nothing still has its fields checked)."""
        if grammar or self._guided(req):
            await asyncio.to_thread(self._params, req, max_tokens, logprobs, seed, grammar, grammar_param)
        elif inline:
            self._params(req, max_tokens, logprobs, seed, grammar, grammar_param)

    @staticmethod
    def _guided(req: CompletionRequest | ChatCompletionRequest) -> list[tuple[str, str, Any]]:
        """The grammars a request gives in vLLM's fields: (its name in the request, SamplingParams field, value)."""
        out = [(k, k, getattr(req, k)) for k in ("guided_json", "guided_regex", "guided_choice", "guided_grammar")
               if getattr(req, k) is not None]
        so = req.structured_outputs
        if so is not None:
            for name, field in STRUCTURED_FIELDS.items():
                value = getattr(so, "json_schema" if name == "json" else name)  # `json` shadows pydantic's
                if value is not None:
                    out.append((f"structured_outputs.{name}", field, value))
            if so.json_object:
                out.append(("structured_outputs.json_object", "guided_json", True))
        return out

    @staticmethod
    def _response_format(rf: ResponseFormat | None) -> dict[str, Any]:
        """The grammar fields of SamplingParams for response_format (none for text)."""
        if rf is None or rf.type == "text":
            return {}
        if rf.type == "json_object":
            return {"guided_json": True}
        if rf.type == "json_schema":
            schema = (rf.json_schema or {}).get("schema")
            if not isinstance(schema, dict):
                raise APIError(400, "response_format json_schema needs json_schema.schema, a JSON schema object",
                               param="response_format")
            return {"guided_json": schema}
        if rf.type == "structural_tag":  # vLLM's: JSON schemas between begin and end strings, after a trigger
            return {"structural_tag": {"type": "structural_tag", "structures": rf.structures,
                                       "triggers": rf.triggers}}
        raise APIError(400, f"response_format type {rf.type!r} is not supported (text, json_object, json_schema "
                            "or structural_tag)", param="response_format")

    @staticmethod
    def _tool_choice(req: ChatCompletionRequest) -> dict[str, Any]:
        """The grammar fields of SamplingParams forcing tool calls (tool_choice "required" or a named
        function): MiniCPM4's call lines, each a tool's name and arguments following its parameters."""
        choice = req.tool_choice
        if choice is None or choice in ("none", "auto"):
            return {}
        names = [t.function.name for t in req.tools or []]
        if not req.tools:
            raise APIError(400, "tool_choice 'required' or a named function needs tools", param="tool_choice")
        name = None
        if not isinstance(choice, str):
            name = choice.function.get("name")
            if not isinstance(name, str):
                raise APIError(400, "tool_choice.function.name must be a string", param="tool_choice")
            if name not in names:
                raise APIError(400, f"tool_choice names the function {name!r}, which is not among the tools "
                                    f"({', '.join(names)})", param="tool_choice")
        fns = [t.function.model_dump(exclude_none=True) for t in req.tools]
        # A named function is called once; "required" makes one or more calls unless parallel_tool_calls is false.
        tag = tool_call_structural_tag(fns, name, parallel=name is None and req.parallel_tool_calls is not False)
        return {"structural_tag": tag}

    def _check_prompt(self, ids: list[int], param: str, truncate: int | None = None, scoring: bool = False
                      ) -> list[int]:
        """The prompt's ids as the engine takes them; truncate: keep the last this many (vLLM's
        truncate_prompt_tokens), before the length check; scoring: nothing is generated (max_tokens 0), so the
        prompt may fill the context."""
        ids = truncate_prompt(ids, truncate, self.engine.context_length)
        try:
            return self.engine.check_prompt(ids, scoring=scoring)
        except PromptTooLongError as e:
            raise APIError(400, f"This model's maximum context length is {self.engine.context_length} tokens: "
                                f"{e}", param=param, code="context_length_exceeded") from None
        except ValueError as e:
            raise APIError(400, str(e), param=param) from None

    def _check_max_tokens(self, ids: list[int], max_tokens: int | None, param: str = "max_tokens") -> None:
        """A max_tokens the client set that does not fit beside the prompt is a 400 (as in vLLM and OpenAI), not
        silently cut to the room left."""
        room = self.engine.context_length - len(ids)
        if max_tokens is not None and max_tokens > room:
            raise APIError(400, f"{param} is too large: {max_tokens}. This model's maximum context length is "
                                f"{self.engine.context_length} tokens and the prompt has {len(ids)}, which leaves "
                                f"{room} for the completion", param=param, code="context_length_exceeded")

    @contextlib.asynccontextmanager
    async def _run(self, request: Request, request_id: str, jobs: list[tuple[list[int], SamplingParams]],
                   coalesce: bool = True, stream_text: bool = True
                   ) -> AsyncIterator[tuple[DisconnectWatch, AsyncIterator[tuple[int, StreamDelta]]]]:
        """Start one engine request per job; yields (disconnect watch, merged deltas as (job index, delta)).
        Leaving the block closes the merged stream, which aborts whatever has not finished. coalesce, stream_text:
        see `AsyncEngine.stream` (coalesce off where a tool-call or reasoning parser reads each step's tokens
        apart)."""
        ids = [f"{request_id}-{i}" for i in range(len(jobs))]
        if self.log_requests:
            for rid, (p, sp) in zip(ids, jobs):
                self._log_request(rid, p, sp)
        streams = [self.engine.stream(p, sp, rid, coalesce, stream_text) for rid, (p, sp) in zip(ids, jobs)]
        async with DisconnectWatch(request, self.engine, ids) as watch, \
                contextlib.aclosing(merge_streams(streams)) as merged:
            yield watch, merged

    def _log_request(self, rid: str, prompt: list[int], params: SamplingParams) -> None:
        """vLLM's request log line: the id, the prompt (text and ids, cut to max_log_len), the params."""
        n = self.max_log_len
        ids = prompt if n is None else prompt[:n]
        text = self.tokenizer.decode(ids, skip_special_tokens=False)
        if n is not None:
            text = text[:n]
        _log.info("Received request %s: prompt: %r, params: %s, prompt_token_ids: %s (%d tokens)", rid, text,
                  params, ids, len(prompt))

    async def _collect(self, request: Request, request_id: str, jobs: list[tuple[list[int], SamplingParams]],
                       choices: list, coalesce: bool = True) -> bool:
        """Run the jobs to the end, feeding each choice its deltas; True if the client went away. Without a parser
        reading each step's text (coalesce), the text is read at the end only: the engine decodes it then
        (stream_text=False)."""
        async with self._run(request, request_id, jobs, coalesce, stream_text=not coalesce) as (watch, merged):
            async for i, d in merged:
                choices[i].take(d)
        return watch.disconnected

    def _seeds(self, seed: int | None, n: int) -> list[int | None]:
        # n > 1 with a seed: one distinct, reproducible seed per choice. With --seed an unseeded request takes the
        # next from the server's seeded generator, so the run repeats as vLLM's does with its seed.
        if seed is None and self.seeds is not None:
            seed = self.seeds.getrandbits(63)
        return [nth_seed(seed, j) for j in range(n)]

    def _token_str(self, token_id: int, as_ids: bool) -> str:
        return f"token_id:{token_id}" if as_ids else self.tokens.text(token_id)

    # ----- /v1/completions -----

    def _completion_prompts(self, req: CompletionRequest) -> list[tuple[list[int], str]]:
        p = req.prompt
        if isinstance(p, str):
            raw: list[str | list[int]] = [p]
        elif not p:
            raise APIError(400, "prompt must not be empty", param="prompt")
        elif isinstance(p[0], int):
            raw = [list(p)]
        else:
            raw = list(p)
        if len(raw) * req.n > MAX_CHOICES:  # before any is encoded
            raise APIError(400, f"at most {MAX_CHOICES} choices (prompts x n) per request",
                           param="prompt" if req.n == 1 or len(raw) > MAX_CHOICES else "n")
        out = []
        for item in raw:
            ids, text = (self.tokenizer.encode(item, add_bos=req.add_special_tokens), item) if isinstance(item, str) \
                else (list(item), "")
            n = len(ids)
            # before any decode: ids in range
            ids = self._check_prompt(ids, "prompt", req.truncate_prompt_tokens, scoring=req.max_tokens == 0)
            if req.echo and (not isinstance(item, str) or len(ids) < n):
                text = self.tokenizer.decode(ids)  # what the model saw
            out.append((ids, text))
        return out

    def _completion_logprobs(self, lps: list[TokenLogprob], offset: int, as_ids: bool, skip_special: bool = True
                             ) -> tuple[dict[str, Any], int]:
        """OpenAI's completion logprobs of these tokens, their text starting at `offset` in the choice's text; and
        the offset after them. text_offset counts what the text shows: a special token that the text skips
        (the BOS of an echoed prompt, the EOS that ends it) takes no room."""
        tokens, token_lps, tops, offsets = [], [], [], []
        for lp in lps:
            s = self._token_str(lp.token_id, as_ids)
            tokens.append(s)
            offsets.append(offset)
            offset += 0 if skip_special and self.tokens.skipped(lp.token_id) else len(self.tokens.text(lp.token_id))
            if lp.logprob is None:  # a prompt's first token: nothing predicts it
                token_lps.append(None)
                tops.append(None)
                continue
            token_lps.append(_lp(lp.logprob))
            top: dict[str, float] = {}
            for tid, v in lp.top:
                top.setdefault(self._token_str(tid, as_ids), _lp(v))  # first (most likely) wins on equal text
            top.setdefault(s, _lp(lp.logprob))  # the sampled token is always listed, as OpenAI does
            tops.append(top)
        return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}, offset

    async def _beam_search(self, request: Request, rid: str, req: CompletionRequest | ChatCompletionRequest,
                           prompts: list[list[int]], max_tokens: int) -> list[BeamSearchOutput] | None:
        """vLLM's use_beam_search: each prompt's n best beams of a search of width n (`BeamSearch` stepped on the
        engine: a step's beams run as one request each, together, their prefix pages cached). None when the
        client went away (the step's requests are aborted). Only the fields a beam search reads apply, so those
        it would ignore silently are refused."""
        logprobs = req.logprobs is not None and req.logprobs is not False
        given = [name for name, on in (
            ("stream", req.stream), ("logprobs", logprobs), ("stop", bool(req.stop)),
            ("stop_token_ids", bool(req.stop_token_ids)), ("response_format", req.response_format is not None),
            ("tools", bool(getattr(req, "tools", None))), ("min_tokens", bool(req.min_tokens))) if on]
        given += [name for name, _, _ in self._guided(req)]
        if given:
            raise APIError(400, f"use_beam_search cannot be combined with {given[0]}", param=given[0].split(".")[0])
        try:
            params = BeamSearchParams(beam_width=req.n, max_tokens=max_tokens, ignore_eos=req.ignore_eos,
                                      temperature=req.temperature or 0.0, length_penalty=req.length_penalty)
        except ValueError as e:
            msg = str(e).replace("beam_width", "n (the beam width)")
            raise APIError(400, msg, param="n" if "beam_width" in str(e) else _param_of(str(e))) from None
        # Beams end ("length") at the context or where the whole KV cache is full (as any output does there): a
        # step past it was a prompt the cache cannot hold, a 500.
        limit = min(self.engine.context_length, getattr(self.engine, "cache_tokens", None) or math.inf)
        search = BeamSearch(prompts, params, self.engine.config.eos_token_ids, limit)
        # The metrics count the search as one request per prompt, not as its steps' engine requests (why:
        # `BeamSearchMetrics`).
        counted = self.metrics.beam_search(prompts) if self.metrics is not None else None
        ended: str | None = "error"  # how it ended where not by itself
        try:
            while not search.done:
                asked = search.requests()
                outs = [GenerationOutput(list(p)) for p in asked]
                with counted.step() if counted is not None else contextlib.nullcontext():
                    async with self._run(request, f"{rid}-{search.steps}", [(p, search.step_params) for p in asked],
                                         stream_text=False) as (watch, merged):
                        async for i, d in merged:
                            outs[i].add(d)
                if watch.disconnected:
                    ended = "abort"
                    return None
                if counted is not None:
                    counted.stepped([o.num_cached_tokens for o in outs])
                search.advance(outs)
            beams = search.results(self.tokenizer.decode)
            ended = None
            return beams
        except asyncio.CancelledError:  # the server stopping, or the task cancelled: as an aborted request
            ended = "abort"
            raise
        finally:
            if counted is not None:  # cancelled or failed: the beams as they stood (not decoded: only counted)
                counted.finish(search.results(lambda ids: "") if ended else beams, ended)

    @staticmethod
    def _beam_usage(prompt_tokens: int, beams: list[BeamSearchOutput], prompts: list[list[int]]) -> dict[str, Any]:
        completion = sum(len(s.tokens) - len(p) for b, p in zip(beams, prompts) for s in b.sequences)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                "total_tokens": prompt_tokens + completion}

    async def completions(self, req: CompletionRequest, request: Request) -> Response:
        self._check_common(req)
        if req.suffix:
            raise APIError(400, "suffix is not supported", param="suffix")
        if req.best_of is not None and req.best_of != req.n:
            raise APIError(400, "best_of is not supported (only best_of == n)", param="best_of")
        prompts = self._completion_prompts(req)
        seeds = self._seeds(req.seed, req.n)
        # An explicit null (vLLM's): up to the context (the engine ends each choice there); unset is 16.
        max_tokens = min(self.engine.context_length, self.defaults.get("max_tokens", self.engine.context_length)) \
            if req.max_tokens is None else req.max_tokens
        if req.use_beam_search and max_tokens:
            for ids, _ in prompts:
                self._check_max_tokens(ids, req.max_tokens)
            rid = f"cmpl-{uuid.uuid4().hex}"
            beams = await self._beam_search(request, rid, req, [ids for ids, _ in prompts], max_tokens)
            if beams is None:
                return Response(status_code=499)
            out = [{"index": p * req.n + j, "text": (text if req.echo else "") + s.text, "logprobs": None,
                    "finish_reason": s.finish_reason, "stop_reason": None}
                   for p, ((_, text), b) in enumerate(zip(prompts, beams)) for j, s in enumerate(b.sequences)]
            return JSONResponse({"id": rid, "object": "text_completion", "created": int(time.time()),
                                 "model": self.model_name, "choices": out,
                                 "usage": self._beam_usage(sum(len(i) for i, _ in prompts), beams,
                                                           [i for i, _ in prompts])})
        grammar = self._response_format(req.response_format)
        jobs, choices, echoes = [], [], []
        for ids, _ in prompts:
            self._check_max_tokens(ids, req.max_tokens)
        # max_tokens 0: nothing is generated, but a bad field is still a 400, as with 1
        await self._checked_params(req, max_tokens or 1, req.logprobs, seeds[0], grammar, "response_format",
                                   inline=not max_tokens)
        for ids, text in prompts:
            for j in range(req.n):
                if max_tokens:  # max_tokens 0: the prompt only (echoed and/or scored), nothing generated
                    jobs.append((ids, self._params(req, max_tokens, req.logprobs, seeds[j], grammar,
                                                   "response_format")))
                choices.append(Choice(finish_reason=None if max_tokens else "length"))
                echoes.append(text if req.echo else "")
        # echo with logprobs: each prompt token's log-probability too (lm-eval's loglikelihood requests).
        echo_lps: list[list[TokenLogprob]] = [[] for _ in choices]
        if req.echo and req.logprobs is not None:
            for p, (ids, _) in enumerate(prompts):
                lps = await self.engine.prompt_logprobs(ids, req.logprobs)
                for j in range(req.n):
                    echo_lps[p * req.n + j] = lps
        rid = f"cmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        prompt_tokens = sum(len(ids) for ids, _ in prompts)
        as_ids = req.return_tokens_as_token_ids or self.tokens_as_ids
        skip = req.skip_special_tokens is not False
        include_usage, continuous = usage_options(req)

        def chunk(i: int, text: str, logprobs: Any = None, finish: str | None = None) -> dict[str, Any]:
            choice = {"index": i, "text": text, "logprobs": logprobs, "finish_reason": finish}
            if finish is not None:
                choice["stop_reason"] = choices[i].stop_reason
            obj: dict[str, Any] = {"id": rid, "object": "text_completion", "created": created,
                                   "model": self.model_name, "choices": [choice]}
            if include_usage:
                obj["usage"] = usage_counts(prompt_tokens, choices, req.n) if continuous else None
            return obj

        if req.stream:
            async def events() -> AsyncIterator[str]:
                offsets = [len(e) for e in echoes]
                async with self._run(request, rid, jobs) as (_, merged):
                    for i, e in enumerate(echoes):
                        lp = None
                        if echo_lps[i]:  # the echoed prompt shows no special token (skip_special_tokens or not)
                            lp, _ = self._completion_logprobs(echo_lps[i], 0, as_ids)
                        if e or lp is not None:
                            yield sse_event(chunk(i, e, lp))
                        if choices[i].finish_reason is not None:  # max_tokens 0: nothing follows
                            yield sse_event(chunk(i, "", None, choices[i].finish_reason))
                    async for i, d in merged:
                        c = choices[i]
                        text = c.take(d)
                        lp = None
                        if req.logprobs is not None and d.logprobs:
                            lp, offsets[i] = self._completion_logprobs(d.logprobs, offsets[i], as_ids, skip)
                        if text or lp is not None:
                            yield sse_event(chunk(i, text, lp))
                        if d.finish_reason is not None:
                            yield sse_event(chunk(i, "", None, d.finish_reason))

            def usage() -> dict[str, Any]:
                return {"id": rid, "object": "text_completion", "created": created, "model": self.model_name,
                        "choices": [], "usage": usage_counts(prompt_tokens, choices, req.n)}

            return StreamingResponse(sse_stream(events(), usage if include_usage else None),
                                     media_type="text/event-stream")

        if await self._collect(request, rid, jobs, choices):
            return Response(status_code=499)  # nobody is listening; the requests were aborted
        out = []
        for i, c in enumerate(choices):
            lp = None
            if req.logprobs is not None:
                # the echoed prompt shows no special token; the output shows them unless skip_special_tokens
                lp, _ = self._completion_logprobs(echo_lps[i], 0, as_ids)
                gen, _ = self._completion_logprobs(c.logprobs, len(echoes[i]), as_ids, skip)
                lp = {k: v + gen[k] for k, v in lp.items()}
            out.append({"index": i, "text": echoes[i] + "".join(c.pieces), "logprobs": lp,
                        "finish_reason": c.finish_reason, "stop_reason": c.stop_reason})
        return JSONResponse({"id": rid, "object": "text_completion", "created": created, "model": self.model_name,
                             "choices": out, "usage": usage_counts(prompt_tokens, choices, req.n)})

    # ----- /v1/chat/completions -----

    @staticmethod
    def _message_dict(i: int, m: ChatMessage) -> dict[str, Any]:
        content = m.content
        if isinstance(content, list):
            content = [part.model_dump(exclude_none=True) for part in content]
        d: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role, "content": content}
        if m.name is not None:
            d["name"] = m.name
        if m.tool_call_id is not None:
            d["tool_call_id"] = m.tool_call_id
        if m.tool_calls:
            d["tool_calls"] = [c.model_dump(exclude_none=True) for c in m.tool_calls]
        try:  # text parts joined, a null content "", earlier calls' arguments as objects: as `LLM.chat` renders them
            return openai_message(d, f"messages[{i}]")
        except ValueError as e:
            raise APIError(400, str(e), param="messages") from None

    # ----- /tokenize, /detokenize (vLLM's) -----

    def tokenize(self, req: TokenizeRequest) -> dict[str, Any]:
        self._check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise APIError(400, "give exactly one of prompt and messages", param="prompt")
        # Never refused for its length: the count and max_model_len are what a client compares to decide what to trim.
        if req.prompt is not None:
            ids = self.tokenizer.encode(req.prompt, add_bos=req.add_special_tokens)
        else:
            ids = self._chat_ids(req, check=False)
        strs = self.tokenizer.hf.convert_ids_to_tokens(ids) if req.return_token_strs else None
        return {"tokens": ids, "count": len(ids), "max_model_len": self.engine.context_length, "token_strs": strs}

    def detokenize(self, req: DetokenizeRequest) -> dict[str, Any]:
        self._check_model(req.model)
        for t in req.tokens:
            if not 0 <= t < self.engine.vocab_size:
                raise APIError(400, f"token id {t} is not in the vocabulary [0, {self.engine.vocab_size})",
                               param="tokens")
        # As vLLM's (the tokenizer's decode): special tokens written out, a chat's ids read back as its template
        return {"prompt": self.tokenizer.decode(req.tokens, skip_special_tokens=False)}

    def _chat_ids(self, req: ChatCompletionRequest | TokenizeRequest, check: bool = True) -> list[int]:
        messages = [self._message_dict(i, m) for i, m in enumerate(req.messages)]
        tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None
        kwargs = dict(req.chat_template_kwargs or {})
        if req.chat_template is not None:  # vLLM's answer without --trust-request-chat-template
            raise APIError(400, "chat_template is not accepted in a request: the server renders every chat with its "
                                "own template (--chat-template)", param="chat_template")
        bad = sorted(_RESERVED_TEMPLATE_KWARGS & kwargs.keys())
        if bad:
            raise APIError(400, f"chat_template_kwargs may not set {', '.join(bad)}", param="chat_template_kwargs")
        if req.continue_final_message:
            if req.add_generation_prompt:
                raise APIError(400, "continue_final_message needs add_generation_prompt false (the reply goes on "
                                    "from the last message, not in a new turn)", param="continue_final_message")
            if messages[-1]["role"] != "assistant":
                raise APIError(400, "continue_final_message needs an assistant message last, got "
                                    f"{messages[-1]['role']!r}", param="continue_final_message")
            kwargs["continue_final_message"] = True
        try:
            ids = self.tokenizer.encode_chat(messages, add_generation_prompt=req.add_generation_prompt, tools=tools,
                                             **kwargs)
        except APIError:
            raise
        except Exception as e:  # the template rejected the conversation (ValueError, jinja errors)
            raise APIError(400, f"cannot render the conversation with the chat template: {e}",
                           param="messages") from None
        return self._check_prompt(ids, "messages", getattr(req, "truncate_prompt_tokens", None)) if check else ids

    def _chat_logprobs(self, lps: list[TokenLogprob], as_ids: bool) -> dict[str, Any]:
        def entry(tid: int, v: float) -> dict[str, Any]:
            return {"token": self._token_str(tid, as_ids), "logprob": _lp(v), "bytes": self.tokens.bytes(tid)}

        return {"content": [{**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]}
                            for lp in lps]}

    async def chat(self, req: ChatCompletionRequest, request: Request) -> Response:
        self._check_common(req)
        grammar, grammar_param = self._tool_choice(req), "tools"
        fmt = self._response_format(req.response_format)
        if fmt and grammar:
            raise APIError(400, "response_format json_object/json_schema cannot be combined with a forced "
                                "tool_choice", param="response_format")
        if fmt:
            grammar, grammar_param = fmt, "response_format"
        if req.top_logprobs and not req.logprobs:  # (0 asks for nothing: accepted, as vLLM does)
            raise APIError(400, "top_logprobs requires logprobs to be true", param="top_logprobs")
        # A long conversation renders in a worker thread (its template is Python: 10^5 messages, a 3 MB body, held
        # the event loop and every other request 4 s); a short one on the loop, without the thread's hop.
        ids = await asyncio.to_thread(self._chat_ids, req) if len(req.messages) > LOOP_MESSAGES \
            else self._chat_ids(req)
        if req.max_completion_tokens is not None:
            self._check_max_tokens(ids, req.max_completion_tokens, "max_completion_tokens")
        else:
            self._check_max_tokens(ids, req.max_tokens)
        max_tokens = req.max_completion_tokens or req.max_tokens or \
            min(self.engine.context_length, self.defaults.get("max_tokens", self.engine.context_length))
        k = (req.top_logprobs or 0) if req.logprobs else None
        # vLLM's echo: the last message's text starts the reply when that message has the reply's role (the
        # assistant's, or any with add_generation_prompt false: the reply goes on in that turn)
        last = req.messages[-1]
        echo = (self._message_dict(len(req.messages) - 1, last)["content"] or "") \
            if req.echo and (last.role == "assistant" or not req.add_generation_prompt) else ""
        if req.use_beam_search:
            rid = f"chatcmpl-{uuid.uuid4().hex}"
            beams = await self._beam_search(request, rid, req, [ids], max_tokens)
            if beams is None:
                return Response(status_code=499)
            out = [{"index": j, "message": {"role": "assistant", "content": echo + s.text}, "logprobs": None,
                    "finish_reason": s.finish_reason, "stop_reason": None} for j, s in enumerate(beams[0].sequences)]
            return JSONResponse({"id": rid, "object": "chat.completion", "created": int(time.time()),
                                 "model": self.model_name, "system_fingerprint": None, "choices": out,
                                 "usage": self._beam_usage(len(ids), beams, [ids])})
        parse_tools = bool(req.tools) and req.tool_choice != "none"
        await self._checked_params(req, max_tokens, k, req.seed, grammar, grammar_param, inline=False)
        jobs = [(ids, self._params(req, max_tokens, k, s, grammar, grammar_param))
                for s in self._seeds(req.seed, req.n)]
        parallel = req.parallel_tool_calls is not False
        forced = grammar_param == "tools" and bool(grammar)  # tool_choice required or a named function
        choices = [Choice(tools=ToolCallCollector(self.tokenizer, parallel=parallel, forced=forced)
                          if parse_tools else None,
                           think=ReasoningStream(self.tokenizer) if self.reasoning_parser else None)
                   for _ in jobs]
        # The parsers find a marker token's place by each step's tokens and text, so they read deltas apart.
        coalesce = not parse_tools and not self.reasoning_parser
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        as_ids = req.return_tokens_as_token_ids or self.tokens_as_ids
        include_usage, continuous = usage_options(req)

        # As OpenAI: "tool_calls" when the model called tools on its own ("auto") or had to ("required"), but
        # "stop" for a forced named function.
        named = req.tool_choice is not None and not isinstance(req.tool_choice, str)

        def finish_reason(c: Choice, calls: list[Any]) -> str | None:
            return "tool_calls" if calls and c.finish_reason == "stop" and not named else c.finish_reason

        def chunk(i: int, delta: dict[str, Any], logprobs: Any = None, finish: str | None = None) -> dict[str, Any]:
            choice = {"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
            if finish is not None:
                choice["stop_reason"] = choices[i].stop_reason
            obj: dict[str, Any] = {"id": rid, "object": "chat.completion.chunk", "created": created,
                                   "model": self.model_name, "system_fingerprint": None, "choices": [choice]}
            if include_usage:
                obj["usage"] = usage_counts(len(ids), choices, req.n) if continuous else None
            return obj

        if req.stream:
            async def events() -> AsyncIterator[str]:
                async with self._run(request, rid, jobs, coalesce) as (_, merged):
                    for i in range(len(choices)):
                        yield sse_event(chunk(i, {"role": "assistant", "content": ""}))
                    for i in range(len(choices) if echo else 0):
                        yield sse_event(chunk(i, {"content": echo}))
                    async for i, d in merged:
                        c = choices[i]
                        text = c.take(d)
                        lp = self._chat_logprobs(d.logprobs, as_ids) if k is not None and d.logprobs else None
                        delta = {"reasoning_content": c.new_reasoning} if c.new_reasoning else {}
                        if text or (lp is not None and not delta):
                            delta["content"] = text
                        if delta:
                            yield sse_event(chunk(i, delta, lp))
                        if d.finish_reason is None:
                            ready = c.tools.ready() if c.tools is not None else []  # each call as its JSON closes
                            if ready:
                                yield sse_event(chunk(i, {"tool_calls": ready}))
                            continue
                        calls: list[dict[str, Any]] = []
                        if c.tools is not None:
                            tail, calls = c.tools.finish()
                            if tail:
                                yield sse_event(chunk(i, {"content": tail}))
                            if rest := c.tools.rest(calls):
                                yield sse_event(chunk(i, {"tool_calls": rest}))
                        yield sse_event(chunk(i, {}, None, finish_reason(c, calls)))

            def usage() -> dict[str, Any]:
                return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": self.model_name,
                        "system_fingerprint": None, "choices": [],
                        "usage": usage_counts(len(ids), choices, req.n)}

            return StreamingResponse(sse_stream(events(), usage if include_usage else None),
                                     media_type="text/event-stream")

        if await self._collect(request, rid, jobs, choices, coalesce):
            return Response(status_code=499)  # nobody is listening; the requests were aborted
        out = []
        for i, c in enumerate(choices):
            content: str | None = "".join(c.pieces)
            calls: list[dict[str, Any]] = []
            if c.tools is not None:
                tail, calls = c.tools.finish()
                content += tail
                if calls:
                    # Exactly what the stream sent (the collector held back the whitespace before the call).
                    content = content or None
            message: dict[str, Any] = {"role": "assistant", "content": content}
            if c.think is not None:
                message["reasoning_content"] = "".join(c.reasoning) or None
                if not content:
                    message["content"] = None
            if echo:
                message["content"] = echo + (message["content"] or "")
            if calls:
                message["tool_calls"] = calls
            out.append({"index": i, "message": message,
                        "logprobs": self._chat_logprobs(c.logprobs, as_ids) if k is not None else None,
                        "finish_reason": finish_reason(c, calls), "stop_reason": c.stop_reason})
        return JSONResponse({"id": rid, "object": "chat.completion", "created": created, "model": self.model_name,
                             "system_fingerprint": None, "choices": out,
                             "usage": usage_counts(len(ids), choices, req.n)})


# ---------------------------------------------------------------------------------------------------------
# App


class _APIKeyMiddleware:
    """Require `Authorization: Bearer <key>` on /v1 routes. Pure ASGI, so it runs before the body is parsed
    and leaves streaming responses untouched."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.key = api_key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path, root = scope.get("path", ""), scope.get("root_path", "")
        if root and path.startswith(root):  # uvicorn's path starts with --root-path; the routes match the rest
            path = path[len(root):]
        if scope["type"] == "http" and path.startswith("/v1") and scope["method"] != "OPTIONS":
            auth = dict(scope["headers"]).get(b"authorization", b"")
            scheme, _, token = auth.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.key):
                msg = "Missing API key" if not auth else "Incorrect API key provided"
                resp = _error_response(401, f"{msg}: send it as 'Authorization: Bearer <key>'.",
                                       code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
                await resp(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _is_type_tag(x: object) -> bool:
    # Our field names are lower-case identifiers; tags are type names ("str", "list[int]", "ToolCall").
    return isinstance(x, str) and (x in {"str", "int", "float", "bool", "list", "dict", "none"} or "[" in x
                                   or x[:1].isupper() or "-" in x)


def _validation_error(errors: Sequence[Any]) -> APIError:
    if not errors:
        return APIError(400, "invalid request body")
    e = errors[0]
    # Drop "body" and pydantic's union-member tags ("str", "list[int]") so the path names real fields.
    loc = [str(x) for x in e.get("loc", ()) if x != "body" and not _is_type_tag(x)]
    param = loc[0] if loc else None
    where = ".".join(loc) if loc else "request body"
    return APIError(400, f"Invalid value for '{where}': {e.get('msg', 'invalid')}", param=param)


# An escaped UTF-16 surrogate, a NaN / Infinity token, or a number that may overflow a float (1e999, or 309+ digits
# before its point or exponent: json reads both as inf): the only ways a body Python's JSON parser accepts can hold a
# value no JSON answer can carry back (/v1/responses echoing a tool's parameters with 1e999 was a 500).
_MAYBE_INVALID = re.compile(rb"\\u[dD][89a-fA-F]|NaN|Infinity|[eE]\+?0*[1-9]\d{2}|\d{300}")

# The largest request body read (a 413 past it): the whole body is held and parsed at once, so without a bound one
# request could take all the memory (a 500 MB body was read, parsed and validated, stalling the server for 50 s).
# 64 MiB holds a few hundred prompts of context-length token ids.
MAX_BODY_BYTES = 64 * 2**20
# Conversations of more messages than this are rendered off the event loop (`chat`).
LOOP_MESSAGES = 256


def _check_values(data: dict[str, Any]) -> None:
    """400, naming where, for a lone surrogate (not UTF-8: tokenizing, quoting or echoing one was a 500, and in
    bad_words it killed the engine's worker) or a NaN / Infinity (not JSON: /v1/responses echoed it) anywhere
    in the body's fields."""
    stack: list[tuple[Any, list[str]]] = [(data, [])]
    while stack:
        value, path = stack.pop()
        if isinstance(value, dict):
            for k, v in value.items():
                if not valid_text(k):
                    raise APIError(400, f"Invalid key in '{'.'.join(path) or 'request body'}': not valid "
                                   "Unicode (a lone surrogate)", param=path[0] if path else None)
                stack.append((v, [*path, k]))
        elif isinstance(value, list):
            stack.extend((v, [*path, str(i)]) for i, v in enumerate(value) if isinstance(v, (str, float, dict, list)))
        elif isinstance(value, str) and not valid_text(value):
            raise APIError(400, f"Invalid value for '{'.'.join(path)}': not valid Unicode (a lone surrogate)",
                           param=path[0])
        elif isinstance(value, float) and not math.isfinite(value):
            raise APIError(400, f"Invalid value for '{'.'.join(path)}': {value} is not a JSON number", param=path[0])


async def _read_body(request: Request) -> bytes:
    """The body, refused (413) past MAX_BODY_BYTES: by its Content-Length before reading, else as it arrives."""
    limit = MAX_BODY_BYTES
    too_big = APIError(413, f"the request body is larger than the server's limit of {limit} bytes",
                       code="request_too_large")
    length = request.headers.get("content-length")
    if length is not None and length.strip().isdigit() and int(length) > limit:
        raise too_big
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_big
        chunks.append(chunk)
    return b"".join(chunks)


async def _parse_body(request: Request, model: type[BodyT]) -> BodyT:
    """Read the body as JSON whatever the Content-Type says (curl -d sends form encoding) and validate it."""
    raw = await _read_body(request)
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as e:  # RecursionError: nested deeper than the parser goes
        raise APIError(400, f"We could not parse the JSON body of your request: {e}") from None
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object")
    if _MAYBE_INVALID.search(raw):  # only then walk the body (a 128K-token prompt's ids cost ~10 ms to walk)
        # Its fields only: unknown ones are ignored, as vLLM ignores them, whatever they hold.
        _check_values({k: v for k, v in data.items() if k in model.model_fields})
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise _validation_error(e.errors()) from None


def create_app(engine_or_llm: Any, model_name: str | Sequence[str], api_key: str | None = None,
               log_stats_interval: float | None = None, sampling_defaults: dict[str, Any] | None = None,
               reasoning_parser: str | None = None, allowed_origins: Sequence[str] | None = None,
               log_requests: bool = False, max_log_len: int | None = None, seed: int | None = None,
               max_logprobs: int | None = None, return_tokens_as_token_ids: bool = False,
               fastapi_docs: bool = True) -> FastAPI:
    """An OpenAI-compatible FastAPI app serving `model_name` (several names: responses carry the first, requests
    may name any, /v1/models lists all, as vLLM's --served-model-name a b). log_stats_interval: seconds between the
    vLLM-style throughput lines logged to `cpm4.serve` at INFO while the app runs (None: none).
    sampling_defaults: SamplingParams fields for what a request leaves unset (temperature, top_p, top_k,
    min_p, repetition_penalty; max_tokens caps a chat request without one), as from
    `cpm4.engine.generation_config.sampling_defaults`; default: an `LLM`'s own, else SamplingParams'.
    reasoning_parser: "minicpm4" returns chat output's `<think>` block as `reasoning_content`
    (`cpm4.serve.reasoning`); None leaves it in the content. allowed_origins: browser origins allowed to
    call the API (CORS; "*" for any); None: none (vLLM allows any by default, which lets every web page the
    user opens reach a server on their loopback). log_requests: log each engine request (id, prompt, params) to
    `cpm4.serve` at INFO, the prompt cut to max_log_len characters and ids (vLLM's --enable-log-requests,
    --max-log-len). seed: requests without a seed draw theirs from a generator seeded with it (vLLM's --seed:
    a run repeats when its requests come in the same order). max_logprobs: the most logprobs / top_logprobs a
    request may ask for (vLLM's --max-logprobs; at most MAX_LOGPROBS). return_tokens_as_token_ids: logprobs
    name tokens "token_id:ID" for every request (vLLM's flag). fastapi_docs: False serves no /docs, /redoc nor
    /openapi.json (vLLM's --disable-fastapi-docs).

    `engine_or_llm` is an `AsyncEngine` (the caller owns and shuts it down) or anything with `model` and
    `tokenizer` attributes such as `cpm4.LLM` (an engine is made for it and shut down with the app)."""
    if isinstance(engine_or_llm, AsyncEngine):
        engine, owned = engine_or_llm, False
    elif hasattr(engine_or_llm, "model") and hasattr(engine_or_llm, "tokenizer"):
        engine, owned = AsyncEngine(engine_or_llm.model, engine_or_llm.tokenizer), True
    else:
        raise TypeError(f"expected an AsyncEngine or an LLM, got {type(engine_or_llm).__name__}")
    if sampling_defaults is None:
        sampling_defaults = getattr(engine_or_llm, "sampling_defaults", None)
    server = _OpenAIServer(engine, model_name, sampling_defaults, reasoning_parser, log_requests, max_log_len)
    server.configure(seed, max_logprobs, return_tokens_as_token_ids)

    stats = StatsLogger(engine, log_stats_interval) if log_stats_interval else None

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        task = asyncio.create_task(stats.run()) if stats is not None else None
        try:
            yield
        finally:
            if task is not None:
                task.cancel()
            if owned:
                await asyncio.to_thread(engine.shutdown)

    docs = {} if fastapi_docs else {"docs_url": None, "redoc_url": None, "openapi_url": None}
    app = FastAPI(title="cpm4 OpenAI-compatible server", lifespan=lifespan, **docs)
    app.state.engine = engine
    app.state.model_name = server.model_name
    if api_key:
        app.add_middleware(_APIKeyMiddleware, api_key=api_key)
    if allowed_origins:  # added last: outermost, so preflights and the key check's 401 carry the headers
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(allowed_origins), allow_methods=["*"],
                           allow_headers=["*"])

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _validation_error(exc.errors()).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = "not_found" if exc.status_code == 404 else None
        return _error_response(exc.status_code, str(exc.detail), code=code)

    @app.exception_handler(EngineClosedError)
    async def _closed(request: Request, exc: EngineClosedError) -> JSONResponse:
        # The engine stopped between the check above and the submit: unavailable, not an internal error.
        return _error_response(503, str(exc), type="server_error")

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        return _error_response(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error")

    try:
        from .metrics import CONTENT_TYPE, ServerMetrics
    except ImportError:  # prometheus-client missing (it comes with the serve extra)
        metrics = None
    else:
        metrics = server.metrics = ServerMetrics(engine, server.model_name)

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        if metrics is None:
            return _error_response(501, "metrics need the prometheus-client package: pip install prometheus-client",
                                   type="server_error")
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/version")
    async def version() -> dict[str, str]:
        from cpm4 import __version__

        return {"version": __version__}

    @app.get("/health")
    async def health() -> Response:
        if not engine.is_running:
            return _error_response(503, "the engine is not running", type="server_error")
        return JSONResponse({"status": "ok"})

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [server.model_card(n) for n in server.model_names]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str) -> dict[str, Any]:
        server._check_model(model_id)
        return server.model_card(model_id)

    # Bodies are parsed by hand (not as typed parameters) so that any Content-Type is read as JSON.
    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await server.completions(await _parse_body(request, CompletionRequest), request)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await server.chat(await _parse_body(request, ChatCompletionRequest), request)

    @app.post("/v1/responses")
    async def create_response(request: Request) -> Response:
        return await responses(server, await _parse_body(request, ResponsesRequest), request)

    @app.post("/tokenize")
    async def tokenize(request: Request) -> dict[str, Any]:
        return server.tokenize(await _parse_body(request, TokenizeRequest))

    @app.post("/detokenize")
    async def detokenize(request: Request) -> dict[str, Any]:
        return server.detokenize(await _parse_body(request, DetokenizeRequest))

    return app

