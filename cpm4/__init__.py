"""cpm4: MiniCPM4 end to end — model, InfLLM v2 sparse attention, generation, training and serving."""

from .engine.generate import GenerationOutput
from .engine.sampling import SamplingParams
from .llm import LLM, generate, load_model, stream

__all__ = ["LLM", "GenerationOutput", "SamplingParams", "generate", "load_model", "stream"]
__version__ = "0.1.0"
