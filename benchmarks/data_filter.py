"""Throughput of UltraClean filtering (fastText scoring) on this machine's CPU.

    python benchmarks/data_filter.py --mb 100 --out benchmarks/results

Builds a corpus from offline text (positives: Debian's python3.11-doc reStructuredText sources; negatives:
/usr/share/doc changelogs and copyright files), trains the classifier with the paper's recipe (dim 256,
lr 0.1, word n-grams 3, min count 5, 3 epochs; 200k n-gram buckets), writes about --mb MB of mixed documents
as 8 JSONL shards, then measures:

    score        Scorer.score in one process (normalize + folded fastText), no I/O
    score-full   the same with the unfolded dim-256 model (on a subset), to show what folding buys
    local        filter_documents, engine local, 1 and 2 workers (processing time, setup excluded)
    spark        filter_documents, engine spark local[N], 1 and 2 workers

For local and spark, a small warm-up run first starts the workers (process start, imports, model load; the
Spark session); its time is reported as startup_s and the rates are the steady state after it.

MB are 1e6 bytes of document text (UTF-8). Prints a table and writes benchmarks/results/data_filter-<date>.json.
"""

from __future__ import annotations

import argparse
import datetime
import glob
import gzip
import json
import os
import platform
import random
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from cpm4.data.classifier import Scorer, TrainConfig, train_classifier  # noqa: E402
from cpm4.data.filter import filter_documents  # noqa: E402

PY_DOCS = "/usr/share/doc/python3.11/html/_sources"


def chunks(text: str, size: int = 3000) -> list[str]:
    """Cut text at blank lines into documents of about `size` characters."""
    out, cur = [], ""
    for para in text.split("\n\n"):
        cur += para + "\n\n"
        if len(cur) >= size:
            out.append(cur)
            cur = ""
    if cur.strip():
        out.append(cur)
    return out


def build_sources(work: Path) -> tuple[Path, list[Path]]:
    if not os.path.isdir(PY_DOCS):
        sys.exit(f"{PY_DOCS} not found: apt-get update && apt-get install -y python3.11-doc")
    pos = [c for f in sorted(glob.glob(f"{PY_DOCS}/**/*.rst.txt", recursive=True))
           for c in chunks(open(f, encoding="utf-8", errors="replace").read())]
    changelogs, licenses = [], []
    for f in sorted(glob.glob("/usr/share/doc/*/changelog*.gz")):
        try:
            changelogs += chunks(gzip.open(f, "rt", errors="replace").read())
        except (OSError, EOFError):
            continue
    for f in sorted(glob.glob("/usr/share/doc/*/copyright")):
        licenses += chunks(open(f, errors="replace").read())
    work.mkdir(parents=True, exist_ok=True)
    files = []
    for name, docs in (("positive", pos), ("neg-changelog", changelogs), ("neg-copyright", licenses)):
        p = work / f"{name}.jsonl"
        with open(p, "w", encoding="utf-8") as f:
            for d in docs:
                f.write(json.dumps({"text": d}, ensure_ascii=False) + "\n")
        files.append(p)
    return files[0], files[1:]


def build_corpus(sources: list[Path], out: Path, mb: float, shards: int = 8, seed: int = 0) -> list[str]:
    docs = [json.loads(x)["text"] for p in sources for x in open(p, encoding="utf-8")]
    random.Random(seed).shuffle(docs)
    target = mb * 1e6
    picked, total, i = [], 0, 0
    while total < target:
        d = docs[i % len(docs)]
        picked.append(d)
        total += len(d.encode())
        i += 1
    out.mkdir(parents=True, exist_ok=True)
    for s in range(shards):
        with open(out / f"shard-{s}.jsonl", "w", encoding="utf-8") as f:
            for d in picked[s::shards]:
                f.write(json.dumps({"text": d}, ensure_ascii=False) + "\n")
    return picked


def row(phase: str, workers: int, docs: int, mb: float, seconds: float, **extra) -> dict:
    return {"phase": phase, "workers": workers, "docs": docs, "mb": round(mb, 2), "seconds": round(seconds, 3),
            "docs_per_s": round(docs / seconds, 1), "mb_per_s": round(mb / seconds, 2),
            "mb_per_s_per_core": round(mb / seconds / workers, 2), **extra}


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=float, default=100.0, help="size of the benchmark corpus (MB of text)")
    ap.add_argument("--work", default="/tmp/cpm4-bench-data-filter", help="scratch directory")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--skip-spark", action="store_true")
    args = ap.parse_args()
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)

    t = time.perf_counter()
    pos, negs = build_sources(work / "sources")
    model = work / "model" / "quality.bin"
    m = train_classifier([pos], negs, model, TrainConfig(), log=lambda s: print(s, file=sys.stderr))
    print(f"[bench] classifier: held-out AUC {m['holdout']['auc']:.4f}, precision {m['holdout']['precision']:.3f}, "
          f"recall {m['holdout']['recall']:.3f} ({time.perf_counter() - t:.1f}s incl. corpus)", file=sys.stderr)
    corpus = work / "corpus"
    docs = build_corpus([pos, *negs], corpus, args.mb)
    text_mb = sum(len(d.encode()) for d in docs) / 1e6
    print(f"[bench] corpus: {len(docs)} docs, {text_mb:.1f} MB of text in 8 shards", file=sys.stderr)

    rows = []
    scorer = Scorer(model)
    t = time.perf_counter()
    for i in range(0, len(docs), 1024):
        scorer.score(docs[i:i + 1024])
    rows.append(row("score", 1, len(docs), text_mb, time.perf_counter() - t))
    full = Scorer(model, fold=False)
    sub = docs[: max(1, len(docs) // 5)]
    t = time.perf_counter()
    for i in range(0, len(sub), 1024):
        full.score(sub[i:i + 1024])
    rows.append(row("score-full", 1, len(sub), sum(len(d.encode()) for d in sub) / 1e6, time.perf_counter() - t))
    del full

    # A small run first in each setting: worker start-up (process start, imports, model load) is reported as
    # startup_s, apart from the steady-state rate.
    warm = work / "warm"
    build_corpus([pos], warm, 0.2, shards=2)

    def warm_up(**kw) -> float:
        t = time.perf_counter()
        filter_documents(warm, work / "out-warm", model, progress=False, **kw)
        shutil.rmtree(work / "out-warm")
        return time.perf_counter() - t

    for w in args.workers:
        startup = warm_up(workers=w)
        out = work / f"out-local-{w}"
        rep = filter_documents(corpus, out, model, workers=w, progress=False)
        rows.append(row("local", w, rep["docs_in"], rep["text_bytes_in"] / 1e6, rep["processing_seconds"],
                        startup_s=round(startup, 2), kept_share=round(rep["kept_share"], 4)))
        shutil.rmtree(out)
    if not args.skip_spark:
        from cpm4.data.spark import spark_session

        for w in args.workers:
            t = time.perf_counter()
            session, _ = spark_session(f"local[{w}]")
            warm_up(workers=w, engine="spark")
            startup = time.perf_counter() - t
            out = work / f"out-spark-{w}"
            rep = filter_documents(corpus, out, model, engine="spark", workers=w, progress=False)
            session.stop()
            rows.append(row("spark", w, rep["docs_in"], rep["text_bytes_in"] / 1e6, rep["processing_seconds"],
                            startup_s=round(startup, 2), kept_share=round(rep["kept_share"], 4)))
            shutil.rmtree(out)

    device = f"{cpu_name()}, {os.cpu_count()} cores"
    print(f"\n{device}; corpus {len(docs)} docs / {text_mb:.1f} MB of text")
    print(f"{'phase':<12}{'workers':>8}{'docs/s':>12}{'MB/s':>10}{'MB/s/core':>11}{'seconds':>10}")
    for r in rows:
        print(f"{r['phase']:<12}{r['workers']:>8}{r['docs_per_s']:>12.0f}{r['mb_per_s']:>10.2f}"
              f"{r['mb_per_s_per_core']:>11.2f}{r['seconds']:>10.2f}")
    date = datetime.date.today().isoformat()
    res = {"device": device, "date": date, "corpus": {"docs": len(docs), "text_mb": round(text_mb, 2)},
           "classifier": {"config": m["config"], "holdout": m["holdout"]}, "rows": rows,
           "command": "python " + " ".join(sys.argv)}
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"data_filter-{date}.json")
    with open(path, "w") as f:
        json.dump(res, f, indent=1)
    print(f"wrote {path}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
