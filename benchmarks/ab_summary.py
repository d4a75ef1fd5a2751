"""The table of an `ab_serving.sh run`: each side's offline row (output tok/s, preemptions) and the median step time
of its decode buckets in the timed (untraced) run, from the JSON each run wrote under OUT/<side><i>/.

    python3 benchmarks/ab_summary.py OUT [--buckets 064 128 256]
"""

from __future__ import annotations

import argparse
import glob
import json
import os


def rows(out: str) -> list[dict]:
    """One entry per run folder holding a serving JSON with an offline row, in the folders' time order."""
    found = []
    for path in sorted(glob.glob(os.path.join(out, "*", "serving-*.json")), key=os.path.getmtime):
        with open(path) as f:
            doc = json.load(f)
        for r in doc.get("rows", []):
            if str(r.get("phase", "")).startswith("offline."):
                found.append({"run": os.path.basename(os.path.dirname(path)), "tok_s": r.get("output_tok_s"),
                              "preempted": r.get("preempted"), "steps": r.get("steps") or {}})
    return found


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", help="the folder ab_serving.sh wrote its runs under ($OUT on the device)")
    ap.add_argument("--buckets", nargs="+", default=["064", "128", "256"],
                    help="decode buckets (rows, zero-padded as the trace names them) whose p50 step ms to show")
    args = ap.parse_args()
    found = rows(args.out)
    if not found:
        raise SystemExit(f"no serving JSON with an offline row under {args.out}/*/")
    head = f"{'run':>14s} {'tok/s':>9s} {'preempt':>7s} " + " ".join(f"{'<=' + b + ' ms':>10s}" for b in args.buckets)
    print(head)
    for r in found:
        cells = []
        for b in args.buckets:
            st = r["steps"].get(f"decode <={b}")
            cells.append(f"{st['p50_ms']:10.3f}" if st else f"{'':>10s}")
        tok = f"{r['tok_s']:9.0f}" if r["tok_s"] is not None else f"{'':>9s}"
        print(f"{r['run']:>14s} {tok} {str(r['preempted']):>7s} " + " ".join(cells))


if __name__ == "__main__":
    main()
