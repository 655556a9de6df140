"""Python statement structure from logical lines, checked against `ast` (the oracle it replaced)."""

from __future__ import annotations

import ast
import sysconfig
import warnings
from pathlib import Path
from typing import Optional

import numpy as np
import pytest

from hades_gpu.documents.code_chunker import PythonStructure
from hades_gpu.documents.packing import line_starts
from hades_gpu.documents.python_lines import LogicalLines

STDLIB = Path(sysconfig.get_paths()["stdlib"])
_FIELDS = ("body", "handlers", "orelse", "finalbody", "cases")  # in source order


class AstStructure:
    """The same spans from `ast` nodes: the reference for `PythonStructure` (the module used this
    walk before; its cost was one Python object per expression node)."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.ls = line_starts(text)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.tree = ast.parse(text)
        self.nodes: dict[int, ast.AST] = {}
        self.lines = text.splitlines(keepends=True)

    def _start_line(self, node: ast.AST, floor: int) -> int:
        line = node.pattern.lineno if isinstance(node, ast.match_case) else node.lineno
        for dec in getattr(node, "decorator_list", ()):
            line = min(line, dec.lineno)
        while line - 1 > floor and self.text[self.ls[line - 2]:self.ls[line - 1]].lstrip().startswith("#"):
            line -= 1
        return line

    def _block(self, items: list, s: int, e: int, floor: int, first_at_s: bool) -> list[tuple[int, int]]:
        cuts: list[int] = []
        prev_end = floor
        for k, node in enumerate(items):
            if k and getattr(node, "lineno", 0) == getattr(items[k - 1], "end_lineno", -1):
                continue  # `a; b`: one line is one span (plain ast cut the first line of a block so)
            line = self._start_line(node, prev_end)
            prev_end = max(prev_end, getattr(node, "end_lineno", None) or line)
            pos = s if k == 0 else int(self.ls[line - 1])
            if pos <= s:
                if k == 0 and first_at_s:
                    self.nodes[s] = node
                continue
            if pos >= e or (cuts and pos <= cuts[-1]):
                continue
            cuts.append(pos)
            self.nodes[pos] = node
        bounds = [s, *cuts, e]
        return list(zip(bounds, bounds[1:]))

    def units(self) -> list[tuple[int, int]]:
        body = list(self.tree.body)
        return self._block(body, 0, len(self.text), 0, True) if body else [(0, len(self.text))]

    def children(self, s: int, e: int) -> Optional[list[tuple[int, int]]]:
        node = self.nodes.get(s)
        items = [i for f in _FIELDS for i in getattr(node, f, None) or ()
                 if isinstance(i, (ast.stmt, ast.excepthandler, ast.match_case))]
        if items:
            at = node.pattern if isinstance(node, ast.match_case) else node
            spans = self._block(items, s, e, at.lineno, False)
            if len(spans) >= 2:
                return spans
        inner = self.ls[np.searchsorted(self.ls, s, "right"):np.searchsorted(self.ls, e, "left")].tolist()
        bounds = [s, *inner, e]
        return list(zip(bounds, bounds[1:])) if inner else None  # lines, as CodeStructure splits


def _tree(structure, spans, depth: int = 0) -> list[tuple[int, int, int]]:
    """Every span the packer could reach: split by statements as far as that goes, then lines."""
    out = []
    for span in spans:
        s, e = span[0], span[1]
        out.append((depth, s, e))
        kids = structure.children(s, e)
        if kids:
            out.extend(_tree(structure, kids, depth + 1))
    return out


def _same(text: str) -> None:
    ref, new = AstStructure(text), PythonStructure(text)
    assert _tree(new, new.units()) == _tree(ref, ref.units())


CONSTRUCTS = {
    "decorators_and_comments": (
        "#!/usr/bin/env python\n# licence\n'''Doc.'''\nimport os\n\n# about f\n@dec(\n    1)\n"
        "# between\n@other\ndef f(a,\n      b):\n    # inside\n    x = 1\n\n    # before y\n    y = [\n"
        "0,\n# column 0 inside brackets\n]\n    return x\n\n\nclass C(Base):\n    @property\n"
        "    def p(self):\n        return 1\n\n    q = 2\n"
    ),
    "try_if_loops": (
        "def g(v):\n    try:\n        a = 1\n        b = 2\n    # about the handler\n    except ValueError:\n"
        "        c = 3\n        d = 4\n    except (KeyError, OSError) as err:\n        e = 5\n    else:\n"
        "        f = 6\n    finally:\n        h = 7\n    if v:\n        i = 1\n        j = 2\n    elif v > 1:\n"
        "        k = 3\n    elif v > 2:\n        m = 4\n    else:\n        n = 5\n    for x in v:\n        o = 1\n"
        "        p = 2\n    else:\n        r = 3\n    while v:\n        s = 1\n        t = 2\n    with a as b, \\\n"
        "         c as d:\n        u = 1\n        w = 2\n"
    ),
    "match_and_strings": (
        "def h(cmd):\n    text = '''\nclass NotReal:\n    pass\n'''\n    other = \"x # not a comment \\\"\"\n"
        "    match cmd:\n        case [x, y]:\n            z = 1\n            zz = 2\n        case {'k': v}:\n"
        "            z = 3\n        case _:\n            z = 4\n    return f\"{text!r:>{10}}\" + r'\\'' + b\"\\\\\"\n"
        "async def k():\n    async with a:\n        await b\n        await c\n    async for q in r:\n"
        "        await d\n        await e\n"
    ),
    "crlf_tabs_unicode": (
        "def f():\r\n\tx = 'é'\r\n\tif x:\r\n\t\ty = 1\r\n\t\tz = 2\r\n\treturn x\r\n\r\n"
        "def ünïcode():\r\n    return '日本'  # 注释\r\n"
    ),
    "identifiers_that_look_like_keywords": (
        "iffy = 1\nelsewhere = 2\ntrying = 3\nfromage = 4\nimportant = 5\nmatch = 6\ncase = 7\n"
        "def f():\n    iffy = 1\n    elsewhere = 2\n    finally_ = 3\n"
    ),
}


@pytest.mark.parametrize("name", sorted(CONSTRUCTS))
def test_constructs_split_as_ast_has_them(name: str) -> None:
    _same(CONSTRUCTS[name])


def test_the_standard_library_splits_as_ast_has_it() -> None:
    """Every module of the standard library (its test suite and data files included: decades of
    styles) gives the same spans as the `ast` walk, at every depth, down to lines."""
    files = sorted(p for p in STDLIB.rglob("*.py") if "site-packages" not in p.parts)
    compared, differ = 0, []
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
            ref = AstStructure(text)
        except (SyntaxError, ValueError, UnicodeDecodeError, RecursionError):
            continue
        compared += 1
        new = PythonStructure(text)
        if _tree(new, new.units()) != _tree(ref, ref.units()):
            differ.append(path)
    assert compared > 1000
    assert differ == []


def test_references_on_the_standard_library_match_an_ast_walk() -> None:
    files = sorted(p for p in (STDLIB / "email").rglob("*.py")) + sorted((STDLIB / "importlib").rglob("*.py"))
    for path in files:
        text = path.read_text(encoding="utf-8")
        found = []
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.Import):
                found += [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                found += [f"{node.module}.{a.name}" if a.name != "*" else node.module for a in node.names]
        got = PythonStructure(text).references(f"{path.parent.name}/{path.name}")
        assert set(found) <= set(got), path


def test_references_across_lines_comments_and_spacing() -> None:
    text = (
        "from a . b import (c,  # first\n    d as dd,\n    e,\n)\n"
        "from zipimport import zipimporter\nfrom .table_import import TableImport\n"
        "import x.y, \\\n    z\n"
        "s = '''\nimport not_real\n'''\n"
        "# import not_a_module\n"
        "def f():\n    from .. import up\n"
    )
    assert PythonStructure(text).references("pkg/sub/m.py") == [
        "a.b.c", "a.b.d", "a.b.e", "zipimport.zipimporter", "pkg.sub.table_import.TableImport", "x.y", "z",
        "pkg.up",
    ]


@pytest.mark.parametrize("text, why", [
    ("def f(:\n    pass\n", "brackets"),
    ("x = (1,\n", "brackets"),
    ("x = 1)\n", "brackets"),
    ("s = 'unterminated\nt = 1\n", "unterminated"),
    ("s = '''never closed\n\nx = 1\n", "unterminated"),
])
def test_unlexable_source_is_rejected(text: str, why: str) -> None:
    with pytest.raises(SyntaxError, match=why):
        LogicalLines(text, line_starts(text))


def test_logical_lines_skip_strings_brackets_continuations() -> None:
    text = "a = 1\nb = '''\nnot a line\n'''\nc = [\n  1,\n]\nd = 1 + \\\n  2\n# only a comment\n\n  e = 1\n"
    lines = LogicalLines(text, line_starts(text))
    assert lines.line.tolist() == [0, 1, 4, 7, 11]
    assert lines.indent.tolist() == [0, 0, 0, 0, 2]
    assert lines.comment_only.tolist() == [False] * 9 + [True, False, False]
    assert [text[lines.first[j]:lines.end_of(j)] for j in range(2)] == ["a = 1\n", "b = '''\nnot a line\n'''\n"]
    empty = LogicalLines("", np.zeros(1, dtype=np.int64))
    assert len(empty.line) == 0


def _partitions(structure: PythonStructure, spans, s: int, e: int, depth: int = 0) -> None:
    assert spans[0][0] == s and spans[-1][1] == e
    assert all(a[1] == b[0] and a[0] < a[1] for a, b in zip(spans, spans[1:]))
    for span in spans:
        kids = structure.children(span[0], span[1]) if depth < 8 else None
        if kids:
            _partitions(structure, kids, span[0], span[1], depth + 1)


def test_any_text_is_structured_or_rejected_with_syntax_error() -> None:
    """Random texts of the characters and words that decide line structure (seeded): each gives
    spans that partition the text at every depth, or `SyntaxError` (nothing else escapes); where
    `ast` parses one, the spans are the `ast` walk's."""
    rng = np.random.default_rng(7)
    alphabet = ["\n", "\r\n", "\r", "    ", "  ", "\t", " ", "'", '"', "'''", '"""', "#", "(", ")", "[", "]",
                "{", "}", "\\", ":", ";", "@", "if ", "elif ", "else", "try", "except ", "finally", "import ",
                "from ", "def f", "class C", "x = 1", "pass", "a", ".", ",", "é", "\f", "match ", "case "]
    structured = parsed = 0
    for _ in range(8000):
        text = "".join(rng.choice(alphabet, size=int(rng.integers(0, 100))).tolist())
        try:
            structure = PythonStructure(text)
        except SyntaxError:
            continue
        structured += 1
        structure.references("pkg/m.py")
        units = structure.units()
        if text:
            _partitions(structure, units, 0, len(text))
        try:
            ref = AstStructure(text)
        except (SyntaxError, ValueError):
            continue
        parsed += 1
        assert _tree(structure, units) == _tree(ref, ref.units()), repr(text)
    assert structured > 500 and parsed > 100, (structured, parsed)


# -- the C scan (`_python_lines.c`) against the NumPy version --------------------------------------
_ARRAYS = ("boundary", "comment_only", "lift", "next_boundary", "line", "start", "first", "indent", "word",
           "decorator", "follows_decorator")


def _c_built() -> bool:
    from hades_gpu.documents import python_lines

    if python_lines._c_scan is None:
        from requirements import skip_or_fail

        skip_or_fail("the C logical-line scan is not built (hades_gpu/documents/_python_lines.c)")
    return True


def _same_both_ways(text: str) -> None:
    """The C scan and the NumPy version agree: the same arrays, or the same kind of SyntaxError."""
    ls = line_starts(text)
    got = {}
    for use_c in (True, False):
        try:
            lines = LogicalLines(text, ls, use_c=use_c)
            got[use_c] = {name: getattr(lines, name).astype(np.int64).tolist() for name in _ARRAYS}
        except SyntaxError as err:
            got[use_c] = str(err).split()[0]  # "unterminated" / "brackets"
    assert got[True] == got[False], repr(text[:200])


def test_the_c_scan_equals_numpy_on_the_standard_library() -> None:
    _c_built()
    files = sorted(STDLIB.rglob("*.py"))
    assert len(files) > 1000
    for path in files:
        _same_both_ways(path.read_bytes().decode("utf-8", "replace"))


def test_the_c_scan_equals_numpy_on_random_text() -> None:
    """Seeded random texts of what decides line structure, with CRLF, lone CR, tabs, form feeds,
    unterminated and nested quotes, escapes at the end, non-ASCII characters after keywords."""
    _c_built()
    rng = np.random.default_rng(11)
    alphabet = ["\n", "\r\n", "\r", "    ", "\t", "\f", " ", "'", '"', "'''", '"""', "#", "(", ")", "[", "]", "{",
                "}", "\\", "\\\n", ":", "@", "if", "elif", "else", "try", "except", "finally", "import", "from", "x",
                "_", "1", "é", "東", "\u00a0", "if\u00e9", "'\\", "\"\\\r\n"]
    for _ in range(20000):
        _same_both_ways("".join(rng.choice(alphabet, size=int(rng.integers(0, 60))).tolist()))


def test_the_numpy_version_is_used_without_the_extension(monkeypatch) -> None:
    from hades_gpu.documents import python_lines

    monkeypatch.setattr(python_lines, "_c_scan", None)
    text = "import os\n\n@dec\ndef f(x):\n    if x:\n        return 1\n"
    lines = LogicalLines(text, line_starts(text))
    assert lines.line.tolist() == [0, 2, 3, 4, 5] and lines.word_of(0) == "import" and lines.decorator.tolist()[1]
