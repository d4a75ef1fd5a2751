"""/v1/completions against vLLM's OpenAI server: an explicit `max_tokens: null` runs to the context, text_offset
indexes the returned text with skip_special_tokens off too, stream_options without include_usage asks for usage
(vLLM's default), and the prompt forms, n, echo and stop strings as vLLM answers them. A real uvicorn on loopback
over the tiny model with a 64-token context, driven by the openai client and raw httpx."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

import test_serve  # noqa: E402
import test_serve_audit  # noqa: E402
from test_serve import MODEL  # noqa: E402
from test_serve_audit import CONTEXT  # noqa: E402

llm = test_serve.llm  # the tiny model on the CPU (module-scoped fixture)
small = test_serve_audit.small  # (server, client) with a 64-token context (module-scoped fixture)


def _post(srv, body: dict) -> httpx.Response:
    return httpx.post(f"{srv.url}/v1/completions", json={"model": MODEL, "temperature": 0, **body}, timeout=60)


def _events(srv, body: dict) -> list:
    """A streamed request's events, decoded, and that it ends with exactly one [DONE]."""
    with httpx.stream("POST", f"{srv.url}/v1/completions", timeout=60,
                      json={"model": MODEL, "temperature": 0, "stream": True, **body}) as r:
        raw = r.read().decode()
    assert r.status_code == 200, raw
    events = [e for e in raw.split("\n\n") if e]
    assert events[-1] == "data: [DONE]" and raw.count("[DONE]") == 1, raw
    return [json.loads(e[len("data: "):]) for e in events[:-1]]


def test_null_max_tokens_runs_to_the_context(small, llm):
    """vLLM: "max_tokens": null (the openai client's max_tokens=None) generates up to the context; it was taken
    as unset (16): a 400 "max_tokens is too large: 16" for a prompt leaving less room, 16 tokens otherwise.
    Leaving the field out stays OpenAI's 16."""
    srv, client = small
    r = _post(srv, {"prompt": [5] * (CONTEXT - 1), "max_tokens": None})
    assert r.status_code == 200, r.text
    c = r.json()["choices"][0]
    assert c["finish_reason"] == "length" and r.json()["usage"]["completion_tokens"] == 1
    n_prompt = len(llm.tokenizer.encode("Hello"))
    r = client.completions.create(model=MODEL, prompt="Hello", max_tokens=None, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == CONTEXT - n_prompt and r.choices[0].finish_reason == "length"
    # each prompt of a batch to its own room, each of its n choices
    r = _post(srv, {"prompt": [[5, 6], [5] * 60], "max_tokens": None, "n": 2, "ignore_eos": True})
    assert r.status_code == 200, r.text
    assert [c["finish_reason"] for c in r.json()["choices"]] == ["length"] * 4
    assert r.json()["usage"]["completion_tokens"] == 2 * (CONTEXT - 2) + 2 * (CONTEXT - 60)
    chunks = list(client.completions.create(model=MODEL, prompt=[5] * 60, max_tokens=None, temperature=0,
                                            stream=True, stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True}))
    assert chunks[-1].usage.completion_tokens == CONTEXT - 60
    # Unset: 16, and a prompt that leaves less than that is still refused (vLLM's too).
    r = _post(srv, {"prompt": "Hello", "ignore_eos": True})
    assert r.json()["usage"]["completion_tokens"] == 16
    r = _post(srv, {"prompt": [5] * (CONTEXT - 1)})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
    # A prompt filling the context leaves nothing to generate: a 400, null or not.
    r = _post(srv, {"prompt": [5] * CONTEXT, "max_tokens": None})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"


def _shown(text: str, tokens: list[str], offsets: list[int]) -> None:
    """text_offset indexes `text`: in order, within it, and each token with text of its own found there."""
    assert offsets == sorted(offsets) and all(0 <= o <= len(text) for o in offsets), (text, tokens, offsets)
    plain = [(t, o) for t, o in zip(tokens, offsets)
             if "\ufffd" not in t and not (t.startswith("<") and t.endswith(">"))]
    assert plain and all(text[o:o + len(t)] == t for t, o in plain), (text, tokens, offsets)


@pytest.mark.parametrize("skip", [True, False])
def test_echo_text_offset_indexes_the_text(small, llm, skip):
    """echo with logprobs: text_offset points into the returned text with skip_special_tokens false too. The
    echoed prompt never shows its special tokens (a text prompt is echoed as sent, a token prompt decoded without
    them), but the offsets counted their text there (the BOS as 3 characters): every later offset was past its
    token."""
    srv, _ = small
    tok = llm.tokenizer
    ids = [tok.bos_token_id, 5, 6, tok.eos_token_id, 7]
    for prompt in ("Hello there", ids, [ids, [tok.bos_token_id, 8, 9]]):
        body = {"prompt": prompt, "max_tokens": 4, "echo": True, "logprobs": 0, "skip_special_tokens": skip,
                "ignore_eos": True}
        r = _post(srv, body)
        assert r.status_code == 200, r.text
        whole = r.json()["choices"]
        for c in whole:
            lp = c["logprobs"]
            assert lp["tokens"][0] == "<s>" and lp["text_offset"][:2] == [0, 0]
            _shown(c["text"], lp["tokens"], lp["text_offset"])
        streamed: dict = {}
        for ev in _events(srv, body):
            for c in ev["choices"]:
                s = streamed.setdefault(c["index"], {"text": "", "tokens": [], "offsets": []})
                s["text"] += c["text"]
                if c["logprobs"]:
                    s["tokens"] += c["logprobs"]["tokens"]
                    s["offsets"] += c["logprobs"]["text_offset"]
        for c in whole:
            s = streamed[c["index"]]
            assert (s["text"], s["tokens"], s["offsets"]) == (c["text"], c["logprobs"]["tokens"],
                                                              c["logprobs"]["text_offset"])


def test_stream_options_without_include_usage_asks_for_usage(small):
    """vLLM's stream_options.include_usage defaults to true: {"continuous_usage_stats": true} alone streams the
    usage in every chunk and the usage chunk at the end (it streamed none); include_usage false still none."""
    srv, client = small
    chunks = list(client.completions.create(model=MODEL, prompt="Hello", max_tokens=4, temperature=0, stream=True,
                                            stream_options={"continuous_usage_stats": True},
                                            extra_body={"ignore_eos": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 4
    assert all(c.usage is not None for c in chunks)
    events = _events(srv, {"prompt": "Hello", "max_tokens": 2, "stream_options": {}})
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 2
    events = _events(srv, {"prompt": "Hello", "max_tokens": 2, "stream_options": {"include_usage": False}})
    assert all(e["choices"] and e.get("usage") is None for e in events)


def test_prompt_forms_and_choice_indices(small):
    """vLLM's prompt forms: a string, strings, ids, lists of ids; choice i*n+j is prompt i's j-th, streamed or not,
    each choice finished once; empty and mixed prompts, suffix and best_of != n are 400s."""
    srv, _ = small
    body = {"prompt": ["Hi", "The sky"], "n": 2, "max_tokens": 3, "echo": True, "stop": ["\n"]}
    whole = _post(srv, body).json()
    assert [c["index"] for c in whole["choices"]] == [0, 1, 2, 3]
    assert [c["text"][:2] for c in whole["choices"]] == ["Hi", "Hi", "Th", "Th"]
    texts: dict = {}
    finished: dict = {}
    for ev in _events(srv, {**body, "stream_options": {"include_usage": True}}):
        for c in ev["choices"]:
            texts[c["index"]] = texts.get(c["index"], "") + c["text"]
            if c["finish_reason"] is not None:
                finished[c["index"]] = finished.get(c["index"], 0) + 1
    assert finished == {0: 1, 1: 1, 2: 1, 3: 1} and ev["choices"] == []
    counts = ("prompt_tokens", "completion_tokens", "total_tokens")
    assert [ev["usage"][k] for k in counts] == [whole["usage"][k] for k in counts]
    assert [texts[i] for i in range(4)] == [c["text"] for c in whole["choices"]]
    ids = _post(srv, {"prompt": [[5, 6], [7]], "max_tokens": 2}).json()
    assert len(ids["choices"]) == 2 and ids["usage"]["prompt_tokens"] == 3
    for bad, param in (([], "prompt"), ([[]], "prompt"), ([[5], []], "prompt"), (["a", [5]], "prompt"),
                       ([5, "a"], "prompt"), ([[5], "a"], "prompt")):
        r = _post(srv, {"prompt": bad, "max_tokens": 1})
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (bad, r.text)
    for extra, param in (({"suffix": "x"}, "suffix"), ({"best_of": 2}, "best_of")):
        r = _post(srv, {"prompt": "Hi", "max_tokens": 1, **extra})
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_stop_strings_streamed_and_stop_reason(small, llm):
    """A stop string spanning tokens: the streamed text is the unstreamed one (nothing of the stop string sent
    before it is known), include_stop_str_in_output keeps it; stop_token_ids end with that id as stop_reason
    and min_tokens holds them off."""
    srv, _ = small
    free = _post(srv, {"prompt": "Hello", "max_tokens": 12, "ignore_eos": True, "logprobs": 0,
                       "return_tokens_as_token_ids": True}).json()["choices"][0]
    text = free["text"]
    toks = [int(t.split(":")[1]) for t in free["logprobs"]["tokens"]]
    pieces = [llm.tokenizer.decode([t]) for t in toks]
    cut = len(pieces[0]) + len(pieces[1])  # a stop string from the end of token 2 into token 3
    stop = text[cut - 1:cut + 2]
    assert len(stop) == 3 and text.find(stop) == cut - 1
    for inc in (False, True):
        body = {"prompt": "Hello", "max_tokens": 12, "ignore_eos": True, "stop": [stop],
                "include_stop_str_in_output": inc}
        c = _post(srv, body).json()["choices"][0]
        want = text[:cut - 1] + (stop if inc else "")
        assert (c["text"], c["finish_reason"], c["stop_reason"]) == (want, "stop", stop)
        events = _events(srv, body)
        assert "".join(e["choices"][0]["text"] for e in events) == want
        assert (events[-1]["choices"][0]["finish_reason"], events[-1]["choices"][0]["stop_reason"]) == ("stop", stop)
    c = _post(srv, {"prompt": "Hello", "max_tokens": 12, "stop_token_ids": [toks[2]]}).json()["choices"][0]
    assert (c["finish_reason"], c["stop_reason"]) == ("stop", toks[2]) and c["text"] == text[:cut]
    c = _post(srv, {"prompt": "Hello", "max_tokens": 12, "stop_token_ids": [toks[2]], "min_tokens": 12,
                    "ignore_eos": True}).json()
    assert c["choices"][0]["finish_reason"] == "length" and c["usage"]["completion_tokens"] == 12


def test_truncate_prompt_tokens_minus_one_keeps_what_the_context_serves(small, llm):
    """vLLM's truncate_prompt_tokens -1: a prompt longer than the context keeps its last context - 1 tokens (the
    same rule as the offline SamplingParams); 0 is a 400 naming the field."""
    srv, _ = small
    ids = [(7 * i) % 900 + 20 for i in range(100)]
    r = _post(srv, {"prompt": ids, "max_tokens": 1, "truncate_prompt_tokens": -1, "ignore_eos": True})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] == CONTEXT - 1
    same = _post(srv, {"prompt": ids[-(CONTEXT - 1):], "max_tokens": 1, "ignore_eos": True})
    assert r.json()["choices"][0]["text"] == same.json()["choices"][0]["text"]
    r = _post(srv, {"prompt": ids, "max_tokens": 1, "truncate_prompt_tokens": 0})
    assert r.status_code == 400 and r.json()["error"]["param"] == "truncate_prompt_tokens"
