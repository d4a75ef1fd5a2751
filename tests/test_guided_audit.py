"""Audit of structured outputs through the server (response_format, vLLM's guided_* and structured_outputs fields,
forced tools) and of `cpm4 bench serve` against a scripted server, on the tiny random model."""

from __future__ import annotations

import asyncio
import json
import math
import statistics

import pytest

pytest.importorskip("xgrammar")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from fastapi import FastAPI, Request  # noqa: E402
from fastapi.responses import JSONResponse, StreamingResponse  # noqa: E402
from test_guided_fuzz import validate  # noqa: E402
from test_serve import _Server  # noqa: E402

from cpm4.engine import guided  # noqa: E402
from cpm4.engine.generate import prompt_logprobs  # noqa: E402
from cpm4.engine.sampling import SamplingParams  # noqa: E402
from cpm4.serve.bench import random_requests, run_clients, summarize  # noqa: E402

MODEL = "tiny-audit"
MESSAGES = [{"role": "user", "content": "Describe a person as JSON."}]

# Every value bounded, so even a random model closes the object well within max_tokens.
SCHEMA = {
    "type": "object", "title": "Person", "$defs": {"colour": {"enum": ["red", "green", "blue"]}},
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 6, "description": "a short name"},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "colour": {"$ref": "#/$defs/colour", "description": "favourite"},
        "tags": {"type": "array", "items": {"type": "string", "pattern": "^[a-z]{1,4}$"}, "maxItems": 2},
        "nick": {"anyOf": [{"type": "string", "maxLength": 3}, {"type": "null"}], "default": None},
        "ok": {"type": "boolean"},
        "day": {"type": "string", "format": "date"},
    },
    "required": ["name", "age", "colour", "tags", "nick", "ok", "day"],
}


def _same(a, b) -> bool:
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)  # True is not 1 here


@pytest.fixture(scope="module")
def llm(tiny_checkpoint):
    from cpm4.llm import LLM

    return LLM(tiny_checkpoint, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def server(llm):
    from cpm4.serve import AsyncEngine, create_app

    eng = AsyncEngine(llm.model, llm.tokenizer, max_batch_size=8)
    srv = _Server(create_app(eng, MODEL))
    yield srv
    srv.stop()
    eng.shutdown()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)


def _matcher(llm, **kw):
    cfg = llm.model.config
    return guided.new_matcher(llm.tokenizer, cfg.vocab_size, cfg.eos_token_ids, SamplingParams(**kw))


# ---------------------------------------------------------------------------------------------------------
# Structured outputs


def test_outputs_validate_greedy_and_sampled(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA, "strict": True}}
    outs = []
    for kw in (dict(temperature=0), dict(seed=1, temperature=1.0, n=3), dict(seed=7, temperature=1.3, n=3)):
        r = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=250, response_format=fmt, **kw)
        outs += [(c.message.content, c.finish_reason) for c in r.choices]
    r = client.completions.create(model=MODEL, prompt="Person:", max_tokens=250, seed=2, n=2,
                                  extra_body={"response_format": fmt})
    outs += [(c.text, c.finish_reason) for c in r.choices]
    # vLLM's fields: a client sending them got unconstrained text before.
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=250, seed=3,
                                       extra_body={"guided_json": SCHEMA})
    outs.append((r.choices[0].message.content, r.choices[0].finish_reason))
    r = client.completions.create(model=MODEL, prompt="Person:", max_tokens=250, seed=4,
                                  extra_body={"structured_outputs": {"json": json.dumps(SCHEMA)}})
    outs.append((r.choices[0].text, r.choices[0].finish_reason))
    for text, finish in outs:
        assert finish == "stop", (text, finish)
        validate(json.loads(text), SCHEMA)  # json.loads is strict: no raw control character in a string
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=40, seed=5, n=3,
                                       extra_body={"structured_outputs": {"json_object": True}})
    for c in r.choices:
        assert c.message.content.startswith("{")
        assert c.finish_reason == "length" or isinstance(json.loads(c.message.content), dict)


def test_length_bounded_strings_are_json(llm):
    # xgrammar's minLength/maxLength strings allowed the byte tokens of raw control characters (not JSON).
    m = _matcher(llm, guided_json={"type": "object", "properties": {"s": {"type": "string", "maxLength": 8}},
                                   "required": ["s"]})
    assert m.accept_string('{"s": "a')
    assert not m.accept_string("\x01")
    bitmask = guided._xgr().allocate_token_bitmask(1, llm.model.config.vocab_size)
    m.fill_next_token_bitmask(bitmask, 0)
    allowed = [t for t in range(llm.model.config.vocab_size) if bitmask[0, t // 32] >> (t % 32) & 1]
    texts = [llm.tokenizer.decode([t]) for t in allowed]
    assert len(allowed) > 100 and not [s for s in texts if any(ord(c) < 32 for c in s)]
    outs = llm.generate(["x"] * 8, [SamplingParams(max_tokens=60, seed=s, temperature=1.5, guided_json={
        "type": "array", "items": {"type": "string", "minLength": 2, "maxLength": 5}, "maxItems": 3})
        for s in range(8)])
    for o in outs:
        assert o.finish_reason == "stop" and all(2 <= len(x) <= 5 for x in json.loads(o.text)), o.text


def test_max_tokens_cut_is_length_streamed_or_not(client, llm):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}}
    kw = dict(model=MODEL, messages=MESSAGES, max_tokens=6, seed=0, n=2, response_format=fmt)
    r = client.chat.completions.create(**kw)
    text = {}
    for ch in client.chat.completions.create(stream=True, **kw):
        for c in ch.choices:
            text[c.index] = text.get(c.index, "") + (c.delta.content or "")
            assert c.finish_reason in (None, "length")
    for c in r.choices:
        assert c.finish_reason == "length" and c.message.content == text[c.index]
        assert _matcher(llm, guided_json=SCHEMA).accept_string(c.message.content)  # a prefix of a document
        with pytest.raises(ValueError):
            json.loads(c.message.content)
    r = client.completions.create(model=MODEL, prompt="x", max_tokens=1, extra_body={"guided_choice": ["abcdefgh"]})
    assert r.choices[0].finish_reason == "length" and "abcdefgh".startswith(r.choices[0].text)


def test_streamed_deltas_equal_the_whole_output(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}}
    for kw in (dict(seed=11, n=3, response_format=fmt),
               dict(seed=12, n=2, extra_body={"guided_regex": "[a-z]{2,6}( [a-z]{2,6}){0,3}"}),
               dict(seed=13, n=2, extra_body={"ignore_eos": True, "guided_json": SCHEMA})):  # ends with the JSON
        r = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=250, **kw)
        whole = [(c.message.content, c.finish_reason) for c in r.choices]
        parts, fins = {}, {}
        for ch in client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=250, stream=True, **kw):
            for c in ch.choices:
                parts[c.index] = parts.get(c.index, "") + (c.delta.content or "")
                fins[c.index] = c.finish_reason or fins.get(c.index)
        assert whole == [(parts[i], fins[i]) for i in range(len(whole))]
        assert all(f == "stop" for _, f in whole) and len({t for t, _ in whole}) > 1
    kw = dict(model=MODEL, prompt="Person:", max_tokens=250, seed=14, n=2, extra_body={"response_format": fmt})
    whole = [(c.text, c.finish_reason) for c in client.completions.create(**kw).choices]
    parts, fins = {}, {}
    for ch in client.completions.create(stream=True, **kw):
        for c in ch.choices:
            parts[c.index] = parts.get(c.index, "") + c.text
            fins[c.index] = c.finish_reason or fins.get(c.index)
    assert whole == [(parts[i], fins[i]) for i in range(2)] and all(f == "stop" for _, f in whole)


def test_logprobs_are_the_models_raw_ones(client, llm):
    """Documented choice (cpm4.engine.guided): logprobs are the model's distribution before the grammar mask,
    the same streamed or not; vLLM reports them renormalised over the grammar's tokens instead."""
    prompt = llm.tokenizer.encode("Person:")
    kw = dict(model=MODEL, prompt=prompt, max_tokens=250, temperature=0, logprobs=2,
              extra_body={"response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": SCHEMA}},
                          "return_tokens_as_token_ids": True})
    r = client.completions.create(**kw)
    lp = r.choices[0].logprobs
    assert r.choices[0].finish_reason == "stop"
    ids = [int(t.split(":")[1]) for t in lp.tokens]
    raw = prompt_logprobs(llm.model, prompt + ids, 2)[len(prompt):]
    for got, want, top in zip(lp.token_logprobs, raw, lp.top_logprobs, strict=True):
        assert math.isclose(got, want.logprob, abs_tol=2e-3)
        assert [v for v in top.values()][:2] == pytest.approx([v for _, v in want.top][:2], abs=2e-3)
    assert max(lp.token_logprobs) < -0.5  # not renormalised: forced tokens ({, keys) keep their raw probability
    streamed = [v for ch in client.completions.create(stream=True, **kw) for c in ch.choices if c.logprobs
                for v in c.logprobs.token_logprobs]
    assert streamed == lp.token_logprobs


UNSUPPORTED = [  # (schema, the feature the 400 names)
    ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, "uniqueItems"),
    ({"type": "object", "properties": {"a": {"not": {"type": "null"}}}}, "'not' at #/properties/a"),
    ({"if": {"type": "integer"}, "then": {"type": "integer", "minimum": 3}}, "'if'"),
    ({"type": "array", "contains": {"const": 3}}, "contains"),
    ({"type": "object", "properties": {"a": {"type": "integer"}}, "dependentRequired": {"a": ["a"]}},
     "dependentRequired"),
    ({"allOf": [{"type": "integer"}, {"minimum": 3}]}, "allOf"),
    ({"type": "number", "multipleOf": 0.5}, "multipleOf"),
    ({"type": "integer", "minimum": 0, "multipleOf": 2}, "'multipleOf' with 'minimum'"),
    ({"type": "string", "pattern": "^(?!a)[a-z]+$"}, "lookahead"),
    ({"type": "string", "pattern": "^a+$", "maxLength": 3}, "'pattern' with 'minLength/maxLength'"),
    ({"type": "string", "format": "email", "pattern": "^z"}, "'format' with 'pattern'"),
    ({"type": "integer", "enum": [1, 5], "minimum": 3}, "'enum' with 'minimum'"),
    ({"$defs": {"b": {"type": "integer"}}, "$ref": "#/$defs/b", "minimum": 5}, "'$ref' with 'minimum'"),
    ({"$ref": "https://example.com/s.json"}, "only local"),
    ({"minimum": 3}, "'minimum' without a 'type'"),
    ({"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["b"]}, "'required' naming 'b'"),
    ({"type": "string", "format": "iri"}, "'format' 'iri'"),
    ({"type": "integer", "enum": [1, "a"]}, "another type"),
    # xgrammar matched these against the raw JSON text: '{"p": "say "x""}' (invalid JSON), finish_reason "stop"
    ({"type": "string", "pattern": '^say "[a-z]+"$'}, "can match '\"'"),
    ({"type": "string", "pattern": "^[A-Z]:\\\\[a-z]+$"}, "can match '\"' or '\\' at #"),
    ({"type": "object", "patternProperties": {'^a"': {"type": "integer"}}}, "pattern that can match"),
    ({"type": "object", "propertyNames": {"pattern": "^\\x22$"}}, "match '\"' or '\\' at #/propertyNames"),
]


@pytest.mark.parametrize("schema,feature", UNSUPPORTED, ids=[f for _, f in UNSUPPORTED])
def test_unsupported_schema_features_are_refused(llm, schema, feature):
    # Each compiled before and was silently not enforced.
    with pytest.raises(ValueError, match="^guided_json uses a JSON schema feature that is not supported: ") as e:
        _matcher(llm, guided_json=schema)
    assert feature in str(e.value)


def test_common_schemas_still_compile(llm):
    # What pydantic and OpenAI's examples write: annotations, $ref with a description, Optional as anyOf with
    # null, Literal as const with a type, a custom format (an annotation), vendor keywords.
    schema = {"title": "M", "type": "object", "$defs": {"C": {"type": "object", "properties": {
                  "x": {"type": "integer", "multipleOf": 2}}, "required": ["x"],
                  "additionalProperties": False}},
              "properties": {"c": {"$ref": "#/$defs/C", "description": "d"},
                             "o": {"anyOf": [{"type": "string", "format": "date-time"}, {"type": "null"}],
                                   "default": None, "title": "O"},
                             "k": {"const": "a", "type": "string"}, "p": {"type": "string", "format": "password"},
                             "l": {"type": ["array", "null"], "items": {"enum": [1, 2]}, "maxItems": 2,
                                   "uniqueItems": False},
                             "s": {"type": "string", "minLength": 2, "x-vendor": 1}},
              "required": ["c", "k"], "$schema": "https://json-schema.org/draft/2020-12/schema"}
    m = _matcher(llm, guided_json=schema)
    assert m.accept_string('{"c": {"x": 4}, "o": null, "k": "a", "p": "pw", "l": [1], "s": "ab"}')
    assert not _matcher(llm, guided_json=schema).accept_string('{"c": {"x": 3}')  # multipleOf kept
    # Patterns that keep quotes and backslashes out (negated classes, ranges, escapes of other characters).
    for pattern, text in (('^[^"\\\\]+$', '"ab"'), ("^[ -~]{2}$", '"a1"'), ("^\\d+\\.\\w$", '"1.a"')):
        assert _matcher(llm, guided_json={"type": "string", "pattern": pattern}).accept_string(text), pattern


def test_bad_structured_output_requests_are_400s(server, client):
    def post(path="/v1/chat/completions", **body):
        base = {"model": MODEL, "max_tokens": 2}
        base.update({"messages": MESSAGES} if "chat" in path else {"prompt": "x"})
        return httpx.post(f"{server.url}{path}", json={**base, **body}, timeout=60)

    def fmt(schema):
        return {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}

    tools = [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"u": {"type": "string", "format": "iri"}}, "required": ["u"]}}}]
    cases = [  # (body, param, text the message contains)
        (dict(response_format=fmt(UNSUPPORTED[0][0])), "response_format", "uniqueItems"),
        (dict(guided_json=UNSUPPORTED[1][0]), "guided_json", "'not' at #/properties/a"),
        (dict(structured_outputs={"json": {"type": "number", "multipleOf": 0.5}}), "structured_outputs",
         "multipleOf"),
        (dict(tools=tools, tool_choice="required"), "tools", "'iri' at #/properties/arguments/properties/u"),
        # malformed: not an object, bad JSON text
        (dict(guided_json="{not json"), "guided_json", "guided_json must be"),
        (dict(guided_json="[1]"), "guided_json", "guided_json must be"),
        (dict(guided_json=5), "guided_json", "guided_json"),
        (dict(response_format=fmt('{"type": "object"}')), "response_format", "json_schema.schema"),
        (dict(response_format=fmt([1])), "response_format", "json_schema.schema"),
        (dict(structured_outputs={"json": "{bad"}), "structured_outputs", "structured_outputs.json must be"),
        (dict(response_format=fmt({"type": "bogus"})), "response_format", "invalid JSON schema"),
        # two grammars
        (dict(response_format={"type": "json_object"}, guided_json=SCHEMA), "guided_json", "response_format"),
        (dict(structured_outputs={"regex": "a", "choice": ["a"]}), "structured_outputs", "give one grammar"),
        (dict(tools=[{"type": "function", "function": {"name": "g"}}], tool_choice="required", guided_regex="a"),
         "tools", "tools and guided_regex are exclusive"),
    ]
    for body, param, text in cases:
        for path in ("/v1/chat/completions", "/v1/completions"):
            if "tools" in body and "chat" not in path:
                continue
            r = post(path, **body)
            err = r.json()["error"]
            assert r.status_code == 400 and err["param"] == param and text in err["message"], (path, body, r.text)
    r = client.completions.create(model=MODEL, prompt="ok", max_tokens=2, temperature=0)
    assert r.choices[0].finish_reason in ("stop", "length")


# ---------------------------------------------------------------------------------------------------------
# cpm4 bench serve against a scripted server: known delays, token counts and failures

TTFT, GAP = 0.08, 0.04


def _scripted_app(state: dict):
    app = FastAPI()

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": "scripted", "object": "model", "created": 0, "owned_by": "x"}]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await request.json()
        prompt, n = body["prompt"], body["max_tokens"]
        if prompt[0] == 0:  # refused outright
            return JSONResponse({"error": {"message": "scripted refusal", "type": "x", "param": None,
                                           "code": None}}, status_code=500)
        state["in_flight"] += 1
        state["peak"] = max(state["peak"], state["in_flight"])

        def event(choices, usage=None):
            return "data: " + json.dumps({"id": "c", "object": "text_completion", "created": 0, "model": "scripted",
                                          "choices": choices, "usage": usage}) + "\n\n"

        async def stream():
            try:
                await asyncio.sleep(TTFT)
                for i in range(0, n, 2):  # two tokens a chunk: chunks and tokens differ
                    if i and prompt[0] == 1:  # fails after its first chunk
                        yield 'data: {"error": {"message": "scripted failure mid-stream"}}\n\n'
                        return
                    yield event([{"index": 0, "text": "ab", "logprobs": None, "finish_reason": None}])
                    await asyncio.sleep(GAP)
                yield event([{"index": 0, "text": "", "logprobs": None, "finish_reason": "length"}])
                # The server counts a BOS the client did not send.
                yield event([], {"prompt_tokens": len(prompt) + 1, "completion_tokens": n,
                                 "total_tokens": len(prompt) + 1 + n})
                yield "data: [DONE]\n\n"
            finally:
                state["in_flight"] -= 1

        return StreamingResponse(stream(), media_type="text/event-stream")

    return app


@pytest.fixture(scope="module")
def scripted():
    state = {"in_flight": 0, "peak": 0}
    srv = _Server(_scripted_app(state))
    yield srv, state
    srv.stop()


@pytest.mark.parametrize("client_lib", ["httpx", "openai"])
def test_bench_figures_against_a_scripted_server(scripted, client_lib):
    srv, state = scripted
    reqs = random_requests(9, 5, 6, vocab=50, seed=0)
    for q, first in zip(reqs, [5, 0, 1, 7, 8, 9, 10, 11, 12]):  # request 1 refused, request 2 fails mid-stream
        q.prompt[0] = first
    state["peak"] = 0
    rep = run_clients(srv.url, "scripted", reqs, client=client_lib, processes=2, max_concurrency=3)
    # Shares of 3 over 2 processes were rounded up to 2 + 2: four requests in flight.
    assert state["peak"] <= 3
    s = summarize(rep, reqs)
    ok = [r for r in rep["results"] if r["error"] is None]
    assert (s["completed"], s["failed"]) == (7, 2)
    assert any("scripted refusal" in e for e in s["errors"]) and any("mid-stream" in e for e in s["errors"])
    # Counts are the server's usage: 6 tokens in 3 chunks each, the prompt plus the server's BOS.
    assert s["total_output_tokens"] == 7 * 6 and s["total_input_tokens"] == 7 * (5 + 1)
    assert all(r["text_chunks"] == 3 and r["tokens"] == 6 and len(r["itl_s"]) == 2 for r in ok)
    # TTFT to the first chunk; ITL one gap per chunk after it; TPOT = (latency - TTFT) / (tokens - 1).
    # A single gap may be shorter than the server's sleep when the chunk before it arrived late, so the bound
    # is on arrival times: chunk k cannot arrive before TTFT + k gaps after the request was sent.
    for r in ok:
        arrivals = [r["ttft_s"] + sum(r["itl_s"][:k]) for k in range(3)]
        assert all(a >= (TTFT + k * GAP) * 0.95 for k, a in enumerate(arrivals)), arrivals
        assert r["total_s"] >= arrivals[-1]
    tpot = [(r["total_s"] - r["ttft_s"]) / 5 for r in ok]
    assert math.isclose(s["mean_tpot_ms"], 1000 * statistics.fmean(tpot))
    assert math.isclose(s["mean_e2el_ms"], 1000 * statistics.fmean(r["total_s"] for r in ok))


def test_bench_cli_counts_failures_and_saves_atomically(scripted, tmp_path, capsys):
    from cpm4.cli import main

    srv, _ = scripted
    out = tmp_path / "r.json"
    # Vocabulary [0, 2): about half the prompts start with 0 (refused) or 1 (fail mid-stream).
    rc = main(["bench", "serve", "--base-url", srv.url, "--num-prompts", "6", "--random-vocab", "2",
               "--random-input-len", "4", "--random-output-len", "4", "--client", "httpx", "--client-processes", "1",
               "--save-result", str(out)])
    doc = json.loads(out.read_text())
    assert rc == 1 and doc["failed"] == 6 and doc["completed"] == 0 and doc["model"] == "scripted"
    assert "0 / 6" in capsys.readouterr().out  # completed / failed, reported rather than raised
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_poisson_schedule_follows_the_seed_alone():
    def times(**kw):
        return [r.send_at for r in random_requests(50, request_rate=5.0, vocab=100, **kw)]

    a = times(input_len=8, output_len=4, seed=3)
    assert a == times(input_len=8, output_len=4, seed=3) != times(input_len=8, output_len=4, seed=4)
    # The lengths draw from their own generator: the same seed, the same arrivals.
    assert a == times(input_len=30, output_len=9, range_ratio=0.5, seed=3)
    assert a[0] == 0 and 0.12 < statistics.fmean(b - x for x, b in zip(a, a[1:])) < 0.3


def test_vllms_first_structural_tag_form(llm, client):
    """vLLM's {"structures": [{begin, schema, end}], "triggers": [...]} (its docs' example; was a 400 saying the
    tag 'must have a format field'): free text until a trigger, then the schema's JSON, then the end string."""
    legacy = {"type": "structural_tag", "triggers": ["<f="],
              "structures": [{"begin": "<f=w>", "schema": {"type": "object", "properties": {"n": {"type": "integer"}},
                                                          "required": ["n"]}, "end": "</f>"}]}
    m = _matcher(llm, structural_tag=legacy)
    assert m.accept_string('Sure. <f=w>{"n": 3}</f>')
    m = _matcher(llm, structural_tag=json.dumps(legacy))
    assert m.accept_string("Sure. <f=w>") and not m.accept_string('{"n": "x"')
    for bad, what in (({**legacy, "structures": []}, "structures must be a non-empty list"),
                      ({**legacy, "triggers": "<f="}, "triggers must be a non-empty list"),
                      ({**legacy, "structures": [{"begin": "<f=w>"}]}, r"structures\[0\] must be an object")):
        with pytest.raises(ValueError, match=f"structural_tag is not a valid structural tag: {what}"):
            _matcher(llm, structural_tag=bad)
    for kw in ({"extra_body": {"structured_outputs": {"structural_tag": legacy}}},
               {"response_format": {"type": "structural_tag", "structures": legacy["structures"],
                                    "triggers": legacy["triggers"]}}):
        r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=5,
                                           **kw)
        assert r.choices[0].finish_reason in ("stop", "length")
    r = httpx.post(f"{client.base_url}chat/completions", timeout=30, json={
        "model": MODEL, "messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "structural_tag"}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "response_format", r.text


def test_grammar_waits_for_the_reasoning(llm):
    """reasoning_tags (set by the server's reasoning parser): the first token may open <think> besides the
    grammar's; the reasoning then runs free, and the grammar applies to the answer after </think> (was: from
    the first token, so a thinking model could never think). An output that opens otherwise is the grammar's;
    a prompt that already closed the block (thinking off) gets the plain grammar."""
    import torch

    from cpm4.engine.guided import AfterReasoning, Utf8Matcher, _xgr

    tok = llm.tokenizer
    cfg = llm.model.config
    tags = ("<think>", "</think>")
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    sp = SamplingParams(guided_json=schema, reasoning_tags=tags)
    prompt = tok.encode("Q?")

    def allowed(m):
        bits = _xgr().allocate_token_bitmask(1, cfg.vocab_size)
        m.fill_next_token_bitmask(bits, 0)
        x = torch.zeros(1, cfg.vocab_size)
        _xgr().apply_token_bitmask_inplace(x, bits, vocab_size=cfg.vocab_size)
        return {i for i in range(cfg.vocab_size) if x[0, i] == 0}

    m = guided.new_matcher(tok, cfg.vocab_size, cfg.eos_token_ids, sp, prompt)
    assert isinstance(m, AfterReasoning)
    brace, opening, word = (tok.encode(t, add_bos=False)[0] for t in ("{", "<think>", "Hello"))
    first = allowed(m)
    assert brace in first and opening in first and word not in first
    thought = tok.encode("<think>\nAny text { ] here.\n</think>\n\n", add_bos=False)
    for t in thought:
        assert m.state != "answer" and m.accept_token(t)
    newline = tok.encode("\n", add_bos=False)[0]
    assert m.state == "gap" and {brace, newline} <= allowed(m) and word not in allowed(m)  # whitespace, then JSON
    assert not m.accept_token(word) and m.state == "gap"
    assert all(m.accept_token(t) for t in tok.encode('{"n": 3}', add_bos=False))
    assert m.state == "answer" and allowed(m) == set(cfg.eos_token_ids) & allowed(m) != set()  # complete
    assert m.accept_token(cfg.eos_token_ids[0]) and m.is_terminated()
    # Opening with the grammar: no reasoning afterwards.
    m = guided.new_matcher(tok, cfg.vocab_size, cfg.eos_token_ids, sp, prompt)
    assert m.accept_token(brace) and m.state == "answer" and opening not in allowed(m)
    m = guided.new_matcher(tok, cfg.vocab_size, cfg.eos_token_ids, sp, prompt)
    assert not m.accept_token(word)  # neither the grammar's nor an opening
    closed = tok.encode("Q?<think>\n\n</think>\n\n")
    assert isinstance(guided.new_matcher(tok, cfg.vocab_size, cfg.eos_token_ids, sp, closed), Utf8Matcher)
    # Through the engine: the first token may open the block only with reasoning_tags.
    bias = {opening: 100.0}
    for with_tags, want in ((True, opening), (False, None)):
        p = SamplingParams(guided_json=True, max_tokens=1, temperature=0, logit_bias=bias,
                           reasoning_tags=tags if with_tags else None)
        got = llm.generate([prompt], p)[0].token_ids[0]
        assert (got == opening) if want else got != opening
    with pytest.raises(ValueError, match="reasoning_tags must be"):
        SamplingParams(guided_json=True, reasoning_tags=("<think>",))


def test_server_with_a_reasoning_parser_lets_the_answer_think_first(llm):
    """--reasoning-parser minicpm4 with response_format: the first token may open <think> (a bias stands in for a
    thinking model's first step; it was masked to the grammar's, so reasoning silently never happened); without
    the parser, or on /v1/completions, the grammar applies from the first token."""
    from cpm4.serve import AsyncEngine, create_app

    opening = llm.tokenizer.encode("<think>", add_bos=False)[0]
    eng = AsyncEngine(llm.model, llm.tokenizer, max_batch_size=4)
    srvs = {p: _Server(create_app(eng, MODEL, reasoning_parser=p)) for p in ("minicpm4", None)}
    try:
        for parser, srv in srvs.items():
            c = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="unused", max_retries=0, timeout=120)
            kw = dict(model=MODEL, max_tokens=1, temperature=0, logit_bias={str(opening): 100},
                      response_format={"type": "json_object"}, logprobs=True, extra_body={
                          "return_tokens_as_token_ids": True})
            r = c.chat.completions.create(messages=[{"role": "user", "content": "A person as JSON."}], **kw)
            first = int(r.choices[0].logprobs.content[0].token.split(":")[1])
            assert (first == opening) == (parser is not None), (parser, first)
            r = c.completions.create(model=MODEL, prompt="A person as JSON:", max_tokens=1, temperature=0, logprobs=0,
                                     logit_bias={str(opening): 100},
                                     extra_body={"return_tokens_as_token_ids": True,
                                                 "response_format": {"type": "json_object"}})
            assert int(r.choices[0].logprobs.tokens[0].split(":")[1]) != opening
    finally:
        for srv in srvs.values():
            srv.stop()
        eng.shutdown()
