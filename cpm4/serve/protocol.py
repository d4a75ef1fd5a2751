"""Request bodies of the OpenAI-compatible API.

Unknown fields are ignored, as OpenAI-compatible servers do, so clients that send newer options still work.
Numbers and flags are strict (a string "0.5" for temperature is a 400, as with OpenAI), except that an int
is accepted where a float is expected. A null is the same as leaving the field out, except a completion's
max_tokens: null runs to the context (vLLM's), unset is 16.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, Strict, StringConstraints, field_validator, model_validator

Int = Annotated[int, Strict()]
Float = Annotated[float, Strict()]
Bool = Annotated[bool, Strict()]
Str = Annotated[str, Strict()]

# Upper bounds that keep one request from monopolising the engine.
MAX_N = 64
MAX_CHOICES = 256  # prompts x n in one completions request
MAX_LOGPROBS = 20
# Per-request list sizes. Each choice's params are checked apart (n up to MAX_N), stop strings are matched and bad
# words looked for at every step of every choice on the engine's thread, and bad words' token forms are deduplicated
# in quadratic time there: 100k stop strings held a concurrent request 20 s, 100k bad words stalled the engine for
# minutes, a 1M-entry logit_bias took 50 s.
MAX_STOP = 128  # stop strings (OpenAI takes 4)
MAX_BAD_WORDS = 128
MAX_LOGIT_BIAS = 1024  # logit_bias entries
MAX_TOKEN_IDS = 16384  # allowed_token_ids, stop_token_ids


class _Body(BaseModel):
    # Python's json accepts NaN and Infinity; no sampling setting means anything with them.
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)
    _KEEP_NULL: ClassVar[frozenset[str]] = frozenset()  # fields whose null means something else than unset

    @model_validator(mode="before")
    @classmethod
    def _null_is_unset(cls, data: Any) -> Any:
        # OpenAI's optional fields are nullable ("n": null means n = 1), and clients that serialise every field
        # send nulls; without this, a field with a non-null default (n, stream, echo, logprobs) refused them.
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None or k in cls._KEEP_NULL}
        return data


class StreamOptions(_Body):
    include_usage: Bool = True  # as vLLM's: stream_options without it ({"continuous_usage_stats": true}) asks for usage
    continuous_usage_stats: Bool = False  # extension (vLLM): usage so far in every chunk


class ResponseFormat(_Body):
    """OpenAI's output format: {"type": "text"}, {"type": "json_object"} or {"type": "json_schema",
    "json_schema": {"name": ..., "schema": {...}, "strict": ...}} (checked by the server)."""

    type: Str
    json_schema: dict[str, Any] | None = None
    # vLLM's {"type": "structural_tag", "structures": [{"begin", "schema", "end"}], "triggers": [...]}
    structures: list[Any] | None = None
    triggers: list[Any] | None = None


class StructuredOutputs(_Body):
    """vLLM's structured_outputs, its newer form of the guided_* fields: one grammar for the output."""

    json_schema: dict[str, Any] | Str | None = Field(None, alias="json")  # a JSON schema (or its JSON text)
    regex: Str | None = None
    choice: list[Str] | None = None
    grammar: Str | None = None
    json_object: Bool | None = None
    structural_tag: dict[str, Any] | Str | None = None


class _SamplingFields(_Body):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model: Str | None = None  # OpenAI requires it; a missing one means the served model
    temperature: Float | None = Field(None, ge=0)
    top_p: Float | None = Field(None, gt=0, le=1)
    top_k: Int | None = Field(None, ge=-1)  # extension (vLLM): 0 or -1 = off
    min_p: Float | None = Field(None, ge=0, le=1)  # extension
    repetition_penalty: Float | None = Field(None, gt=0)  # extension
    seed: Int | None = Field(None, ge=-(2**63), lt=2**63)  # int64, as OpenAI's
    stop: Str | list[Str] | None = None
    stop_token_ids: Annotated[list[Annotated[int, Strict(), Field(ge=0)]], Field(max_length=MAX_TOKEN_IDS)] | None \
        = None  # extension
    ignore_eos: Bool = False  # extension
    min_tokens: Int = Field(0, ge=0)  # extension (vLLM's): no EOS, stop id or stop string ends fewer tokens
    include_stop_str_in_output: Bool = False  # extension
    n: Int = Field(1, ge=1, le=MAX_N)
    stream: Bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: Float | None = Field(None, ge=-2, le=2)
    frequency_penalty: Float | None = Field(None, ge=-2, le=2)
    logit_bias: Annotated[dict[str, Float], Field(max_length=MAX_LOGIT_BIAS)] | None = None
    user: Str | None = None
    response_format: ResponseFormat | None = None  # structured output (chat; completions as vLLM's extension)
    guided_json: dict[str, Any] | Str | None = None  # extensions (vLLM): the output follows this JSON schema ...
    guided_regex: Str | None = None  # ... or matches this regular expression ...
    guided_choice: list[Str] | None = None  # ... or is exactly one of these strings
    guided_grammar: Str | None = None  # ... or follows this EBNF grammar (xgrammar's)
    structured_outputs: StructuredOutputs | None = None  # ... or any of these, as newer vLLM takes them
    allowed_token_ids: Annotated[list[Annotated[int, Strict(), Field(ge=0)]], Field(max_length=MAX_TOKEN_IDS)] \
        | None = None  # extensions (vLLM)
    skip_special_tokens: Bool = True
    spaces_between_special_tokens: Bool = True  # vLLM's; as SamplingParams' (a fast tokenizer joins them as is)
    truncate_prompt_tokens: Int | None = Field(None, ge=-1)  # vLLM's; -1: as much as the context serves
    bad_words: Annotated[list[Str], Field(max_length=MAX_BAD_WORDS)] | None = None
    priority: Int = 0  # extension (vLLM's): with --scheduling-policy priority, lower is served first
    use_beam_search: Bool = False  # extension (vLLM's): the n best beams of a beam search of width n
    length_penalty: Float = 1.0  # extension (vLLM's): beams ranked by summed logprob / length ** length_penalty

    @field_validator("stop")
    @classmethod
    def _few_stops(cls, v: str | list[str] | None) -> str | list[str] | None:
        if isinstance(v, list) and len(v) > MAX_STOP:  # (as max_length, pydantic's error named the str branch)
            raise ValueError(f"at most {MAX_STOP} stop strings, got {len(v)}")
        return v

    @field_validator("truncate_prompt_tokens")
    @classmethod
    def _keep_some(cls, v: int | None) -> int | None:
        if v == 0:
            raise ValueError("truncate_prompt_tokens must be a positive number of tokens, or -1 (the context)")
        return v

class CompletionRequest(_SamplingFields):
    prompt: Str | list[Str] | list[Int] | list[list[Int]]
    max_tokens: Int | None = Field(16, ge=0)  # OpenAI's default for completions; 0: echo/score the prompt only
    _KEEP_NULL = frozenset({"max_tokens"})  # vLLM's: an explicit null runs to the context
    logprobs: Int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: Bool = False
    suffix: Str | None = None
    best_of: Int | None = Field(None, ge=1)
    return_tokens_as_token_ids: Bool = False  # extension (vLLM): tokens as "token_id:123"
    add_special_tokens: Bool = True  # extension (vLLM): false encodes a text prompt without the BOS


class FunctionCall(_Body):
    name: Str
    arguments: Str | dict[str, Any] = "{}"


class ToolCall(_Body):
    id: Str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ContentPart(_Body):
    type: Str
    text: Str | None = None


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Str | Annotated[list[ContentPart], Field(min_length=1)] | None = None  # OpenAI: no empty array
    name: Str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: Str | None = None

    @model_validator(mode="after")
    def _tool_reply_names_its_call(self) -> ChatMessage:
        # OpenAI's rule (400 without it): which call a result answers is ambiguous once there are several
        if self.role == "tool" and self.tool_call_id is None:
            raise ValueError("a tool message needs tool_call_id, the id of the call it answers")
        return self


class FunctionDef(_Body):
    # OpenAI's rule: letters, digits, '_' and '-', 1 to 64 (an empty name or a quote broke the call's format)
    name: Annotated[str, Strict(), StringConstraints(pattern=r"^[a-zA-Z0-9_-]{1,64}$")]
    description: Str | None = None
    parameters: dict[str, Any] | None = None
    strict: Bool | None = None


class Tool(_Body):
    type: Literal["function"] = "function"
    function: FunctionDef


class NamedToolChoice(_Body):
    type: Literal["function"] = "function"
    function: dict[str, Any]




class _TemplateFields(_Body):
    """How a conversation is rendered with the chat template (chat completions and /tokenize alike)."""

    tools: list[Tool] | None = None
    chat_template_kwargs: dict[str, Any] | None = None  # extension (vLLM), e.g. {"enable_thinking": false}
    # vLLM's per-request template: refused (400) as vLLM refuses it without --trust-request-chat-template, not
    # silently ignored
    chat_template: Str | None = None

    @field_validator("tools")
    @classmethod
    def _unique_names(cls, tools: list[Tool] | None) -> list[Tool] | None:
        # which function a call means would be ambiguous (OpenAI: 400)
        names = [t.function.name for t in tools or []]
        twice = next((n for i, n in enumerate(names) if n in names[:i]), None)
        if twice is not None:
            raise ValueError(f"function names must be unique, {twice!r} appears more than once")
        return tools
    # extensions (vLLM): continue_final_message writes the reply on from the last (assistant) message's text,
    # an answer prefilled by the client; it needs add_generation_prompt false
    add_generation_prompt: Bool = True
    continue_final_message: Bool = False


class ChatCompletionRequest(_SamplingFields, _TemplateFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: Int | None = Field(None, ge=1)
    max_completion_tokens: Int | None = Field(None, ge=1)
    logprobs: Bool = False
    top_logprobs: Int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: Bool | None = None
    return_tokens_as_token_ids: Bool = False  # extension
    echo: Bool = False  # extension (vLLM): the reply starts with the last message's text when it is the reply's turn


class TokenizeRequest(_TemplateFields):
    """vLLM's /tokenize: a text prompt (as /v1/completions encodes it) or a conversation rendered with the
    chat template (as /v1/chat/completions does)."""

    model: Str | None = None
    prompt: Str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    add_special_tokens: Bool = True  # vLLM's: false encodes a text prompt without the BOS (the chat's as rendered)
    return_token_strs: Bool = False  # vLLM's: the answer's token_strs lists each token's vocabulary string


class DetokenizeRequest(_Body):
    model: Str | None = None
    tokens: list[Int]
