"""The reasoning parser: MiniCPM4.1's `<think>` block split from the answer, whole and streamed in any pieces."""

from __future__ import annotations

import itertools

import pytest

from cpm4.serve.reasoning import END_THINK, THINK, ReasoningStream, split_reasoning


def reference(text: str) -> tuple[str | None, str | None]:
    """The rules written out directly (module docstring)."""
    body = text.lstrip()
    if not body.startswith(THINK):
        return None, text.lstrip("\n") or None
    body = body[len(THINK):]
    reasoning, _, content = body.partition(END_THINK)
    return reasoning.strip("\n") or None, content.lstrip("\n") or None


CASES = [
    "<think>\nLet me see: 2 + 2.\nIt is 4.\n</think>\n\nThe answer is 4.",
    "<think>\nstill thinking when max_tokens ran out",
    "<think>\n\n</think>\n\nAnswer without thought.",
    "Plain answer, thinking off.",
    "A plain answer that mentions </think> in passing.",
    "  \n<think>a\n\nb\n</think>c\n\nd",
    "<think>x</think>",
    "<thi",
    "\n\n",
    "",
    "<think>two </thi and a half </think> done",
]


@pytest.mark.parametrize("text", CASES)
def test_whole_output(text):
    assert split_reasoning(text) == reference(text)


@pytest.mark.parametrize("text", CASES)
def test_streamed_in_any_pieces_equals_whole(text):
    """Every way of cutting the text in up to three deltas (char by char too) streams the same split."""
    cuts = [()] + [(i,) for i in range(1, len(text))] + list(itertools.combinations(range(1, len(text)), 2))
    cuts.append(tuple(range(1, len(text))))
    for cut in cuts:
        bounds = [0, *cut, len(text)]
        s = ReasoningStream(None)
        parts = [p for a, b in zip(bounds, bounds[1:]) for p in s.feed(text[a:b], [])] + s.finish()
        got = ("".join(t for k, t in parts if k == "reasoning") or None,
               "".join(t for k, t in parts if k == "content") or None)
        assert got == reference(text), cut
        assert all(t for _, t in parts)  # no empty pieces


class _Tok:
    """Tags as special tokens that decoding skips: found by id."""

    def token_id(self, token: str) -> int | None:
        return {THINK: 1, END_THINK: 2}.get(token)


def test_special_token_tags():
    s = ReasoningStream(_Tok())
    parts = s.feed("", [1]) + s.feed("\nweigh it", [7]) + s.feed("\n", [8])
    assert not s.in_content
    parts += s.feed("", [2])
    assert s.in_content
    parts += s.feed("\n\nIt is so.", [9, 10])
    parts += s.finish()
    assert parts == [("reasoning", "weigh it"), ("content", "It is so.")]
    s = ReasoningStream(_Tok())  # no start token: all content, at once
    assert s.feed("Hi", [5]) == [("content", "Hi")] and s.in_content
