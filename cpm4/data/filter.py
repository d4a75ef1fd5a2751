"""Score documents with the quality classifier and keep those with P(positive) >= threshold.

Input is a file or a directory of shards (JSONL, JSONL.gz, Parquet); large files are cut into partitions
(see `cpm4.data.io`). Output is a directory with one part file per partition, in the partition's format
(JSONL.gz input gives plain JSONL), plus bookkeeping whose names start with '_' (skipped by Spark, Hadoop and
`list_input_files`):

    part-00000.jsonl ...    kept documents, each written under a hidden temporary name in _tmp/ and renamed
    _manifest.json          input partitions and settings; a rerun with other inputs or settings is refused
    _done/part-00000.jsonl.json   written after its part file: the partition is finished, with its counts
    _scorer/                the folded scoring model the workers load (see `cpm4.data.classifier`)
    _report.json, _score_hist.png, _SUCCESS   written at the end

A rerun after an interruption skips partitions that have a finished marker and a part file, and recomputes
the rest; a partial file is never visible under a part name. Engines: "local" (this process, or a forkserver
multiprocessing pool over partitions) and "spark" (`cpm4.data.spark`).
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import queue
import shutil
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .classifier import Scorer, fold_model, read_model_info
from .io import (
    Partition,
    PartWriter,
    atomic_path,
    iter_batches,
    list_input_files,
    parquet_schema,
    plan_partitions,
    write_json_atomic,
)

HIST_BINS = 100
MANIFEST = "_manifest.json"
REPORT = "_report.json"
HIST_PNG = "_score_hist.png"
SUCCESS = "_SUCCESS"
DONE_DIR = "_done"
TMP_DIR = "_tmp"
SCORER_DIR = "_scorer"
ENGINES = ("local", "spark")


class SimulatedCrash(RuntimeError):
    """Raised by `crash_after` (a testing aid) to stop a run as a crash would."""


@dataclass(frozen=True)
class FilterJob:
    """What a worker needs to process a partition (small and picklable)."""

    output: str
    scorer_model: str
    positive_label: str
    threshold: float
    text_field: str
    batch_size: int
    batch_bytes: int
    score_field: str | None = None
    tokenizer: str | None = None  # the classifier's subword tokenizer (from the original model's metadata)


def part_name(part: Partition) -> str:
    return f"part-{part.index:05d}{'.parquet' if part.fmt == 'parquet' else '.jsonl'}"


def marker_path(output: str | os.PathLike, name: str) -> Path:
    return Path(output) / DONE_DIR / f"{name}.json"


_SCORERS: dict[tuple[str, str], Scorer] = {}


def _scorer(job: FilterJob) -> Scorer:
    # One model per worker process, reused across its partitions (pool workers and Spark's reused workers).
    key = (job.scorer_model, job.positive_label)
    if key not in _SCORERS:
        _SCORERS[key] = Scorer(job.scorer_model, job.positive_label, fold=False, tokenizer=job.tokenizer)
    return _SCORERS[key]


def score_histogram(scores: np.ndarray) -> np.ndarray:
    """Counts of `scores` in HIST_BINS equal bins over [0, 1] (1.0 goes to the last bin)."""
    idx = np.minimum((np.asarray(scores) * HIST_BINS).astype(np.int64), HIST_BINS - 1)
    return np.bincount(idx, minlength=HIST_BINS)


def run_partition(job: FilterJob, part: Partition,
                  progress: Callable[[int, int], None] | None = None) -> dict:
    """Filter one partition into its part file and write its finished marker; returns the marker's stats.

    `progress(docs, bytes)` is called after each batch.
    """
    t0 = time.perf_counter()
    out = Path(job.output)
    name = part_name(part)
    scorer = _scorer(job)
    hist = np.zeros(HIST_BINS, dtype=np.int64)
    docs_in = docs_out = text_bytes = raw_bytes = 0
    schema = parquet_schema(part.path) if part.fmt == "parquet" else None
    with atomic_path(out / name, out / TMP_DIR) as tmp:
        writer = PartWriter(tmp, part.fmt, schema, job.score_field)
        try:
            for batch in iter_batches(part, job.text_field, job.batch_size, job.batch_bytes):
                scores = scorer.score(batch.texts)
                keep = scores >= job.threshold
                writer.write(batch, keep, scores)
                hist += score_histogram(scores)
                docs_in += len(batch.texts)
                docs_out += int(keep.sum())
                text_bytes += batch.text_bytes
                raw_bytes += batch.raw_bytes
                if progress is not None:
                    progress(len(batch.texts), batch.raw_bytes)
        except BaseException:
            writer.abort()
            raise
        writer.close()
    stats = {
        "partition": part.describe(),
        "output": name,
        "docs_in": docs_in,
        "docs_out": docs_out,
        "bytes_in": raw_bytes,
        "text_bytes_in": text_bytes,
        "bytes_out": (out / name).stat().st_size,
        "seconds": time.perf_counter() - t0,
        "pid": os.getpid(),
        "hist": hist.tolist(),
    }
    write_json_atomic(marker_path(out, name), stats, out / TMP_DIR)
    return stats


# ---- local engine ---------------------------------------------------------------------------------------------

_PROGRESS_QUEUE = None


def _pool_init(q) -> None:
    global _PROGRESS_QUEUE
    _PROGRESS_QUEUE = q


def _queue_progress(docs: int, nbytes: int) -> None:
    _PROGRESS_QUEUE.put((docs, nbytes))


def _pool_task(item: tuple[FilterJob, Partition]) -> dict:
    return run_partition(*item, progress=_queue_progress)


def run_local(job: FilterJob, parts: Sequence[Partition], workers: int,
              on_done: Callable[[dict], None], on_progress: Callable[[int, int], None]) -> None:
    """Process `parts` in this process (one worker or one partition) or in a pool of `workers` processes."""
    if workers <= 1 or len(parts) <= 1:
        for p in parts:
            on_done(run_partition(job, p, on_progress))
        return
    # Not fork: the parent may hold threads (torch, Spark's gateway, our progress thread) that fork would copy
    # half-locked. forkserver forks workers from a clean server that has imported this module once (importing
    # cpm4 costs ~1 s, mostly torch), where spawn would pay that import in every worker.
    # ProcessPoolExecutor rather than multiprocessing.Pool: a worker that dies (OOM kill) breaks the pool with
    # an error instead of being replaced while the driver waits forever.
    if "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload([__name__])
    else:
        ctx = mp.get_context("spawn")
    q = ctx.Queue()
    stop = threading.Event()

    def drain() -> None:
        while not stop.is_set():
            try:
                on_progress(*q.get(timeout=0.1))
            except queue.Empty:
                continue

    t = threading.Thread(target=drain, daemon=True)
    t.start()
    pool = ProcessPoolExecutor(min(workers, len(parts)), mp_context=ctx, initializer=_pool_init, initargs=(q,))
    try:
        futures = [pool.submit(_pool_task, (job, p)) for p in parts]
        for fut in as_completed(futures):
            on_done(fut.result())
    except BaseException:
        # Stop at once, as a crash would: partitions in flight leave only hidden temporary files.
        for proc in list(getattr(pool, "_processes", {}).values()):
            proc.terminate()
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    else:
        pool.shutdown(wait=True)
    finally:
        stop.set()
        t.join()


# ---- driver ---------------------------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _part_estimate(p: Partition) -> int:
    if p.end is not None:
        return p.end - p.start
    return os.path.getsize(p.path)


def _own_files(out: Path) -> list[Path]:
    names = {MANIFEST, REPORT, HIST_PNG, SUCCESS, DONE_DIR, TMP_DIR, SCORER_DIR}
    return [f for f in out.iterdir() if f.name in names or (f.name.startswith("part-"))]


def _prepare_output(out: Path, manifest: dict, overwrite: bool) -> None:
    """Create `out` or check that it holds an interrupted run of the same job (or clear it, with overwrite)."""
    mpath = out / MANIFEST
    if out.exists() and not out.is_dir():
        raise ValueError(f"output {out} exists and is not a directory")
    if mpath.is_file():
        with open(mpath, encoding="utf-8") as f:
            old = json.load(f)
        if old == manifest:
            return
        if not overwrite:
            changed = sorted(k for k in set(old) | set(manifest) if old.get(k) != manifest.get(k))
            raise ValueError(f"output {out} holds a run with different {', '.join(changed)}; "
                             "use another --output, or --overwrite to start over")
        for f in _own_files(out):
            shutil.rmtree(f) if f.is_dir() else f.unlink()
    elif out.is_dir() and any(out.iterdir()):
        raise ValueError(f"output {out} is not empty and holds no {MANIFEST}; choose a new or empty directory")
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(mpath, manifest)


def _finished(out: Path, parts: Sequence[Partition]) -> set[int]:
    done = set()
    for p in parts:
        name = part_name(p)
        if marker_path(out, name).is_file() and (out / name).is_file():
            done.add(p.index)
    return done


def _plot_histogram(counts: np.ndarray, threshold: float, path: Path, title: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # Figure + Agg canvas directly: no pyplot, so no global backend state in the caller's process.
    fig = Figure(figsize=(7, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    edges = np.linspace(0.0, 1.0, HIST_BINS + 1)
    ax.bar(edges[:-1], counts, width=1.0 / HIST_BINS, align="edge", color="#4C72B0", edgecolor="none")
    ax.axvline(threshold, color="#C44E52", linestyle="--", label=f"threshold {threshold:g}")
    ax.set_xlim(0, 1)
    ax.set_xlabel("P(positive)")
    ax.set_ylabel("documents")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")


def filter_documents(input: str | os.PathLike, output: str | os.PathLike, model: str | os.PathLike, *,
                     threshold: float = 0.5, text_field: str = "text", batch_size: int = 1024,
                     batch_bytes: int = 64 << 20, split_bytes: int | None = 256 << 20, workers: int | None = None,
                     engine: str = "local", spark_master: str | None = None, score_field: str | None = None,
                     positive_label: str | None = None, fold: bool = True, overwrite: bool = False,
                     progress: bool = True, crash_after: int | None = None) -> dict:
    """Keep the documents of `input` whose P(positive) under `model` is >= `threshold`; write them to the
    directory `output` (one part file per input partition) with a report. Resumes an interrupted run.

    `crash_after` (testing aid) raises SimulatedCrash once that many partitions have finished in this call.
    Returns the report (also written to `<output>/_report.json`).
    """
    t_start = time.perf_counter()
    if not isinstance(threshold, (int, float)) or not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")
    if batch_size < 1 or batch_bytes < 1:
        raise ValueError("batch size must be >= 1")
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    workers = workers or os.cpu_count() or 1
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if score_field is not None and score_field == text_field:
        raise ValueError("--score-field must differ from the text field")
    model = Path(model)
    if not model.is_file():
        raise FileNotFoundError(f"model not found: {model}")
    out = Path(output)
    files = list_input_files(input)
    in_root = Path(input).resolve()
    if any(out.resolve() in f.resolve().parents for f in files) or (
            in_root.is_dir() and in_root in out.resolve().parents):
        raise ValueError(f"output {out} must not contain the input files nor lie inside the input directory")
    parts = plan_partitions(files, split_bytes)
    positive_label = positive_label or read_model_info(model).get("positive_label") or "__label__pos"
    model_sha = _sha256(model)
    manifest = {
        "version": 1,
        "input": str(in_root),
        "partitions": [dict(p.describe(), output=part_name(p), size=os.path.getsize(p.path),
                            mtime_ns=os.stat(p.path).st_mtime_ns) for p in parts],
        "settings": {"model": str(model.resolve()), "model_sha256": model_sha, "positive_label": positive_label,
                     "threshold": float(threshold), "text_field": text_field, "score_field": score_field,
                     "split_bytes": split_bytes, "fold": fold},
    }
    _prepare_output(out, manifest, overwrite)
    shutil.rmtree(out / TMP_DIR, ignore_errors=True)  # leftovers of a crashed run (never visible as parts)
    (out / SUCCESS).unlink(missing_ok=True)

    scorer_model = model
    if fold:
        folded = out / SCORER_DIR / f"folded-{model_sha[:16]}.bin"
        folded.parent.mkdir(exist_ok=True)
        if folded.is_file() or fold_model(model, folded, positive_label):
            scorer_model = folded
    # The folded copy has no metadata beside it: the tokenizer travels in the job.
    tok = read_model_info(model).get("tokenizer")
    job = FilterJob(str(out.resolve()), str(scorer_model.resolve()), positive_label, float(threshold), text_field,
                    batch_size, batch_bytes, score_field, str((model.parent / tok).resolve()) if tok else None)
    # Fail early on a bad model, label or missing tokenizer, in the driver.
    Scorer(job.scorer_model, positive_label, fold=False, tokenizer=job.tokenizer)

    done = _finished(out, parts)
    # Largest first so that the last partitions to finish are short ones (fewer idle workers at the end).
    pending = sorted((p for p in parts if p.index not in done), key=_part_estimate, reverse=True)
    for p in pending:  # a marker without its part file (deleted by hand) must not count as finished
        marker_path(out, part_name(p)).unlink(missing_ok=True)
    bar = None
    if progress and pending:
        from tqdm import tqdm

        bar = tqdm(total=sum(_part_estimate(p) for p in pending), unit="B", unit_scale=True, file=sys.stderr,
                   desc=f"filter {len(pending)}/{len(parts)} partitions", dynamic_ncols=True)
    finished: list[dict] = []
    lock = threading.Lock()

    def on_progress(docs: int, nbytes: int) -> None:
        if bar is not None:
            with lock:
                bar.update(nbytes)

    def on_done(stats: dict) -> None:
        finished.append(stats)
        if bar is not None:
            if engine == "spark":  # no per-batch progress from Spark tasks
                with lock:
                    bar.update(stats["bytes_in"])
            bar.set_postfix(done=f"{len(finished)}/{len(pending)}", refresh=False)
        if crash_after is not None and len(finished) >= crash_after:
            raise SimulatedCrash(f"simulated crash after {len(finished)} partitions")

    t_proc = time.perf_counter()
    try:
        if pending and engine == "spark":
            from .spark import run_spark

            run_spark(job, pending, workers, spark_master, on_done)
        elif pending:
            run_local(job, pending, workers, on_done, on_progress)
    finally:
        if bar is not None:
            bar.close()
    proc_s = time.perf_counter() - t_proc
    shutil.rmtree(out / TMP_DIR, ignore_errors=True)

    report = _report(out, parts, finished, manifest, engine, workers, proc_s, time.perf_counter() - t_start)
    kept = f"kept {report['docs_out']}/{report['docs_in']} ({100 * report['kept_share']:.1f}%)"
    _plot_histogram(np.array(report["score_histogram"]["counts"]), threshold, out / HIST_PNG,
                    f"{Path(input).name}: {kept} at threshold {threshold:g}")
    write_json_atomic(out / REPORT, report)
    (out / SUCCESS).touch()
    if progress:
        print(f"[cpm4] {kept}; {report['docs_per_s']:.0f} docs/s, {report['mb_per_s']:.1f} MB/s of text "
              f"({report['partitions_processed']} partitions processed, {report['partitions_skipped']} already "
              f"done) -> {out}", file=sys.stderr)
    return report


def _report(out: Path, parts: Sequence[Partition], finished: list[dict], manifest: dict, engine: str,
            workers: int, proc_s: float, total_s: float) -> dict:
    markers = []
    for p in parts:
        with open(marker_path(out, part_name(p)), encoding="utf-8") as f:
            markers.append(json.load(f))
    tot = {k: sum(m[k] for m in markers) for k in ("docs_in", "docs_out", "bytes_in", "bytes_out", "text_bytes_in")}
    hist = np.sum([m["hist"] for m in markers], axis=0, dtype=np.int64) if markers else np.zeros(HIST_BINS)
    run_docs = sum(s["docs_in"] for s in finished)
    run_text = sum(s["text_bytes_in"] for s in finished)
    s = manifest["settings"]
    return {
        "input": manifest["input"],
        "output": str(out),
        "model": s["model"],
        "threshold": s["threshold"],
        "text_field": s["text_field"],
        "engine": engine,
        "workers": workers,
        "partitions": len(parts),
        "partitions_processed": len(finished),
        "partitions_skipped": len(parts) - len(finished),
        **tot,
        "kept_share": tot["docs_out"] / tot["docs_in"] if tot["docs_in"] else 0.0,
        "seconds": total_s,
        "processing_seconds": proc_s,
        # Rates cover the partitions processed in this call; MB = 1e6 bytes of document text (UTF-8).
        "docs_processed": run_docs,
        "docs_per_s": run_docs / proc_s if finished and proc_s > 0 else 0.0,
        "mb_per_s": run_text / 1e6 / proc_s if finished and proc_s > 0 else 0.0,
        "score_histogram": {"bin_edges": np.linspace(0, 1, HIST_BINS + 1).round(6).tolist(),
                            "counts": [int(c) for c in hist]},
        "histogram_png": HIST_PNG,
    }


