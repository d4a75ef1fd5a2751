"""Thinking output split from the answer, as vLLM's `--reasoning-parser`: MiniCPM4.1 in thinking mode (its chat
template's default; `chat_template_kwargs={"enable_thinking": false}` turns it off) writes
`<think>reasoning</think>answer`. The chat API then returns the reasoning as `message.reasoning_content`
(streamed as `delta.reasoning_content`) and the answer as `content`.

Rules (those of vLLM's Qwen3-style parser, which fits MiniCPM4.1's template): output that starts with
`<think>` is reasoning up to `</think>`, or to its end when it stops before closing (cut by max_tokens);
output that does not start with it is all content, streamed as it comes (thinking off: the template puts the
empty block in the prompt). The newlines around the tags are dropped. The tags are found in the text, or by
their token ids when they are special tokens that decoding skips.
"""

from __future__ import annotations

from cpm4.model.tokenizer import Tokenizer

from .tool_calls import _marker_prefix_len

THINK, END_THINK = "<think>", "</think>"

REASONING_PARSERS = ("minicpm4",)  # the names `--reasoning-parser` takes


def check_reasoning_parser(name: str | None) -> None:
    if name is not None and name not in REASONING_PARSERS:
        raise ValueError(f"unknown reasoning parser {name!r}: one of {', '.join(REASONING_PARSERS)}")


def split_reasoning(text: str) -> tuple[str | None, str | None]:
    """(reasoning, content) of a whole output; either None when empty."""
    s = ReasoningStream(None)
    parts = s.feed(text, []) + s.finish()
    reasoning = "".join(t for kind, t in parts if kind == "reasoning")
    content = "".join(t for kind, t in parts if kind == "content")
    return reasoning or None, content or None


class ReasoningStream:
    """Per-choice splitter over streamed (text, token_ids) deltas: `feed` returns ("reasoning" | "content",
    text) pieces that can be emitted now; `finish` flushes what was held (a possible start of a tag)."""

    def __init__(self, tokenizer: Tokenizer | None) -> None:
        self._start_id = tokenizer.token_id(THINK) if tokenizer is not None else None
        self._end_id = tokenizer.token_id(END_THINK) if tokenizer is not None else None
        self._state = "start"  # start: nothing but whitespace (or part of "<think>") yet; then reasoning, content
        self._held = ""
        self._emitted = {"reasoning": False, "content": False}
        self.reasoned = False  # the output opened a reasoning block

    @property
    def in_content(self) -> bool:
        """Past the reasoning (or there was none): what follows is the answer."""
        return self._state == "content"

    @property
    def undecided(self) -> bool:
        """Nothing but whitespace (or part of "<think>") seen yet: whether it is reasoning is not known."""
        return self._state == "start"

    def _out(self, kind: str, text: str) -> list[tuple[str, str]]:
        if not self._emitted[kind]:
            text = text.lstrip("\n")  # the newlines after a tag (or before the answer)
        if not text:
            return []
        self._emitted[kind] = True
        return [(kind, text)]

    def feed(self, text: str, token_ids: list[int]) -> list[tuple[str, str]]:
        buf = self._held + text
        self._held = ""
        if self._state == "start":
            body = buf.lstrip()
            if body.startswith(THINK):
                self._state, buf = "reasoning", body[len(THINK):]
                self.reasoned = True
            elif self._start_id is not None and self._start_id in token_ids:
                self._state = "reasoning"  # a special token that decoding skipped
                self.reasoned = True
            elif THINK.startswith(body):
                self._held = buf  # whitespace, or the start of "<think>": wait
                return []
            else:
                self._state = "content"
        if self._state == "reasoning":
            i = buf.find(END_THINK)
            if i >= 0:
                self._state = "content"
                return self._out("reasoning", buf[:i].rstrip("\n")) + self._out("content", buf[i + len(END_THINK):])
            if self._end_id is not None and self._end_id in token_ids:
                # A skipped special token: detokenized one token per decode step, the delta is the tag alone
                # or the reasoning before it.
                self._state = "content"
                return self._out("reasoning", buf.rstrip("\n"))
            # Hold a possible start of "</think>" and trailing newlines (dropped if the tag follows).
            keep = _marker_prefix_len(buf, END_THINK)
            body, tail = buf[:len(buf) - keep], buf[len(buf) - keep:]
            stripped = body.rstrip("\n")
            self._held = body[len(stripped):] + tail
            return self._out("reasoning", stripped)
        return self._out("content", buf)

    def finish(self) -> list[tuple[str, str]]:
        held, self._held = self._held, ""
        if self._state == "reasoning":  # cut before "</think>": all reasoning
            return self._out("reasoning", held.rstrip("\n"))
        return self._out("content", held)  # "start": whitespace or a lone "<thi..." is content
