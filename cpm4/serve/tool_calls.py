"""Tool calls in model output: `<|tool_call|>{"name": ..., "arguments": ...}` lines (the syntax the chat
template teaches) turned into OpenAI `tool_calls`.

The marker is a special token in MiniCPM4 vocabularies, so plain decoding (which skips special tokens)
loses it. `ToolCallCollector` therefore watches the token ids as well as the text: everything before the
first marker streams as content, everything from it on is held and parsed: each call streams whole once its JSON
closes (`ready`), the rest when generation ends. Whitespace not yet
followed by text waits: dropped if a marker comes next (content before a call ends with its last text, and is null
when it had none), sent with the next text or at the end otherwise. The unstreamed content is what the stream
sent, in every tool_choice mode; whitespace before the first text goes out with that text (a call cannot be known
yet), so it stays in both.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from cpm4.engine.params import valid_text
from cpm4.model.tokenizer import TOOL_CALL, Tokenizer

__all__ = ["TOOL_CALL", "ToolCallCollector", "parse_tool_calls"]

_DECODER = json.JSONDecoder()


def _new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _as_call(obj: Any) -> dict[str, Any] | None:
    """An OpenAI tool call from one parsed JSON object, or None when it is not shaped like one."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"] \
            or not valid_text(obj["name"]):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    try:
        if isinstance(args, str):  # already JSON text, as OpenAI clients send it back: kept if it is an object
            parsed = json.loads(args)
            if not isinstance(parsed, dict):
                return None
            json.dumps(parsed, allow_nan=False)
            arguments = args
        elif isinstance(args, dict):
            parsed = args
            arguments = json.dumps(args, ensure_ascii=False, allow_nan=False)
        else:
            return None
        if not valid_text(arguments):  # a lone surrogate from a "\ud83d" escape: kept escaped (UTF-8 has none)
            arguments = json.dumps(parsed, ensure_ascii=True, allow_nan=False)
    except (ValueError, RecursionError):  # not JSON, or NaN / Infinity in it (Python's parser takes them)
        return None
    return {"id": _new_call_id(), "type": "function", "function": {"name": obj["name"], "arguments": arguments}}


def parse_tool_calls(text: str, marker: str = TOOL_CALL, strip: bool = True
                     ) -> tuple[str | None, list[dict[str, Any]]]:
    """Split model output into (content, tool_calls).

    Each `marker` must be followed by one JSON object with a string `name` and an object (or JSON string)
    `arguments`; text after that object is kept as content. A marker whose JSON does not parse stays in the
    content verbatim, except a last one after parsed calls: a call cut off (by max_tokens), dropped. With at
    least one call, content is stripped (unless `strip` is false) and None when empty (as OpenAI returns it).
    """
    i = text.find(marker)
    content = [text if i < 0 else text[:i]]
    calls: list[dict[str, Any]] = []
    while i >= 0:
        start = i + len(marker)
        body = len(text) - len(text[start:].lstrip())  # the JSON's first character
        nxt = text.find(marker, start)
        try:
            obj, end = _DECODER.raw_decode(text, body)
        except (ValueError, RecursionError):
            if calls and nxt < 0:
                break
            obj = None
        call = _as_call(obj)
        if call is None:
            content.append(text[i:len(text) if nxt < 0 else nxt])
            i = nxt
            continue
        calls.append(call)
        # The next call starts after this one's JSON: a marker inside its strings is no call.
        i = text.find(marker, end)
        rest = text[end:len(text) if i < 0 else i]
        if rest.strip():
            content.append(rest)
    joined = "".join(content)
    if not calls:
        return joined, []
    if strip:
        joined = joined.strip()
    return (joined or None), calls


def _marker_prefix_len(text: str, marker: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `marker`."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:k]):
            return k
    return 0


class ToolCallCollector:
    """Per-choice filter over streamed (text, token_ids) deltas that separates content from tool calls."""

    def __init__(self, tokenizer: Tokenizer, marker: str = TOOL_CALL, parallel: bool = True,
                 forced: bool = False) -> None:
        """parallel: False returns only the first call (the request's parallel_tool_calls false). forced: a
        grammar made the output calls (tool_choice required or named): a call cut off (max_tokens) is dropped,
        never returned as content, which the output was not meant to have."""
        self._tokenizer = tokenizer
        self._marker = marker
        self._marker_id = tokenizer.token_id(marker)
        self._parallel = parallel
        self._forced = forced
        self._held = ""  # trailing whitespace and/or the possible start of a literal marker, not yet sent
        self._started = False  # content other than whitespace went out
        self._dropped = ""  # whitespace held back when the first marker came
        self._tail_ids: list[int] | None = None  # set once the marker arrived as a token
        self._tail_text: str | None = None  # set once the marker arrived as text
        self._plain_tail = ""  # the tail as plain decoding shows it, for output without calls
        self.sent: list[dict[str, Any]] = []  # calls handed out by `ready` (streamed before the end)
        self._closed = False  # a '}' came since the last `ready`: a call may have completed

    @property
    def in_calls(self) -> bool:
        return self._tail_ids is not None or self._tail_text is not None

    def feed(self, text: str, token_ids: list[int]) -> str:
        """Take one delta; return the content that can be emitted now."""
        if self._tail_ids is not None:
            self._tail_ids.extend(token_ids)
            self._plain_tail += text
            self._closed = self._closed or "}" in text
            return ""
        if self._tail_text is not None:
            self._tail_text += text
            self._closed = self._closed or "}" in text
            return ""
        if self._marker_id is not None and self._marker_id in token_ids:
            # The delta's text was released by the detokenizer for tokens before the marker.
            k = token_ids.index(self._marker_id)
            self._tail_ids = list(token_ids[k:])
            self._closed = len(token_ids) > k + 1  # tokens after the marker in this delta: perhaps a whole call
            j = text.find(self._marker)  # shown when special tokens are not skipped: the call starts there
            if j >= 0:
                self._plain_tail, text = text[j:], text[:j]
            out, self._held = self._held + text, ""
            return self._before_call(out)
        buf = self._held + text
        i = buf.find(self._marker)
        if i >= 0:
            self._tail_text, self._held = buf[i:], ""
            self._closed = "}" in self._tail_text
            return self._before_call(buf[:i])
        hold = _marker_prefix_len(buf, self._marker)
        # Trailing whitespace is held too: before a call it is no content (null when nothing else went out).
        out = buf[: len(buf) - hold].rstrip()
        if not out:
            self._held = buf
            return ""
        self._started = True
        self._held = buf[len(out):]
        return out

    def _before_call(self, text: str) -> str:
        """The content before the first marker, less its trailing whitespace (kept for output without calls)."""
        out = text.rstrip()
        self._dropped = text[len(out):]
        self._started = self._started or bool(out)
        return out

    def _raw(self) -> str:
        """The output from the first marker on, as text the parser reads."""
        if self._tail_ids is None:
            return self._tail_text or ""
        # Decode the pieces between markers separately so the markers survive as text for the parser.
        segments: list[list[int]] = [[]]
        for t in self._tail_ids:
            if t == self._marker_id:
                segments.append([])
            else:
                segments[-1].append(t)
        return self._marker.join(self._tokenizer.decode(s) for s in segments)

    def ready(self) -> list[dict[str, Any]]:
        """Stream entries ({"index", **call}) of the calls whose JSON closed since the last look, each whole (name
        and arguments), to send before the output ends (as OpenAI streams a call as it is made); `finish` returns
        them again, first and with the same ids. A closed call stays one: later text never changes how an earlier
        marker's JSON parses."""
        if not self._closed or (self.sent and not self._parallel):
            return []
        self._closed = False
        calls = parse_tool_calls(self._raw(), self._marker, strip=False)[1]
        entries = self.rest(calls[:1] if not self._parallel else calls)
        self.sent += [{k: v for k, v in e.items() if k != "index"} for e in entries]
        return entries

    def rest(self, calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Stream entries of `calls` (`finish`'s) past those `ready` sent."""
        return [{"index": j, **call} for j, call in enumerate(calls) if j >= len(self.sent)]

    def finish(self) -> tuple[str, list[dict[str, Any]]]:
        """End of generation: (content not yet emitted, tool calls; those `ready` handed out first)."""
        if self.in_calls:
            content, calls = parse_tool_calls(self._raw(), self._marker, strip=False)
            if not calls and not self.sent:  # no valid call: the text plain decoding would have given
                if self._forced:
                    return self._dropped, []
                return self._dropped + (self._plain_tail if self._tail_ids is not None else content or ""), []
            return self._with_calls(content, self.sent + calls[len(self.sent):])
        out, self._held = self._held, ""
        return out, []

    def _with_calls(self, content: str | None, calls: list[dict[str, Any]]) -> tuple[str, list[dict[str, Any]]]:
        """Content after the calls as the whole output's parse would have it: stripped at the end, and at the
        start unless content went out before the calls (the whitespace held back then separates the two)."""
        if not self._parallel:
            calls = calls[:1]  # as OpenAI and vLLM: parallel_tool_calls false returns the first call only
        if content:
            content = (self._dropped + content if self._started else content.lstrip()).rstrip()
        return content or "", calls
