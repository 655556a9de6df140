"""The chunk graph of an ingest output: four edge types, each with a weight.

Nodes are the output's chunks in `chunk_id` order (see `graph.io`). Edges, as written to
`<output>/edges.parquet` (`src_chunk_id, dst_chunk_id, type, weight`), are *directed as built*:

- ``sequence``: chunk k -> chunk k+1 of the same document (by `ordinal`); the "previous" relation
  is its reverse, added when the graph is made undirected. Weight `graph.sequence_weight`.
- ``same_document``: each chunk of an n-chunk document -> at most `graph.same_document_fanout` other
  chunks of it, at evenly spread offsets ``1 + floor(j (n-1) / fanout)`` (mod n), j = 0..fanout-1
  (all other chunks when n - 1 <= fanout). Deterministic, O(n * fanout), and reaching across the
  whole document rather than only near chunks. Weight `graph.same_document_weight`.
- ``reference``: document A imports / links to document B (resolution in `graph.references`):
  every chunk of A -> the first chunk (smallest ordinal) of B. Weight `graph.reference_weight`.
- ``knn``: chunk -> each of its top-`graph.knn_k` cosine neighbours with similarity >=
  `graph.knn_threshold` (self excluded); weight `graph.knn_weight_scale * cosine`.

`to_data` makes the graph undirected for ISNE: both directions of every edge, self loops dropped,
one edge per ordered node pair; where several edge types join the same pair, the edge with the
largest weight is kept (on equal weight, the type listed first above).
"""

from __future__ import annotations

import logging
import os
import posixpath
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from hades_gpu.config import GraphConfig
from hades_gpu.gpu.device import select_device
from hades_gpu.graph.io import (ChunkTable, DocumentTable, index_of, load_chunk_ids, load_chunk_table,
                                load_document_table)
from hades_gpu.graph.knn import knn_blocked
from hades_gpu.graph.references import ReferenceResolver
from hades_gpu.store.atomic import atomic_write_parquet
from hades_gpu.store.layout import EDGES_SCHEMA, edges_path, knn_index_meta_path

log = logging.getLogger(__name__)

EDGE_TYPES: tuple[str, ...] = ("sequence", "same_document", "reference", "knn")
EDGE_TYPE_CODE: dict[str, int] = {t: i for i, t in enumerate(EDGE_TYPES)}


@dataclass
class ChunkGraph:
    """Directed, typed, weighted edges over the chunks of an output.

    Attributes:
        chunk_ids (np.ndarray): object array of str (N,), the node order.
        src, dst (np.ndarray): int64 (E,) node indices.
        edge_type (np.ndarray): int64 (E,) codes into `EDGE_TYPES`.
        weight (np.ndarray): float32 (E,).
        seconds (dict): build time per edge type.
        knn (dict): how the kNN edges were found: method (exact | ann), seconds, recall_at_k, k and,
            for ann, index_type, nlist, nprobe, recall_sample, target_met, reused, index_seconds, and
            the recall of the edges themselves (edge_recall of the exact top-k at or above
            edge_threshold; the search ran at edge_nprobe / edge_refine_factor).
    """

    chunk_ids: np.ndarray
    src: np.ndarray
    dst: np.ndarray
    edge_type: np.ndarray
    weight: np.ndarray
    seconds: dict[str, float] = field(default_factory=dict)
    knn: dict = field(default_factory=dict)

    @property
    def num_nodes(self) -> int:
        return int(self.chunk_ids.shape[0])

    @property
    def num_edges(self) -> int:
        return int(self.src.shape[0])

    def counts_by_type(self) -> dict[str, int]:
        counts = np.bincount(self.edge_type, minlength=len(EDGE_TYPES)) if self.num_edges else np.zeros(len(EDGE_TYPES), int)
        return {t: int(counts[i]) for i, t in enumerate(EDGE_TYPES)}

    def metrics(self) -> dict:
        """Nodes, edges by type, seconds per edge type and the kNN method/recall (for metrics.json)."""
        return {"n_nodes": self.num_nodes, "n_edges": self.num_edges, "n_edges_by_type": self.counts_by_type(),
                "seconds": dict(self.seconds), "knn": dict(self.knn)}

    def to_table(self) -> pa.Table:
        ids = pa.array(self.chunk_ids.tolist(), type=pa.string())
        types = pa.array(list(EDGE_TYPES), type=pa.string())
        return pa.table({
            "src_chunk_id": ids.take(pa.array(self.src)),
            "dst_chunk_id": ids.take(pa.array(self.dst)),
            "type": types.take(pa.array(self.edge_type)),
            "weight": pa.array(self.weight.astype(np.float32), type=pa.float32()),
        }, schema=EDGES_SCHEMA)

    def to_data(self, undirected: bool = True):
        """A `torch_geometric.data.Data` (see `make_data`)."""
        return make_data(self.chunk_ids, self.src, self.dst, self.edge_type, self.weight, undirected)


def make_data(chunk_ids: np.ndarray, src: np.ndarray, dst: np.ndarray, edge_type: np.ndarray,
              weight: np.ndarray, undirected: bool = True):
    """Build `Data(edge_index (2, E) int64, edge_attr (E,) float32 weights, edge_type (E,) int64,
    num_nodes, chunk_ids list[str])`; `undirected=True` symmetrises and dedupes (module docstring)."""
    from torch_geometric.data import Data

    n = int(len(chunk_ids))
    s = torch.as_tensor(np.asarray(src, np.int64))
    d = torch.as_tensor(np.asarray(dst, np.int64))
    t = torch.as_tensor(np.asarray(edge_type, np.int64))
    w = torch.as_tensor(np.asarray(weight, np.float32))
    if undirected:
        s, d, t, w = symmetrize(s, d, t, w, n)
    return Data(edge_index=torch.stack([s, d]) if s.numel() else torch.zeros(2, 0, dtype=torch.long),
                edge_attr=w, edge_type=t, num_nodes=n, chunk_ids=list(chunk_ids))


def symmetrize(src: torch.Tensor, dst: torch.Tensor, etype: torch.Tensor, weight: torch.Tensor,
               num_nodes: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Both directions, no self loops, one edge per (src, dst): the largest weight, then the lowest
    type code. Output sorted by (src, dst). All (E,) tensors."""
    s = torch.cat([src, dst])
    d = torch.cat([dst, src])
    t = torch.cat([etype, etype])
    w = torch.cat([weight, weight])
    keep = s != d
    s, d, t, w = s[keep], d[keep], t[keep], w[keep]
    if s.numel() == 0:
        return s, d, t, w
    # lexicographic sort by (key, -weight, type) with stable sorts from the last key to the first
    order = torch.argsort(t, stable=True)
    order = order[torch.argsort(-w[order], stable=True)]
    key = s * num_nodes + d
    order = order[torch.argsort(key[order], stable=True)]
    key = key[order]
    first = torch.ones_like(key, dtype=torch.bool)
    first[1:] = key[1:] != key[:-1]
    order = order[first]
    return s[order], d[order], t[order], w[order]


# ------------------------------------------------------------------------------------- edge kinds
def _doc_groups(chunks: ChunkTable) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Nodes sorted by (doc, ordinal): (order, doc index per sorted node, rank in doc, doc sizes)."""
    doc_codes, doc_index = np.unique(chunks.doc_ids, return_inverse=True) if len(chunks) else (np.array([]), np.zeros(0, np.int64))
    order = np.lexsort((chunks.chunk_ids, chunks.ordinal, doc_index))
    doc_sorted = doc_index[order]
    sizes = np.bincount(doc_sorted, minlength=len(doc_codes))
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    rank = np.arange(len(order)) - starts[doc_sorted]
    return order, doc_sorted, rank, sizes


def sequence_edges(chunks: ChunkTable) -> tuple[np.ndarray, np.ndarray]:
    order, doc_sorted, _, _ = _doc_groups(chunks)
    same = doc_sorted[1:] == doc_sorted[:-1]
    return order[:-1][same], order[1:][same]


def same_document_edges(chunks: ChunkTable, fanout: int) -> tuple[np.ndarray, np.ndarray]:
    if fanout <= 0 or len(chunks) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    order, doc_sorted, rank, sizes = _doc_groups(chunks)
    n = sizes[doc_sorted]  # (N,) size of each sorted node's document
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])[doc_sorted]
    j = np.arange(fanout)[None, :]  # (1, F)
    small = (n - 1)[:, None] <= fanout
    off = np.where(small, j + 1, 1 + (j * (n - 1)[:, None]) // fanout)  # (N, F)
    valid = np.where(small, j < (n - 1)[:, None], True) & (n[:, None] > 1)
    dst_rank = (rank[:, None] + off) % np.maximum(n, 1)[:, None]
    src_sorted = np.broadcast_to(np.arange(len(order))[:, None], off.shape)[valid]
    dst_sorted = (starts[:, None] + dst_rank)[valid]
    return order[src_sorted], order[dst_sorted]


def package_root_names(docs: DocumentTable) -> set[str]:
    """The names a corpus folder that is itself a package (an `__init__.py` at its top) is imported by:
    its own, and its real folder's when it was given through a link (`corpus=linkpkg` to `mypkg/`:
    the code says `import mypkg.util`)."""
    names: set[str] = set()
    for root, rel in zip(docs.corpus_roots, docs.rel_paths):
        if root and rel == "__init__.py":
            names.update(n for n in (posixpath.basename(root), posixpath.basename(os.path.realpath(root))) if n)
    return names


def reference_edges(chunks: ChunkTable, output_dir: Path) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    docs = load_document_table(output_dir)
    stats = {"references": 0, "resolved": 0, "doc_pairs": 0}
    if not docs.doc_ids or len(chunks) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), stats
    resolver = ReferenceResolver(docs.rel_paths, package_roots=package_root_names(docs))
    pairs: set[tuple[int, int]] = set()
    for i, refs in enumerate(docs.references):
        for ref in refs:
            stats["references"] += 1
            hits = resolver.resolve(ref, i, docs.languages[i])
            if hits:
                stats["resolved"] += 1
            pairs.update((i, h) for h in hits)
    stats["doc_pairs"] = len(pairs)
    if not pairs:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), stats
    # chunks of each document, and each document's first chunk
    order, doc_sorted, rank, sizes = _doc_groups(chunks)
    doc_codes = np.unique(chunks.doc_ids)
    code_of = {d: c for c, d in enumerate(doc_codes.tolist())}
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    srcs, dsts = [], []
    for a, b in sorted(pairs):
        ca, cb = code_of.get(docs.doc_ids[a]), code_of.get(docs.doc_ids[b])
        if ca is None or cb is None:
            continue  # a document without chunks (empty, skipped)
        src = order[starts[ca]: starts[ca] + sizes[ca]]
        srcs.append(src)
        dsts.append(np.full(len(src), order[starts[cb]], dtype=np.int64))
    if not srcs:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), stats
    return np.concatenate(srcs), np.concatenate(dsts), stats


# ------------------------------------------------------------------------------------- build
def build_chunk_graph(output_dir: str | os.PathLike, cfg: Optional[GraphConfig] = None) -> ChunkGraph:
    """Build every enabled edge type from the committed chunk/document part files of an output."""
    cfg = cfg or GraphConfig()
    output_dir = Path(output_dir)
    t0 = time.perf_counter()
    chunks = load_chunk_table(output_dir, with_embeddings=cfg.knn)
    seconds = {"read": time.perf_counter() - t0}
    parts: list[tuple[np.ndarray, np.ndarray, int, np.ndarray]] = []

    def add(kind: str, src: np.ndarray, dst: np.ndarray, w: np.ndarray | float) -> None:
        src = np.asarray(src, np.int64)
        w = np.broadcast_to(np.asarray(w, np.float32), src.shape)
        parts.append((src, np.asarray(dst, np.int64), EDGE_TYPE_CODE[kind], w))

    if cfg.sequence:
        t = time.perf_counter()
        s, d = sequence_edges(chunks)
        add("sequence", s, d, cfg.sequence_weight)
        seconds["sequence"] = time.perf_counter() - t
    if cfg.same_document:
        t = time.perf_counter()
        s, d = same_document_edges(chunks, cfg.same_document_fanout)
        add("same_document", s, d, cfg.same_document_weight)
        seconds["same_document"] = time.perf_counter() - t
    if cfg.references:
        t = time.perf_counter()
        s, d, stats = reference_edges(chunks, output_dir)
        add("reference", s, d, cfg.reference_weight)
        seconds["reference"] = time.perf_counter() - t
        log.info("references: %d written, %d resolved, %d document pairs", stats["references"],
                 stats["resolved"], stats["doc_pairs"])
    knn_info: dict = {}
    if cfg.knn and len(chunks) > 1:
        t = time.perf_counter()
        s, d, sim, knn_info = knn_edges(chunks.chunk_ids, chunks.embedding, cfg, output_dir)
        # a cosine is at most 1: identical chunks came out at 1.0000002 (float32 rounding)
        joined = sim > 0  # a cosine of 0 (graph.knn_threshold=0) joins nothing: no edge of weight 0
        add("knn", s[joined], d[joined], cfg.knn_weight_scale * np.minimum(sim[joined], 1.0))
        seconds["knn"] = time.perf_counter() - t
    else:  # graph.knn=false: an index of older chunks goes too
        _discard_stale_index(output_dir, chunks.chunk_ids, chunks.embedding)

    if parts:
        src = np.concatenate([p[0] for p in parts])
        dst = np.concatenate([p[1] for p in parts])
        et = np.concatenate([np.full(len(p[0]), p[2], np.int64) for p in parts])
        w = np.concatenate([p[3] for p in parts]).astype(np.float32)
        # the same directed edge of the same type twice (e.g. same_document offsets that coincide)
        n = max(len(chunks), 1)
        key = (src * n + dst) * len(EDGE_TYPES) + et  # < 2^63 up to ~1e9 chunks
        _, first = np.unique(key, return_index=True)
        first.sort()
        src, dst, et, w = src[first], dst[first], et[first], w[first]
    else:
        src = dst = et = np.zeros(0, np.int64)
        w = np.zeros(0, np.float32)
    seconds["total"] = time.perf_counter() - t0
    return ChunkGraph(chunks.chunk_ids, src, dst, et, w, seconds, knn_info)


def knn_edges(chunk_ids: np.ndarray, embeddings: np.ndarray, cfg: GraphConfig,
              output_dir: Optional[Path] = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """kNN edges (src, dst, sim) and what was done: exact blocks up to `graph.knn_exact_max_nodes`
    chunks, else the approximate index of `graph.ann` (saved in `output_dir/index` when
    `graph.knn_save_index`), with its measured recall@k and nprobe."""
    n = int(embeddings.shape[0])
    t = time.perf_counter()
    if n <= cfg.knn_exact_max_nodes:
        dev = select_device(cfg.device)
        s, d, sim = knn_blocked(embeddings, cfg.knn_k, cfg.knn_threshold, cfg.knn_block_size, dev)
        _discard_stale_index(output_dir, chunk_ids, embeddings)
        return s, d, sim, {"method": "exact", "device": str(dev), "seconds": time.perf_counter() - t,
                           "recall_at_k": 1.0, "edge_recall": 1.0, "k": min(cfg.knn_k, n - 1)}
    from hades_gpu.graph.ann import knn_ann, open_or_build  # lazy: FAISS only on the ANN path

    if not cfg.knn_save_index:  # not saved now: an index of older chunks must not stay
        _discard_stale_index(output_dir, chunk_ids, embeddings)
    index = open_or_build(chunk_ids, embeddings, cfg.knn_k, cfg, output_dir if cfg.knn_save_index else None)
    s, d, sim = knn_ann(index, embeddings, cfg.knn_k, cfg.knn_threshold, cfg)
    info = index.info
    if cfg.knn_save_index and output_dir is not None and cfg.knn_join_rounds > 0:
        index.save_meta(output_dir)  # the measured setting and recall of the edges, for the next build
    log.info("kNN edges from %s (%s, %d threads): the edges' recall %.3f at nprobe %d and %d local join round(s) "
             "(top-%d at or above %.2f); queries' recall@%d %.3f at nprobe %d, on %d sampled rows, %.1f s",
             info.index_type, "reused" if info.reused else "built", info.threads, info.edge_recall, info.edge_nprobe,
             info.join_rounds, info.k, info.threshold, info.k, info.recall_at_k, info.nprobe, info.recall_sample,
             time.perf_counter() - t)
    return s, d, sim, {"method": "ann", "index_type": info.index_type, "reused": info.reused,
                       "seconds": time.perf_counter() - t, "index_seconds": dict(info.seconds),
                       "recall_at_k": info.recall_at_k, "k": info.k, "recall_sample": info.recall_sample,
                       "target_recall": info.target_recall, "target_met": info.target_met,
                       "edge_recall": info.edge_recall, "edge_threshold": info.threshold,
                       "edge_target_met": info.edge_target_met, "edge_nprobe": info.edge_nprobe,
                       "edge_refine_factor": info.edge_refine_factor,
                       "lists_recall_at_k": info.lists_recall_at_k,  # None without the local join (not NaN: JSON)
                       "join_rounds": info.join_rounds, "nlist": info.nlist, "nprobe": info.nprobe, "refine_factor": info.refine_factor,
                       "threads": info.threads}


def _discard_stale_index(output_dir: Optional[Path], chunk_ids: np.ndarray, embeddings: np.ndarray) -> None:
    """`ann.discard_if_stale` where the output has a saved index (the graph builds that keep none)."""
    if output_dir is not None and knn_index_meta_path(output_dir).is_file():
        from hades_gpu.graph.ann import discard_if_stale  # lazy: FAISS's module only where an index was saved

        discard_if_stale(output_dir, chunk_ids, embeddings)


def write_edges(graph: ChunkGraph, output_dir: str | os.PathLike) -> Path:
    path = edges_path(Path(output_dir))
    atomic_write_parquet(graph.to_table(), path)
    return path


def build_graph(output_dir: str | os.PathLike, cfg: Optional[GraphConfig] = None) -> ChunkGraph:
    """Build the chunk graph of an output and write `<output>/edges.parquet`."""
    graph = build_chunk_graph(output_dir, cfg)
    write_edges(graph, output_dir)
    log.info("chunk graph: %d nodes, %d edge rows %s (%.1f s; kNN %s, recall@%s %s)", graph.num_nodes,
             graph.num_edges, graph.counts_by_type(), graph.seconds.get("total", 0.0),
             graph.knn.get("method", _no_knn_reason(cfg or GraphConfig(), graph.num_nodes)), graph.knn.get("k", "-"),
             graph.knn.get("recall_at_k", "-"))
    return graph


def _no_knn_reason(cfg: GraphConfig, nodes: int) -> str:
    """Why no kNN edges were searched: the log said "kNN off" for a one-chunk output with kNN on."""
    return "off" if not cfg.knn else f"none ({nodes} chunk(s): no neighbour to search)"


def load_graph(output_dir: str | os.PathLike, undirected: bool = True):
    """`edges.parquet` + the output's chunk ids as a `torch_geometric.data.Data` (see `make_data`).

    Edges whose chunk ids are not in the output's committed chunks (stale rows) are dropped.
    """
    output_dir = Path(output_dir)
    path = edges_path(output_dir)
    if not path.is_file():
        raise FileNotFoundError(f"no chunk graph: expected {path} (build it with hades_gpu.graph.build_graph)")
    chunk_ids = load_chunk_ids(output_dir)
    t = pq.read_table(path)
    src = index_of(t.column("src_chunk_id"), chunk_ids)
    dst = index_of(t.column("dst_chunk_id"), chunk_ids)
    et = index_of(t.column("type"), np.array(EDGE_TYPES, dtype=object))
    if (et < 0).any():
        bad = sorted(set(np.asarray(t.column("type").to_pylist(), dtype=object)[et < 0].tolist()))
        raise ValueError(f"edges.parquet type must be one of {EDGE_TYPES} (got {bad[:3]})")
    w = t.column("weight").to_numpy().astype(np.float32)
    ok = (src >= 0) & (dst >= 0)
    if not ok.all():
        log.warning("dropping %d edges whose chunk ids are not in %s/chunks", int((~ok).sum()), output_dir)
    return make_data(chunk_ids, src[ok], dst[ok], et[ok], w[ok], undirected)
