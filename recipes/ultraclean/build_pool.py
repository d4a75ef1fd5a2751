"""Seed pools and a candidate pool for the UltraClean demonstration, from this machine's files.

Clean documents come from the demo corpus (build/demo/corpus/train.jsonl: Python docs, kernel docs, KJV).
Low-quality documents come from /usr/share/doc: Debian changelogs, licence/copyright texts and NEWS files
(shipped by every package), plus generated boilerplate (templated filler text, seeded). Seeds and pool are
disjoint; every choice is seeded, writes are atomic.

    python recipes/ultraclean/build_pool.py --corpus build/demo/corpus/train.jsonl --out build/ultraclean
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
from pathlib import Path

FILLER = ["Click here to learn more about our amazing offers", "Subscribe now and never miss an update",
          "This page was automatically generated", "All rights reserved", "Terms and conditions apply",
          "Best price guaranteed", "Follow us on social media", "Lorem ipsum dolor sit amet",
          "Download the free trial today", "Limited time only", "Read more", "Sign up for our newsletter",
          "Your cart is empty", "Customers who viewed this also viewed", "Page 1 of 27", "Home | About | Contact"]


def machine_junk(doc_root: Path, rng: random.Random, limit: int) -> list[str]:
    files = sorted(p for pat in ("changelog*", "copyright", "NEWS*") for p in doc_root.glob(f"*/{pat}") if p.is_file())
    rng.shuffle(files)
    out = []
    for f in files:
        try:
            raw = gzip.decompress(f.read_bytes()) if f.suffix == ".gz" else f.read_bytes()
        except (OSError, EOFError):
            continue
        text = raw.decode("utf-8", errors="replace")[:20000].strip()
        if len(text) > 500:
            out.append(text)
        if len(out) >= limit:
            break
    return out


def boilerplate(rng: random.Random, n: int) -> list[str]:
    return [" ".join(rng.choice(FILLER) + rng.choice([".", "!", " >>", " |"]) for _ in range(rng.randint(40, 200)))
            for _ in range(n)]


def write_jsonl(path: Path, texts: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({"text": t}, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", required=True, help="clean documents (JSONL with a text field)")
    ap.add_argument("--doc-root", default="/usr/share/doc")
    ap.add_argument("--out", required=True)
    ap.add_argument("--seeds", type=int, default=400, help="documents per seed pool")
    ap.add_argument("--pool", type=int, default=800, help="clean and low-quality documents each in the pool")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    corpus = Path(args.corpus)
    if not corpus.is_file():
        raise SystemExit(f"build_pool.py: error: corpus not found: {corpus}")
    clean = [json.loads(line)["text"] for line in open(corpus, encoding="utf-8") if line.strip()]
    clean = [t[:20000] for t in clean if len(t) > 500]
    rng.shuffle(clean)
    n_machine = int(0.75 * (args.seeds + args.pool))
    junk = machine_junk(Path(args.doc_root), rng, n_machine)
    junk += boilerplate(rng, args.seeds + args.pool - len(junk))  # the rest: generated filler
    rng.shuffle(junk)
    need = args.seeds + args.pool
    if len(clean) < need or len(junk) < need:
        raise SystemExit(f"build_pool.py: error: need {need} documents of each kind, have {len(clean)} clean "
                         f"and {len(junk)} low-quality")
    out = Path(args.out)
    write_jsonl(out / "seed_positive.jsonl", clean[:args.seeds])
    write_jsonl(out / "seed_negative.jsonl", junk[:args.seeds])
    pool = clean[args.seeds:need] + junk[args.seeds:need]
    labels = [1] * args.pool + [0] * args.pool
    order = list(range(len(pool)))
    rng.shuffle(order)
    write_jsonl(out / "pool.jsonl", [pool[i] for i in order])
    tmp = out / "pool_labels.json.tmp"
    tmp.write_text(json.dumps([labels[i] for i in order]))
    os.replace(tmp, out / "pool_labels.json")
    n_files = min(n_machine, need)
    print(f"seeds: {args.seeds} positive, {args.seeds} negative; pool: {args.pool} clean + {args.pool} low-quality "
          f"(up to {n_files} low-quality documents from {args.doc_root}, the rest generated) -> {out}")


if __name__ == "__main__":
    main()
