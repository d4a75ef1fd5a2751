"""Seeded randomized property tests of grammar-constrained generation (xgrammar) on the tiny random model.

Random JSON schemas from the subset `cpm4.engine.guided` accepts are generated under, greedy and seeded-sampled,
and every output that ends with "stop" must parse as strict JSON and validate against the ORIGINAL schema
(`validate` below is the reference). Also: refused schemas name their keyword, accepted ones lose no
value-constraining keyword on the way to xgrammar, guided_choice / guided_regex outputs are exact, and a request
gives the same output alone as in a batch with unconstrained requests."""

from __future__ import annotations

import json
import math
import random
import re

import pytest
from test_guided import model, tok

from cpm4 import SamplingParams
from cpm4.engine.generate import generate_ids

pytest.importorskip("xgrammar")
from cpm4.engine import guided  # noqa: E402

SEED = 20240607
MAX_TOKENS = 96  # every generated value is bounded, so a complete document fits well within this




def prompt(i: int) -> list[int]:
    return tok().encode(["Give me JSON:", "x", "An object please", "Answer:"][i % 4])


def gen(params: list[SamplingParams], first: int = 0) -> list:
    return generate_ids(model(), tok(), [prompt(first + i) for i in range(len(params))], params)


def strict_json(text: str):
    def refuse(c):  # json.loads takes NaN / Infinity / -Infinity, which are not JSON
        raise ValueError(f"not JSON: {c}")
    return json.loads(text, parse_constant=refuse)


# ---------------------------------------------------------------------------------------------------------
# The reference validator: exactly the keywords `random_schema` generates, with JSON schema 2020-12 meanings.

_TYPES = {"string": str, "boolean": bool, "null": type(None), "array": list, "object": dict}


def _is_type(x, t: str) -> bool:
    if t in ("integer", "number"):  # booleans are not numbers; 1.0 is an integer
        return isinstance(x, (int, float)) and not isinstance(x, bool) and (t == "number" or float(x).is_integer())
    return isinstance(x, _TYPES[t]) and (t == "boolean" or not isinstance(x, bool))


def _same(a, b) -> bool:  # JSON equality: 1 == 1.0, but True != 1
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


def validate(x, s, root=None, at: str = "$") -> None:
    """AssertionError naming where `x` breaks schema `s` (type, enum, const, minLength, maxLength, pattern,
    minimum, maximum, exclusiveMinimum, exclusiveMaximum, items, minItems, maxItems, properties, required,
    additionalProperties, anyOf, $ref into $defs)."""
    root = s if root is None else root
    if s is True:
        return
    if "$ref" in s:
        node = root
        for part in s["$ref"][2:].split("/"):
            node = node[part]
        validate(x, node, root, at)
    if "anyOf" in s:
        errors = []
        for branch in s["anyOf"]:
            try:
                validate(x, branch, root, at)
                break
            except AssertionError as e:
                errors.append(str(e))
        else:
            raise AssertionError(f"{at}: {x!r} matches no anyOf branch ({errors})")
    if "type" in s:
        types = [s["type"]] if isinstance(s["type"], str) else s["type"]
        assert any(_is_type(x, t) for t in types), f"{at}: {x!r} is not {s['type']}"
    assert "enum" not in s or any(_same(x, v) for v in s["enum"]), f"{at}: {x!r} not in enum"
    assert "const" not in s or _same(x, s["const"]), f"{at}: {x!r} is not the const"
    if isinstance(x, str):
        assert s.get("minLength", 0) <= len(x) <= s.get("maxLength", math.inf), f"{at}: length of {x!r}"
        assert "pattern" not in s or re.search(s["pattern"], x), f"{at}: {x!r} misses the pattern"
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        assert s.get("minimum", -math.inf) <= x <= s.get("maximum", math.inf), f"{at}: {x!r} out of range"
        assert s.get("exclusiveMinimum", -math.inf) < x < s.get("exclusiveMaximum", math.inf), \
            f"{at}: {x!r} out of the exclusive range"
    if isinstance(x, list):
        assert s.get("minItems", 0) <= len(x) <= s.get("maxItems", math.inf), f"{at}: {len(x)} items"
        for i, v in enumerate(x):
            validate(v, s.get("items", True), root, f"{at}[{i}]")
    if isinstance(x, dict):
        missing = set(s.get("required", ())) - x.keys()
        assert not missing, f"{at}: missing {missing}"
        props = s.get("properties", {})
        for k, v in x.items():
            sub = props[k] if k in props else s.get("additionalProperties", True)
            assert sub is not False, f"{at}: extra property {k!r}"
            validate(v, sub, root, f"{at}.{k}")


def test_validator_itself():
    # The reference must reject what it is meant to, or the properties below prove nothing.
    s = {"type": "object", "properties": {"a": {"type": "integer", "exclusiveMinimum": 1, "maximum": 3},
                                          "b": {"anyOf": [{"type": "null"}, {"$ref": "#/$defs/s"}]}},
         "required": ["a"], "additionalProperties": False, "$defs": {"s": {"type": "string", "pattern": "^x+$"}}}
    validate({"a": 2.0, "b": "xx"}, s)
    for bad in ({"a": 1}, {"a": 4}, {"a": True}, {"a": 2, "b": "y"}, {"b": None}, {"a": 2.5}):
        with pytest.raises(AssertionError):
            validate(bad, s)
    with pytest.raises(AssertionError, match="extra"):
        validate({"a": 2, "c": 1}, s)
    with pytest.raises(ValueError):
        strict_json("NaN")


# ---------------------------------------------------------------------------------------------------------
# Random schemas from the accepted subset. Every string, number and array is bounded so that a random model
# finishes a document within MAX_TOKENS.

_PATTERNS = ["^[a-z]{1,4}$", "^(ab|cd)$", "^[0-9]{2}-[A-F]{1,2}$", "^x[yz]?$", "^[a-c ]{2,3}$", "^é{1,2}[.]$"]
_STRINGS = ["a", "b c", 'q"t', "back\\slash", "é", "tab\there", "", "/", "line\nbreak", "\u00ff"]
_NAMES = ["a", "b", "name", "x_y", "k\"q", "é"]


def _bounds(rng: random.Random, integer: bool) -> dict:
    lo = rng.choice([-1000, -37, -5, -1, 0, 1, 3, 42]) + (0 if integer or rng.random() < 0.5 else 0.25)
    hi = lo + rng.choice([0, 1, 2, 9, 10, 99, 1500]) + (0 if integer or rng.random() < 0.5 else 0.5)
    lo_kw = rng.choice(["minimum", "exclusiveMinimum"])
    hi_kw = rng.choice(["maximum", "exclusiveMaximum"])
    if lo_kw == "exclusiveMinimum" and hi_kw == "exclusiveMaximum" and hi - lo <= 1:
        hi = lo + 3  # keep at least one value (an integer between them too)
    elif (lo_kw == "exclusiveMinimum" or hi_kw == "exclusiveMaximum") and hi - lo < 1:
        hi = lo + 2
    return {lo_kw: lo, hi_kw: hi}


def _scalar(rng: random.Random) -> dict:
    kind = rng.choice(["string", "string", "integer", "integer", "number", "boolean", "null", "enum", "const"])
    if kind == "string":
        s = {"type": "string"}
        form = rng.choice(["max", "range", "pattern"])
        if form == "max":
            s["maxLength"] = rng.randint(0, 6)
        elif form == "range":
            s["minLength"] = rng.randint(0, 3)
            s["maxLength"] = s["minLength"] + rng.randint(0, 3)
        else:
            s["pattern"] = rng.choice(_PATTERNS)
        return s
    if kind in ("integer", "number"):
        return {"type": kind, **_bounds(rng, kind == "integer")}
    if kind in ("boolean", "null"):
        return {"type": kind}
    pool = _STRINGS + [0, -3, 2.5, 10**6, True, False, None]
    if kind == "const":
        return {"const": rng.choice(pool)}
    values = rng.sample(pool, rng.randint(1, 4))
    if rng.random() < 0.3 and all(isinstance(v, str) for v in values):
        return {"type": "string", "enum": values}  # "type" beside enum is kept, and must agree
    return {"enum": values}


def random_schema(rng: random.Random, depth: int = 2, defs: dict | None = None) -> dict:
    top = defs is None
    defs = {} if top else defs
    kind = rng.choice(["scalar", "scalar", "object", "array", "anyOf", "ref"]) if depth > 0 else "scalar"
    if kind == "scalar":
        s = _scalar(rng)
    elif kind == "object":
        names = rng.sample(_NAMES, rng.randint(1, 3))
        s = {"type": "object", "properties": {n: random_schema(rng, depth - 1, defs) for n in names},
             "required": [n for n in names if rng.random() < 0.7], "additionalProperties": False}
    elif kind == "array":
        lo = rng.randint(0, 2)
        s = {"type": "array", "items": random_schema(rng, depth - 1, defs), "minItems": lo,
             "maxItems": lo + rng.randint(0, 2)}
    elif kind == "anyOf":
        s = {"anyOf": [_scalar(rng) for _ in range(rng.randint(2, 3))]}
    else:
        name = f"d{len(defs)}"
        defs[name] = {}  # reserved: a $ref inside it takes the next name
        defs[name] = random_schema(rng, depth - 1, defs)
        s = {"$ref": f"#/$defs/{name}"}
    if top and defs:
        # $defs beside $ref or anyOf at the root would be "constraints next to $ref"; wrap such a root.
        s = {"type": "object", "properties": {"v": s}, "required": ["v"], "additionalProperties": False,
             "$defs": defs}
    return s


def _schemas(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [random_schema(rng) for _ in range(n)]


def test_random_schemas_are_accepted_and_keep_their_constraints():
    # Whatever guided.py hands xgrammar keeps every keyword that constrains values; only minLength/maxLength
    # may turn into the equivalent pattern.
    def walk(orig, checked, at="#"):
        if not isinstance(orig, dict):
            assert orig == checked, at
            return
        for k, v in orig.items():
            if k in ("minLength", "maxLength") and k not in checked:
                lo, hi = orig.get("minLength", 0), orig.get("maxLength", "")
                # any character but controls and surrogates (which are no UTF-8 text)
                assert checked["pattern"] == f"^[^\\x00-\\x1f\\ud800-\\udfff]{{{lo},{hi}}}$", at
                continue
            assert k in checked, f"{at}: {k!r} dropped"
            if isinstance(v, dict) and k in ("properties", "$defs"):
                for n in v:
                    walk(v[n], checked[k][n], f"{at}/{k}/{n}")
            elif k in ("items", "additionalProperties"):
                walk(v, checked[k], f"{at}/{k}")
            elif k == "anyOf":
                for i, b in enumerate(v):
                    walk(b, checked[k][i], f"{at}/{k}/{i}")
            else:
                assert checked[k] == v, f"{at}: {k!r} changed"

    for s in _schemas(200, SEED):
        walk(s, json.loads(guided.json_schema_for_grammar(s)))


def test_random_schema_outputs_validate():
    schemas = _schemas(10, SEED + 1)
    # Greedy and two seeded samplers per schema, all in one batch (each row has its own grammar).
    params = []
    for i, s in enumerate(schemas):
        params.append(SamplingParams(max_tokens=MAX_TOKENS, temperature=0, guided_json=s))
        params += [SamplingParams(max_tokens=MAX_TOKENS, seed=SEED + 10 * i + j, temperature=1.1,
                                  guided_json=json.dumps(s)) for j in range(2)]
    outs = gen(params)
    stopped = 0
    for p, o in zip(params, outs, strict=True):
        s = p.guided_json if isinstance(p.guided_json, dict) else json.loads(p.guided_json)
        if o.finish_reason != "stop":  # cut by max_tokens: not a whole document, nothing to validate
            assert o.finish_reason == "length", o.finish_reason
            continue
        stopped += 1
        try:
            validate(strict_json(o.text), s)
        except (ValueError, AssertionError) as e:
            raise AssertionError(f"schema {json.dumps(s)} gave {o.text!r}: {e}") from None
    assert stopped >= 0.8 * len(outs), f"only {stopped}/{len(outs)} finished: the properties prove little"


# ---------------------------------------------------------------------------------------------------------
# Refused schemas: each xgrammar would not enforce, put at a random place in an accepted schema.

_REFUSED = [
    ({"type": "string", "not": {"const": "a"}}, "'not'"),
    ({"type": "integer", "if": {"minimum": 0}, "then": {"maximum": 3}}, "'if'"),
    ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, "'uniqueItems'"),
    ({"type": "array", "contains": {"const": 1}}, "'contains'"),
    ({"type": "object", "properties": {"a": {"type": "null"}}, "dependentRequired": {"a": ["b"]}},
     "'dependentRequired'"),
    ({"type": "integer", "multipleOf": 3, "minimum": 0}, "'multipleOf'"),
    ({"type": "number", "multipleOf": 0.5}, "'multipleOf'"),
    ({"type": "string", "pattern": "^(?!ab)[a-z]{2}$"}, "lookahead"),
    ({"type": "string", "format": "email", "pattern": "^a"}, "'format'"),
    ({"type": "string", "pattern": "^a", "maxLength": 3}, "'pattern'"),
    ({"type": "string", "format": "iri"}, "'format' 'iri'"),
    ({"$ref": "#/$defs/d", "minimum": 1}, "'$ref' with 'minimum'"),
    ({"anyOf": [{"type": "integer"}], "maximum": 2}, "'anyOf' with 'maximum'"),
    ({"enum": [1, 2], "minimum": 2}, "'enum' with 'minimum'"),
    ({"type": "string", "enum": ["a", 1]}, "'enum' or 'const' value"),
    ({"minimum": 1}, "'minimum' without a 'type'"),
    ({"type": "object", "properties": {}, "required": ["x"]}, "'required' naming 'x'"),
    ({"allOf": [{"type": "integer"}, {"minimum": 1}]}, "'allOf' with several"),
    ({"$ref": "http://example.com/s.json"}, "only local references"),
]


def test_refused_schemas_name_the_keyword():
    rng = random.Random(SEED + 2)
    for bad, word in _REFUSED:
        for _ in range(3):
            where = rng.choice(["root", "property", "items", "anyOf", "def"])
            wrap = {"root": lambda b: b,
                    "property": lambda b: {"type": "object", "properties": {"p": b}},
                    "items": lambda b: {"type": "array", "items": b, "maxItems": 2},
                    "anyOf": lambda b: {"anyOf": [{"type": "null"}, b]},
                    "def": lambda b: {"type": "object", "properties": {"p": {"$ref": "#/$defs/e"}},
                                      "$defs": {"e": b}}}[where]
            s = wrap(bad)
            if "$ref" in json.dumps(bad) and "#/$defs/d" in json.dumps(bad):
                s = {"type": "object", "properties": {"v": s}, "$defs": {"d": {"type": "integer"}}}
            with pytest.raises(ValueError, match=re.escape(word)):
                gen([SamplingParams(max_tokens=4, guided_json=s)])


# ---------------------------------------------------------------------------------------------------------
# guided_choice and guided_regex

_CHOICE_CHARS = ["a", "b", "Z", " ", '"', "\\", "é", "\u4e2d", "|", "(", "\t", "'", "0"]


def test_choice_outputs_are_one_of_the_choices():
    rng = random.Random(SEED + 3)
    params = []
    for i in range(10):
        choices = list(dict.fromkeys("".join(rng.choices(_CHOICE_CHARS, k=rng.randint(1, 5)))
                                     for _ in range(rng.randint(1, 4))))
        params += [SamplingParams(max_tokens=40, temperature=0, guided_choice=choices),
                   SamplingParams(max_tokens=40, seed=SEED + i, temperature=1.5, guided_choice=choices)]
    for p, o in zip(params, gen(params), strict=True):
        assert o.finish_reason == "stop" and o.text in p.guided_choice, (p.guided_choice, o.text)


def test_choice_outside_the_bmp():
    """Found by this file: choices were written with ASCII escapes, so an emoji became two \\u
    surrogate escapes, which the grammar read as two lone surrogates (invalid UTF-8 out, or the choice never made)."""
    choices = ["\U0001f600", "\U0001f389x"]
    outs = gen([SamplingParams(max_tokens=20, seed=s, guided_choice=choices) for s in range(3)])
    for o in outs:
        assert o.finish_reason == "stop" and o.text in choices, o.text


def _random_regex(rng: random.Random) -> str:
    atoms = ["[a-z]{1,3}", "(yes|no)", "[0-9]{2}", "-", "x?", "[A-F]{0,2}", r"\.", "(ab|c){1,2}", "é", " ",
             "[^a-z\"\\\\\\x00-\\x1f]{1,2}"]
    return "".join(rng.choice(atoms) for _ in range(rng.randint(1, 4)))


def test_regex_outputs_fullmatch():
    rng = random.Random(SEED + 4)
    params = []
    for i in range(10):
        rx = _random_regex(rng)
        params += [SamplingParams(max_tokens=40, temperature=0, guided_regex=rx),
                   SamplingParams(max_tokens=40, seed=SEED + i, temperature=1.3, guided_regex=rx)]
    for p, o in zip(params, gen(params), strict=True):
        assert o.finish_reason == "stop" and re.fullmatch(p.guided_regex, o.text), (p.guided_regex, o.text)


# ---------------------------------------------------------------------------------------------------------
# Batch independence: a guided request's output does not depend on the unconstrained requests beside it.

def test_alone_equals_in_a_batch():
    schemas = _schemas(2, SEED + 5)
    for i, s in enumerate(schemas):
        for p in (SamplingParams(max_tokens=MAX_TOKENS, temperature=0, guided_json=s),
                  SamplingParams(max_tokens=MAX_TOKENS, seed=SEED + i, guided_json=s)):
            (alone,) = gen([p])
            others = [SamplingParams(max_tokens=12, seed=SEED + 100 + i, ignore_eos=True),
                      SamplingParams(max_tokens=30, temperature=0)]
            # The guided request in the middle of the batch, with the same prompt as alone.
            batch = generate_ids(model(), tok(), [prompt(1), prompt(0), prompt(2)], [others[0], p, others[1]])
            assert (batch[1].text, batch[1].token_ids, batch[1].finish_reason) == \
                (alone.text, alone.token_ids, alone.finish_reason), json.dumps(s)


# ---------------------------------------------------------------------------------------------------------
# Bugs the fuzzing found (all fixed), one reproducer each.

def _byte_ids(data: bytes) -> list[int]:
    # The byte-level BPE's one-byte tokens, as GPT-2's bytes_to_unicode names them.
    bs = [*range(33, 127), *range(161, 173), *range(174, 256)]
    names = dict(zip(bs, map(chr, bs)))
    names.update({b: chr(256 + n) for n, b in enumerate(b for b in range(256) if b not in bs)})
    return [tok().hf.convert_tokens_to_ids(names[b]) for b in data]


def test_length_bounded_string_admits_no_surrogate():
    """Found by this file: minLength/maxLength became the pattern ^.{lo,hi}$, and '.' took a
    surrogate as one character, written as 3 bytes that are no UTF-8 (3 U+FFFD each: maxLength broken)."""
    s = {"type": "string", "maxLength": 3}
    cfg = model().config
    m = guided.new_matcher(tok(), cfg.vocab_size, cfg.eos_token_ids, SamplingParams(guided_json=s))
    data = b'"a\xed\xb8\xa9b"'  # "a", U+DE29 as 3 bytes, "b": decodes to 'a\ufffd\ufffd\ufffdb' (5 characters)
    accepted = all(m.accept_token(t) for t in _byte_ids(data)) and m.accept_token(cfg.eos_token_ids[0])
    assert not accepted, data.decode("utf-8", "replace")


def test_integer_with_fractional_bounds():
    """Found by this file: a fractional bound of an integer (minimum 0.5: >= 1) was refused by
    xgrammar; the bounds are now rounded inwards."""
    s = {"type": "integer", "minimum": 0.5, "exclusiveMaximum": 3.5}
    outs = gen([SamplingParams(max_tokens=10, seed=i, temperature=1.5, guided_json=s) for i in range(4)])
    for o in outs:
        assert o.finish_reason == "stop"
        validate(strict_json(o.text), s)
