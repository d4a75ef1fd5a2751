"""The UltraClean quality classifier: fastText trained on normalized positive and negative documents.

Training data: every positive document, and negatives sampled without replacement from several sources with an
equal share each, their total matched to the positives (the paper draws negatives from diverse raw web
corpora). A seeded share of both goes to a held-out set; its precision/recall/AUC are printed and saved next to
the model as `<model stem>.metrics.json`, with the held-out scores in `<model stem>.holdout.jsonl`.

Scoring: fastText averages the embedding rows of a document's words and n-grams, then applies a linear output
layer. With two labels that layer only needs one direction, so each embedding row can be replaced by its dot
product with it ("folding"): P(pos) = sigmoid(mean_i row_i . (w_pos - w_neg)) for softmax loss, and
sigmoid(mean_i row_i . w_pos) for one-vs-all. The folded model is a regular fastText file with dim 1: the same
words, n-gram hashing and probabilities (up to float rounding, ~1e-6), about 8x faster at dim 256 since a token
costs one float instead of 256.
"""

from __future__ import annotations

import json
import mmap
import os
import shutil
import struct
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .io import Partition, atomic_path, count_documents, file_format, iter_batches, iter_texts, write_json_atomic
from .metrics import binary_metrics
from .normalize import CR_TOKEN, NEWLINE_TOKEN, TAB_TOKEN, normalize

POSITIVE_LABEL = "__label__pos"
NEGATIVE_LABEL = "__label__neg"
# fastText returns exp(log(p + 1e-5)); we subtract the smoothing so scores are probabilities in [0, 1].
_FASTTEXT_LOG_EPS = 1e-5
_MAGIC = 793712314
_MIN_TRAIN_THREADS = 11  # blocks 0-9 plus one for the remainder of rows*dim/10


def _fasttext():
    try:
        import fasttext
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("cpm4 data needs fastText: pip install fasttext-numpy2") from e
    return fasttext


def metrics_path(model: str | os.PathLike) -> Path:
    p = Path(model)
    return p.with_name(p.stem + ".metrics.json")


def holdout_path(model: str | os.PathLike) -> Path:
    p = Path(model)
    return p.with_name(p.stem + ".holdout.jsonl")


@dataclass
class TrainConfig:
    """The paper's recipe as defaults; `bucket` is ours (fastText's 2M buckets x dim 256 would be a 2 GB file)."""

    dim: int = 256
    lr: float = 0.1
    word_ngrams: int = 3
    min_count: int = 5
    epoch: int = 3
    bucket: int = 200_000
    loss: str = "softmax"
    threads: int = 0  # 0 = all cores
    holdout: float = 0.1
    seed: int = 0
    threshold: float = 0.5
    text_field: str = "text"
    tokenizer: str | None = None  # subword tokenizer (tokenizer.json or a folder holding one); None: words

    def validate(self) -> None:
        if not 0.0 <= self.holdout < 1.0:
            raise ValueError(f"holdout must be in [0, 1), got {self.holdout}")
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {self.threshold}")
        for name in ("dim", "word_ngrams", "min_count", "epoch", "bucket"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.loss not in ("softmax", "ova"):
            raise ValueError(f"loss must be softmax or ova, got {self.loss!r}")


def balanced_shares(target: int, available: Sequence[int]) -> list[int]:
    """How many documents to take from each source: equal shares summing to `target` (or to everything there is).

    A source with fewer documents than its share gives all it has and the others make up the difference;
    shares of the sources that are not short differ by at most one.
    """
    if target < 0 or any(a < 0 for a in available):
        raise ValueError("counts must be non-negative")
    shares = [0] * len(available)
    remaining = min(target, sum(available))
    order = sorted(range(len(available)), key=lambda i: available[i])
    for k, i in enumerate(order):
        take = min(available[i], remaining // (len(order) - k))
        shares[i] = take
        remaining -= take
    return shares


def _sample_indices(n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    return np.sort(rng.choice(n, size=k, replace=False)) if k < n else np.arange(n)


def _iter_selected(path: Path, field: str, chosen: np.ndarray) -> Iterable[str]:
    """The documents of `path` whose positions are in the sorted array `chosen`, streamed."""
    j = 0
    pos = 0
    for b in iter_batches(Partition(0, str(path), file_format(path)), field, 4096):
        if j >= chosen.size:
            return
        for t in b.texts:
            if j < chosen.size and chosen[j] == pos:
                yield t
                j += 1
            pos += 1


def _shuffle_lines(src: Path, dst: Path, offsets: list[int], rng: np.random.Generator) -> None:
    """Write the lines of `src` (starting at `offsets`) to `dst` in random order; fastText's SGD reads the file
    in order, so the classes must be mixed."""
    bounds = np.array(offsets + [src.stat().st_size], dtype=np.int64)
    perm = rng.permutation(len(offsets))
    with open(src, "rb") as f, open(dst, "wb", buffering=1 << 20) as out:
        if bounds[-1] == 0:
            return
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            for i in perm:
                out.write(m[bounds[i]:bounds[i + 1]])


def train_classifier(positives: Sequence[str | os.PathLike], negatives: Sequence[str | os.PathLike],
                     out: str | os.PathLike, config: TrainConfig | None = None,
                     log: Callable[[str], None] | None = None) -> dict:
    """Train a fastText quality classifier; write it atomically to `out` with its metrics and held-out scores.

    Returns the metrics dictionary (also saved as `<out stem>.metrics.json`).
    """
    cfg = config or TrainConfig()
    cfg.validate()
    log = log or (lambda msg: print(msg, file=sys.stderr))
    out = Path(out)
    if out.suffix == ".json" or out.name.endswith((".metrics.json", ".holdout.jsonl")):
        raise ValueError(f"{out}: model name clashes with its metrics files; use e.g. model.bin")
    if not positives or not negatives:
        raise ValueError("need at least one positive and one negative file")
    pos_files = [Path(p) for p in positives]
    neg_files = [Path(p) for p in negatives]
    for p in pos_files + neg_files:
        if not p.is_file():
            raise FileNotFoundError(f"input not found: {p}")
        file_format(p)
    rng = np.random.default_rng(cfg.seed)
    t0 = time.perf_counter()

    pos_counts = [count_documents(p, cfg.text_field) for p in pos_files]
    neg_avail = [count_documents(p, cfg.text_field) for p in neg_files]
    n_pos = sum(pos_counts)
    if n_pos == 0:
        raise ValueError("the positive files hold no documents")
    shares = balanced_shares(n_pos, neg_avail)
    if sum(shares) < n_pos:
        log(f"[cpm4] warning: only {sum(neg_avail)} negatives for {n_pos} positives; using all of them")

    out.parent.mkdir(parents=True, exist_ok=True)
    ft = _fasttext()
    with tempfile.TemporaryDirectory(prefix=".cpm4-train-", dir=out.parent) as td:
        raw, train_txt, held = Path(td) / "raw.txt", Path(td) / "train.txt", Path(td) / "holdout.txt"
        offsets: list[int] = []
        held_labels: list[int] = []
        n_train = {"pos": 0, "neg": 0}

        def sources():
            for p in pos_files:
                yield POSITIVE_LABEL, iter_texts(p, cfg.text_field)
            for p, avail, take in zip(neg_files, neg_avail, shares):
                yield NEGATIVE_LABEL, _iter_selected(p, cfg.text_field, _sample_indices(avail, take, rng))

        pre = Preprocess(cfg.tokenizer)
        with open(raw, "wb") as fr, open(held, "w", encoding="utf-8") as fh:
            pos_bytes = 0
            for label, texts in sources():
                for text in texts:
                    (line,) = pre([text])
                    if rng.random() < cfg.holdout:
                        fh.write(line + "\n")
                        held_labels.append(int(label == POSITIVE_LABEL))
                    else:
                        offsets.append(pos_bytes)
                        data = f"{label} {line}\n".encode()
                        fr.write(data)
                        pos_bytes += len(data)
                        n_train["pos" if label == POSITIVE_LABEL else "neg"] += 1
        if not n_train["pos"] or not n_train["neg"]:
            raise ValueError(f"training set needs both classes, got {n_train}")
        _shuffle_lines(raw, train_txt, offsets, rng)
        raw.unlink()
        log(f"[cpm4] training on {n_train['pos']} positive + {n_train['neg']} negative documents "
            f"({', '.join(f'{p.name}: {s}' for p, s in zip(neg_files, shares))}), {len(held_labels)} held out")
        t1 = time.perf_counter()
        # fastText 0.9.x initialises the input matrix in blocks of rows*dim/10, one per training thread, so with
        # fewer than 10 threads part of it keeps whatever was in memory (NaN on reused heap pages: "Encountered
        # NaN"). At least _MIN_TRAIN_THREADS threads cover it all; extra threads on few cores are harmless for
        # its lock-free SGD.
        threads = max(cfg.threads or os.cpu_count() or 1, _MIN_TRAIN_THREADS)
        model = ft.train_supervised(
            input=str(train_txt), dim=cfg.dim, lr=cfg.lr, wordNgrams=cfg.word_ngrams, minCount=cfg.min_count,
            epoch=cfg.epoch, bucket=cfg.bucket, loss=cfg.loss, thread=threads, seed=cfg.seed, verbose=0)
        train_s = time.perf_counter() - t1
        if set(model.get_labels()) != {POSITIVE_LABEL, NEGATIVE_LABEL}:
            raise ValueError(f"unexpected labels {model.get_labels()}")
        with atomic_path(out) as tmp:
            model.save_model(str(tmp))
        if pre.path is not None:  # the model needs its tokenizer to score: keep a copy beside it
            with atomic_path(tokenizer_path(out)) as tmp:
                shutil.copyfile(pre.path, tmp)

        scores: np.ndarray = np.zeros(0)
        if held_labels:
            scorer = Scorer(out, positive_label=POSITIVE_LABEL)
            with open(held, encoding="utf-8") as fh:
                scores = np.concatenate([scorer.score_normalized(chunk) for chunk in _chunks(fh, 4096)])
    holdout_file = holdout_path(out)
    with atomic_path(holdout_file) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for y, s in zip(held_labels, scores):
            f.write(json.dumps({"label": y, "score": float(s)}) + "\n")
    metrics = {
        "model": out.name,
        "positive_label": POSITIVE_LABEL,
        "negative_label": NEGATIVE_LABEL,
        "normalize": True,
        "tokenizer": tokenizer_path(out).name if pre.path is not None else None,
        "config": asdict(cfg),
        "data": {
            "positives": [{"path": str(p), "documents": c} for p, c in zip(pos_files, pos_counts)],
            "negatives": [{"path": str(p), "available": a, "sampled": s}
                          for p, a, s in zip(neg_files, neg_avail, shares)],
            "train_positive": n_train["pos"], "train_negative": n_train["neg"],
        },
        "holdout": binary_metrics(held_labels, scores, cfg.threshold) if held_labels else None,
        "holdout_predictions": holdout_file.name,
        "seconds": {"total": time.perf_counter() - t0, "train": train_s},
    }
    write_json_atomic(metrics_path(out), metrics)
    h = metrics["holdout"]
    if h:
        auc = "n/a" if h["auc"] is None else f"{h['auc']:.4f}"
        log(f"[cpm4] held-out ({h['n']} docs): precision {h['precision']:.4f} recall {h['recall']:.4f} "
            f"F1 {h['f1']:.4f} AUC {auc} at threshold {cfg.threshold}")
    return metrics


def _chunks(lines: Iterable[str], n: int) -> Iterable[list[str]]:
    buf: list[str] = []
    for line in lines:
        buf.append(line.rstrip("\n"))
        if len(buf) == n:
            yield buf
            buf = []
    if buf:
        yield buf


# ---- scoring ------------------------------------------------------------------------------------------------


_STRUCTURE_TOKENS = frozenset((NEWLINE_TOKEN, TAB_TOKEN, CR_TOKEN))


def tokenizer_path(model: str | os.PathLike) -> Path:
    """Where `train_classifier` keeps the subword tokenizer a model was trained with."""
    p = Path(model)
    return p.with_name(p.stem + ".tokenizer.json")


class Preprocess:
    """What the classifier sees: `normalize`d text, then, with a tokenizer (the paper tokenises with a subword
    tokenizer rather than whitespace), each word replaced by its subword pieces as it would be tokenized after
    a space, space-separated; the structure tokens (\\n, \\t, \\r) stay whole. Words are tokenized once
    and cached (word frequencies are Zipfian), which keeps the BPE off the hot path."""

    CACHE_LIMIT = 1 << 20

    def __init__(self, tokenizer: str | os.PathLike | None = None):
        self.path: Path | None = None
        self.tok = None
        self._cache: dict[str, str] = {}
        if tokenizer is not None:
            path = Path(tokenizer)
            if path.is_dir():
                path = path / "tokenizer.json"
            if not path.is_file():
                raise FileNotFoundError(f"classifier tokenizer not found: {path}")
            from tokenizers import Tokenizer

            self.tok, self.path = Tokenizer.from_file(str(path)), path

    def __call__(self, texts: Sequence[str]) -> list[str]:
        lines = [normalize(t) for t in texts]
        if self.tok is None:
            return lines
        words = [line.split(" ") if line else [] for line in lines]
        cache = self._cache
        new = {w for ws in words for w in ws if w not in cache and w not in _STRUCTURE_TOKENS}
        if len(cache) + len(new) > self.CACHE_LIMIT:
            cache.clear()
            new = {w for ws in words for w in ws if w not in _STRUCTURE_TOKENS}
        new_words = sorted(new)
        for w, enc in zip(new_words, self.tok.encode_batch([" " + w for w in new_words], add_special_tokens=False)):
            cache[w] = " ".join(enc.tokens)
        return [" ".join(w if w in _STRUCTURE_TOKENS else cache[w] for w in ws) for ws in words]


def read_model_info(model: str | os.PathLike) -> dict:
    """The metadata saved next to a model by `train_classifier`, or {} for a model trained elsewhere."""
    p = metrics_path(model)
    if p.is_file():
        with open(p, encoding="utf-8") as f:
            return json.load(f)
    return {}


def fold_model(src: str | os.PathLike, dst: str | os.PathLike, positive_label: str) -> bool:
    """Write the dim-1 folded equivalent of the two-label fastText model `src` to `dst` (atomically).

    Returns False (and writes nothing) when the model cannot be folded: quantized, hierarchical softmax or
    negative sampling loss, or not exactly two labels.
    """
    ft = _fasttext()
    model = ft.load_model(str(src))
    labels = model.get_labels()
    loss = str(model.f.getArgs().loss).rsplit(".", 1)[-1]
    if model.is_quantized() or loss not in ("softmax", "ova") or len(labels) != 2 or positive_label not in labels:
        return False
    wi = model.get_input_matrix()
    wo = model.get_output_matrix().astype(np.float64)
    ipos = labels.index(positive_label)
    direction = wo[ipos] - wo[1 - ipos] if loss == "softmax" else wo[ipos]
    folded = (wi @ direction).astype(np.float32)
    rows, dim = wi.shape
    out_rows = np.zeros((len(labels), 1), dtype=np.float32)
    out_rows[ipos, 0] = 1.0
    # File layout: magic, version, args (dim first), dictionary, then the two matrices at the end.
    tail = 1 + 16 + rows * dim * 4 + 1 + 16 + len(labels) * dim * 4
    size = Path(src).stat().st_size
    with open(src, "rb") as f:
        head = bytearray(f.read(size - tail))
        flag = f.read(1)
        m, n = struct.unpack("<qq", f.read(16))
    magic, _version, file_dim = struct.unpack("<iii", head[:12])
    if magic != _MAGIC or file_dim != dim or flag != b"\x00" or (m, n) != (rows, dim):
        return False
    head[8:12] = struct.pack("<i", 1)
    with atomic_path(dst) as tmp, open(tmp, "wb") as f:
        f.write(head)
        f.write(b"\x00" + struct.pack("<qq", rows, 1) + folded.tobytes())
        f.write(b"\x00" + struct.pack("<qq", len(labels), 1) + out_rows.tobytes())
    return True


class Scorer:
    """P(positive) for documents under a fastText model (a folded one is used as is)."""

    def __init__(self, model: str | os.PathLike, positive_label: str | None = None, fold: bool = True,
                 tokenizer: str | os.PathLike | None = None):
        """`tokenizer`: the subword tokenizer the model was trained with; default: from the model's metadata
        (a copy of a model without its metadata, such as a folded one, needs it passed)."""
        ft = _fasttext()
        path = Path(model)
        if not path.is_file():
            raise FileNotFoundError(f"model not found: {path}")
        info = read_model_info(path)
        self.positive_label = positive_label or info.get("positive_label") or POSITIVE_LABEL
        self.folded = False
        if fold:
            # fastText reads the whole file into memory, so the folded copy can go right after loading.
            with tempfile.TemporaryDirectory(prefix="cpm4-scorer-") as td:
                folded = Path(td) / "folded.bin"
                self.folded = fold_model(path, folded, self.positive_label)
                self.model = ft.load_model(str(folded if self.folded else path))
        else:
            self.model = ft.load_model(str(path))
        labels = self.model.get_labels()
        if self.positive_label not in labels:
            raise ValueError(f"{model}: label {self.positive_label!r} not among the model's labels {labels}")
        self._ipos = labels.index(self.positive_label)
        self.path = path
        tok = info.get("tokenizer")
        self.preprocess = Preprocess(tokenizer if tokenizer is not None else path.with_name(tok) if tok else None)

    def score_normalized(self, lines: Sequence[str]) -> np.ndarray:
        """Scores for texts already through `Preprocess` (single lines)."""
        if not lines:
            return np.zeros(0)
        labels, probs = self.model.f.multilinePredict([t + "\n" for t in lines], -1, 0.0, "strict")
        pos = self.positive_label
        out = np.fromiter((p[lab.index(pos)] if pos in lab else 0.0 for lab, p in zip(labels, probs)),
                          dtype=np.float64, count=len(lines))
        return np.clip(out - _FASTTEXT_LOG_EPS, 0.0, 1.0)

    def score(self, texts: Sequence[str]) -> np.ndarray:
        """P(positive) for raw documents: `normalize` (+ subword pieces if trained so) then fastText."""
        return self.score_normalized(self.preprocess(texts))
