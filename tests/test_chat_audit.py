"""Chat rendering and tool calls as transformers and vLLM do them (found by an audit): continue_final_message cut
where the message ends, `documents` and `{% generation %}` in the tokenizer-only path, templates that refuse a
conversation still accepted, one BOS as transformers writes it, earlier calls' arguments handed to the template as
objects, and a tool call with a lone surrogate escape that no longer breaks the response."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
transformers = pytest.importorskip("transformers")

from test_serve import MESSAGES, MODEL, _ScriptedEngine, _Server  # noqa: E402

from cpm4.llm import LLM  # noqa: E402
from cpm4.model.tokenizer import TOOL_CALL, Tokenizer  # noqa: E402
from cpm4.serve import AsyncEngine, create_app  # noqa: E402
from cpm4.serve.tool_calls import parse_tool_calls  # noqa: E402


@pytest.fixture(scope="module")
def llm(tiny_checkpoint):
    return LLM(tiny_checkpoint, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def hf(tiny_checkpoint):
    return transformers.AutoTokenizer.from_pretrained(str(tiny_checkpoint), local_files_only=True)


def _tok(path, template: str | None = None) -> Tokenizer:
    tok = Tokenizer.from_dir(path)  # cpm4's files: the tokenizer-only path (no transformers)
    if template is not None:
        tok.set_chat_template(template)
    return tok


@pytest.mark.parametrize("content", ["end", "d", "_", "Hel", " lo ", "im"])
def test_continue_final_message_cuts_where_the_message_ends(tiny_checkpoint, hf, content):
    tok = _tok(tiny_checkpoint)
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": content}]
    ours = tok.render_chat(msgs, add_generation_prompt=False, continue_final_message=True)
    theirs = hf.apply_chat_template(msgs, add_generation_prompt=False, continue_final_message=True, tokenize=False)
    assert ours == theirs  # "end" was cut after "<|im_end" (the text searched for was also in the end tag)
    assert ours.rstrip().endswith(("assistant\n" + content).rstrip())


def test_template_variables_and_tags_as_transformers(tiny_checkpoint, hf):
    msgs = [{"role": "user", "content": "hi"}]
    docs = "{% for d in documents or [] %}[{{ d.title }}]{% endfor %}{% for m in messages %}{{ m.content }}{% endfor %}"
    gen = "{% for m in messages %}{% generation %}<{{ m.content }}>{% endgeneration %}{% endfor %}"
    for template, kw, want in ((docs, {"documents": [{"title": "A"}]}, "[A]hi"), (gen, {}, "<hi>")):
        tok = _tok(tiny_checkpoint, template)  # the generation tag was a TemplateSyntaxError
        assert tok.render_chat(msgs, **kw) == want  # documents were "multiple values for keyword argument"
        assert hf.apply_chat_template(msgs, chat_template=template, tokenize=False, **kw) == want
    # A template that refuses a conversation without a system message is still a template.
    strict = ("{% if messages[0].role != 'system' %}{{ raise_exception('system message required') }}{% endif %}"
              "{% for m in messages %}{{ m.content }}{% endfor %}")
    tok = _tok(tiny_checkpoint, strict)
    assert tok.render_chat([{"role": "system", "content": "s"}] + msgs) == "shi"
    with pytest.raises(Exception, match="system message required"):
        tok.render_chat(msgs)
    with pytest.raises(ValueError, match="does not render a chat"):
        _tok(tiny_checkpoint, "{{ messages[0].nope.deeper }}")
    # Text before the template's own BOS: one BOS, where the template put it (a second was prepended).
    lead = "\n{{ bos_token }}{% for m in messages %}{{ m.content }}{% endfor %}"
    tok = _tok(tiny_checkpoint, lead)
    assert tok.encode_chat(msgs) == hf.apply_chat_template(msgs, chat_template=lead, tokenize=True,
                                                           return_dict=False)
    assert tok.encode_chat(msgs).count(tok.bos_token_id) == 1


def test_earlier_calls_arguments_reach_the_template_as_objects(llm):
    """vLLM parses an assistant message's tool_calls arguments before rendering (transformers' convention):
    a `tojson` template encoded the text twice, and "" left the call's arguments out of the prompt."""
    template = ("{% for m in messages %}{% if m.tool_calls %}{% for c in m.tool_calls %}"
                "CALL {{ c.function.arguments | tojson }};{% endfor %}{% else %}{{ m.content }};{% endif %}"
                "{% endfor %}")
    tok = llm.tokenizer
    old = tok.hf.chat_template
    tok.set_chat_template(template)
    eng = AsyncEngine(llm.model, tok, max_batch_size=2)
    srv = _Server(create_app(eng, MODEL))
    try:
        def render(args):
            msgs = [{"role": "user", "content": "w?"}, {"role": "assistant", "content": None, "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "f", "arguments": args}}]},
                {"role": "tool", "tool_call_id": "c1", "content": "ok"}]
            r = httpx.post(f"{srv.url}/tokenize", json={"model": MODEL, "messages": msgs,
                                                        "add_generation_prompt": False}, timeout=30)
            return r.status_code, (tok.decode(r.json()["tokens"]) if r.status_code == 200 else r.json())

        assert render('{"city": "Paris"}') == (200, 'w?;CALL {"city": "Paris"};ok;')
        assert render({"city": "Paris"}) == (200, 'w?;CALL {"city": "Paris"};ok;')
        assert render("") == (200, "w?;CALL {};ok;")
        status, body = render("not json")
        assert status == 400 and "messages[1].tool_calls[0].function.arguments must be a JSON object" in \
            body["error"]["message"]
    finally:
        srv.stop()
        eng.shutdown()
        tok.hf.chat_template = old


def test_tool_call_with_a_lone_surrogate_escape(llm):
    """`"\\ud83d"` in a call's arguments decodes to a lone surrogate, which no UTF-8 response can carry: the
    arguments stay escaped (a 500, and a stream cut off without an error, before)."""
    _, calls = parse_tool_calls(TOOL_CALL + '{"name": "f", "arguments": {"s": "\\ud83d x"}}')
    assert json.loads(calls[0]["function"]["arguments"]) == {"s": "\ud83d x"}
    calls[0]["function"]["arguments"].encode("utf-8")
    assert parse_tool_calls(TOOL_CALL + '{"name": "\\ud83d", "arguments": {}}')[1] == []  # no such name
    tok = llm.tokenizer
    eng = _ScriptedEngine(llm.model, tok, continuous=False)
    eng.script = [tok.token_id(TOOL_CALL)] + tok.encode('{"name": "get_weather", "arguments": {"city": "\\ud83d"}}',
                                                        add_bos=False)
    srv = _Server(create_app(eng, MODEL))
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    try:
        c = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="unused", max_retries=0, timeout=60)
        r = c.chat.completions.create(model=MODEL, messages=MESSAGES, tools=tools, max_tokens=60)
        (call,) = r.choices[0].message.tool_calls
        assert json.loads(call.function.arguments) == {"city": "\ud83d"}
        chunks = list(c.chat.completions.create(model=MODEL, messages=MESSAGES, tools=tools, max_tokens=60,
                                                stream=True))
        streamed = [t.function.arguments for ch in chunks if ch.choices for t in ch.choices[0].delta.tool_calls or []]
        assert streamed == [call.function.arguments] and chunks[-1].choices[0].finish_reason == "tool_calls"
    finally:
        srv.stop()
        eng.shutdown()
