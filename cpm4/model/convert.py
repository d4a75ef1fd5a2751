"""Export a MiniCPM4 checkpoint as an equivalent Llama checkpoint (dense attention).

The µP factors are constants, so they fold into the weights (spec/model.md): embedding x scale_emb,
o_proj and down_proj x scale_depth/sqrt(layers), lm_head / (hidden_size/dim_model_base) (untied if tied).
Rope scaling carries over as `rope_scaling`. Any Llama runtime (Hugging Face transformers, llama.cpp,
vLLM) then runs the model, which makes them baselines and deployment targets. InfLLM v2 sparse attention
has no Llama equivalent: the export is the dense model.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from pathlib import Path

import torch

from .checkpoint import check_output_dir, load_checkpoint, parse_dtype, save_checkpoint
from .config import MiniCPM4Config
from .hub import resolve_model_dir
from .rope import longrope_factors, longrope_scale


def folded_config(config: MiniCPM4Config) -> MiniCPM4Config:
    """The same model with the µP constants set to identity (scale 1, residual 1, logit divisor 1)."""
    d = config.to_dict()
    d.update(scale_emb=1.0, scale_depth=math.sqrt(config.num_hidden_layers), dim_model_base=config.hidden_size,
             tie_word_embeddings=False)
    d.pop("sparse_config", None)
    d.pop("num_mtp_layers", None)
    return MiniCPM4Config.from_dict(d)


def folded_weights(state: dict[str, torch.Tensor], config: MiniCPM4Config) -> Iterator[tuple[str, torch.Tensor]]:
    """Weights of `folded_config(config)`, computed in float32 and cast back to each tensor's dtype."""
    r = config.residual_scale
    for name, t in state.items():
        if name.startswith("mtp."):  # training-only heads have no place in a Llama checkpoint
            continue
        f = t.float()
        if name == "model.embed_tokens.weight":
            f = f * config.scale_emb
        elif name.endswith(("self_attn.o_proj.weight", "mlp.down_proj.weight")):
            f = f * r
        elif name == "lm_head.weight":
            f = f / config.logit_divisor
        yield name, f.to(t.dtype)
    if config.tie_word_embeddings:
        emb = state["model.embed_tokens.weight"]
        yield "lm_head.weight", (emb.float() / config.logit_divisor).to(emb.dtype)


def llama_config(config: MiniCPM4Config) -> dict:
    """A `LlamaForCausalLM` config.json for the folded weights."""
    out = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size, "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads, "num_key_value_heads": config.num_key_value_heads,
        "head_dim": config.dim_head, "hidden_act": "silu", "max_position_embeddings": config.max_position_embeddings,
        "rms_norm_eps": config.rms_norm_eps, "rope_theta": config.rope_theta, "attention_bias": False,
        "mlp_bias": False, "tie_word_embeddings": False, "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id, "initializer_range": config.initializer_range,
    }
    if config.pad_token_id is not None:
        out["pad_token_id"] = config.pad_token_id
    if config.rope_scaling:
        rs = out["rope_scaling"] = dict(config.rope_scaling)
        if rs.get("rope_type", rs.get("type")) == "longrope":
            # Llama runtimes switch lists by the sequence's length; ours uses one list at every length.
            rs["short_factor"] = rs["long_factor"] = longrope_factors(rs, config.max_position_embeddings)
            # The magnitude ours uses, explicit: transformers derives it from `factor` first when there is one
            # (the released config may carry "factor": 1.0), which ours does not read.
            rs["attention_factor"] = longrope_scale(rs, config.max_position_embeddings)
            rs.pop("factor", None)
    return out


def convert_to_llama(src: str | os.PathLike, out: str | os.PathLike, dtype: str | torch.dtype | None = None,
                     overwrite: bool = False, revision: str | None = None) -> Path:
    """Write the Llama form of checkpoint `src` (a folder, or a Hugging Face model id at `revision`; tokenizer
    files copied, the chat template writing the BOS, the context as model_max_length) to `out`, atomically. In
    bf16/fp16 the folded weights are rounded again, so logits differ from cpm4's by that rounding; dtype
    float32 gives an exact export."""
    from .tokenizer import Tokenizer

    src = resolve_model_dir(src, revision)
    src_abs, out_abs = Path(src).resolve(), Path(out).resolve()
    if out_abs == src_abs:
        raise ValueError(f"the export would replace its own source {src}: choose another output folder")
    if out_abs.is_relative_to(src_abs):  # the source checkpoint would carry a second model inside it
        raise ValueError(f"the export {out} would be written inside its source {src}: choose a folder outside it")
    if src_abs.is_relative_to(out_abs):  # --overwrite would delete the source with the old output
        raise ValueError(f"the export {out} would replace a folder holding its source {src}: choose another "
                         "output folder")
    check_output_dir(out, overwrite)  # refused before a (possibly long) load, not after it
    dtype = parse_dtype(dtype)
    model = load_checkpoint(src, dtype=dtype)
    cfg = model.config
    weights = folded_weights(model.state_dict(), cfg)
    tok = None
    try:
        tok = Tokenizer.from_dir(src)
    except FileNotFoundError:
        pass
    if tok is not None:
        hf = tok.hf
        hf.model_max_length = cfg.max_position_embeddings
        # cpm4 puts one BOS before a chat (`Tokenizer.encode_chat`); Llama runtimes tokenize a rendered chat
        # without special tokens, so the template writes it.
        if isinstance(hf.chat_template, str) and "bos_token" not in hf.chat_template:
            hf.chat_template = "{{ bos_token }}" + hf.chat_template
    return save_checkpoint(weights, folded_config(cfg), out, tokenizer=tok, overwrite=overwrite,
                           config_json=llama_config(cfg), generation_config=_generation_config(src, cfg),
                           extra_files=_kept_files(src, tok is not None))


# Files of the source carried into the export as they are: its licence, and with the tokenizer its SentencePiece
# model and added tokens (llama.cpp's converter reads tokenizer.model first).
_LICENCES = ("LICENSE", "LICENSE.md", "LICENSE.txt", "NOTICE")
_TOKENIZER_FILES = ("tokenizer.model", "added_tokens.json")


def _kept_files(src: str | os.PathLike, with_tokenizer: bool) -> list[Path]:
    names = _LICENCES + (_TOKENIZER_FILES if with_tokenizer else ())
    return [Path(src) / n for n in names if (Path(src) / n).is_file()]


def _generation_config(src: str | os.PathLike, config: MiniCPM4Config) -> dict:
    """The source's generation_config.json (its sampling defaults: transformers' generate and vLLM read them
    there) with every EOS id that ends cpm4's generation, config.json's and its own."""
    import json

    from cpm4.engine.generation_config import NAME, generation_eos_ids

    extra = generation_eos_ids(src)  # (first: a malformed file is an error naming it)
    path = Path(src) / NAME
    gen = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    eos = config.eos_token_ids + [i for i in extra if i not in config.eos_token_ids]
    return {**gen, "bos_token_id": config.bos_token_id, "eos_token_id": eos[0] if len(eos) == 1 else eos}
