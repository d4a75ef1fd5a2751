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

from cpm4.model.tokenizer import TOOL_CALL  # noqa: E402
from cpm4.serve import AsyncEngine, create_app  # noqa: E402

llm = test_serve.llm  # the tiny model on the CPU (module-scoped fixture)

CONTEXT = 64  # a short max_model_len, so that answers without max_tokens run into it quickly
CALL = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
NAMED = {"type": "function", "function": {"name": "get_weather"}}


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
    eng = _ScriptedEngine(llm.model, llm.tokenizer, continuous=False)
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
    assert usage is not None and usage.model_dump() == r.usage.model_dump()
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
    free = llm.chat(MESSAGES, test_serve._greedy(12, ignore_eos=True)).text
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
    assert c.text.startswith("The sky") and usage.model_dump() == r.usage.model_dump()


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
    assert a["choices"] == b["choices"] and len(a["choices"]) == 1 and a["usage"] == b["usage"]
    cmpl = {"prompt": "Hello world", "max_tokens": 5}
    a, b = post("completions", {**cmpl, **nulls, "echo": None}), post("completions", cmpl)
    assert a["choices"] == b["choices"] and a["usage"] == b["usage"]
    # A required field stays required.
    r = httpx.post(f"{srv.url}/v1/chat/completions", json={"model": MODEL, "messages": None}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"


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
