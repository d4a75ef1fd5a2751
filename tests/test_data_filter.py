import argparse
import gzip
import json
import os
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

fasttext = pytest.importorskip("fasttext")
pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

from cpm4.data.classifier import POSITIVE_LABEL, Scorer, TrainConfig, train_classifier  # noqa: E402
from cpm4.data.cli import add_data_commands  # noqa: E402
from cpm4.data.filter import SimulatedCrash, filter_documents  # noqa: E402
from cpm4.data.normalize import normalize  # noqa: E402
from cpm4.data.synthetic import make_corpus, mixed_docs, write_jsonl  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root = tmp_path_factory.mktemp("filter-model")
    corpus = make_corpus(root, n_pos=400, n_neg=(200, 200))
    out = root / "quality.bin"
    train_classifier(corpus["positive"], corpus["negative"], out, TrainConfig(bucket=20_000, epoch=10, lr=0.5),
                     log=lambda m: None)
    return out


def raw_scores(model_path, texts):
    m = fasttext.load_model(str(model_path))
    res = []
    for t in texts:
        labels, probs = m.predict(normalize(t), k=-1)
        res.append(dict(zip(labels, probs))[POSITIVE_LABEL] - 1e-5)
    return np.array(res)


def make_shards(root: Path, n_shards=5, per=60, seed=0) -> Path:
    docs = mixed_docs(n_shards * per, seed=seed)
    for i in range(n_shards):
        write_jsonl(root / f"shard-{i}.jsonl", docs[i * per:(i + 1) * per])
    return root


def read_jsonl_dir(d: Path) -> list[dict]:
    return [json.loads(x) for f in sorted(d.glob("part-*.jsonl")) for x in f.read_text().splitlines()]


def visible(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if not p.name.startswith(("_", ".")))


def test_keeps_exactly_the_documents_at_or_above_threshold(model, tmp_path):
    inp = make_shards(tmp_path / "in")
    out = tmp_path / "out"
    rep = filter_documents(inp, out, model, threshold=0.5, workers=1, progress=False)
    lines = [line for f in sorted(inp.glob("*.jsonl")) for line in f.read_bytes().splitlines(keepends=True)]
    texts = [json.loads(x)["text"] for x in lines]
    ref = raw_scores(model, texts)
    assert np.abs(ref - 0.5).min() > 1e-5  # no document sits on the threshold within float noise
    expected = [x for x, s in zip(lines, ref) if s >= 0.5]
    got = [line for f in sorted(out.glob("part-*.jsonl")) for line in f.read_bytes().splitlines(keepends=True)]
    assert got == expected  # same documents, same bytes, same order
    assert 0 < len(got) < len(lines)
    assert visible(out) == [f"part-{i:05d}.jsonl" for i in range(5)]
    # report consistent with the data
    assert rep["docs_in"] == len(lines) and rep["docs_out"] == len(expected)
    assert rep["kept_share"] == pytest.approx(len(expected) / len(lines))
    assert rep["bytes_in"] == sum(len(x) for x in lines)
    assert rep["bytes_out"] == sum(f.stat().st_size for f in out.glob("part-*"))
    assert rep["text_bytes_in"] == sum(len(t.encode()) for t in texts)
    assert sum(rep["score_histogram"]["counts"]) == len(lines)
    hist_ref = np.histogram(np.clip(ref, 0, 1), bins=100, range=(0, 1))[0]
    assert np.abs(np.array(rep["score_histogram"]["counts"]) - hist_ref).sum() <= 2  # bin edges vs float noise
    assert rep["partitions"] == rep["partitions_processed"] == 5 and rep["partitions_skipped"] == 0
    assert rep["docs_per_s"] > 0 and rep["mb_per_s"] > 0
    assert json.loads((out / "_report.json").read_text()) == json.loads(json.dumps(rep))
    assert (out / "_score_hist.png").read_bytes()[:8] == PNG
    assert (out / "_SUCCESS").exists() and not (out / "_tmp").exists()
    # thresholds 0 and 1 are the edges
    assert filter_documents(inp, tmp_path / "all", model, threshold=0.0, workers=1, progress=False)["docs_out"] \
        == len(lines)


def test_parquet_round_trip_with_scores(model, tmp_path):
    docs = mixed_docs(150, seed=5)
    inp = tmp_path / "pq"
    inp.mkdir()
    for i in range(2):
        part = docs[i * 75:(i + 1) * 75]
        table = pa.table({"id": list(range(i * 75, (i + 1) * 75)), "text": part,
                          "meta": [{"src": f"s{i}", "len": len(t)} for t in part]})
        pq.write_table(table, inp / f"p{i}.parquet", row_group_size=20)
    out = tmp_path / "out"
    rep = filter_documents(inp, out, model, threshold=0.4, score_field="score", batch_size=16, workers=2,
                           progress=False)
    ref = raw_scores(model, docs)
    got = pa.concat_tables([pq.read_table(f) for f in sorted(out.glob("part-*.parquet"))])
    src = pa.concat_tables([pq.read_table(f) for f in sorted(inp.glob("*.parquet"))])
    assert got.schema.names == ["id", "text", "meta", "score"]
    assert got.schema.field("meta").type == src.schema.field("meta").type
    keep = ref >= 0.4
    assert got.drop_columns(["score"]).to_pylist() == src.filter(pa.array(keep)).to_pylist()
    np.testing.assert_allclose(got.column("score").to_numpy(), ref[keep], atol=2e-6)
    assert rep["docs_in"] == 150 and rep["docs_out"] == int(keep.sum())


def test_jsonl_score_field_and_gzip_input(model, tmp_path):
    docs = mixed_docs(40, seed=7)
    inp = tmp_path / "in"
    inp.mkdir()
    with gzip.open(inp / "a.jsonl.gz", "wt", encoding="utf-8") as f:
        for i, d in enumerate(docs):
            f.write(json.dumps({"id": i, "text": d}) + "\n")
    (inp / "_ignored.jsonl").write_text("not json\n")  # '_' and '.' names are not inputs
    (inp / ".hidden.jsonl").write_text("not json\n")
    out = tmp_path / "out"
    filter_documents(inp, out, model, score_field="q", workers=1, progress=False)
    rows = read_jsonl_dir(out)
    ref = raw_scores(model, docs)
    assert [r["id"] for r in rows] == [i for i, s in enumerate(ref) if s >= 0.5]
    for r in rows:
        assert r["q"] == pytest.approx(ref[r["id"]], abs=2e-6) and r["text"] == docs[r["id"]]


def test_batch_size_is_honoured(model, tmp_path, monkeypatch):
    inp = make_shards(tmp_path / "in", n_shards=2, per=50)
    sizes = []
    orig = Scorer.score

    def spy(self, texts):
        sizes.append(len(texts))
        return orig(self, texts)

    monkeypatch.setattr(Scorer, "score", spy)
    filter_documents(inp, tmp_path / "out", model, batch_size=7, workers=1, progress=False)
    assert sizes and max(sizes) <= 7 and sum(sizes) == 100


def test_memory_is_bounded_by_the_batch(model, tmp_path, monkeypatch):
    big = write_jsonl(tmp_path / "in" / "big.jsonl", mixed_docs(600, seed=3) * 10)  # ~1.9 MB, one partition
    size = big.stat().st_size
    assert size > 1_500_000
    current = []
    orig = Scorer.score

    def spy(self, texts):
        current.append(tracemalloc.get_traced_memory()[0])
        return orig(self, texts)

    monkeypatch.setattr(Scorer, "score", spy)
    tracemalloc.start()
    try:
        filter_documents(big, tmp_path / "out", model, batch_size=32, workers=1, progress=False)
    finally:
        tracemalloc.stop()
    # Python memory while streaming stays flat: no growth with the documents read so far.
    assert len(current) == 6000 // 32 + 1
    assert max(current) - current[0] < size / 10, (max(current) - current[0], size)


def test_split_partitions_equal_whole_file(model, tmp_path):
    docs = mixed_docs(300, seed=11)
    f = write_jsonl(tmp_path / "in" / "one.jsonl", docs)
    whole = tmp_path / "whole"
    filter_documents(f, whole, model, split_bytes=None, workers=1, progress=False)
    split = tmp_path / "split"
    rep = filter_documents(f, split, model, split_bytes=7_000, workers=2, progress=False)
    assert rep["partitions"] == -(-f.stat().st_size // 7_000) > 5
    assert rep["docs_in"] == 300
    assert b"".join(p.read_bytes() for p in sorted(split.glob("part-*"))) == (whole / "part-00000.jsonl").read_bytes()


def snapshot(out: Path) -> dict:
    done = sorted(p.name.removesuffix(".json") for p in (out / "_done").glob("*.json"))
    return {n: (os.stat(out / n).st_ino, os.stat(out / n).st_mtime_ns,
                os.stat(out / "_done" / f"{n}.json").st_mtime_ns) for n in done}


@pytest.mark.parametrize("workers", [1, 2])
def test_resume_after_crash(model, tmp_path, workers):
    inp = make_shards(tmp_path / "in", n_shards=8, per=80, seed=workers)
    ref = tmp_path / "ref"
    filter_documents(inp, ref, model, workers=workers, progress=False)
    out = tmp_path / "out"
    with pytest.raises(SimulatedCrash):
        filter_documents(inp, out, model, workers=workers, progress=False, crash_after=2)
    before = snapshot(out)
    assert 2 <= len(before) < 8
    assert not (out / "_report.json").exists() and not (out / "_SUCCESS").exists()
    # whatever is visible under a part name is complete (temporary files are hidden in _tmp)
    for name in visible(out):
        assert name.startswith("part-") and (out / name).read_bytes() == (ref / name).read_bytes()
    rep = filter_documents(inp, out, model, workers=workers, progress=False)
    assert rep["partitions_skipped"] == len(before) and rep["partitions_processed"] == 8 - len(before)
    after = snapshot(out)
    for name, st in before.items():
        assert after[name] == st, f"{name} was recomputed"
    assert visible(out) == visible(ref)
    for name in visible(ref):
        assert (out / name).read_bytes() == (ref / name).read_bytes()
    full = json.loads((ref / "_report.json").read_text())
    for k in ("docs_in", "docs_out", "bytes_in", "bytes_out", "text_bytes_in", "score_histogram"):
        assert rep[k] == full[k]
    # a finished run is not redone
    again = filter_documents(inp, out, model, workers=workers, progress=False)
    assert again["partitions_processed"] == 0 and snapshot(out) == after


def test_part_file_without_marker_is_recomputed(model, tmp_path):
    inp = make_shards(tmp_path / "in", n_shards=2, per=20)
    out = tmp_path / "out"
    filter_documents(inp, out, model, workers=1, progress=False)
    good = (out / "part-00001.jsonl").read_bytes()
    (out / "_done" / "part-00001.jsonl.json").unlink()
    (out / "part-00001.jsonl").write_bytes(b"partial garbage")
    rep = filter_documents(inp, out, model, workers=1, progress=False)
    assert rep["partitions_processed"] == 1 and (out / "part-00001.jsonl").read_bytes() == good


def cli(argv):
    p = argparse.ArgumentParser()
    add_data_commands(p.add_subparsers(dest="command", required=True))
    args = p.parse_args(argv)
    return args.func(args)


def test_bad_inputs(model, tmp_path):
    out = str(tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        filter_documents(tmp_path / "nowhere", out, model, progress=False)
    with pytest.raises(FileNotFoundError, match="model not found"):
        filter_documents(tmp_path, out, tmp_path / "no-model.bin", progress=False)
    for t in (-0.1, 1.5):
        with pytest.raises(ValueError, match="threshold must be in"):
            cli(["data", "filter", "-i", str(tmp_path), "-o", out, "-m", str(model), "--threshold", str(t), "-q"])

    bad = tmp_path / "bad"
    write_jsonl(bad / "a.jsonl", ["fine"] * 3)
    (bad / "b.jsonl").write_text('{"text": "ok"}\n\n{"text": "ok"}\n{"text": "broken"\n')
    with pytest.raises(ValueError, match=r"b\.jsonl:4: malformed JSON"):
        filter_documents(bad, tmp_path / "o1", model, workers=2, progress=False)
    assert visible(tmp_path / "o1") == ["part-00000.jsonl"] or visible(tmp_path / "o1") == []

    # the line number is right when the bad line is in a later byte range of a split file
    lines = [json.dumps({"text": f"document number {i}"}) for i in range(200)]
    lines[150] = '{"text": "cut'
    (tmp_path / "split.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"split\.jsonl:151: malformed JSON"):
        filter_documents(tmp_path / "split.jsonl", tmp_path / "o2", model, split_bytes=1000, workers=1,
                         progress=False)

    nofield = write_jsonl(tmp_path / "nofield.jsonl", ["a", "b"], field="body")
    with pytest.raises(ValueError, match=r"nofield\.jsonl:1: no field 'text'"):
        filter_documents(nofield, tmp_path / "o3", model, workers=1, progress=False)
    (tmp_path / "notobj.jsonl").write_text('["a"]\n')
    with pytest.raises(ValueError, match=r"notobj\.jsonl:1: expected a JSON object"):
        filter_documents(tmp_path / "notobj.jsonl", tmp_path / "o4", model, workers=1, progress=False)
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "nocol.parquet")
    with pytest.raises(ValueError, match=r"nocol\.parquet: no column 'text'"):
        filter_documents(tmp_path / "nocol.parquet", tmp_path / "o5", model, workers=1, progress=False)
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="unsupported file type"):
        filter_documents(tmp_path / "x.csv", tmp_path / "o6", model, progress=False)


def test_output_directory_guards(model, tmp_path):
    inp = make_shards(tmp_path / "in", n_shards=1, per=10)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty"):
        filter_documents(inp, foreign, model, progress=False)
    out = tmp_path / "out"
    filter_documents(inp, out, model, workers=1, progress=False)
    with pytest.raises(ValueError, match="different settings"):
        filter_documents(inp, out, model, threshold=0.7, workers=1, progress=False)
    rep = filter_documents(inp, out, model, threshold=0.7, workers=1, progress=False, overwrite=True)
    assert rep["threshold"] == 0.7 and rep["partitions_processed"] == 1
    with pytest.raises(ValueError, match="must not contain the input"):
        filter_documents(inp, inp / "filtered", model, progress=False)


def test_cli_filter(model, tmp_path, capsys):
    inp = make_shards(tmp_path / "in", n_shards=2, per=20)
    out = tmp_path / "out"
    assert cli(["data", "filter", "-i", str(inp), "-o", str(out), "-m", str(model), "--workers", "1"]) == 0
    assert "kept" in capsys.readouterr().err
    assert json.loads((out / "_report.json").read_text())["docs_in"] == 40
