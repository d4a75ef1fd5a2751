"""UltraClean verification and one seed-refinement round, on a tiny model: a mix with junk data must
anneal to a worse held-out loss than a mix with in-distribution data; the round's artefacts and decision."""

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from cpm4.data.verify import MixedDataset, VerifyConfig, format_report, parse_named, verify
from cpm4.model.init import create_checkpoint
from cpm4.model.tokenizer import Tokenizer
from cpm4.train.data import PackedDataset, tokenize_to_shards

ROOT = Path(__file__).resolve().parents[1]
WORDS = ("the kernel maps each page of memory into the process and the scheduler picks the next task when "
         "a timer fires so that every thread gets its share of the processor").split()


def clean_doc(rng: random.Random) -> str:
    # In-distribution text: sentences made of a small vocabulary in a fixed order with small variations.
    out = []
    for _ in range(rng.randint(8, 20)):
        i = rng.randrange(len(WORDS) - 8)
        out.append(" ".join(WORDS[i:i + rng.randint(5, 8)]) + ".")
    return " ".join(out)


JUNK = ("urgency low version bump release 0.1.2-3 fix typo debian changelog maintainer upload closes "
        "bug 12345 standards-version rebuild against new upstream -- copyright (c) all rights reserved").split()


def junk_doc(rng: random.Random) -> str:
    # Changelog-like boilerplate: a different vocabulary in random order.
    return " ".join(rng.choice(JUNK) for _ in range(80))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("verify")
    rng = random.Random(0)
    ckpt = create_checkpoint("tiny", d / "ckpt", seed=0)
    tok = Tokenizer.from_dir(ckpt)

    def shards(name, docs):
        f = d / f"{name}.jsonl"
        f.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
        tokenize_to_shards([f], tok, d / name, progress=False)
        return str(d / name)

    paths = {"base": shards("base", [clean_doc(rng) for _ in range(120)]),
             "good": shards("good", [clean_doc(rng) for _ in range(120)]),
             "junk": shards("junk", [junk_doc(rng) for _ in range(120)]),
             "heldout": shards("heldout", [clean_doc(rng) for _ in range(40)])}
    return d, str(ckpt), paths


def test_mixed_dataset_draws_by_share(world):
    _, _, p = world
    a, b = PackedDataset(p["base"], 32, seed=1, document_masking=False), PackedDataset(p["junk"], 32, seed=2)
    mix = MixedDataset([(a, 0.7), (b, 0.3)], seed=5)
    picks = [mix.source_of(k) for k in range(3000)]
    share = sum(picks) / len(picks)
    assert abs(share - 0.3) < 3 * (0.3 * 0.7 / 3000) ** 0.5
    batch = mix.batch(2, 4)
    for j, k in enumerate(range(8, 12)):
        src = (a, b)[mix.source_of(k)]
        assert batch.input_ids[j].tolist() == src.row(k)[0].tolist()
    assert picks == [MixedDataset([(a, 0.7), (b, 0.3)], seed=5).source_of(k) for k in range(3000)]
    with pytest.raises(ValueError, match="weights"):
        MixedDataset([(a, -1.0)])


@pytest.mark.slow
def test_verify_ranks_junk_below_in_distribution_data(world):
    d, ckpt, p = world
    cfg = VerifyConfig(checkpoint=ckpt, base=p["base"], candidates={"good": p["good"], "junk": p["junk"]},
                       eval_sets={"heldout": p["heldout"]}, out=str(d / "v"), share=0.5, steps=12, batch_size=4,
                       seq_len=64, lr=0.02, seeds=2, eval_rows=None, device="cpu")
    report = verify(cfg, log=lambda m: None)
    pair = report["pairs"]["good - junk"]["heldout"]
    assert pair["delta"] < 0 and pair["seeds"] == 2
    assert report["deltas"]["junk"]["heldout"]["delta"] > 0  # junk in the mix hurts the held-out loss
    saved = json.loads((d / "v" / "report.json").read_text())
    assert saved["losses"]["baseline"][0]["heldout"] == report["losses"]["baseline"][0]["heldout"]
    # Same seed, same result: the comparison is deterministic up to the data seed.
    again = verify(VerifyConfig(**{**cfg.__dict__, "out": str(d / "v2"), "seeds": 1}), log=lambda m: None)
    assert again["losses"]["junk"][0] == report["losses"]["junk"][0]
    table = format_report(report)
    assert "good - junk" in table and "baseline" in table


def test_verify_errors(world, tmp_path):
    _, ckpt, p = world
    base = dict(checkpoint=ckpt, base=p["base"], candidates={"x": p["good"]}, eval_sets={"h": p["heldout"]},
                out=str(tmp_path))
    for bad, msg in (({"share": 0}, "share"), ({"candidates": {}}, "candidate"),
                     ({"candidates": {"baseline": p["good"]}}, "reserved"),
                     ({"base": str(tmp_path / "nope")}, "nope")):
        with pytest.raises((ValueError, FileNotFoundError), match=msg):
            verify(VerifyConfig(**{**base, **bad}))
    assert parse_named(["a=b", "c=d=e"], "x") == {"a": "b", "c": "d=e"}
    with pytest.raises(ValueError, match="NAME=PATH"):
        parse_named(["nameonly"], "--eval")


@pytest.mark.slow
def test_iterate_round_cli(world):
    d, ckpt, p = world
    rng = random.Random(1)
    seeds = d / "seeds"
    seeds.mkdir()
    (seeds / "pos.jsonl").write_text("".join(json.dumps({"text": clean_doc(rng)}) + "\n" for _ in range(80)))
    (seeds / "neg.jsonl").write_text("".join(json.dumps({"text": junk_doc(rng)}) + "\n" for _ in range(80)))
    pool = [clean_doc(rng) for _ in range(60)] + [junk_doc(rng) for _ in range(60)]
    (seeds / "pool.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in pool))
    out = d / "round-1"
    cmd = [sys.executable, "-m", "cpm4.cli", "data", "iterate", "--checkpoint", ckpt, "--base", p["base"],
           "--eval", f"heldout={p['heldout']}", "--positive", seeds / "pos.jsonl", "--negative", seeds / "neg.jsonl",
           "--pool", seeds / "pool.jsonl", "--output", out, "--steps", "12", "--batch-size", "4", "--seq-len", "64",
           "--lr", "0.02", "--seeds", "2", "--eval-rows", "0", "--share", "0.5", "--min-count", "1", "--epoch", "30",
           "--admit", "10", "--confident", "0.6", "--device", "cpu"]
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((out / "round.json").read_text())
    assert summary["pool_documents"] == 120 and 0 < summary["kept"] < 120
    kept = [json.loads(x)["text"] for x in (out / "kept.jsonl").read_text().splitlines()]
    assert sum(t in pool[:60] for t in kept) >= 0.9 * len(kept)  # the classifier keeps the clean documents
    assert summary["filtered_helps"] is True
    assert summary["admitted_positives"] > 0
    n_pos = len((out / "positive.jsonl").read_text().splitlines())
    assert n_pos == 80 + summary["admitted_positives"]
    assert (out / "classifier.bin").is_file() and (out / "verify" / "report.json").is_file()
    assert "round done" in r.stdout
