"""`cpm4 convert --to llama`: the folded checkpoint run by transformers' LlamaForCausalLM gives our logits."""

import subprocess
import sys

import pytest
import torch
from conftest import random_model

from cpm4.model.checkpoint import load_checkpoint, save_checkpoint
from cpm4.model.convert import convert_to_llama

transformers = pytest.importorskip("transformers")


def llama_logits(path, ids):
    model = transformers.LlamaForCausalLM.from_pretrained(str(path), torch_dtype=torch.float32,
                                                          local_files_only=True).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].double()


@pytest.mark.parametrize("overrides", [
    {"sparse_config": None},
    {"sparse_config": None, "tie_word_embeddings": True},
    {"sparse_config": None, "rope_scaling": {"rope_type": "longrope", "original_max_position_embeddings": 4096,
                                             "short_factor": [1.0 + 0.5 * i for i in range(8)],
                                             "long_factor": [1.0 + 0.5 * i for i in range(8)]}},
    # Lists that differ: ours uses one by the table's length, Llama runtimes switch by the sequence's.
    {"sparse_config": None, "rope_scaling": {"rope_type": "longrope", "original_max_position_embeddings": 1024,
                                             "short_factor": [1.0] * 8,
                                             "long_factor": [1.0 + 0.5 * i for i in range(8)]}},
    # A `factor` (the released config may carry "factor": 1.0): transformers took its magnitude from it, ours from
    # the table's length (the export now writes that as attention_factor).
    {"sparse_config": None, "rope_scaling": {"rope_type": "longrope", "original_max_position_embeddings": 1024,
                                             "factor": 1.0, "short_factor": [1.0] * 8,
                                             "long_factor": [1.0 + 0.5 * i for i in range(8)]}},
])
def test_llama_export_matches_our_logits(tmp_path, overrides):
    model = random_model("tiny", dtype=torch.float32, **overrides)
    save_checkpoint(model, model.config, tmp_path / "src")
    out = convert_to_llama(tmp_path / "src", tmp_path / "llama")
    ids = torch.randint(3, 1000, (60,), generator=torch.Generator().manual_seed(0)).tolist()
    ours = load_checkpoint(tmp_path / "src")(torch.tensor([ids]))[0].double()
    theirs = llama_logits(out, ids)
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)
    # The MiniCPM4 config with identity µP constants is the same model too.
    assert (out / "config.json").read_text().count('"LlamaForCausalLM"') == 1


def test_convert_cli_and_errors(tmp_path):
    model = random_model("tiny", dtype=torch.float32, sparse_config=None)
    save_checkpoint(model, model.config, tmp_path / "src")
    run = [sys.executable, "-m", "cpm4.cli", "convert", str(tmp_path / "src"), str(tmp_path / "out")]
    r = subprocess.run(run, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "out" / "model.safetensors").is_file()
    r = subprocess.run(run, capture_output=True, text=True, timeout=120)  # exists: refused
    assert r.returncode == 2 and "not empty" in r.stderr
    r = subprocess.run([sys.executable, "-m", "cpm4.cli", "convert", str(tmp_path / "nope"), str(tmp_path / "o2")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "not found" in r.stderr


def test_export_tokenizer_chat_template_and_self_overwrite(tmp_path):
    """transformers' apply_chat_template on the export gives the ids cpm4 feeds (one BOS first); the tokenizer
    knows the context; an export onto its own source is refused."""
    from cpm4.model.tokenizer import Tokenizer, build_tokenizer

    model = random_model("tiny", dtype=torch.float32, sparse_config=None)
    save_checkpoint(model, model.config, tmp_path / "src", tokenizer=build_tokenizer(1024))
    out = convert_to_llama(tmp_path / "src", tmp_path / "llama")
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
    ours = Tokenizer.from_dir(tmp_path / "src").encode_chat(msgs)
    hf = transformers.AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    theirs = hf.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert list(theirs) == ours and ours[0] == hf.bos_token_id and ours.count(hf.bos_token_id) == 1
    assert Tokenizer.from_dir(out).encode_chat(msgs) == ours  # still one BOS through cpm4
    assert hf.model_max_length == model.config.max_position_embeddings
    with pytest.raises(ValueError, match="its own source"):
        convert_to_llama(tmp_path / "src", tmp_path / "src", overwrite=True)
    assert load_checkpoint(tmp_path / "src").config.scale_emb == model.config.scale_emb  # untouched


def test_export_keeps_generation_config_licence_and_tokenizer_files(tmp_path, monkeypatch):
    """The source's generation_config.json (sampling defaults; an EOS listed only there) reaches the export, with
    every EOS id; its licence and SentencePiece model are copied; pad_token_id kept; `cpm4 convert SRC .` works
    (it failed renaming "." after the whole export)."""
    import json

    from cpm4.cli import main
    from cpm4.model.tokenizer import build_tokenizer

    model = random_model("tiny", dtype=torch.float32, sparse_config=None)
    model.config.pad_token_id = 0
    src = tmp_path / "src"
    save_checkpoint(model, model.config, src, tokenizer=build_tokenizer(1024),
                    generation_config={"bos_token_id": 1, "eos_token_id": [2, 7], "temperature": 0.8, "top_p": 0.8})
    (src / "LICENSE").write_text("licence text\n")
    (src / "tokenizer.model").write_bytes(b"spm")
    out = convert_to_llama(src, tmp_path / "llama")
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["temperature"] == 0.8 and gen["top_p"] == 0.8  # were dropped
    assert gen["eos_token_id"] == model.config.eos_token_ids + [i for i in (2, 7) if i not in
                                                                 model.config.eos_token_ids]
    hf_gen = transformers.GenerationConfig.from_pretrained(str(out), local_files_only=True)
    assert hf_gen.temperature == 0.8 and 7 in hf_gen.eos_token_id
    assert (out / "LICENSE").read_text() == "licence text\n" and (out / "tokenizer.model").read_bytes() == b"spm"
    assert json.loads((out / "config.json").read_text())["pad_token_id"] == 0
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    assert main(["convert", str(src), "."]) == 0
    assert (here / "model.safetensors").is_file() and not list(tmp_path.glob(".*partial*"))
