"""One round of UltraClean's seed-refinement loop (spec/data.md): classifier -> filter -> verify -> seeds.

Round r reads the positive and negative seed pools, trains the fastText classifier on them, scores the
candidate pool, and verifies by annealing whether the kept documents beat the unfiltered pool as a 30%
share of the mix. Only when they do (by more than twice the seed noise on every evaluation set) are the
classifier's confident positives and negatives admitted to the next round's seed pools; otherwise the
pools carry over unchanged. Everything a round produced stays in its folder:

    round-N/classifier.bin (+ .metrics.json)   round-N/kept.jsonl, rejected.jsonl (with scores)
    round-N/shards/{kept,pool}/                 round-N/verify/report.json
    round-N/positive.jsonl, negative.jsonl      (the seed pools for round N+1)
    round-N/round.json                          (metrics and the decision)
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cpm4.model.config import write_text_atomic

from .verify import VerifyConfig, format_report, verify


def _jsonl_texts(path: Path, field: str) -> list[dict[str, Any]]:
    out = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if line.strip():
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{i}: not valid JSON ({e.msg})") from None
                if not isinstance(obj, dict) or not isinstance(obj.get(field), str):
                    raise ValueError(f"{path}:{i}: no string field {field!r}")
                out.append(obj)
    return out


def _write_jsonl(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def run_round(out: str | os.PathLike, positives: Sequence[str], negatives: Sequence[str], pool: str,
              checkpoint: str, base: str, eval_sets: dict[str, str], *, threshold: float = 0.5,
              admit: int = 200, confident: float = 0.9, field: str = "text", verify_kwargs: dict | None = None,
              classifier_kwargs: dict | None = None, log=print) -> dict[str, Any]:
    """Run one round into `out`; returns (and writes) round.json."""
    from cpm4.model.tokenizer import Tokenizer
    from cpm4.train.data import tokenize_to_shards

    from .classifier import Scorer, TrainConfig, train_classifier

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    pool_path = Path(pool)
    if not pool_path.is_file():
        raise FileNotFoundError(f"candidate pool not found: {pool_path}")
    # 1. classifier on the current seeds
    clf = out / "classifier.bin"
    metrics = train_classifier(positives, negatives, clf, TrainConfig(**(classifier_kwargs or {})), log=log)
    # 2. score and split the pool
    docs = _jsonl_texts(pool_path, field)
    scorer = Scorer(clf)
    scores = [float(s) for s in scorer.score([d[field] for d in docs])]
    kept = [dict(d, quality_score=s) for d, s in zip(docs, scores) if s >= threshold]
    rejected = [dict(d, quality_score=s) for d, s in zip(docs, scores) if s < threshold]
    if not kept or not rejected:
        raise ValueError(f"threshold {threshold} keeps {len(kept)} of {len(docs)} pool documents: nothing to compare")
    _write_jsonl(out / "kept.jsonl", kept)
    _write_jsonl(out / "rejected.jsonl", rejected)
    log(f"[iterate] kept {len(kept)} of {len(docs)} pool documents ({len(kept) / len(docs):.1%})")
    # 3. token shards of the kept documents and of the whole pool, with the checkpoint's tokenizer
    tok = Tokenizer.from_dir(checkpoint)
    tokenize_to_shards([out / "kept.jsonl"], tok, out / "shards" / "kept", text_field=field, progress=False)
    tokenize_to_shards([pool_path], tok, out / "shards" / "pool", text_field=field, progress=False)
    # 4. verification: filtered vs unfiltered as the candidate share of the mix
    vcfg = VerifyConfig(checkpoint=checkpoint, base=base, eval_sets=eval_sets, out=str(out / "verify"),
                        candidates={"filtered": str(out / "shards" / "kept"),
                                    "unfiltered": str(out / "shards" / "pool")}, **(verify_kwargs or {}))
    report = verify(vcfg, log=log)
    log(format_report(report))
    pair = report["pairs"]["filtered - unfiltered"]
    helps = all(d["delta"] < 0 and (d["seeds"] < 2 or -d["delta"] > 2 * d["stderr"]) for d in pair.values())
    # 5. next seed pools
    pos_rows = [r for p in positives for r in _jsonl_texts(Path(p), field)]
    neg_rows = [r for p in negatives for r in _jsonl_texts(Path(p), field)]
    added_pos = added_neg = 0
    if helps:
        top = sorted((d for d in kept if d["quality_score"] >= confident), key=lambda d: -d["quality_score"])[:admit]
        low = sorted((d for d in rejected if d["quality_score"] <= 1 - confident),
                     key=lambda d: d["quality_score"])[:admit]
        pos_rows += [{field: d[field]} for d in top]
        neg_rows += [{field: d[field]} for d in low]
        added_pos, added_neg = len(top), len(low)
    _write_jsonl(out / "positive.jsonl", pos_rows)
    _write_jsonl(out / "negative.jsonl", neg_rows)
    summary = {"classifier": metrics.get("holdout"),
               "pool_documents": len(docs), "kept": len(kept), "kept_share": len(kept) / len(docs),
               "threshold": threshold, "verify": {"deltas": report["deltas"], "pairs": report["pairs"]},
               "filtered_helps": helps, "admitted_positives": added_pos, "admitted_negatives": added_neg,
               "next_positive": str(out / "positive.jsonl"), "next_negative": str(out / "negative.jsonl")}
    write_text_atomic(out / "round.json", json.dumps(summary, indent=2) + "\n")
    shutil.rmtree(out / "verify" / "runs", ignore_errors=True)  # per-run logs are in report.json
    return summary
