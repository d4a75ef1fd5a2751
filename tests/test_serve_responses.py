"""`POST /v1/responses` (OpenAI's Responses API) through the official openai client: the same tokens as the chat
completion it maps onto, streamed or not; instructions, multi-turn input items, function tools and forced calls,
the output-token limit, and clear errors for what the server does not do."""

from __future__ import annotations

import json
import os
import time

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

httpx = pytest.importorskip("httpx")

from test_serve import ENUM_TOOLS, MESSAGES, MODEL, _ScriptedEngine, _Server  # noqa: E402

from cpm4.llm import LLM  # noqa: E402
from cpm4.model.init import create_checkpoint  # noqa: E402
from cpm4.model.tokenizer import TOOL_CALL  # noqa: E402
from cpm4.serve import AsyncEngine, create_app  # noqa: E402

RESPONSE_TOOLS = [{"type": "function", **t["function"]} for t in ENUM_TOOLS]


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    create_checkpoint("tiny", path := tmp_path_factory.mktemp("responses") / "tiny")
    return LLM(path, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def served(llm):
    """(openai client, server, engine) over the tiny model on the CPU."""
    eng = AsyncEngine(llm.model, llm.tokenizer, max_batch_size=8)
    srv = _Server(create_app(eng, MODEL))
    yield openai.OpenAI(base_url=f"{srv.url}/v1", api_key="unused", max_retries=0, timeout=60), srv, eng
    srv.stop()
    eng.shutdown()


@pytest.fixture(scope="module")
def client(served):
    return served[0]


def _chat_text(client, messages, **kw):
    r = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, **kw)
    return r.choices[0].message.content, r.usage


def test_response_matches_chat(client):
    """instructions + a string input = a system and a user message; greedy text and token counts as the chat's."""
    want, usage = _chat_text(client, MESSAGES, max_tokens=12)
    r = client.responses.create(model=MODEL, instructions=MESSAGES[0]["content"], input=MESSAGES[1]["content"],
                                max_output_tokens=12, temperature=0)
    assert r.object == "response" and r.model == MODEL and r.id.startswith("resp_")
    assert r.output_text == want
    assert r.output[0].type == "message" and r.output[0].role == "assistant"
    assert (r.usage.input_tokens, r.usage.output_tokens) == (usage.prompt_tokens, usage.completion_tokens)
    assert r.usage.total_tokens == usage.total_tokens


@pytest.mark.parametrize("limit", [1, 3, 40])
def test_status_follows_the_limit(client, limit):
    """status "incomplete" (reason max_output_tokens) exactly when the chat completion stops for length."""
    r_chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Count: 1, 2, 3,"}],
                                            max_tokens=limit, temperature=0)
    r = client.responses.create(model=MODEL, input="Count: 1, 2, 3,", max_output_tokens=limit, temperature=0)
    if r_chat.choices[0].finish_reason == "length":
        assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    else:
        assert r.status == "completed" and r.incomplete_details is None
    assert r.output_text == r_chat.choices[0].message.content


def test_input_items_make_the_conversation(client):
    """Message items (text parts included), an earlier function call and its output: the chat conversation with
    the assistant's tool call and the tool message."""
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                              "arguments": '{"city": "Oslo", "days": 1}'}}
    chat = [{"role": "user", "content": "Weather in Oslo?"},
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "call_1", "content": "cold"}]
    want, _ = _chat_text(client, chat, max_tokens=8, tools=ENUM_TOOLS)
    items = [{"role": "user", "content": [{"type": "input_text", "text": "Weather in Oslo?"}]},
             {"type": "function_call", "call_id": "call_1", "name": "get_weather",
              "arguments": '{"city": "Oslo", "days": 1}'},
             {"type": "function_call_output", "call_id": "call_1", "output": "cold"}]
    r = client.responses.create(model=MODEL, input=items, tools=RESPONSE_TOOLS, max_output_tokens=8, temperature=0)
    assert r.output_text == want


@pytest.mark.parametrize("stream", [False, True])
def test_forced_function_call(client, stream):
    """tool_choice naming a function: a function_call output item with arguments valid for its schema."""
    pytest.importorskip("xgrammar")
    kw = dict(model=MODEL, input="Weather?", tools=RESPONSE_TOOLS, max_output_tokens=120,
              tool_choice={"type": "function", "name": "get_weather"}, extra_body={"seed": 1})
    if stream:
        events = list(client.responses.create(stream=True, **kw))
        r = events[-1].response
        added = [e for e in events if e.type == "response.output_item.added" and e.item.type == "function_call"]
        assert len(added) == 1
        # As OpenAI: the added item's arguments are empty and the deltas build them (the SDK's stream helper
        # appends each delta to the added item's: they came out doubled)
        deltas = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
        assert added[0].item.arguments == ""
        assert deltas == [o for o in r.output if o.type == "function_call"][0].arguments
    else:
        r = client.responses.create(**kw)
    calls = [o for o in r.output if o.type == "function_call"]
    assert len(calls) == 1 and calls[0].name == "get_weather" and calls[0].call_id
    args = json.loads(calls[0].arguments)
    assert args["city"] in ("Paris", "Oslo") and isinstance(args["days"], int)


def test_streamed_response_equals_whole(client):
    """The stream's events in order, sequence numbers counting up, deltas adding up to the whole response's text,
    the final event carrying the same output and usage."""
    kw = dict(model=MODEL, instructions="Be brief.", input="Say hello.", max_output_tokens=10, temperature=0)
    whole = client.responses.create(**kw)
    events = list(client.responses.create(stream=True, **kw))
    types = [e.type for e in events]
    assert types[:2] == ["response.created", "response.in_progress"]
    assert types[-1] == ("response.completed" if whole.status == "completed" else "response.incomplete")
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == whole.output_text
    assert "response.output_text.done" in types and "response.output_item.done" in types
    final = events[-1].response
    assert final.output_text == whole.output_text and final.usage.output_tokens == whole.usage.output_tokens


def _lp_fields(entries):
    """(token, bytes, logprob rounded, [(token, bytes)] of the alternatives) per token, from either API's objects."""
    return [(e.token, list(e.bytes), round(e.logprob, 4), [(t.token, list(t.bytes)) for t in e.top_logprobs])
            for e in entries]


def test_logprobs_when_included(client):
    """include ["message.output_text.logprobs"]: the output text carries the chat completion's per-token logprobs
    and top_logprobs alternatives, whole and streamed (the deltas' logprobs adding up to the whole); without it
    none come back, whatever top_logprobs says (as OpenAI and vLLM)."""
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Say hello."}],
                                          max_tokens=9, temperature=0, logprobs=True, top_logprobs=2)
    want = _lp_fields(chat.choices[0].logprobs.content)
    assert len(want) == chat.usage.completion_tokens and all(len(w[3]) == 2 for w in want)
    kw = dict(model=MODEL, input="Say hello.", max_output_tokens=9, temperature=0, top_logprobs=2,
              include=["message.output_text.logprobs"])
    r = client.responses.create(**kw)
    part = r.output[0].content[0]
    assert r.output_text == chat.choices[0].message.content and r.top_logprobs == 2
    assert _lp_fields(part.logprobs) == want
    events = list(client.responses.create(stream=True, **kw))
    streamed = [lp for e in events if e.type == "response.output_text.delta" for lp in e.logprobs]
    done = next(e for e in events if e.type == "response.output_text.done")
    final = events[-1].response.output[0].content[0]
    assert [(lp.token, round(lp.logprob, 4)) for lp in streamed] == [(w[0], w[2]) for w in want]
    assert [(lp.token, round(lp.logprob, 4)) for lp in done.logprobs] == [(w[0], w[2]) for w in want]
    assert _lp_fields(final.logprobs) == want
    for extra in ({"top_logprobs": 3}, {"include": ["reasoning.encrypted_content"]}):
        r = client.responses.create(model=MODEL, input="Say hello.", max_output_tokens=4, temperature=0, **extra)
        assert r.output[0].content[0].logprobs == []
    r = client.responses.create(model=MODEL, input="Say hello.", max_output_tokens=4, temperature=0,
                                include=["message.output_text.logprobs"])
    assert [e.top_logprobs for e in r.output[0].content[0].logprobs] == [[]] * r.usage.output_tokens
    with pytest.raises(openai.BadRequestError, match=r"include\[1\]: unknown value 'message.logprobs'") as e:
        client.responses.create(model=MODEL, input="Hi", include=["message.output_text.logprobs",
                                                                   "message.logprobs"])
    assert e.value.body["param"] == "include"


def test_reasoning_streamed_as_its_own_item(llm):
    """With the reasoning parser, the <think> block is a reasoning item before the message: streamed as
    reasoning_text deltas that add up to the whole response's reasoning, closed before the message opens, the
    same item ids in the events and the final response; a reasoning item followed by a function call alone."""
    tok = llm.tokenizer
    thought, answer = "<think>\nCompare the two.\n</think>\n\n", "Blue."
    eng = _ScriptedEngine(llm.model, tok, continuous=False)
    srv = _Server(create_app(eng, MODEL, reasoning_parser="minicpm4"))
    try:
        c = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="unused", max_retries=0, timeout=60)
        eng.script = tok.encode(thought + answer, add_bos=False)
        whole = c.responses.create(model=MODEL, input="Which?", max_output_tokens=50)
        assert [o.type for o in whole.output] == ["reasoning", "message"]
        n_think = len(tok.encode("<think>\nCompare the two.\n</think>", add_bos=False))
        assert whole.usage.output_tokens_details.reasoning_tokens == n_think
        assert whole.output[0].content[0].text == "Compare the two." and whole.output_text == "Blue."
        events = list(c.responses.create(model=MODEL, input="Which?", max_output_tokens=50, stream=True))
        assert [e.sequence_number for e in events] == list(range(len(events)))
        types = [e.type for e in events]
        opened = [(e.output_index, e.item.type) for e in events if e.type == "response.output_item.added"]
        closed = [(e.output_index, e.item.type) for e in events if e.type == "response.output_item.done"]
        assert opened == closed == [(0, "reasoning"), (1, "message")]
        # The reasoning item closes before the message opens.
        assert types.index("response.reasoning_text.done") < [i for i, t in enumerate(types)
                                                               if t == "response.output_item.added"][1]
        deltas = [e for e in events if e.type == "response.reasoning_text.delta"]
        assert "".join(e.delta for e in deltas) == "Compare the two."
        done = next(e for e in events if e.type == "response.reasoning_text.done")
        assert done.text == "Compare the two." and done.output_index == 0
        final = events[-1].response
        assert [o.type for o in final.output] == ["reasoning", "message"]
        assert final.output[0].content[0].text == "Compare the two." and final.output_text == "Blue."
        assert {e.item_id for e in deltas} == {done.item_id, final.output[0].id}
        assert all(e.output_index == 1 for e in events if e.type == "response.output_text.delta")
        # Reasoning, then a call: no message item, whole or streamed.
        call = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
        eng.script = tok.encode(thought, add_bos=False) + [tok.token_id(TOOL_CALL)] + tok.encode(call, add_bos=False)
        tools = [{"type": "function", "name": "get_weather", "parameters": {
            "type": "object", "properties": {"city": {"type": "string"}}}}]
        whole = c.responses.create(model=MODEL, input="Weather?", tools=tools, max_output_tokens=80)
        events = list(c.responses.create(model=MODEL, input="Weather?", tools=tools, max_output_tokens=80,
                                         stream=True))
        for r in (whole, events[-1].response):
            assert [o.type for o in r.output] == ["reasoning", "function_call"]
            assert json.loads(r.output[1].arguments) == {"city": "Paris"}
        assert [(e.output_index, e.item.type) for e in events if e.type == "response.output_item.done"] == \
            [(0, "reasoning"), (1, "function_call")]
    finally:
        srv.stop()
        eng.shutdown()


def test_output_fed_back_keeps_the_assistant_turn_whole():
    """`input = [...] + response.output + [function_call_output]` (OpenAI's multi-turn pattern): text then a call is
    one assistant message with content and tool_calls, as the model wrote it and the chat endpoint renders it (it
    was two assistant turns, a prompt the model never saw)."""
    from cpm4.serve.responses import ResponsesRequest, _messages

    call = {"type": "function_call", "id": "fc_1", "call_id": "c1", "name": "f", "arguments": "{}",
            "status": "completed"}
    items = [{"role": "user", "content": "Weather?"},
             {"type": "message", "id": "m1", "role": "assistant", "status": "completed",
              "content": [{"type": "output_text", "text": "Let me check.", "annotations": []}]},
             call, {**call, "call_id": "c2"},
             {"type": "function_call_output", "call_id": "c1", "output": "sunny"}]
    fn = {"name": "f", "arguments": "{}"}
    assert _messages(ResponsesRequest(input=items)) == [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": "Let me check.", "tool_calls": [
            {"id": "c1", "type": "function", "function": fn}, {"id": "c2", "type": "function", "function": fn}]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]


def test_reasoning_tokens_are_not_the_output_texts_logprobs(llm):
    """With the reasoning parser, output_text's logprobs are its own text's tokens (OpenAI's), streamed or not:
    they held the <think> block's 16 too."""
    tok = llm.tokenizer
    eng = _ScriptedEngine(llm.model, tok, continuous=False)
    eng.with_logprobs = True
    eng.script = tok.encode("<think>\nCompare the two.\n</think>\n\nBlue.", add_bos=False)
    srv = _Server(create_app(eng, MODEL, reasoning_parser="minicpm4"))
    try:
        c = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="unused", max_retries=0, timeout=60)
        kw = dict(model=MODEL, input="Which?", include=["message.output_text.logprobs"])
        whole = c.responses.create(**kw)
        events = list(c.responses.create(stream=True, **kw))
        answer = len(eng.script) - len(tok.encode("Blue.", add_bos=False))
        want = [(tok.decode([t]), -float(j)) for j, t in enumerate(eng.script)][answer:]
        streamed = [lp for e in events if e.type == "response.output_text.delta" for lp in e.logprobs]
        for lps in (whole.output[-1].content[0].logprobs, events[-1].response.output[-1].content[0].logprobs,
                    streamed):
            assert [(lp.token, lp.logprob) for lp in lps] == want
        assert "".join(t for t, _ in want) == whole.output_text == "Blue."
    finally:
        srv.stop()
        eng.shutdown()


def test_unsupported_requests_are_clear_errors(client):
    with pytest.raises(openai.BadRequestError, match="previous_response_id is not supported"):
        client.responses.create(model=MODEL, input="Hi", previous_response_id="resp_123")
    with pytest.raises(openai.BadRequestError, match="background is not supported"):
        client.responses.create(model=MODEL, input="Hi", background=True)
    for text, what in (({"format": {}}, "text.format.type must be"), ({"verbosity": "loud"}, "text.verbosity"),
                       ({"format": {"type": "json_schema", "schema": {"type": "object"}}}, "text.format.name"),
                       ({"format": {"type": "json_schema", "name": "x"}}, "text.format.schema")):
        with pytest.raises(openai.BadRequestError, match=what) as e:
            client.responses.create(model=MODEL, input="Hi", text=text)
        assert e.value.body["param"] == "text"
    with pytest.raises(openai.BadRequestError, match="only text parts are supported"):
        client.responses.create(model=MODEL, input=[{"role": "user", "content": [
            {"type": "input_image", "image_url": "http://x/y.png"}]}])
    for item, what in (({"role": "user", "content": []}, "non-empty list of content parts"),
                       ({"type": "function_call_output", "call_id": "c1"}, "needs output"),
                       ({"type": "function_call_output", "output": "x"}, "needs call_id")):
        with pytest.raises(openai.BadRequestError, match=what) as e:  # were 200s
            client.responses.create(model=MODEL, input=[item])
        assert e.value.body["param"] == "input[0]"
    with pytest.raises(openai.BadRequestError, match="text.format.strict must be a boolean"):  # was echoed back
        client.responses.create(model=MODEL, input="Hi", text={"format": {
            "type": "json_schema", "name": "x", "schema": {"type": "object"}, "strict": "yes"}})
    with pytest.raises(openai.BadRequestError, match="tool_choice of type 'allowed_tools' is not supported"):
        client.responses.create(model=MODEL, input="Hi", tools=RESPONSE_TOOLS,
                                tool_choice={"type": "allowed_tools", "mode": "auto", "tools": []})
    with pytest.raises(openai.BadRequestError, match="only function tools are supported"):
        client.responses.create(model=MODEL, input="Hi", tools=[{"type": "web_search"}])
    with pytest.raises(openai.BadRequestError, match="max_output_tokens"):
        client.responses.create(model=MODEL, input="Hi", max_output_tokens=0)
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="other-model", input="Hi")
    r = client.responses.create(model=MODEL, input="ok", max_output_tokens=2, temperature=0)  # still serving
    assert r.usage.output_tokens <= 2


def test_stream_disconnect_aborts(served):
    """Closing a response stream aborts its request at once (the chat stream under it is closed)."""
    client, server, engine = served
    aborted_before = engine.num_aborted
    body = {"model": MODEL, "input": "Hi", "max_output_tokens": 3000, "temperature": 0, "stream": True,
            "ignore_eos": True}
    with httpx.stream("POST", f"{server.url}/v1/responses", json=body, timeout=30) as r:
        for line in r.iter_lines():
            if '"response.output_text.delta"' in line:
                break
    deadline = time.monotonic() + 15
    while engine.num_aborted == aborted_before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.num_aborted == aborted_before + 1
    r = client.responses.create(model=MODEL, input="ok", max_output_tokens=2, temperature=0)
    assert r.usage.output_tokens <= 2


def _random_chat_stream(rng):
    """A chat completion stream as the chat path sends it (reasoning deltas, then content deltas, each with the
    logprobs of its tokens, the calls whole in one chunk at the end, the usage chunk) and the whole message."""
    words = ["a", "b c", " ", "\n", "é", "🙂", '"q"', "x\\y", ""]
    reasoning = [w for _ in range(rng.choice([0, 0, 1, 3])) if (w := rng.choice(words[:-1]))]
    content = [rng.choice(words) for _ in range(rng.choice([0, 1, 2, 5]))]
    calls = [{"id": f"call_{k}", "type": "function",
              "function": {"name": f"f{k}", "arguments": json.dumps({"k": k, "s": rng.choice(words)})}}
             for k in range(rng.choice([0, 0, 1, 2]))]
    logprobs = rng.random() < 0.5
    chunks, lps = [], []

    n_reasoning, opened = 0, False

    def lp(delta):
        # output_text's are the message's tokens: not the reasoning's, nor the blank ones between it and the text
        nonlocal n_reasoning, opened
        e = {"token": rng.choice(words), "logprob": -rng.random(), "bytes": [97],
             "top_logprobs": [{"token": "z", "logprob": -2.0, "bytes": [122]}]}
        opened = opened or bool(delta.get("content"))
        if opened or not reasoning:
            lps.append(e)
        else:  # (counted with the reasoning: the usage's split is the fuzz check's, not this test's)
            n_reasoning += 1
        return {"content": [e]}

    def chunk(delta, finish=None, with_lp=True):
        return {"choices": [{"index": 0, "delta": delta, "finish_reason": finish,
                             "logprobs": lp(delta) if logprobs and with_lp else None}]}

    chunks.append(chunk({"role": "assistant", "content": ""}, with_lp=False))
    chunks += [chunk({"reasoning_content": r}) for r in reasoning if r]
    chunks += [chunk({"content": c}) for c in content]
    if calls:
        chunks.append(chunk({"tool_calls": [{"index": j, **c} for j, c in enumerate(calls)]}, with_lp=False))
    finish = rng.choice(["stop", "length"])
    chunks.append(chunk({}, finish, with_lp=False))
    n = len(lps) + n_reasoning if logprobs else rng.randint(0, 9)  # with logprobs, one a token
    chunks.append({"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": n, "total_tokens": 7 + n,
                                            "completion_tokens_details": {"reasoning_tokens": n_reasoning}}})
    text = "".join(content)
    message = {"role": "assistant", "content": (text or None) if calls else text,
               "reasoning_content": "".join(reasoning) or None, "tool_calls": calls or None}
    return [f"data: {json.dumps(c)}\n\n" for c in chunks] + ["data: [DONE]\n\n"], message, lps, finish


def test_events_reshape_random_chat_streams():
    """`_events` over random chat streams (reasoning, content pieces, logprobs, calls, the finish): every event
    valid for the openai client's types, items opened and closed in order, and the final response's output that of
    the whole message (`_output_items`, the unstreamed path) with the same ids."""
    import asyncio
    import random

    from test_serve_fuzz import Case, _check_responses_stream

    from cpm4.serve.responses import ResponsesRequest, _events, _output_items, _Shape

    async def consume(lines, shape):
        async def gen():
            for x in lines:
                yield x
        return "".join([e async for e in _events(shape, gen())])

    # ~8 ms a stream: 300 in CI; CPM4_RESPONSES_FUZZ_STREAMS for more.
    for seed in range(int(os.environ.get("CPM4_RESPONSES_FUZZ_STREAMS", 300))):
        rng = random.Random(seed)
        lines, message, lps, finish = _random_chat_stream(rng)
        body = {"model": MODEL, "input": "Hi", "stream": True}
        if lps:
            body["include"] = ["message.output_text.logprobs"]
        req = ResponsesRequest.model_validate(body)
        shape = _Shape(req, MODEL)
        text = asyncio.run(consume(lines, shape))
        _check_responses_stream(Case("/v1/responses", b"", {}, "ok", body=body), text)
        final = json.loads(text.strip().split("\n\n")[-1].split("data: ", 1)[1])["response"]
        whole = _output_items(shape, message, lps)
        assert final["output"] == whole, (seed, final["output"], whole)
        assert final["status"] == ("incomplete" if finish == "length" else "completed"), seed
