"""Shared by the benchmark scripts: writing their JSON."""

from __future__ import annotations

import json
import os


def write_json(doc: dict, name: str, out: str) -> None:
    """Write `doc` as `out/name` atomically (temporary file, then rename), and also under $OUT when set (the
    device machine's folder that comes back)."""
    for folder in [out] + ([os.environ["OUT"]] if os.environ.get("OUT") else []):
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, name)
        with open(path + ".tmp", "w") as f:
            json.dump(doc, f, indent=1)
        os.replace(path + ".tmp", path)
        print(f"wrote {path}")
