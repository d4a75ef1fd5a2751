"""UltraClean's efficient verification (spec/data.md): does a candidate dataset help?

Instead of pre-training from scratch on the candidate, take a checkpoint from the stable phase of a WSD run
and anneal it briefly (the decay phase: learning rate from its stable value down to `min_ratio` of it) twice
or more: once on the default mix alone, once per candidate with `share` of the rows drawn from the candidate
and the rest from the default mix. Compare held-out losses after annealing. Each comparison is repeated with
several data seeds (order of rows and which rows come from the candidate); the paired per-seed deltas give
the noise estimate.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cpm4.devices import check_device_name
from cpm4.model.config import write_text_atomic
from cpm4.train.data import Batch, PackedDataset, stack_rows
from cpm4.train.loss import held_out_loss


class MixedDataset:
    """Rows drawn from several token-shard datasets by weight: sample k comes from the source chosen by a
    seeded uniform draw for k, and is that source's row k (each source has its own permutation)."""

    def __init__(self, sources: list[tuple[PackedDataset, float]], seed: int = 0):
        weights = np.array([w for _, w in sources], dtype=np.float64)
        if len(sources) == 0 or (weights < 0).any() or weights.sum() <= 0:
            raise ValueError(f"mixture weights must be >= 0 with a positive sum, got {weights.tolist()}")
        self.sources = [s for s, _ in sources]
        self.cum = np.cumsum(weights / weights.sum())
        self.seed = seed
        self.num_rows = sum(s.num_rows for s in self.sources)

    def source_of(self, sample: int) -> int:
        u = np.random.default_rng([self.seed, 7919, sample]).random()
        return min(int(np.searchsorted(self.cum, u, side="right")), len(self.sources) - 1)

    def batch(self, step: int, batch_size: int, rank: int = 0, world: int = 1) -> Batch:
        first = (step * world + rank) * batch_size
        rows = [self.sources[self.source_of(k)].row(k) for k in range(first, first + batch_size)]
        return stack_rows(rows, all(s.document_masking for s in self.sources))


@dataclass
class VerifyConfig:
    checkpoint: str
    base: str
    candidates: dict[str, str]
    eval_sets: dict[str, str]
    out: str
    share: float = 0.3
    steps: int = 50
    batch_size: int = 8
    seq_len: int = 256
    lr: float = 0.01
    min_ratio: float = 0.1
    seeds: int = 3
    eval_rows: int | None = 64
    device: str = "auto"

    def validate(self) -> None:
        if not 0 < self.share <= 1:
            raise ValueError(f"share must be in (0, 1], got {self.share}")
        if self.steps < 1 or self.batch_size < 1 or self.seq_len < 2 or self.seeds < 1:
            raise ValueError("steps, batch_size, seeds must be >= 1 and seq_len >= 2")
        check_device_name(self.device)
        if not self.candidates:
            raise ValueError("need at least one candidate dataset (NAME=SHARDS)")
        if not self.eval_sets:
            raise ValueError("need at least one evaluation set (NAME=SHARDS)")
        if "baseline" in self.candidates:
            raise ValueError("'baseline' is reserved for the default mix alone; rename the candidate")
        for p in [self.checkpoint, self.base, *self.candidates.values(), *self.eval_sets.values()]:
            if not Path(p).exists():
                raise FileNotFoundError(f"not found: {p}")


def anneal(cfg: VerifyConfig, mix: list[tuple[str, float]], seed: int, run_dir: Path) -> dict[str, float]:
    """One decay run from the checkpoint on `mix` ([(shards, weight)]); held-out loss per evaluation set."""
    from cpm4.train.config import TrainConfig
    from cpm4.train.trainer import Trainer

    tc = TrainConfig()
    tc.model.init_from = cfg.checkpoint
    tc.data.path, tc.data.seq_len, tc.data.document_masking = "mixture", cfg.seq_len, False
    t = tc.train
    t.steps, t.batch_size, t.lr, t.seed, t.device = cfg.steps, cfg.batch_size, cfg.lr, seed, cfg.device
    tc.schedule.warmup_steps, tc.schedule.decay_steps, tc.schedule.min_ratio = 0, cfg.steps, cfg.min_ratio
    tc.checkpoint.dir, tc.checkpoint.every, tc.checkpoint.resume = str(run_dir), 0, False
    tc.log.tensorboard, tc.log.progress, tc.log.every = False, False, max(1, cfg.steps // 5)
    tc.validate()
    sources = [(PackedDataset(p, cfg.seq_len, seed=seed * 1000 + i, document_masking=False), w)
               for i, (p, w) in enumerate(mix)]
    trainer = Trainer(tc, MixedDataset(sources, seed))
    trainer.fit(save=False)
    out = {}
    for name, path in cfg.eval_sets.items():
        ev = PackedDataset(path, cfg.seq_len, seed=0, document_masking=False)
        out[name] = held_out_loss(trainer.model, ev, cfg.eval_rows, cfg.batch_size, trainer.device)
    del trainer
    return out


def verify(cfg: VerifyConfig, log=print) -> dict[str, Any]:
    """Anneal baseline and each candidate mix for every seed; report losses and paired deltas with noise."""
    cfg.validate()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    mixes: dict[str, list[tuple[str, float]]] = {"baseline": [(cfg.base, 1.0)]}
    for name, path in cfg.candidates.items():
        mixes[name] = [(cfg.base, 1.0 - cfg.share), (path, cfg.share)] if cfg.share < 1 else [(path, 1.0)]
    losses: dict[str, list[dict[str, float]]] = {m: [] for m in mixes}
    for seed in range(cfg.seeds):
        for name, mix in mixes.items():
            res = anneal(cfg, mix, seed, out / "runs" / f"{name}-seed{seed}")
            losses[name].append(res)
            log(f"[verify] seed {seed} {name:>12s}: " + "  ".join(f"{k} {v:.4f}" for k, v in res.items()))
    report: dict[str, Any] = {"config": asdict(cfg), "losses": losses, "deltas": {}}
    for name in cfg.candidates:
        report["deltas"][name] = {ev: _paired([r[ev] for r in losses[name]], [r[ev] for r in losses["baseline"]])
                                  for ev in cfg.eval_sets}
    if len(cfg.candidates) > 1:
        names = list(cfg.candidates)
        report["pairs"] = {f"{a} - {b}": {ev: _paired([r[ev] for r in losses[a]], [r[ev] for r in losses[b]])
                                          for ev in cfg.eval_sets}
                           for i, a in enumerate(names) for b in names[i + 1:]}
    write_text_atomic(out / "report.json", json.dumps(report, indent=2) + "\n")
    return report


def _paired(a: list[float], b: list[float]) -> dict[str, float]:
    """Mean of a_s - b_s over seeds, its standard error, and the seed-to-seed spread of b alone."""
    d = [x - y for x, y in zip(a, b)]
    n = len(d)
    sd = statistics.stdev(d) if n > 1 else math.nan
    return {"delta": statistics.fmean(d), "stderr": sd / math.sqrt(n) if n > 1 else math.nan,
            "seed_std_of_reference": statistics.stdev(b) if n > 1 else math.nan, "seeds": n}


def format_report(report: Mapping[str, Any]) -> str:
    """A table: mean held-out loss per mix and evaluation set, then deltas against the baseline ± s.e."""
    losses = report["losses"]
    evs = list(next(iter(losses.values()))[0])
    lines = [f"{'mix':>14s} " + " ".join(f"{e:>16s}" for e in evs)]
    for name, runs in losses.items():
        lines.append(f"{name:>14s} " + " ".join(f"{statistics.fmean(r[e] for r in runs):16.4f}" for e in evs))
    rows = [(f"{n} - baseline", d) for n, d in report["deltas"].items()] + list(report.get("pairs", {}).items())
    for label, d in rows:
        cells = []
        for e in evs:
            x = d[e]
            flag = "*" if x["seeds"] > 1 and abs(x["delta"]) > 2 * x["stderr"] else " "
            cells.append(f"{x['delta']:+9.4f}±{x['stderr']:.4f}{flag}")
        lines.append(f"{label:>14s} " + " ".join(f"{c:>16s}" for c in cells))
    lines.append("(delta: held-out loss difference, mean over seeds ± standard error; * = beyond 2 s.e.)")
    return "\n".join(lines)


def parse_named(items: list[str], what: str) -> dict[str, str]:
    out = {}
    for it in items:
        name, eq, path = it.partition("=")
        if not eq or not name or not path:
            raise ValueError(f"{what} {it!r}: expected NAME=PATH")
        if name in out:
            raise ValueError(f"{what} name {name!r} given twice")
        out[name] = path
    return out
