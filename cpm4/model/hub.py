"""Where a checkpoint lives: a local folder, or a Hugging Face Hub model id ("openbmb/MiniCPM4-8B") fetched into the
Hugging Face cache with `huggingface_hub` (as vLLM and transformers take either). Only the files cpm4 reads are
fetched: configs, safetensors weights, tokenizer files and chat templates. HF_HUB_OFFLINE=1 uses the cache
alone; HF_TOKEN, HF_HOME and HF_ENDPOINT apply as everywhere in the Hugging Face tools."""

from __future__ import annotations

import os
from pathlib import Path

# What a MiniCPM4 checkpoint folder holds that cpm4 reads (no *.bin / *.pt: weights are read from safetensors).
ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]


class ModelNotFoundError(FileNotFoundError):
    """Neither a local checkpoint folder nor a model id the Hugging Face Hub (or its cache) could provide."""


def looks_like_repo_id(name: str) -> bool:
    """"org/name" as the Hub spells repository ids (no path of more parts, nothing relative or absolute)."""
    if name.startswith((".", "/", "~")) or name.count("/") != 1 or os.sep != "/" and os.sep in name:
        return False
    try:
        from huggingface_hub.utils import HFValidationError, validate_repo_id
    except ImportError:
        return all(part for part in name.split("/"))
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def resolve_model_dir(model: str | os.PathLike, revision: str | None = None) -> Path:
    """The local folder of `model`: itself when it is a folder, else the Hub snapshot of that model id (downloaded
    on first use, from the cache afterwards). Raises ModelNotFoundError naming the problem."""
    path = Path(model).expanduser()
    if path.is_dir():
        if revision is not None:
            raise ValueError(f"revision {revision!r} applies to a Hugging Face model id, not to the folder {path}")
        return path
    name = str(model)
    if not looks_like_repo_id(name):
        raise ModelNotFoundError(f"model directory not found: {name}")
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import (
            GatedRepoError,
            HfHubHTTPError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )
    except ImportError:
        raise ModelNotFoundError(f"model directory not found: {name} (to fetch it as a Hugging Face model id, "
                                 "pip install huggingface_hub)") from None
    try:
        return Path(snapshot_download(name, revision=revision, allow_patterns=ALLOW_PATTERNS))
    except LocalEntryNotFoundError:
        raise ModelNotFoundError(f"model {name} is neither a local folder nor in the Hugging Face cache, and the "
                                 "Hub cannot be reached (HF_HUB_OFFLINE set, or no network)") from None
    except GatedRepoError as e:
        raise ModelNotFoundError(f"model {name} is gated on the Hugging Face Hub: accept its terms and set HF_TOKEN "
                                 f"({type(e).__name__})") from None
    except RevisionNotFoundError:
        raise ModelNotFoundError(f"model {name} has no revision {revision!r} on the Hugging Face Hub") from None
    except RepositoryNotFoundError:
        raise ModelNotFoundError(f"model directory not found: {name} (nor a Hugging Face Hub model id that this "
                                 "account can see)") from None
    except HfHubHTTPError as e:
        raise ModelNotFoundError(f"could not fetch model {name} from the Hugging Face Hub: {e}") from None
