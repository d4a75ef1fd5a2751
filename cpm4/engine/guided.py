"""Grammar-constrained decoding (structured outputs) with xgrammar, as vLLM does it.

A request with `SamplingParams.guided_json` (a JSON schema, or True for any JSON object) or
`SamplingParams.structural_tag` (an xgrammar structural tag: forced tool calls) gets a compiled grammar and, per
sequence, a `GrammarMatcher`. Before each sampling step the matcher's allowed-token bitmask sets every other
logit of its row to -inf; after it the matcher takes the sampled token. Stop tokens are allowed only where
the grammar is complete, so a sequence ends ("stop") exactly when its output is a whole document.

JSON schemas are checked before they compile: xgrammar 0.2.9 silently ignores some validation keywords (not,
if/then/else, uniqueItems, contains, dependentRequired, multipleOf on numbers or beside a range, a lookahead in a
pattern, a pattern next to a format, constraints next to $ref / anyOf / enum, ...), and a schema with one is
refused (ValueError naming it and where it is) rather than give output that breaks it. Its length-bounded
strings admit raw control characters (invalid JSON), so minLength / maxLength are compiled as a pattern (of
characters other than control characters and line breaks). Keywords without a validation meaning (title,
description, unknown ones) are ignored, as JSON schema validators do. Its token masks also let byte tokens break
UTF-8 inside a character (an overlong or surrogate sequence, decoded as U+FFFD a byte): each mask is narrowed to
the tokens that keep the output valid UTF-8 (`Utf8Matcher`).

Logprobs (SamplingParams.logprobs) stay the model's raw distribution, taken before the grammar mask as before
every other logits transform: the sampled token's logprob is its probability under the model, and tokens the
grammar rules out can be among the top alternatives. (vLLM V1 masks the logits before its sampler computes its
default raw_logprobs, so it reports them renormalised over the tokens the grammar allows.)

xgrammar is an optional dependency (`pip install 'cpm4[guided]'`), imported on first use.
"""

from __future__ import annotations

import inspect
import json
import math
import re
import threading
import weakref
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from cpm4.model.config import is_int
from cpm4.model.tokenizer import TOOL_CALL, Tokenizer

from .params import GRAMMAR_FIELDS

if TYPE_CHECKING:
    import xgrammar

    from .params import SamplingParams

__all__ = ["GrammarMatcher", "Utf8Matcher", "Utf8Table", "apply_grammar", "compile_grammar", "json_schema_for_grammar",
           "new_matcher", "tool_call_structural_tag"]

# The tool-call marker stays matchable as a token (the grammar of a forced call starts with it); every other
# special token is blanked in the grammar's vocabulary, so no grammar emits one as text (inside a JSON string
# it would vanish on decoding, and the stop tokens are handled by the matcher itself).
_KEPT_SPECIAL = (TOOL_CALL,)

_lock = threading.Lock()
# Tokenizer -> {(model vocab size, stop ids): [compiler, its TokenizerInfo, UTF-8 table or None]}: building the
# token tables takes a while on a real vocabulary (73k ids), so it is done once per tokenizer; the compiler caches
# compiled grammars itself.
_compilers: weakref.WeakKeyDictionary[Tokenizer, dict[tuple[int, tuple[int, ...]], list]] = \
    weakref.WeakKeyDictionary()

GrammarMatcher = Any  # an xgrammar.GrammarMatcher; xgrammar itself is imported on first use


def _xgr() -> Any:
    try:
        import xgrammar
    except ImportError:
        raise ValueError("structured outputs (guided_json, structural_tag, guided_regex, guided_choice, "
                         "guided_grammar) need the xgrammar package: pip install 'cpm4[guided]'") from None
    return xgrammar


def _tokenizer_info(tokenizer: Tokenizer, vocab_size: int, stop_ids: Sequence[int]) -> xgrammar.TokenizerInfo:
    xgr = _xgr()
    hf = tokenizer.hf
    backend = getattr(hf, "backend_tokenizer", None)
    if backend is None:  # a slow (sentencepiece) tokenizer: xgrammar reads it as it is
        return xgr.TokenizerInfo.from_huggingface(hf, vocab_size=vocab_size, stop_token_ids=list(stop_ids))
    from tokenizers import Tokenizer as Backend
    from transformers import PreTrainedTokenizerFast

    # cpm4's own checkpoints load without transformers (light_tokenizer.JsonTokenizer); xgrammar detects the
    # vocabulary's encoding from a transformers fast tokenizer, so wrap a copy of the same backend.
    fast = hf if isinstance(hf, PreTrainedTokenizerFast) else \
        PreTrainedTokenizerFast(tokenizer_object=Backend.from_str(backend.to_str()))
    base = xgr.TokenizerInfo.from_huggingface(fast, vocab_size=vocab_size, stop_token_ids=list(stop_ids))
    vocab = [""] * vocab_size
    for token, i in fast.get_vocab().items():
        if i < vocab_size:
            vocab[i] = token
    for i, added in backend.get_added_tokens_decoder().items():
        if added.special and i < vocab_size and added.content not in _KEPT_SPECIAL:
            vocab[i] = ""  # xgrammar never offers an empty token as text
    return xgr.TokenizerInfo(vocab, base.vocab_type, vocab_size=vocab_size, stop_token_ids=list(stop_ids),
                             add_prefix_space=base.add_prefix_space)


# The compiled-grammar cache's bound: unbounded (xgrammar's default), every new schema a client sent stayed
# (300 small schemas grew a server by 690 MB).
GRAMMAR_CACHE_BYTES = 64 * 2**20


def _grammar_compiler(info: Any) -> Any:
    xgr = _xgr()
    limit = {"cache_limit_bytes": GRAMMAR_CACHE_BYTES} \
        if "cache_limit_bytes" in inspect.signature(xgr.GrammarCompiler).parameters else {}
    return xgr.GrammarCompiler(info, max_threads=2, **limit)


def _entry(tokenizer: Tokenizer, vocab_size: int, stop_ids: Sequence[int]) -> list:
    key = (int(vocab_size), tuple(sorted(set(stop_ids))))
    with _lock:
        per = _compilers.setdefault(tokenizer, {})
        entry = per.get(key)
        if entry is None:
            info = _tokenizer_info(tokenizer, *key)
            # [compiler, tokenizer info, UTF-8 table, opening-tag masks]
            entry = per[key] = [_grammar_compiler(info), info, None, {}]
    return entry


def _compiler(tokenizer: Tokenizer, vocab_size: int, stop_ids: Sequence[int]) -> Any:
    return _entry(tokenizer, vocab_size, stop_ids)[0]


def _utf8_table(tokenizer: Tokenizer, vocab_size: int, stop_ids: Sequence[int]) -> Utf8Table:
    entry = _entry(tokenizer, vocab_size, stop_ids)
    with _lock:
        if entry[2] is None:
            entry[2] = Utf8Table(entry[1].decoded_vocab, int(vocab_size))
        return entry[2]


# ----- The output's UTF-8 -----
# xgrammar 0.2.9's token masks admit byte tokens that continue a character invalidly (E0 then 8F: an overlong
# encoding; ED then A0: a surrogate), though its own accept_string refuses those bytes. They decode to one U+FFFD
# a byte, so a string of maxLength 1 came back three characters long (the guided fuzz at SEED 7). Each guided
# row's mask is narrowed to the tokens whose bytes continue valid UTF-8 (RFC 3629) from where its output stands.

_BAD = 8  # the DFA's dead state; 0 expects a character's first byte, 1-7 are inside one


def _utf8_dfa() -> np.ndarray:
    """[9, 257] next state by (state, byte); column 256 is no byte (a shorter token's padding)."""
    t = np.full((9, 257), _BAD, np.int64)
    t[:, 256] = np.arange(9)
    t[0, :0x80] = 0
    t[0, 0xC2:0xE0] = 1  # two-byte characters (C0, C1: overlong)
    t[0, 0xE1:0xF0] = 2
    t[0, 0xE0] = 3  # its next byte A0-BF (else overlong)
    t[0, 0xED] = 4  # its next byte 80-9F (else a surrogate)
    t[0, 0xF1:0xF4] = 5
    t[0, 0xF0] = 6  # 90-BF next (else overlong)
    t[0, 0xF4] = 7  # 80-8F next (else past U+10FFFF); F5-FF never
    t[1, 0x80:0xC0] = 0
    t[2, 0x80:0xC0] = 1
    t[3, 0xA0:0xC0] = 1
    t[4, 0x80:0xA0] = 1
    t[5, 0x80:0xC0] = 2
    t[6, 0x90:0xC0] = 2
    t[7, 0x80:0x90] = 2
    return t


def _bitmask(allowed: np.ndarray) -> Tensor:
    """[..., V] booleans as xgrammar bitmask rows: int32 words, token i at bit i % 32 of word i // 32."""
    words = -(-allowed.shape[-1] // 32)
    bits = np.zeros((*allowed.shape[:-1], words * 32), bool)
    bits[..., :allowed.shape[-1]] = allowed
    return torch.from_numpy(np.packbits(bits, axis=-1, bitorder="little").view("<i4").astype(np.int32))


class Utf8Table:
    """For each UTF-8 state (0-7) and token: the state after the token's bytes (`after`, _BAD where they break
    UTF-8) and, as xgrammar bitmask rows (int32, bit i % 32 of word i // 32), the tokens that keep it (`masks`).
    Tokens without bytes (special and stop tokens) keep every state."""

    def __init__(self, decoded_vocab: Sequence[bytes], vocab_size: int) -> None:
        vocab = [bytes(b) for b in decoded_vocab[:vocab_size]]
        vocab += [b""] * (vocab_size - len(vocab))
        width = max(map(len, vocab), default=0)
        data = np.full((vocab_size, max(width, 1)), 256, np.int16)
        for i, b in enumerate(vocab):
            if b:
                data[i, :len(b)] = np.frombuffer(b, np.uint8)
        dfa = _utf8_dfa()
        state = np.repeat(np.arange(8)[:, None], vocab_size, axis=1)
        for j in range(width):
            state = dfa[state, data[None, :, j]]
        self.after = state
        self.dfa = dfa
        self.masks = _bitmask(state != _BAD)


class Utf8Matcher:
    """An xgrammar GrammarMatcher whose masks also keep the output valid UTF-8 (`Utf8Table`); otherwise the same
    (attributes not defined here are the matcher's). The UTF-8 state follows every way the matcher's output moves:
    tokens and strings accepted, rollback, reset."""

    def __init__(self, matcher: Any, table: Utf8Table) -> None:
        self.matcher, self.table = matcher, table
        self.states = [0]  # the state before any output, then after each token or string accepted (for rollback)

    @property
    def state(self) -> int:
        return self.states[-1]

    def _moved(self, after: int) -> None:
        self.states.append(0 if after == _BAD else after)  # (only where the grammar alone chose: see below)

    def accept_token(self, token: int) -> bool:
        ok = self.matcher.accept_token(token)
        if ok:
            self._moved(int(self.table.after[self.state, token]) if 0 <= token < self.table.after.shape[1]
                        else self.state)
        return ok

    def accept_string(self, text: str | bytes) -> bool:
        ok = self.matcher.accept_string(text)
        if ok:
            state = self.state
            for byte in text.encode() if isinstance(text, str) else text:
                state = int(self.table.dfa[state, byte]) if state != _BAD else _BAD
            self._moved(state)
        return ok

    def rollback(self, num_tokens: int = 1) -> None:
        self.matcher.rollback(num_tokens)  # (raises past what it keeps, before the states change)
        del self.states[max(1, len(self.states) - num_tokens):]

    def reset(self) -> None:
        self.matcher.reset()
        self.states = [0]

    def fill_next_token_bitmask(self, bitmask: Tensor, row: int) -> Any:
        out = self.matcher.fill_next_token_bitmask(bitmask, row)
        mine = bitmask[row]
        keep = self.table.masks[self.state]
        n = min(mine.shape[0], keep.shape[0])
        narrowed = mine[:n] & keep[:n]
        if bool(narrowed.any()):  # where the grammar allows only broken bytes, its own mask stands
            mine[:n] = narrowed
        return out

    def __getattr__(self, name: str) -> Any:
        return getattr(self.matcher, name)


# ----- JSON schemas as xgrammar 0.2.9 enforces them (each keyword tried against its matcher) -----

_STRING_KW = frozenset({"minLength", "maxLength", "pattern", "format"})
_NUMBER_KW = frozenset({"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf"})
_ARRAY_KW = frozenset({"items", "prefixItems", "minItems", "maxItems", "uniqueItems", "unevaluatedItems"})
_OBJECT_KW = frozenset({"properties", "required", "additionalProperties", "patternProperties", "propertyNames",
                        "minProperties", "maxProperties", "unevaluatedProperties"})
# Validation keywords xgrammar drops without a word.
_IGNORED_KW = ("not", "if", "then", "else", "dependentRequired", "dependentSchemas", "dependencies", "contains",
               "minContains", "maxContains", "$dynamicRef", "$recursiveRef")
# Keywords xgrammar uses alone, dropping every constraint beside them ("type" is kept beside enum and const).
_ALONE_KW = ("$ref", "anyOf", "oneOf", "allOf", "enum", "const")
_CHECKED_KW = _STRING_KW | _NUMBER_KW | _ARRAY_KW | _OBJECT_KW | {"type", *_ALONE_KW}
# The formats xgrammar enforces, and the standard ones it does not; any other is an annotation (as validators
# treat unknown formats) and is left out, since xgrammar would drop a pattern beside it.
_FORMATS = frozenset({"email", "date", "time", "date-time", "duration", "ipv4", "ipv6", "hostname", "uuid", "uri",
                      "uri-reference", "uri-template", "json-pointer", "relative-json-pointer"})
_UNENFORCED_FORMATS = frozenset({"iri", "iri-reference", "idn-email", "idn-hostname", "regex"})
_LOOKAHEAD = re.compile(r"(?<!\\)\(\?[=!]")  # (?= or (?! in a pattern: xgrammar ignores the assertion


def _of_type(v: Any, t: str) -> bool:
    if isinstance(v, bool):
        return t == "boolean"
    if t == "integer":
        return isinstance(v, int) or (isinstance(v, float) and v.is_integer())
    kinds = {"number": (int, float), "string": str, "null": type(None), "array": list, "object": dict}
    return t in kinds and isinstance(v, kinds[t])


def _whole_bounds(s: dict[str, Any]) -> None:
    """An integer's bounds as the whole numbers they admit (xgrammar refuses fractional ones, though JSON Schema
    allows them): minimum 0.5 is minimum 1, exclusiveMaximum 3.5 is maximum 3."""
    for key, inclusive, edge in (("minimum", "minimum", math.ceil), ("exclusiveMinimum", "minimum", math.floor),
                                 ("maximum", "maximum", math.floor), ("exclusiveMaximum", "maximum", math.ceil)):
        v = s.get(key)
        if not isinstance(v, float) or not math.isfinite(v):
            continue
        whole = edge(v)
        if key != inclusive:  # exclusive: the next whole number inside
            whole += 1 if inclusive == "minimum" else -1
            del s[key]
        old = s.get(inclusive) if key != inclusive else None
        tighter = max if inclusive == "minimum" else min
        s[inclusive] = whole if not isinstance(old, (int, float)) else tighter(old, whole)


def _may_match_quote_or_backslash(pattern: str) -> bool:
    """Whether `pattern` names '"' or '\\' as a character it may match: as a literal or an escape (\\, \\",
    \\x22, \\u005c...), outside a character class or in one that is not negated. Ranges and negated classes
    are left alone: xgrammar keeps both characters out of them (and out of '.', \\W, \\S)."""
    i, n = 0, len(pattern)
    in_class: bool | None = None  # None: outside a class; else whether the class is negated
    while i < n:
        c = pattern[i]
        if c == "\\" and i + 1 < n:
            esc, width = pattern[i + 1], 2
            code = ord(esc) if esc in "\\\"" else None
            digits = {"x": 2, "u": 4}.get(esc, 0)
            if digits and re.fullmatch(r"[0-9a-fA-F]+", pattern[i + 2:i + 2 + digits] or "-"):
                code, width = int(pattern[i + 2:i + 2 + digits], 16), 2 + digits
            if code in (0x22, 0x5C) and not in_class:
                return True
            i += width
            continue
        if in_class is None:
            if c == '"':
                return True
            if c == "[":
                in_class = pattern[i + 1:i + 2] == "^"
                i += 2 if in_class else 1
                if pattern[i:i + 1] == "]":  # a ']' first in a class is one of its members
                    i += 1
                continue
        elif c == "]":
            in_class = None
        elif c == '"' and not in_class:
            return True
        i += 1
    return False


def _checked_schema(s: Any, path: str = "#", names: bool = False) -> Any:
    """A copy of the (sub)schema `s` as xgrammar should compile it; ValueError naming the first keyword it would
    not enforce. names: `s` is a propertyNames schema (its instances are strings, said or not)."""
    if not isinstance(s, dict):
        return s  # a boolean schema; anything else is xgrammar's to refuse
    s = dict(s)

    def unsupported(what: str) -> ValueError:
        return ValueError(f"{what} at {path} (xgrammar would not enforce it)")

    for k in _IGNORED_KW:
        if k in s:
            raise unsupported(repr(k))
    if s.get("uniqueItems") is True:
        raise unsupported("'uniqueItems'")
    kws = _CHECKED_KW & s.keys()
    for k in _ALONE_KW:
        others = sorted(kws - {k, *(("type",) if k in ("enum", "const") else ())})
        if k in s and others:
            raise unsupported(f"{k!r} with {others[0]!r} beside it")
    ref = s.get("$ref")
    if isinstance(ref, str) and not (ref == "#" or ref.startswith("#/")):
        raise unsupported(f"'$ref' {ref!r} (only local references, #/...)")
    if isinstance(s.get("allOf"), list) and len(s["allOf"]) > 1:
        raise unsupported("'allOf' with several schemas")
    t = s.get("type")
    types = {t} if isinstance(t, str) else {x for x in t if isinstance(x, str)} if isinstance(t, list) else set()
    if names and not types:
        types = {"string"}
    if types and ("enum" in s or "const" in s):
        values = s["enum"] if isinstance(s.get("enum"), list) else [s["const"]] if "const" in s else []
        for v in values:
            if not any(_of_type(v, x) for x in types):
                raise unsupported(f"an 'enum' or 'const' value of another type than 'type' ({v!r:.40})")
    if not types:  # xgrammar infers objects and arrays from their keywords, but not strings and numbers
        loose = sorted(kws & (_STRING_KW | _NUMBER_KW))
        if not kws & {"items", "prefixItems"}:
            loose += sorted(kws & {"minItems", "maxItems", "unevaluatedItems"})
        if loose:
            raise unsupported(f"{loose[0]!r} without a 'type'")
    if "string" in types:
        fmt = s.get("format")
        if fmt is not None and not isinstance(fmt, str):
            raise ValueError(f"'format' must be a string, got {fmt!r:.60}")
        if fmt in _UNENFORCED_FORMATS:
            raise unsupported(f"'format' {fmt!r}")
        if isinstance(fmt, str) and fmt not in _FORMATS:
            del s["format"]
        given = [k for k in ("format", "pattern") if k in s] + \
            ["minLength/maxLength"] * ("minLength" in s or "maxLength" in s)
        if len(given) > 1:  # xgrammar keeps one of them
            raise unsupported(f"{given[0]!r} with {given[1]!r} beside it")
        lo, hi = s.get("minLength", 0), s.get("maxLength")
        if given == ["minLength/maxLength"] and all(is_int(x) and x >= 0 for x in (lo, 0 if hi is None else hi)):
            # xgrammar's length-bounded strings admit raw control characters (not JSON); its patterns do not
            # (no control character, line break or escape: a subset of the strings allowed). Surrogates are
            # excluded too: "." took U+D800-DFFF as one character, written as 3 bytes that are no UTF-8 (each
            # decoded to U+FFFD: one character became three, past maxLength).
            s.pop("minLength", None)
            s.pop("maxLength", None)
            s["pattern"] = f"^[^\\x00-\\x1f\\ud800-\\udfff]{{{lo},{'' if hi is None else hi}}}$"
    if "multipleOf" in s and types & {"integer", "number"}:
        m = s["multipleOf"]
        if "number" in types or not is_int(m):
            raise unsupported("'multipleOf' other than an integer's by an integer")
        bounds = sorted(kws & (_NUMBER_KW - {"multipleOf"}))
        if bounds:
            raise unsupported(f"'multipleOf' with {bounds[0]!r} beside it")
    if types == {"integer"}:
        _whole_bounds(s)
    patterns = [s["pattern"]] if isinstance(s.get("pattern"), str) else []
    patterns += list(s["patternProperties"]) if isinstance(s.get("patternProperties"), dict) else []
    if any(_LOOKAHEAD.search(p) for p in patterns):
        raise unsupported("a lookahead in a pattern")
    if any(_may_match_quote_or_backslash(p) for p in patterns):
        # xgrammar matches a pattern against the string's raw JSON text: a quote or backslash it lets through
        # ends the string early or starts an escape (invalid JSON, or another value than the pattern's)
        raise unsupported("a pattern that can match '\"' or '\\'")
    req, props = s.get("required"), s.get("properties")
    if isinstance(req, list):
        missing = [r for r in req if isinstance(r, str) and not (isinstance(props, dict) and r in props)]
        if missing:
            raise unsupported(f"'required' naming {missing[0]!r}, which 'properties' does not define")

    def sub(key: str, name: str | int | None = None) -> str:
        part = key if name is None else f"{key}/{str(name).replace('~', '~0').replace('/', '~1')}"
        return f"{path}/{part}"

    for k in ("properties", "patternProperties", "$defs", "definitions"):
        if isinstance(s.get(k), dict):
            s[k] = {n: _checked_schema(v, sub(k, n)) for n, v in s[k].items()}
    for k in ("additionalProperties", "unevaluatedProperties", "items", "unevaluatedItems", "propertyNames"):
        if k in s:
            s[k] = _checked_schema(s[k], sub(k), names=k == "propertyNames")
    for k in ("prefixItems", "anyOf", "oneOf", "allOf"):
        if isinstance(s.get(k), list):
            s[k] = [_checked_schema(v, sub(k, i)) for i, v in enumerate(s[k])]
    return s


def json_schema_for_grammar(schema: dict[str, Any] | str) -> str:
    """The JSON text that xgrammar compiles for `schema` (a dict or its JSON text): minLength / maxLength strings
    as patterns, and a ValueError naming the first keyword that xgrammar would silently not enforce."""
    return json.dumps(_checked_schema(json.loads(schema) if isinstance(schema, str) else schema))


def current_tag(tag: Any) -> Any:
    """vLLM's first structural-tag form ({"type": "structural_tag", "structures": [{"begin", "schema", "end"}],
    "triggers": [...]}, also its response_format's) as xgrammar's current one (a "format": triggered tags, each
    a JSON schema between its begin and end); any other value as it is. ValueError naming a malformed part."""
    if not isinstance(tag, dict) or "format" in tag or "structures" not in tag:
        return tag
    structures, triggers = tag.get("structures"), tag.get("triggers")
    if not isinstance(structures, list) or not structures:
        raise ValueError("structures must be a non-empty list of {begin, schema, end}")
    if not isinstance(triggers, list) or not triggers or not all(isinstance(t, str) and t for t in triggers):
        raise ValueError("triggers must be a non-empty list of strings")
    tags = []
    for i, st in enumerate(structures):
        if not (isinstance(st, dict) and isinstance(st.get("begin"), str) and isinstance(st.get("end"), str)
                and isinstance(st.get("schema"), dict)):
            raise ValueError(f"structures[{i}] must be an object with begin and end strings and a schema object")
        tags.append({"type": "tag", "begin": st["begin"], "end": st["end"],
                     "content": {"type": "json_schema", "json_schema": st["schema"]}})
    return {"type": "structural_tag", "format": {"type": "triggered_tags", "triggers": triggers, "tags": tags}}


def _checked_tag(x: Any) -> Any:
    """A structural tag (parsed) with each of its JSON schemas checked as `json_schema_for_grammar` does."""
    if isinstance(x, list):
        return [_checked_tag(v) for v in x]
    if not isinstance(x, dict):
        return x
    out = {k: _checked_tag(v) for k, v in x.items()}
    if x.get("type") == "json_schema" and isinstance(x.get("json_schema"), dict):
        out["json_schema"] = _checked_schema(x["json_schema"])
    return out


def compile_grammar(tokenizer: Tokenizer, vocab_size: int, stop_ids: Sequence[int], params: SamplingParams
                    ) -> Any | None:
    """The compiled grammar of `params` (None without one). Raises ValueError naming the field
    (guided_json / structural_tag / guided_regex) for a schema, tag or expression xgrammar rejects, or a JSON
    schema keyword it would not enforce."""
    field = next((n for n in GRAMMAR_FIELDS if getattr(params, n) is not None), None)
    if field is None:
        return None
    spec, tag = params.guided_json, params.structural_tag
    if tag is not None:
        try:
            tag = current_tag(json.loads(tag) if isinstance(tag, str) else tag)
        except ValueError as e:  # JSONDecodeError among them
            raise ValueError(f"{field} is not a valid structural tag: {e}") from None
    try:
        if spec is not None and spec is not True:
            spec = json_schema_for_grammar(spec)
        if tag is not None:
            tag = json.dumps(_checked_tag(tag))
    except ValueError as e:
        raise ValueError(f"{field} uses a JSON schema feature that is not supported: {e}") from None
    except RecursionError:
        raise ValueError(f"{field} is not a valid JSON schema: nested too deeply") from None
    comp = _compiler(tokenizer, vocab_size, stop_ids)
    try:
        if params.guided_regex is not None:
            return comp.compile_regex(params.guided_regex)
        if params.guided_grammar is not None:
            return comp.compile_grammar(params.guided_grammar)
        if params.guided_choice is not None:
            # One string literal per choice (JSON escapes are the grammar's too). Not ASCII-escaped: a character
            # outside the BMP would be two \u surrogate escapes, which the grammar reads as two lone surrogates.
            return comp.compile_grammar("root ::= " + " | ".join(json.dumps(c, ensure_ascii=False)
                                                                 for c in params.guided_choice))
        if tag is not None:
            return comp.compile_structural_tag(tag)
        # any_whitespace=False: fixed separators (", ", ": ") and no free whitespace, as vLLM's
        # disable-any-whitespace: small or undertrained models otherwise loop on spaces and newlines.
        if spec is True:
            # Any JSON object (OpenAI's json_object); strict_mode off so it may have any properties.
            return comp.compile_json_schema('{"type": "object"}', any_whitespace=False, strict_mode=False)
        return comp.compile_json_schema(spec, any_whitespace=False)
    except (RuntimeError, ValueError, TypeError) as e:
        msg = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        # xgrammar prefixes its messages with "[time] file:line: "; keep the message itself.
        msg = msg.split(": ", 1)[1] if msg.startswith("[") and ": " in msg else msg
        what = {"structural_tag": "structural tag", "guided_regex": "regular expression",
                "guided_choice": "list of choices", "guided_grammar": "EBNF grammar"}.get(field, "JSON schema")
        raise ValueError(f"{field} is not a valid {what}: {msg}") from None


def new_matcher(tokenizer: Tokenizer, vocab_size: int, stop_ids: Sequence[int], params: SamplingParams,
                prompt_ids: Sequence[int] = ()) -> GrammarMatcher | None:
    """A fresh matcher for one sequence of `params` (None without a grammar). stop_ids: the tokens that end
    the sequence once the grammar is complete (the model's EOS ids). With params.reasoning_tags, an
    `AfterReasoning` over it, unless the prompt already closed the reasoning block (thinking turned off: the
    chat template writes the empty block)."""
    grammar = compile_grammar(tokenizer, vocab_size, stop_ids, params)
    if grammar is None:
        return None
    matcher = Utf8Matcher(_xgr().GrammarMatcher(grammar), _utf8_table(tokenizer, vocab_size, stop_ids))
    tags = params.reasoning_tags
    if tags is None or tokenizer.decode(list(prompt_ids[-_TAG_WINDOW:]), skip_special_tokens=False).rstrip() \
            .endswith(tags[1]):
        return matcher
    return AfterReasoning(matcher, tokenizer, _token_mask(tokenizer, vocab_size, stop_ids, tags[0]),
                          _token_mask(tokenizer, vocab_size, stop_ids, "blank"), tags)


_TAG_WINDOW = 8  # tokens decoded to find a tag (a tag is a few tokens at most)


def _token_mask(tokenizer: Tokenizer, vocab_size: int, stop_ids: Sequence[int], key: str) -> Tensor:
    """[ceil(V/32)] int32 bitmask (xgrammar's layout) of tokens by their text. key "blank": the whitespace-only
    ones; otherwise a tag: the tokens an output can open it with (their text, leading whitespace dropped, a
    start of it or starting with it) and the tag's own token."""
    entry = _entry(tokenizer, vocab_size, stop_ids)
    with _lock:
        masks = entry[3]
        if key not in masks:
            texts = [b.decode("utf-8", "ignore") for b in entry[1].decoded_vocab[:vocab_size]]
            if key == "blank":
                ids = [i for i, t in enumerate(texts) if t and not t.strip()]
            else:
                ids = [i for i, t in enumerate(texts) if (s := t.lstrip()) and (key.startswith(s) or s.startswith(key))]
                special = tokenizer.token_id(key)
                if special is not None and special < vocab_size:
                    ids.append(special)
            bits = np.zeros(vocab_size, bool)
            bits[ids] = True
            masks[key] = _bitmask(bits)
        return masks[key]


def _has(mask: Tensor, token: int) -> bool:
    return bool((int(mask[token // 32]) >> (token % 32)) & 1)


class AfterReasoning:
    """A grammar matcher for an output that may think first (vLLM's structured outputs with a reasoning parser).
    At the first token the grammar's tokens and those that open the reasoning tag are allowed: an output that
    opens otherwise is the grammar's from there on; one that opens the tag runs free until the closing tag
    (found in the text of its last few tokens). Whitespace may follow the closing tag (as the model writes it
    there; the reasoning parser drops it), then the grammar applies to the answer. Text after the closing tag
    in the same token is given to the grammar."""

    def __init__(self, inner: Utf8Matcher, tokenizer: Tokenizer, opening: Tensor, blank: Tensor,
                 tags: tuple[str, str]) -> None:
        self.inner, self.tokenizer, self.opening, self.blank, self.tags = inner, tokenizer, opening, blank, tags
        self.state = "start"  # start, reasoning, gap (after the reasoning, before the answer), answer
        self._ids: list[int] = []  # the reasoning's last tokens
        self._close_id = tokenizer.token_id(tags[1])

    def fill_next_token_bitmask(self, bitmask: Tensor, row: int) -> Any:
        if self.state == "reasoning":
            return None  # the row stays all allowed
        out = self.inner.fill_next_token_bitmask(bitmask, row)
        extra = {"start": self.opening, "gap": self.blank}.get(self.state)
        if extra is not None:
            mine = bitmask[row]
            n = min(mine.shape[0], extra.shape[0])
            mine[:n] |= extra[:n]
        return out

    def accept_token(self, token: int) -> bool:
        if self.state == "answer":
            return self.inner.accept_token(token)
        if self.state != "reasoning":
            if self.inner.accept_token(token):  # the grammar's own (preferred where both fit)
                self.state = "answer"
                return True
            if self.state == "gap":
                return _has(self.blank, token)  # whitespace before the answer, else rejected
            if not _has(self.opening, token):  # neither the grammar's nor an opening: rejected
                self.state = "answer"
                return False
            self.state = "reasoning"
        self._ids = (self._ids + [token])[-_TAG_WINDOW:]
        text = self.tokenizer.decode(self._ids, skip_special_tokens=False)
        close = self.tags[1]
        if close in text or token == self._close_id:
            self.state = "gap"
            rest = text.split(close, 1)[1].lstrip() if close in text else ""
            if rest:
                self.state = "answer"
                return self.inner.accept_string(rest)
        return True

    def is_terminated(self) -> bool:
        return self.state == "answer" and self.inner.is_terminated()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def apply_grammar(x: Tensor, rows: Sequence[int], matchers: Sequence[GrammarMatcher]) -> None:
    """Set to -inf, in the [B, V] logits x (CPU or CUDA), every token matchers[j] does not allow next in row
    rows[j]."""
    xgr = _xgr()
    bitmask = xgr.allocate_token_bitmask(x.shape[0], x.shape[1])  # all allowed; only `rows` are filled
    for i, m in zip(rows, matchers):
        m.fill_next_token_bitmask(bitmask, i)
    if x.device.type != "cpu":
        bitmask = bitmask.to(x.device, non_blocking=True)
    xgr.apply_token_bitmask_inplace(x, bitmask, vocab_size=x.shape[1], indices=list(rows))


def _call_schema(fn: dict[str, Any]) -> dict[str, Any]:
    """JSON schema of one call line's object: {"name": <this function>, "arguments": <its parameters>}."""
    params = fn.get("parameters")
    if params is None:
        params = {"type": "object", "properties": {}}
    return {"type": "object", "properties": {"name": {"const": fn["name"]}, "arguments": params},
            "required": ["name", "arguments"], "additionalProperties": False}


def tool_call_structural_tag(tools: Sequence[dict[str, Any]], name: str | None = None, parallel: bool = True
                             ) -> dict[str, Any]:
    """An xgrammar structural tag for MiniCPM4's tool-call lines (what `cpm4.serve.tool_calls` parses):
    `<|tool_call|>` (the token) then `{"name": ..., "arguments": {...}}`, the name one of `tools` (OpenAI
    function definitions: {"name", "parameters", ...}) or `name` alone, the arguments following that tool's
    parameters schema. parallel: one or more calls, one a line; else exactly one."""
    fns = [t for t in tools if name is None or t["name"] == name]
    if not fns:
        raise ValueError(f"tool_choice names {name!r}, which is not among the tools")
    tags = [{"type": "tag", "begin": {"type": "token", "token": TOOL_CALL},
             # excludes: a marker inside a string value would split the call when it is parsed. At most one
             # whitespace character between JSON elements (the format's any-whitespace JSON can loop on them).
             "content": {"type": "json_schema", "json_schema": _call_schema(f), "excludes": [TOOL_CALL],
                         "max_whitespace_cnt": 1},
             "end": ""} for f in fns]
    return {"type": "structural_tag", "format": {"type": "tags_with_separator", "tags": tags, "separator": "\n",
                                                  "at_least_one": True, "stop_after_first": not parallel}}
