"""Run configuration for `cpm4 pretrain` / `cpm4 sft`: a TOML file plus `--set section.key=value` overrides.

```toml
[model]            # preset = "tiny" | config = "path/config.json" | init_from = "checkpoint dir" or Hub id
preset = "tiny"
overrides = { num_mtp_layers = 1 }   # fields of config.json to change (a new model only)
tokenizer = "path/to/tokenizer dir"  # copied into the checkpoints (default: init_from's)
[data]
path = "shards/"   # `cpm4 data tokenize` output (pretrain) or chat JSONL (sft)
seq_len = 1024
[train]
steps = 1000
batch_size = 8
lr = 0.01
[schedule]
warmup_steps = 100
decay_steps = 100
[checkpoint]
dir = "runs/demo"
every = 200
```
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import tomllib

from cpm4.devices import check_device_name
from cpm4.model.config import ConfigError, is_int, is_number

from .schedule import DECAY_SHAPES


@dataclass
class ModelSection:
    preset: str | None = None
    config: str | None = None
    init_from: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    tokenizer: str | None = None
    save_dtype: str = "bfloat16"


@dataclass
class DataSection:
    path: str = ""
    valid_path: str | None = None
    seq_len: int = 1024
    document_masking: bool = True


@dataclass
class TrainSection:
    steps: int = 1000
    batch_size: int = 8  # rows per micro-batch per process
    grad_accum: int = 1
    lr: float = 0.01
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    seed: int = 0
    mup: bool = True
    mtp_lambda: float = 0.3
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp32
    device: str = "auto"
    compile: bool = False
    activation_checkpointing: bool = False
    fp8: bool = False
    # Bit-for-bit reproducible steps (so a resumed run repeats the same loss curve); costs some GPU speed.
    deterministic: bool = True


@dataclass
class ScheduleSection:
    warmup_steps: int = 100
    decay_steps: int | None = None  # default: decay_share of the steps
    decay_share: float = 0.1
    decay_shape: str = "exp"
    min_ratio: float = 0.1


@dataclass
class CheckpointSection:
    dir: str = "runs/run"
    every: int = 0  # 0: only at the end
    keep: int = 2
    resume: bool = True


@dataclass
class LogSection:
    every: int = 10
    tensorboard: bool = True
    progress: bool = True
    eval_every: int = 0
    eval_batches: int = 8
    peak_tflops: float | None = None  # for MFU; default from the GPU name


SECTIONS = {"model": ModelSection, "data": DataSection, "train": TrainSection, "schedule": ScheduleSection,
            "checkpoint": CheckpointSection, "log": LogSection}


@dataclass
class TrainConfig:
    kind: str = "pretrain"  # pretrain | sft
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    log: LogSection = field(default_factory=LogSection)

    @property
    def decay_steps(self) -> int:
        s = self.schedule
        return s.decay_steps if s.decay_steps is not None else int(round(s.decay_share * self.train.steps))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def validate(self) -> None:
        def need(ok: bool, name: str, msg: str) -> None:
            if not ok:
                raise ConfigError(f"{name}: {msg}")

        # Each field's type from its annotation first, so the range checks below compare numbers (a string lr
        # was a TypeError) and a TOML true is no integer or learning rate.
        for sec in SECTIONS:
            for f in fields(getattr(self, sec)):
                v = getattr(getattr(self, sec), f.name)
                need(_has_type(v, f.type), f"{sec}.{f.name}", f"must be {_type_words(f.type)}, got {v!r}")
        m = self.model
        need(self.kind in ("pretrain", "sft"), "kind", f"must be pretrain or sft, got {self.kind!r}")
        need(sum(x is not None for x in (m.preset, m.config, m.init_from)) == 1, "model",
             "set exactly one of model.preset, model.config, model.init_from")
        need(self.kind == "pretrain" or m.init_from is not None, "model.init_from",
             "sft starts from a trained checkpoint")
        need(bool(self.data.path), "data.path", "required (token shards for pretrain, chat JSONL for sft)")
        for sec, name, lo in (("data", "seq_len", 1), ("train", "steps", 1), ("train", "batch_size", 1),
                              ("train", "grad_accum", 1), ("schedule", "warmup_steps", 0),
                              ("checkpoint", "every", 0), ("checkpoint", "keep", 1), ("log", "every", 1),
                              ("log", "eval_every", 0), ("log", "eval_batches", 1)):
            v = getattr(getattr(self, sec), name)
            need(is_int(v) and v >= lo, f"{sec}.{name}",
                 f"must be an integer >= {lo}, got {v!r}")
        t = self.train
        for name in ("lr", "weight_decay", "eps", "grad_clip", "mtp_lambda"):
            v = getattr(t, name)
            need(is_number(v) and v >= 0, f"train.{name}",
                 f"must be a number >= 0, got {v!r}")
        for name in ("beta1", "beta2"):
            v = getattr(t, name)
            need(0 <= v < 1, f"train.{name}", f"must be in [0, 1), got {v!r}")
        try:
            check_device_name(t.device)
        except ValueError as e:
            raise ConfigError(f"train.device: {e}") from None
        need(t.precision in ("auto", "bf16", "fp32"), "train.precision",
             f"must be auto, bf16 or fp32, got {t.precision!r}")
        s = self.schedule
        need(s.decay_steps is None or s.decay_steps >= 0, "schedule.decay_steps",
             f"must be an integer >= 0, got {s.decay_steps!r}")
        need(s.decay_shape in DECAY_SHAPES, "schedule.decay_shape", f"must be one of {DECAY_SHAPES}")
        need(0 <= s.min_ratio <= 1, "schedule.min_ratio", f"must be in [0, 1], got {s.min_ratio}")
        need(0 <= s.decay_share <= 1, "schedule.decay_share", f"must be in [0, 1], got {s.decay_share}")
        need(s.warmup_steps + self.decay_steps <= t.steps, "schedule",
             f"warmup ({s.warmup_steps}) + decay ({self.decay_steps}) steps exceed train.steps ({t.steps})")


# A field annotation's parts (`int | None`) and what a value of each is.
_TYPES = {"int": (is_int, "an integer"), "float": (is_number, "a number"),
          "bool": (lambda v: isinstance(v, bool), "true or false"), "str": (lambda v: isinstance(v, str), "a string"),
          "dict": (lambda v: isinstance(v, dict), "a table"), "None": (lambda v: v is None, None)}


def _has_type(value: Any, annotation: str) -> bool:
    return any(_TYPES[part.split("[")[0]][0](value) for part in annotation.split(" | "))


def _type_words(annotation: str) -> str:
    words = [_TYPES[part.split("[")[0]][1] for part in annotation.split(" | ")]
    return " or ".join(w for w in words if w)


def _parse_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text  # a bare string


def _apply(cfg: TrainConfig, section: str, key: str, value: Any, origin: str) -> None:
    if section == "kind" and key == "":
        cfg.kind = value
        return
    if section not in SECTIONS:
        raise ConfigError(f"{origin}: unknown section [{section}] (known: {', '.join(SECTIONS)})")
    sec = getattr(cfg, section)
    top, _, rest = key.partition(".")
    names = {f.name for f in fields(sec)}
    if top not in names:
        raise ConfigError(f"{origin}: unknown field {section}.{top} (known: {', '.join(sorted(names))})")
    if rest:  # model.overrides.sparse_config.topk = 8
        if top != "overrides":
            raise ConfigError(f"{origin}: {section}.{top} is not a table")
        d = sec.overrides
        parts = rest.split(".")
        for p in parts[:-1]:
            d = d.setdefault(p, {})
        d[parts[-1]] = value
    else:
        setattr(sec, top, value)


def load_train_config(path: str | Path | None = None, overrides: list[str] | None = None,
                      kind: str = "pretrain") -> TrainConfig:
    """Read a TOML run file (optional) and apply `section.key=value` overrides; validate the result."""
    cfg = TrainConfig(kind=kind)
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"run config not found: {p}")
        try:
            data = tomllib.loads(p.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{p}: not valid TOML ({e})") from None
        for section, table in data.items():
            if section == "kind":
                cfg.kind = table
                continue
            if not isinstance(table, dict):
                raise ConfigError(f"{p}: [{section}] must be a table")
            for key, value in table.items():
                _apply(cfg, section, key, copy.deepcopy(value), str(p))
    for item in overrides or []:
        key, eq, value = item.partition("=")
        if not eq or "." not in key:
            raise ConfigError(f"--set {item!r}: expected section.key=value")
        section, _, name = key.strip().partition(".")
        _apply(cfg, section, name, _parse_value(value.strip()), "--set")
    cfg.validate()
    return cfg
