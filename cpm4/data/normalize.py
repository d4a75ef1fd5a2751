"""UltraClean text preprocessing: what the quality classifier sees.

`normalize(text)` returns one line of whitespace-separated tokens:

* Unicode: compatibility decomposition (NFKD: full-width forms, ligatures, super/subscripts become plain
  characters), lowercase, combining diacritical marks removed (``é`` -> ``e``), then NFC so that scripts which
  need composition (Hangul) come back whole. Only the diacritic blocks are stripped, not every combining mark,
  because Indic and Thai vowel signs are letters, not accents. Lowercasing applies to every cased script; for
  English that is the paper's "lowercase English", other cased scripts are rare in the target data.
* Whitespace: runs of spaces collapse; a run of horizontal whitespace that holds a tab becomes one tab;
  trailing tabs on a line go; lines holding only whitespace are blank and a run of blank lines becomes one;
  whitespace at the ends of the document goes. Other control characters become spaces, vertical separators
  (form feed, vertical tab, U+2028/2029/0085) become newlines, invisible format characters (zero-width space,
  BOM, soft hyphen) are removed.
* Structure: newline, tab and carriage return survive as the tokens ``\\n``, ``\\t``, ``\\r`` (a backslash and a
  letter) because fastText splits on all whitespace and would otherwise lose them.

The function is idempotent: its output contains no raw whitespace other than single spaces.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Iterator

NEWLINE_TOKEN = "\\n"
TAB_TOKEN = "\\t"
CR_TOKEN = "\\r"

# Combining diacritical marks (U+0300-036F and its supplements); see the module docstring for why not all of Mn.
_DIACRITICS = re.compile("[\u0300-\u036f\u1ab0-\u1aff\u1dc0-\u1dff\u20d0-\u20ff\ufe20-\ufe2f]+")
_INVISIBLE = re.compile("[\u00ad\u200b\u2060\ufeff]+")
_VERTICAL = re.compile("[\x0b\x0c\x1c-\x1e\x85\u2028\u2029]")
_CONTROL = re.compile("[\x00-\x08\x0e-\x1b\x1f\x7f]")
_ANY_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
# Unicode whitespace other than space, tab, newline, carriage return (no-break space, ideographic space, ...).
_OTHER_SPACE = re.compile(r"[^\S \t\n\r]")
_TRAILING_TAB = re.compile(r"\t[ \t]*(?=[\r\n]|\Z)")
_TAB_RUN = re.compile(r"\t[ \t]*")
_BLANK_LINES = re.compile(r"\n(?:[ \t\r]*\n)+")


def _fold_unicode(text: str) -> str:
    text = unicodedata.normalize("NFKD", text).lower()
    # lower() can create new decomposable characters (e.g. U+0130 -> i + U+0307), so decompose again.
    text = unicodedata.normalize("NFKD", text)
    text = _DIACRITICS.sub("", text)
    text = unicodedata.normalize("NFC", text)
    # NFC can recreate a few characters that lower() maps further; lowering once more makes this a fixpoint.
    text = text.lower()
    text = _INVISIBLE.sub("", text)
    text = _VERTICAL.sub("\n", text)
    return _OTHER_SPACE.sub(" ", text)


def normalize(text: str) -> str:
    """UltraClean preprocessing of one document into a single line of tokens for fastText."""
    if text.isascii():  # O(1) in CPython; most web text takes this fast path
        text = text.lower()
        if _ANY_CONTROL.search(text):
            text = _CONTROL.sub(" ", _VERTICAL.sub("\n", text))
    else:
        text = _fold_unicode(text)
        text = _CONTROL.sub(" ", text)
    text = _TRAILING_TAB.sub("", text)
    text = _TAB_RUN.sub("\t", text)
    text = _BLANK_LINES.sub("\n\n", text).strip()
    text = text.replace("\t", f" {TAB_TOKEN} ").replace("\r", f" {CR_TOKEN} ").replace("\n", f" {NEWLINE_TOKEN} ")
    # Splitting on any whitespace collapses space runs and trims both ends in one C-level pass.
    return " ".join(text.split())


def normalize_many(texts: Iterable[str]) -> Iterator[str]:
    """`normalize` over an iterable, lazily."""
    for t in texts:
        yield normalize(t)


def normalize_jsonl(src: str, dst: str, text_field: str = "text", output_field: str | None = None) -> int:
    """Normalize the `text_field` of every JSON object in the JSONL file `src` (or '-' for stdin) into
    `output_field` (default: in place), writing JSONL to `dst` ('-' for stdout; a file is written atomically).
    Returns the number of documents."""
    import gzip
    import json
    import sys
    from pathlib import Path

    from .io import DataError, Partition, atomic_path, file_format, iter_jsonl_batches

    out_field = output_field or text_field

    def records():
        if src == "-":
            for i, line in enumerate(sys.stdin.buffer, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except ValueError as e:
                    raise DataError(f"<stdin>:{i}: malformed JSON ({e})") from None
                if not isinstance(obj, dict) or not isinstance(obj.get(text_field), str):
                    raise DataError(f"<stdin>:{i}: expected a JSON object with a string field {text_field!r}")
                yield obj
            return
        p = Path(src)
        if not p.is_file():
            raise FileNotFoundError(f"input not found: {p}")
        fmt = file_format(p)
        if fmt == "parquet":
            raise ValueError(f"{p}: normalize reads JSONL")
        for b in iter_jsonl_batches(Partition(0, str(p), fmt), text_field, 1024):
            yield from b.records

    def write(f) -> int:
        n = 0
        for obj in records():
            obj[out_field] = normalize(obj[text_field])
            f.write(json.dumps(obj, ensure_ascii=False) + "\n")
            n += 1
        return n

    if dst == "-":
        return write(sys.stdout)
    name = dst.lower()
    if name.endswith((".parquet", ".pq")):
        raise ValueError(f"{dst}: normalize writes JSONL (.jsonl, or .jsonl.gz compressed)")
    Path(dst).parent.mkdir(parents=True, exist_ok=True)
    # A .gz name is written compressed (it was plain JSONL under that name, which the readers then refused).
    opener = gzip.open if name.endswith(".gz") else open
    with atomic_path(dst) as tmp, opener(tmp, "wt", encoding="utf-8") as f:
        return write(f)
