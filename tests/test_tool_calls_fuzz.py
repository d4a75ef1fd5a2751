"""Seeded randomized property test of the tool-call and reasoning parsers (`cpm4.serve.tool_calls`,
`cpm4.serve.reasoning`, and `streaming.Choice`, which chains them for a chat choice).

MiniCPM4 calls tools as `<|tool_call|>{"name": ..., "arguments": {...}}` (the chat template's syntax), the marker
being a special token; MiniCPM4.1 thinks in a leading `<think>...</think>` block. Random outputs mix noisy text
(unicode, braces, partial markers and tags), well-formed calls and malformed ones, optionally after a think block.
Properties: nothing raises; any chunking (1-character pieces included), with the marker as text or as a token id,
gives the whole-output parse (up to the differences the code documents); well-formed calls come back exactly and
no call ever carries arguments that are not strict JSON; the streamed `tool_calls` chunk has OpenAI's shape.

A failure names the seed; every input is a pure function of it (random.Random(seed)).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from typing import Any

import pytest

pytest.importorskip("fastapi")  # streaming.py imports it

from cpm4.engine.generate import StreamDelta  # noqa: E402
from cpm4.serve.reasoning import END_THINK, THINK, ReasoningStream, split_reasoning  # noqa: E402
from cpm4.serve.streaming import Choice  # noqa: E402
from cpm4.serve.tool_calls import TOOL_CALL, ToolCallCollector, parse_tool_calls  # noqa: E402

SEEDS = range(400)
MARKER_ID, EOS_ID = 7, 2  # ids of the fake vocabulary's special tokens (decoded as "" when skipped)

# ---------------------------------------------------------------------------------------------------------
# Random model outputs

_WORDS = ["Sure", "ok.", "Let me check", "é", "中文", "😀", "\u202e", "ß", "a\u0301", "{", "}", "{}", '{"', '"}',
          "[1]", "\\", '"', "<", ">", "|", "<|", "|>", "<|tool", "<|tool_call", "_call|>", "call|>", "<|tool_call|",
          "<th", "<think", "</", "</thi", "</think", "think>", "name", "arguments", ":", ","]
_SPACE = [" ", "\n", "\n\n", "\t", "\r\n", "  "]


def _filler(rng: random.Random, n: int | None = None, marker: bool = False, tags: bool = False) -> str:
    """Noisy text; `marker` lets a whole literal marker in, `tags` whole think tags."""
    extra = ([TOOL_CALL] if marker else []) + ([THINK, END_THINK] if tags else [])
    n = rng.randint(0, 6) if n is None else n
    return "".join(rng.choice(_WORDS + _SPACE + extra) for _ in range(n))


def _string(rng: random.Random, marker: bool = False) -> str:
    """A JSON string value: quotes, escapes, control characters, unicode, tags (and the marker if asked)."""
    parts = ["x", "é", "😀", '"', "\\", "\n", "\t", "\u0000", "{", "}", "</think>", "<think>", "\\u00e9", "'", " "]
    if marker:
        parts.append(TOOL_CALL)
    return "".join(rng.choice(parts) for _ in range(rng.randint(0, 5)))


def _value(rng: random.Random, depth: int = 0, marker: bool = False) -> Any:
    kind = rng.randrange(8 if depth < 3 else 5)
    if kind == 0:
        return rng.randint(-(2**40), 2**40)
    if kind == 1:
        return rng.choice([0.5, -1e-7, 1e300, 3.0])
    if kind == 2:
        return rng.choice([True, False, None])
    if kind in (3, 4):
        return _string(rng, marker)
    if kind == 5:
        return [_value(rng, depth + 1, marker) for _ in range(rng.randint(0, 3))]
    return _obj(rng, depth + 1, marker)


def _obj(rng: random.Random, depth: int = 0, marker: bool = False) -> dict[str, Any]:
    return {_string(rng, marker) or "k": _value(rng, depth, marker) for _ in range(rng.randint(0, 3))}


_NAMES = ["get_weather", "f", "search-web", "a.b", "ünï", "x" * 40, "run_python"]


@dataclass
class Call:
    name: str
    args: dict[str, Any]
    raw: str  # the text after the marker


def _call(rng: random.Random, marker: bool = False) -> Call:
    """A well-formed call in one of the spellings the parser takes (the template's, compact, indented, ASCII,
    `parameters` for `arguments`, arguments as JSON text, no arguments at all)."""
    name, args = rng.choice(_NAMES), _obj(rng, marker=marker)
    key = rng.choice(["arguments", "arguments", "parameters"])
    obj: dict[str, Any] = {"name": name}
    style = rng.randrange(4)
    if style == 0:
        obj[key] = json.dumps(args, ensure_ascii=rng.random() < 0.5)  # OpenAI's string form
    elif style == 1 and not args:
        pass  # missing: {}
    else:
        obj[key] = args
    if rng.random() < 0.3:
        obj = dict(reversed(list(obj.items())))
    raw = json.dumps(obj, ensure_ascii=rng.random() < 0.5, indent=rng.choice([None, None, 2]),
                     separators=rng.choice([None, (",", ":")]))
    return Call(name, args, rng.choice(["", "", " ", "\n"]) + raw)


# Malformed calls. SEALED ones fail (or parse as a non-call) whatever follows them; CUT ones are prefixes of a call
# (max_tokens ran out), only ever last.
SEALED = ['{not json', '{"name": }', '["f"]', '{"arguments": {}}', '{"name": 5, "arguments": {}}',
          '{"name": "", "arguments": {}}', '{"name": "f", "arguments": [1]}', '{"name": "f", "arguments": null}',
          '"get_weather"', "null", "{}"]


def _cut(rng: random.Random) -> str:
    raw = _call(rng).raw
    return raw[: rng.randrange(len(raw.rstrip("}")) or 1)]


@dataclass
class Output:
    items: list[tuple[str, Any]] = field(default_factory=list)  # ("text", s) | ("call", Call) | ("bad", raw)

    def text(self, marker: str = TOOL_CALL) -> str:
        return "".join(v if k == "text" else marker + (v.raw if k == "call" else v) for k, v in self.items)

    @property
    def calls(self) -> list[Call]:
        return [v for k, v in self.items if k == "call"]


def _output(rng: random.Random, noisy: bool) -> Output:
    """Text, calls and malformed calls in random order. Not `noisy`: no literal marker or tag in the text or in
    argument strings, and a text after a malformed call cannot complete its JSON: the parse is predictable. Pieces
    of a marker can still join into a whole one ("<|tool_call|" then ">", seed 2287): such a draw is drawn again."""
    while True:
        out = _draw(rng, noisy)
        if noisy or not any(tag in run for run in _text_runs(out) for tag in (TOOL_CALL, THINK, END_THINK)):
            return out


def _text_runs(out: Output) -> list[str]:
    """The output's text between its calls and malformed calls, adjacent text items joined."""
    runs = [""]
    for k, v in out.items:
        if k == "text":
            runs[-1] += v
        else:
            runs.append("")
    return runs


def _draw(rng: random.Random, noisy: bool) -> Output:
    out = Output()
    for _ in range(rng.randint(0, 5)):
        r = rng.random()
        if r < 0.4:
            out.items.append(("text", _filler(rng, marker=noisy, tags=noisy)))
        elif r < 0.75:
            out.items.append(("call", _call(rng, marker=noisy)))
            if rng.random() < 0.5:
                out.items.append(("text", rng.choice(_SPACE)))  # the template's newline between calls
        else:
            out.items.append(("bad", rng.choice(SEALED + [""]) if noisy else rng.choice(SEALED)))
    r = rng.random()
    if r < 0.15:
        out.items.append(("bad", _cut(rng)))  # cut off by max_tokens
    elif r < 0.25:
        out.items.append(("bad", ""))  # a marker with nothing after it
    return out


def _expected(out: Output) -> tuple[str | None, list[Call]]:
    """parse_tool_calls' documented result for a not-noisy output: content is the text with malformed calls kept
    verbatim (marker and all), save a last one that does not parse after calls (a cut-off call: dropped with what
    follows it); text after a call counts only when not all whitespace; stripped, None when empty, with calls."""
    segs: list[tuple[tuple[str, Any] | None, str]] = [(None, "")]
    for k, v in out.items:
        if k == "text":
            segs[-1] = (segs[-1][0], segs[-1][1] + v)
        else:
            segs.append(((k, v), ""))
    content, calls = [segs[0][1]], []
    for j, (head, tail) in enumerate(segs[1:], 1):
        kind, v = head
        if kind == "call":
            calls.append(v)
            if tail.strip():
                content.append(tail)
            continue
        try:
            json.JSONDecoder().raw_decode((v + tail).lstrip())
        except ValueError:
            if calls and j == len(segs) - 1:
                break
        content.append(TOOL_CALL + v + tail)
    text = "".join(content)
    return ((text.strip() or None) if calls else text), calls


# ---------------------------------------------------------------------------------------------------------
# Checks


def _strict_loads(s: str) -> Any:
    """json.loads as a strict client: no NaN/Infinity (Python's json writes and reads them; JSON has none)."""
    def bad(c: str) -> Any:
        raise ValueError(f"not JSON: {c}")
    return json.loads(s, parse_constant=bad)


def _check_call_shape(calls: list[dict[str, Any]]) -> None:
    assert len({c["id"] for c in calls}) == len(calls)
    for c in calls:
        assert set(c) == {"id", "type", "function"} and c["type"] == "function"
        assert isinstance(c["id"], str) and c["id"].startswith("call_")
        fn = c["function"]
        assert set(fn) == {"name", "arguments"} and isinstance(fn["name"], str) and fn["name"]
        assert isinstance(fn["arguments"], str)


def _args_are_json(calls: list[dict[str, Any]]) -> bool:
    try:
        for c in calls:
            _strict_loads(c["function"]["arguments"])
    except ValueError:
        return False
    return True


def _same_calls(got: list[dict[str, Any]], want: list[dict[str, Any]]) -> bool:
    """Equal names and arguments (as JSON values when they parse; ids are fresh per parse)."""
    def key(c: dict[str, Any]) -> tuple[str, Any]:
        a = c["function"]["arguments"]
        try:
            a = ("json", json.dumps(json.loads(a), sort_keys=True))
        except ValueError:
            a = ("text", a)
        return c["function"]["name"], a
    return [key(c) for c in got] == [key(c) for c in want]


def _chunks(rng: random.Random, text: str) -> list[str]:
    """`text` cut at random: 1-character pieces, pieces of a few characters, or cuts inside markers and tags."""
    mode = rng.randrange(4)
    if mode == 0:
        return list(text)
    if mode == 1:
        cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(0, 6)))) if len(text) > 1 else []
    else:
        cuts = []
        for tag in (TOOL_CALL, THINK, END_THINK):
            i = text.find(tag)
            while i >= 0:
                cuts.append(i + rng.randrange(len(tag) + 1))
                i = text.find(tag, i + 1)
        cuts += [i for i in range(1, len(text)) if rng.random() < 0.1]
        cuts = sorted(set(c for c in cuts if 0 < c < len(text)))
    bounds = [0, *cuts, len(text)]
    pieces = [text[a:b] for a, b in zip(bounds, bounds[1:])]
    if rng.random() < 0.2:  # empty deltas happen (a token whose text the detokenizer holds back)
        pieces.insert(rng.randrange(len(pieces) + 1), "")
    return pieces


class _Tok:
    """A fake tokenizer: ids index a growing table of texts; the marker and EOS are special (decoded as "" when
    skipped). `marker_token` false: a vocabulary without the marker, which then comes as text."""

    def __init__(self, marker_token: bool) -> None:
        self.marker_token = marker_token
        self.table: dict[int, str] = {EOS_ID: "</s>", MARKER_ID: TOOL_CALL}

    def token_id(self, token: str) -> int | None:
        return MARKER_ID if token == TOOL_CALL and self.marker_token else None

    def add(self, text: str) -> int:
        i = len(self.table) + 100
        self.table[i] = text
        return i

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        special = (EOS_ID, MARKER_ID)
        return "".join("" if skip_special_tokens and i in special else self.table[i] for i in ids)


def _deltas(rng: random.Random, tok: _Tok, out: Output, finish: str) -> list[StreamDelta]:
    """The engine's deltas for `out`: one token each, the text (special tokens skipped) sometimes released a
    token or two late, as the detokenizer holds incomplete characters, but never after a marker token (the
    collector takes a marker delta's text as coming before it), and an EOS token with "stop"."""
    tokens: list[int] = []
    if not tok.marker_token:
        tokens = [tok.add(p) for p in _chunks(rng, out.text()) if p]
    else:
        for k, v in out.items:
            if k != "text":
                tokens.append(MARKER_ID)
                v = v.raw if k == "call" else v
            tokens += [tok.add(p) for p in _chunks(rng, v) if p]
    deltas, pending = [], ""
    for t in tokens:
        pending += tok.decode([t])
        keep = 0 if t == MARKER_ID else rng.choice([0, 0, 0, 1, 2])
        keep = min(keep, len(pending))
        deltas.append(StreamDelta(0, pending[: len(pending) - keep], [t]))
        pending = pending[len(pending) - keep:]
    last = [EOS_ID] if finish == "stop" else []
    deltas.append(StreamDelta(0, pending, last, finish))
    return deltas


def _run_choice(deltas: list[StreamDelta], tok: _Tok, think: bool, parallel: bool = True
                ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """What api.py makes of a choice's deltas, streamed and not: (the non-streamed message, the stream's chunk
    deltas). Both read the same `Choice`; the stream's deltas are checked against the message."""
    c = Choice(tools=ToolCallCollector(tok, parallel=parallel), think=ReasoningStream(tok) if think else None)
    stream: list[dict[str, Any]] = []
    for d in deltas:
        text = c.take(d)
        delta = {"reasoning_content": c.new_reasoning} if c.new_reasoning else {}
        if text:
            delta["content"] = text
        if delta:
            stream.append(delta)
        if d.finish_reason is None and (ready := c.tools.ready()):  # each call as its JSON closes
            stream.append({"tool_calls": ready})
    tail, calls = c.tools.finish()
    if tail:
        stream.append({"content": tail})
    if rest := c.tools.rest(calls):
        stream.append({"tool_calls": rest})
    content = "".join(c.pieces) + tail
    msg: dict[str, Any] = {"content": (content or None) if calls else content, "tool_calls": calls}
    if think:
        msg["reasoning_content"] = "".join(c.reasoning) or None
        msg["content"] = msg["content"] or None
    return msg, stream


def _check_stream(msg: dict[str, Any], stream: list[dict[str, Any]]) -> None:
    """The stream adds up to the message; tool-call deltas have OpenAI's shape: each index's first delta carries
    id, type and name, later ones argument text only, and each index's arguments concatenate to the call's."""
    assert all(d for d in stream) and all(v for d in stream for v in d.values())  # no empty deltas or pieces
    content = "".join(d.get("content", "") for d in stream)
    assert content == (msg["content"] or "")
    if "reasoning_content" in msg:
        assert "".join(d.get("reasoning_content", "") for d in stream) == (msg["reasoning_content"] or "")
    seen: dict[int, dict[str, Any]] = {}
    for d in stream:
        for tc in d.get("tool_calls", []):
            i = tc["index"]
            if i not in seen:
                assert tc["type"] == "function" and tc["id"].startswith("call_") and tc["function"]["name"]
                seen[i] = {"id": tc["id"], "type": "function",
                           "function": {"name": tc["function"]["name"], "arguments": ""}}
            else:
                assert set(tc) <= {"index", "function"} and set(tc["function"]) == {"arguments"}
            seen[i]["function"]["arguments"] += tc["function"].get("arguments", "")
    assert sorted(seen) == list(range(len(seen)))
    assert [seen[i] for i in sorted(seen)] == msg["tool_calls"]


# ---------------------------------------------------------------------------------------------------------
# Tests


def test_whole_output_parse():
    """Well-formed calls come back exactly, in order; malformed ones stay content verbatim (a cut-off last one is
    dropped); arguments are always JSON text."""
    for seed in SEEDS:
        rng = random.Random(seed)
        out = _output(rng, noisy=False)
        content, calls = parse_tool_calls(out.text())
        want_content, want_calls = _expected(out)
        assert content == want_content, seed
        assert [(c["function"]["name"], _strict_loads(c["function"]["arguments"])) for c in calls] == \
            [(c.name, c.args) for c in want_calls], seed
        _check_call_shape(calls)


def test_noisy_whole_output_never_raises():
    for seed in SEEDS:
        rng = random.Random(seed)
        text = _output(rng, noisy=True).text()
        content, calls = parse_tool_calls(text)
        _check_call_shape(calls)
        assert content is None or isinstance(content, str)
        if not calls:
            assert content == text
        r, c = split_reasoning(text)
        assert r is None or isinstance(r, str) and c is None or isinstance(c, str)


def _check_collector(rng: random.Random, seed: int, out: Output, marker_token: bool) -> None:
    """Any chunking, marker as text or as a token, gives the whole-output parse, up to what tool_calls.py
    documents: whitespace before the first text stays (it went out before a call could be known), and without a
    valid call a marker token's output is the text plain decoding shows (no marker)."""
    tok = _Tok(marker_token)
    shown = out.text()
    plain = out.text("" if marker_token else TOOL_CALL)
    want_content, want_calls = parse_tool_calls(shown)
    parallel = rng.random() < 0.8
    msg, stream = _run_choice(_deltas(rng, tok, out, rng.choice(["stop", "length"])), tok, False, parallel)
    _check_stream(msg, stream)
    got = msg["content"]
    if not want_calls:
        assert got == plain and msg["tool_calls"] == [], seed
        return
    assert _same_calls(msg["tool_calls"], want_calls if parallel else want_calls[:1]), seed
    before = shown.split(TOOL_CALL)[0]
    lead = before[: len(before) - len(before.lstrip())] if before.strip() else ""
    assert got == (lead + want_content if want_content else None), seed


@pytest.mark.parametrize("marker_token", [True, False], ids=["marker-token", "marker-text"])
def test_streamed_equals_whole(marker_token):
    for seed in SEEDS:
        rng = random.Random(seed)
        for noisy in (False, True):
            out = _output(rng, noisy)
            if marker_token and TOOL_CALL in out.text("\0"):
                continue  # a real tokenizer makes a literal marker the marker token: not a possible token stream
            for _ in range(3):
                _check_collector(rng, seed, out, marker_token)


def _think_output(rng: random.Random, noisy: bool) -> tuple[str, Output]:
    """A think block (closed, cut off, empty, absent, after whitespace) and then an answer with calls."""
    mode = rng.randrange(5)
    lead = rng.choice(["", "", "\n", " \n"])
    reasoning = _filler(rng, marker=False, tags=False).replace(THINK[:-1], "(") if noisy else "I should call."
    reasoning = reasoning.replace("</", "<")  # no stray "</think>" prefix to keep the block's end predictable
    if mode == 0:
        head = lead + THINK + rng.choice(["", "\n"]) + reasoning + rng.choice(["", "\n"]) + END_THINK + \
            rng.choice(["", "\n\n"])
    elif mode == 1:
        head = lead + THINK + reasoning  # cut by max_tokens: all reasoning
    elif mode == 2:
        head = lead + THINK + "\n\n" + END_THINK + "\n\n"  # thinking off (the template's empty block)
    elif mode == 3:
        head = lead
    else:
        head = "<thi"  # a prefix of the tag, then not the tag
    return head, _output(rng, noisy)


@pytest.mark.parametrize("marker_token", [True, False], ids=["marker-token", "marker-text"])
def test_reasoning_then_tools(marker_token):
    """With a reasoning parser: reasoning as split_reasoning has it, the answer's calls as parse_tool_calls has
    them, whatever the chunking; a marker inside the reasoning is no call."""
    for seed in SEEDS:
        rng = random.Random(seed)
        head, answer = _think_output(rng, noisy=rng.random() < 0.5)
        if marker_token and TOOL_CALL in answer.text("\0"):
            continue  # as in test_streamed_equals_whole
        if head == "<thi" and answer.items[:1] and answer.items[0][0] != "text":
            continue  # a known bug, test_tag_prefix_before_a_call
        out = Output([("text", head)] + answer.items)
        plain = out.text("" if marker_token else TOOL_CALL)
        want_r, want_c = split_reasoning(plain)
        # The answer as the shown text splits it (a "</think>" inside a call's JSON ends the reasoning there).
        closed = END_THINK in out.text() or not out.text().lstrip().startswith(THINK)
        shown_answer = split_reasoning(out.text())[1] if closed else None
        want_calls = parse_tool_calls(shown_answer or "")[1] if closed else []
        tok = _Tok(marker_token)
        for _ in range(3):
            msg, stream = _run_choice(_deltas(rng, tok, out, rng.choice(["stop", "length"])), tok, True)
            _check_stream(msg, stream)
            assert msg["reasoning_content"] == want_r, seed
            assert _same_calls(msg["tool_calls"], want_calls), seed
            if not want_calls:
                assert msg["content"] == want_c, seed
            else:  # as test_streamed_equals_whole, the answer's own leading whitespace aside
                want = parse_tool_calls(shown_answer)[0]
                assert (msg["content"] or "").strip() == (want or ""), seed


def test_reasoning_any_chunking_with_tags_everywhere():
    """The reasoning parser alone on noisy text with whole and partial tags anywhere: never raises, and every
    chunking gives split_reasoning's result."""
    for seed in SEEDS:
        rng = random.Random(seed)
        text = rng.choice(["", " ", "\n", THINK, " " + THINK]) + _filler(rng, 12, marker=True, tags=True)
        want = split_reasoning(text)
        for _ in range(3):
            s = ReasoningStream(None)
            parts = [p for piece in _chunks(rng, text) for p in s.feed(piece, [])] + s.finish()
            assert all(t for _, t in parts)
            got = ("".join(t for k, t in parts if k == "reasoning") or None,
                   "".join(t for k, t in parts if k == "content") or None)
            assert got == want, (seed, text)


# ---------------------------------------------------------------------------------------------------------
# Bugs found while writing this file (all fixed), one reproducer each


def _bad_args_case(rng: random.Random, kind: str) -> str:
    name = rng.choice(_NAMES)
    if kind == "string":  # arguments as a JSON string that is no JSON object
        args = json.dumps(rng.choice(["not json {", "", "[1, 2]", "5", '{"a": ', _string(rng) + "{"]))
    else:  # numbers Python's json reads as NaN/Infinity: a model may write 1e999 or NaN
        num = rng.choice(["NaN", "Infinity", "-Infinity", "1e999", "-2e400"])
        args = f'{{"x": {num}, "y": [1]}}'
    return rng.choice(["", "Checking. "]) + TOOL_CALL + json.dumps({"name": name})[:-1] + ', "arguments": ' + \
        args + "}"


def test_string_arguments_must_be_json_objects():
    """Found by reading the code: string `arguments` were passed through unchecked, a call whose
    arguments were no JSON object."""
    for seed in range(50):
        _, calls = parse_tool_calls(_bad_args_case(random.Random(seed), "string"))
        assert all(isinstance(_strict_loads(c["function"]["arguments"]), dict) for c in calls) if \
            _args_are_json(calls) else False, seed


def test_nonfinite_numbers_never_reach_arguments():
    """Found by reading the code: NaN / Infinity / 1e999 in arguments came back as NaN / Infinity,
    which is not JSON."""
    for seed in range(50):
        _, calls = parse_tool_calls(_bad_args_case(random.Random(seed), "nonfinite"))
        assert _args_are_json(calls), seed


def test_marker_inside_an_argument_string():
    """Found by reading the code: the text was split on every marker, one inside a JSON string
    too, so the call was lost and shown as content."""
    for seed in range(50):
        rng = random.Random(seed)
        call = _call(rng, marker=True)
        text = f"{_filler(rng)}{TOOL_CALL}{call.raw}"
        if TOOL_CALL not in call.raw:
            continue
        _, calls = parse_tool_calls(text)
        assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == \
            [(call.name, call.args)], (seed, text)


def test_tag_prefix_before_a_call():
    """Found by reading the code: text held while the reasoning parser was undecided (a prefix of
    <think>) was fed to the collector after the marker token, and lost. The content is the prefix (the
    whole-text parse strips it; the stream keeps whitespace that came before text, as documented)."""
    for seed in range(30):
        rng = random.Random(seed)
        prefix = rng.choice(["<", "<t", "<th", "<thi", "<thin", "<think", " <th"])
        call = _call(rng)
        out = Output([("text", prefix), ("call", call)])
        tok = _Tok(True)
        msg, _ = _run_choice(_deltas(rng, tok, out, "stop"), tok, True)
        want = parse_tool_calls(out.text())  # the content is the prefix, as with the marker as text
        assert msg["content"] == prefix and want[0] == prefix.strip(), (seed, prefix)
