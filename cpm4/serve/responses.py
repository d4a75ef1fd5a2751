"""OpenAI's Responses API (`POST /v1/responses`, `client.responses.create`), as vLLM serves it: a request is turned
into the equivalent chat completion (instructions as the system message, input items as the conversation, function
tools and calls in chat form), run by the chat path, and its result or stream re-shaped into a Response object or
Response stream events. Nothing is stored: `previous_response_id` and `store`-based follow-ups are refused with a
clear error (send the conversation in `input` instead)."""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING, Any, Literal

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import Field, ValidationError

from .protocol import MAX_LOGPROBS, Bool, ChatCompletionRequest, Float, Int, Str, _Body

if TYPE_CHECKING:
    from .api import APIError, _OpenAIServer


class ResponsesRequest(_Body):
    model: Str | None = None
    input: Str | list[dict[str, Any]]
    instructions: Str | None = None
    max_output_tokens: Int | None = Field(None, ge=1)
    temperature: Float | None = Field(None, ge=0)
    top_p: Float | None = Field(None, gt=0, le=1)
    top_logprobs: Int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    include: list[Str] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: Bool | None = None
    text: dict[str, Any] | None = None
    stream: Bool = False
    previous_response_id: Str | None = None
    background: Bool | None = None
    metadata: dict[Str, Str] | None = None  # OpenAI's: string keys and values (so echoing it is always valid)
    store: Bool | None = None
    user: Str | None = None
    seed: Int | None = None  # extension (vLLM)
    ignore_eos: Bool = False  # extension (vLLM)
    priority: Int = 0  # extension (vLLM's): with --scheduling-policy priority, lower is served first


# OpenAI's `include` values. Only the output text's logprobs mean something here; the others name outputs of tools
# and inputs this server does not have, so asking for them adds nothing (as with OpenAI for a request without them).
INCLUDABLE = ("message.output_text.logprobs", "reasoning.encrypted_content", "file_search_call.results",
              "web_search_call.results", "web_search_call.action.sources", "message.input_image.image_url",
              "computer_call_output.output.image_url", "code_interpreter_call.outputs")
LOGPROBS = "message.output_text.logprobs"


def _error(message: str, param: str | None = None) -> Exception:
    from .api import APIError

    return APIError(400, message, param=param)


# The chat fields behind this request's own, for the errors of the chat request made from it.
_CHAT_PARAMS = {"messages": "input", "max_completion_tokens": "max_output_tokens", "response_format": "text"}


def _renamed(err: APIError) -> APIError:
    """A chat path's APIError naming the Responses field the client sent instead of the chat field."""
    if err.param in _CHAT_PARAMS:
        err.param = _CHAT_PARAMS[err.param]
        err.message = err.message.replace("max_completion_tokens", "max_output_tokens")
    return err


def _content_text(content: Any, where: str) -> str:
    """A message's content: a string, or text parts (input_text / output_text / text)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list) or not content:
        raise _error(f"{where}.content must be a string or a non-empty list of content parts", where)
    out = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in ("input_text", "output_text", "text") or not isinstance(part.get("text"), str):
            raise _error(f"{where}.content[{j}]: only text parts are supported (input_text, output_text), got "
                         f"{kind!r}", where)
        out.append(part["text"])
    return "".join(out)


def _messages(req: ResponsesRequest) -> list[dict[str, Any]]:
    """The chat conversation of a Responses request."""
    msgs: list[dict[str, Any]] = []
    if req.instructions:
        msgs.append({"role": "system", "content": req.instructions})
    if isinstance(req.input, str):
        return msgs + [{"role": "user", "content": req.input}]
    for i, item in enumerate(req.input):
        where = f"input[{i}]"
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "system", "developer", "assistant"):
                raise _error(f"{where}.role must be user, system, developer or assistant, got {role!r}", where)
            msgs.append({"role": role, "content": _content_text(item.get("content"), where)})
        elif kind == "function_call":  # an earlier turn's call: the assistant message that made it
            call = {"id": item.get("call_id") or item.get("id") or f"call_{i}", "type": "function",
                    "function": {"name": item.get("name"), "arguments": item.get("arguments", "")}}
            if msgs and msgs[-1]["role"] == "assistant":
                # the same turn as the text before it (what `output` gives back: a message, then its calls),
                # rendered as the model wrote it and as the chat endpoint renders content with tool_calls
                msgs[-1].setdefault("tool_calls", []).append(call)
            else:
                msgs.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            if not isinstance(item.get("call_id"), str):
                raise _error(f"{where}: a function_call_output needs call_id, the id of the call it answers", where)
            if "output" not in item or item["output"] is None:
                raise _error(f"{where}: a function_call_output needs output, the call's result", where)
            out = item["output"]
            msgs.append({"role": "tool", "tool_call_id": item.get("call_id"),
                         "content": out if isinstance(out, str) else json.dumps(out)})
        elif kind == "reasoning":
            continue  # an earlier turn's reasoning: not part of the prompt
        else:
            raise _error(f"{where}: input items of type {kind!r} are not supported", where)
    return msgs


def _text_format(text: dict[str, Any]) -> dict[str, Any] | None:
    """`text.format`, checked as OpenAI checks it (the request's `text` is echoed in the response, which must stay
    a valid Response): a type of text, json_object or json_schema, the last with a name and a schema object."""
    verbosity = text.get("verbosity")
    if verbosity is not None and verbosity not in ("low", "medium", "high"):
        raise _error(f"text.verbosity must be low, medium or high, got {verbosity!r}", "text")
    fmt = text.get("format")
    if fmt is None:
        return None
    if not isinstance(fmt, dict):
        raise _error("text.format must be an object, such as {\"type\": \"json_schema\", \"name\": ..., "
                     "\"schema\": {...}}", "text")
    kind = fmt.get("type")
    if kind not in ("text", "json_object", "json_schema"):
        raise _error(f"text.format.type must be text, json_object or json_schema, got {kind!r}", "text")
    if kind == "json_schema":
        if not isinstance(fmt.get("name"), str) or not fmt["name"]:
            raise _error("text.format.name is required for a json_schema format (a string)", "text")
        if not isinstance(fmt.get("schema"), dict):
            raise _error("text.format.schema is required for a json_schema format (a JSON schema object)", "text")
        if fmt.get("strict") is not None and not isinstance(fmt["strict"], bool):
            raise _error(f"text.format.strict must be a boolean, got {fmt['strict']!r:.40}", "text")
    return fmt


def _chat_request(req: ResponsesRequest) -> ChatCompletionRequest:
    if req.previous_response_id is not None:
        raise _error("previous_response_id is not supported: this server stores no responses; send the "
                     "conversation so far in `input`", "previous_response_id")
    if req.background:
        raise _error("background is not supported: this server stores no responses to poll; stream the response "
                     "instead", "background")
    body: dict[str, Any] = {"model": req.model, "messages": _messages(req), "stream": req.stream,
                            "max_completion_tokens": req.max_output_tokens, "temperature": req.temperature,
                            "top_p": req.top_p, "parallel_tool_calls": req.parallel_tool_calls, "seed": req.seed,
                            "ignore_eos": req.ignore_eos, "priority": req.priority}
    if req.stream:
        body["stream_options"] = {"include_usage": True}
    for i, name in enumerate(req.include or []):
        if name not in INCLUDABLE:
            raise _error(f"include[{i}]: unknown value {name!r}; supported: {', '.join(INCLUDABLE)}", "include")
    # As OpenAI and vLLM: logprobs come back when `include` asks for them, top_logprobs only sets how many
    # alternatives each token carries.
    if LOGPROBS in (req.include or []):
        body["logprobs"], body["top_logprobs"] = True, req.top_logprobs or 0
    if req.tools:
        tools = []
        for i, t in enumerate(req.tools):
            if t.get("type") != "function":
                raise _error(f"tools[{i}]: only function tools are supported, got {t.get('type')!r}", "tools")
            tools.append({"type": "function", "function": {k: t[k] for k in ("name", "description", "parameters",
                                                                             "strict") if k in t}})
        body["tools"] = tools
    if isinstance(req.tool_choice, dict):  # {"type": "function", "name": ...}
        if req.tool_choice.get("type") != "function":
            raise _error(f"tool_choice of type {req.tool_choice.get('type')!r} is not supported: \"none\", \"auto\", "
                         "\"required\" or {\"type\": \"function\", \"name\": ...}", "tool_choice")
        body["tool_choice"] = {"type": "function", "function": {"name": req.tool_choice.get("name")}}
    elif req.tool_choice is not None:
        body["tool_choice"] = req.tool_choice
    fmt = _text_format(req.text or {})
    if fmt and fmt.get("type") == "json_schema":
        body["response_format"] = {"type": "json_schema", "json_schema": {
            k: fmt[k] for k in ("name", "schema", "strict", "description") if k in fmt}}
    elif fmt and fmt.get("type") in ("json_object", "text"):
        body["response_format"] = {"type": fmt["type"]}
    try:
        return ChatCompletionRequest.model_validate({k: v for k, v in body.items() if v is not None})
    except ValidationError as e:  # input items or tools of the wrong shape: the request's 400, not a 500
        from .api import _validation_error

        raise _renamed(_validation_error(e.errors())) from None


class _Shape:
    """Builds the Response object and its output items for one request."""

    def __init__(self, req: ResponsesRequest, model: str) -> None:
        self.req, self.model = req, model
        self.id = f"resp_{uuid.uuid4().hex}"
        self.created = int(time.time())  # Unix seconds, an integer as OpenAI sends it
        self.msg_id = f"msg_{uuid.uuid4().hex}"
        self.reasoning_id = f"rs_{uuid.uuid4().hex}"

    def message(self, text: str, status: str = "completed", logprobs: list[dict[str, Any]] | None = None
                ) -> dict[str, Any]:
        content = [] if status == "in_progress" else [self.part(text, logprobs)]
        return {"type": "message", "id": self.msg_id, "status": status, "role": "assistant", "content": content}

    @staticmethod
    def part(text: str, logprobs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        return {"type": "output_text", "text": text, "annotations": [], "logprobs": logprobs or []}

    @staticmethod
    def call(call: dict[str, Any], status: str = "completed") -> dict[str, Any]:
        return {"type": "function_call", "id": f"fc_{call['id']}", "call_id": call["id"],
                "name": call["function"]["name"], "arguments": call["function"]["arguments"], "status": status}

    @staticmethod
    def reasoning_part(text: str) -> dict[str, Any]:
        return {"type": "reasoning_text", "text": text}

    def reasoning(self, text: str, status: str = "completed") -> dict[str, Any]:
        content = [] if status == "in_progress" else [self.reasoning_part(text)]
        return {"type": "reasoning", "id": self.reasoning_id, "summary": [], "content": content, "status": status}

    def response(self, output: list[dict[str, Any]], status: str, usage: dict[str, int] | None,
                 finish: str | None = None) -> dict[str, Any]:
        req = self.req
        incomplete = {"reason": "max_output_tokens"} if finish == "length" else None
        if incomplete and status == "completed":
            status = "incomplete"
        return {"id": self.id, "object": "response", "created_at": self.created, "model": self.model,
                "status": status, "error": None, "incomplete_details": incomplete, "instructions": req.instructions,
                "max_output_tokens": req.max_output_tokens, "metadata": req.metadata or {}, "output": output,
                "parallel_tool_calls": req.parallel_tool_calls is not False, "temperature": req.temperature,
                "top_logprobs": req.top_logprobs,
                "top_p": req.top_p, "tool_choice": req.tool_choice or "auto", "tools": req.tools or [],
                "text": req.text or {"format": {"type": "text"}}, "truncation": "disabled",
                "previous_response_id": None, "reasoning": None, "store": False, "user": req.user,
                "usage": None if usage is None else {
                    "input_tokens": usage["prompt_tokens"],
                    "input_tokens_details": {
                        "cached_tokens": (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0),
                        "cache_write_tokens": 0},
                    "output_tokens": usage["completion_tokens"], "output_tokens_details": {
                        "reasoning_tokens": (usage.get("completion_tokens_details") or {}).get("reasoning_tokens", 0)},
                    "total_tokens": usage["total_tokens"]}}


def _logprobs(chat_logprobs: dict[str, Any] | None) -> list[dict[str, Any]]:
    """A chat choice's (or chunk's) logprobs as the Responses API's: the same fields per token and alternative."""
    return [{"token": e["token"], "bytes": e["bytes"], "logprob": e["logprob"],
             "top_logprobs": [{"token": t["token"], "bytes": t["bytes"], "logprob": t["logprob"]}
                              for t in e.get("top_logprobs") or []]}
            for e in (chat_logprobs or {}).get("content") or []]


def _output_items(shape: _Shape, message: dict[str, Any], logprobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    items = []
    if message.get("reasoning_content"):
        items.append(shape.reasoning(message["reasoning_content"]))
    if message.get("content") or not message.get("tool_calls"):
        items.append(shape.message(message.get("content") or "", logprobs=logprobs))
    items += [shape.call(c) for c in message.get("tool_calls") or []]
    return items


async def responses(server: _OpenAIServer, req: ResponsesRequest, request: Request) -> Response:
    from .api import APIError

    chat_req = _chat_request(req)
    shape = _Shape(req, server.model_name)
    try:
        resp = await server.chat(chat_req, request)
    except APIError as e:
        raise _renamed(e) from None
    if not req.stream:
        if resp.status_code != 200:  # 499: the client went away
            return resp
        body = json.loads(resp.body)
        choice = body["choices"][0]
        lps = _logprobs(choice.get("logprobs"))
        if choice["message"].get("reasoning_content") is not None:
            # The reasoning's tokens lead, then the blank ones before the answer (which the parser strips): not
            # output_text's, as the stream leaves them out of its deltas.
            lps = lps[(body["usage"].get("completion_tokens_details") or {}).get("reasoning_tokens", 0):]
            while lps and not lps[0]["token"].strip():
                lps = lps[1:]
        items = _output_items(shape, choice["message"], lps)
        return JSONResponse(shape.response(items, "completed", body["usage"], choice["finish_reason"]))
    return StreamingResponse(_events(shape, resp.body_iterator), media_type="text/event-stream")


async def _events(shape: _Shape, chat_stream: AsyncIterator[str]) -> AsyncIterator[str]:
    """The chat stream's chunks re-shaped as Response stream events (closing this closes the chat stream, which
    aborts its request). Output items open as their first delta arrives and close when the next item begins:
    the reasoning, then the message, then the function calls (which the chat stream sends whole, at the end)."""
    seq = 0

    def event(kind: str, **fields: Any) -> str:
        nonlocal seq
        seq += 1
        data = {"type": kind, "sequence_number": seq - 1, **fields}
        return f"event: {kind}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"

    output: list[dict[str, Any]] = []
    reasoning: list[str] = []
    text: list[str] = []
    logprobs: list[dict[str, Any]] = []  # the output text's tokens', as the whole response's output_text carries
    pending: list[dict[str, Any]] = []  # tokens whose text has not reached a delta yet
    calls: list[dict[str, Any]] = []
    usage, finish = None, None
    state = "none"  # the open item: "none", "reasoning" or "message"

    def open_message() -> Iterator[str]:
        nonlocal state
        yield from close_reasoning()
        state = "message"
        yield event("response.output_item.added", output_index=len(output), item=shape.message("", "in_progress"))
        yield event("response.content_part.added", item_id=shape.msg_id, output_index=len(output),
                    content_index=0, part=shape.part(""))

    def close_reasoning() -> Iterator[str]:
        nonlocal state
        if state != "reasoning":
            return
        state = "none"
        full = "".join(reasoning)
        yield event("response.reasoning_text.done", item_id=shape.reasoning_id, output_index=len(output),
                    content_index=0, text=full)
        yield event("response.content_part.done", item_id=shape.reasoning_id, output_index=len(output),
                    content_index=0, part=shape.reasoning_part(full))
        output.append(shape.reasoning(full))
        yield event("response.output_item.done", output_index=len(output) - 1, item=output[-1])

    yield event("response.created", response=shape.response([], "in_progress", None))
    yield event("response.in_progress", response=shape.response([], "in_progress", None))
    async with contextlib.aclosing(chat_stream) as chunks:
        async for raw in chunks:
            payload = raw.removeprefix("data: ").strip()
            if payload == "[DONE]":
                break
            chunk = json.loads(payload)
            if "error" in chunk:
                err = chunk["error"]
                failed = shape.response([], "failed", None)
                failed["error"] = {"code": "server_error", "message": err.get("message", "")}
                yield event("response.failed", response=failed)
                return
            if chunk.get("usage") and not chunk.get("choices"):
                usage = chunk["usage"]
                continue
            for ch in chunk.get("choices", []):
                delta = ch.get("delta") or {}
                # output_text's logprobs are its own text's tokens (as OpenAI's): not the reasoning's, nor
                # those held before the reasoning showed (its tag), nor the blank ones after it
                lps = _logprobs(ch.get("logprobs"))
                if state != "message" and delta.get("reasoning_content"):
                    lps, pending = [], []
                elif state == "reasoning" and not delta.get("content"):
                    lps = []
                pending += lps
                if delta.get("reasoning_content") and state != "message":
                    if state == "none":
                        state = "reasoning"
                        yield event("response.output_item.added", output_index=len(output),
                                    item=shape.reasoning("", "in_progress"))
                        yield event("response.content_part.added", item_id=shape.reasoning_id,
                                    output_index=len(output), content_index=0,
                                    part=shape.reasoning_part(""))
                    reasoning.append(delta["reasoning_content"])
                    yield event("response.reasoning_text.delta", item_id=shape.reasoning_id,
                                output_index=len(output), content_index=0, delta=delta["reasoning_content"])
                if delta.get("content"):
                    if state != "message":
                        for ev in open_message():
                            yield ev
                    text.append(delta["content"])
                    yield event("response.output_text.delta", item_id=shape.msg_id, output_index=len(output),
                                content_index=0, delta=delta["content"], logprobs=pending)
                    logprobs += pending
                    pending = []
                calls += delta.get("tool_calls") or []
                finish = ch.get("finish_reason") or finish
    for ev in close_reasoning():
        yield ev
    if state == "message" or not calls:
        if state != "message":  # nothing was said: the (empty) message still opens and closes
            for ev in open_message():
                yield ev
        full = "".join(text)
        index = len(output)
        logprobs += pending  # tokens whose text never came (a stop string's)
        yield event("response.output_text.done", item_id=shape.msg_id, output_index=index, content_index=0,
                    text=full, logprobs=logprobs)
        yield event("response.content_part.done", item_id=shape.msg_id, output_index=index, content_index=0,
                    part=shape.part(full, logprobs))
        output.append(shape.message(full, logprobs=logprobs))
        yield event("response.output_item.done", output_index=index, item=output[-1])
    for c in calls:
        item = shape.call(c)
        index = len(output)
        # The deltas build the arguments (the SDK's stream helper appends each delta to the added item's)
        yield event("response.output_item.added", output_index=index,
                    item={**item, "arguments": "", "status": "in_progress"})
        yield event("response.function_call_arguments.delta", item_id=item["id"], output_index=index,
                    delta=item["arguments"])
        yield event("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                    arguments=item["arguments"], name=item["name"])
        output.append(item)
        yield event("response.output_item.done", output_index=index, item=item)
    final = shape.response(output, "completed", usage, finish)
    yield event(f"response.{final['status']}", response=final)  # response.completed, or .incomplete at the limit
