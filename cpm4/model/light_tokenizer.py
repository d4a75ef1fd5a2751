"""A `tokenizers`-only stand-in for transformers' PreTrainedTokenizerFast, for the tokenizer files cpm4 writes.

Importing transformers costs about 0.6 s of every CLI start; for a plain `tokenizer.json` with a string chat
template nothing of it is needed. This class offers the subset of the PreTrainedTokenizerFast interface that
`cpm4.model.tokenizer.Tokenizer` uses, with the same results (tested against transformers): ids from the Rust
backend, chat templates rendered by jinja2 in a sandbox with transformers' conventions (trim_blocks,
lstrip_blocks, loop controls, `tojson` without HTML escaping, `raise_exception`, special tokens as variables).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any


@lru_cache(maxsize=8)
def _compile(template: str):
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        """transformers' `{% generation %}...{% endgeneration %}` (it marks the assistant's tokens for training
        masks): rendered as its body."""

        tags = {"generation"}

        def parse(self, parser):
            next(parser.stream)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    def raise_exception(message: str):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols, Generation])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


class JsonTokenizer:
    """tokenizer.json + tokenizer_config.json, read without transformers."""

    def __init__(self, backend, config: Mapping[str, Any], chat_template: str | None):
        self.backend_tokenizer = backend
        self.chat_template = chat_template
        self.bos_token = _token_str(config.get("bos_token"))
        self.eos_token = _token_str(config.get("eos_token"))
        self.unk_token = _token_str(config.get("unk_token"))
        self.pad_token = _token_str(config.get("pad_token"))
        self.add_bos_token = bool(config.get("add_bos_token", True))
        self.add_eos_token = bool(config.get("add_eos_token", False))
        max_len = config.get("model_max_length")
        self.model_max_length = max_len if isinstance(max_len, int) else int(1e30)

    @classmethod
    def from_dir(cls, path: Path, config: Mapping[str, Any], chat_template: str | None) -> JsonTokenizer:
        from tokenizers import Tokenizer as Backend

        return cls(Backend.from_file(str(path / "tokenizer.json")), config, chat_template)

    # ---- the PreTrainedTokenizerFast subset ----
    @property
    def bos_token_id(self) -> int | None:
        return None if self.bos_token is None else self.backend_tokenizer.token_to_id(self.bos_token)

    @property
    def eos_token_id(self) -> int | None:
        return None if self.eos_token is None else self.backend_tokenizer.token_to_id(self.eos_token)

    def __len__(self) -> int:
        return self.backend_tokenizer.get_vocab_size(with_added_tokens=True)

    def get_vocab(self) -> dict[str, int]:
        return self.backend_tokenizer.get_vocab(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend_tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False,
               clean_up_tokenization_spaces: bool = False) -> str:
        return self.backend_tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, ids: int | Sequence[int]):
        if isinstance(ids, int):
            return self.backend_tokenizer.id_to_token(ids)
        return [self.backend_tokenizer.id_to_token(int(i)) for i in ids]

    def apply_chat_template(self, conversation: Sequence[Mapping[str, Any]], tools: list | None = None,
                            add_generation_prompt: bool = False, tokenize: bool = True,
                            chat_template: str | None = None, **kwargs: Any):
        template = chat_template or self.chat_template
        if template is None:
            raise ValueError("this tokenizer has no chat_template")
        continue_final = kwargs.pop("continue_final_message", False)
        if continue_final and add_generation_prompt:
            raise ValueError("continue_final_message and add_generation_prompt cannot both be true")
        specials = {k: v for k, v in (("bos_token", self.bos_token), ("eos_token", self.eos_token),
                                      ("unk_token", self.unk_token), ("pad_token", self.pad_token)) if v is not None}
        messages = [dict(m) for m in conversation]
        if continue_final:
            content = messages[-1].get("content") if messages else None
            if not isinstance(content, str):
                raise ValueError("continue_final_message: the final message has no text content to continue")
            messages[-1]["content"] = content + _CONTINUE_TAG
        documents = kwargs.pop("documents", None)  # (a template variable of its own, as in transformers)
        text = _compile(template).render(messages=messages, tools=tools, documents=documents,
                                         add_generation_prompt=add_generation_prompt, **{**specials, **kwargs})
        if continue_final:
            text = _cut_at_tag(text)
        return self.encode(text, add_special_tokens=False) if tokenize else text


_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "  # transformers' marker, and its rule below


def _cut_at_tag(text: str) -> str:
    """transformers' continue_final_message: the rendering up to where the last message's text ends (found by the
    tag appended to it: searching for the text itself took the end-of-turn tokens too when they held it, e.g.
    "end" in "<|im_end|>"), its end-of-turn tokens dropped; trailing whitespace kept only where the template
    kept it."""
    tag = _CONTINUE_TAG.strip()
    if tag not in text:
        raise ValueError("continue_final_message: the final message's text does not appear in the rendered chat")
    at = text.rindex(tag)
    return text[:at] if text.startswith(_CONTINUE_TAG, at) else text[:at].rstrip()


def _token_str(value: Any) -> str | None:
    if isinstance(value, Mapping):  # AddedToken dicts in tokenizer_config.json
        value = value.get("content")
    return value if isinstance(value, str) else None
