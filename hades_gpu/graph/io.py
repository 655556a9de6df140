"""An ingest output as the graph needs it: chunks ordered by id, their documents, id lookups.

Which part files are committed, and how they are read, is `store.reader`'s business; this module
only shapes what it returns for graph building.

Node order: every graph and every ISNE table over an output orders its nodes by `chunk_id`
(lexicographic). Chunk ids are global and stable, so the order does not depend on how many shards
wrote the output or in which order their parts are listed.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from hades_gpu.store.layout import CHUNKS_DIR, DOCUMENTS_DIR
from hades_gpu.store.reader import check_chunk_vectors, committed_part_files, embeddings_to_numpy, read_files

log = logging.getLogger(__name__)

@dataclass
class ChunkTable:
    """The chunks of an output, ordered by `chunk_id`.

    Attributes:
        chunk_ids (np.ndarray): object array of str, sorted, unique (N,).
        doc_ids (np.ndarray): object array of str (N,).
        ordinal (np.ndarray): int64 (N,), the chunk's position in its document.
        embedding (np.ndarray, optional): float32 (N, D), or None when not read.
    """

    chunk_ids: np.ndarray
    doc_ids: np.ndarray
    ordinal: np.ndarray
    embedding: Optional[np.ndarray] = None

    def __len__(self) -> int:
        return int(self.chunk_ids.shape[0])


def load_chunk_table(output_dir: str | os.PathLike, with_embeddings: bool = True) -> ChunkTable:
    """Read every committed chunk part; sort by chunk id; drop duplicate ids (keeping the first)."""
    cols = ["chunk_id", "doc_id", "ordinal"] + (["embedding"] if with_embeddings else [])
    files = committed_part_files(output_dir, CHUNKS_DIR)
    if not files:
        return ChunkTable(np.array([], dtype=object), np.array([], dtype=object),
                          np.zeros(0, dtype=np.int64), np.zeros((0, 0), np.float32) if with_embeddings else None)
    table = read_files(files, cols)
    ids = np.asarray(table.column("chunk_id").to_pylist(), dtype=object)
    order = np.argsort(ids, kind="stable")
    ids = ids[order]
    keep = np.ones(len(ids), dtype=bool)
    keep[1:] = ids[1:] != ids[:-1]
    if not keep.all():
        log.warning("%d duplicate chunk ids in %s/chunks; keeping the first of each", int((~keep).sum()), output_dir)
    order = order[keep]
    emb = None
    if with_embeddings:
        emb = embeddings_to_numpy(table.column("embedding"))[order]
        check_chunk_vectors(emb, output_dir, ids[keep])  # damaged bytes would make every kNN edge wrong
    return ChunkTable(
        chunk_ids=ids[keep],
        doc_ids=np.asarray(table.column("doc_id").to_pylist(), dtype=object)[order],
        ordinal=table.column("ordinal").to_numpy().astype(np.int64)[order],
        embedding=emb,
    )


def load_chunk_ids(output_dir: str | os.PathLike) -> np.ndarray:
    """Only the sorted unique chunk ids (the node order of every graph over this output)."""
    files = committed_part_files(output_dir, CHUNKS_DIR)
    if not files:
        return np.array([], dtype=object)
    ids = read_files(files, ["chunk_id"]).column("chunk_id")
    return np.unique(np.asarray(ids.to_pylist(), dtype=object))


@dataclass
class DocumentTable:
    """Documents of an output: ids, corpus-relative paths, language and raw references."""

    doc_ids: list[str]
    rel_paths: list[str]
    languages: list[str]
    references: list[list[str]]
    corpus_roots: list[str] = field(default_factory=list)  # the folder each rel_path is relative to ("": unknown)


def corpus_root(path: str, rel_path: str) -> str:
    """The corpus folder a document lies in (`/x/h11` for `/x/h11/_util.py`, `_util.py`), or "" when
    the path does not end in its rel_path (a single-file corpus, an escaped name)."""
    path, rel_path = path.replace("\\", "/"), rel_path.replace("\\", "/")
    if not rel_path or not path.endswith("/" + rel_path):
        return ""
    return path[: -len(rel_path) - 1]


def load_document_table(output_dir: str | os.PathLike) -> DocumentTable:
    files = committed_part_files(output_dir, DOCUMENTS_DIR)
    if not files:
        return DocumentTable([], [], [], [])
    first = pq.read_schema(files[0])
    cols = [c for c in ("doc_id", "rel_path", "path", "language", "references") if c in first.names]
    t = read_files(files, cols)
    n = t.num_rows
    langs = t.column("language").to_pylist() if "language" in cols else [""] * n
    refs = t.column("references").to_pylist() if "references" in cols else [[]] * n
    rel_paths = t.column("rel_path").to_pylist()
    paths = t.column("path").to_pylist() if "path" in cols else [""] * n
    return DocumentTable(
        doc_ids=t.column("doc_id").to_pylist(),
        rel_paths=rel_paths,
        languages=[x or "" for x in langs],
        references=[list(r or []) for r in refs],
        corpus_roots=[corpus_root(p or "", r or "") for p, r in zip(paths, rel_paths)],
    )


def index_of(ids: pa.Array | pa.ChunkedArray, node_ids: np.ndarray) -> np.ndarray:
    """Position of each id in `node_ids` (int64, -1 when absent), by hashing in Arrow (no Python loop)."""
    value_set = pa.array(node_ids.tolist(), type=pa.string())
    idx = pc.index_in(ids, value_set=value_set)
    return idx.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
