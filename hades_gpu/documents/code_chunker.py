"""Code structure: Python by its statements, every other language (and unlexable Python) by blocks.

Structure handed to `Packer` (`hades_gpu.documents.packing`):

- Python: every top-level statement is a span, starting at the first line of its decorators and
  the comment lines directly above it (no blank line between); the first span starts at 0 (module
  docstring, shebang, licence header). Greedy packing then keeps a function or class whole in one
  chunk whenever it fits, and groups the module-level code around it. A statement too long for a
  chunk splits into its own statements (a class into its methods and attributes, a function into
  its body statements, an ``if``/``for``/``try`` into its blocks; the header line(s) stay with the
  first statement), recursively, then into lines,
  and a line longer than a chunk into token windows cut before words.
- Fallback (other languages, Python whose lines `python_lines` cannot find): spans are blocks separated by blank
  lines, a block splits into lines, a line into token windows. A line is never cut unless it alone
  is longer than a chunk.

Code windows never overlap: they end at statement or line boundaries already.
"""

from __future__ import annotations

import re
from typing import Iterator, Optional

import numpy as np

from hades_gpu.documents.packing import Span, line_starts
from hades_gpu.documents.python_lines import WORDS, LogicalLines

# a lone \r only where no \n follows: `\r|\n` let the regex split one CRLF into two line ends, so every
# line of a CRLF file was a "blank run" and a block of its own (functions cut mid-body)
_LINE_END = r"(?:\r\n|\r(?!\n)|\n)"
_BLANK_RUN = re.compile(rf"{_LINE_END}(?:[^\S\r\n]*{_LINE_END})+")
# words that continue a compound statement: never a statement of their own
_CLAUSES = ("elif", "else", "except", "finally")


def _word_table(words: tuple[str, ...]) -> np.ndarray:
    """A lookup table over `LogicalLines.word` + 1 (-1, "any other word", is row 0): `table[word + 1]`
    is True for `words`. np.isin on a document's few hundred lines cost ~40 µs a call, mostly its
    own overhead; a table lookup is one gather."""
    table = np.zeros(len(WORDS) + 1, dtype=bool)
    table[[WORDS.index(w) + 1 for w in words]] = True
    return table


_IS_CLAUSE = _word_table(_CLAUSES)
_IS_IMPORT = _word_table(("import", "from"))
_COMMENT = re.compile(r"#[^\r\n]*")
_FROM_STATEMENT = re.compile(r"from\b\s*([\w.\s]*?)\s*\bimport\b\s*(.+)")


def _spans(start: int, cuts: list[int], end: int) -> list[Span]:
    bounds = [start, *cuts, end]
    return [(bounds[i], bounds[i + 1], False) for i in range(len(bounds) - 1)]


class CodeStructure:
    """Line-based structure of any code: blank-line blocks, then lines."""

    def __init__(self, text: str) -> None:
        self.text = text
        # line_starts[k] = character offset of line k+1 (1-based line numbers, as in `ast`)
        self.line_starts = line_starts(text)

    def units(self) -> list[Span]:
        n = len(self.text)
        cuts = [m.end() for m in _BLANK_RUN.finditer(self.text) if 0 < m.end() < n]
        return _spans(0, cuts, n)

    def line_children(self, s: int, e: int) -> Optional[list[Span]]:
        ls = self.line_starts
        inner = ls[np.searchsorted(ls, s, "right") : np.searchsorted(ls, e, "left")].tolist()
        return _spans(s, inner, e) if inner else None

    def children(self, s: int, e: int) -> Optional[list[Span]]:
        return self.line_children(s, e)


class PythonStructure(CodeStructure):
    """Statement structure of a Python module, from its logical lines (`python_lines`; raises
    `SyntaxError` where those cannot be found: unbalanced brackets, an unterminated string).

    The statements of a block are its logical lines at the block's body indentation, less the
    decorated line after a decorator and the clause words that continue a nested statement;
    a compound statement's own clauses count as `ast` has them: an ``if``'s first ``elif`` (the
    rest belong to it), every ``except`` of a ``try``, the statements of ``else``/``finally``
    bodies; a ``match``'s ``case`` lines are its body. Kept the same as the `ast` walk this
    replaced on the standard library (tests/documents/test_python_lines.py)."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.lines = LogicalLines(text, self.line_starts)
        self.nodes: dict[int, int] = {}  # span start -> logical line of the statement that opens it
        self._clause = _IS_CLAUSE[self.lines.word + 1]

    def _span_start(self, j: int) -> int:
        """Where statement ``j``'s span starts: the comment lines right above it come along."""
        return int(self.line_starts[self.lines.lift[self.lines.line[j]]])

    def _block_spans(self, statements: list[int], s: int, e: int, first_at_s: bool) -> list[Span]:
        cuts: list[int] = []
        owners: dict[int, int] = {}
        for k, j in enumerate(statements):
            # the first statement of a block stays with the block's header (`def f(...):`)
            pos = s if k == 0 else self._span_start(j)
            if pos <= s:
                if k == 0 and first_at_s:
                    owners[s] = j
                continue
            if pos >= e or (cuts and pos <= cuts[-1]):
                continue
            cuts.append(pos)
            owners[pos] = j
        self.nodes.update(owners)
        return _spans(s, cuts, e)

    def units(self) -> list[Span]:
        L = self.lines
        top = np.flatnonzero((L.indent == 0) & ~L.follows_decorator & ~self._clause).tolist()
        if not top:
            return [(0, len(self.text), False)]
        return self._block_spans(top, 0, len(self.text), first_at_s=True)

    def _statements_in(self, owner: int, e: int) -> list[int]:
        """The logical lines that `ast` would list as the sub-statements of statement `owner`
        (body, clauses' bodies, handlers, cases), up to offset `e`."""
        L = self.lines
        h = int(L.indent[owner])
        header = owner
        while header < len(L.line) - 1 and L.decorator[header]:
            header += 1
        j0, j1 = header + 1, int(np.searchsorted(L.start, e, "left"))
        if j0 >= j1:
            return []
        rule = L.word_of(header)
        indent = L.indent[j0:j1]
        clauses = (np.flatnonzero(indent <= h) + j0).tolist()
        # a body on the header's own line (`try: x`) is the first statement, where the span starts
        out: list[int] = [header] if clauses and clauses[0] == j0 else []
        active = True
        for a, b in zip([header, *clauses], [*clauses, j1]):
            if a != header:
                word = L.word_of(a)
                if word == "elif":
                    if rule in ("if", "elif") and active:
                        out.append(a)
                    active = False
                elif word == "except":
                    out.append(a)
                    active = False
                elif word in ("else", "finally"):
                    active = active or rule not in ("if", "elif")
                    if active and self._inline_body(a, word):
                        out.append(a)  # `else: x`: x starts on the clause's line
                else:
                    break  # not this statement's any more
            if not active or b <= a + 1:
                continue
            body = np.arange(a + 1, b)
            depth = L.indent[a + 1 : b]
            keep = (depth == depth[0]) & ~L.follows_decorator[a + 1 : b] & ~self._clause[a + 1 : b]
            out.extend(body[keep].tolist())
        return out

    def _code_of(self, j: int) -> str:
        """Logical line ``j``'s text from its first character, comments removed."""
        return _COMMENT.sub("", self.text[int(self.lines.first[j]) : self.lines.end_of(j)])

    def _inline_body(self, j: int, word: str) -> bool:
        rest = self._code_of(j)[len(word):].strip()
        return rest.startswith(":") and bool(rest[1:].strip())

    def children(self, s: int, e: int) -> Optional[list[Span]]:
        owner = self.nodes.get(s)
        if owner is not None:
            statements = self._statements_in(owner, e)
            if statements:
                spans = self._block_spans(statements, s, e, first_at_s=False)
                if len(spans) >= 2:
                    return spans
        return self.line_children(s, e)

    def references(self, rel_path: str) -> list[str]:
        """Dotted module names imported anywhere in the module, in order of appearance, unique.

        ``import a.b`` gives ``a.b``; ``from a.b import c`` gives ``a.b.c`` (``c`` may be a submodule
        or a name in ``a.b``: the graph's resolver tries both); ``from a.b import *`` gives ``a.b``.
        Relative imports are made absolute against the file's package (its folder in `rel_path`).
        Import statements are the logical lines that begin with ``import``/``from`` (one after a
        ``;`` or after a one-line ``if x:`` is not seen)."""
        L = self.lines
        package = _package_parts(rel_path)
        out: list[str] = []
        wanted = np.flatnonzero(_IS_IMPORT[L.word + 1])
        for j in wanted.tolist():
            statement = self._code_of(j).split(";")[0]
            statement = " ".join(statement.replace("\\", " ").replace("(", " ").replace(")", " ").split())
            if statement.startswith("import "):
                out.extend(part.split()[0] for part in statement[7:].split(",") if part.strip())
                continue
            m = _FROM_STATEMENT.match(statement)
            if m is None:
                continue
            module = re.sub(r"\s*\.\s*", ".", m.group(1))
            level = len(module) - len(module.lstrip("."))
            base = _from_base(level, module[level:] or None, package)
            names = [part.split()[0] for part in m.group(2).split(",") if part.strip()]
            out.extend(_from_names(base, names))
        return list(dict.fromkeys(r for r in out if r))


# ---------------------------------------------------------------------------------- references
_PY_IMPORT = re.compile(
    r"^[ \t]*import[ \t]+([\w.]+(?:[ \t]+as[ \t]+\w+)?(?:[ \t]*,[ \t]*[\w.]+(?:[ \t]+as[ \t]+\w+)?)*)", re.M
)
_PY_FROM = re.compile(r"^[ \t]*from[ \t]+(\.*[\w.]*)[ \t]+import[ \t]+\(?[ \t]*([\w*]+(?:[ \t]*,[ \t]*\w+)*)", re.M)


def _package_parts(rel_path: str) -> list[str]:
    return [p for p in rel_path.replace("\\", "/").split("/")[:-1] if p]


def _from_base(level: int, module: Optional[str], package: list[str]) -> str:
    """Absolute dotted base of ``from <level dots><module> import ...`` (relative form kept when it
    climbs above the corpus root)."""
    if level == 0:
        return module or ""
    if level - 1 > len(package):
        return "." * level + (module or "")
    base = package[: len(package) - (level - 1)]
    return ".".join(base + (module.split(".") if module else []))


def _from_names(base: str, names: list[str]) -> Iterator[str]:
    for name in names:
        if name == "*":
            if base and base.strip("."):
                yield base
        elif base.endswith(".") or not base:
            yield base + name
        else:
            yield f"{base}.{name}"


_TRIPLE_QUOTED = re.compile(r"(\"\"\"|''')(?:\\.|(?!\1).)*?\1", re.S)


def python_references_fallback(text: str, rel_path: str) -> list[str]:
    """The same from source lines, for Python whose logical lines cannot be found. Closed
    triple-quoted strings are left out first: an `import` line inside a docstring is no import (a
    file with a syntax error linked the module its docstring's example imported)."""
    package = _package_parts(rel_path)
    if '"""' in text or "'''" in text:
        text = _TRIPLE_QUOTED.sub("", text)
    found: list[tuple[int, list[str]]] = []
    for m in _PY_IMPORT.finditer(text):
        found.append((m.start(), [part.split()[0] for part in m.group(1).split(",") if part.strip()]))
    for m in _PY_FROM.finditer(text):
        mod = m.group(1)
        level = len(mod) - len(mod.lstrip("."))
        base = _from_base(level, mod[level:] or None, package)
        names = [x.strip() for x in m.group(2).split(",") if x.strip()]
        found.append((m.start(), list(_from_names(base, names))))
    out = [name for _, names in sorted(found) for name in names]
    return list(dict.fromkeys(r for r in out if r))
