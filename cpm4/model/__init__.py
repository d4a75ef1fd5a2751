"""The MiniCPM4 model: configuration, modules, rotary embeddings, checkpoints, tokenizer."""

from typing import Any

from .config import ConfigError, MiniCPM4Config, SparseConfig, preset

__all__ = ["ConfigError", "MiniCPM4Config", "SparseConfig", "preset", "MiniCPM4ForCausalLM"]


def __getattr__(name: str) -> Any:
    # The modules (and torch) on first use: the configuration alone (`cpm4 pretrain`'s TOML checks, the command
    # line's parser) imports no torch.
    if name == "MiniCPM4ForCausalLM":
        from .modeling import MiniCPM4ForCausalLM

        return MiniCPM4ForCausalLM
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
