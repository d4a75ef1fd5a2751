"""Reading and writing document shards: JSONL (optionally .gz on input) and Parquet, in bounded batches.

A *partition* is the unit of work and of resume: a whole file, a byte range of a large uncompressed JSONL
file (lines belong to the range their first byte falls in, as in Hadoop's text splits), or a run of row
groups of a large Parquet file. Output files are written under a temporary name and renamed when complete,
so a reader never sees a partial file.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import uuid
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
GZ_SUFFIXES = tuple(s + ".gz" for s in JSONL_SUFFIXES)
PARQUET_SUFFIXES = (".parquet",)


class DataError(ValueError):
    """Bad input data (malformed line, missing field); the message names the file and line or row."""


def input_files(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """The paths as Paths, each an existing file; DataError naming the first that is not (checked before any work,
    so that a typo in the last of several inputs does not cost the reading of the others)."""
    files = [Path(p) for p in paths]
    missing = next((p for p in files if not p.is_file()), None)
    if missing is not None:
        raise DataError(f"input file not found: {missing}")
    return files


def file_format(path: str | os.PathLike) -> str:
    """'jsonl', 'jsonl.gz' or 'parquet' from the file name; ValueError for anything else."""
    name = os.fspath(path).lower()
    if name.endswith(GZ_SUFFIXES):
        return "jsonl.gz"
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if name.endswith(PARQUET_SUFFIXES):
        return "parquet"
    raise ValueError(f"{path}: unsupported file type (expected .jsonl, .json, .ndjson, optionally .gz, or .parquet)")


def list_input_files(path: str | os.PathLike) -> list[Path]:
    """A file, or every supported file under a directory (recursive, sorted; names starting with '.' or '_'
    are skipped as Spark/Hadoop do, so a filter output directory can be fed back in)."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"input not found: {p}")
    if p.is_file():
        file_format(p)
        return [p]
    files = []
    for f in sorted(p.rglob("*")):
        rel = f.relative_to(p)
        if any(part.startswith((".", "_")) for part in rel.parts) or not f.is_file():
            continue
        try:
            file_format(f)
        except ValueError:
            continue
        files.append(f)
    if not files:
        raise ValueError(f"{p}: no .jsonl/.json/.ndjson(.gz)/.parquet files in this directory")
    return files


@dataclass(frozen=True)
class Partition:
    """One unit of work: `path` whole, a byte range [start, end) of a JSONL file, or some Parquet row groups."""

    index: int
    path: str
    fmt: str
    start: int = 0
    end: int | None = None
    row_groups: tuple[int, ...] | None = None

    def describe(self) -> dict[str, Any]:
        d: dict[str, Any] = {"index": self.index, "path": self.path, "fmt": self.fmt}
        if self.end is not None:
            d.update(start=self.start, end=self.end)
        if self.row_groups is not None:
            d["row_groups"] = list(self.row_groups)
        return d


def plan_partitions(files: list[Path], split_bytes: int | None = None) -> list[Partition]:
    """Partitions for `files`: one per file, large plain JSONL and Parquet files cut near `split_bytes`."""
    parts: list[Partition] = []
    for f in files:
        fmt = file_format(f)
        size = f.stat().st_size
        if split_bytes and fmt == "jsonl" and size > split_bytes:
            for start in range(0, size, split_bytes):
                parts.append(Partition(len(parts), str(f), fmt, start, min(start + split_bytes, size)))
        elif split_bytes and fmt == "parquet" and size > split_bytes:
            import pyarrow.parquet as pq

            md = pq.ParquetFile(f).metadata
            group: list[int] = []
            acc = 0
            for i in range(md.num_row_groups):
                group.append(i)
                acc += md.row_group(i).total_byte_size
                if acc >= split_bytes:
                    parts.append(Partition(len(parts), str(f), fmt, row_groups=tuple(group)))
                    group, acc = [], 0
            if group or md.num_row_groups == 0:
                parts.append(Partition(len(parts), str(f), fmt, row_groups=tuple(group)))
        else:
            parts.append(Partition(len(parts), str(f), fmt))
    return parts


@dataclass
class Batch:
    """Up to `batch_size` documents: their texts, plus what the writer needs to copy them out."""

    texts: list[str]
    text_bytes: int  # UTF-8 bytes of the texts
    raw_bytes: int  # bytes read from the file (JSONL lines; Parquet: Arrow buffer size)
    lines: list[bytes] = field(default_factory=list)  # JSONL: the original lines, newline included
    records: list[dict] = field(default_factory=list)  # JSONL: the parsed objects
    arrow: Any = None  # Parquet: the pyarrow RecordBatch


def _utf8_len(s: str) -> int:
    """UTF-8 bytes of s; UnicodeEncodeError for a lone surrogate (JSON's parser accepts an escaped one, "\\ud800",
    which the classifier and the tokenizer then refused with a TypeError deep inside a job)."""
    return len(s) if s.isascii() else len(s.encode("utf-8"))


def _line_number(path: str, offset: int) -> int:
    """1-based number of the line starting at byte `offset` (counted only when reporting an error)."""
    n = 0
    with open(path, "rb") as f:
        remaining = offset
        while remaining > 0:
            chunk = f.read(min(remaining, 1 << 20))
            if not chunk:
                break
            n += chunk.count(b"\n")
            remaining -= len(chunk)
    return n + 1


def _jsonl_lines(part: Partition) -> Iterator[tuple[int, int | None, bytes]]:
    """(index within the partition, byte offset or None for .gz, line) for the lines that belong to `part`."""
    if part.fmt == "jsonl.gz":
        n = 0
        try:
            with gzip.open(part.path, "rb") as f:
                for line in f:
                    yield n, None, line
                    n += 1
        except (EOFError, OSError, zlib.error) as e:  # truncated (an interrupted download) or not gzip at all
            raise DataError(f"{part.path}: damaged gzip file after {n} lines ({e})") from None
        return
    with open(part.path, "rb", buffering=1 << 20) as f:
        pos = part.start
        if pos > 0:
            f.seek(pos - 1)
            if f.read(1) != b"\n":  # inside a line that belongs to the previous partition
                pos += len(f.readline())
        end = part.end
        for i, line in enumerate(f):
            if end is not None and pos >= end:
                break
            yield i, pos, line
            pos += len(line)


def iter_jsonl_batches(part: Partition, text_field: str, batch_size: int,
                       batch_bytes: int = 64 << 20) -> Iterator[Batch]:
    """Batches of at most `batch_size` documents (and about `batch_bytes` of text) from a JSONL partition.

    Blank lines are skipped. Errors name the file and 1-based line number.
    """
    texts: list[str] = []
    lines: list[bytes] = []
    records: list[dict] = []
    tb = rb = 0

    def fail(i: int, offset: int | None, msg: str) -> DataError:
        lineno = i + 1 if offset is None else _line_number(part.path, offset)
        return DataError(f"{part.path}:{lineno}: {msg}")

    for i, offset, line in _jsonl_lines(part):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
            raise fail(i, offset, f"malformed JSON ({e})") from None
        if not isinstance(obj, dict):
            raise fail(i, offset, f"expected a JSON object, got {type(obj).__name__}")
        text = obj.get(text_field)
        if not isinstance(text, str):
            what = "no field" if text_field not in obj else f"non-string ({type(text).__name__}) field"
            raise fail(i, offset, f"{what} {text_field!r}")
        if not line.endswith(b"\n"):
            line += b"\n"
        texts.append(text)
        lines.append(line)
        records.append(obj)
        try:
            tb += _utf8_len(text)
        except UnicodeEncodeError:
            raise fail(i, offset, f"field {text_field!r} is not valid Unicode (a lone surrogate escape such as "
                       "\\ud800)") from None
        rb += len(line)
        if len(texts) >= batch_size or tb >= batch_bytes:
            yield Batch(texts, tb, rb, lines, records)
            texts, lines, records, tb, rb = [], [], [], 0, 0
    if texts:
        yield Batch(texts, tb, rb, lines, records)


def parquet_schema(path: str | os.PathLike):
    import pyarrow.parquet as pq

    return pq.ParquetFile(path).schema_arrow


def iter_parquet_batches(part: Partition, text_field: str, batch_size: int) -> Iterator[Batch]:
    """Batches of at most `batch_size` rows from a Parquet partition; memory is bounded by one row group."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(part.path)
    schema = pf.schema_arrow
    idx = schema.get_field_index(text_field)
    if idx < 0:
        raise DataError(f"{part.path}: no column {text_field!r} (columns: {', '.join(schema.names)})")
    if not (pa.types.is_string(schema.field(idx).type) or pa.types.is_large_string(schema.field(idx).type)):
        raise DataError(f"{part.path}: column {text_field!r} is {schema.field(idx).type}, not a string column")
    row = 0
    groups = list(part.row_groups) if part.row_groups is not None else None
    if groups == []:
        return
    for rb in pf.iter_batches(batch_size=batch_size, row_groups=groups):
        texts = rb.column(idx).to_pylist()
        if rb.column(idx).null_count:
            bad = next(j for j, t in enumerate(texts) if t is None)
            raise DataError(f"{part.path}: row {row + bad} (in this partition) has a null {text_field!r}")
        yield Batch(texts, sum(_utf8_len(t) for t in texts), rb.nbytes, arrow=rb)
        row += rb.num_rows


def iter_batches(part: Partition, text_field: str, batch_size: int, batch_bytes: int = 64 << 20) -> Iterator[Batch]:
    """Batches of documents from any supported partition."""
    if part.fmt == "parquet":
        return iter_parquet_batches(part, text_field, batch_size)
    return iter_jsonl_batches(part, text_field, batch_size, batch_bytes)


def iter_texts(path: str | os.PathLike, text_field: str = "text", batch_size: int = 4096) -> Iterator[str]:
    """Every document text of one file (JSONL, JSONL.gz or Parquet), streamed."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"input not found: {p}")
    part = Partition(0, str(p), file_format(p))
    for b in iter_batches(part, text_field, batch_size):
        yield from b.texts


def count_documents(path: str | os.PathLike, text_field: str = "text") -> int:
    """Number of documents in a file (Parquet: from the footer; JSONL: non-blank lines, validated)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"input not found: {p}")
    fmt = file_format(p)
    if fmt == "parquet":
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(p)
        if pf.schema_arrow.get_field_index(text_field) < 0:
            raise DataError(f"{p}: no column {text_field!r}")
        return pf.metadata.num_rows
    return sum(len(b.texts) for b in iter_jsonl_batches(Partition(0, str(p), fmt), text_field, 4096))


# ---- atomic files -------------------------------------------------------------------------------------------


def fsync_dir(path: str | os.PathLike) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a directory be opened/synced
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike, tmp_dir: str | os.PathLike | None = None) -> Iterator[Path]:
    """Yield a temporary path; on success it is renamed to `final`, on any error it is removed.

    The temporary name starts with '.', in `tmp_dir` (same filesystem as `final`) or beside `final`.
    """
    final = Path(final)
    d = Path(tmp_dir) if tmp_dir is not None else final.parent
    d.mkdir(parents=True, exist_ok=True)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = d / f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        yield tmp
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(final.parent)


def write_json_atomic(path: str | os.PathLike, obj: Any, tmp_dir: str | os.PathLike | None = None) -> None:
    with atomic_path(path, tmp_dir) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=1, ensure_ascii=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())


class PartWriter:
    """Writes the kept documents of one partition, in the partition's format (JSONL.gz input -> JSONL)."""

    def __init__(self, path: Path, fmt: str, schema=None, score_field: str | None = None):
        self.path = path
        self.fmt = fmt
        self.score_field = score_field
        self._pq = None
        if fmt == "parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            if score_field:
                if schema.get_field_index(score_field) >= 0:
                    schema = schema.remove(schema.get_field_index(score_field))
                schema = schema.append(pa.field(score_field, pa.float64()))
            self.schema = schema
            self._pq = pq.ParquetWriter(str(path), schema)
        else:
            self._f = open(path, "wb", buffering=1 << 20)

    def write(self, batch: Batch, keep, scores) -> None:
        """Append the documents of `batch` where the boolean array `keep` is true."""
        if self._pq is not None:
            import pyarrow as pa

            rb = batch.arrow
            if self.score_field:
                cols = [c for n, c in zip(rb.schema.names, rb.columns) if n != self.score_field]
                rb = pa.RecordBatch.from_arrays(cols + [pa.array(scores, pa.float64())], schema=self.schema)
            self._pq.write_batch(rb.filter(pa.array(keep)))
            return
        if self.score_field:
            for obj, k, s in zip(batch.records, keep, scores):
                if k:
                    obj[self.score_field] = float(s)
                    self._f.write(json.dumps(obj, ensure_ascii=False).encode("utf-8") + b"\n")
        else:
            self._f.writelines(line for line, k in zip(batch.lines, keep) if k)

    def close(self) -> None:
        if self._pq is not None:
            self._pq.close()
        else:
            self._f.flush()
            os.fsync(self._f.fileno())
            self._f.close()

    def abort(self) -> None:
        with contextlib.suppress(Exception):
            self.close()
