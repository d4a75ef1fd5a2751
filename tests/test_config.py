"""MiniCPM4Config / SparseConfig: parsing the released configs, presets, round trips and validation."""

from __future__ import annotations

import copy
import json
import math

import pytest

from cpm4.model.checkpoint import expected_shapes
from cpm4.model.config import PRESETS, REQUIRED, ConfigError, MiniCPM4Config, SparseConfig, preset

# Any 64 positive numbers stand in for the released LongRoPE table (head_dim 128 -> 64 factors).
FACTORS_64 = [round(1.0 + 0.037 * i, 6) for i in range(64)]
FACTORS_32 = FACTORS_64[:32]

SPARSE_8B = {"kernel_size": 32, "kernel_stride": 16, "init_blocks": 1, "block_size": 64,
             "window_size": 2048, "topk": 64, "use_nope": False, "dense_len": 8192}

AUTO_MAP = {
    "AutoConfig": "configuration_minicpm.MiniCPMConfig",
    "AutoModel": "modeling_minicpm.MiniCPMModel",
    "AutoModelForCausalLM": "modeling_minicpm.MiniCPMForCausalLM",
    "AutoModelForSeq2SeqLM": "modeling_minicpm.MiniCPMForCausalLM",
    "AutoModelForSequenceClassification": "modeling_minicpm.MiniCPMForSequenceClassification",
}


def minicpm4_8b() -> dict:
    """A dict shaped exactly like the released MiniCPM4-8B config.json."""
    return {
        "_name_or_path": "openbmb/MiniCPM4-8B",
        "architectures": ["MiniCPMForCausalLM"],
        "auto_map": copy.deepcopy(AUTO_MAP),
        "bos_token_id": 1,
        "eos_token_id": [2, 73440],
        "pad_token_id": 2,
        "hidden_act": "silu",
        "hidden_size": 4096,
        "initializer_range": 0.1,
        "intermediate_size": 16384,
        "max_position_embeddings": 32768,
        "model_type": "minicpm",
        "num_attention_heads": 32,
        "num_hidden_layers": 32,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-06,
        "rope_scaling": {
            "rope_type": "longrope",
            "long_factor": list(FACTORS_64),
            "short_factor": list(FACTORS_64),
            "original_max_position_embeddings": 32768,
        },
        "torch_dtype": "bfloat16",
        "transformers_version": "4.46.3",
        "use_cache": True,
        "vocab_size": 73448,
        "scale_emb": 12,
        "dim_model_base": 256,
        "scale_depth": 1.4,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "mup_denominator": 32,
        "sparse_config": dict(SPARSE_8B),
    }


def minicpm41_8b() -> dict:
    d = minicpm4_8b()
    d["_name_or_path"] = "openbmb/MiniCPM4.1-8B"
    d["max_position_embeddings"] = 65536
    d["rope_scaling"]["original_max_position_embeddings"] = 65536
    return d


def minicpm4_05b() -> dict:
    d = minicpm4_8b()
    del d["sparse_config"], d["mup_denominator"]
    d.update({"_name_or_path": "openbmb/MiniCPM4-0.5B", "hidden_size": 1024, "intermediate_size": 4096,
              "num_hidden_layers": 24, "num_attention_heads": 16, "num_key_value_heads": 2,
              "tie_word_embeddings": True})
    d["rope_scaling"]["long_factor"] = list(FACTORS_32)
    d["rope_scaling"]["short_factor"] = list(FACTORS_32)
    return d


# ---- the released configs ----------------------------------------------------------------------------

def test_parse_minicpm4_8b():
    raw = minicpm4_8b()
    c = MiniCPM4Config.from_dict(raw)
    assert (c.vocab_size, c.hidden_size, c.intermediate_size, c.num_hidden_layers) == (73448, 4096, 16384, 32)
    assert (c.num_attention_heads, c.num_key_value_heads) == (32, 2)
    assert c.dim_head == 128 and c.num_groups == 16 and c.head_dim is None
    assert c.tie_word_embeddings is False
    assert c.eos_token_ids == [2, 73440] and c.bos_token_id == 1 and c.pad_token_id == 2
    assert c.residual_scale == pytest.approx(0.2474873734, abs=1e-10)
    assert c.logit_divisor == 16
    assert c.rope_scaling == raw["rope_scaling"]
    assert c.architectures == ["MiniCPMForCausalLM"] and c.model_type == "minicpm"
    # Unknown fields are kept, unchanged.
    assert c.extra == {"_name_or_path": "openbmb/MiniCPM4-8B", "auto_map": AUTO_MAP, "mup_denominator": 32,
                       "transformers_version": "4.46.3", "use_cache": True}
    sc = c.sparse_config
    assert isinstance(sc, SparseConfig)
    assert (sc.kernel_size, sc.kernel_stride, sc.init_blocks, sc.block_size) == (32, 16, 1, 64)
    assert (sc.window_size, sc.topk, sc.use_nope, sc.dense_len) == (2048, 64, False, 8192)
    assert sc.variant == "gen-a"  # shaped like the June-2025 8B release, no explicit variant
    assert sc.extra == {}
    assert c.num_parameters() == 8_185_253_888
    assert raw == minicpm4_8b(), "from_dict must not modify its argument"


def test_parse_minicpm41_8b():
    c = MiniCPM4Config.from_dict(minicpm41_8b())
    assert c.max_position_embeddings == 65536
    assert c.rope_scaling["original_max_position_embeddings"] == 65536
    assert c.sparse_config.variant == "gen-b"
    assert c.extra["mup_denominator"] == 32
    assert c.num_parameters() == 8_185_253_888


def test_parse_minicpm4_05b_tied():
    c = MiniCPM4Config.from_dict(minicpm4_05b())
    assert c.tie_word_embeddings is True
    assert c.dim_head == 64 and c.num_groups == 8
    assert c.sparse_config is None
    assert c.logit_divisor == 4
    assert c.residual_scale == pytest.approx(0.2857738033, abs=1e-10)
    assert c.num_parameters() == 433_873_920


def test_presets_match_spec_parameter_counts():
    c8 = preset("minicpm4-8b")
    assert c8.num_parameters() == 8_185_253_888
    assert not c8.tie_word_embeddings
    assert c8.sparse_config is not None and c8.sparse_config.variant == "gen-b"
    c05 = preset("minicpm4-0.5b")
    assert c05.tie_word_embeddings
    assert c05.num_parameters() == 433_873_920
    assert c05.sparse_config is None
    tiny = preset("tiny")
    assert tiny.sparse_config is not None and tiny.num_groups == 4


@pytest.mark.parametrize("name,overrides", [
    ("tiny", {}), ("tiny", {"tie_word_embeddings": True}), ("tiny", {"head_dim": 32}),
    ("minicpm4-0.5b", {}), ("minicpm4-8b", {}),
])
def test_num_parameters_equals_model_tensor_count(name, overrides):
    c = preset(name, **overrides)
    total = sum(math.prod(s) for s in expected_shapes(c).values())
    assert c.num_parameters() == total


def test_preset_overrides_and_unknown_name():
    c = preset("tiny", num_hidden_layers=2, eos_token_id=7)
    assert c.num_hidden_layers == 2 and c.eos_token_ids == [7]
    assert PRESETS["tiny"]["num_hidden_layers"] == 4, "preset() must not modify the preset table"
    with pytest.raises(ConfigError, match="no-such-model"):
        preset("no-such-model")
    with pytest.raises(ConfigError, match="num_key_value_heads"):
        preset("tiny", num_key_value_heads=3)


def test_eos_token_ids_forms():
    assert preset("tiny", eos_token_id=5).eos_token_ids == [5]
    assert preset("tiny", eos_token_id=None).eos_token_ids == []
    assert preset("tiny", eos_token_id=[2, 9]).eos_token_ids == [2, 9]


def test_explicit_head_dim():
    c = preset("tiny", head_dim=32)  # 8 heads x 32 != hidden 128 is allowed with an explicit head_dim
    assert c.dim_head == 32
    assert c.to_dict()["head_dim"] == 32
    assert "head_dim" not in preset("tiny").to_dict()
    # With head_dim set, hidden_size need not be divisible by the head count.
    assert preset("tiny", hidden_size=100, head_dim=16).dim_head == 16


# ---- sparse variant inference -----------------------------------------------------------------------

def test_variant_inference():
    d = minicpm4_8b()
    assert MiniCPM4Config.from_dict(d).sparse_config.variant == "gen-a"
    d["sparse_config"]["variant"] = "gen-b"  # explicit wins
    assert MiniCPM4Config.from_dict(d).sparse_config.variant == "gen-b"
    d = minicpm41_8b()
    d["sparse_config"]["variant"] = "gen-a"
    assert MiniCPM4Config.from_dict(d).sparse_config.variant == "gen-a"
    # No rope_scaling: max_position_embeddings decides.
    d = minicpm4_8b()
    del d["rope_scaling"]
    assert MiniCPM4Config.from_dict(d).sparse_config.variant == "gen-a"
    d["max_position_embeddings"] = 65536
    assert MiniCPM4Config.from_dict(d).sparse_config.variant == "gen-b"
    # A different shape is never Gen-A by default.
    d = minicpm4_8b()
    d["vocab_size"] = 73440
    assert MiniCPM4Config.from_dict(d).sparse_config.variant == "gen-b"
    d = minicpm4_8b()
    d.update(hidden_size=2048, num_attention_heads=16)
    assert MiniCPM4Config.from_dict(d).sparse_config.variant == "gen-b"
    tiny = copy.deepcopy(PRESETS["tiny"])
    del tiny["sparse_config"]["variant"]
    assert MiniCPM4Config.from_dict(tiny).sparse_config.variant == "gen-b"


def test_sparse_config_derived_values():
    sc = SparseConfig.from_dict(dict(SPARSE_8B))
    assert sc.variant == "gen-b"
    assert sc.local_blocks == 32
    assert (sc.coarse_kernel_size, sc.coarse_kernel_stride) == (128, 64)
    assert sc.num_selected == 64 + 32
    assert SparseConfig.from_dict(dict(SPARSE_8B), default_variant="gen-a").num_selected == 64
    assert not sc.is_sparse(8191) and sc.is_sparse(8192)
    always = SparseConfig.from_dict(dict(SPARSE_8B, dense_len=-1))
    assert always.is_sparse(1)
    assert "lse_kernel_size" not in sc.to_dict() and "lse_kernel_stride" not in sc.to_dict()
    lse = SparseConfig.from_dict(dict(SPARSE_8B, lse_kernel_size=96, lse_kernel_stride=48))
    assert (lse.coarse_kernel_size, lse.coarse_kernel_stride) == (96, 48)
    assert lse.to_dict()["lse_kernel_size"] == 96
    with pytest.raises(ConfigError, match="sparse_config.lse_kernel_size"):
        SparseConfig.from_dict(dict(SPARSE_8B, lse_kernel_size=100, lse_kernel_stride=48))


# ---- round trips -------------------------------------------------------------------------------------

def test_to_dict_keeps_everything_and_round_trips():
    raw = minicpm4_8b()
    raw["some_future_field"] = {"nested": [1, 2, {"x": None}]}
    raw["sparse_config"]["some_kernel_knob"] = [3, "a"]
    c = MiniCPM4Config.from_dict(raw)
    assert c.sparse_config.extra == {"some_kernel_knob": [3, "a"]}
    out = c.to_dict()
    for key, value in raw.items():
        if key == "sparse_config":
            continue
        assert out[key] == value, key
    # sparse_config: every original key exactly, plus the resolved variant.
    assert out["sparse_config"] == {**raw["sparse_config"], "variant": "gen-a"}
    # Written back explicitly, the variant no longer depends on inference.
    again = MiniCPM4Config.from_dict(out)
    assert again.to_dict() == out
    assert again == c
    # to_dict returns copies: editing them does not touch the config.
    out["auto_map"]["AutoConfig"] = "changed"
    out["rope_scaling"]["short_factor"][0] = -1.0
    assert c.extra["auto_map"]["AutoConfig"] == AUTO_MAP["AutoConfig"]
    assert c.rope_scaling["short_factor"][0] == FACTORS_64[0]


def test_save_json_from_json_round_trip(tmp_path):
    raw = minicpm4_8b()
    raw["sparse_config"]["future_key"] = {"a": 1}
    c = MiniCPM4Config.from_dict(raw)
    path = tmp_path / "config.json"
    c.save_json(path)
    text = path.read_text()
    assert text.endswith("\n")
    on_disk = json.loads(text)
    assert on_disk == c.to_dict()
    assert on_disk["auto_map"] == AUTO_MAP and on_disk["mup_denominator"] == 32
    assert on_disk["transformers_version"] == "4.46.3"
    assert on_disk["sparse_config"]["future_key"] == {"a": 1}
    assert list(on_disk) == sorted(on_disk)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"], "temporary file left behind"
    back = MiniCPM4Config.from_json(path)
    assert back == c
    assert back.to_dict() == c.to_dict()


def test_from_json_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        MiniCPM4Config.from_json(tmp_path / "nope.json")
    with pytest.raises(FileNotFoundError):
        MiniCPM4Config.from_json(tmp_path)  # a directory is not a config file
    bad = tmp_path / "broken.json"
    bad.write_text('{"vocab_size": 73448, "hidden_size": ')
    with pytest.raises(ConfigError) as e:
        MiniCPM4Config.from_json(bad)
    assert str(bad) in str(e.value)
    binary = tmp_path / "binary.json"
    binary.write_bytes(b"\xff\xfe\x00\x81garbage")
    with pytest.raises(ConfigError) as e:
        MiniCPM4Config.from_json(binary)
    assert str(binary) in str(e.value)
    arr = tmp_path / "array.json"
    arr.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="object"):
        MiniCPM4Config.from_json(arr)


# ---- validation --------------------------------------------------------------------------------------

def test_required_list_is_complete():
    assert set(REQUIRED) == {"vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                             "num_attention_heads", "num_key_value_heads", "max_position_embeddings",
                             "scale_emb", "scale_depth", "dim_model_base"}


@pytest.mark.parametrize("field", sorted(REQUIRED))
def test_missing_required_field(field):
    d = minicpm4_8b()
    del d[field]
    with pytest.raises(ConfigError) as e:
        MiniCPM4Config.from_dict(d)
    assert str(e.value).startswith(field)


def test_missing_several_required_fields_names_all():
    d = minicpm4_8b()
    del d["scale_emb"], d["dim_model_base"]
    with pytest.raises(ConfigError) as e:
        MiniCPM4Config.from_dict(d)
    assert "scale_emb" in str(e.value) and "dim_model_base" in str(e.value)


def _set(path: str, value):
    """A mutation of the 8B dict: set the value at a dotted path."""
    def apply(d):
        *parents, last = path.split(".")
        for p in parents:
            d = d[p]
        d[last] = value
    return apply


def _delete(path: str):
    def apply(d):
        *parents, last = path.split(".")
        for p in parents:
            d = d[p]
        del d[last]
    return apply


CONTRADICTIONS = [
    # (mutation, text the message must contain)
    (_set("num_key_value_heads", 3), "num_key_value_heads"),
    (_set("num_key_value_heads", 64), "num_key_value_heads"),
    (_set("hidden_size", 4100), "hidden_size"),
    (_set("hidden_size", 4000), "head_dim"),  # 4000 / 32 = 125: odd, no rotary pairs
    (_set("head_dim", 127), "head_dim"),
    (_set("head_dim", 0), "head_dim"),
    (_set("rope_scaling.short_factor", FACTORS_64[:63]), "rope_scaling.short_factor"),
    (_set("rope_scaling.long_factor", FACTORS_64 + [1.0]), "rope_scaling.long_factor"),
    (_set("rope_scaling.long_factor", 1.0), "rope_scaling.long_factor"),
    (_delete("rope_scaling.short_factor"), "rope_scaling.short_factor"),
    (_delete("rope_scaling.original_max_position_embeddings"), "original_max_position_embeddings"),
    (_set("rope_scaling.rope_type", "ntk-by-parts"), "rope_scaling.rope_type"),
    (_set("rope_scaling.rope_type", "dynamic"), "rope_scaling"),
    (_set("rope_scaling", {"rope_type": "yarn", "factor": 0.5}), "rope_scaling.factor"),
    (_set("rope_scaling", "longrope"), "rope_scaling"),
    (_set("sparse_config.block_size", 40), "sparse_config.block_size"),
    (_set("sparse_config.window_size", 2000), "sparse_config.window_size"),
    (_set("sparse_config.kernel_size", 40), "sparse_config.kernel_size"),
    (_set("sparse_config.variant", "gen-c"), "sparse_config.variant"),
    (_set("sparse_config.topk", -1), "sparse_config.topk"),
    (_set("sparse_config.kernel_stride", 0), "sparse_config.kernel_stride"),
    (_set("sparse_config.init_blocks", -1), "sparse_config.init_blocks"),
    (_set("sparse_config.init_blocks", True), "sparse_config.init_blocks"),  # JSON true is no block count
    (_set("sparse_config.dense_len", False), "sparse_config.dense_len"),
    (_set("sparse_config.dense_len", -2), "sparse_config.dense_len"),
    (_set("sparse_config.use_nope", True), "sparse_config.use_nope"),
    (_set("sparse_config", [1, 2]), "sparse_config"),
    (_set("num_hidden_layers", -32), "num_hidden_layers"),
    (_set("vocab_size", 0), "vocab_size"),
    (_set("hidden_size", -4096), "hidden_size"),
    (_set("intermediate_size", -1), "intermediate_size"),
    (_set("num_attention_heads", -32), "num_attention_heads"),
    (_set("num_key_value_heads", 0), "num_key_value_heads"),
    (_set("max_position_embeddings", -1), "max_position_embeddings"),
    (_set("dim_model_base", -256), "dim_model_base"),
    (_set("scale_emb", -12), "scale_emb"),
    (_set("scale_depth", 0), "scale_depth"),
    (_set("rms_norm_eps", -1e-6), "rms_norm_eps"),
    (_set("rope_theta", -10000.0), "rope_theta"),
    (_set("initializer_range", -0.1), "initializer_range"),
    (_set("hidden_size", True), "hidden_size"),
    (_set("num_attention_heads", "32"), "num_attention_heads"),
    (_set("scale_emb", None), "scale_emb"),
    (_set("model_type", "llama"), "model_type"),
    (_set("hidden_act", "gelu"), "hidden_act"),
    (_set("attention_bias", True), "attention_bias"),
    (_set("tie_word_embeddings", "false"), "tie_word_embeddings"),
]


@pytest.mark.parametrize("mutate,field", CONTRADICTIONS, ids=[f"{i}-{f}" for i, (_, f) in enumerate(CONTRADICTIONS)])
def test_contradiction_names_field(mutate, field):
    d = minicpm4_8b()
    mutate(d)
    with pytest.raises(ConfigError) as e:
        MiniCPM4Config.from_dict(d)
    assert field in str(e.value)


def test_05b_rejects_8b_rope_table():
    d = minicpm4_05b()
    d["rope_scaling"]["short_factor"] = list(FACTORS_64)  # 64 factors, but head_dim 64 needs 32
    with pytest.raises(ConfigError, match=r"rope_scaling\.short_factor.*32"):
        MiniCPM4Config.from_dict(d)


def test_accepted_rope_variants():
    for rs in (None, {"rope_type": "default"}, {"type": "linear", "factor": 2.0},
               {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768},
               {"type": "longrope", "short_factor": FACTORS_64, "long_factor": FACTORS_64,
                "original_max_position_embeddings": 32768}):
        d = minicpm4_8b()
        d["rope_scaling"] = copy.deepcopy(rs)
        assert MiniCPM4Config.from_dict(d).rope_scaling == rs


def test_model_type_minicpm4_and_bool_flags_accepted():
    d = minicpm4_8b()
    d["model_type"] = "minicpm4"
    d["attention_bias"] = False
    d["initializer_range"] = 0.02
    c = MiniCPM4Config.from_dict(d)
    assert c.model_type == "minicpm4" and c.initializer_range == 0.02


def test_validate_catches_later_edits():
    c = preset("tiny")
    c.num_key_value_heads = 3
    with pytest.raises(ConfigError, match="num_key_value_heads"):
        c.validate()
    c = preset("tiny")
    c.sparse_config.window_size = 72
    with pytest.raises(ConfigError, match="sparse_config.window_size"):
        c.validate()


def test_transformers_5_spelling_is_the_same_config():
    """transformers 5 re-saves a config with `rope_parameters` (rope_theta inside) and `dtype` instead of
    `rope_scaling` / `rope_theta` / `torch_dtype`: the same model (its LongRoPE scaling was dropped as an unknown
    field, a model with other logits); a default rope_type is no scaling; both spellings disagreeing is an error."""
    released = preset("minicpm4-8b", torch_dtype="float16").to_dict()
    assert released["rope_scaling"]["rope_type"] == "longrope"
    v5 = {k: v for k, v in released.items() if k not in ("rope_scaling", "torch_dtype")}
    v5["rope_parameters"] = {**released["rope_scaling"], "rope_theta": released["rope_theta"]}
    v5["dtype"] = "float16"
    del v5["rope_theta"]
    cfg = MiniCPM4Config.from_dict(v5)
    assert cfg.to_dict() == released and not cfg.extra
    default = {k: v for k, v in released.items() if k not in ("rope_scaling", "rope_theta")}
    default["rope_parameters"] = {"rope_type": "default", "rope_theta": 5e5}
    cfg = MiniCPM4Config.from_dict(default)
    assert cfg.rope_scaling is None and cfg.rope_theta == 5e5
    for bad, what in (({**released, "dtype": "bfloat16"}, "dtype: 'bfloat16' differs from torch_dtype"),
                      ({**released, "rope_parameters": {"rope_type": "default", "rope_theta": 1.0}},
                       "rope_parameters.rope_theta: 1.0 differs"),
                      ({**released, "rope_parameters": {"rope_type": "yarn", "factor": 2.0}},
                       "rope_parameters: differs from rope_scaling"),
                      ({**released, "rope_parameters": [1]}, "rope_parameters: must be an object")):
        with pytest.raises(ConfigError, match=what):
            MiniCPM4Config.from_dict(bad)
