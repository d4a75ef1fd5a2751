"""`cpm4 chat --url` / `cpm4 generate --url`: the same commands against a running OpenAI-compatible server (cpm4's,
vLLM's, ...) instead of a model loaded here, as vLLM's `vllm chat` / `vllm complete`. Uses the official `openai`
client; the command line's sampling options become the request's fields (cpm4's and vLLM's extensions in
extra_body)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

# SamplingParams fields OpenAI's API has, and those it takes only as extensions (vLLM's, cpm4's).
_OPENAI = ("max_tokens", "temperature", "top_p", "seed", "stop", "presence_penalty", "frequency_penalty")
_EXTRA = {"top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0, "ignore_eos": False, "min_tokens": 0}


class PromptRefused(ValueError):
    """The server refused a request (a 400: e.g. the conversation no longer fits its context)."""


class RemoteModel:
    """A model behind `url` (with or without /v1): `chat(messages)` and `complete(prompt)` stream text pieces."""

    def __init__(self, url: str, params: Any, api_key: str | None = None, model: str | None = None) -> None:
        try:
            import openai
        except ImportError as e:
            raise ImportError("--url needs the openai client: pip install 'cpm4[serve]'") from e
        self._openai = openai
        base = url.rstrip("/")
        base = base if base.endswith("/v1") else base + "/v1"
        key = api_key or os.environ.get("OPENAI_API_KEY") or os.environ.get("CPM4_API_KEY") or "EMPTY"
        self.client = openai.OpenAI(base_url=base, api_key=key, max_retries=0)
        self.url = base
        try:
            served = [m.id for m in self.client.models.list()]
        except openai.APIConnectionError as e:
            raise ConnectionError(f"cannot reach a server at {base}: {e.__cause__ or e}") from None
        except openai.APIStatusError as e:
            raise ConnectionError(f"{base}/models answered {e.status_code}: {e.message}") from None
        if model is not None and model not in served:
            raise ValueError(f"the server at {base} serves {', '.join(served) or 'no model'}, not {model}")
        if not served and model is None:
            raise ValueError(f"the server at {base} lists no model")
        self.model = model or served[0]  # the first, as vLLM's chat picks it
        self.fields = {k: getattr(params, k) for k in _OPENAI if getattr(params, k) is not None}
        extra = {k: getattr(params, k) for k, off in _EXTRA.items() if getattr(params, k) != off}
        if extra:
            self.fields["extra_body"] = extra

    def _stream(self, create: Any, text_of: Any, **request: Any) -> Iterator[str]:
        try:
            stream = create(model=self.model, stream=True, **self.fields, **request)
        except self._openai.BadRequestError as e:
            raise PromptRefused(getattr(e, "message", str(e))) from None
        except self._openai.APIConnectionError as e:
            raise ConnectionError(f"lost the server at {self.url}: {e.__cause__ or e}") from None
        with stream:
            for chunk in stream:
                if chunk.choices:
                    piece = text_of(chunk.choices[0])
                    if piece:
                        yield piece

    def chat(self, messages: list[dict[str, Any]]) -> Iterator[str]:
        return self._stream(self.client.chat.completions.create, lambda c: c.delta.content, messages=messages)

    def complete(self, prompt: str) -> Iterator[str]:
        return self._stream(self.client.completions.create, lambda c: c.text, prompt=prompt)
