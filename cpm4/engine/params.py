"""Request parameters (`SamplingParams`) with vLLM/OpenAI semantics, and the checks of their values. No torch here:
the command line, the server and a generation config check a request's values before torch is imported."""

from __future__ import annotations

import copy
import enum
import inspect
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cpm4.model.config import is_int, is_number

# Temperatures below this are treated as greedy (as vLLM does): dividing by ~0 overflows.
_GREEDY_EPS = 1e-5


# SamplingParams fields that each give a grammar (at most one per request).
GRAMMAR_FIELDS = ("guided_json", "structural_tag", "guided_regex", "guided_choice", "guided_grammar")
# vLLM's structured_outputs keys (offline and in requests; json_object aside) and the field each sets.
STRUCTURED_FIELDS = {"json": "guided_json", "regex": "guided_regex", "choice": "guided_choice",
                     "grammar": "guided_grammar", "structural_tag": "structural_tag"}


class RequestOutputKind(enum.IntEnum):
    """What each output of `cpm4.AsyncLLM.generate` holds (vLLM's enum, same values; `LLM.generate` gives final
    outputs whatever it says, as vLLM's)."""

    CUMULATIVE = 0  # everything generated so far
    DELTA = 1  # only what is new since the last output (and only the completions that changed)
    FINAL_ONLY = 2  # one output, at the end


# How waiting requests are ordered (vLLM's --scheduling-policy): "fcfs" by arrival; "priority" by
# SamplingParams.priority (lower first), then arrival, and under KV pressure the running request with the largest
# (priority, arrival) is preempted first.
SCHEDULING_POLICIES = ("fcfs", "priority")


def check_scheduling_policy(policy: str) -> None:
    if policy not in SCHEDULING_POLICIES:
        raise ValueError(f"scheduling_policy must be one of {', '.join(SCHEDULING_POLICIES)}, got {policy!r}")


def check_priority(params: SamplingParams, policy: str) -> None:
    """A request's priority against the engine's policy: as vLLM, one other than 0 needs priority scheduling."""
    if params.priority != 0 and policy != "priority":
        raise ValueError(f"priority {params.priority} needs priority scheduling (scheduling_policy=\"priority\", "
                         "--scheduling-policy priority); this engine serves requests in arrival order")


def truncate_prompt(prompt: list[int], keep: int | None, context: int) -> list[int]:
    """vLLM's truncate_prompt_tokens: the prompt's last `keep` tokens (None: all; -1: the last context - 1, the
    longest prompt a context of that many tokens serves)."""
    if keep == -1:
        keep = context - 1
    return prompt[-keep:] if keep is not None and len(prompt) > keep else prompt


def valid_text(s: str) -> bool:
    """Whether s is valid Unicode text (no lone surrogate, which the tokenizer refuses with a TypeError)."""
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


@dataclass
class StructuredOutputsParams:
    """vLLM's offline form of a grammar (`SamplingParams(structured_outputs=StructuredOutputsParams(json=...))`;
    `GuidedDecodingParams` and `guided_decoding=` are its older names): one of a JSON schema, `json_object`, a
    regex, a list of choices, an EBNF grammar or a structural tag. `SamplingParams` folds it into its own
    `guided_*` fields. backend: only xgrammar's (what cpm4 runs) is accepted."""

    json: dict[str, Any] | str | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    structural_tag: dict[str, Any] | str | None = None
    backend: str | None = None

    def __post_init__(self) -> None:
        kinds = [k for k in STRUCTURED_FIELDS if getattr(self, k) is not None]
        if self.json_object:
            kinds.append("json_object")
        if len(kinds) != 1:
            raise ValueError("structured outputs take exactly one of json, regex, choice, grammar, json_object, "
                             f"structural_tag; got {', '.join(kinds) or 'none'}")
        if self.backend not in (None, "auto", "xgrammar"):
            raise ValueError(f"structured outputs backend {self.backend!r} is not available: cpm4 runs xgrammar")

    def sampling_fields(self) -> dict[str, Any]:
        """The `SamplingParams` field this sets, and its value."""
        if self.json_object:
            return {"guided_json": True}
        return {field: getattr(self, k) for k, field in STRUCTURED_FIELDS.items() if getattr(self, k) is not None}


GuidedDecodingParams = StructuredOutputsParams


@dataclass(kw_only=True)  # by name only: vLLM's fields come in another order (its first is n)
class SamplingParams:
    """Per-request sampling settings with vLLM/OpenAI semantics."""

    max_tokens: int | None = 256  # vLLM's default 16 cuts most answers; None (vLLM's): up to the context
    n: int = 1  # completions per prompt (offline; with a seed, completion j draws with seed + j)
    # vLLM's: the output ends no earlier: EOS and stop_token_ids cannot be sampled before this many tokens are
    # generated, and stop strings apply to the text from the token after them (a stop string beginning in the
    # text before and ending after it counts).
    min_tokens: int = 0
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    # OpenAI's penalties over the generated tokens (vLLM's rule: the prompt does not count): each logit is
    # lowered by presence_penalty if its token was generated, and by frequency_penalty per time it was.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit, before the penalties
    allowed_token_ids: list[int] | None = None  # vLLM's: only these ids may be sampled (EOS too, if listed)
    # vLLM's (its V0 form): callables each taking (output_token_ids, logits) or, with three parameters,
    # (prompt_token_ids, output_token_ids, logits), where logits is the sequence's next-token row [V] (float32,
    # on the model's device), and returning the row that replaces it; applied in order, first of all the
    # transforms (before the grammar, bias, penalties and temperature), as vLLM V0 did. They run in the engine's
    # thread: not across a process (`ProcessEngine`, the server's --engine-process refuses them). A raise ends
    # the request: `LLM.generate` raises it again, `AsyncEngine` ends that request alone with an EngineError
    # caused by it (its whole batch with continuous=False). Shared, not copied, by `clone` and by the n > 1
    # completions (each completion calls them with its own ids). `logprobs` stay the model's raw ones, as under
    # every other transform here (vLLM V1's default, raw_logprobs; V0 reported them after all the processing).
    logits_processors: list[Callable[..., Any]] | None = None
    skip_special_tokens: bool = True  # vLLM's: special tokens are left out of the text (their ids stay)
    # vLLM's field, taken for its callers: a fast tokenizer (MiniCPM4's) joins special tokens' text as it is
    # either way, as vLLM's detokenizer does with one
    spaces_between_special_tokens: bool = True
    # vLLM's: keep only the prompt's last this many tokens; -1: as many as the context serves (context - 1, one
    # left to generate)
    truncate_prompt_tokens: int | None = None
    # vLLM's: False leaves the offline outputs' text empty (token ids only); stop strings need the text
    detokenize: bool = True
    extra_args: dict[str, Any] | None = None  # vLLM's: kept for callers and plugins, read by nothing here
    # vLLM's: words never generated; a word's last token is banned where the output ends with the rest of it
    # (each word as encoded alone and after a space)
    bad_words: list[str] | None = None
    seed: int | None = None  # -1 is None (unseeded), as in vLLM
    stop: list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    # return the sampled token's log-probability and this many top alternatives (True, vLLM's: 1)
    logprobs: int | None = None
    # vLLM's: each prompt token's log-probability and this many alternatives (offline outputs; one more
    # forward pass over the prompt)
    prompt_logprobs: int | None = None
    # Structured output (grammar-constrained decoding with xgrammar, see `cpm4.engine.guided`): a JSON schema
    # (dict or its JSON text) the output must follow, or True for any JSON object (OpenAI's json_object).
    guided_json: dict[str, Any] | str | bool | None = None
    # Or an xgrammar structural tag (dict or JSON text), e.g. `guided.tool_call_structural_tag` for forced calls.
    structural_tag: dict[str, Any] | str | None = None
    # Or (vLLM's) a regular expression the whole output matches, a list of strings it is exactly one of, or a
    # context-free grammar in xgrammar's EBNF (GBNF-style, rule `root` first).
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    # With a grammar: (open, close) tags of a reasoning block the output may open with (the server's reasoning
    # parser sets ("<think>", "</think>")): the reasoning runs free and the grammar applies to the answer after
    # it, as vLLM's structured outputs with a reasoning parser. None: the grammar applies from the first token.
    reasoning_tags: tuple[str, str] | None = None
    # With scheduling_policy "priority": lower values are scheduled first (vLLM's `priority`, which it passes beside
    # the params; here it rides in them, so every front end carries it). 0 under "fcfs".
    priority: int = 0
    # vLLM's: what `AsyncLLM.generate`'s outputs hold (a RequestOutputKind, or its name: "delta"...).
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    # vLLM's nested form of the grammar fields above (and its older name): folded into them, then None.
    structured_outputs: StructuredOutputsParams | None = None
    guided_decoding: StructuredOutputsParams | None = None

    def __post_init__(self) -> None:
        for name in ("structured_outputs", "guided_decoding"):
            nested = getattr(self, name)
            if nested is None:
                continue
            if isinstance(nested, Mapping):
                nested = StructuredOutputsParams(**nested)
            if not isinstance(nested, StructuredOutputsParams):
                raise ValueError(f"{name} must be a StructuredOutputsParams, got {type(nested).__name__}")
            for field, value in nested.sampling_fields().items():
                if getattr(self, field) is not None:
                    raise ValueError(f"{name} and {field} both give a grammar: give one")
                setattr(self, field, value)
            setattr(self, name, None)
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        elif self.stop is not None:
            if isinstance(self.stop, (bytes, Mapping)) or not isinstance(self.stop, Iterable):
                raise ValueError(f"stop must be a string or a list of strings, got {self.stop!r:.80}")
            self.stop = list(self.stop)
        if self.stop_token_ids is not None:
            if isinstance(self.stop_token_ids, (str, bytes, Mapping)) or not isinstance(self.stop_token_ids, Iterable):
                raise ValueError(f"stop_token_ids must be a list of token ids, got {self.stop_token_ids!r:.80}")
            self.stop_token_ids = list(self.stop_token_ids)

        self.output_kind = _output_kind(self.output_kind)
        if not is_int(self.priority) or not -(2**63) <= self.priority < 2**63:
            raise ValueError(f"priority must be an int (int64), got {self.priority!r}")
        # `not (x >= lo)` also rejects NaN.
        if not is_int(self.n) or self.n < 1:
            raise ValueError(f"n must be a positive int, got {self.n!r}")
        if self.max_tokens is not None and (not is_int(self.max_tokens) or self.max_tokens < 1):
            raise ValueError(f"max_tokens must be >= 1 or None (up to the context), got {self.max_tokens!r}")
        if not is_int(self.min_tokens) or not 0 <= self.min_tokens <= (self.max_tokens or self.min_tokens):
            raise ValueError(f"min_tokens must be an int in [0, max_tokens={self.max_tokens}], got {self.min_tokens!r}")
        # Logits are processed in float32: a temperature or penalty past ~1e38 (or a penalty below ~1e-38)
        # became inf (0) there, and 0 * inf or inf / inf made NaN logits, which argmax and the sampler took for
        # the best token (even one allowed_token_ids excluded). 1e30 leaves room for any logit.
        if not is_number(self.temperature) or not 0 <= self.temperature <= 1e30:
            raise ValueError(f"temperature must be a number in [0, 1e30], got {self.temperature!r}")
        if not is_int(self.top_k) or self.top_k < -1:
            raise ValueError(f"top_k must be -1, 0 (off) or positive, got {self.top_k!r}")
        if not is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not is_number(self.min_p) or not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p!r}")
        if not is_number(self.repetition_penalty) or not 1e-30 <= self.repetition_penalty <= 1e30:
            raise ValueError(f"repetition_penalty must be a number in [1e-30, 1e30], got {self.repetition_penalty!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not is_number(v) or not -2 <= v <= 2:
                raise ValueError(f"{name} must be a number in [-2, 2], got {v!r}")
        if self.logit_bias is not None:
            bias = {}
            for t, b in dict(self.logit_bias).items():
                # ints, or their ASCII digits as strings (OpenAI sends the ids as JSON object keys; int() also read
                # other scripts' digits, and failed past 4,300 digits naming no field); not floats or bools, which
                # int() would quietly truncate to another id.
                digits = t.strip().lstrip("+-") if isinstance(t, str) else ""
                if digits.isascii() and digits.isdecimal() and len(digits) <= 20:
                    tid = int(t)
                elif is_int(t):
                    tid = t
                else:
                    raise ValueError(f"logit_bias keys must be token ids, got {t!r:.60}")
                if tid < 0 or not is_number(b) or not -100 <= b <= 100:
                    raise ValueError(f"logit_bias needs token ids >= 0 and biases in [-100, 100], got {t!r}: {b!r}")
                bias[tid] = float(b)
            self.logit_bias = bias or None
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is True:  # vLLM's: True is 1 (the sampled token and the most likely one)
                v = 1
                setattr(self, name, v)
            if v is not None and (not is_int(v) or not 0 <= v <= 20):
                raise ValueError(f"{name} must be an int in [0, 20] or None, got {v!r}")
        if self.seed is not None and is_int(self.seed) and self.seed == UNSEEDED:
            self.seed = None
        # int64, as OpenAI's and the server's (completion j of n draws with seed + j, still a valid torch seed).
        if self.seed is not None and (not is_int(self.seed)
                                      or not -(2**63) <= self.seed < 2**63):
            raise ValueError(f"seed must be an int in [-2**63, 2**63) or None, got {self.seed!r}")
        if self.stop is not None:
            for s in self.stop:
                if not isinstance(s, str) or not s or not valid_text(s):
                    raise ValueError(f"stop strings must be non-empty str, got {s!r}")
        if self.allowed_token_ids is not None:
            ids = self.allowed_token_ids
            if isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence) or not ids or \
                    not all(is_int(t) and t >= 0 for t in ids):
                raise ValueError(f"allowed_token_ids must be a non-empty list of token ids, got {ids!r:.80}")
            self.allowed_token_ids = sorted(set(ids))
        if self.bad_words is not None:
            if isinstance(self.bad_words, str) or not isinstance(self.bad_words, Sequence) or \
                    not all(isinstance(w, str) and w.strip() and valid_text(w) for w in self.bad_words):
                raise ValueError(f"bad_words must be a list of non-empty strings, got {self.bad_words!r:.80}")
            self.bad_words = list(self.bad_words) or None
        if self.logits_processors is not None:
            self.logits_processors = _checked_processors(self.logits_processors)
        for name in ("skip_special_tokens", "spaces_between_special_tokens", "detokenize"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        t = self.truncate_prompt_tokens
        if t is not None and (not is_int(t) or t < 1 and t != -1):
            raise ValueError(f"truncate_prompt_tokens must be a positive int, -1 (the context) or None, got {t!r}")
        if self.stop and not self.detokenize:
            raise ValueError("stop strings are matched on the text: they need detokenize=True")
        if self.stop_token_ids is not None:
            for t in self.stop_token_ids:
                if not is_int(t) or t < 0:
                    raise ValueError(f"stop_token_ids must be non-negative ints, got {t!r}")
        if self.guided_json is False:
            self.guided_json = None
        if self.guided_json is not None and self.guided_json is not True:
            self.guided_json = _json_object("guided_json", self.guided_json, "True, a JSON schema object")
        if self.structural_tag is not None:
            self.structural_tag = _json_object("structural_tag", self.structural_tag, "a structural tag object")
        # A regex of spaces is one (" " matches a space: found by the guided fuzz at another seed); a grammar of
        # spaces has no rule.
        for name, blank_ok in (("guided_regex", True), ("guided_grammar", False)):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, str) or not (v if blank_ok else v.strip()) or not valid_text(v)):
                raise ValueError(f"{name} must be a non-empty string, got {v!r:.80}")
        if self.guided_choice is not None:
            if isinstance(self.guided_choice, str) or not isinstance(self.guided_choice, Sequence) or \
                    not self.guided_choice or not all(isinstance(c, str) and c and valid_text(c)
                                                      for c in self.guided_choice):
                raise ValueError(f"guided_choice must be a non-empty list of non-empty strings, got "
                                 f"{self.guided_choice!r}")
            self.guided_choice = list(self.guided_choice)
        given = [n for n in GRAMMAR_FIELDS if getattr(self, n) is not None]
        if len(given) > 1:
            raise ValueError(f"{' and '.join(given)} are exclusive: give one grammar")
        if self.reasoning_tags is not None:
            tags = self.reasoning_tags
            if not (isinstance(tags, (tuple, list)) and len(tags) == 2 and all(isinstance(t, str) and t for t in tags)):
                raise ValueError(f"reasoning_tags must be (open, close) strings, got {tags!r:.60}")
            self.reasoning_tags = tuple(tags)
        if self.min_tokens and self.guided:  # a finished grammar allows only EOS: nothing would be left
            raise ValueError(f"min_tokens cannot be combined with {given[0]}")

    @property
    def guided(self) -> bool:
        """Whether the output is constrained by a grammar."""
        return any(getattr(self, n) is not None for n in GRAMMAR_FIELDS)

    @property
    def greedy(self) -> bool:
        return self.temperature < _GREEDY_EPS

    def check_vocab(self, vocab: int) -> None:
        """Token ids these params name (logit_bias) must be ids of the model: checked when a request is
        added, so a bad one fails alone instead of the batch step it would join."""
        if self.logit_bias and max(self.logit_bias) >= vocab:
            raise ValueError(f"logit_bias token id {max(self.logit_bias)} is outside the vocabulary ({vocab} ids)")
        if self.allowed_token_ids and self.allowed_token_ids[-1] >= vocab:
            raise ValueError(f"allowed_token_ids id {self.allowed_token_ids[-1]} is outside the vocabulary "
                             f"({vocab} ids)")

    def truncate(self, prompt: list[int], context: int) -> list[int]:
        """The prompt as generation sees it (`truncate_prompt`)."""
        return truncate_prompt(prompt, self.truncate_prompt_tokens, context)

    def clone(self) -> SamplingParams:
        """A deep copy (vLLM's `clone`), whose logits processors are the same objects, or the copies their own
        `clone()` makes where they have one (vLLM's rule: a processor may hold state too large, or impossible, to
        copy)."""
        memo: dict[int, Any] = {}
        for fn in self.logits_processors or ():
            own = getattr(fn, "clone", None)
            memo[id(fn)] = own() if callable(own) else fn
        return copy.deepcopy(self, memo)

    @staticmethod
    def from_optional(**kwargs: Any) -> SamplingParams:
        """vLLM's `from_optional`: SamplingParams(**kwargs) where None for n, the penalties, temperature or top_p
        means its default, and logit_bias values are clamped to [-100, 100]."""
        for name, default in (("n", 1), ("presence_penalty", 0.0), ("frequency_penalty", 0.0),
                              ("repetition_penalty", 1.0), ("temperature", 1.0), ("top_p", 1.0)):
            if name in kwargs and kwargs[name] is None:
                kwargs[name] = default
        if kwargs.get("logit_bias") is not None:
            kwargs["logit_bias"] = {t: min(100.0, max(-100.0, b)) if is_number(b) else b
                                    for t, b in dict(kwargs["logit_bias"]).items()}
        return SamplingParams(**kwargs)


def _output_kind(kind: Any) -> RequestOutputKind:
    if isinstance(kind, str):
        try:
            return RequestOutputKind[kind.upper()]
        except KeyError:
            pass
    elif is_int(kind) and kind in set(RequestOutputKind):
        return RequestOutputKind(kind)
    raise ValueError(f"output_kind must be a RequestOutputKind (or 'cumulative', 'delta', 'final_only'), got {kind!r}")


def processor_takes_prompt(fn: Callable[..., Any]) -> bool:
    """Whether a logits processor takes the prompt's ids first: vLLM's rule, three parameters (else it is called
    with the output's ids and the logits), where three can be passed by position. A third that cannot (keyword-only
    or **kwargs, as in `functools.partial(fn, scale=2.0)`) leaves the short form, the only one such a callable takes
    (vLLM called it with three and failed). A callable whose signature cannot be read takes the short form."""
    try:
        sig = inspect.signature(fn)
        sig.bind(None, None, None)
    except (TypeError, ValueError):
        return False
    return len(sig.parameters) == 3


def _checked_processors(fns: object) -> list[Callable[..., Any]] | None:
    """SamplingParams.logits_processors as a list (None when empty), or a ValueError naming the field: a list or
    tuple of callables, each callable with the arguments `processor_takes_prompt` says it gets."""
    if not isinstance(fns, (list, tuple)):
        raise ValueError(f"logits_processors must be a list of callables, got {type(fns).__name__}")
    for i, fn in enumerate(fns):
        if not callable(fn):
            raise ValueError(f"logits_processors[{i}] must be callable, got {type(fn).__name__}")
        try:
            sig = inspect.signature(fn)
        except (TypeError, ValueError):  # (some builtins): left to the call
            continue
        n = 3 if processor_takes_prompt(fn) else 2
        try:
            sig.bind(*[None] * n)
        except TypeError:
            raise ValueError(f"logits_processors[{i}] must take (output_token_ids, logits) or (prompt_token_ids, "
                             f"output_token_ids, logits), got {getattr(fn, '__name__', type(fn).__name__)}"
                             f"{sig}") from None
    return list(fns) or None


def check_no_lora(lora_request: object) -> None:
    """vLLM's lora_request argument: None (what code written for vLLM passes without adapters) is taken; an
    adapter is refused, for cpm4 runs the checkpoint's own weights only."""
    if lora_request is not None:
        raise ValueError("LoRA adapters are not supported: lora_request must be None")


UNSEEDED = -1  # a seed of -1 is none (vLLM's rule: "-1 means random" is a common convention)


def nth_seed(seed: int | None, j: int) -> int | None:
    """The seed of completion j of n drawn with `seed` (None: unseeded), as the server and the offline engine
    derive it: seed + j, wrapped into SamplingParams' int64 range (a seed near 2**63 - 1 plus j left it)."""
    if seed is None or seed == UNSEEDED:
        return None
    return (seed + j + 2**63) % 2**64 - 2**63


def _json_object(name: str, value: object, what: str) -> dict[str, Any] | str:
    """A dict as it is, or JSON text of an object (kept as text: the grammar compiler takes text); else a
    ValueError naming the field."""
    if isinstance(value, dict):
        return value
    if isinstance(value, str):
        try:
            if isinstance(json.loads(value), dict):
                return value
        except ValueError:
            pass
    raise ValueError(f"{name} must be {what} or its JSON text, got {value!r:.80}")
