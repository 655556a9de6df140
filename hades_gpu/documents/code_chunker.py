"""Code structure: Python through `ast`, every other language (and unparsable Python) by blocks.

Structure handed to `Packer` (`hades_gpu.documents.packing`):

- Python: every top-level statement is a span, starting at the first line of its decorators and
  the comment lines directly above it (no blank line between); the first span starts at 0 (module
  docstring, shebang, licence header). Greedy packing then keeps a function or class whole in one
  chunk whenever it fits, and groups the module-level code around it. A statement too long for a
  chunk splits into its own statements (a class into its methods and attributes, a function into
  its body statements, an ``if``/``for``/``try`` into its blocks; the header line(s) stay with the
  first statement), recursively, then into lines,
  and a line longer than a chunk into token windows cut before words.
- Fallback (other languages, Python that `ast` cannot parse): spans are blocks separated by blank
  lines, a block splits into lines, a line into token windows. A line is never cut unless it alone
  is longer than a chunk.

Code windows never overlap: they end at statement or line boundaries already.
"""

from __future__ import annotations

import ast
import re
import warnings
from typing import Iterator, Optional

import numpy as np

from hades_gpu.documents.packing import Span, line_starts

_BLANK_RUN = re.compile(r"(?:\r\n|\r|\n)(?:[^\S\r\n]*(?:\r\n|\r|\n))+")
_BLOCK_FIELDS = ("body", "orelse", "finalbody", "handlers", "cases")
# node types that hold statements (everything else is a leaf for the import walk)
_COMPOUND = tuple(
    getattr(ast, name)
    for name in ("Module", "FunctionDef", "AsyncFunctionDef", "ClassDef", "If", "For", "AsyncFor", "While",
                 "With", "AsyncWith", "Try", "TryStar", "Match", "ExceptHandler", "match_case")
    if hasattr(ast, name)
)


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
    """Statement structure of a Python module (raises whatever `ast.parse` raises)."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        with warnings.catch_warnings():  # "invalid escape sequence" etc. are the corpus' business
            warnings.simplefilter("ignore")
            self.tree = ast.parse(text)
        self.nodes: dict[int, ast.AST] = {}  # span start -> the statement that opens it

    def _line_text(self, line: int) -> str:
        ls = self.line_starts
        a = int(ls[line - 1])
        b = int(ls[line]) if line < len(ls) else len(self.text)
        return self.text[a:b]

    def _start_line(self, node: ast.AST, floor: int) -> int:
        """First line of a statement: its decorators, and comment lines right above it (never
        at or above line `floor`, the end of whatever came before)."""
        if isinstance(node, ast.match_case):
            line = node.pattern.lineno
        else:
            line = node.lineno  # type: ignore[attr-defined]
        for dec in getattr(node, "decorator_list", ()):
            line = min(line, dec.lineno)
        while line - 1 > floor and self._line_text(line - 1).lstrip().startswith("#"):
            line -= 1
        return line

    def _block_spans(self, items: list[ast.AST], s: int, e: int, floor: int, first_at_s: bool) -> list[Span]:
        cuts: list[int] = []
        owners: dict[int, ast.AST] = {}
        prev_end = floor
        for k, node in enumerate(items):
            line = self._start_line(node, prev_end)
            prev_end = max(prev_end, getattr(node, "end_lineno", None) or line)
            # the first statement of a block stays with the block's header (`def f(...):`)
            pos = s if k == 0 else int(self.line_starts[line - 1])
            if pos <= s:
                if k == 0 and first_at_s:
                    owners[s] = node
                continue
            if pos >= e or (cuts and pos <= cuts[-1]):
                continue  # same line as the previous statement (`a = 1; b = 2`)
            cuts.append(pos)
            owners[pos] = node
        self.nodes.update(owners)
        return _spans(s, cuts, e)

    def units(self) -> list[Span]:
        body = list(self.tree.body)
        n = len(self.text)
        if not body:
            return [(0, n, False)]
        return self._block_spans(body, 0, n, 0, first_at_s=True)

    def children(self, s: int, e: int) -> Optional[list[Span]]:
        node = self.nodes.get(s)
        if node is not None:
            items = list(_sub_blocks(node))
            if items:
                at = node.pattern if isinstance(node, ast.match_case) else node
                header = at.lineno  # type: ignore[attr-defined]
                spans = self._block_spans(items, s, e, header, first_at_s=False)
                if len(spans) >= 2:
                    return spans
        return self.line_children(s, e)


def _sub_blocks(node: ast.AST) -> Iterator[ast.AST]:
    for name in _BLOCK_FIELDS:
        for item in getattr(node, name, None) or ():
            if isinstance(item, (ast.stmt, ast.excepthandler, ast.match_case)):
                yield item


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


def python_references(tree: ast.Module, rel_path: str) -> list[str]:
    """Dotted module names imported anywhere in a module, in order of appearance, unique.

    ``import a.b`` gives ``a.b``; ``from a.b import c`` gives ``a.b.c`` (``c`` may be a submodule
    or a name in ``a.b``: the graph's resolver tries both); ``from a.b import *`` gives ``a.b``.
    Relative imports are made absolute against the file's package (its folder in ``rel_path``).
    """
    package = _package_parts(rel_path)
    out: list[str] = []
    stack: list[ast.AST] = [tree]
    while stack:  # statements only: imports never sit inside expressions
        node = stack.pop()
        if isinstance(node, ast.Import):
            out.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = _from_base(node.level or 0, node.module, package)
            out.extend(_from_names(base, [a.name for a in node.names]))
        elif isinstance(node, _COMPOUND):
            kids = [item for name in _BLOCK_FIELDS for item in (getattr(node, name, None) or ())]
            stack.extend(reversed(kids))
    return list(dict.fromkeys(r for r in out if r))


def python_references_fallback(text: str, rel_path: str) -> list[str]:
    """The same from source lines, for files `ast` cannot parse."""
    package = _package_parts(rel_path)
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
