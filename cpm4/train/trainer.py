"""The training loop behind `cpm4 pretrain` and `cpm4 sft`.

One script for one process or many: under `torchrun` the model is sharded with FSDP2 (`fully_shard` per
decoder layer, bf16 parameters, fp32 reductions); alone it runs as a plain module under bf16 autocast on
CUDA (fp32 on CPU). Everything a resumed run needs is in the checkpoint, and the batch of a step depends on
the step only, so a killed run continues with the identical loss curve.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from cpm4.devices import check_fits, resolve_device
from cpm4.model.checkpoint import load_checkpoint, save_checkpoint, weight_bytes
from cpm4.model.config import MiniCPM4Config, merge_fields, preset, write_text_atomic
from cpm4.model.hub import resolve_model_dir
from cpm4.model.init import init_model
from cpm4.model.modeling import MiniCPM4ForCausalLM

from . import checkpoint as ckpt
from .config import TrainConfig
from .data import IGNORE, Batch, DataError, PackedDataset, SFTDataset
from .loss import head_loss, lm_loss, mtp_labels
from .optim import param_groups, set_lr
from .schedule import wsd

# Dense bf16 peak of the GPUs we run on (TFLOP/s), for MFU.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "A800": 312.0, "L40S": 362.0,
               "4090": 165.0}


class Objective(nn.Module):
    """The loss as a module, so FSDP2's root hooks run around the whole step (embedding, head, MTP)."""

    def __init__(self, model: MiniCPM4ForCausalLM, mtp_lambda: float, compile_head: bool = False):
        super().__init__()
        self.model = model
        self.mtp_lambda = mtp_lambda
        self.head = torch.compile(head_loss) if compile_head else head_loss

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, docs: list[list[int]] | None = None
                ) -> dict[str, torch.Tensor]:
        return lm_loss(self.model, Batch(input_ids, labels, docs), self.mtp_lambda, self.head)


def build_model(cfg: TrainConfig) -> tuple[MiniCPM4ForCausalLM, Any]:
    """fp32 model and tokenizer for a run (random µP init from a preset/config, or a checkpoint)."""
    from cpm4.model.tokenizer import Tokenizer

    m = cfg.model
    # Folders or Hugging Face Hub ids (fine-tuning a released model: init_from "openbmb/MiniCPM4-0.5B").
    init = resolve_model_dir(m.init_from) if m.init_from is not None else None
    tok_dir = resolve_model_dir(m.tokenizer) if m.tokenizer else init
    tokenizer = Tokenizer.from_dir(tok_dir) if tok_dir else None
    if init is not None:
        base = load_checkpoint(init, dtype=torch.float32)
        if not m.overrides:
            return base.train(), tokenizer
        config = MiniCPM4Config.from_dict(merge_fields(base.config.to_dict(), m.overrides))
        model = _fresh_model(config, cfg.train.seed)
        # load_state_dict raises on a size mismatch (a traceback) before it would list the names
        changed = shape_changes(base.state_dict(), model.state_dict())
        if changed:
            raise DataError(f"model.overrides change {changed[0]}: only new modules (e.g. num_mtp_layers) can be "
                            "added to a checkpoint")
        model.load_state_dict(base.state_dict(), strict=False)
        return model.train(), tokenizer
    if m.preset is not None:
        config = preset(m.preset, **m.overrides)
    else:
        config = MiniCPM4Config.from_dict(merge_fields(MiniCPM4Config.from_json(m.config).to_dict(), m.overrides))
    if tokenizer is not None:
        if tokenizer.vocab_size > config.vocab_size:
            raise DataError(f"tokenizer has {tokenizer.vocab_size} ids, the model's vocab_size is "
                            f"{config.vocab_size}")
        config.bos_token_id = tokenizer.bos_token_id
        config.eos_token_id = tokenizer.stop_token_ids
    return _fresh_model(config, cfg.train.seed).train(), tokenizer


def _fresh_model(config: MiniCPM4Config, seed: int) -> MiniCPM4ForCausalLM:
    """A µP-initialised model in float32 on the CPU (where training builds it), refused by size first when the
    host cannot hold it (a mistyped width in a run file)."""
    check_fits(weight_bytes(config, torch.float32), "cpu", "the model's float32 weights")
    return init_model(MiniCPM4ForCausalLM(config), seed)


def shape_changes(old: dict[str, torch.Tensor], new: dict[str, torch.Tensor], both_ways: bool = False) -> list[str]:
    """The tensors of state dict `old` that `new` lacks or shapes differently (and with both_ways, those of `new`
    that `old` lacks), each said as "NAME: SHAPE -> SHAPE"."""
    def shape(sd: dict[str, torch.Tensor], k: str) -> str:
        return str(list(sd[k].shape)) if k in sd else "absent"

    keys = [*old, *(k for k in new if k not in old and both_ways)]
    return [f"{k}: {shape(old, k)} -> {shape(new, k)}" for k in keys if shape(old, k) != shape(new, k)]


# What the batch of a step depends on, besides the step: a resumed run with another value would train on other rows.
DATA_ORDER_FIELDS = (("train", "seed"), ("train", "batch_size"), ("train", "grad_accum"), ("data", "seq_len"))


def check_resumable(path: Path, saved: dict[str, Any], cfg: TrainConfig) -> None:
    """ValueError when `cfg` would continue checkpoint `path` (its run config `saved`) on other data than the
    uninterrupted run: the learning rate, steps and schedule may change (a decay from a stable-phase checkpoint),
    the data order may not."""
    now = cfg.to_dict()
    diff = [f"{sec}.{name} {saved[sec][name]!r} -> {now[sec][name]!r}" for sec, name in DATA_ORDER_FIELDS
            if name in saved.get(sec, {}) and saved[sec][name] != now[sec][name]]
    if diff:
        raise ValueError(f"{path} was written with other data settings ({', '.join(diff)}): resuming would "
                         "train on other rows than the run did; resume with its settings, or start a new run from "
                         "it (model.init_from, another checkpoint.dir)")


def model_flops_per_token(config: MiniCPM4Config, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward = 3x forward): 6 x matmul parameters + causal attention
    12 * layers * heads * head_dim * (average keys attended: seq/2 dense)."""
    h, L = config.hidden_size, config.num_hidden_layers
    d, hq, hkv = config.dim_head, config.num_attention_heads, config.num_key_value_heads
    matmul = L * (2 * h * hq * d + 2 * h * hkv * d + 3 * h * config.intermediate_size) + h * config.vocab_size
    return 6 * matmul + 12 * L * hq * d * seq_len / 2


class Trainer:
    def __init__(self, cfg: TrainConfig, dataset: Any = None):
        """`dataset` replaces data.path (anything with `batch(step, batch_size, rank, world)`)."""
        self.cfg = cfg
        self.dist = "WORLD_SIZE" in os.environ and not dist.is_initialized()
        t = cfg.train
        if self.dist or dist.is_initialized():
            if not dist.is_initialized():
                backend = "nccl" if torch.cuda.is_available() and t.device != "cpu" else "gloo"
                dist.init_process_group(backend)
            self.rank, self.world = dist.get_rank(), dist.get_world_size()
            self.dist = True
        else:
            self.rank, self.world = 0, 1
        if t.device == "auto":
            dev = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
        else:
            dev = t.device
        self.device = resolve_device(dev)
        if t.deterministic:
            # cuBLAS needs a fixed workspace for reproducible results (read when the handle is created); MKL
            # (CPU matmuls) may otherwise pick kernels by buffer alignment, which differs between processes
            # (read at its first call: effective when the trainer is the first to use it, as under the CLI).
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")
            torch.use_deterministic_algorithms(True, warn_only=True)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.bf16 = t.precision == "bf16" or (t.precision == "auto" and self.device.type == "cuda")
        self.run_dir = Path(cfg.checkpoint.dir)
        torch.manual_seed(t.seed)

        self.model, self.tokenizer = build_model(cfg)
        self.config = self.model.config
        self.data = dataset if dataset is not None else self._dataset(cfg.data.path, t.seed)
        self.valid = self._dataset(cfg.data.valid_path, t.seed + 1) if cfg.data.valid_path else None
        self.model.to(self.device)
        if t.fp8:
            self._fp8()
        if t.activation_checkpointing:
            for layer in self._layers():
                layer.forward = _checkpointed(layer.forward)
        if t.compile:
            from cpm4.kernels import infllm_v2

            infllm_v2.make_opaque_to_compile()
            for layer in self._layers():
                layer.compile()
        self.objective = Objective(self.model, t.mtp_lambda if self.config.num_mtp_layers else 0.0, t.compile)
        if self.dist:
            self._shard()
        # One fused kernel for the whole update on a single GPU (sharded DTensor parameters use foreach).
        fused = self.device.type == "cuda" and not self.dist
        self.optimizer = torch.optim.AdamW(param_groups(self.model, self.config, t.lr, t.weight_decay, t.mup),
                                           lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps, fused=fused)
        self.step = 0
        self.history: list[dict[str, Any]] = []
        self._writer = None
        self._start_step = 0  # where fit began: TensorBoard events past it are purged

    # ---------------------------------------------------------------- set-up helpers
    def _dataset(self, path: str, seed: int):
        d = self.cfg.data
        if self.cfg.kind == "sft":
            if self.tokenizer is None:
                raise DataError("sft needs a tokenizer (model.tokenizer or init_from's)")
            ds = SFTDataset(path, self.tokenizer, d.seq_len, seed, self.config.vocab_size)
            if ds.dropped and self.rank == 0:  # (was silent: a large share of a set could vanish unnoticed)
                print(f"[cpm4] warning: {path}: {ds.dropped} of {ds.conversations} conversations are longer than "
                      f"data.seq_len={d.seq_len} tokens (the longest {ds.longest_dropped}) and are left out",
                      file=sys.stderr)
            return ds
        return PackedDataset(path, d.seq_len, seed, d.document_masking, self.config.vocab_size)

    def _layers(self) -> list[nn.Module]:
        return list(self.model.model.layers) + [m.layer for m in getattr(self.model, "mtp", [])]

    def _shard(self) -> None:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if self.bf16 else torch.float32,
                                  reduce_dtype=torch.float32)
        for layer in self._layers():
            fully_shard(layer, mp_policy=mp)
        fully_shard(self.objective, mp_policy=mp)

    def _fp8(self) -> None:
        try:
            from torchao.float8 import convert_to_float8_training
        except ImportError:
            raise ImportError("train.fp8 needs torchao (pip install torchao) and a Hopper GPU") from None
        convert_to_float8_training(self.model.model.layers)

    # ---------------------------------------------------------------- state
    def state_dicts(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Full (unsharded) model and optimizer state on the CPU, FQN-keyed."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_state_dict(self.model, self.optimizer, options=opts)

    def save(self) -> Path | None:
        model_sd, optim_sd = self.state_dicts()
        path = None
        if self.rank == 0:
            state = {"step": self.step, "optimizer": optim_sd, "rng": ckpt.rng_state(), "config": self.cfg.to_dict(),
                     "world": self.world}
            path = ckpt.write(self.run_dir, self.step, model_sd, self.config, self.tokenizer, state,
                              self.cfg.checkpoint.keep)
        if self.dist:
            dist.barrier()
        return path

    def resume(self) -> bool:
        """Load the newest complete checkpoint of this run, if any."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        path = ckpt.latest(self.run_dir)
        if path is None:
            return False
        state = ckpt.read_state(path)
        if state.get("world", 1) != self.world:
            raise ValueError(f"{path} was written by {state['world']} processes, this run has {self.world}: "
                               "the data order would differ")
        check_resumable(path, state.get("config", {}), self.cfg)
        saved = load_checkpoint(path, dtype=torch.float32)
        changed = shape_changes(saved.state_dict(), self.model.state_dict(), both_ways=True)
        if changed:
            raise ValueError(f"{path} holds another model than this run builds ({changed[0]}): resume with the "
                             "model settings it was written with, or start a new run from it (model.init_from)")
        model_sd = saved.state_dict()
        set_state_dict(self.model, self.optimizer, model_state_dict=model_sd, optim_state_dict=state["optimizer"],
                       options=StateDictOptions(full_state_dict=True))
        ckpt.set_rng_state(state["rng"])
        self.step = state["step"]
        return True

    # ---------------------------------------------------------------- the loop
    def _micro_batches(self, step: int) -> list[Batch]:
        t = self.cfg.train
        return [self.data.batch(step * t.grad_accum + a, t.batch_size, self.rank, self.world)
                for a in range(t.grad_accum)]

    def _counts(self, batches: list[Batch]) -> tuple[float, float]:
        """Valid next-token and MTP targets in the whole step (all micro-batches, all ranks)."""
        n = sum(int((b.labels != IGNORE).sum()) for b in batches)
        k = self.config.num_mtp_layers if self.objective.mtp_lambda else 0
        n_mtp = sum(int((mtp_labels(b.labels, j) != IGNORE).sum()) for b in batches for j in range(k)) / max(k, 1)
        c = torch.tensor([n, n_mtp], dtype=torch.float64, device=self.device)
        if self.dist:
            dist.all_reduce(c)
        return float(c[0]), float(c[1])

    def _autocast(self):
        if self.bf16 and not self.dist:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    def train_step(self) -> dict[str, float]:
        cfg, t = self.cfg, self.cfg.train
        factor = wsd(self.step, t.steps, cfg.schedule.warmup_steps, cfg.decay_steps, cfg.schedule.decay_shape,
                     cfg.schedule.min_ratio)
        set_lr(self.optimizer, t.lr, factor)
        batches = self._micro_batches(self.step)
        n, n_mtp = self._counts(batches)
        ntp_sum = mtp_sum = 0.0
        self.optimizer.zero_grad(set_to_none=True)
        for b in batches:
            b = b.to(self.device)
            with self._autocast():
                out = self.objective(b.input_ids, b.labels, b.docs)
            # FSDP averages gradients over ranks; the counts are global, so scale back by the world size.
            loss = out["ntp"] / max(n, 1)
            if "mtp" in out:
                loss = loss + self.objective.mtp_lambda * out["mtp"] / max(n_mtp, 1)
            (loss * self.world).backward()
            ntp_sum += float(out["ntp"].detach())
            mtp_sum += float(out["mtp"].detach()) if "mtp" in out else 0.0
        gnorm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), t.grad_clip if t.grad_clip > 0 else math.inf)
        self.optimizer.step()
        sums = torch.tensor([ntp_sum, mtp_sum], dtype=torch.float64, device=self.device)
        if self.dist:
            dist.all_reduce(sums)
        self.step += 1
        rec = {"step": self.step, "loss": float(sums[0]) / max(n, 1), "lr": t.lr * factor,
               "grad_norm": float(gnorm.full_tensor() if hasattr(gnorm, "full_tensor") else gnorm),
               "tokens": n}
        if n_mtp:
            rec["mtp_loss"] = float(sums[1]) / n_mtp
        return rec

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean next-token loss on the first `eval_batches` validation batches (the same ones every time)."""
        t, lg = self.cfg.train, self.cfg.log
        total = count = 0.0
        self.model.eval()
        for i in range(lg.eval_batches):
            b = self.valid.batch(i, t.batch_size, self.rank, self.world).to(self.device)
            with self._autocast():
                out = self.objective(b.input_ids, b.labels, b.docs)
            total += float(out["ntp"])
            count += float(out["n"])
        self.model.train()
        c = torch.tensor([total, count], dtype=torch.float64, device=self.device)
        if self.dist:
            dist.all_reduce(c)
        return float(c[0] / max(c[1], 1))

    def _trim_metrics(self) -> None:
        """Drop metrics.jsonl's records past the step the run starts from: a killed run logged steps after its last
        checkpoint, which are trained (and logged) again. TensorBoard's events past it are purged when its writer
        opens (`purge_step`)."""
        path = self.run_dir / "metrics.jsonl"
        if not path.is_file():
            return
        lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
        kept = [x for x in lines if _record_step(x) <= self.step]
        if len(kept) != len(lines):
            write_text_atomic(path, "".join(kept))

    def _log(self, rec: dict[str, Any]) -> None:
        if self.rank != 0:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")
        if self.cfg.log.tensorboard:
            if self._writer is None:
                try:
                    from torch.utils.tensorboard import SummaryWriter
                except ImportError:
                    print("[cpm4] tensorboard is not installed; metrics go to metrics.jsonl only", file=sys.stderr)
                    self.cfg.log.tensorboard = False
                    return
                self._writer = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=self._start_step + 1)
            for k, v in rec.items():
                if k != "step" and isinstance(v, (int, float)):
                    self._writer.add_scalar(k, v, rec["step"])

    def peak_flops(self) -> float | None:
        if self.cfg.log.peak_tflops:
            return self.cfg.log.peak_tflops * 1e12
        if self.device.type != "cuda":
            return None
        name = torch.cuda.get_device_name(self.device)
        return next((v * 1e12 for k, v in PEAK_TFLOPS.items() if k in name), None)

    def fit(self, crash_after: int | None = None, save: bool = True) -> list[dict[str, Any]]:
        """Train to `train.steps` (resuming if the run has a checkpoint); returns the logged records.
        save=False skips the final checkpoint and export (short runs evaluated in memory)."""
        from tqdm import tqdm

        cfg, t, lg = self.cfg, self.cfg.train, self.cfg.log
        if self.rank == 0:
            ckpt.remove_partials(self.run_dir)
        if cfg.checkpoint.resume:
            if self.resume() and self.rank == 0:
                print(f"[cpm4] resumed {self.run_dir} at step {self.step}", file=sys.stderr)
        elif (earlier := ckpt.latest(self.run_dir)) is not None:
            # Starting over beside them, `latest` and the rotation would mix the two runs' checkpoints.
            raise ValueError(f"{self.run_dir} holds checkpoints of an earlier run (newest {earlier.name}) and "
                             "checkpoint.resume is false: resume it, or use another checkpoint.dir")
        self._start_step = self.step
        if self.rank == 0:
            self._trim_metrics()
        crash_after = crash_after if crash_after is not None else _env_int("CPM4_TRAIN_CRASH_AFTER_STEP")
        seq = cfg.data.seq_len
        flops_tok = model_flops_per_token(self.config, seq)
        peak = self.peak_flops()
        bar = tqdm(total=t.steps, initial=self.step, unit="step", disable=not (lg.progress and self.rank == 0),
                   dynamic_ncols=True)
        t0, tok0 = time.perf_counter(), 0
        while self.step < t.steps:
            rec = self.train_step()
            tok0 += t.batch_size * t.grad_accum * seq * self.world
            if self.valid is not None and lg.eval_every and self.step % lg.eval_every == 0:
                rec["valid_loss"] = self.evaluate()
            if self.step % lg.every == 0 or self.step == t.steps or "valid_loss" in rec:
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                dt = time.perf_counter() - t0
                rec["tokens_per_s"] = tok0 / dt
                if peak:
                    rec["mfu"] = rec["tokens_per_s"] * flops_tok / (peak * self.world)
                t0, tok0 = time.perf_counter(), 0
                self.history.append(rec)
                self._log(rec)
                bar.set_postfix(loss=f"{rec['loss']:.4f}", tok_s=f"{rec['tokens_per_s']:.0f}")
                if self.rank == 0:
                    bar.write(format_record(rec, t.steps), file=sys.stdout)
            if cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0 and self.step < t.steps:
                self.save()
            bar.update(1)
            if crash_after is not None and self.step >= crash_after:
                os._exit(137)  # tests: die like a killed process (no clean-up, no final save)
        bar.close()
        if self.valid is not None:
            v = self.evaluate()
            rec = {"step": self.step, "valid_loss": v, "valid_ppl": math.exp(min(v, 50.0))}
            self.history.append(rec)
            self._log(rec)
        if save:
            self.save()
            self.export(self.run_dir / "model")
        if self._writer is not None:
            self._writer.close()
        return self.history

    def export(self, out: Path) -> Path | None:
        """The trained model in `model.save_dtype`, with tokenizer: what `cpm4 generate --model` takes."""
        model_sd, _ = self.state_dicts()
        if self.rank == 0:
            save_checkpoint(model_sd, self.config, out, tokenizer=self.tokenizer, dtype=self.cfg.model.save_dtype,
                            overwrite=True)
        if self.dist:
            dist.barrier()
        return out if self.rank == 0 else None

    def close(self) -> None:
        if self.dist and dist.is_initialized():
            dist.destroy_process_group()


def _record_step(line: str) -> float:
    """A metrics.jsonl line's step (a line that is not a record: kept, as step -inf)."""
    try:
        step = json.loads(line).get("step")
    except (ValueError, AttributeError):
        return -math.inf
    return step if isinstance(step, (int, float)) else -math.inf


def format_record(rec: dict[str, Any], total_steps: int) -> str:
    """One log line: step, losses, learning rate, throughput."""
    parts = [f"step {rec['step']}/{total_steps}", f"loss {rec['loss']:.4f}"]
    if "mtp_loss" in rec:
        parts.append(f"mtp {rec['mtp_loss']:.4f}")
    if "valid_loss" in rec:
        parts.append(f"valid {rec['valid_loss']:.4f}")
    parts += [f"lr {rec['lr']:.2e}", f"grad {rec['grad_norm']:.3f}", f"{rec['tokens_per_s']:.0f} tok/s"]
    if "mfu" in rec:
        parts.append(f"MFU {rec['mfu']:.1%}")
    return "[cpm4] " + "  ".join(parts)


def _checkpointed(fn):
    from torch.utils.checkpoint import checkpoint

    def run(*args, **kwargs):
        return checkpoint(fn, *args, use_reentrant=False, **kwargs)

    return run


def _env_int(name: str) -> int | None:
    v = os.environ.get(name)
    return int(v) if v else None
