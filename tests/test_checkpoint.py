"""Checkpoints in the HF layout: save/load round trips, sharding, validation, atomic saves and `cpm4 init`."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import cpm4.model.checkpoint as ckpt
import cpm4.model.tokenizer as tokenizer_module
from cpm4.model.checkpoint import (
    INDEX_FILE,
    SINGLE_FILE,
    CheckpointError,
    expected_shapes,
    load_checkpoint,
    read_state_dict,
    save_checkpoint,
)
from cpm4.model.config import MiniCPM4Config, preset
from cpm4.model.init import create_checkpoint, init_model, random_weights
from cpm4.model.modeling import MiniCPM4ForCausalLM
from cpm4.model.tokenizer import Tokenizer

SHARD_RE = re.compile(r"model-(\d{5})-of-(\d{5})\.safetensors")


def tiny(**overrides) -> MiniCPM4Config:
    return preset("tiny", **overrides)


def weights(config: MiniCPM4Config, seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    return dict(random_weights(config, seed, dtype))


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def write_raw(folder, config: MiniCPM4Config, tensors: dict[str, torch.Tensor]) -> None:
    """A checkpoint folder written by hand (bypassing save_checkpoint's own checks)."""
    folder.mkdir(parents=True, exist_ok=True)
    config.save_json(folder / "config.json")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / SINGLE_FILE))


def assert_same_state(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(want)
    for k, v in want.items():
        assert got[k].dtype == v.dtype, k
        assert torch.equal(got[k], v), k


# ---- names and shapes ----------------------------------------------------------------------------

def test_expected_shapes_8b_match_spec():
    s = expected_shapes(preset("minicpm4-8b"))
    assert len(s) == 1 + 32 * 9 + 1 + 1
    assert s["model.embed_tokens.weight"] == (73448, 4096)
    assert s["lm_head.weight"] == (73448, 4096)
    assert s["model.norm.weight"] == (4096,)
    for i in (0, 31):
        p = f"model.layers.{i}."
        assert s[p + "input_layernorm.weight"] == (4096,)
        assert s[p + "post_attention_layernorm.weight"] == (4096,)
        assert s[p + "self_attn.q_proj.weight"] == (4096, 4096)
        assert s[p + "self_attn.k_proj.weight"] == (256, 4096)
        assert s[p + "self_attn.v_proj.weight"] == (256, 4096)
        assert s[p + "self_attn.o_proj.weight"] == (4096, 4096)
        assert s[p + "mlp.gate_proj.weight"] == (16384, 4096)
        assert s[p + "mlp.up_proj.weight"] == (16384, 4096)
        assert s[p + "mlp.down_proj.weight"] == (4096, 16384)
    assert "model.layers.32.mlp.up_proj.weight" not in s


def test_expected_shapes_05b_tied_has_no_head():
    s = expected_shapes(preset("minicpm4-0.5b"))
    assert "lm_head.weight" not in s
    assert s["model.layers.23.self_attn.k_proj.weight"] == (128, 1024)
    assert s["model.layers.0.mlp.down_proj.weight"] == (1024, 4096)


def test_model_state_dict_uses_hf_names():
    c = tiny()
    assert set(MiniCPM4ForCausalLM(c).state_dict()) == set(expected_shapes(c))


# ---- round trips ---------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_save_load_bit_identical(tmp_path, dtype):
    c = tiny()
    w = weights(c, seed=3, dtype=dtype)
    out = save_checkpoint(w, c, tmp_path / "ck")
    assert out == tmp_path / "ck"
    names = sorted(p.name for p in out.iterdir())
    assert names == ["config.json", "generation_config.json", SINGLE_FILE]
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == str(dtype).removeprefix("torch.")
    model = load_checkpoint(out)
    assert model.dtype == dtype
    assert_same_state(model.state_dict(), w)
    assert_same_state(read_state_dict(out, MiniCPM4Config.from_json(out / "config.json")), w)
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"] == c.eos_token_id and gen["bos_token_id"] == c.bos_token_id


def test_save_from_module_and_logits_identical(tmp_path):
    c = tiny()
    model = init_model(MiniCPM4ForCausalLM(c), seed=11).eval()
    save_checkpoint(model, c, tmp_path / "ck")
    loaded = load_checkpoint(tmp_path / "ck", device="cpu", dtype=None)
    assert not loaded.training
    ids = torch.tensor([[1, 17, 400, 5, 1023, 0, 77, 250, 9, 2]])
    with torch.no_grad():
        want, got = model(ids), loaded(ids)
    assert want.shape == (1, 10, c.vocab_size)
    assert torch.equal(got, want)
    # The weights really are random (a trivially constant output would also compare equal).
    assert want.std() > 0


def test_sharded_save(tmp_path):
    c = tiny()
    w = weights(c, seed=1)
    limit = 200_000
    out = save_checkpoint(w, c, tmp_path / "ck", max_shard_size=limit)
    shard_names = sorted(p.name for p in out.glob("*.safetensors"))
    n = len(shard_names)
    assert n > 2
    assert shard_names == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert all(SHARD_RE.fullmatch(s) for s in shard_names)
    assert not (out / SINGLE_FILE).exists()
    index = json.loads((out / INDEX_FILE).read_text())
    wm = index["weight_map"]
    assert set(wm) == set(w) == set(expected_shapes(c))
    assert set(wm.values()) == set(shard_names)
    assert index["metadata"]["total_size"] == sum(nbytes(t) for t in w.values())
    for s in shard_names:
        with safe_open(str(out / s), framework="pt") as f:
            keys = set(f.keys())
            assert keys == {k for k, v in wm.items() if v == s}
            size = sum(nbytes(f.get_tensor(k)) for k in keys)
        assert size <= limit or len(keys) == 1, s
    assert_same_state(load_checkpoint(out).state_dict(), w)


def test_shard_size_string(tmp_path):
    c = tiny()
    w = weights(c)
    out = save_checkpoint(w, c, tmp_path / "kb", max_shard_size="300KB")
    assert (out / INDEX_FILE).is_file()
    assert_same_state(load_checkpoint(out).state_dict(), w)
    out = save_checkpoint(w, c, tmp_path / "gb", max_shard_size="5GB")
    assert (out / SINGLE_FILE).is_file() and not (out / INDEX_FILE).exists()


def test_lazy_iterable_weights(tmp_path):
    c = tiny()
    out = save_checkpoint(random_weights(c, 5), c, tmp_path / "ck", max_shard_size=100_000)
    assert_same_state(load_checkpoint(out).state_dict(), weights(c, 5))


def test_load_with_dtype_conversion(tmp_path):
    c = tiny()
    w = weights(c, seed=2)
    save_checkpoint(w, c, tmp_path / "ck")
    for dt in (torch.bfloat16, "bf16", "bfloat16"):
        model = load_checkpoint(tmp_path / "ck", dtype=dt)
        assert_same_state(model.state_dict(), {k: v.to(torch.bfloat16) for k, v in w.items()})
    model16 = load_checkpoint(tmp_path / "ck", dtype=torch.float16)
    assert_same_state(model16.state_dict(), {k: v.to(torch.float16) for k, v in w.items()})
    with pytest.raises(ValueError, match="dtype"):
        load_checkpoint(tmp_path / "ck", dtype="int7")
    # vLLM's names: "half" is float16, "float" float32.
    assert load_checkpoint(tmp_path / "ck", dtype="half").dtype == torch.float16
    assert load_checkpoint(tmp_path / "ck", dtype="float").dtype == torch.float32


def test_save_with_dtype_conversion(tmp_path):
    c = tiny()
    w = weights(c, seed=2)
    out = save_checkpoint(w, c, tmp_path / "ck", dtype="bfloat16")
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert_same_state(load_checkpoint(out).state_dict(), {k: v.to(torch.bfloat16) for k, v in w.items()})
    assert w["model.norm.weight"].dtype == torch.float32, "the caller's tensors are not converted in place"


def test_unknown_config_fields_survive(tmp_path):
    d = dict(tiny().to_dict())
    d["auto_map"] = {"AutoConfig": "configuration_minicpm.MiniCPMConfig"}
    d["mup_denominator"] = 32
    d["sparse_config"] = dict(d["sparse_config"], future_knob=[1, 2])
    c = MiniCPM4Config.from_dict(d)
    out = save_checkpoint(weights(c), c, tmp_path / "ck")
    raw = json.loads((out / "config.json").read_text())
    assert raw["auto_map"] == d["auto_map"] and raw["mup_denominator"] == 32
    assert raw["sparse_config"]["future_knob"] == [1, 2]
    loaded = load_checkpoint(out)
    assert loaded.config.extra == {"auto_map": d["auto_map"], "mup_denominator": 32}
    assert loaded.config.sparse_config.extra == {"future_knob": [1, 2]}
    assert loaded.config == c


# ---- tied embeddings -----------------------------------------------------------------------------

def test_tied_checkpoint_without_head(tmp_path):
    c = tiny(tie_word_embeddings=True)
    w = weights(c, seed=4)
    assert "lm_head.weight" not in w
    out = save_checkpoint(w, c, tmp_path / "ck")
    with safe_open(str(out / SINGLE_FILE), framework="pt") as f:
        assert "lm_head.weight" not in f.keys()
    model = load_checkpoint(out)
    assert model.lm_head is None
    assert model.output_weight() is model.model.embed_tokens.weight
    assert torch.equal(model.output_weight(), w["model.embed_tokens.weight"])
    ref = init_model(MiniCPM4ForCausalLM(c), seed=4).eval()
    ids = torch.tensor([[1, 2, 3, 500, 1000]])
    with torch.no_grad():
        assert torch.equal(model(ids), ref(ids))


def test_tied_checkpoint_with_identical_head_loads(tmp_path):
    c = tiny(tie_word_embeddings=True)
    w = weights(c, seed=4)
    write_raw(tmp_path / "ck", c, {**w, "lm_head.weight": w["model.embed_tokens.weight"].clone()})
    model = load_checkpoint(tmp_path / "ck")
    assert model.lm_head is None
    assert_same_state(model.state_dict(), w)


def test_tied_checkpoint_with_different_head_errors(tmp_path):
    c = tiny(tie_word_embeddings=True)
    w = weights(c, seed=4)
    head = w["model.embed_tokens.weight"].clone()
    head[3, 7] += 1e-3
    write_raw(tmp_path / "ck", c, {**w, "lm_head.weight": head})
    with pytest.raises(CheckpointError, match="lm_head.weight"):
        load_checkpoint(tmp_path / "ck")


def test_tied_config_refuses_to_save_a_head(tmp_path):
    c = tiny(tie_word_embeddings=True)
    w = weights(c)
    with pytest.raises(CheckpointError, match="lm_head.weight"):
        save_checkpoint({**w, "lm_head.weight": w["model.embed_tokens.weight"]}, c, tmp_path / "ck")
    assert not (tmp_path / "ck").exists()


def test_untied_config_missing_head_errors(tmp_path):
    c = tiny()
    w = weights(c)
    del w["lm_head.weight"]
    write_raw(tmp_path / "ck", c, w)
    with pytest.raises(CheckpointError, match="lm_head.weight") as e:
        load_checkpoint(tmp_path / "ck")
    assert "tie_word_embeddings" in str(e.value)


# ---- malformed folders ---------------------------------------------------------------------------

def test_missing_shard_named(tmp_path):
    c = tiny()
    out = save_checkpoint(weights(c), c, tmp_path / "ck", max_shard_size=200_000)
    victim = sorted(out.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(out)
    assert victim.name in str(e.value)


def test_index_pointing_at_wrong_shard(tmp_path):
    c = tiny()
    out = save_checkpoint(weights(c), c, tmp_path / "ck", max_shard_size=200_000)
    index = json.loads((out / INDEX_FILE).read_text())
    first = sorted(set(index["weight_map"].values()))[0]
    name = next(k for k, v in index["weight_map"].items() if v != first)
    index["weight_map"][name] = first
    (out / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=re.escape(name)):
        load_checkpoint(out)


def test_malformed_index(tmp_path):
    c = tiny()
    out = save_checkpoint(weights(c), c, tmp_path / "ck", max_shard_size=200_000)
    (out / INDEX_FILE).write_text('{"metadata": {}}')
    with pytest.raises(CheckpointError, match=INDEX_FILE):
        load_checkpoint(out)


@pytest.mark.parametrize("name", ["model.layers.2.mlp.up_proj.weight", "model.norm.weight",
                                  "model.embed_tokens.weight"])
def test_missing_tensor_named(tmp_path, name):
    c = tiny()
    w = weights(c)
    del w[name]
    write_raw(tmp_path / "ck", c, w)
    with pytest.raises(CheckpointError, match=re.escape(name)):
        load_checkpoint(tmp_path / "ck")


def test_extra_tensor_named(tmp_path):
    c = tiny()
    w = weights(c)
    w["model.layers.4.mlp.up_proj.weight"] = torch.zeros(384, 128)  # tiny has 4 layers: 0..3
    write_raw(tmp_path / "ck", c, w)
    with pytest.raises(CheckpointError, match=re.escape("model.layers.4.mlp.up_proj.weight")):
        load_checkpoint(tmp_path / "ck")


def test_ignored_rotary_buffer_is_accepted(tmp_path):
    c = tiny()
    w = weights(c)
    write_raw(tmp_path / "ck", c, {**w, "model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(8)})
    assert_same_state(load_checkpoint(tmp_path / "ck").state_dict(), w)


@pytest.mark.parametrize("name,shape", [("model.layers.1.self_attn.k_proj.weight", (128, 32)),
                                        ("model.norm.weight", (64,)),
                                        ("lm_head.weight", (1000, 128))])
def test_wrong_shape_named(tmp_path, name, shape):
    c = tiny()
    w = weights(c)
    w[name] = torch.zeros(shape)
    write_raw(tmp_path / "ck", c, w)
    with pytest.raises(CheckpointError, match=re.escape(name)) as e:
        load_checkpoint(tmp_path / "ck")
    assert str(tuple(shape)) in str(e.value)


def test_integer_tensor_rejected(tmp_path):
    c = tiny()
    w = weights(c)
    w["model.norm.weight"] = torch.ones(128, dtype=torch.int32)
    write_raw(tmp_path / "ck", c, w)
    with pytest.raises(CheckpointError, match="model.norm.weight"):
        load_checkpoint(tmp_path / "ck")


def test_no_weights_or_no_folder(tmp_path):
    c = tiny()
    (tmp_path / "ck").mkdir()
    c.save_json(tmp_path / "ck" / "config.json")
    with pytest.raises(CheckpointError, match=SINGLE_FILE):
        load_checkpoint(tmp_path / "ck")
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "absent")
    (tmp_path / "noconfig").mkdir()
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "noconfig")


def test_save_rejects_bad_weights(tmp_path):
    c = tiny()
    w = weights(c)
    bad_shape = {**w, "model.norm.weight": torch.ones(64)}
    with pytest.raises(CheckpointError, match="model.norm.weight"):
        save_checkpoint(bad_shape, c, tmp_path / "a")
    missing = {k: v for k, v in w.items() if k != "model.layers.3.mlp.down_proj.weight"}
    with pytest.raises(CheckpointError, match=re.escape("model.layers.3.mlp.down_proj.weight")):
        save_checkpoint(missing, c, tmp_path / "b")
    dup = list(w.items()) + [("model.norm.weight", torch.zeros(128))]
    with pytest.raises(CheckpointError, match="duplicate tensor model.norm.weight"):
        save_checkpoint(dup, c, tmp_path / "c", max_shard_size=100_000)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


# ---- atomic saves --------------------------------------------------------------------------------

def _failing_save_file(monkeypatch, fail_on: int = 2):
    real = ckpt.save_file
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == fail_on:
            raise OSError("disk full (simulated)")
        return real(*args, **kwargs)

    monkeypatch.setattr(ckpt, "save_file", flaky)
    return calls


def test_interrupted_save_leaves_nothing(tmp_path, monkeypatch):
    c = tiny()
    calls = _failing_save_file(monkeypatch)
    with pytest.raises(OSError, match="simulated"):
        save_checkpoint(weights(c), c, tmp_path / "ck", max_shard_size=100_000)
    assert calls["n"] == 2
    assert list(tmp_path.iterdir()) == []  # neither the folder nor a .partial- folder


def test_interrupted_overwrite_keeps_old_checkpoint(tmp_path, monkeypatch):
    c = tiny()
    old = weights(c, seed=1)
    out = save_checkpoint(old, c, tmp_path / "ck")
    before = sorted(p.name for p in out.iterdir())
    _failing_save_file(monkeypatch)
    with pytest.raises(OSError, match="simulated"):
        save_checkpoint(weights(c, seed=2), c, out, max_shard_size=100_000, overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]
    assert sorted(p.name for p in out.iterdir()) == before
    assert_same_state(load_checkpoint(out).state_dict(), old)


def test_exception_in_lazy_weights_cleans_up(tmp_path):
    c = tiny()

    def gen():
        for i, item in enumerate(random_weights(c, 0)):
            if i == 5:
                raise RuntimeError("producer failed")
            yield item

    with pytest.raises(RuntimeError, match="producer failed"):
        save_checkpoint(gen(), c, tmp_path / "ck", max_shard_size=50_000)
    assert list(tmp_path.iterdir()) == []


def test_non_empty_folder_needs_overwrite(tmp_path):
    c = tiny()
    out = tmp_path / "ck"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        save_checkpoint(weights(c), c, out)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    # An existing empty folder is fine.
    (tmp_path / "empty").mkdir()
    save_checkpoint(weights(c), c, tmp_path / "empty")
    assert (tmp_path / "empty" / SINGLE_FILE).is_file()
    # A plain file in the way also needs overwrite.
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError):
        save_checkpoint(weights(c), c, tmp_path / "file")


def test_overwrite_replaces_whole_folder(tmp_path):
    c = tiny()
    out = save_checkpoint(weights(c, seed=1), c, tmp_path / "ck", max_shard_size=100_000)
    assert (out / INDEX_FILE).is_file()
    new = weights(c, seed=2)
    save_checkpoint(new, c, out, overwrite=True)
    # No stale shards or index from the sharded checkpoint may remain (the index would win on load).
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", SINGLE_FILE]
    assert_same_state(load_checkpoint(out).state_dict(), new)
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]


def test_overwrite_plain_file(tmp_path):
    c = tiny()
    (tmp_path / "ck").write_text("not a checkpoint")
    save_checkpoint(weights(c), c, tmp_path / "ck", overwrite=True)
    assert (tmp_path / "ck" / SINGLE_FILE).is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["ck"], "the replaced file must not be left aside"


# ---- random init and `cpm4 init` -----------------------------------------------------------------

def test_random_weights_deterministic_and_dtype_independent():
    c = tiny()
    a, b, other = weights(c, 7), weights(c, 7), weights(c, 8)
    assert_same_state(a, b)
    assert all(not torch.equal(a[k], other[k]) for k in a if not k.endswith("norm.weight"))
    bf = weights(c, 7, torch.bfloat16)
    assert_same_state(bf, {k: v.to(torch.bfloat16) for k, v in a.items()})
    model = init_model(MiniCPM4ForCausalLM(c), seed=7)
    assert_same_state(model.state_dict(), a)


@pytest.mark.parametrize("dim_model_base", [64, 32, 8])
def test_mup_init_std(dim_model_base):
    c = tiny(dim_model_base=dim_model_base)
    m = c.hidden_size / dim_model_base
    w = weights(c, seed=0)
    r = c.initializer_range

    def pooled_std(suffix: str) -> float:
        return torch.cat([v.flatten() for k, v in w.items() if k.endswith(suffix)]).std().item()

    for suffix in ("q_proj.weight", "k_proj.weight", "o_proj.weight", "gate_proj.weight", "down_proj.weight",
                   "lm_head.weight"):
        assert pooled_std(suffix) == pytest.approx(r / math.sqrt(m), rel=0.03), suffix
    emb = w["model.embed_tokens.weight"]
    assert emb.std().item() == pytest.approx(r, rel=0.03)
    assert abs(emb.mean().item()) < 0.01 * r
    for k, v in w.items():
        if k.endswith("norm.weight"):
            assert torch.equal(v, torch.ones_like(v)), k


@pytest.fixture(scope="module")
def created(tmp_path_factory):
    root = tmp_path_factory.mktemp("init")
    real_build = tokenizer_module.build_tokenizer
    built: dict = {}

    def build_once(*args, **kwargs):  # training the BPE is the slow part; it is deterministic anyway
        key = (args, tuple(sorted(kwargs.items())))
        if key not in built:
            built[key] = real_build(*args, **kwargs)
        return built[key]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tokenizer_module, "build_tokenizer", build_once)
        out = {key: create_checkpoint("tiny", root / key, seed=seed, dtype="float32")
               for key, seed in (("a", 0), ("b", 0), ("c", 1))}
    assert len(built) == 1
    return out


def test_create_checkpoint_files(created):
    out = created["a"]
    names = {p.name for p in out.iterdir()}
    assert {"config.json", SINGLE_FILE, "generation_config.json", "tokenizer.json",
            "tokenizer_config.json"} <= names
    assert not any(".partial-" in n or ".tmp-" in n for n in names)
    cfg = MiniCPM4Config.from_json(out / "config.json")
    tok = Tokenizer.from_dir(out)
    assert cfg.eos_token_ids == tok.stop_token_ids
    assert cfg.bos_token_id == tok.bos_token_id
    assert tok.vocab_size <= cfg.vocab_size
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"] == tok.stop_token_ids
    assert cfg.torch_dtype == "float32"
    model = load_checkpoint(out)
    assert model.dtype == torch.float32
    ids = torch.tensor([tok.encode("hello world")])
    with torch.no_grad():
        assert torch.isfinite(model(ids)).all()


def test_create_checkpoint_seeds(created):
    cfg = MiniCPM4Config.from_json(created["a"] / "config.json")
    a = read_state_dict(created["a"], cfg)
    assert_same_state(read_state_dict(created["b"], cfg), a)
    c = read_state_dict(created["c"], cfg)
    assert not torch.equal(a["model.layers.0.self_attn.q_proj.weight"], c["model.layers.0.self_attn.q_proj.weight"])
    assert not torch.equal(a["model.embed_tokens.weight"], c["model.embed_tokens.weight"])
    assert_same_state(a, weights(preset("tiny"), seed=0))


def test_create_checkpoint_refuses_existing(created):
    with pytest.raises(FileExistsError):
        create_checkpoint("tiny", created["a"], seed=0)


def test_pickled_weights_are_named(tiny_checkpoint, tmp_path):
    """A folder with pytorch_model.bin only: the error says why it is not loaded and what to do."""
    import shutil

    from cpm4.model.checkpoint import CheckpointError

    folder = tmp_path / "bin"
    shutil.copytree(tiny_checkpoint, folder)
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pytorch_model.bin weights, which cpm4 does not unpickle"):
        load_checkpoint(folder)
