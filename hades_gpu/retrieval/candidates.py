"""Where the search's first stage gets its candidates: the chunks nearest a query vector.

`CandidateSource` is the one interface the search uses, so an approximate index can replace the
exact scan for large outputs without touching the ranking: it must return, per query, the rows of
the chunk table (indices into the output's chunk order, as `store.reader.read_chunks` returns it)
with their cosine similarity, best first. `ExactCandidates` is the scan (a matrix product in
blocks); `candidate_source` picks the source for an output — today always exact.
"""

from __future__ import annotations

import os
from typing import Protocol, runtime_checkable

import numpy as np

# Rows scored per block: bounds the (queries x block) score matrix (50 queries x 65536 rows x 4 B =
# 13 MB), not a tuning knob (the product is memory-bound either way).
_BLOCK_ROWS = 65536


@runtime_checkable
class CandidateSource(Protocol):
    """The `n` chunk rows nearest each query, by cosine, best first.

    Shapes: queries float32 (q, d), L2-normalised -> rows int64 (q, m), scores float32 (q, m), m = min(n, N)
    """

    description: str

    def nearest(self, queries: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]: ...


def _normalised(vectors: np.ndarray) -> np.ndarray:
    v = np.ascontiguousarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(v, axis=1, keepdims=True)
    return v / np.where(norms > 0, norms, 1.0)  # a zero row (null embedding) scores 0 everywhere


class ExactCandidates:
    """Exact cosine top-n over every chunk vector: one pass of matrix products in row blocks."""

    def __init__(self, vectors: np.ndarray):
        if vectors.ndim != 2:
            raise ValueError(f"chunk vectors must be 2-D (n, dim) (got shape {vectors.shape})")
        self.vectors = _normalised(vectors)
        self.description = f"exact cosine over {self.vectors.shape[0]} chunks"

    def nearest(self, queries: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        q = _normalised(np.atleast_2d(queries))
        if q.shape[1] != self.vectors.shape[1]:
            raise ValueError(f"query vectors must be {self.vectors.shape[1]} wide like the chunks (got {q.shape[1]})")
        total = self.vectors.shape[0]
        m = min(int(n), total)
        best_rows = np.zeros((q.shape[0], 0), dtype=np.int64)
        best_scores = np.zeros((q.shape[0], 0), dtype=np.float32)
        for start in range(0, total, _BLOCK_ROWS):
            scores = q @ self.vectors[start:start + _BLOCK_ROWS].T  # (q, block)
            rows = np.broadcast_to(np.arange(start, start + scores.shape[1], dtype=np.int64), scores.shape)
            scores = np.concatenate([best_scores, scores], axis=1)
            rows = np.concatenate([best_rows, rows], axis=1)
            if scores.shape[1] > m:
                keep = np.argpartition(-scores, m - 1, axis=1)[:, :m]
                scores = np.take_along_axis(scores, keep, axis=1)
                rows = np.take_along_axis(rows, keep, axis=1)
            best_scores, best_rows = scores, rows
        order = np.lexsort((best_rows, -best_scores), axis=1) if best_rows.size else best_rows
        return np.take_along_axis(best_rows, order, axis=1), np.take_along_axis(best_scores, order, axis=1)


def candidate_source(output: str | os.PathLike, vectors: np.ndarray) -> CandidateSource:
    """The first stage for an output's chunk vectors (rows in `read_chunks` order).

    Exact for now, whatever the size. The approximate index the kNN edges use, built once and kept
    in the output, plugs in here for large outputs (open it from `output` when present and its rows
    match `vectors`): anything with `nearest(queries, n)` and a `description`.
    """
    del output  # read by the approximate index once it exists; the exact scan needs only the vectors
    return ExactCandidates(vectors)


__all__ = ["CandidateSource", "ExactCandidates", "candidate_source"]
