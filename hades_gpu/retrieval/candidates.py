"""Where the search's first stage gets its candidates: the chunks nearest a query vector.

`CandidateSource` is the one interface the search uses, so an approximate index can replace the
exact scan for large outputs without touching the ranking: it must return, per query, the rows of
the chunk table (indices into the output's chunk order, as `store.reader.read_chunks` returns it)
with their cosine similarity, best first. `ExactCandidates` is the scan (a matrix product in
blocks); `AnnCandidates` the output's saved FAISS index; `candidate_source` picks one per output.
"""

from __future__ import annotations

import logging
import os
from typing import Optional, Protocol, runtime_checkable

import numpy as np

log = logging.getLogger(__name__)

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


class AnnCandidates:
    """The output's saved approximate kNN index (`hades_gpu.graph.ann`, built with the kNN edges):
    FAISS ids are mapped to this table's rows through the chunk ids."""

    def __init__(self, index, chunk_ids: list[str], vectors: np.ndarray):
        self.index = index
        row_of = {cid: i for i, cid in enumerate(chunk_ids)}
        self.rows = np.array([row_of.get(c, -1) for c in index.chunk_ids.tolist()], dtype=np.int64)
        self.vectors = vectors  # for the queries the index answers short (`nearest`)
        self._exact: Optional[ExactCandidates] = None
        info = index.info
        self.description = (f"approximate (FAISS, nprobe {index.nprobe}, measured recall@{info.k} "
                            f"{info.recall_at_k:.3f}) over {len(chunk_ids)} chunks")

    def nearest(self, queries: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        """min(n, chunks) rows for every query. The index's inverted lists probed for a query may
        hold fewer than n vectors (a large n, a small index): such queries are answered exactly,
        with one log line, never with fewer rows than asked (nor every query cut to the shortest)."""
        q = np.atleast_2d(queries)
        want = min(int(n), self.vectors.shape[0])
        ids, sims = self.index.search(_normalised(q), int(n))
        rows = np.where(ids >= 0, self.rows[np.clip(ids, 0, None)], -1)
        keep = rows >= 0
        short = keep.sum(1) < want
        out_rows = np.full((q.shape[0], want), -1, np.int64)
        out_sims = np.full((q.shape[0], want), -np.inf, np.float32)
        for i in np.flatnonzero(~short).tolist():
            out_rows[i], out_sims[i] = rows[i][keep[i]][:want], sims[i][keep[i]][:want]
        if short.any():
            if self._exact is None:
                self._exact = ExactCandidates(self.vectors)
            log.info("search: the approximate index found fewer than %d hits for %d of %d queries (the lists "
                     "it probes hold too few chunks); those are answered exactly", want, int(short.sum()),
                     q.shape[0])
            out_rows[short], out_sims[short] = self._exact.nearest(q[short], want)
        return out_rows, out_sims


def candidate_source(output: str | os.PathLike, vectors: np.ndarray, chunk_ids: Optional[list[str]] = None,
                     exact_max_rows: int = 20_000) -> CandidateSource:
    """The first stage for an output's chunk vectors (rows in `read_chunks` order).

    Exact up to `exact_max_rows` chunks (`graph.knn_exact_max_nodes`, the size where the kNN edges
    switch too). Above it, the approximate index the kNN edges were built with and saved in the
    output (`<output>/index/`), if it is there and still of these chunks and vectors (its content
    fingerprint); else exact, with one line saying why.
    """
    if chunk_ids is None or vectors.shape[0] <= exact_max_rows:
        return ExactCandidates(vectors)
    from hades_gpu.graph.ann import IndexUnusable, fingerprint, load_index

    ids = np.asarray(chunk_ids, dtype=object)
    order = np.argsort(ids, kind="stable")  # the graph's order: by chunk id, first copy of a duplicate
    first = np.ones(order.size, dtype=bool)
    first[1:] = ids[order][1:] != ids[order][:-1]
    order = order[first]
    try:
        index = load_index(output, check_current=False)  # checked here against the vectors already read
        if index.fingerprint != fingerprint(ids[order], vectors[order]):
            raise IndexUnusable("it is of other chunks or vectors (stale)")
    except IndexUnusable as err:
        log.warning("search: the kNN index of %s is unusable (%s); searching exactly", output, err)
        return ExactCandidates(vectors)
    return AnnCandidates(index, list(chunk_ids), vectors)


__all__ = ["AnnCandidates", "CandidateSource", "ExactCandidates", "candidate_source"]
