import argparse
import json
import random

import pytest

from cpm4.data.cli import add_data_commands
from cpm4.data.normalize import normalize, normalize_jsonl

CASES = [
    # diacritics and case
    ("Héllo  Wörld", "hello world"),
    ("Ça va? NAÏVE café", "ca va? naive cafe"),
    ("Ångström x²", "angstrom x2"),
    ("İstanbul", "istanbul"),
    ("ＡＢＣ１２３ ﬁne", "abc123 fine"),
    # scripts whose marks are not diacritics are kept; other cased scripts are lowercased
    ("한국어 中文 ΑΘΗΝΑ Ἀθῆναι", "한국어 中文 αθηνα αθηναι"),
    ("हिन्दी", "हिन्दी"),
    # blank lines and whitespace
    ("Line one\n\n\n\nLine two", "line one \\n \\n line two"),
    ("p1\n  \n\t\n \r\np2", "p1 \\n \\n p2"),
    ("\n\n  Hello\n\n", "hello"),
    ("a\u00a0\u3000b", "a b"),
    ("zero\u200bwidth", "zerowidth"),
    ("", ""),
    ("   \n\t ", ""),
    # structure tokens
    ("a\tb", "a \\t b"),
    ("a \t \t b", "a \\t b"),
    ("end\t\n", "end"),
    ("x\t \ny", "x \\n y"),
    ("a\r\nb", "a \\r \\n b"),
    ("a\rb", "a \\r b"),
    ("a\u2028b", "a \\n b"),
    ("a\x0cb", "a \\n b"),
    ("a\x00b", "a b"),
    ("first\n\tindented code", "first \\n \\t indented code"),
]


@pytest.mark.parametrize("text,expected", CASES)
def test_normalize_expected(text, expected):
    assert normalize(text) == expected


@pytest.mark.parametrize("text,expected", CASES)
def test_normalize_idempotent_on_cases(text, expected):
    assert normalize(expected) == expected


def test_normalize_idempotent_random():
    rng = random.Random(0)
    alphabet = [chr(rng.randrange(0x20, 0x3000)) for _ in range(2000)] + list(" \t\n\r\x0b\x0c\u00a0") * 40
    for _ in range(3000):
        s = "".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 40)))
        once = normalize(s)
        assert normalize(once) == once, repr(s)


def test_output_is_one_line_of_single_space_separated_tokens():
    out = normalize("Title\n\n\n  Body\twith\r\n\ttabs  and   spaces\u3000here \x0b")
    assert "\n" not in out and "\t" not in out and "\r" not in out
    assert "  " not in out and out == out.strip()
    assert out.split(" ") == ["title", "\\n", "\\n", "body", "\\t", "with", "\\r", "\\n", "\\t", "tabs", "and",
                              "spaces", "here"]


def _cli(argv):
    p = argparse.ArgumentParser()
    add_data_commands(p.add_subparsers(dest="command", required=True))
    args = p.parse_args(argv)
    return args.func(args)


def test_normalize_jsonl_command(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"id": 1, "body": "Café\n\nOK"}) + "\n\n" + json.dumps({"id": 2, "body": "X\tY"}) + "\n")
    dst = tmp_path / "out" / "norm.jsonl"
    assert _cli(["data", "normalize", "-i", str(src), "-o", str(dst), "--field", "body", "--output-field", "n"]) == 0
    rows = [json.loads(x) for x in dst.read_text().splitlines()]
    assert rows == [{"id": 1, "body": "Café\n\nOK", "n": "cafe \\n \\n ok"}, {"id": 2, "body": "X\tY", "n": "x \\t y"}]
    assert [p.name for p in dst.parent.iterdir()] == ["norm.jsonl"]  # no temporary file left
    # A .gz output is compressed (was plain JSONL under a .gz name), and reads back through the pipeline's reader.
    import gzip

    gz = tmp_path / "out" / "norm.jsonl.gz"
    assert _cli(["data", "normalize", "-i", str(src), "-o", str(gz), "--field", "body", "--output-field", "n"]) == 0
    assert gzip.decompress(gz.read_bytes()) == dst.read_bytes()
    assert _cli(["data", "normalize", "-i", str(gz), "-o", str(tmp_path / "again.jsonl"), "--field", "n"]) == 0
    with pytest.raises(ValueError, match="normalize writes JSONL"):
        normalize_jsonl(str(src), str(tmp_path / "o.parquet"), text_field="body")


def test_normalize_jsonl_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        normalize_jsonl(str(tmp_path / "missing.jsonl"), str(tmp_path / "o.jsonl"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": oops}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: malformed JSON"):
        normalize_jsonl(str(bad), str(tmp_path / "o.jsonl"))
    assert not (tmp_path / "o.jsonl").exists()
