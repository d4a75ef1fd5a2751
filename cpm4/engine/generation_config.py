"""Default sampling parameters from a checkpoint's generation_config.json, as vLLM's `--generation-config`:
a request (or an `LLM.generate` call without params) that leaves a field unset gets the checkpoint's value
instead of SamplingParams' own. MiniCPM4's releases ship temperature 0.8 and top_p 0.8 there.

Only the sampling fields vLLM takes are read (do_sample is not: as in vLLM, the values apply whatever it says);
max_new_tokens becomes the default max_tokens.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from cpm4.model.config import is_int, is_number

# generation_config.json field -> SamplingParams field
FIELDS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
          "repetition_penalty": "repetition_penalty", "max_new_tokens": "max_tokens"}
NAME = "generation_config.json"


def sampling_defaults(source: str | os.PathLike | None, model_dir: str | os.PathLike | None = None
                      ) -> dict[str, Any]:
    """SamplingParams fields to default to. source: "auto" (model_dir's generation_config.json, if it has
    one), "vllm" or None (none: SamplingParams' own defaults), or a folder holding a generation_config.json
    or the file itself (which must then exist). A value SamplingParams would refuse is an error that names
    the file and the field."""
    if source is None or source == "vllm":
        return {}
    if source == "auto":
        if model_dir is None or not (Path(model_dir) / NAME).is_file():
            return {}
        path = Path(model_dir) / NAME
    else:
        path = Path(source)
        if path.is_dir():
            path = path / NAME
        if not path.is_file():
            raise FileNotFoundError(f"generation config not found: {path} (--generation-config takes auto, "
                                    f"vllm, or a folder or file with one)")
    raw = _read(path)
    from .params import SamplingParams

    out: dict[str, Any] = {}
    for src, dst in FIELDS.items():
        value = raw.get(src)
        if value is None:
            continue
        integral = dst in ("top_k", "max_tokens")
        if not (is_int(value) if integral else is_number(value)):
            raise ValueError(f"{path}: {src} must be {'an integer' if integral else 'a number'}, got {value!r}")
        out[dst] = value if integral else float(value)
    try:
        SamplingParams(**out)
    except ValueError as e:
        msg = str(e)
        if msg.startswith("max_tokens"):  # the file's name for it
            msg = "max_new_tokens" + msg[len("max_tokens"):]
        raise ValueError(f"{path}: {msg}") from None
    return out


def _read(path: Path) -> dict[str, Any]:
    """A generation_config.json's object; ValueError naming the file when it is not one."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a readable JSON file ({e})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(raw).__name__}")
    return raw


def generation_eos_ids(model_dir: str | os.PathLike | None) -> list[int]:
    """The eos_token_id(s) of model_dir's generation_config.json ([] without one): they end generation besides
    config.json's, as in transformers' generate and vLLM (a checkpoint may list its chat turn's end only there).
    ValueError naming the file for a value that is not a token id or a list of them."""
    path = Path(model_dir) / NAME if model_dir is not None else None
    if path is None or not path.is_file():
        return []
    value = _read(path).get("eos_token_id")
    ids = [] if value is None else value if isinstance(value, list) else [value]
    if not all(is_int(i) and i >= 0 for i in ids):
        raise ValueError(f"{path}: eos_token_id must be a token id or a list of them, got {value!r}")
    return ids


def serving_config(model_dir: str | os.PathLike):
    """model_dir's config.json with generation_config.json's EOS ids added to its eos_token_id
    (`generation_eos_ids`): what generation runs with, in the engine and in a server's API process alike."""
    from cpm4.model.config import MiniCPM4Config

    config = MiniCPM4Config.from_json(Path(model_dir) / "config.json")
    extra = [i for i in generation_eos_ids(model_dir) if i not in config.eos_token_ids]
    if extra and max(extra) >= config.vocab_size:
        raise ValueError(f"{Path(model_dir) / NAME}: eos_token_id {max(extra)} is outside the vocabulary of "
                         f"{config.vocab_size}")
    if extra:
        config.eos_token_id = config.eos_token_ids + extra
    return config

