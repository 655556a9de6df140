"""Prose structure (plain text, Markdown, reStructuredText) and link extraction.

Structure handed to `Packer` (`hades_gpu.documents.packing`):

- top-level spans are paragraphs (text between blank lines; each starts at its first non-blank
  character). In Markdown, ATX (``# Title``) and setext (``Title`` over ``===``/``---``) headings,
  and in reStructuredText, section titles (a line under, or between, ``===``-style adornments) also
  start a span, flagged as a section start, so a heading opens a new chunk where possible.
  Headings inside fenced code blocks are ignored;
- a paragraph too long for one chunk splits into sentences (after ``.``, ``!``, ``?`` and closing
  quotes/brackets plus whitespace; after CJK full stops), a sentence into lines, a line into
  token windows cut before words. Windows of one split paragraph overlap (see `packing`).
"""

from __future__ import annotations

import re
from typing import Optional

import numpy as np

from hades_gpu.documents.packing import Span, line_starts

# a lone \r only where no \n follows (else one CRLF read as two line ends: every line a paragraph)
_PARA_BREAK = re.compile(r"(?:\r\n|\r(?!\n)|\n)[^\S\r\n]*(?:\r\n|\r(?!\n)|\n)\s*")
_SENTENCE = re.compile(  # the end of a sentence and the whitespace after it: cut at its end
    r"""(?:[.!?]["'\u201d\u2019)\]]*\s+"""
    r"""|[\u3002\uff01\uff1f]["'\u201d\u2019\u300d\u300f\uff09]*\s*)(?=\S)"""
)
_ATX = re.compile(r"[ ]{0,3}#{1,6}(?:[ \t]|\r?\n|\r|$)")
_FENCE = re.compile(r"[ ]{0,3}(`{3,}|~{3,})")
_SETEXT = re.compile(r"[ ]{0,3}(?:=+|-+)[ \t]*(?:\r?\n|\r)?$")
_RST_ADORN = re.compile(r"([!-/:-@\[-`{-~])\1{2,}[ \t]*(?:\r?\n|\r)?$")


def _spans(start: int, cuts: list[int], end: int, sections: frozenset[int] = frozenset()) -> list[Span]:
    bounds = [start, *cuts, end]
    return [(bounds[i], bounds[i + 1], bounds[i] in sections) for i in range(len(bounds) - 1)]


def _first_non_space(line: str) -> int:
    return len(line) - len(line.lstrip())


def _markdown_headings(text: str) -> tuple[set[int], set[int]]:
    """(heading starts, ends of heading lines): a heading is a block of its own."""
    heads: set[int] = set()
    ends: set[int] = set()
    pos = 0
    fence: Optional[str] = None
    prev_start = -1  # start of the previous line when it was plain paragraph text
    for line in text.splitlines(keepends=True):
        stripped = line.strip()
        this_text = -1
        if fence is not None:
            if stripped.startswith(fence) and not stripped[len(fence):].strip(fence[0]):
                fence = None
        elif (m := _FENCE.match(line)) is not None:
            fence = m.group(1)
        elif _ATX.match(line):
            heads.add(pos + _first_non_space(line))
            ends.add(pos + len(line))
        elif stripped and _SETEXT.match(line):
            if prev_start >= 0:
                heads.add(prev_start)
                ends.add(pos + len(line))
        elif stripped:
            this_text = pos + _first_non_space(line)
        prev_start = this_text
        pos += len(line)
    return heads, ends


def _rst_headings(text: str) -> tuple[set[int], set[int]]:
    heads: set[int] = set()
    ends: set[int] = set()
    lines = text.splitlines(keepends=True)
    starts = [0]
    for line in lines:
        starts.append(starts[-1] + len(line))
    adorned = [bool(_RST_ADORN.match(line)) for line in lines]
    for k, line in enumerate(lines):
        if not adorned[k] or k == 0:
            continue
        title = lines[k - 1]
        if not title.strip() or adorned[k - 1]:
            continue
        at = k - 1
        if k >= 2 and adorned[k - 2] and lines[k - 2].strip()[:1] == line.strip()[:1]:
            at = k - 2  # over- and underlined title
        heads.add(starts[at] + _first_non_space(lines[at]))
        ends.add(starts[k + 1])
    return heads, ends


def prose_units(text: str, language: str) -> list[Span]:
    """Top-level spans (paragraphs; headings flagged as section starts) partitioning `text`."""
    n = len(text)
    cuts = {m.end() for m in _PARA_BREAK.finditer(text)}
    heads: set[int] = set()
    if language == "markdown":
        heads, ends = _markdown_headings(text)
        cuts |= ends
    elif language == "rst":
        heads, ends = _rst_headings(text)
        cuts |= ends
    heads.discard(0)
    cuts |= heads
    cuts = {c for c in cuts if 0 < c < n}
    return _spans(0, sorted(cuts), n, frozenset(heads))


class ProseStructure:
    """`children` for prose spans: sentences, else lines, else None (token windows)."""

    def __init__(self, text: str) -> None:
        self.text = text
        self._line_starts: Optional[np.ndarray] = None

    def line_starts(self) -> np.ndarray:
        if self._line_starts is None:
            self._line_starts = line_starts(self.text)[1:]
        return self._line_starts

    def children(self, s: int, e: int) -> Optional[list[Span]]:
        cuts = [c for c in (m.end() for m in _SENTENCE.finditer(self.text, s, e)) if s < c < e]
        if cuts:
            return _spans(s, cuts, e)
        ls = self.line_starts()
        lines = ls[np.searchsorted(ls, s, "right") : np.searchsorted(ls, e, "left")].tolist()
        if lines:
            return _spans(s, lines, e)
        return None


# ---------------------------------------------------------------------------------- references
_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.\-]*:")
_MD_FENCED = re.compile(r"^[ ]{0,3}(`{3,}|~{3,})[^\n]*\n.*?(?:^[ ]{0,3}\1[^\n]*$|\Z)", re.M | re.S)
_MD_CODE_SPAN = re.compile(r"`[^`\n]*`")
_MD_LINK = re.compile(
    r"\[(?:[^\[\]\\\n]|\\.)*\]\(\s*(<[^<>\n]*>|[^\s()<>]+(?:\([^\s()]*\)[^\s()]*)*)"
    r"(?:\s+(?:\"[^\"\n]*\"|'[^'\n]*'|\([^()\n]*\)))?\s*\)"
)
_MD_AUTOLINK = re.compile(r"<([^\s<>@]+)>")
_HTML_COMMENT = re.compile(r"<!--.*?(?:-->|\Z)", re.S)
_HTML_HREF = re.compile(r"<a\s[^>]*?\bhref\s*=\s*(?:\"([^\"\n]*)\"|'([^'\n]*)')", re.I)
_MD_REFDEF = re.compile(r"^[ ]{0,3}\[[^\]\n]+\]:[ \t]*(<[^<>\n]*>|\S+)", re.M)
_RST_LINK = re.compile(r"`[^`<]*<([^`<>]+)>`__?")
_RST_INCLUDE = re.compile(r"^[ \t]*\.\.[ \t]+(?:include|literalinclude)::[ \t]*(\S+)", re.M)
_RST_DOC = re.compile(r":doc:`(?:[^`<]*<([^`<>]+)>|([^`<>]+))`")


def clean_target(target: str) -> Optional[str]:
    """A link target as written, minus angle brackets and anchor; None for URLs and pure anchors."""
    t = target.strip()
    if t.startswith("<") and t.endswith(">"):
        t = t[1:-1].strip()
    if not t or t.startswith("//"):
        return None
    m = _SCHEME.match(t)
    if m is not None and m.group(0).lower() != "file:":
        return None
    t = t.split("#", 1)[0]
    return t or None


def markdown_references(text: str) -> list[str]:
    """Targets of ``[x](target)``, ``[x]: target``, ``<target>`` and HTML ``<a href="target">`` links
    (outside code and HTML comments)."""
    # each pattern only where its literal part occurs: the line-anchored ones are tried at every
    # position of the text otherwise (~40% of this function on the feed corpus' Markdown)
    body = _MD_FENCED.sub("", text) if "```" in text or "~~~" in text else text
    body = _MD_CODE_SPAN.sub("", body) if "`" in body else body
    # a commented-out link is no link (`<!-- [old](x.md) -->` linked x.md)
    body = _HTML_COMMENT.sub("", body) if "<!--" in body else body
    found: list[tuple[int, str]] = []
    for m in (_HTML_HREF.finditer(body) if "href" in body else ()):  # Markdown may hold raw HTML links
        found.append((m.start(), m.group(1) if m.group(1) is not None else m.group(2)))
    for m in (_MD_LINK.finditer(body) if "](" in body else ()):
        found.append((m.start(), m.group(1)))
    for m in (_MD_REFDEF.finditer(body) if "]:" in body else ()):
        found.append((m.start(), m.group(1)))
    for m in (_MD_AUTOLINK.finditer(body) if "<" in body else ()):
        t = m.group(1)
        # "<docs/x.md>" yes; HTML ("</p>", "<br/>", "<div>") and e-mail addresses no
        if ("/" in t or "." in t) and not t.startswith("/") and not t.endswith("/") and "=" not in t:
            found.append((m.start(), t))
    return _unique(clean_target(t) for _, t in sorted(found))


def rst_references(text: str) -> list[str]:
    """Targets of ```text <target>`_``, ``.. include::`` / ``literalinclude::`` and ``:doc:``."""
    found: list[tuple[int, str]] = []
    for m in _RST_LINK.finditer(text):
        t = m.group(1).strip()
        if not t.endswith("_"):  # `x <name_>`_ points at a named target, not a document
            found.append((m.start(), t))
    for m in _RST_INCLUDE.finditer(text):
        found.append((m.start(), m.group(1)))
    for m in _RST_DOC.finditer(text):
        found.append((m.start(), (m.group(1) or m.group(2)).strip()))
    return _unique(clean_target(t) for _, t in sorted(found))


def _unique(items) -> list[str]:
    return list(dict.fromkeys(t for t in items if t))


def prose_references(text: str, language: str) -> list[str]:
    if language == "markdown":
        return markdown_references(text)
    if language == "rst":
        return rst_references(text)
    return []
