"""Random µP-style initialisation and `cpm4 init`: a complete, offline checkpoint from a preset.

µP as MiniCPM uses it (spec/training.md): with width multiplier m = hidden_size / dim_model_base, matrix
weights (attention, MLP, untied output head) get std initializer_range / sqrt(m); the embedding keeps
std initializer_range (it is scaled by scale_emb in the forward); norm weights start at 1.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from pathlib import Path

import torch

from .checkpoint import parse_dtype, save_checkpoint
from .config import MiniCPM4Config, preset
from .modeling import MiniCPM4ForCausalLM


def init_std(name: str, config: MiniCPM4Config) -> float | None:
    """Init std for a tensor by its checkpoint name; None for norm weights (ones)."""
    if name.endswith("norm.weight"):
        return None
    if name == "model.embed_tokens.weight":
        return config.initializer_range
    return config.initializer_range / math.sqrt(config.hidden_size / config.dim_model_base)


def random_weights(config: MiniCPM4Config, seed: int = 0, dtype: torch.dtype = torch.float32
                   ) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) one at a time in checkpoint order, so any size can be written shard by shard."""
    from .checkpoint import expected_shapes

    gen = torch.Generator().manual_seed(seed)
    for name, shape in expected_shapes(config).items():
        std = init_std(name, config)
        if std is None:
            yield name, torch.ones(shape, dtype=dtype)
        else:
            # Drawn in float32 then cast, so a seed gives the same weights whatever the storage dtype.
            yield name, (torch.randn(shape, generator=gen) * std).to(dtype)


def init_model(model: MiniCPM4ForCausalLM, seed: int = 0) -> MiniCPM4ForCausalLM:
    """Initialise an existing model in place with the same values `random_weights` produces."""
    params = model.state_dict()  # the model's own tensors: filled one at a time (peak: one tensor more)
    drawn = set()
    with torch.no_grad():
        for name, t in random_weights(model.config, seed, model.dtype):
            params[name].copy_(t)
            drawn.add(name)
    if drawn != set(params):
        raise RuntimeError(f"init_model: tensors not drawn: {sorted(set(params) - drawn)}")
    return model


def random_model(config: MiniCPM4Config, device: str | torch.device = "cpu", dtype: torch.dtype = torch.bfloat16,
                 seed: int = 0) -> MiniCPM4ForCausalLM:
    """A model with the µP init drawn directly on `device` (fast for big shapes, e.g. benchmarks; values
    differ from `random_weights`, which draws on the CPU so that checkpoints are device-independent)."""
    from cpm4.devices import check_fits

    from .checkpoint import weight_bytes
    from .rope import RotaryEmbedding

    check_fits(weight_bytes(config, dtype), device, "the model's weights")
    with torch.device("meta"):
        model = MiniCPM4ForCausalLM(config)
    model = model.to(dtype).to_empty(device=device)  # cast on meta: the weights are allocated once, in dtype
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            std = init_std(name, config)
            if std is None:
                p.fill_(1.0)
            else:
                p.normal_(0.0, std, generator=gen)
    model.rotary = RotaryEmbedding(config).to(device)  # float32 tables, as loading builds them
    return model.eval()


def create_checkpoint(config: MiniCPM4Config | str, out_dir: str | os.PathLike, seed: int = 0,
                      dtype: str | torch.dtype | None = None, overwrite: bool = False,
                      tokenizer_vocab: int | None = None) -> Path:
    """Write a randomly initialised checkpoint with a freshly built tokenizer (no network needed)."""
    from .tokenizer import build_tokenizer

    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty (pass overwrite=True / --overwrite)")
    if isinstance(config, str):
        config = preset(config)
    dtype = parse_dtype(dtype) or parse_dtype(config.torch_dtype) or torch.float32
    # A BPE trained on a small offline corpus cannot fill 73K entries: big presets get a smaller
    # tokenizer whose ids all lie inside the model's vocabulary.
    tok_vocab = tokenizer_vocab or min(config.vocab_size, 4096)
    if tok_vocab > config.vocab_size:
        raise ValueError(f"tokenizer vocabulary {tok_vocab} larger than the model's {config.vocab_size}")
    tok = build_tokenizer(tok_vocab)
    config.bos_token_id = tok.bos_token_id
    config.eos_token_id = tok.stop_token_ids
    from cpm4.devices import check_disk

    from .checkpoint import weight_bytes

    check_disk(weight_bytes(config, dtype), out, "the checkpoint")
    return save_checkpoint(random_weights(config, seed, dtype), config, out_dir, tokenizer=tok, dtype=dtype,
                           overwrite=overwrite)
