"""Training data: tokenized, packed, memory-mapped token shards and chat SFT rows.

Shards (`cpm4 data tokenize`): a folder with `index.json` and `shard-NNNNN.bin` files of raw token ids
(uint16 when the vocabulary fits, else uint32). Each document is stored as `<s> tokens </s>`, documents
back to back, so any window of the stream is a training row.

Batches are a pure function of the step: sample k of the run is window perm_e[k mod n] of epoch
e = k div n, perm_e a seeded permutation. Resuming needs only the step (and the same data and seed).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

# One error type for bad data across the data pipeline and training (the message names file and problem).
from cpm4.data.io import DataError
from cpm4.model.config import write_text_atomic

FORMAT = "cpm4-tokens-v1"
IGNORE = -100




@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, T] long
    labels: torch.Tensor  # [B, T] long, IGNORE where no loss
    docs: list[list[int]] | None  # per row: lengths of the packed documents (None: plain causal rows)

    def to(self, device: torch.device | str) -> Batch:
        return Batch(self.input_ids.to(device, non_blocking=True), self.labels.to(device, non_blocking=True),
                     self.docs)


# ---------------------------------------------------------------- tokenizing into shards

def read_documents(paths: Sequence[str | os.PathLike], text_field: str = "text") -> Iterator[str]:
    """Documents from JSONL(.gz)/Parquet files (one per record, read by the data pipeline's own reader) and
    from any other file as plain UTF-8 text, gzip-compressed or not (one document per file)."""
    from cpm4.data.io import file_format, input_files, iter_texts

    for p in input_files(paths):
        try:
            file_format(p)
        except ValueError:
            text = read_plain_text(p)
            if text:
                yield text
            continue
        yield from (t for t in iter_texts(p, text_field) if t)


# Leading bytes of compressed files other than gzip: tokenized as text they were gibberish documents.
_COMPRESSED = {b"\x28\xb5\x2f\xfd": "zstd", b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz", b"PK\x03\x04": "zip",
               b"\x04\x22\x4d\x18": "lz4"}


def read_plain_text(path: Path) -> str:
    """A text file's contents (gzip-compressed: decompressed; a UTF-8 byte-order mark dropped); DataError naming the
    file when it is another compressed format, a damaged gzip file or not UTF-8 (was read with replacement
    characters: binary files became documents)."""
    import gzip
    import zlib

    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (EOFError, OSError, zlib.error) as e:
            raise DataError(f"{path}: damaged gzip file ({e})") from None
    kind = next((k for magic, k in _COMPRESSED.items() if raw.startswith(magic)), None)
    if kind is not None:
        raise DataError(f"{path}: {kind}-compressed, which is not read: decompress it (or use gzip)")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (invalid byte at offset {e.start})") from None


def tokenize_to_shards(paths: Sequence[str | os.PathLike], tokenizer: Any, out_dir: str | os.PathLike,
                       text_field: str = "text", shard_tokens: int = 1 << 27, batch_docs: int = 256,
                       progress: bool = True) -> dict[str, Any]:
    """Tokenize documents into shards under out_dir (atomically: shards under temporary names, then
    renamed, `index.json` last). Returns the index."""
    from tqdm import tqdm

    from cpm4.data.io import input_files

    paths = input_files(paths)  # (a missing one named before the output folder is made)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    if eos is None:
        raise DataError("tokenizer has no eos token: documents could not be separated")
    vocab = tokenizer.vocab_size
    dtype = np.uint16 if vocab <= 1 << 16 else np.uint32
    shards: list[dict[str, Any]] = []
    buf: list[np.ndarray] = []
    state = {"tokens": 0, "docs": 0}

    def flush() -> None:
        if not buf:
            return
        arr = np.concatenate(buf)
        name = f"shard-{len(shards):05d}.bin"
        tmp = out / f".{name}.tmp-{os.getpid()}"
        arr.tofile(tmp)
        os.replace(tmp, out / name)
        shards.append({"file": name, "tokens": int(arr.size), "docs": state["docs"]})
        buf.clear()
        state["tokens"], state["docs"] = 0, 0

    total_docs = 0
    bar = tqdm(desc="tokenize", unit="doc", disable=not progress)
    docs = read_documents(paths, text_field)
    encode = text_encoder(tokenizer)
    while True:
        chunk = [d for _, d in zip(range(batch_docs), docs)]
        if not chunk:
            break
        for ids in encode(chunk):
            ids = ([bos] if bos is not None else []) + list(ids) + [eos]
            buf.append(np.asarray(ids, dtype=dtype))
            state["tokens"] += len(ids)
            state["docs"] += 1
            total_docs += 1
            if state["tokens"] >= shard_tokens:
                flush()
        bar.update(len(chunk))
    flush()
    bar.close()
    if not shards:
        raise DataError("no documents found in the inputs")
    index = {"format": FORMAT, "dtype": np.dtype(dtype).name, "vocab_size": vocab, "bos_token_id": bos,
             "eos_token_id": eos, "num_docs": total_docs, "num_tokens": sum(s["tokens"] for s in shards),
             "shards": shards}
    write_text_atomic(out / "index.json", json.dumps(index, indent=2) + "\n")
    return index


def text_encoder(tokenizer: Any) -> Callable[[list[str]], list[list[int]]]:
    """Documents' texts to ids with special tokens' text taken as text: a page that mentions `</s>` or `<|im_end|>`
    must not end its document there nor teach the model to emit control tokens mid-text (the tokenizer's own
    encode matches them even with add_special_tokens=False). The Rust backend directly, on a copy with
    `encode_special_tokens` set: parallel, and no "longer than model_max_length" warning (documents are cut into
    rows later). A tokenizer without one (a slow tokenizer) encodes as its encode does."""
    backend = getattr(tokenizer.hf, "backend_tokenizer", None)
    if backend is None:
        return lambda texts: [tokenizer.encode(t, add_bos=False) for t in texts]
    plain = type(backend).from_str(backend.to_str())
    plain.encode_special_tokens = True
    return lambda texts: [e.ids for e in plain.encode_batch(texts, add_special_tokens=False)]


# ---------------------------------------------------------------- pre-training rows

def _windows(seed: int, epoch: int, n: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


class PackedDataset:
    """Rows of `seq_len` tokens (+1 for the shifted labels) cut from the concatenated token stream."""

    def __init__(self, path: str | os.PathLike, seq_len: int, seed: int = 0, document_masking: bool = True,
                 vocab_size: int | None = None):
        self.path = Path(path)
        index_file = self.path / "index.json"
        if not index_file.is_file():
            raise DataError(f"no token shards at {self.path} (index.json missing; run `cpm4 data tokenize`)")
        try:
            index = json.loads(index_file.read_text())
            if index.get("format") != FORMAT:
                raise DataError(f"{index_file}: format {index.get('format')!r}, expected {FORMAT!r}")
            self.eos = int(index["eos_token_id"])
            dtype = np.dtype(index["dtype"])
            shards = index["shards"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise DataError(f"{index_file}: malformed index ({e!r})") from None
        if vocab_size is not None and index.get("vocab_size", 0) > vocab_size:
            raise DataError(f"{index_file}: tokens from a vocabulary of {index['vocab_size']}, the model has "
                            f"{vocab_size}")
        self.parts = []
        for s in shards:
            f = self.path / s["file"]
            if not f.is_file():
                raise DataError(f"shard {f} listed in index.json is missing")
            arr = np.memmap(f, dtype=dtype, mode="r")
            if arr.size != s["tokens"]:
                raise DataError(f"shard {f}: {arr.size} tokens on disk, index.json says {s['tokens']}")
            self.parts.append(arr)
        self.offsets = np.cumsum([0] + [p.size for p in self.parts])
        self.total = int(self.offsets[-1])
        self.seq_len, self.seed, self.document_masking = seq_len, seed, document_masking
        self.num_rows = (self.total - 1) // seq_len
        if self.num_rows < 1:
            raise DataError(f"{self.path}: {self.total} tokens, fewer than one row of {seq_len} + 1")

    def tokens(self, start: int, end: int) -> np.ndarray:
        """Tokens [start, end) of the concatenated stream."""
        out = []
        i = int(np.searchsorted(self.offsets, start, side="right")) - 1
        while start < end:
            lo = start - int(self.offsets[i])
            hi = min(end - int(self.offsets[i]), self.parts[i].size)
            out.append(np.asarray(self.parts[i][lo:hi], dtype=np.int64))
            start += hi - lo
            i += 1
        return np.concatenate(out)

    def row(self, sample: int) -> tuple[np.ndarray, np.ndarray, list[int]]:
        epoch, k = divmod(sample, self.num_rows)
        w = int(_windows(self.seed, epoch, self.num_rows)[k])
        win = self.tokens(w * self.seq_len, w * self.seq_len + self.seq_len + 1)
        x, y = win[:-1], win[1:].copy()
        ends = np.flatnonzero(x == self.eos)  # a document ends at its </s>; the next one starts after it
        y[ends] = IGNORE  # </s> -> next document's <s> is not a prediction
        if not self.document_masking:
            return x, y, [self.seq_len]
        cuts = [0, *(int(e) + 1 for e in ends if e + 1 < len(x)), len(x)]
        return x, y, [b - a for a, b in zip(cuts, cuts[1:])]

    def batch(self, step: int, batch_size: int, rank: int = 0, world: int = 1) -> Batch:
        first = (step * world + rank) * batch_size
        rows = [self.row(first + i) for i in range(batch_size)]
        return stack_rows(rows, self.document_masking)


def stack_rows(rows: list[tuple[np.ndarray, np.ndarray, list[int]]], docs: bool) -> Batch:
    """A Batch from (inputs, labels, document lengths) rows; docs=False drops the document lengths."""
    x = torch.from_numpy(np.stack([r[0] for r in rows]))
    y = torch.from_numpy(np.stack([r[1] for r in rows]))
    return Batch(x, y, [r[2] for r in rows] if docs else None)


# ---------------------------------------------------------------- SFT

def encode_chat_example(tokenizer: Any, messages: Sequence[Mapping[str, Any]]) -> tuple[list[int], list[bool]]:
    """Ids of a whole conversation and, per id, whether it is trained on: the content and end token of
    every assistant turn (not the `<|im_start|>assistant` header, not user/system/tool turns)."""
    ids = tokenizer.encode_chat(messages, add_generation_prompt=False)
    mask = [False] * len(ids)
    for i, m in enumerate(messages):
        if m.get("role") != "assistant":
            continue
        if i == 0:
            raise DataError("message 0: the conversation starts with an assistant turn (nothing it answers)")
        before = tokenizer.encode_chat(messages[:i], add_generation_prompt=True)
        upto = tokenizer.encode_chat(messages[:i + 1], add_generation_prompt=False)
        if upto[:len(before)] != before or ids[:len(upto)] != upto:
            raise DataError(f"message {i}: the chat template does not render the conversation as a stable "
                            "prefix; cannot locate the assistant turn's tokens")
        for j in range(len(before), len(upto)):
            mask[j] = True
        # The newline after <|im_end|> belongs to the template's framing, not to what the model must say.
        while mask[len(upto) - 1] and tokenizer.decode([upto[len(upto) - 1]], skip_special_tokens=False).isspace():
            mask[len(upto) - 1] = False
            upto = upto[:-1]
    return ids, mask


def read_chat_jsonl(path: str | os.PathLike) -> Iterator[list[dict[str, Any]]]:
    p = Path(path)
    if not p.is_file():
        raise DataError(f"SFT data not found: {p}")
    with open(p, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{p}:{i}: not valid JSON ({e.msg})") from None
            msgs = obj.get("messages") if isinstance(obj, dict) else None
            if not isinstance(msgs, list) or not msgs:
                raise DataError(f"{p}:{i}: expected an object with a non-empty 'messages' list")
            if not any(isinstance(m, dict) and m.get("role") == "assistant" for m in msgs):
                raise DataError(f"{p}:{i}: no assistant message to train on")
            yield msgs


class SFTDataset:
    """Chat conversations packed greedily (in file order) into rows of `seq_len`; loss on assistant turns
    only, attention inside each conversation. Conversations longer than a row are dropped (counted in
    `dropped`)."""

    def __init__(self, path: str | os.PathLike, tokenizer: Any, seq_len: int, seed: int = 0,
                 vocab_size: int | None = None):
        self.seq_len, self.seed = seq_len, seed
        self.dropped = self.longest_dropped = self.conversations = 0
        packed: list[list[tuple[list[int], list[bool]]]] = [[]]
        used = 0
        for i, msgs in enumerate(read_chat_jsonl(path)):
            self.conversations += 1
            try:
                ids, mask = encode_chat_example(tokenizer, msgs)
            except ValueError as e:
                raise DataError(f"{path}: conversation {i + 1}: {e}") from None
            if vocab_size is not None and max(ids) >= vocab_size:
                raise DataError(f"{path}: conversation {i + 1}: token id {max(ids)} outside the model's "
                                f"vocabulary of {vocab_size}")
            if len(ids) > seq_len:
                self.dropped += 1
                self.longest_dropped = max(self.longest_dropped, len(ids))
                continue
            if used + len(ids) > seq_len:
                packed.append([])
                used = 0
            packed[-1].append((ids, mask))
            used += len(ids)
        self.rows = [self._row(r) for r in packed if r]
        if not self.rows:
            raise DataError(f"{path}: no conversation fits in seq_len={seq_len}")
        self.num_rows = len(self.rows)

    def _row(self, examples: list[tuple[list[int], list[bool]]]) -> tuple[np.ndarray, np.ndarray, list[int]]:
        x = np.zeros(self.seq_len, dtype=np.int64)
        y = np.full(self.seq_len, IGNORE, dtype=np.int64)
        docs, s = [], 0
        for ids, mask in examples:
            n = len(ids)
            x[s:s + n] = ids
            for j in range(n - 1):
                if mask[j + 1]:
                    y[s + j] = ids[j + 1]
            docs.append(n)
            s += n
        if s < self.seq_len:
            docs.append(self.seq_len - s)  # padding, a "document" of its own that nothing attends to
        return x, y, docs

    def row(self, sample: int) -> tuple[np.ndarray, np.ndarray, list[int]]:
        epoch, k = divmod(sample, self.num_rows)
        return self.rows[int(_windows(self.seed, epoch, self.num_rows)[k])]

    def batch(self, step: int, batch_size: int, rank: int = 0, world: int = 1) -> Batch:
        first = (step * world + rank) * batch_size
        return stack_rows([self.row(first + i) for i in range(batch_size)], True)


class SyntheticDataset:
    """Uniform random tokens (benchmarks and smoke tests): rows depend on (seed, sample) only."""

    def __init__(self, vocab_size: int, seq_len: int, seed: int = 0):
        self.vocab_size, self.seq_len, self.seed = vocab_size, seq_len, seed
        self.num_rows = 1 << 30

    def batch(self, step: int, batch_size: int, rank: int = 0, world: int = 1) -> Batch:
        first = (step * world + rank) * batch_size
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + first)
        x = torch.randint(0, self.vocab_size, (batch_size, self.seq_len + 1), generator=g)
        return Batch(x[:, :-1].contiguous(), x[:, 1:].contiguous(), None)
