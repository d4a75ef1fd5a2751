"""A Hugging Face Hub model id where a checkpoint folder goes (`cpm4.model.hub`): resolved from a local Hugging Face
cache with HF_HUB_OFFLINE=1 (the tests never reach the network), through the Python API and the CLI; clear errors
for what cannot be resolved."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("huggingface_hub")
import huggingface_hub.constants as hf_constants  # noqa: E402

from cpm4.model.hub import ModelNotFoundError, looks_like_repo_id, resolve_model_dir  # noqa: E402
from cpm4.model.init import create_checkpoint  # noqa: E402

REPO = "acme/tiny-cpm4"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def hf_cache(tmp_path_factory) -> Path:
    """A Hugging Face cache holding REPO at COMMIT (refs/main points there), as snapshot_download leaves it."""
    cache = tmp_path_factory.mktemp("hf") / "hub"
    repo = cache / f"models--{REPO.replace('/', '--')}"
    create_checkpoint("tiny", repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    return cache


@pytest.fixture
def offline(hf_cache, monkeypatch):
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(hf_cache))
    return hf_cache


def test_repo_id_shapes():
    assert looks_like_repo_id("openbmb/MiniCPM4-8B") and looks_like_repo_id(REPO)
    for name in ("MiniCPM4-8B", "./a/b", "/abs/path", "a/b/c", "~/x", "a//", "bad name/x"):
        assert not looks_like_repo_id(name), name


def test_folder_passes_through(tmp_path):
    assert resolve_model_dir(tmp_path) == tmp_path
    with pytest.raises(ValueError, match="revision 'v1' applies to a Hugging Face model id"):
        resolve_model_dir(tmp_path, revision="v1")
    with pytest.raises(ModelNotFoundError, match="model directory not found: .*missing"):
        resolve_model_dir(tmp_path / "missing")


def test_model_id_from_the_cache(offline):
    """An id resolves to its cached snapshot; LLM loads it and generates; an id not in the cache, offline, says so."""
    from cpm4 import LLM, SamplingParams

    path = resolve_model_dir(REPO)
    assert path == offline / f"models--{REPO.replace('/', '--')}" / "snapshots" / COMMIT
    llm = LLM(REPO, device="cpu", dtype="float32")
    assert llm.path == path
    out = llm.generate(["Hello"], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))
    assert len(out[0].token_ids) == 3
    with pytest.raises(ModelNotFoundError, match="acme/other is neither a local folder nor in the Hugging Face cache"):
        resolve_model_dir("acme/other")
    with pytest.raises(ModelNotFoundError):
        resolve_model_dir(REPO, revision="v9")  # not cached either


def test_serve_names_a_hub_model_by_its_id(offline, monkeypatch):
    pytest.importorskip("uvicorn")

    from cpm4.serve import serve

    seen = {}
    monkeypatch.setattr("cpm4.serve._run_server", lambda app, **kw: seen.setdefault("name", app.state.model_name))
    serve(REPO, device="cpu", log_stats_interval=0, max_batch_size=2)
    assert seen["name"] == REPO


def test_cli_generate_with_a_model_id(hf_cache):
    """`cpm4 generate --model org/name` in a fresh process with HF_HUB_OFFLINE=1 and the cache above."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(hf_cache))
    r = subprocess.run([sys.executable, "-m", "cpm4.cli", "generate", "--model", REPO, "--device", "cpu",
                        "--max-tokens", "3", "--temperature", "0", "--ignore-eos", "--no-stream", "Hi"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert f"loaded {REPO}" in r.stderr
    r = subprocess.run([sys.executable, "-m", "cpm4.cli", "generate", "--model", "acme/absent", "--device", "cpu",
                        "Hi"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode != 0 and "acme/absent is neither a local folder nor in the Hugging Face cache" in r.stderr


def test_training_starts_from_a_model_id(offline):
    """`cpm4 sft`'s model.init_from (and model.tokenizer) take a Hub id: the cached snapshot's weights and tokenizer."""
    import torch

    from cpm4.model.checkpoint import load_checkpoint
    from cpm4.train.config import load_train_config
    from cpm4.train.trainer import build_model

    cfg = load_train_config(overrides=[f'model.init_from="{REPO}"', 'data.path="unused"'], kind="sft")
    model, tok = build_model(cfg)
    want = load_checkpoint(resolve_model_dir(REPO), dtype=torch.float32).state_dict()
    assert all(torch.equal(v, want[k]) for k, v in model.state_dict().items())
    assert tok is not None and tok.vocab_size > 0


def test_convert_takes_a_model_id_at_a_revision(offline, tmp_path, capsys):
    """`cpm4 convert org/name OUT --revision R` exports that snapshot (the source's weights, folded); a revision
    not in the cache and a revision given with a local folder are one-line errors that write nothing."""
    import json

    from cpm4.cli import main

    assert main(["convert", REPO, str(tmp_path / "llama"), "--revision", COMMIT]) == 0
    cfg = json.loads((tmp_path / "llama" / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    capsys.readouterr()
    assert main(["convert", REPO, str(tmp_path / "v9"), "--revision", "v9"]) != 0
    assert "acme/tiny-cpm4" in capsys.readouterr().err and not (tmp_path / "v9").exists()
    folder = resolve_model_dir(REPO)
    assert main(["convert", str(folder), str(tmp_path / "f"), "--revision", COMMIT]) != 0
    assert "applies to a Hugging Face model id" in capsys.readouterr().err and not (tmp_path / "f").exists()
