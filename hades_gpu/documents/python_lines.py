"""Logical lines of Python source, found by a vectorised scan instead of `ast.parse`.

Why not `ast`: the code chunker needs only where statements start and how deep they are indented,
but `ast.parse` builds a Python object for every expression node, and on a code-heavy corpus that
was a quarter of a worker's time (1.0 s of 4.0 s in `process_document`, as much as tokenizing).
Neither `tokenize` (pure Python on 3.11) nor tree-sitter (measured 1.5x faster than `ast` here,
a tree of every node still) gets near what is needed, so this module lexes only what decides line
structure: string literals and comments (one C-level regex scan), then bracket depth, backslash
continuations and indentation as NumPy arrays over the code points.

A *logical line* is a physical line where a statement may begin: outside any string, at bracket
depth 0, not continued by a backslash, neither blank nor only a comment. Source whose brackets do
not balance, or that holds a quote outside every literal (an unterminated string), is rejected
with `SyntaxError`, and the caller chunks it by blank-line blocks as for any other language.
Python 2 and other code that parses this far but not with `ast` gets statement structure: its
lines are structured the same way.
"""

from __future__ import annotations

import re
from typing import Optional

import numpy as np

# A literal or a comment, whatever it holds: strings (any prefix: the prefix letters are ordinary
# code for line structure), triple-quoted ones across lines, a backslash escaping anything
# (a newline too), comments to the end of their line. Unrolled loops: no per-character backtracking.
_OPAQUE = re.compile(
    r"#[^\r\n]*"
    r"|'''[^'\\]*(?:(?:\\(?:\r\n|[\s\S])|'(?!''))[^'\\]*)*'''"
    r'|"""[^"\\]*(?:(?:\\(?:\r\n|[\s\S])|"(?!""))[^"\\]*)*"""'
    r"|'[^'\\\r\n]*(?:\\(?:\r\n|[\s\S])[^'\\\r\n]*)*'"
    r'|"[^"\\\r\n]*(?:\\(?:\r\n|[\s\S])[^"\\\r\n]*)*"'
)
# one table lookup per character sorts out the few that matter (non-ASCII counts as "other")
_K_OTHER, _K_SPACE, _K_QUOTE, _K_OPEN, _K_CLOSE = 0, 1, 2, 3, 4
_KIND = np.zeros(256, dtype=np.uint8)
_KIND[[32, 9, 12]] = _K_SPACE  # space, tab, form feed: indentation
_KIND[[34, 39]] = _K_QUOTE
_KIND[[40, 91, 123]] = _K_OPEN  # ( [ {
_KIND[[41, 93, 125]] = _K_CLOSE  # ) ] }
# first words the scan tells apart (a keyword must not run on into an identifier: `iffy = 1`)
WORDS = ("if", "elif", "else", "try", "except", "finally", "import", "from")
_WORD_INDEX = {w: i for i, w in enumerate(WORDS)}
try:  # the same arrays in one C pass (`_python_lines.c`; optional, built by setup.py)
    from hades_gpu.documents._python_lines import scan as _c_scan
except ImportError:
    _c_scan = None
_LINE_WORD = re.compile(r"^[ \t\f]*(" + "|".join(WORDS) + r")\b", re.M)


def _codepoints(text: str) -> np.ndarray:
    if text.isascii():
        return np.frombuffer(text.encode("ascii"), dtype=np.uint8)
    return np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)


class LogicalLines:
    """Where statements may start in one Python source text.

    Per physical line ``k`` (0-based; ``line_start[k]`` its offset): `boundary` (a statement may
    start here or the line is blank/comment), `comment_only`, `lift` (the first line of the comment
    lines directly above ``k``: a statement's comments travel with it). Per logical line ``j``:
    `line` (its physical line), `start`, `first` (offset of its first character), `indent` (columns,
    tabs to multiples of 8 as Python counts them), `word` (index into `WORDS`, -1 for any other),
    `decorator`, `follows_decorator` (the decorated statement: not a statement of its own)."""

    def __init__(self, text: str, line_start: np.ndarray, use_c: bool = True) -> None:
        self.text = text
        self.line_start = line_start
        if use_c and _c_scan is not None:
            self._from_c(_c_scan(text, np.ascontiguousarray(line_start, dtype=np.int64)))
        else:
            self._scan(text, line_start)

    def _from_c(self, got: dict) -> None:
        """The arrays of `_python_lines.scan` (the same as `_scan`'s; read-only views of its bytes)."""
        as_bool = lambda name: np.frombuffer(got[name], dtype=np.bool_)  # noqa: E731
        as_int = lambda name: np.frombuffer(got[name], dtype=np.int64)  # noqa: E731
        self.boundary, self.comment_only = as_bool("boundary"), as_bool("comment_only")
        self.lift, self.next_boundary = as_int("lift"), as_int("next_boundary")
        self.line, self.start, self.first, self.indent = as_int("line"), as_int("start"), as_int("first"), as_int("indent")
        self.word = np.frombuffer(got["word"], dtype=np.int8)
        self.decorator, self.follows_decorator = as_bool("decorator"), as_bool("follows_decorator")

    def _scan(self, text: str, line_start: np.ndarray) -> None:
        """The NumPy version (where the C extension is not built; the tests' reference for it)."""
        n = len(text)
        cp = _codepoints(text)
        kind = _KIND[cp] if cp.dtype == np.uint8 else _KIND[np.minimum(cp, 127)]
        spans = np.array([m.span() for m in _OPAQUE.finditer(text)], dtype=np.int64).reshape(-1, 2)
        opened, closed = spans[:, 0], spans[:, 1]

        def inside(pos: np.ndarray) -> np.ndarray:  # pos lies within a literal or comment
            if not len(opened):
                return np.zeros(len(pos), dtype=bool)
            k = np.searchsorted(opened, pos, "right") - 1
            return (k >= 0) & (pos < closed[np.maximum(k, 0)])

        if not inside(np.flatnonzero(kind == _K_QUOTE)).all():
            raise SyntaxError("unterminated string literal")
        brackets = np.flatnonzero(kind >= _K_OPEN)
        brackets = brackets[~inside(brackets)]
        depth_after = np.cumsum(np.where(kind[brackets] == _K_OPEN, 1, -1), dtype=np.int64)
        if len(depth_after) and (depth_after.min() < 0 or depth_after[-1] != 0):
            raise SyntaxError("brackets do not balance")

        def depth_at(pos: np.ndarray) -> np.ndarray:  # bracket depth just after character pos
            k = np.searchsorted(brackets, pos, "right") - 1
            return np.where(k >= 0, depth_after[np.maximum(k, 0)] if len(brackets) else 0, 0)

        ls = line_start[line_start < n] if n else line_start[:0]
        prev = ls[1:] - 1  # the character before each line after the first: its line break
        string_goes_on = np.zeros(len(ls), dtype=bool)
        string_goes_on[1:] = inside(prev)
        open_bracket = np.zeros(len(ls), dtype=bool)
        open_bracket[1:] = depth_at(prev) != 0
        # last character before the line break (\r\n counts as one break)
        before = prev - 1 - ((cp[prev] == 10) & (prev >= 1) & (cp[np.maximum(prev - 1, 0)] == 13))
        backslash = np.zeros(len(ls), dtype=bool)
        ok = before >= 0
        backslash[1:][ok] = (cp[before[ok]] == 92) & ~inside(before[ok])
        self.boundary = ~(string_goes_on | open_bracket | backslash)

        # first character of each line that is not indentation: the end of the run of spaces that
        # starts the line (where it does)
        space = kind == _K_SPACE
        first = ls.copy()
        indented = np.flatnonzero(space[ls]) if n else ls[:0]
        if len(indented):
            run_ends = np.flatnonzero(space[:-1] & ~space[1:]) + 1
            if space[-1]:  # a run of spaces that ends the text ends at its end
                run_ends = np.append(run_ends, n)
            first[indented] = run_ends[np.searchsorted(run_ends, ls[indented], "right")]
        head = np.where(first < n, cp[np.minimum(first, max(n - 1, 0))], 10) if n else first
        blank = (head == 10) | (head == 13) | (first >= n)
        # a line that is only a backslash holds no token: Python's statement starts on the line it
        # continues into (rare; in order, as such lines may follow each other)
        after_head = cp[np.minimum(first + 1, max(n - 1, 0))] if n else first
        bare = (head == 92) & ((first + 1 >= n) | (after_head == 10) | (after_head == 13))
        for k in np.flatnonzero(bare).tolist():
            if self.boundary[k]:
                blank[k] = True
                if k + 1 < len(ls):
                    self.boundary[k + 1] = True
        self.comment_only = self.boundary & (head == 35)
        logical = self.boundary & ~blank & ~self.comment_only

        # lift[k]: first of the comment-only lines running up to line k-1 (k itself when none)
        k_all = np.arange(len(ls))
        last_other = np.maximum.accumulate(np.where(self.comment_only, -1, k_all))
        self.lift = k_all.copy()
        self.lift[1:] = last_other[:-1] + 1
        # next_boundary[k]: the first boundary line after k (len(ls) at the end): where a logical
        # line that starts on k ends
        later = np.where(self.boundary, k_all, len(ls))
        self.next_boundary = np.empty(len(ls), dtype=np.int64)
        if len(ls):
            self.next_boundary[:-1] = np.minimum.accumulate(later[::-1])[::-1][1:]
            self.next_boundary[-1] = len(ls)

        self.line = np.flatnonzero(logical)
        self.start = ls[self.line]
        self.first = first[self.line]
        self.indent = self.first - self.start
        tabs = np.flatnonzero(cp == 9)
        if len(tabs):  # rare: Python's own column count, tab stops every 8
            has_tab = np.searchsorted(tabs, self.first) > np.searchsorted(tabs, self.start)
            for j in np.flatnonzero(has_tab).tolist():
                self.indent[j] = len(text[self.start[j]:self.first[j]].expandtabs(8))
        self.word = np.full(len(self.line), -1, dtype=np.int8)
        found = [(m.start(1), _WORD_INDEX[m.group(1)]) for m in _LINE_WORD.finditer(text)]
        if found:  # a match counts where it is a logical line's first word (not inside a string)
            pos, which = np.array(found, dtype=np.int64).T
            j = np.minimum(np.searchsorted(self.first, pos), max(len(self.first) - 1, 0))
            hit = (j < len(self.first)) & (self.first[j] == pos) if len(self.first) else pos < 0
            self.word[j[hit]] = which[hit]
        self.decorator = head[self.line] == 64  # '@'
        self.follows_decorator = np.zeros(len(self.line), dtype=bool)
        self.follows_decorator[1:] = self.decorator[:-1] & (self.indent[:-1] == self.indent[1:])

    def word_of(self, j: int) -> Optional[str]:
        w = int(self.word[j])
        return WORDS[w] if w >= 0 else None

    def end_of(self, j: int) -> int:
        """Offset where logical line ``j``'s text ends (its last physical line's break)."""
        end_line = int(self.next_boundary[self.line[j]])
        return int(self.line_start[end_line]) if end_line < len(self.boundary) else len(self.text)
