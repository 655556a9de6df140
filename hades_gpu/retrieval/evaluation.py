"""Is the dataset any good? Queries taken from a Python corpus's own docstrings, and their hit rate.

For each documented function of the corpus the query is the docstring's first paragraph and the
right answer is the chunk holding that function: any chunk of the same file overlapping the span
from the ``def`` line to the docstring's end. `hit_rate` counts queries whose answer is among the
top k — how `hades-search` is judged on an ingest of the standard library (issue 16: >= 90% of 50
queries in the top 10).
"""

from __future__ import annotations

import ast
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from hades_gpu.retrieval.search import Searcher


@dataclass(frozen=True)
class DocQuery:
    """A docstring's first paragraph and where its function is (characters of the file's text)."""

    query: str
    path: str  # real path of the file
    function: str
    char_start: int  # the `def` line's first character
    char_end: int  # just past the docstring


def _line_starts(text: str) -> list[int]:
    starts = [0]
    for i, ch in enumerate(text):
        if ch == "\n":
            starts.append(i + 1)
    return starts


def docstring_queries(files: Sequence[str | os.PathLike], min_words: int = 4) -> list[DocQuery]:
    """Every function (sync or async, methods too) with a docstring whose first paragraph has at
    least `min_words` words, file by file in source order. Files that do not parse are skipped."""
    out: list[DocQuery] = []
    for f in files:
        path = os.path.realpath(f)
        with open(path, encoding="utf-8", newline="") as fh:  # the text as ingest indexed it (newlines kept)
            text = fh.read()
        try:
            tree = ast.parse(text)
        except SyntaxError:
            continue
        starts = _line_starts(text)
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            doc = ast.get_docstring(node)
            if not doc:
                continue
            first = " ".join(doc.split("\n\n")[0].split())
            if len(first.split()) < min_words:
                continue
            body = node.body[0]
            end = starts[body.end_lineno - 1] + len(text[starts[body.end_lineno - 1]:].split("\n", 1)[0])
            out.append(DocQuery(first, path, node.name, starts[node.lineno - 1], end))
    out.sort(key=lambda q: (q.path, q.char_start))
    return out


def spread(queries: Sequence[DocQuery], n: int) -> list[DocQuery]:
    """`n` queries taken round-robin over the files (so no single file dominates), in a stable order."""
    by_file: dict[str, list[DocQuery]] = {}
    for q in queries:
        by_file.setdefault(q.path, []).append(q)
    lists = [by_file[p] for p in sorted(by_file)]
    out: list[DocQuery] = []
    i = 0
    while len(out) < n and any(i < len(lst) for lst in lists):
        out.extend(lst[i] for lst in lists if i < len(lst))
        i += 1
    return out[:n]


@dataclass
class HitRate:
    queries: int
    hits: int
    rate: float
    k: int
    expand: str
    ms_per_query: float  # embed (batched, per query) + rank + locate
    p50_ms: float
    misses: list[str]  # the queries that missed, for a human to read

    def as_dict(self) -> dict:
        return {**self.__dict__}


def hit_rate(searcher: Searcher, queries: Sequence[DocQuery], k: int = 10, expand: str = "none",
             one_by_one: bool = True) -> HitRate:
    """The share of `queries` whose function's chunk is in the top `k`.

    `one_by_one`: each query embedded on its own (the latency a user sees); else in one batch.
    """
    t0 = time.perf_counter()
    if one_by_one:
        results = [searcher.search(q.query, k, expand) for q in queries]
    else:
        results = searcher.search_many([q.query for q in queries], k, expand)
    wall_ms = (time.perf_counter() - t0) * 1000
    hits, misses = 0, []
    for q, res in zip(queries, results):
        if any(os.path.realpath(h.path) == q.path and h.char_start < q.char_end and h.char_end > q.char_start
               for h in res.hits):
            hits += 1
        else:
            misses.append(f"{Path(q.path).name}:{q.function}: {q.query[:80]}")
    totals = [r.total_ms for r in results]
    n = max(1, len(queries))
    return HitRate(queries=len(queries), hits=hits, rate=hits / n, k=k, expand=expand, ms_per_query=wall_ms / n,
                   p50_ms=float(np.median(totals)) if totals else 0.0, misses=misses)


__all__ = ["DocQuery", "HitRate", "docstring_queries", "hit_rate", "spread"]

