"""/v1/chat/completions' less common request fields against vLLM's OpenAI server (found by an audit): a message with
a null content rendered as "" (a 400 before), a per-request chat_template refused (silently ignored before), vLLM's
echo, top_logprobs 0 without logprobs accepted; and the shapes and numbers that already matched (logprobs, n > 1
streamed with usage, max_completion_tokens, prompt_tokens) kept."""

from __future__ import annotations

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

import test_serve  # noqa: E402
from test_serve import MESSAGES, MODEL  # noqa: E402

# test_serve's module-scoped fixtures: the tiny model on the CPU, its engine, a server on loopback, a client
llm, engine, server, client = test_serve.llm, test_serve.engine, test_serve.server, test_serve.client


def _post(server, path: str, **body) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", json={"model": MODEL, **body}, timeout=60)


def _count(server, messages, **kw) -> int:
    r = _post(server, "/tokenize", messages=messages, **kw)
    assert r.status_code == 200, r.text
    return r.json()["count"]


def test_null_or_missing_content_renders_as_empty(server, client):
    """vLLM renders a message's null (or missing) content as "": an assistant turn without content or tool_calls
    (as some clients replay a refused or empty turn) was a 400 ("has no string 'content'")."""
    empty = [{"role": "user", "content": "a"}, {"role": "assistant", "content": ""}, {"role": "user", "content": "b"}]
    for assistant in ({"role": "assistant", "content": None}, {"role": "assistant"}):
        msgs = [empty[0], assistant, empty[2]]
        r = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=2, temperature=0)
        assert r.choices[0].finish_reason == "length"
        assert r.usage.prompt_tokens == _count(server, empty) == _count(server, msgs)
    assert _count(server, [{"role": "user"}]) == _count(server, [{"role": "user", "content": ""}])


def test_request_chat_template_is_refused(server, client):
    """vLLM refuses a request's own chat_template unless started with --trust-request-chat-template; it was
    silently ignored (the reply came from another prompt than the one asked for)."""
    template = "{% for m in messages %}{{ m.content }}{% endfor %}"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2,
                                       extra_body={"chat_template": template})
    assert e.value.body["param"] == "chat_template"
    r = _post(server, "/tokenize", messages=MESSAGES, chat_template=template)
    assert r.status_code == 400 and r.json()["error"]["param"] == "chat_template"
    # null is leaving it out
    assert client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=1,
                                          extra_body={"chat_template": None}).choices


def test_echo_prepends_the_last_message(server, client):
    """vLLM's chat `echo`: the reply starts with the last message's text when that message has the reply's role
    (an assistant prefill; any role with add_generation_prompt false), streamed after the role chunks."""
    prefill = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "The colour is"}]
    cont = {"add_generation_prompt": False, "continue_final_message": True}
    plain = client.chat.completions.create(model=MODEL, messages=prefill, max_tokens=4, temperature=0, extra_body=cont)
    r = client.chat.completions.create(model=MODEL, messages=prefill, max_tokens=4, temperature=0,
                                       extra_body={**cont, "echo": True})
    want = "The colour is" + plain.choices[0].message.content
    assert r.choices[0].message.content == want
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (plain.usage.prompt_tokens, 4)
    chunks = list(client.chat.completions.create(model=MODEL, messages=prefill, max_tokens=4, temperature=0, n=2,
                                                 stream=True, extra_body={**cont, "echo": True}))
    heads = [(c.choices[0].index, c.choices[0].delta.role, c.choices[0].delta.content) for c in chunks[:4]]
    assert heads == [(0, "assistant", ""), (1, "assistant", ""), (0, None, "The colour is"), (1, None, "The colour is")]
    for i in range(2):
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices[0].index == i) == want
    # The reply's turn is the assistant's and the user spoke last: nothing echoed (as vLLM).
    a = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=3, temperature=0)
    b = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=3, temperature=0,
                                       extra_body={"echo": True})
    assert a.choices[0].message.content == b.choices[0].message.content
    # Without the generation prompt the reply goes on in the user's turn: that turn's text is echoed.
    c = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=3, temperature=0,
                                       extra_body={"echo": True, "add_generation_prompt": False})
    assert c.choices[0].message.content.startswith(MESSAGES[-1]["content"])


def test_top_logprobs_without_logprobs(server):
    """vLLM refuses top_logprobs > 0 without logprobs, but takes 0 (clients that send every field send it): that
    was a 400."""
    r = _post(server, "/v1/chat/completions", messages=MESSAGES, max_tokens=1, top_logprobs=0, logprobs=False)
    assert r.status_code == 200 and r.json()["choices"][0]["logprobs"] is None
    r = _post(server, "/v1/chat/completions", messages=MESSAGES, max_tokens=1, top_logprobs=1)
    assert r.status_code == 400 and r.json()["error"]["param"] == "top_logprobs"
    for bad in (-1, 21):
        r = _post(server, "/v1/chat/completions", messages=MESSAGES, max_tokens=1, logprobs=True, top_logprobs=bad)
        assert r.status_code == 400 and r.json()["error"]["param"] == "top_logprobs"


def test_logprobs_shape_and_text(client):
    """choices[].logprobs.content[]: token, logprob, bytes, top_logprobs (as many as asked, best first); the
    tokens' bytes are the content's, streamed or not."""
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=6, temperature=0, logprobs=True,
                                       top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == 6
    for t in content:
        assert len(t.top_logprobs) == 3 and t.logprob <= 0 and isinstance(t.bytes, list)
        assert [x.logprob for x in t.top_logprobs] == sorted((x.logprob for x in t.top_logprobs), reverse=True)
        assert t.logprob <= t.top_logprobs[0].logprob + 1e-5  # greedy: the sampled token is the best
    text = bytes(b for t in content for b in t.bytes).decode("utf-8", "replace")
    assert text == r.choices[0].message.content
    chunks = list(client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=6, temperature=0,
                                                 logprobs=True, top_logprobs=3, stream=True))
    streamed = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert [(t.token, t.bytes) for t in streamed] == [(t.token, t.bytes) for t in content]
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == r.choices[0].message.content
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2, logprobs=True)
    assert all(t.top_logprobs == [] for t in r.choices[0].logprobs.content)


def test_n_streamed_with_usage(server, client):
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=3, temperature=1.0, seed=7, n=2, stream=True,
        stream_options={"include_usage": True, "continuous_usage_stats": True}))
    body = [c for c in chunks if c.choices]
    assert [(c.choices[0].index, c.choices[0].delta.role) for c in body[:2]] == [(0, "assistant"), (1, "assistant")]
    finishes = [(c.choices[0].index, c.choices[0].finish_reason) for c in body if c.choices[0].finish_reason]
    assert sorted(finishes) == [(0, "length"), (1, "length")]
    assert all(c.usage is not None for c in body)  # continuous_usage_stats: the usage so far in each chunk
    last = chunks[-1]
    assert last.choices == [] and last.usage.completion_tokens == 6
    assert last.usage.prompt_tokens == _count(server, MESSAGES)
    assert last.usage.total_tokens == last.usage.prompt_tokens + 6
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=3, temperature=1.0, seed=7, n=2)
    for i in range(2):
        assert "".join(c.choices[0].delta.content or "" for c in body if c.choices[0].index == i) == \
            r.choices[i].message.content


def test_max_completion_tokens(server, client):
    """max_completion_tokens wins over max_tokens (vLLM: `max_completion_tokens or max_tokens`); one that does
    not fit beside the prompt is a 400 naming both numbers."""
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=10**6, max_completion_tokens=2,
                                       temperature=0)
    assert r.usage.completion_tokens == 2
    n = _count(server, MESSAGES)
    for field in ("max_tokens", "max_completion_tokens"):
        r = _post(server, "/v1/chat/completions", messages=MESSAGES, **{field: 4096 - n + 1})
        err = r.json()["error"]
        assert r.status_code == 400 and err["param"] == field and err["code"] == "context_length_exceeded"
        assert str(4096 - n + 1) in err["message"] and str(n) in err["message"] and "4096" in err["message"]
