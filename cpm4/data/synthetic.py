"""A small synthetic corpus with separable "good" and "bad" documents, for tests and smoke runs."""

from __future__ import annotations

import json
import random
from pathlib import Path

_COMMON = "the a of and to in is that it for on with as by this be are from at or".split()
_GOOD = ("theorem proof lemma derivative integral equation photosynthesis molecule enzyme chapter exercise "
         "definition example hypothesis experiment evidence analysis algorithm complexity matrix vector "
         "historian century empire treaty literature poem grammar vocabulary student lesson textbook "
         "geometry triangle probability statistics variance theory observation measurement energy velocity "
         "élève théorème naïve café résumé").split()
_BAD = ("click buy cheap discount casino bonus winner free offer limited subscribe login password viagra "
        "deal sale hurry prize lottery cash loan crypto follow like share giveaway promo coupon unlock "
        "hot sexy celebrity gossip shocking viral trending ad sponsored cookie banner newsletter spam "
        "FREE BUY NOW WIN").split()


def make_doc(rng: random.Random, good: bool, noise: float = 0.1) -> str:
    """One document: sentences mixing common words with class words (a share `noise` from the other class)."""
    own, other = (_GOOD, _BAD) if good else (_BAD, _GOOD)
    lines = []
    for _ in range(rng.randint(2, 6)):
        words = []
        for _ in range(rng.randint(6, 14)):
            r = rng.random()
            pool = _COMMON if r < 0.4 else (other if r < 0.4 + noise else own)
            words.append(rng.choice(pool))
        sep = rng.choice([" ", " ", " ", "  ", "\t"])
        lines.append(sep.join(words).capitalize() + ".")
    return rng.choice(["\n", "\n\n", "\n\n\n", "\r\n"]).join(lines)


def write_jsonl(path: str | Path, docs: list[str], field: str = "text", extra: bool = True) -> Path:
    """Write `docs` as JSONL objects (with an id and a nested field when `extra`) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for i, d in enumerate(docs):
            obj = {"id": f"{path.stem}-{i}", field: d, "meta": {"n": i}} if extra else {field: d}
            f.write(json.dumps(obj, ensure_ascii=False) + "\n")
    return path


def make_corpus(root: str | Path, n_pos: int = 400, n_neg: tuple[int, ...] = (300, 300, 300),
                seed: int = 0, noise: float = 0.1) -> dict[str, list[Path]]:
    """positive.jsonl and negative-<i>.jsonl files under `root`."""
    rng = random.Random(seed)
    root = Path(root)
    pos = write_jsonl(root / "positive.jsonl", [make_doc(rng, True, noise) for _ in range(n_pos)])
    negs = [write_jsonl(root / f"negative-{i}.jsonl", [make_doc(rng, False, noise) for _ in range(n)])
            for i, n in enumerate(n_neg)]
    return {"positive": [pos], "negative": negs}


def mixed_docs(n: int, seed: int = 1, noise: float = 0.3) -> list[str]:
    """`n` documents, half good and half bad, with more noise so that scores spread over [0, 1]."""
    rng = random.Random(seed)
    return [make_doc(rng, i % 2 == 0, noise) for i in range(n)]
