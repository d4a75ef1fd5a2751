"""The benchmarks' small tools that run off the GPU: `ab_summary.py` (an A/B run's sides in one table) and
`batched_decode.py`'s variant names and set-up (its kernels' values are the test suite's; here, that the state it
builds is the cache its peer reads)."""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))

import ab_summary  # noqa: E402
import batched_decode  # noqa: E402


def _run(folder, name, tok_s, p50s, mtime):
    os.makedirs(folder / name)
    steps = {f"decode <={b}": {"p50_ms": v} for b, v in p50s.items()}
    path = folder / name / "serving-minicpm4-0.5b-2026-12-03.json"
    path.write_text(json.dumps({"device": "x", "rows": [
        {"phase": "decode.batch1", "output_tok_s": 1.0},
        {"phase": "offline.256", "output_tok_s": tok_s, "preempted": 0, "steps": steps}]}))
    os.utime(path, (mtime, mtime))


def test_ab_summary_table(tmp_path, capsys, monkeypatch):
    _run(tmp_path, "new1", 51402.2, {"064": 1.613, "256": 2.499}, 2000)
    _run(tmp_path, "7514bc51", 57618.3, {"064": 1.557, "128": 1.707, "256": 2.189}, 1000)
    found = ab_summary.rows(str(tmp_path))
    assert [r["run"] for r in found] == ["7514bc51", "new1"]  # in the order they ran
    monkeypatch.setattr(sys, "argv", ["ab_summary.py", str(tmp_path)])
    ab_summary.main()
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split() == ["7514bc51", "57618", "0", "1.557", "1.707", "2.189"]
    assert lines[2].split() == ["new1", "51402", "0", "1.613", "2.499"]  # no <=128 bucket: an empty cell
    monkeypatch.setattr(sys, "argv", ["ab_summary.py", str(tmp_path / "none")])
    with pytest.raises(SystemExit, match="no serving JSON"):
        ab_summary.main()


def test_batched_decode_variants_and_state():
    v = batched_decode.parse_variant("apart.tile1.w8.s2.sp4.lastmerge")
    assert v == {"base": "apart", "tile": 1, "warps": 8, "stages": 2, "peel": False, "splits": 4, "merge": False}
    assert batched_decode.parse_variant("fused.peel")["peel"]
    for bad in ("x", "apart.peel", "apart.tile0", "fused.w"):
        with pytest.raises(ValueError, match="variant"):
            batched_decode.parse_variant(bad)
    for name in batched_decode.VARIANTS:
        batched_decode.parse_variant(name)
    s = batched_decode.state(3, 70, 4, 2, 16, device="cpu", dtype=torch.float32)
    # every token but the current one in the pages the table names; the current one at its slot after a store
    kc = s["kc"].view(-1, 2, 16)
    for r in range(3):
        slots = [int(s["table"][r, t // 64]) * 64 + t % 64 for t in range(69)]
        assert torch.equal(kc[slots], s["k"][r].transpose(0, 1)[:69])
        assert int(s["slots"][r]) == int(s["table"][r, 69 // 64]) * 64 + 69 % 64
        assert torch.equal(s["nk"][r], s["k"][r, :, 69])
