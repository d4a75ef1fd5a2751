"""cpm4: MiniCPM4 end to end — model, InfLLM v2 sparse attention, generation, training and serving."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["LLM", "AsyncLLM", "BeamSearchParams", "GenerationOutput", "GuidedDecodingParams", "RequestOutputKind",
           "SamplingParams", "StructuredOutputsParams", "generate", "load_model", "stream"]

# Loaded on first use: `import cpm4.data...` (e.g. in data-pipeline worker processes) need not import torch.
_LAZY = {"LLM": "cpm4.llm", "generate": "cpm4.llm", "load_model": "cpm4.llm", "stream": "cpm4.llm",
         "AsyncLLM": "cpm4.async_llm", "RequestOutputKind": "cpm4.engine.params",
         "GenerationOutput": "cpm4.engine.generate", "SamplingParams": "cpm4.engine.params",
         "StructuredOutputsParams": "cpm4.engine.params", "GuidedDecodingParams": "cpm4.engine.params",
         "BeamSearchParams": "cpm4.engine.beam_search"}

if TYPE_CHECKING:
    from .async_llm import AsyncLLM
    from .engine.beam_search import BeamSearchParams
    from .engine.generate import GenerationOutput
    from .engine.params import GuidedDecodingParams, RequestOutputKind, SamplingParams, StructuredOutputsParams
    from .llm import LLM, generate, load_model, stream


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'cpm4' has no attribute {name!r}")
