"""The OpenAI-compatible server against what OpenAI and vLLM clients expect: a streamed answer is the unstreamed one
in pieces (text, finish_reason, usage, logprobs, tool calls, content beside them), with the reasoning parser too;
request errors are 400s before any stream starts; explicit nulls mean defaults."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

import test_serve  # noqa: E402
from test_serve import MESSAGES, MODEL, TOOLS, _ScriptedEngine, _Server  # noqa: E402

from cpm4.engine.generate import StreamDelta  # noqa: E402
from cpm4.model.tokenizer import TOOL_CALL  # noqa: E402
from cpm4.serve import AsyncEngine, create_app  # noqa: E402
from cpm4.serve.engine import _END  # noqa: E402
from cpm4.serve.reasoning import split_reasoning  # noqa: E402
from cpm4.serve.tool_calls import parse_tool_calls  # noqa: E402

llm = test_serve.llm  # the tiny model on the CPU (module-scoped fixture)
engine, server, client = test_serve.engine, test_serve.server, test_serve.client  # full context, for tools

CONTEXT = 64  # a short max_model_len, so that answers without max_tokens run into it quickly
CALL = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
NAMED = {"type": "function", "function": {"name": "get_weather"}}


def _counts(usage) -> tuple:
    """A usage's token counts (object or dict), and that its cached prompt tokens are within the prompt's."""
    u = usage if isinstance(usage, dict) else usage.model_dump()
    cached = (u.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    assert 0 <= cached < u["prompt_tokens"] or u["prompt_tokens"] == 0, u
    return u["prompt_tokens"], u["completion_tokens"], u["total_tokens"]


@pytest.fixture(scope="module")
def small(llm):
    """(server, openai client) over the tiny model with a 64-token context."""
    eng = AsyncEngine(llm.model, llm.tokenizer, max_batch_size=8, max_model_len=CONTEXT)
    srv = _Server(create_app(eng, MODEL))
    yield srv, openai.OpenAI(base_url=f"{srv.url}/v1", api_key="unused", max_retries=0, timeout=60)
    srv.stop()
    eng.shutdown()


@pytest.fixture(scope="module")
def scripted(llm):
    """(engine replaying `engine.script`, client without and client with the minicpm4 reasoning parser)."""
    yield from _with_and_without_parser(_ScriptedEngine(llm.model, llm.tokenizer, continuous=False))


def _with_and_without_parser(eng):
    """Yield (eng, client of a server without, client of one with the minicpm4 reasoning parser); then stop."""
    servers = [_Server(create_app(eng, MODEL)), _Server(create_app(eng, MODEL, reasoning_parser="minicpm4"))]
    yield (eng, *(openai.OpenAI(base_url=f"{s.url}/v1", api_key="unused", max_retries=0, timeout=60)
                  for s in servers))
    for s in servers:
        s.stop()
    eng.shutdown()


def _chat_both(client, **kw) -> tuple[dict, dict]:
    """One chat request unstreamed and streamed; each choice as {content, finish, calls, logprobs} and the usage."""
    r = client.chat.completions.create(model=MODEL, **kw)
    whole = {c.index: {"content": c.message.content or "", "finish": c.finish_reason,
                       "calls": [(t.function.name, json.loads(t.function.arguments))
                                 for t in c.message.tool_calls or []],
                       "logprobs": [(e.token, e.logprob, [(t.token, t.logprob) for t in e.top_logprobs])
                                    for e in (c.logprobs.content if c.logprobs else [])]}
             for c in r.choices}
    streamed: dict = {}
    usage = None
    for ch in client.chat.completions.create(model=MODEL, stream=True, stream_options={"include_usage": True}, **kw):
        if not ch.choices:
            usage = ch.usage
        for c in ch.choices:
            s = streamed.setdefault(c.index, {"content": "", "finish": None, "calls": [], "logprobs": []})
            s["content"] += c.delta.content or ""
            s["calls"] += [(t.function.name, json.loads(t.function.arguments)) for t in c.delta.tool_calls or []]
            s["logprobs"] += [(e.token, e.logprob, [(t.token, t.logprob) for t in e.top_logprobs])
                              for e in (c.logprobs.content if c.logprobs else [])]
            if c.finish_reason is not None:
                assert s["finish"] is None, "a second finish_reason"
                s["finish"] = c.finish_reason
    # The counts agree; prompt_tokens_details may not (the second run finds the first's prompt pages cached).
    assert usage is not None and _counts(usage) == _counts(r.usage)
    return whole, streamed


def _same_logprobs(a: list, b: list) -> bool:
    # Batches of a different make-up can move a log-probability in its last float32 digits.
    return len(a) == len(b) and all(
        x[0] == y[0] and x[1] == pytest.approx(y[1], abs=1e-4) and [t for t, _ in x[2]] == [t for t, _ in y[2]]
        for x, y in zip(a, b))


# ---------------------------------------------------------------------------------------------------------
# Tool calls beside content, with and without the reasoning parser


@pytest.mark.parametrize("choice", ["auto", "named"])
@pytest.mark.parametrize("before", ["", "\n\n"])
def test_reasoning_parser_keeps_a_tool_call_that_opens_the_output(scripted, choice, before):
    """With --reasoning-parser, an answer that starts with the tool-call marker (thinking off, or a forced
    tool_choice, whose grammar puts the marker first) is a tool call, streamed or not, as without the parser.
    The marker is a special token without text: it came while the parser did not yet know whether reasoning
    starts, and was dropped, leaving the call's JSON as content."""
    eng, _, client = scripted
    tok = eng.tokenizer
    eng.script = tok.encode(before, add_bos=False) + [tok.token_id(TOOL_CALL)] + tok.encode(CALL, add_bos=False)
    whole, streamed = _chat_both(client, messages=MESSAGES, tools=TOOLS, max_tokens=80,
                                 tool_choice=NAMED if choice == "named" else "auto")
    for out in (whole[0], streamed[0]):
        assert out["calls"] == [("get_weather", {"city": "Paris"})], out
        assert out["content"] == "" and out["finish"] == ("stop" if choice == "named" else "tool_calls")


def test_reasoning_parser_still_ignores_a_marker_inside_the_reasoning(scripted):
    eng, _, client = scripted
    tok = eng.tokenizer
    eng.script = (tok.encode("<think>\n", add_bos=False) + [tok.token_id(TOOL_CALL)]
                  + tok.encode(CALL + "\n</think>\n\nBlue.", add_bos=False))
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, tools=TOOLS, max_tokens=80)
    msg = r.choices[0].message
    assert msg.tool_calls is None and msg.content == "Blue." and r.choices[0].finish_reason == "stop"
    assert json.loads(msg.reasoning_content)["name"] == "get_weather"


@pytest.mark.parametrize("reasoning", [False, True])
def test_named_tool_choice_content_is_the_same_streamed_or_not(scripted, reasoning):
    """A forced named function: the message's content is what the stream sent before the call (it was trimmed
    only when unstreamed)."""
    eng, plain, think = scripted
    tok = eng.tokenizer
    eng.script = tok.encode(" Checking.\n", add_bos=False) + [tok.token_id(TOOL_CALL)] + tok.encode(CALL, add_bos=False)
    whole, streamed = _chat_both(think if reasoning else plain, messages=MESSAGES, tools=TOOLS, tool_choice=NAMED,
                                 max_tokens=80)
    assert whole[0]["content"] == streamed[0]["content"] and "Checking." in whole[0]["content"]
    assert whole[0]["calls"] == streamed[0]["calls"] == [("get_weather", {"city": "Paris"})]
    assert whole[0]["finish"] == streamed[0]["finish"] == "stop"


@pytest.mark.parametrize("choice", ["auto", "named"])
def test_whitespace_before_a_call_is_no_content_streamed_or_not(scripted, choice):
    """Only whitespace before the call: the unstreamed content is null, and the stream sends no content either
    (it sent the whitespace)."""
    eng, client, _ = scripted
    tok = eng.tokenizer
    eng.script = tok.encode("\n\n", add_bos=False) + [tok.token_id(TOOL_CALL)] + tok.encode(CALL, add_bos=False)
    kw = dict(messages=MESSAGES, tools=TOOLS, max_tokens=80, tool_choice=NAMED if choice == "named" else "auto")
    r = client.chat.completions.create(model=MODEL, **kw)
    assert r.choices[0].message.content is None and len(r.choices[0].message.tool_calls) == 1
    chunks = list(client.chat.completions.create(model=MODEL, stream=True, **kw))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ""
    # No call after all: the whitespace is content again.
    eng.script = tok.encode("\n\nBlue.", add_bos=False)
    whole, streamed = _chat_both(client, messages=MESSAGES, tools=TOOLS, max_tokens=80)
    assert whole[0]["content"] == streamed[0]["content"] == "\n\nBlue." and whole[0]["calls"] == []


# ---------------------------------------------------------------------------------------------------------
# Streamed = unstreamed, on the real (tiny) model


def test_stream_agrees_with_non_stream(small, llm):
    """Greedy, n=2, a stop string, logprobs with alternatives; and an answer without max_tokens that fills the
    context: the same text, finish_reason, usage and logprobs in both forms, each choice under its own index."""
    _, client = small
    free = llm.chat(MESSAGES, test_serve._greedy(12, ignore_eos=True))[0].text
    stop = free[4:7]  # inside the output, likely across a token boundary
    cases = [dict(max_tokens=12, n=2, logprobs=True, top_logprobs=2),
             dict(max_tokens=12, stop=[stop], logprobs=True),
             dict(logprobs=True)]  # runs into the context: "length"
    for kw in cases:
        whole, streamed = _chat_both(client, messages=MESSAGES, temperature=0, extra_body={"ignore_eos": True}, **kw)
        assert sorted(whole) == sorted(streamed) == list(range(kw.get("n", 1)))
        for i in whole:
            w, s = whole[i], streamed[i]
            assert (w["content"], w["finish"]) == (s["content"], s["finish"]), (kw, w, s)
            assert _same_logprobs(w["logprobs"], s["logprobs"]), kw
        if "stop" in kw:
            assert whole[0]["finish"] == "stop" and stop not in whole[0]["content"]
            assert whole[0]["content"] == free[:free.find(stop)]
    assert whole[0]["finish"] == "length"
    assert len(whole[0]["logprobs"]) == CONTEXT - len(llm.chat_ids(MESSAGES))


def test_completion_stream_agrees_with_non_stream(small):
    """Two prompts, n=2, echo and logprobs: choice i of the stream is choice i of the answer."""
    _, client = small
    kw = dict(model=MODEL, prompt=["Hello world", "The sky"], max_tokens=6, n=2, temperature=0, echo=True,
              logprobs=2)
    r = client.completions.create(**kw)
    got: dict = {}
    usage = None
    for ch in client.completions.create(stream=True, stream_options={"include_usage": True}, **kw):
        if not ch.choices:
            usage = ch.usage
        for c in ch.choices:
            g = got.setdefault(c.index, {"text": "", "tokens": [], "offsets": [], "finish": None})
            g["text"] += c.text
            if c.logprobs:
                g["tokens"] += c.logprobs.tokens
                g["offsets"] += c.logprobs.text_offset
            g["finish"] = c.finish_reason or g["finish"]
    assert sorted(got) == [c.index for c in r.choices] == [0, 1, 2, 3]
    for c in r.choices:
        g = got[c.index]
        assert (g["text"], g["finish"]) == (c.text, c.finish_reason)
        assert (g["tokens"], g["offsets"]) == (c.logprobs.tokens, c.logprobs.text_offset)
    assert c.text.startswith("The sky") and _counts(usage) == _counts(r.usage)


def test_context_errors_come_before_any_stream(small):
    """max_tokens that does not fit beside the prompt: the same 400 (context_length_exceeded) streamed or not,
    sent as a JSON error before any event, for chat, completions and responses."""
    srv, _ = small
    cases = [("chat/completions", {"messages": MESSAGES, "max_tokens": CONTEXT}, "max_tokens"),
             ("chat/completions", {"messages": MESSAGES, "max_completion_tokens": CONTEXT}, "max_completion_tokens"),
             ("completions", {"prompt": "Hello", "max_tokens": CONTEXT}, "max_tokens"),
             ("responses", {"input": "Hello", "max_output_tokens": CONTEXT}, "max_output_tokens")]
    for path, body, param in cases:
        for stream in (False, True):
            with httpx.stream("POST", f"{srv.url}/v1/{path}", json={"model": MODEL, "stream": stream, **body},
                              timeout=30) as r:
                raw = r.read().decode()
            assert r.status_code == 400 and r.headers["content-type"] == "application/json", (path, stream, raw)
            err = json.loads(raw)["error"]
            assert err["code"] == "context_length_exceeded" and err["param"] == param, (path, stream, err)


def test_responses_errors_are_400s_naming_its_own_fields(small):
    """/v1/responses: input items or tools of the wrong shape are 400s (they were 500s from the chat request made
    of them), and errors name the fields the client sent, not the chat request's."""
    srv, _ = small
    cases = [({"input": "Hi", "tools": [{"type": "function"}]}, "tools"),  # no name
             ({"input": [{"type": "function_call", "arguments": "{}"}]}, "input"),  # no name
             ({"input": "Hi", "text": {"format": "json"}}, "text"),
             ({"input": "Hi", "text": {"format": {"type": "json_schema"}}}, "text"),  # no schema
             ({"input": "Hi " * CONTEXT}, "input"),  # too long
             ({"input": "Hi", "max_output_tokens": CONTEXT}, "max_output_tokens")]
    for body, param in cases:
        r = httpx.post(f"{srv.url}/v1/responses", json={"model": MODEL, "max_output_tokens": 2, **body}, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (body, r.text)
        assert "max_completion_tokens" not in r.json()["error"]["message"]


def test_message_shapes_openai_refuses(small):
    """An empty content array and a tool result without the id of its call are OpenAI's 400s (they were rendered
    as an empty turn and an unattributed result); the Responses API's function_call_output likewise."""
    srv, _ = small
    call = {"role": "assistant", "tool_calls": [{"id": "c1", "function": {"name": "f", "arguments": "{}"}}]}
    cases = [([{"role": "user", "content": []}], "messages.0.content"),
             ([MESSAGES[0], call, {"role": "tool", "content": "sunny"}], "tool_call_id")]
    for msgs, needle in cases:
        for path in ("chat/completions", "tokenize"):
            r = httpx.post(f"{srv.url}/{'v1/' if path.startswith('chat') else ''}{path}", timeout=30,
                           json={"model": MODEL, "max_tokens": 2, "messages": msgs})
            assert r.status_code == 400 and r.json()["error"]["param"] == "messages", r.text
            assert needle in r.json()["error"]["message"], r.text
    ok = [MESSAGES[0], call, {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]
    r = httpx.post(f"{srv.url}/v1/chat/completions", json={"model": MODEL, "max_tokens": 2, "messages": ok},
                   timeout=30)
    assert r.status_code == 200, r.text
    r = httpx.post(f"{srv.url}/v1/responses", timeout=30, json={"model": MODEL, "max_output_tokens": 2, "input": [
        {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
        {"type": "function_call_output", "output": "sunny"}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "input[1]" and "call_id" in r.text, r.text


# ---------------------------------------------------------------------------------------------------------
# Request fields


def test_null_means_the_default(small):
    """OpenAI's optional fields are nullable: "n": null is n = 1 (clients that serialise every field send such
    nulls); the answer equals the one without the fields."""
    srv, _ = small

    def post(path: str, body: dict) -> dict:
        r = httpx.post(f"{srv.url}/v1/{path}", json={"model": MODEL, "temperature": 0, **body}, timeout=60)
        assert r.status_code == 200, (path, r.text)
        return r.json()

    nulls = {"n": None, "stream": None, "stream_options": None, "logprobs": None, "top_logprobs": None,
             "ignore_eos": None, "skip_special_tokens": None, "seed": None}
    chat = {"messages": MESSAGES, "max_tokens": 5}
    a, b = post("chat/completions", {**chat, **nulls}), post("chat/completions", chat)
    assert a["choices"] == b["choices"] and len(a["choices"]) == 1 and _counts(a["usage"]) == _counts(b["usage"])
    cmpl = {"prompt": "Hello world", "max_tokens": 5}
    a, b = post("completions", {**cmpl, **nulls, "echo": None}), post("completions", cmpl)
    assert a["choices"] == b["choices"] and _counts(a["usage"]) == _counts(b["usage"])
    # A required field stays required.
    r = httpx.post(f"{srv.url}/v1/chat/completions", json={"model": MODEL, "messages": None}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"


def test_too_many_choices_names_the_field_at_fault(small):
    """More prompts than a request may have is the prompt's fault (it named n), and is said before any is
    tokenized; many prompts times a large n is n's."""
    srv, _ = small
    for body, param in (({"prompt": ["x"] * 257}, "prompt"), ({"prompt": ["x"] * 5, "n": 60}, "n"),
                        ({"prompt": [[5]] * 300, "n": 2}, "prompt")):
        r = httpx.post(f"{srv.url}/v1/completions", json={"model": MODEL, "max_tokens": 1, **body}, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (param, r.text)
        assert "at most 256 choices" in r.json()["error"]["message"]


def test_stream_options_need_stream(small):
    """stream_options on an unstreamed request is a 400 naming it (OpenAI, vLLM): the usage chunk it asks for
    would never come."""
    srv, client = small
    for path, body in (("chat/completions", {"messages": MESSAGES}), ("completions", {"prompt": "Hi"})):
        r = httpx.post(f"{srv.url}/v1/{path}", timeout=30,
                       json={"model": MODEL, "max_tokens": 2, "stream_options": {"include_usage": True}, **body})
        assert r.status_code == 400 and r.json()["error"]["param"] == "stream_options", r.text
    chunks = list(client.completions.create(model=MODEL, prompt="Hi", max_tokens=2, stream=True,
                                            stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    assert chunks[-1].usage.completion_tokens == 2


def test_deeply_nested_body_is_a_400(small):
    """A body nested past the JSON parser's recursion limit is malformed input (400), not a 500; the server
    answers the next request as before."""
    srv, _ = small
    for body in ('{"prompt": ' + "[" * 100_000 + "]" * 100_000 + "}", "[" * 100_000):
        r = httpx.post(f"{srv.url}/v1/completions", content=body, timeout=30,
                       headers={"Content-Type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error", r.text
    r = httpx.post(f"{srv.url}/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 2}, timeout=30)
    assert r.status_code == 200


# ---------------------------------------------------------------------------------------------------------
# Content beside tool calls in every tool_choice mode, parallel_tool_calls, n > 1, Responses created_at

CALL2 = '{"name": "get_weather", "arguments": {"city": "Oslo"}}'
MODES = {"none": "none", "auto": "auto", "required": "required", "named": NAMED}


class _PerChoiceEngine(test_serve._ScriptedEngine):
    """Replays `scripts[i]` for choice i (the "-i" its request id ends with), the choices' tokens interleaved
    step by step as a batch would give them."""

    scripts: list[list[int]] = []

    def _run_batch(self, batch) -> None:
        mine = [self.scripts[int(r.request_id.rsplit("-", 1)[1]) % len(self.scripts)] for r in batch]
        for j in range(max(map(len, mine))):
            for req, script in zip(batch, mine):
                if j >= len(script):
                    continue
                last = j == len(script) - 1
                if last:
                    with self._cond:
                        self._finish(req, "stop")
                t = script[j]
                self._post(req, StreamDelta(0, self.tokenizer.decode([t]), [t], "stop" if last else None))
                if last:
                    self._post(req, _END)


@pytest.fixture(scope="module")
def per_choice(llm):
    """(engine replaying `engine.scripts`, client without and client with the minicpm4 reasoning parser)."""
    yield from _with_and_without_parser(_PerChoiceEngine(llm.model, llm.tokenizer, continuous=False))


def _script(tok, *pieces: str) -> list[int]:
    """Token ids of text pieces with the tool-call marker token between consecutive ones."""
    ids: list[int] = []
    for k, p in enumerate(pieces):
        if k:
            ids.append(tok.token_id(TOOL_CALL))
        ids += tok.encode(p, add_bos=False)
    return ids


def _expected(tok, script: list[int], mode: str, reasoning: bool, parallel: bool = True) -> tuple[str, list]:
    """The naive answer: (content, [(name, arguments)]) from the whole output text at once; with calls the content
    is stripped, except for whitespace before its first text (a stream sends that before a call can be known)."""
    plain, text = tok.decode(script), tok.decode(script, skip_special_tokens=False)  # plain: without the marker
    if reasoning:
        plain, text = split_reasoning(plain)[1] or "", split_reasoning(text)[1] or ""
    content, calls = parse_tool_calls(text)
    marker = tok.token_id(TOOL_CALL)
    if not calls and mode in ("required", "named") and marker in script:
        # A forced call that does not parse (cut off) is dropped, not returned as content: the text before it.
        before = tok.decode(script[:script.index(marker)])
        return (split_reasoning(before)[1] or "") if reasoning else before, []
    if mode == "none" or not calls:
        return plain, []
    if content:
        content = text[:len(text) - len(text.lstrip())] + content
    calls = [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls]
    return content or "", calls if parallel else calls[:1]


SCRIPTS = [("Sure. \n", CALL),  # trailing whitespace before the call
           ("\n\n", CALL),  # whitespace alone before the call
           (" Checking.\n", CALL, "\n" + CALL2),  # two calls
           ("Sure.\n", CALL + " done"),  # text after the call
           ("Blue. \n",),  # no call: trailing whitespace is content
           ("Sure. ", '{"name": broken'),  # not a call: the marker's text is plain text
           ("<think>\nHm.\n</think>\n\nSure.\n", CALL)]


@pytest.mark.parametrize("reasoning", [False, True])
@pytest.mark.parametrize("mode", list(MODES))
def test_content_is_the_same_streamed_or_not_in_every_tool_choice(per_choice, mode, reasoning):
    """Non-streamed content is the concatenation of the streamed content deltas, whatever tool_choice and
    whether the reasoning parser runs, and both are the naive parse of the whole output. Before, "auto" and
    "required" stripped the unstreamed content but streamed the whitespace before a call ("Sure.\\n")."""
    eng, plain, think = per_choice
    tok = eng.tokenizer
    eng.scripts = [_script(tok, *s) for s in SCRIPTS]
    whole, streamed = _chat_both(think if reasoning else plain, messages=MESSAGES, tools=TOOLS, max_tokens=80,
                                 tool_choice=MODES[mode], n=len(SCRIPTS))
    assert sorted(whole) == sorted(streamed) == list(range(len(SCRIPTS)))
    for i, script in enumerate(eng.scripts):
        content, calls = _expected(tok, script, mode, reasoning)
        assert whole[i]["content"] == streamed[i]["content"] == content, (i, SCRIPTS[i], whole[i], streamed[i])
        assert whole[i]["calls"] == streamed[i]["calls"] == calls, (i, SCRIPTS[i])
    assert (whole[0]["content"] == "Sure.") if mode != "none" else ("Sure. \n" in whole[0]["content"])


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("mode", ["auto", "required"])
def test_parallel_tool_calls_false_returns_the_first_call(per_choice, mode, stream):
    """parallel_tool_calls false: at most one call (the first), as OpenAI and vLLM; the default and true keep all.
    Only "required" had a grammar stopping after one call; "auto" returned every call the model wrote."""
    eng, client, _ = per_choice
    tok = eng.tokenizer
    eng.scripts = [_script(tok, "Sure.\n", CALL, "\n" + CALL2)]
    for parallel, n_calls in ((False, 1), (None, 2), (True, 2)):
        kw = dict(model=MODEL, messages=MESSAGES, tools=TOOLS, max_tokens=80, tool_choice=mode)
        if parallel is not None:
            kw["parallel_tool_calls"] = parallel
        if stream:
            chunks = list(client.chat.completions.create(stream=True, **kw))
            calls = [t for ch in chunks if ch.choices for t in ch.choices[0].delta.tool_calls or []]
            assert [t.index for t in calls] == list(range(n_calls))
            content = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
            finish = chunks[-1].choices[0].finish_reason
        else:
            msg = (r := client.chat.completions.create(**kw)).choices[0].message
            calls, content, finish = msg.tool_calls, msg.content, r.choices[0].finish_reason
        assert [json.loads(t.function.arguments)["city"] for t in calls] == ["Paris", "Oslo"][:n_calls], parallel
        assert content == "Sure." and finish == "tool_calls"


@pytest.mark.parametrize("mode", ["auto", "required"])
def test_each_tool_call_streams_as_its_json_closes(per_choice, mode):
    """Streamed, a call goes out whole (name and arguments) once its JSON closes, not with the last token: with
    continuous usage stats the first call's chunk counts fewer output tokens than the output has; the second call
    comes at the end, with the next index; the unstreamed response has the same calls, ids aside."""
    eng, client, _ = per_choice
    tok = eng.tokenizer
    eng.scripts = [_script(tok, "Sure.\n", CALL, "\n" + CALL2 + " ")]
    kw = dict(model=MODEL, messages=MESSAGES, tools=TOOLS, max_tokens=80, tool_choice=mode)
    chunks = list(client.chat.completions.create(
        stream=True, stream_options={"include_usage": True, "continuous_usage_stats": True}, **kw))
    at = [(t.index, t.function.name, json.loads(t.function.arguments), ch.usage.completion_tokens)
          for ch in chunks if ch.choices for t in ch.choices[0].delta.tool_calls or []]
    total = chunks[-1].usage.completion_tokens
    assert [(i, a["city"]) for i, _, a, _ in at] == [(0, "Paris"), (1, "Oslo")]
    assert at[0][3] <= len(_script(tok, "Sure.\n", CALL)) < at[1][3] <= total
    msg = client.chat.completions.create(**kw).choices[0].message
    whole = [(t.function.name, json.loads(t.function.arguments)) for t in msg.tool_calls]
    assert whole == [(n, a) for _, n, a, _ in at]


@pytest.mark.parametrize("parallel", [True, False])
def test_n_choices_parse_their_tool_calls_apart(per_choice, parallel):
    """n = 3, each choice a different output (a call after text, plain text, two calls), interleaved step by
    step: each choice's content, calls (indices from 0 within the choice) and finish_reason are its own."""
    eng, client, _ = per_choice
    tok = eng.tokenizer
    eng.scripts = [_script(tok, "Sure.\n", CALL), _script(tok, "Blue."), _script(tok, "", CALL, "\n" + CALL2)]
    kw = dict(messages=MESSAGES, tools=TOOLS, max_tokens=80, n=3, parallel_tool_calls=parallel)
    whole, streamed = _chat_both(client, **kw)
    for i, script in enumerate(eng.scripts):
        content, calls = _expected(tok, script, "auto", False, parallel)
        for out in (whole[i], streamed[i]):
            assert (out["content"], out["calls"]) == (content, calls), (i, out)
            assert out["finish"] == ("tool_calls" if calls else "stop")
    assert [len(whole[i]["calls"]) for i in range(3)] == [1, 0, 2 if parallel else 1]
    chunks = list(client.chat.completions.create(model=MODEL, stream=True, **kw))
    for i in range(3):
        idx = [t.index for ch in chunks for c in ch.choices if c.index == i for t in c.delta.tool_calls or []]
        assert idx == list(range(len(whole[i]["calls"]))), (i, idx)


@pytest.mark.parametrize("fmt", ["json_object", "json_schema"])
def test_n_choices_with_response_format_streamed_or_not(client, fmt):
    """n = 3 with response_format, seeded: choice i is the same JSON streamed or not, each choice valid on its own,
    and the choices are not copies of one another (seed + i each)."""
    pytest.importorskip("xgrammar")
    schema = {"type": "object", "properties": {"a": {"enum": ["x", "y", "z"]}, "b": {"type": "boolean"}},
              "required": ["a", "b"]}
    rf = {"type": "json_object"} if fmt == "json_object" else \
        {"type": "json_schema", "json_schema": {"name": "t", "schema": schema, "strict": True}}
    whole, streamed = _chat_both(client, messages=MESSAGES, max_tokens=30, seed=7, n=3, response_format=rf,
                                 tools=TOOLS)  # tools (tool_choice auto): the tool-call collector reads it too
    assert sorted(whole) == sorted(streamed) == [0, 1, 2]
    for i in range(3):
        assert (whole[i]["content"], whole[i]["finish"]) == (streamed[i]["content"], streamed[i]["finish"]), i
        assert whole[i]["calls"] == streamed[i]["calls"] == []
        if whole[i]["finish"] == "stop":
            obj = json.loads(whole[i]["content"])
            assert isinstance(obj, dict) and (fmt == "json_object" or set(obj) == {"a", "b"})
        else:
            assert whole[i]["content"].startswith("{")
    assert len({whole[i]["content"] for i in range(3)}) > 1


@pytest.mark.parametrize("mode", ["required", "named"])
def test_n_choices_with_forced_tool_choice_streamed_or_not(client, mode):
    """n = 3 on the model, each choice under its own grammar and seed: choice i has the same calls streamed or not,
    one each (parallel_tool_calls false), of the forced function when named."""
    pytest.importorskip("xgrammar")
    whole, streamed = _chat_both(client, messages=MESSAGES, tools=test_serve.ENUM_TOOLS, max_tokens=120, seed=3, n=3,
                                 tool_choice=MODES[mode], parallel_tool_calls=False)
    assert sorted(whole) == sorted(streamed) == [0, 1, 2]
    for i in range(3):
        w, s = whole[i], streamed[i]
        assert (w["content"], w["calls"], w["finish"]) == (s["content"], s["calls"], s["finish"]), (i, w, s)
        assert len(w["calls"]) == 1 and w["finish"] == ("stop" if mode == "named" else "tool_calls"), (i, w)
        assert mode == "required" or w["calls"][0][0] == "get_weather"
    assert len({json.dumps(whole[i]["calls"]) for i in range(3)}) > 1


def test_responses_created_at_is_an_integer(small):
    """created_at in Unix seconds as an integer, as OpenAI sends it (it was a float), whole and in the stream's
    events; the same instant as the chat completion's created."""
    srv, _ = small
    body = {"model": MODEL, "input": "Hi", "max_output_tokens": 2}
    r = httpx.post(f"{srv.url}/v1/responses", json=body, timeout=30)
    assert r.status_code == 200 and type(r.json()["created_at"]) is int, r.json()["created_at"]
    with httpx.stream("POST", f"{srv.url}/v1/responses", json={**body, "stream": True}, timeout=30) as s:
        events = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: ")]
    stamps = [e["response"]["created_at"] for e in events if "response" in e]
    assert len(stamps) == 3 and all(type(t) is int for t in stamps) and len(set(stamps)) == 1, stamps
