"""Grammar-constrained decoding (structured outputs) with xgrammar, as vLLM does it.

A request with `SamplingParams.guided_json` (a JSON schema, or True for any JSON object) or
`SamplingParams.structural_tag` (an xgrammar structural tag: forced tool calls) gets a compiled grammar and, per
sequence, a `GrammarMatcher`. Before each sampling step the matcher's allowed-token bitmask sets every other
logit of its row to -inf; after it the matcher takes the sampled token. Stop tokens are allowed only where
the grammar is complete, so a sequence ends ("stop") exactly when its output is a whole document.

xgrammar is an optional dependency (`pip install 'cpm4[guided]'`), imported on first use.
"""

from __future__ import annotations

import json
import threading
import weakref
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from torch import Tensor

from cpm4.model.tokenizer import TOOL_CALL, Tokenizer

from .sampling import GRAMMAR_FIELDS

if TYPE_CHECKING:
    import xgrammar

    from .sampling import SamplingParams

__all__ = ["GrammarMatcher", "apply_grammar", "compile_grammar", "new_matcher", "tool_call_structural_tag"]

# The tool-call marker stays matchable as a token (the grammar of a forced call starts with it); every other
# special token is blanked in the grammar's vocabulary, so no grammar emits one as text (inside a JSON string
# it would vanish on decoding, and the stop tokens are handled by the matcher itself).
_KEPT_SPECIAL = (TOOL_CALL,)

_lock = threading.Lock()
# Tokenizer -> {(model vocab size, stop ids): compiler}: building the token tables takes a while on a real
# vocabulary (73k ids), so it is done once per tokenizer; the compiler caches compiled grammars itself.
_compilers: weakref.WeakKeyDictionary[Tokenizer, dict[tuple[int, tuple[int, ...]], Any]] = \
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


def _compiler(tokenizer: Tokenizer, vocab_size: int, stop_ids: Sequence[int]) -> Any:
    key = (int(vocab_size), tuple(sorted(set(stop_ids))))
    with _lock:
        per = _compilers.setdefault(tokenizer, {})
        comp = per.get(key)
        if comp is None:
            comp = per[key] = _xgr().GrammarCompiler(_tokenizer_info(tokenizer, *key), max_threads=2)
    return comp


def compile_grammar(tokenizer: Tokenizer, vocab_size: int, stop_ids: Sequence[int], params: SamplingParams
                    ) -> Any | None:
    """The compiled grammar of `params` (None without one). Raises ValueError naming the field
    (guided_json / structural_tag / guided_regex) for a schema, tag or expression xgrammar rejects."""
    field = next((n for n in GRAMMAR_FIELDS if getattr(params, n) is not None), None)
    if field is None:
        return None
    comp = _compiler(tokenizer, vocab_size, stop_ids)
    try:
        if params.guided_regex is not None:
            return comp.compile_regex(params.guided_regex)
        if params.guided_grammar is not None:
            return comp.compile_grammar(params.guided_grammar)
        if params.guided_choice is not None:
            # One string literal per choice (JSON escapes are the grammar's too).
            return comp.compile_grammar("root ::= " + " | ".join(json.dumps(c) for c in params.guided_choice))
        if params.structural_tag is not None:
            tag = params.structural_tag
            return comp.compile_structural_tag(tag if isinstance(tag, str) else json.dumps(tag))
        spec = params.guided_json
        # any_whitespace=False: fixed separators (", ", ": ") and no free whitespace, as vLLM's
        # disable-any-whitespace: small or undertrained models otherwise loop on spaces and newlines.
        if spec is True:
            # Any JSON object (OpenAI's json_object); strict_mode off so it may have any properties.
            return comp.compile_json_schema('{"type": "object"}', any_whitespace=False, strict_mode=False)
        return comp.compile_json_schema(spec if isinstance(spec, str) else json.dumps(spec), any_whitespace=False)
    except (RuntimeError, ValueError, TypeError) as e:
        msg = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        # xgrammar prefixes its messages with "[time] file:line: "; keep the message itself.
        msg = msg.split(": ", 1)[1] if msg.startswith("[") and ": " in msg else msg
        what = {"structural_tag": "structural tag", "guided_regex": "regular expression",
                "guided_choice": "list of choices", "guided_grammar": "EBNF grammar"}.get(field, "JSON schema")
        raise ValueError(f"{field} is not a valid {what}: {msg}") from None


def new_matcher(tokenizer: Tokenizer, vocab_size: int, stop_ids: Sequence[int], params: SamplingParams
                ) -> GrammarMatcher | None:
    """A fresh matcher for one sequence of `params` (None without a grammar). stop_ids: the tokens that end
    the sequence once the grammar is complete (the model's EOS ids)."""
    grammar = compile_grammar(tokenizer, vocab_size, stop_ids, params)
    if grammar is None:
        return None
    return _xgr().GrammarMatcher(grammar)


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
