"""Training checkpoints: `<dir>/checkpoints/step-NNNNNNN/` holds the model in Hugging Face layout (float32
master weights, loadable by `cpm4 generate`) plus `train_state.pt` (optimizer, step, RNG, run config).
A folder is written under a temporary name and renamed when complete; `latest` names the newest one.
A run killed at any point resumes from the last complete checkpoint and continues bit for bit."""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cpm4.model.checkpoint import save_checkpoint
from cpm4.model.config import write_text_atomic

STATE_FILE = "train_state.pt"


def step_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step-{step:07d}"


def rng_state() -> dict[str, Any]:
    s = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state_all()
    return s


def set_rng_state(s: dict[str, Any]) -> None:
    torch.set_rng_state(s["torch"])
    np.random.set_state(s["numpy"])
    random.setstate(s["python"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def write(run_dir: Path, step: int, model_state: dict[str, torch.Tensor], config, tokenizer,
          train_state: dict[str, Any], keep: int) -> Path:
    """Write checkpoint `step` atomically, point `latest` at it, keep the newest `keep` ones."""
    final = step_dir(run_dir, step)
    partial = final.with_name(f".{final.name}.partial-{os.getpid()}")
    if partial.exists():
        shutil.rmtree(partial)
    try:
        save_checkpoint(model_state, config, partial, tokenizer=tokenizer, dtype=torch.float32)
        tmp = partial / f".{STATE_FILE}.tmp"
        torch.save(train_state, tmp)
        os.replace(tmp, partial / STATE_FILE)
        if final.exists():
            shutil.rmtree(final)
        os.replace(partial, final)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    write_text_atomic(run_dir / "checkpoints" / "latest", final.name + "\n")
    for old in complete(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def checkpoint_step(path: Path) -> int | None:
    """N of a `step-N` folder (None for other names)."""
    digits = path.name.removeprefix("step-")
    return int(digits) if digits != path.name and digits.isdigit() else None


def complete(run_dir: Path) -> list[Path]:
    """Finished checkpoints, oldest first by step (by name, step-10000000 came before step-9999999); a half-written
    one has no train_state.pt under its final name."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    done = [p for p in root.glob("step-*") if checkpoint_step(p) is not None and (p / STATE_FILE).is_file()]
    return sorted(done, key=checkpoint_step)


def latest(run_dir: Path) -> Path | None:
    """The newest finished checkpoint. The `latest` file names it too (for people and scripts), but it is written
    after the folder is renamed, so a crash between the two leaves it one behind: the folders decide."""
    done = complete(run_dir)
    return done[-1] if done else None


def remove_partials(run_dir: Path) -> None:
    """Half-written checkpoints of killed processes (`.step-N.partial-PID`, a whole model each): never read, and a
    later run's `write` removes only its own process's."""
    root = run_dir / "checkpoints"
    if root.is_dir():
        for p in root.glob(".step-*.partial-*"):
            shutil.rmtree(p, ignore_errors=True)


def read_state(path: Path) -> dict[str, Any]:
    return torch.load(path / STATE_FILE, map_location="cpu", weights_only=False)
