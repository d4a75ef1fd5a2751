"""The MiniCPM4 model: configuration, modules, rotary embeddings, checkpoints, tokenizer."""

from .config import ConfigError, MiniCPM4Config, SparseConfig, preset
from .modeling import MiniCPM4ForCausalLM

__all__ = ["ConfigError", "MiniCPM4Config", "SparseConfig", "preset", "MiniCPM4ForCausalLM"]
