"""Seeded randomized robustness test of the HTTP API: valid bodies for every POST route, mutated (fields dropped,
wrong types, NaN, huge ints, surrogates, bad schemas, unknown tools, ...) or replaced by what is not a JSON object,
sent raw. Whatever comes in: never a 5xx; every 4xx carries OpenAI's error body naming the offending field; every
200 is a well-formed answer or SSE stream; and afterwards the server answers as before with nothing left running.

A failure names the seed and request index; the bodies are a pure function of those (random.Random(seed)).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import logging
import math
import random
import re
import time
from dataclasses import dataclass, field
from typing import Any

import pydantic
import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

import openai.types.responses  # noqa: E402, F811
import test_serve  # noqa: E402
from test_serve import MESSAGES, MODEL, TOOLS, _Server  # noqa: E402

from cpm4.serve import AsyncEngine, create_app  # noqa: E402

llm = test_serve.llm  # the tiny model on the CPU (module-scoped fixture)

SEEDS = (0, 1, 2, 3, 4)
REQUESTS_PER_SEED = 250
CONTEXT = 512  # room for TOOLS (~200 tokens) and 8 new ones; LONG is far past it
NAN, INF = float("nan"), float("inf")
LONG = "lorem ipsum " * 4000  # ~48k characters
SURROGATE = "\ud800"  # a lone surrogate: json.dumps writes it as the escape \ud800, which json.loads takes back
NAMED = {"type": "function", "function": {"name": "get_weather"}}
FLAT_TOOLS = [{"type": "function", **TOOLS[0]["function"]}]  # the Responses API's tool shape
GRAMMAR_FIELDS = {"response_format", "guided_json", "guided_regex", "guided_choice", "guided_grammar",
                  "structured_outputs", "min_tokens", "tool_choice", "tools", "text"}

# Values of every JSON kind, and the edges of each: what a sloppy or hostile client sends.
WEIRD: list[Any] = ["", "x", "0.5", "true", [], [1, "a"], [[]], {}, {"a": {"b": [None, {}]}}, True, False,
                    2**70, -(2**70), -1, 0, 1, 1.5, -0.5, NAN, INF, -INF, 1e308, 5e-324, LONG,
                    "é😀\u202e\u0000<|im_end|>", SURROGATE, [SURROGATE], {"k": NAN}, [NAN], [2**70], {"1": [2]}]

# Top-level fields of each route and their JSON kinds ("int|str": either); a value of no listed kind must be a 400.
_SAMPLING = dict(model="str", temperature="num", top_p="num", top_k="int", min_p="num", repetition_penalty="num",
                 seed="int", stop="str|list", stop_token_ids="list", ignore_eos="bool", min_tokens="int",
                 include_stop_str_in_output="bool", n="int", stream="bool", stream_options="obj",
                 presence_penalty="num", frequency_penalty="num", logit_bias="obj", user="str", response_format="obj",
                 guided_json="obj|str", guided_regex="str", guided_choice="list", guided_grammar="str",
                 structured_outputs="obj", allowed_token_ids="list", skip_special_tokens="bool",
                 truncate_prompt_tokens="int", bad_words="list")
_TEMPLATE = dict(tools="list", chat_template_kwargs="obj", add_generation_prompt="bool", continue_final_message="bool")
FIELDS = {
    "/v1/completions": {**_SAMPLING, "prompt": "str|list", "max_tokens": "int", "logprobs": "int", "echo": "bool",
                        "suffix": "str", "best_of": "int", "return_tokens_as_token_ids": "bool"},
    "/v1/chat/completions": {**_SAMPLING, **_TEMPLATE, "messages": "list", "max_tokens": "int",
                             "max_completion_tokens": "int", "logprobs": "bool", "top_logprobs": "int",
                             "tool_choice": "str|obj", "parallel_tool_calls": "bool",
                             "return_tokens_as_token_ids": "bool"},
    "/v1/responses": dict(model="str", input="str|list", instructions="str", max_output_tokens="int",
                          temperature="num", top_p="num", top_logprobs="int", tools="list", tool_choice="str|obj",
                          parallel_tool_calls="bool", text="obj", stream="bool", previous_response_id="str",
                          metadata="obj", store="bool", user="str", seed="int", ignore_eos="bool",
                          include="list", background="bool"),
    "/tokenize": {**_TEMPLATE, "model": "str", "prompt": "str", "messages": "list"},
    "/detokenize": dict(model="str", tokens="list"),
}
REQUIRED = {"/v1/completions": {"prompt"}, "/v1/chat/completions": {"messages"}, "/v1/responses": {"input"},
            "/tokenize": set(), "/detokenize": {"tokens"}}
# A change to one field can make the request fail on another (a cross-field rule, or a longer prompt leaving
# max_tokens no room): an error may name these instead.
RELATED = {"stream": {"stream_options"}, "logprobs": {"top_logprobs"}, "top_logprobs": {"logprobs"},
           "add_generation_prompt": {"continue_final_message"},
           "messages": {"continue_final_message", "max_tokens", "max_completion_tokens", "prompt"},
           "prompt": {"max_tokens", "n", "messages"}, "n": {"prompt", "best_of"}, "best_of": {"n"},
           "max_tokens": {"min_tokens"}, "max_completion_tokens": {"min_tokens"},
           "input": {"max_output_tokens"}, "instructions": {"input", "max_output_tokens"},
           "tools": {"messages", "input"}, "chat_template_kwargs": {"messages"},
           "continue_final_message": {"messages", "add_generation_prompt"}, "stream_options": {"stream"}}
for _f in GRAMMAR_FIELDS:
    RELATED.setdefault(_f, set()).update(GRAMMAR_FIELDS)


def _weird(rng: random.Random) -> Any:
    return copy.deepcopy(rng.choice(WEIRD))  # a copy: a later mutation inside it must not change WEIRD


def _is(kind: str, v: Any) -> bool:
    if kind == "int":
        return type(v) is int
    if kind == "num":  # JSON's NaN / Infinity are no numbers here (allow_inf_nan=False)
        return type(v) in (int, float) and math.isfinite(v)
    return isinstance(v, {"bool": bool, "str": str, "obj": dict, "list": list}[kind])


def _type_ok(kind: str, v: Any) -> bool:
    return any(_is(k, v) for k in kind.split("|"))


# ---------------------------------------------------------------------------------------------------------
# Valid bodies, and random (mostly broken) JSON schemas


def _rand_schema(rng: random.Random, depth: int = 0) -> Any:
    """A JSON schema, often broken: keywords with values of the wrong kind, unknown types, deep nesting."""
    if depth > 2 or rng.random() < 0.1:
        return rng.choice([True, False, 5, "string", None, [], {}])
    s: dict[str, Any] = {}
    if rng.random() < 0.8:
        s["type"] = rng.choice(["object", "string", "integer", "number", "array", "boolean", "null",
                                ["string", "null"], "strin", 5, [], {"a": 1}])
    keys = ["properties", "required", "items", "enum", "const", "minLength", "maxLength", "pattern", "format",
            "minimum", "maximum", "multipleOf", "additionalProperties", "anyOf", "$ref", "minItems", "not",
            "uniqueItems", "prefixItems", "propertyNames", "patternProperties", "$defs", "description"]
    for k in rng.sample(keys, rng.randint(0, 3)):
        if k in ("properties", "patternProperties", "$defs") and rng.random() < 0.7:
            s[k] = {rng.choice(["a", "b", "^x", "(", ""]): _rand_schema(rng, depth + 1)}
        elif k in ("items", "additionalProperties", "not", "propertyNames") and rng.random() < 0.7:
            s[k] = _rand_schema(rng, depth + 1)
        elif k in ("anyOf", "prefixItems") and rng.random() < 0.7:
            s[k] = [_rand_schema(rng, depth + 1) for _ in range(rng.randint(0, 2))]
        else:
            s[k] = rng.choice([1, 3, 0, "a+", "(", "email", "iri", ["a"], ["a", 1], "#/nope", "#", {"a": 1}, True,
                               _weird(rng), _weird(rng)])
    return s


def _valid_messages(rng: random.Random) -> tuple[list[dict], dict[str, Any]]:
    """A conversation the chat template renders, and the fields it needs."""
    call = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    choices: list[tuple[list[dict], dict[str, Any]]] = [
        (MESSAGES, {}),
        ([{"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "there"}]}], {}),
        ([{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "é😀 <|im_start|>"}], {}),
        ([{"role": "user", "content": "Weather?"}, {"role": "assistant", "content": None, "tool_calls": [call]},
          {"role": "tool", "tool_call_id": "c1", "content": "sunny"}], {"tools": TOOLS}),
        ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
         {"continue_final_message": True, "add_generation_prompt": False}),
    ]
    msgs, extra = rng.choice(choices)
    return json.loads(json.dumps(msgs)), dict(extra)


def _grammar(rng: random.Random) -> dict[str, Any]:
    return rng.choice([{"response_format": {"type": "json_object"}},
                       {"response_format": {"type": "json_schema", "json_schema": {
                           "name": "a", "schema": {"type": "object", "properties": {"a": {"type": "integer"}}}}}},
                       {"guided_choice": ["yes", "no"]}, {"guided_regex": "[a-z]{1,4}"},
                       {"guided_json": {"type": "array", "items": {"type": "boolean"}}},
                       {"guided_grammar": 'root ::= "a" | "b"'}, {"structured_outputs": {"choice": ["x", "y"]}}])


def _sampling_options(rng: random.Random, max_tokens: int) -> dict[str, Any]:
    opts = {
        "temperature": rng.choice([0, 0.7, 1.3]), "top_p": rng.choice([0.5, 1]), "top_k": rng.choice([-1, 0, 5]),
        "min_p": 0.1, "repetition_penalty": rng.choice([0.8, 1.2]), "seed": rng.choice([0, 7, 2**63 - 1, -(2**63)]),
        "stop": rng.choice(["\n", ["a", "the"]]), "stop_token_ids": [2, 3], "ignore_eos": True,
        "n": rng.randint(1, 3), "presence_penalty": 0.5, "frequency_penalty": -0.5,
        "logit_bias": {"5": 2.0, "7": -100}, "user": "u1", "skip_special_tokens": False,
        "include_stop_str_in_output": True, "return_tokens_as_token_ids": True, "bad_words": ["the"],
        "allowed_token_ids": list(range(5, 200)), "min_tokens": rng.randint(0, max_tokens),
    }
    out = {k: opts[k] for k in rng.sample(sorted(opts), rng.randint(0, 4))}
    if rng.random() < 0.25 and not out.get("min_tokens"):
        out.update(_grammar(rng))
    if rng.random() < 0.3:
        out["stream"] = True
        if rng.random() < 0.5:
            out["stream_options"] = {"include_usage": True, "continuous_usage_stats": rng.random() < 0.5}
    return out


def _valid(rng: random.Random, path: str) -> dict[str, Any]:
    if path == "/v1/completions":
        mt = rng.randint(1, 8)
        body = {"model": MODEL, "max_tokens": mt, **_sampling_options(rng, mt),
                "prompt": rng.choice(["Hello", ["Hi", "Yo"], [1, 50, 60], [[1, 70], [1, 80, 81]], "é😀 <|im_end|>"])}
        extra = {"logprobs": rng.randint(0, 3), "echo": True, "truncate_prompt_tokens": 2,
                 "best_of": body.get("n", 1), "suffix": ""}
        body.update({k: extra[k] for k in rng.sample(sorted(extra), rng.randint(0, 2))})
        return body
    if path == "/v1/chat/completions":
        mt = rng.randint(1, 8)
        msgs, extra = _valid_messages(rng)
        body = {"model": MODEL, "messages": msgs, rng.choice(["max_tokens", "max_completion_tokens"]): mt,
                **extra, **_sampling_options(rng, mt)}
        if rng.random() < 0.3:
            body["logprobs"] = True
            body["top_logprobs"] = rng.randint(0, 3)
        if rng.random() < 0.3 and not GRAMMAR_FIELDS & body.keys():
            body.update(tools=TOOLS, tool_choice=rng.choice(["auto", "none", "required", NAMED]),
                        parallel_tool_calls=rng.random() < 0.5)
        if rng.random() < 0.1:
            body["chat_template_kwargs"] = {"enable_thinking": False}
        return body
    if path == "/v1/responses":
        call = [{"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": '{"city": "Paris"}'},
                {"type": "function_call_output", "call_id": "c1", "output": "sunny"}]
        body = {"model": MODEL, "max_output_tokens": rng.randint(1, 8),
                "input": rng.choice(["Hi", [{"role": "user", "content": "Hi"}],
                                     [{"type": "message", "role": "user",
                                       "content": [{"type": "input_text", "text": "Hi"}]}],
                                     [{"role": "user", "content": "Weather?"}, *call]])}
        opts = {"instructions": "Be brief.", "temperature": 0, "top_p": 0.9, "top_logprobs": 2, "stream": True,
                "metadata": {"k": "v"}, "store": False, "user": "u", "seed": 3, "ignore_eos": True,
                "parallel_tool_calls": False,
                "text": rng.choice([{"format": {"type": "json_object"}}, {"format": {"type": "text"}}]),
                "tools": FLAT_TOOLS, "include": ["message.output_text.logprobs"]}
        body.update({k: opts[k] for k in rng.sample(sorted(opts), rng.randint(0, 4))})
        if "tools" in body and "text" not in body and rng.random() < 0.5:
            body["tool_choice"] = rng.choice(["auto", "required", {"type": "function", "name": "get_weather"}])
        return body
    if path == "/tokenize":
        if rng.random() < 0.5:
            return {"model": MODEL, "prompt": rng.choice(["Hello", "", "é😀 <|im_end|>"])}
        msgs, extra = _valid_messages(rng)
        return {"model": MODEL, "messages": msgs, **extra}
    return {"model": MODEL, "tokens": rng.choice([[1, 5, 6], [], [1023, 0]])}


# ---------------------------------------------------------------------------------------------------------
# Mutations: each returns the top-level fields it touched and what the answer must be ("fail": a 4xx, "ok": a
# 200, "any": either, as long as it is well-formed)


def _semantic(rng: random.Random, path: str, body: dict[str, Any]) -> tuple[str, Any, str]:
    """A value that is the right JSON kind but wrong (or odd) for the field: (field, value, expectation)."""
    msgs = [
        ([{"role": "robot", "content": "hi"}], "fail"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x"}}]}], "fail"),
        ([{"role": "user", "content": [{"type": "text"}]}], "fail"),
        ([{"role": "user", "content": {"text": "hi"}}], "fail"),
        ([], "fail"), (["hi"], "fail"), ([{"content": "hi"}], "fail"),
        ([{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": [1]}}]}], "fail"),
        ([{"role": "assistant", "tool_calls": [{"function": {"arguments": "{}"}}]}], "fail"),
        ([{"role": "user", "content": "hi", "name": 5}], "fail"),
        ([{"role": "user", "content": LONG}], "fail"),  # (not on /tokenize: see per_path)
        ([{"role": "user"}], "any"), ([{"role": "tool", "content": "x"}], "fail"),  # no tool_call_id
        ([{"role": "user", "content": []}], "fail"), ([{"role": "tool", "tool_call_id": "c", "content": "x"}], "any"),
        ([{"role": "user", "content": SURROGATE}], "any"),
        ([{"role": "user", "content": "hi"}] * 300, "any"),
        ([{"role": "user", "content": "<|im_start|>system\nx<|im_end|>", "extra": {"k": NAN}}], "fail"),  # not JSON
    ]
    schema = _rand_schema(rng)
    tools = [
        ([{"type": "function", "function": {"name": "get_weather", "parameters": schema}}], "any"),
        ([{"type": "retrieval"}], "fail"), ([{"function": {}}], "fail"),
        ([{"type": "function", "function": {"name": "f", "parameters": [1]}}], "fail"),
        ([{"type": "function", "function": {"name": SURROGATE}}], "fail"), ([], "any"),  # OpenAI's name rule
        ([TOOLS[0], TOOLS[0]], "fail"),  # names must be unique
    ]
    rf = [({"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}, "any"), ({"type": "xml"}, "fail"),
          ({"type": "json_schema"}, "fail"), ({"type": "json_schema", "json_schema": {"schema": 5}}, "fail"),
          ({"json_schema": {}}, "fail"), ({"type": "json_object"}, "any"), ({"type": 5}, "fail")]
    common = {
        "logit_bias": [({"abc": 1}, "fail"), ({"1.5": 2}, "fail"), ({"-1": 1}, "fail"), ({str(2**70): 1}, "fail"),
                       ({"1": 1000}, "fail"), ({"1": NAN}, "fail"), ({"1": "x"}, "fail"), ({"": 1}, "fail"),
                       ({"1023": -100}, "ok"), ({"1024": 1}, "fail"), ({SURROGATE: 1}, "fail")],
        "stop": [([""], "fail"), (["a", 5], "fail"), (["x"] * 2000, "ok"), ([LONG], "ok"), ([SURROGATE], "fail"),
                 (SURROGATE, "fail")],
        "bad_words": [([""], "fail"), ([" "], "fail"), ([LONG], "any"), ([SURROGATE], "any"), ([], "any")],
        "stop_token_ids": [([2**70], "any"), ([-1], "fail"), ([1.0], "fail"), ([], "ok"), ([10**9], "any")],
        "allowed_token_ids": [([], "any"), ([10**9], "fail"), ([-1], "fail"), ([2**70], "fail"), ([3], "any")],
        "n": [(3, "any"), (64, "any"), (65, "fail"), (0, "fail"), (2**70, "fail")],
        "seed": [(2**63, "fail"), (-(2**63) - 1, "fail"), (2**63 - 1, "any")],
        "temperature": [(1e308, "any"), (5e-324, "any"), (-1e-9, "fail")],
        "top_p": [(5e-324, "any"), (0, "fail"), (1.0000001, "fail")],
        "top_k": [(2**70, "any"), (-2, "fail"), (10**6, "any")],
        "repetition_penalty": [(5e-324, "any"), (1e308, "any"), (0, "fail")],
        "min_tokens": [(2**70, "fail"), (9, "any"), (-1, "fail")],
        "truncate_prompt_tokens": [(0, "fail"), (2**70, "any"), (1, "any")],
        "response_format": rf,
        "guided_json": [(schema, "any"), ("not json", "fail"), ("[1]", "fail"), (json.dumps(schema), "any")],
        "guided_regex": [("(", "fail"), ("x{2,1}", "fail"), ("", "fail"), (SURROGATE, "fail"), ("a|b", "any")],
        "guided_choice": [([], "fail"), ([""], "fail"), ([SURROGATE], "any"), (["a"] * 500, "any")],
        "guided_grammar": [("root ::= ", "fail"), ("nonsense", "fail"), ('root ::= "x"', "any")],
        "structured_outputs": [({"json": {"type": "string"}, "regex": "a"}, "fail"), ({"choice": []}, "fail"),
                               ({}, "any"), ({"json_object": True}, "any"), ({"structural_tag": "x"}, "fail")],
        "stream_options": [({"include_usage": "yes"}, "fail"), ({}, "any"),
                           ({"continuous_usage_stats": True}, "any")],
        "model": [("gpt-17", "fail"), (SURROGATE, "fail"), (LONG, "fail"), ("", "fail")],
    }
    per_path: dict[str, dict[str, list[tuple[Any, str]]]] = {
        "/v1/completions": {**common,
                            "prompt": [([], "fail"), ([[]], "fail"), ([1, 2**70], "fail"), ([-1], "fail"),
                                       ([1.5], "fail"), ([[1], "a"], "fail"), (["a", 1], "fail"), ("", "any"),
                                       ([""], "any"), ([1024], "fail"), (LONG, "fail"), (["a"] * 300, "fail"),
                                       (SURROGATE, "fail"), ([SURROGATE], "fail"), ([[1]] * 3, "any")],
                            "max_tokens": [(0, "any"), (-1, "fail"), (2**70, "fail"), (CONTEXT, "fail")],
                            "logprobs": [(21, "fail"), (-1, "fail"), (20, "any")],
                            "suffix": [("x", "fail")], "best_of": [(5, "fail"), (0, "fail")],
                            "echo": [(True, "any")]},
        "/v1/chat/completions": {**common, "messages": msgs, "tools": tools,
                                 "tool_choice": [("sometimes", "fail"),
                                                 ({"type": "function", "function": {"name": "nope"}}, "fail"),
                                                 ({"type": "function", "function": {}}, "fail"),
                                                 ({"type": "function", "function": {"name": 5}}, "fail"),
                                                 ({"type": "function"}, "fail"),
                                                 ({"type": "tool", "function": {"name": "get_weather"}}, "fail"),
                                                 ("required", "any"), (NAMED, "any")],
                                 # max_completion_tokens, when given, is the limit and max_tokens is not checked
                                 "max_tokens": [(0, "fail"), (2**70, "any"), (CONTEXT, "any")],
                                 "max_completion_tokens": [(0, "fail"), (2**70, "fail")],
                                 "top_logprobs": [(21, "fail"), (-1, "fail"), (5, "any")],
                                 "chat_template_kwargs": [({"messages": []}, "fail"), ({"tokenize": True}, "fail"),
                                                          ({"enable_thinking": NAN}, "any"),
                                                          ({"x": [SURROGATE]}, "any"), ({"bos_token": 5}, "any")],
                                 "continue_final_message": [(True, "any")]},
        "/v1/responses": {
            # [] is a 400 unless instructions give the conversation a message
            "input": [([], "any"), ([{"type": "message", "role": "tool", "content": "x"}], "fail"),
                      ([{"type": "image"}], "fail"), ([{"role": "user", "content": [{"type": "input_image"}]}], "fail"),
                      ([{"type": "function_call"}], "fail"),
                      ([{"type": "function_call_output", "call_id": "c", "output": {"x": NAN}}], "any"),
                      ([{"type": "function_call_output", "output": "x"}], "fail"),  # no call_id
                      ([{"role": "user", "content": 5}], "fail"), ([{"type": ["x"]}], "fail"),
                      ([{"type": "reasoning"}], "any"), (LONG, "fail"), (SURROGATE, "any"),
                      ([{"type": "function_call", "name": 5, "call_id": 7}], "fail")],
            "text": [({"format": "json"}, "fail"), ({"format": {"type": "json_schema", "schema": schema}}, "any"),
                     ({"format": {"type": "grammar"}}, "fail"), ({"format": {"type": "json_schema"}}, "fail"),
                     ({"verbosity": NAN}, "any"), ({"format": {}}, "fail"), ({"verbosity": "loud"}, "fail"),
                     ({"format": {"type": "json_schema", "name": "x", "schema": schema}, "verbosity": "low"}, "any")],
            "tools": [([{"type": "web_search"}], "fail"), ([{"type": "function"}], "fail"),
                      ([{"type": "function", "name": "f", "parameters": schema}], "any"), ([5], "fail")],
            "tool_choice": [({"type": "function", "name": "nope"}, "fail"), ({"type": "function"}, "fail"),
                            ("sometimes", "fail"), ("required", "any")],
            "metadata": [({"k": NAN}, "any"), ({"k": SURROGATE}, "any"), ({"k": 2**70}, "any")],
            "instructions": [(SURROGATE, "any"), (LONG, "fail")],
            "user": [(SURROGATE, "any")],
            "previous_response_id": [("resp_1", "fail")], "background": [(True, "fail"), (False, "any")],
            "max_output_tokens": [(0, "fail"), (2**70, "fail"), (CONTEXT, "fail")],
            "top_logprobs": [(21, "fail"), (20, "any")], "seed": [(2**70, "fail"), (-(2**70), "fail")],
            "include": [(["message.output_text.logprobs", "code_interpreter_call.outputs"], "any"), (["x"], "fail"),
                        ([5], "fail"), ("message.output_text.logprobs", "fail"), ([SURROGATE], "fail")],
            "model": common["model"]},
        # /tokenize never refuses for length: its count against max_model_len is what a client checks
        "/tokenize": {"prompt": [(SURROGATE, "any"), (LONG, "any"), ("", "any")],
                      "messages": [(m, "any") if m == [{"role": "user", "content": LONG}] else (m, e) for m, e in msgs],
                      "tools": tools, "model": common["model"],
                      "chat_template_kwargs": [({"return_dict": True}, "any"), ({"x": NAN}, "any")]},
        "/detokenize": {"tokens": [([-1], "fail"), ([2**70], "fail"), ([1.5], "fail"), (["a"], "fail"),
                                   ([1024], "fail"), ([[1]], "fail"), (list(range(1000)), "any")],
                        "model": common["model"]},
    }
    options = per_path[path]
    key = rng.choice(sorted(options))
    value, expect = rng.choice(options[key])
    return key, json.loads(json.dumps(value)), expect


def _mutate(rng: random.Random, path: str, body: dict[str, Any]) -> tuple[set[str], str]:
    """Apply one mutation in place; (fields touched, expectation)."""
    fields = FIELDS[path]
    present = sorted(body)
    kind = rng.choices(["drop", "null", "weird", "extra", "nested", "semantic"], [1, 1, 3, 1, 2, 4])[0]
    if kind in ("drop", "null") and present:
        key = rng.choice(present)
        if kind == "drop":
            del body[key]
        else:
            body[key] = None  # the same as leaving it out
        return {key}, "fail" if key in REQUIRED[path] else "any"
    if kind == "weird":
        key = rng.choice(sorted(fields))
        value = _weird(rng)
        body[key] = value
        if not _type_ok(fields[key], value):
            return {key}, "fail"
        if key == "model" or (key == "previous_response_id") or (key == "suffix" and value):
            return {key}, "fail"
        return {key}, "any"
    if kind == "extra":
        body[rng.choice(["x_future", "", SURROGATE, "Temperature", "max-tokens", "💥"])] = _weird(rng)
        return set(), "ok"
    if kind == "nested":
        paths = [p for p in _paths(body) if len(p) > 1]
        if paths:
            p = rng.choice(paths)
            parent = body
            for k in p[:-1]:
                parent = parent[k]
            if isinstance(parent, dict) and rng.random() < 0.3:
                del parent[p[-1]]
            else:
                parent[p[-1]] = _weird(rng)
            return {p[0]}, "any"
    key, value, expect = _semantic(rng, path, body)
    body[key] = value
    if expect == "ok" and body.get("continue_final_message") is True:
        expect = "any"  # the new messages may not end with the assistant message it needs
    return {key}, expect


def _paths(x: Any, path: tuple = ()) -> list[tuple]:
    """The path of every value inside a body."""
    items = x.items() if isinstance(x, dict) else enumerate(x) if isinstance(x, list) else ()
    return [q for k, v in items for q in ((*path, k), *_paths(v, (*path, k)))]


# Bodies that are no JSON, no JSON object, or an object without the required fields: each a 400.
_RAW_BODIES = [b"", b"not json", b"{", b'{"prompt": "x",}', b"\xff\xfe\x00{", b"null", b"[]", b'"str"', b"42",
               b"[{}]", b"NaN", b"{}", b'{"a": ' + b"[" * 5000 + b"]" * 5000 + b"}"]
_CONTENT_TYPES = ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
                  "application/xml", "", "application/json; charset=latin-1"]


@dataclass
class Case:
    path: str
    raw: bytes
    headers: dict[str, str]
    expect: str  # "ok", "fail" or "any"
    fields: set[str] = field(default_factory=set)  # the top-level fields mutated
    body: dict[str, Any] | None = None  # the parsed body, when it is one


def _case(rng: random.Random) -> Case:
    # Mostly the generating routes: they have the most fields and the most code behind them.
    path = rng.choices(sorted(FIELDS), [1, 1, 3, 3, 2])[0]  # detokenize, tokenize, chat, completions, responses
    headers = {"content-type": "application/json"}
    if rng.random() < 0.1:
        headers["content-type"] = rng.choice(_CONTENT_TYPES)  # read as JSON whatever it says
    if rng.random() < 0.05:
        return Case(path, rng.choice(_RAW_BODIES), headers, "fail", {"body"})
    body = json.loads(json.dumps(_valid(rng, path)))  # a copy: mutations must not reach MESSAGES, TOOLS, ...
    expects: dict[str, str] = {}  # by field: a later mutation of the same field replaces the earlier one
    for j in range(rng.choice([0, 1, 1, 1, 2])):
        touched, e = _mutate(rng, path, body)
        expects[next(iter(touched), f"extra{j}")] = e
    fields = {f for f in expects if not f.startswith("extra")}
    if type(body.get("truncate_prompt_tokens")) is int:  # a prompt too long may be cut to fit
        expects.update({f: "any" for f in ("prompt", "messages") if expects.get(f) == "fail"})
    if path == "/tokenize" and (body.get("prompt") is None) == (body.get("messages") is None):
        expects["prompt"] = "fail"  # it takes exactly one of them
    expect = "fail" if "fail" in expects.values() else "any" if "any" in expects.values() else "ok"
    raw = json.dumps(body).encode()  # ensure_ascii: surrogates as \ud800 escapes; NaN / Infinity as bare tokens
    if rng.random() < 0.03:
        raw = b"\xef\xbb\xbf" + raw  # a UTF-8 BOM, which json.loads(bytes) skips
    return Case(path, raw, headers, expect, fields, body)


# ---------------------------------------------------------------------------------------------------------
# Checking the answers


def _strict_json(text: str) -> Any:
    """JSON as a client parses it: NaN and Infinity are not JSON."""
    def bad(c: str) -> Any:
        raise ValueError(f"non-standard JSON constant {c}")
    return json.loads(text, parse_constant=bad)


def _n_choices(case: Case) -> int:
    body = case.body or {}
    n = body.get("n")
    n = n if type(n) is int else 1
    if case.path == "/v1/completions":
        p = body.get("prompt")
        if isinstance(p, list) and p and not isinstance(p[0], int):
            return n * len(p)
    return n


def _check_usage(u: Any) -> None:
    assert isinstance(u, dict) and all(type(u[k]) is int and u[k] >= 0
                                       for k in ("prompt_tokens", "completion_tokens", "total_tokens")), u
    assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"], u


def _check_ok(case: Case, r: httpx.Response) -> None:
    """A 200 is a well-formed answer of its route."""
    body = case.body or {}
    stream = body.get("stream") is True and case.path.startswith("/v1/")
    if stream:
        assert r.headers["content-type"].startswith("text/event-stream"), r.headers["content-type"]
        (_check_responses_stream if case.path == "/v1/responses" else _check_sse)(case, r.text)
        return
    assert r.headers["content-type"] == "application/json", r.headers["content-type"]
    out = _strict_json(r.text)
    if case.path == "/tokenize":
        assert all(type(t) is int for t in out["tokens"]) and out["count"] == len(out["tokens"]), out
        return
    if case.path == "/detokenize":
        assert isinstance(out["prompt"], str), out
        return
    if case.path == "/v1/responses":
        _check_response_object(case, out)
        return
    n = _n_choices(case)
    chat = case.path == "/v1/chat/completions"
    assert out["object"] == ("chat.completion" if chat else "text_completion"), out
    if chat:  # as the client's own types read it (the legacy Completion type is narrower than the API: no null
        # finish_reason in a streamed chunk, no null logprob for an echoed first token, both of which OpenAI sends)
        openai.types.chat.ChatCompletion.model_validate(out)
    assert [c["index"] for c in out["choices"]] == list(range(n)), out
    for c in out["choices"]:
        assert c["finish_reason"] in (("stop", "length", "tool_calls") if chat else ("stop", "length")), c
        if chat:
            m = c["message"]
            assert m["role"] == "assistant" and (m["content"] is None or isinstance(m["content"], str)), m
            assert m["content"] is not None or m.get("tool_calls"), m
        else:
            assert isinstance(c["text"], str), c
    _check_usage(out["usage"])


def _check_sse(case: Case, text: str) -> None:
    """Chat / completion SSE: JSON chunks, one finish_reason per choice, the usage chunk when asked, [DONE] last."""
    assert text.endswith("data: [DONE]\n\n"), text[-300:]
    events = text.split("\n\n")[:-1]
    assert all(e.startswith("data: ") for e in events), events[:3]
    chunks = [_strict_json(e[6:]) for e in events[:-1]]
    assert not any("error" in c for c in chunks), [c for c in chunks if "error" in c]
    n = _n_choices(case)
    finished: dict[int, int] = {}
    for c in chunks:
        chat = case.path.endswith("chat/completions")
        assert c["object"] == ("chat.completion.chunk" if chat else "text_completion"), c
        if chat:
            openai.types.chat.ChatCompletionChunk.model_validate(c)
        for ch in c["choices"]:
            assert 0 <= ch["index"] < n, c
            if ch["finish_reason"] is not None:
                finished[ch["index"]] = finished.get(ch["index"], 0) + 1
    assert finished == dict.fromkeys(range(n), 1), finished
    opts = (case.body or {}).get("stream_options")
    if isinstance(opts, dict) and opts.get("include_usage") is True:
        assert chunks[-1]["choices"] == [], chunks[-1]
        _check_usage(chunks[-1]["usage"])


def _logprobs_asked(case: Case) -> bool:
    include = (case.body or {}).get("include")
    return isinstance(include, list) and "message.output_text.logprobs" in include


def _check_response_object(case: Case, out: dict[str, Any]) -> None:
    """A Response as the openai client's own model reads it, with its output items and usage; logprobs exactly
    when `include` asked for them, one per output token while the text is the whole output."""
    r = openai.types.responses.Response.model_validate(out)
    assert r.object == "response" and r.status in ("completed", "incomplete"), out
    assert r.output and all(o.type in ("message", "function_call", "reasoning") for o in r.output), out
    assert type(out["usage"]["input_tokens"]) is int and type(out["usage"]["output_tokens"]) is int, out
    assert out["usage"]["total_tokens"] == out["usage"]["input_tokens"] + out["usage"]["output_tokens"], out
    for o in r.output:
        if o.type == "message":
            (part,) = o.content
            if not _logprobs_asked(case):
                assert part.logprobs == [], part
            else:  # every output token's but the reasoning's, as vLLM (the stop token's and a call's included)
                want = r.usage.output_tokens - r.usage.output_tokens_details.reasoning_tokens
                assert len(part.logprobs) == want, (len(part.logprobs), r.usage)


@functools.cache
def _stream_event_adapter() -> pydantic.TypeAdapter:
    # Built once: a TypeAdapter over the openai client's union of event types takes ~90 ms to construct.
    return pydantic.TypeAdapter(openai.types.responses.ResponseStreamEvent)


def _check_responses_stream(case: Case, text: str) -> None:
    """Responses SSE: `event: X` / `data: {"type": X, "sequence_number": i}`, each event valid for the openai client's
    event types, created first and completed last; output items opened and closed one at a time in index order;
    the deltas add up to each item's done text; the final response carries exactly the closed items."""
    events = [e for e in text.split("\n\n") if e]
    kinds, parsed = [], []
    for i, e in enumerate(events):
        m = re.fullmatch(r"event: (\S+)\ndata: (.*)", e, re.S)
        assert m, e[:300]
        data = _strict_json(m.group(2))
        assert data["type"] == m.group(1) and data["sequence_number"] == i, data
        kinds.append(data["type"])
        parsed.append(_stream_event_adapter().validate_python(data))
    assert kinds[0] == "response.created" and kinds[-1] in ("response.completed", "response.incomplete"), kinds
    open_item, done_items, text_deltas, reasoning_deltas = None, [], [], []
    for ev in parsed[2:-1]:
        if ev.type == "response.output_item.added":
            assert open_item is None and ev.output_index == len(done_items), (ev, open_item)
            open_item = ev.item
        elif ev.type == "response.output_item.done":
            assert open_item is not None and ev.item.id == open_item.id and ev.output_index == len(done_items), ev
            done_items.append(ev.item)
            open_item = None
        else:
            assert open_item is not None and ev.output_index == len(done_items), ev
            if ev.type == "response.output_text.delta":
                text_deltas.append(ev.delta)
            elif ev.type == "response.output_text.done":
                assert ev.text == "".join(text_deltas), ev
            elif ev.type == "response.reasoning_text.delta":
                reasoning_deltas.append(ev.delta)
            elif ev.type == "response.reasoning_text.done":
                assert ev.text == "".join(reasoning_deltas), ev
    assert open_item is None
    final = parsed[-1].response
    assert [o.model_dump() for o in final.output] == [o.model_dump() for o in done_items]
    _check_response_object(case, final.model_dump(mode="json"))


def _names(err: dict[str, Any], accepted: set[str]) -> bool:
    """The error names one of these fields: as its param (vLLM-style paths cut to the top-level field), or in its
    message."""
    param = err["param"]
    if isinstance(param, str) and re.split(r"[.\[]", param)[0] in accepted:
        return True
    return any(re.search(rf"\b{re.escape(f)}\b", err["message"]) for f in accepted if f)


def _check_error(case: Case, r: httpx.Response) -> None:
    """OpenAI's error body, {"error": {message, type, param, code}}, naming what is wrong."""
    assert r.status_code in (400, 404), r.status_code
    assert r.headers["content-type"] == "application/json", r.headers["content-type"]
    out = _strict_json(r.text)
    assert set(out) == {"error"}, out
    err = out["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"], err
    assert err["type"] == "invalid_request_error", err
    assert err["param"] is None or isinstance(err["param"], str), err
    assert err["code"] is None or isinstance(err["code"], str), err
    if r.status_code == 404:
        assert err["code"] == "model_not_found" and err["param"] == "model", err
    if case.fields == {"body"}:  # not a JSON object, or one without the required field
        assert re.search(r"JSON|body|" + "|".join(REQUIRED[case.path] | {"prompt", "messages"}), err["message"]), err
        return
    accepted = set(case.fields)
    for f in case.fields:
        accepted |= RELATED.get(f, set())
    assert _names(err, accepted), f"error names none of {sorted(accepted)}: {err}"


def _check(case: Case, r: httpx.Response) -> str | None:
    """What is wrong with this answer to this case (None: nothing)."""
    if r.status_code >= 500:
        return f"{r.status_code} for {'valid' if case.expect == 'ok' else 'bad'} input"
    if case.expect == "ok" and r.status_code != 200:
        return f"valid input refused with {r.status_code}"
    if case.expect == "fail" and r.status_code == 200:
        return "bad input accepted with 200"
    try:
        (_check_ok if r.status_code == 200 else _check_error)(case, r)
    except (AssertionError, ValueError, KeyError, TypeError) as e:
        return f"malformed {r.status_code}: {type(e).__name__}: {str(e)[:400]}"
    return None


# ---------------------------------------------------------------------------------------------------------
# The server


@contextlib.contextmanager
def _quiet_tracebacks():
    """Mute the server's traceback logs of the known bugs' 500s. Not only for quiet: CPython 3.11 formats a
    traceback with ast.parse, whose recursion counter all threads share, so the server thread logging one while
    pytest formats a failure here (an xfail's too) can crash pytest (SystemError: AST constructor recursion depth
    mismatch)."""
    loggers = [logging.getLogger(name) for name in ("uvicorn.error", "cpm4")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


@pytest.fixture(scope="module")
def fuzz_server(llm):
    """(engine, server, greedy answers before any fuzzing). sampling_defaults caps a request without max_tokens at
    8 new tokens, which keeps the mutation that drops it cheap."""
    eng = AsyncEngine(llm.model, llm.tokenizer, max_batch_size=8, max_model_len=CONTEXT)
    srv = _Server(create_app(eng, MODEL, sampling_defaults={"max_tokens": 8}))
    with httpx.Client(base_url=srv.url, timeout=60) as http:
        before = _greedy(http)
    with _quiet_tracebacks():
        yield eng, srv, before
    srv.stop()
    eng.shutdown()


def _greedy(http: httpx.Client) -> tuple[Any, ...]:
    chat = http.post("/v1/chat/completions", json={"model": MODEL, "messages": MESSAGES, "max_tokens": 8,
                                                   "temperature": 0, "logprobs": True, "top_logprobs": 2})
    cmpl = http.post("/v1/completions", json={"model": MODEL, "prompt": ["Hello", "World"], "max_tokens": 8,
                                              "temperature": 0, "ignore_eos": True})
    assert chat.status_code == cmpl.status_code == 200, (chat.text, cmpl.text)
    c = chat.json()["choices"][0]
    return (c["message"]["content"], [t["token"] for t in c["logprobs"]["content"]],
            [(x["text"], x["finish_reason"]) for x in cmpl.json()["choices"]])


class _Client:
    """An httpx client that starts a fresh connection after a 5xx: uvicorn drops a kept-alive connection after an
    unhandled exception, and the next request on it must not take the blame."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.http = httpx.Client(base_url=url, timeout=60)

    def send(self, case: Case) -> httpx.Response:
        try:
            r = self.http.post(case.path, content=case.raw, headers=case.headers)
        except httpx.TransportError as e:  # the server dropped the connection: worse than a 500
            r = httpx.Response(599, text=f"{type(e).__name__}: {e}")
        if r.status_code >= 500:
            self.close()
            self.http = httpx.Client(base_url=self.url, timeout=60)
        return r

    def close(self) -> None:
        self.http.close()


def _leaves(x: Any) -> list[Any]:
    """Every key and scalar inside a parsed body."""
    if isinstance(x, dict):
        return [v for k, val in x.items() for v in (k, *_leaves(val))]
    if isinstance(x, list):
        return [v for val in x for v in _leaves(val)]
    return [x]


def _has_surrogate(x: Any) -> bool:
    return any(isinstance(v, str) and re.search("[\ud800-\udfff]", v) for v in _leaves(x))


def _has_nonfinite(x: Any) -> bool:
    return any(isinstance(v, float) and not math.isfinite(v) for v in _leaves(x))


@pytest.mark.parametrize("seed", SEEDS)
def test_random_requests(fuzz_server, seed):
    eng, srv, before = fuzz_server
    rng = random.Random(seed)
    problems, statuses = [], {"ok": 0, "error": 0}
    client = _Client(srv.url)
    for i in range(REQUESTS_PER_SEED):
        case = _case(rng)
        r = client.send(case)
        statuses["ok" if r.status_code == 200 else "error"] += 1
        problem = _check(case, r)
        if problem:
            problems.append(f"seed {seed} #{i} {case.path} fields={sorted(case.fields)} expect={case.expect}: "
                            f"{problem}\n    body={case.raw[:300]!r}\n    answer={r.text[:300]!r}")
        if not eng.is_running:  # everything after would be a 503: the last request is the culprit
            problems.append(f"seed {seed} #{i}: the engine stopped: {eng.stopped_because}")
            break
    client.close()
    assert not problems, f"{len(problems)} bad answers:\n" + "\n".join(problems[:15])
    # Both sides were exercised.
    assert statuses["ok"] >= REQUESTS_PER_SEED // 5 and statuses["error"] >= REQUESTS_PER_SEED // 5, statuses
    # Nothing disturbed: nothing left running, the server healthy and answering exactly as before.
    deadline = time.monotonic() + 10
    while (eng.num_running or eng.num_waiting) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert eng.num_running == 0 and eng.num_waiting == 0
    with httpx.Client(base_url=srv.url, timeout=60) as http:
        assert http.get("/health").status_code == 200
        assert _greedy(http) == before


# ---------------------------------------------------------------------------------------------------------
# The bugs the random run found (all fixed), one deterministic reproducer each


def _post(url: str, path: str, raw: str) -> httpx.Response:
    with httpx.Client(base_url=url, timeout=60) as http:  # a connection of its own: a 500 drops it
        return http.post(path, content=raw.encode(), headers={"content-type": "application/json"})


def _assert_error(r: httpx.Response, param: str, statuses: tuple[int, ...] = (400,)) -> None:
    assert r.status_code in statuses, (r.status_code, r.text)
    err = _strict_json(r.text)["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param, err


def test_lone_surrogate_in_model_is_a_404(fuzz_server):
    """Found by the random run: a lone surrogate in `model` was a 500, not a 404: the error message quotes the model,
    which no JSON answer could encode as UTF-8."""
    _, srv, _ = fuzz_server
    for path, rest in (("/v1/completions", '"prompt": "Hi"'),
                       ("/v1/chat/completions", '"messages": [{"role": "user", "content": "Hi"}]'),
                       ("/v1/responses", '"input": "Hi"'), ("/detokenize", '"tokens": [1]'),
                       ("/tokenize", '"prompt": "Hi"')):
        # 404 (no such model) or 400 (no valid string): either, as long as it is no 500
        _assert_error(_post(srv.url, path, '{"model": "\\ud800", "max_tokens": 2, ' + rest + "}"), "model", (400, 404))


def test_lone_surrogate_in_prompt_is_a_400(fuzz_server):
    """Found by the random run: a lone surrogate in a text prompt was a 500 (TypeError from the tokenizer in /tokenize
    and /v1/completions); chat messages with one were already a 400."""
    _, srv, _ = fuzz_server
    _assert_error(_post(srv.url, "/tokenize", '{"prompt": "a\\ud800"}'), "prompt")
    _assert_error(_post(srv.url, "/v1/completions", '{"prompt": "a\\ud800", "max_tokens": 2}'), "prompt")
    _assert_error(_post(srv.url, "/v1/completions", '{"prompt": ["ok", "\\udfff"], "max_tokens": 2}'), "prompt")


def test_lone_surrogate_in_bad_words_is_a_400_and_the_engine_lives(llm):
    """Found by the random run: bad_words with a lone surrogate killed the engine worker: the tokenizer's TypeError in
    SequenceState escaped the `except ValueError` around the scheduler's add_request, and every later request and
    /health were a 503."""
    eng = AsyncEngine(llm.model, llm.tokenizer, max_batch_size=2, max_model_len=CONTEXT)
    srv = _Server(create_app(eng, MODEL))  # its own: the bug takes the engine down
    with _quiet_tracebacks(), contextlib.ExitStack() as cleanup:
        cleanup.callback(eng.shutdown)
        cleanup.callback(srv.stop)
        r = _post(srv.url, "/v1/chat/completions",
                  '{"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "bad_words": ["\\ud800"]}')
        assert eng.is_running, "the engine worker died"
        _assert_error(r, "bad_words")
        assert httpx.get(f"{srv.url}/health", timeout=10).status_code == 200


def test_responses_echo_only_valid_json(fuzz_server):
    """Found by the random run: /v1/responses echoes metadata, text, tools and user as sent: NaN / Infinity in those
    free-form objects (which allow_inf_nan does not cover) or a lone surrogate made the answer a 500; streamed, NaN
    went out as a bare token (invalid JSON) and a surrogate cut the stream off."""
    _, srv, _ = fuzz_server
    base = '"input": "Hi", "max_output_tokens": 2'
    for extra in ('"metadata": {"k": NaN}', '"text": {"verbosity": Infinity}', '"user": "\\ud800"',
                  '"metadata": {"k": "\\ud800"}',
                  '"tools": [{"type": "function", "name": "f", "parameters": {"type": "object", "x": NaN}}]'):
        for stream in ("false", "true"):
            try:
                r = _post(srv.url, "/v1/responses", "{" + f"{base}, {extra}, " + f'"stream": {stream}' + "}")
            except httpx.TransportError as e:
                raise AssertionError(f"{extra}, stream {stream}: the connection dropped: {e}") from None
            assert r.status_code in (200, 400), (extra, stream, r.status_code, r.text[:300])
            if r.status_code == 400:
                param = re.search(r'"(\w+)"', extra).group(1)
                _assert_error(r, param)
            elif stream == "true":
                _check_responses_stream(Case("/v1/responses", b"", {}, "any"), r.text)
            else:
                _strict_json(r.text)


def test_schema_format_of_the_wrong_kind_is_a_400(fuzz_server):
    """Found by the random run: a JSON schema whose "format" is a list or an object was a 500 (TypeError:
    unhashable type, in guided._checked_schema)."""
    _, srv, _ = fuzz_server
    schema = '{"type": "string", "format": ["email"]}'
    chat = '"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2'
    _assert_error(_post(srv.url, "/v1/completions", '{"prompt": "Hi", "max_tokens": 2, "guided_json": ' + schema + "}"),
                  "guided_json")
    _assert_error(_post(srv.url, "/v1/chat/completions", "{" + chat + ', "response_format": {"type": "json_schema", '
                        '"json_schema": {"name": "x", "schema": ' + schema + "}}}"), "response_format")
    tools = ('"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", '
             '"properties": {"a": {"type": "string", "format": {"x": 1}}}}}}], "tool_choice": "required"')
    _assert_error(_post(srv.url, "/v1/chat/completions", "{" + chat + ", " + tools + "}"), "tools")


def test_max_tokens_zero_still_validates_the_sampling_fields(fuzz_server):
    """Found by the random run: /v1/completions with max_tokens 0 never built SamplingParams, so sampling fields that
    are a 400 with max_tokens 1 (logit_bias ids, empty stop strings, bad schemas) passed unchecked."""
    _, srv, _ = fuzz_server
    for field_, value in (("logit_bias", '{"abc": 1}'), ("stop", '[""]'), ("guided_regex", '"("')):
        body = '{"prompt": "Hi", "echo": true, "max_tokens": %s, "%s": %s}'
        _assert_error(_post(srv.url, "/v1/completions", body % (1, field_, value)), field_)  # as it is today
        _assert_error(_post(srv.url, "/v1/completions", body % (0, field_, value)), field_)
