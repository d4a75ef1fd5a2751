"""MiniCPM4 configuration: parsing and validating the Hugging Face `config.json`.

Every field the released MiniCPM4 configs carry is understood; fields we do not know are kept in
`extra` and written back on save, so a checkpoint round-trips through cpm4 without losing anything.
"""

from __future__ import annotations

import copy
import json
import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A config field is missing, malformed or contradicts another one. The message names the field."""


# InfLLM v2 exists in two numerically different code generations (spec/infllm_v2.md):
# "gen-b" (MiniCPM4.1, current kernels; coarse-key LSE, init+local blocks forced into the top-k) and
# "gen-a" (MiniCPM4-8B of June 2025; exact LSE, local window added inside the attention).
SPARSE_VARIANTS = ("gen-a", "gen-b")


@dataclass
class SparseConfig:
    kernel_size: int = 32
    kernel_stride: int = 16
    init_blocks: int = 1
    block_size: int = 64
    window_size: int = 2048
    topk: int = 64
    use_nope: bool = False
    dense_len: int = 8192
    variant: str = "gen-b"
    # Coarse kernels for the LSE approximation are 4x the fine ones in the reference (hard-coded there).
    lse_kernel_size: int | None = None
    lse_kernel_stride: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def local_blocks(self) -> int:
        return self.window_size // self.block_size

    @property
    def coarse_kernel_size(self) -> int:
        return self.lse_kernel_size or 4 * self.kernel_size

    @property
    def coarse_kernel_stride(self) -> int:
        return self.lse_kernel_stride or 4 * self.kernel_stride

    @property
    def num_selected(self) -> int:
        """Blocks picked by top-k per query and KV head (Gen-B counts the forced ones in it)."""
        return self.topk + self.local_blocks if self.variant == "gen-b" else self.topk

    def is_sparse(self, kv_len: int) -> bool:
        """The reference switch: dense while the sequence is shorter than dense_len (-1: always sparse)."""
        return self.dense_len < 0 or kv_len >= self.dense_len

    def validate(self) -> None:
        def need(ok: bool, name: str, msg: str) -> None:
            if not ok:
                raise ConfigError(f"sparse_config.{name}: {msg}")

        for name in ("kernel_size", "kernel_stride", "block_size", "window_size", "topk"):
            v = getattr(self, name)
            need(is_int(v) and v > 0, name, f"must be a positive integer, got {v!r}")
        need(is_int(self.init_blocks) and self.init_blocks >= 0, "init_blocks",
             f"must be a non-negative integer, got {self.init_blocks!r}")
        need(is_int(self.dense_len) and (self.dense_len >= 0 or self.dense_len == -1), "dense_len",
             f"must be >= 0 or -1 (always sparse), got {self.dense_len!r}")
        need(self.kernel_size % self.kernel_stride == 0, "kernel_size",
             f"{self.kernel_size} is not a multiple of kernel_stride {self.kernel_stride}")
        need(self.block_size % self.kernel_stride == 0, "block_size",
             f"{self.block_size} is not a multiple of kernel_stride {self.kernel_stride}")
        need(self.window_size % self.block_size == 0, "window_size",
             f"{self.window_size} is not a multiple of block_size {self.block_size}")
        for name in ("lse_kernel_size", "lse_kernel_stride"):  # None: 4x the fine kernel's
            v = getattr(self, name)
            need(v is None or is_int(v) and v > 0, name, f"must be a positive integer or null, got {v!r}")
        need(self.coarse_kernel_size % self.coarse_kernel_stride == 0, "lse_kernel_size",
             f"{self.coarse_kernel_size} is not a multiple of lse_kernel_stride {self.coarse_kernel_stride}")
        # The forced blocks (initial + local) must fit in the top-k, or which of them survive would depend on
        # tie-breaking among +inf scores.
        need(self.topk >= self.init_blocks + 1, "topk", f"must be >= init_blocks + 1, got {self.topk}")
        need(self.variant in SPARSE_VARIANTS, "variant", f"must be one of {SPARSE_VARIANTS}, got {self.variant!r}")
        need(not self.use_nope, "use_nope", "true is not supported yet (no released config uses it)")

    @classmethod
    def from_dict(cls, d: dict[str, Any], default_variant: str = "gen-b") -> SparseConfig:
        if not isinstance(d, dict):
            raise ConfigError(f"sparse_config: must be an object, got {type(d).__name__}")
        known = {f.name for f in fields(cls)} - {"extra"}
        kwargs = {k: v for k, v in d.items() if k in known}
        kwargs.setdefault("variant", default_variant)
        cfg = cls(**kwargs, extra={k: v for k, v in d.items() if k not in known})
        cfg.validate()
        return cfg

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        for k in ("lse_kernel_size", "lse_kernel_stride"):
            if out[k] is None:
                del out[k]
        out.update(self.extra)
        return out


# Fields a MiniCPM4 config must carry: silently defaulting any of them would compute a different model.
REQUIRED = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "max_position_embeddings", "scale_emb", "scale_depth", "dim_model_base",
)


@dataclass
class MiniCPM4Config:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    max_position_embeddings: int
    scale_emb: float
    scale_depth: float
    dim_model_base: int
    head_dim: int | None = None
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    tie_word_embeddings: bool = True
    hidden_act: str = "silu"
    initializer_range: float = 0.1
    attention_bias: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = None
    torch_dtype: str | None = "bfloat16"
    sparse_config: SparseConfig | None = None
    # Multi-token-prediction modules saved with a trained checkpoint (spec/training.md); inference ignores them.
    num_mtp_layers: int = 0
    architectures: list[str] = field(default_factory=lambda: ["MiniCPMForCausalLM"])
    model_type: str = "minicpm"
    extra: dict[str, Any] = field(default_factory=dict)

    # ---- derived ----
    @property
    def dim_head(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def num_groups(self) -> int:
        """Query heads per KV head (GQA group size)."""
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def residual_scale(self) -> float:
        return self.scale_depth / math.sqrt(self.num_hidden_layers)

    @property
    def logit_divisor(self) -> float:
        """µP width multiplier m = hidden_size / dim_model_base; logits are computed from h / m."""
        return self.hidden_size / self.dim_model_base

    @property
    def eos_token_ids(self) -> list[int]:
        e = self.eos_token_id
        if e is None:
            return []
        return list(e) if isinstance(e, list) else [e]

    # ---- validation ----
    def validate(self) -> None:
        def need(ok: bool, name: str, msg: str) -> None:
            if not ok:
                raise ConfigError(f"{name}: {msg}")

        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "max_position_embeddings", "dim_model_base"):
            v = getattr(self, name)
            need(is_int(v) and v > 0, name, f"must be a positive integer, got {v!r}")
        for name in ("scale_emb", "scale_depth", "rms_norm_eps", "rope_theta"):
            v = getattr(self, name)  # inf passes `> 0` but makes every logit NaN
            need(is_number(v) and 0 < v < math.inf, name, f"must be a positive number, got {v!r}")
        need(is_number(self.initializer_range) and 0 <= self.initializer_range < math.inf, "initializer_range",
             f"must be a non-negative number, got {self.initializer_range!r}")
        need(is_int(self.num_mtp_layers) and self.num_mtp_layers >= 0, "num_mtp_layers",
             f"must be a non-negative integer, got {self.num_mtp_layers!r}")
        # Token ids: used as indices and compared with sampled ids, so a string would fail (or never match) later.
        for name in ("bos_token_id", "pad_token_id"):
            v = getattr(self, name)
            need(v is None or is_int(v), name, f"must be an integer or null, got {v!r}")
        e = self.eos_token_id
        need(e is None or is_int(e) or isinstance(e, list) and all(is_int(t) for t in e), "eos_token_id",
             f"must be an integer, a list of integers or null, got {e!r}")
        need(self.torch_dtype is None or isinstance(self.torch_dtype, str), "torch_dtype",
             f"must be a dtype name such as 'bfloat16', got {self.torch_dtype!r}")
        need(isinstance(self.tie_word_embeddings, bool), "tie_word_embeddings",
             f"must be true or false, got {self.tie_word_embeddings!r}")
        need(self.model_type in ("minicpm", "minicpm4"), "model_type",
             f"expected 'minicpm' (MiniCPM4), got {self.model_type!r}")
        need(self.hidden_act == "silu", "hidden_act", f"only 'silu' is used by MiniCPM4, got {self.hidden_act!r}")
        need(not self.attention_bias, "attention_bias", "MiniCPM4 has no attention biases")
        need(self.num_attention_heads % self.num_key_value_heads == 0, "num_key_value_heads",
             f"{self.num_key_value_heads} does not divide num_attention_heads {self.num_attention_heads}")
        if self.head_dim is None:
            need(self.hidden_size % self.num_attention_heads == 0, "num_attention_heads",
                 f"{self.num_attention_heads} does not divide hidden_size {self.hidden_size} (set head_dim)")
        else:
            need(is_int(self.head_dim) and self.head_dim > 0, "head_dim",
                 f"must be a positive integer, got {self.head_dim!r}")
        need(self.dim_head % 2 == 0, "head_dim", f"rotary embedding needs an even head dim, got {self.dim_head}")
        self._validate_rope()
        if self.sparse_config is not None:
            self.sparse_config.validate()

    def _validate_rope(self) -> None:
        rs = self.rope_scaling
        if rs is None:
            return
        if not isinstance(rs, dict):
            raise ConfigError(f"rope_scaling: must be an object or null, got {type(rs).__name__}")
        kind = rs.get("rope_type", rs.get("type"))
        if kind in (None, "default"):
            return
        half = self.dim_head // 2
        orig = rs.get("original_max_position_embeddings")
        if orig is not None and not (is_int(orig) and orig > 0):
            raise ConfigError(f"rope_scaling.original_max_position_embeddings: must be a positive integer, "
                              f"got {orig!r}")
        for key in ("beta_fast", "beta_slow", "attention_factor", "mscale", "mscale_all_dim"):  # YaRN's
            v = rs.get(key)
            if v is not None and not (is_number(v) and math.isfinite(v)):
                raise ConfigError(f"rope_scaling.{key}: must be a number, got {v!r}")
        if kind == "longrope":
            for key in ("short_factor", "long_factor"):
                v = rs.get(key)
                if not isinstance(v, list) or len(v) != half:
                    raise ConfigError(f"rope_scaling.{key}: needs a list of head_dim/2 = {half} numbers, "
                                      f"got {len(v) if isinstance(v, list) else v!r}")
                bad = next((f for f in v if not (is_number(f) and 0 < f < math.inf)), None)
                if bad is not None:
                    raise ConfigError(f"rope_scaling.{key}: every factor must be a positive number, got {bad!r}")
            if "original_max_position_embeddings" not in rs:
                raise ConfigError("rope_scaling.original_max_position_embeddings: missing for longrope")
        elif kind in ("yarn", "linear", "dynamic"):
            f = rs.get("factor")
            if not isinstance(f, (int, float)) or f < 1:
                raise ConfigError(f"rope_scaling.factor: must be a number >= 1 for {kind}, got {f!r}")
            if kind == "dynamic":
                raise ConfigError("rope_scaling.rope_type: 'dynamic' NTK scaling is not supported")
        else:
            raise ConfigError(f"rope_scaling.rope_type: unsupported {kind!r} (longrope, yarn, linear, default)")

    # ---- (de)serialisation ----
    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MiniCPM4Config:
        if not isinstance(d, dict):
            raise ConfigError(f"config must be a JSON object, got {type(d).__name__}")
        missing = [k for k in REQUIRED if k not in d]
        if missing:
            raise ConfigError(f"{missing[0]}: required field missing from config"
                              + (f" (also missing: {', '.join(missing[1:])})" if missing[1:] else ""))
        d = _from_transformers_5(copy.deepcopy(d))
        known = {f.name for f in fields(cls)} - {"extra", "sparse_config"}
        kwargs = {k: d[k] for k in known if k in d}
        sc = d.get("sparse_config")
        if sc is not None:
            kwargs["sparse_config"] = SparseConfig.from_dict(sc, default_variant=_infer_sparse_variant(d))
        extra = {k: v for k, v in d.items() if k not in known and k != "sparse_config"}
        cfg = cls(**kwargs, extra=extra)
        cfg.validate()
        return cfg

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in fields(self):
            if f.name == "extra":
                continue
            v = getattr(self, f.name)
            if f.name == "sparse_config":
                if v is not None:
                    out[f.name] = v.to_dict()
                continue
            if (f.name == "head_dim" and v is None) or (f.name == "num_mtp_layers" and v == 0):
                continue
            out[f.name] = copy.deepcopy(v)
        out.update(copy.deepcopy(self.extra))
        return dict(sorted(out.items()))

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> MiniCPM4Config:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config.json not found: {path}")
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        return cls.from_dict(d)

    def save_json(self, path: str | os.PathLike) -> None:
        write_text_atomic(path, json.dumps(self.to_dict(), indent=2) + "\n")

    def num_parameters(self) -> int:
        h, L, V = self.hidden_size, self.num_hidden_layers, self.vocab_size
        d, hq, hkv, inter = self.dim_head, self.num_attention_heads, self.num_key_value_heads, self.intermediate_size
        per_layer = h * (hq * d) * 2 + h * (hkv * d) * 2 + 3 * h * inter + 2 * h
        return V * h * (1 if self.tie_word_embeddings else 2) + L * per_layer + h


# dtype names the loaders and the command line take, each to torch's attribute (here, without torch, so the command
# line refuses a typo before importing it)
DTYPE_NAMES = {"float32": "float32", "fp32": "float32", "float": "float32", "bfloat16": "bfloat16",
               "bf16": "bfloat16", "float16": "float16", "fp16": "float16", "half": "float16", "float64": "float64"}


def check_dtype_name(name: Any) -> str:
    """`name` if it is one of DTYPE_NAMES; ValueError naming it and the choices otherwise."""
    if not isinstance(name, str) or name not in DTYPE_NAMES:
        raise ValueError(f"unknown dtype {name!r}; choose from {', '.join(sorted(DTYPE_NAMES))}")
    return name


def is_int(v: Any) -> bool:
    """An int, not a bool (JSON true/false arrive as bool, a subclass of int)."""
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v: Any) -> bool:
    """An int or float, not a bool (a JSON true is no number of layers, nor a temperature)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _from_transformers_5(d: dict[str, Any]) -> dict[str, Any]:
    """A config.json as transformers 5 saves it (a fine-tuned checkpoint re-saved with it) in the released
    configs' terms: `dtype` is `torch_dtype`, and `rope_parameters` (the scaling with rope_theta inside, rope_type
    "default" for none) is `rope_scaling` + `rope_theta`. Kept as unknown fields they were ignored: the model
    ran without its LongRoPE scaling. Both spellings with different values are a ConfigError."""
    if "dtype" in d:
        dtype = d.pop("dtype")
        if d.get("torch_dtype", dtype) != dtype:
            raise ConfigError(f"dtype: {dtype!r} differs from torch_dtype {d['torch_dtype']!r}")
        d["torch_dtype"] = dtype
    if "rope_parameters" not in d:
        return d
    rp = d.pop("rope_parameters")
    if rp is None:
        return d
    if not isinstance(rp, dict):
        raise ConfigError(f"rope_parameters: must be an object or null, got {type(rp).__name__}")
    rp = dict(rp)
    theta = rp.pop("rope_theta", None)
    if theta is not None:
        if d.get("rope_theta", theta) != theta:
            raise ConfigError(f"rope_parameters.rope_theta: {theta!r} differs from rope_theta {d['rope_theta']!r}")
        d["rope_theta"] = theta
    scaling = None if rp.get("rope_type", rp.get("type")) in (None, "default") else rp
    if d.get("rope_scaling") is not None and d["rope_scaling"] != scaling:
        raise ConfigError("rope_parameters: differs from rope_scaling (transformers 5 writes the first, the "
                          "released configs the second; keep one)")
    d["rope_scaling"] = scaling
    return d


def _infer_sparse_variant(d: dict[str, Any]) -> str:
    """Gen-A for configs shaped like the June-2025 MiniCPM4-8B release (native 32K context, 8B shape);
    Gen-B (MiniCPM4.1 and our own models, which always write `variant`) otherwise."""
    rs = d.get("rope_scaling")
    rs = rs if isinstance(rs, dict) else {}  # a malformed value is reported by validate()
    if (d.get("hidden_size") == 4096 and d.get("vocab_size") == 73448
            and rs.get("original_max_position_embeddings", d.get("max_position_embeddings")) == 32768):
        return "gen-a"
    return "gen-b"


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write to a temporary name beside the target, then rename: readers never see half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


# ---- presets ---------------------------------------------------------------------------------------

# LongRoPE factors shipped with MiniCPM4-8B (short_factor == long_factor; spec/reference-details.md F4).
MINICPM4_8B_LONGROPE = [
    0.9977997200264581, 1.014658295992452, 1.0349680404997148, 1.059429246056193, 1.0888815016813513,
    1.1243301355211495, 1.166977103606075, 1.2182568066927284, 1.2798772354275727, 1.3538666751582975,
    1.4426259039919596, 1.5489853358570191, 1.6762658237220625, 1.8283407612492941, 2.0096956085876183,
    2.225478927469756, 2.481536379650452, 2.784415934557119, 3.1413289096347365, 3.560047844772632,
    4.048719380066383, 4.615569542115128, 5.2684819496549835, 6.014438591970396, 6.858830049237097,
    7.804668263503327, 8.851768731513417, 9.99600492938444, 11.228766118181639, 12.536757560834843,
    13.902257701387796, 15.303885189125953, 16.717837610115794, 18.119465097853947, 19.484965238406907,
    20.792956681060105, 22.02571786985731, 23.16995406772833, 24.217054535738416, 25.16289275000465,
    26.007284207271347, 26.753240849586767, 27.40615325712662, 27.973003419175363, 28.461674954469114,
    28.880393889607006, 29.237306864684626, 29.540186419591297, 29.79624387177199, 30.01202719065413,
    30.193382037992453, 30.34545697551969, 30.47273746338473, 30.579096895249787, 30.66785612408345,
    30.741845563814174, 30.80346599254902, 30.85474569563567, 30.897392663720595, 30.932841297560394,
    30.962293553185553, 30.986754758742034, 31.007064503249293, 31.02392307921529,
]

_SPARSE_8B = {"kernel_size": 32, "kernel_stride": 16, "init_blocks": 1, "block_size": 64,
              "window_size": 2048, "topk": 64, "use_nope": False, "dense_len": 8192}

PRESETS: dict[str, dict[str, Any]] = {
    # A CPU-friendly model with every mechanism switched on: InfLLM v2 with small blocks so that sparse
    # attention really selects blocks at a few hundred tokens, GQA group 4, untied head.
    "tiny": {
        "vocab_size": 1024, "hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 4,
        "num_attention_heads": 8, "num_key_value_heads": 2, "max_position_embeddings": 4096,
        "scale_emb": 12, "scale_depth": 1.4, "dim_model_base": 64, "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0, "tie_word_embeddings": False, "initializer_range": 0.1,
        "bos_token_id": 1, "eos_token_id": [2, 1016], "torch_dtype": "float32",
        "sparse_config": {"kernel_size": 8, "kernel_stride": 4, "init_blocks": 1, "block_size": 16,
                          "window_size": 64, "topk": 4, "use_nope": False, "dense_len": 256,
                          "variant": "gen-b"},
    },
    "minicpm4-0.5b": {
        "vocab_size": 73448, "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
        "num_attention_heads": 16, "num_key_value_heads": 2, "max_position_embeddings": 32768,
        "scale_emb": 12, "scale_depth": 1.4, "dim_model_base": 256, "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0, "tie_word_embeddings": True, "initializer_range": 0.1,
        "bos_token_id": 1, "eos_token_id": [2, 73440], "torch_dtype": "bfloat16",
    },
    "minicpm4-8b": {
        "vocab_size": 73448, "hidden_size": 4096, "intermediate_size": 16384, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 2, "max_position_embeddings": 32768,
        "scale_emb": 12, "scale_depth": 1.4, "dim_model_base": 256, "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0, "tie_word_embeddings": False, "initializer_range": 0.1,
        "bos_token_id": 1, "eos_token_id": [2, 73440], "torch_dtype": "bfloat16",
        "rope_scaling": {"rope_type": "longrope", "original_max_position_embeddings": 32768,
                         "short_factor": MINICPM4_8B_LONGROPE, "long_factor": MINICPM4_8B_LONGROPE},
        "sparse_config": dict(_SPARSE_8B, variant="gen-b"),
    },
}


def merge_fields(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """A copy of config fields `base` with `overrides` applied; a table into a table merges key by key, so
    {"sparse_config": {"topk": 8}} changes topk alone (replacing the table dropped the other fields, which
    `from_dict` then filled with the 8B defaults)."""
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_fields(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def preset(name: str, **overrides: Any) -> MiniCPM4Config:
    """A preset's config with `overrides` merged in (`merge_fields`)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown config preset {name!r}; choose from {', '.join(PRESETS)}")
    return MiniCPM4Config.from_dict(merge_fields(PRESETS[name], overrides))
