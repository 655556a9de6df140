"""Reading an ingest output for the graph: chunk and document part files, and `edges.parquet`.

An output folder holds several part files per table (one writer per shard, see docs/CONTRACTS.md),
so every reader here lists `<output>/<table>/part-*.parquet`. Part files that a manifest does not
name are interrupted writes and are ignored.

Node order: every graph and every ISNE table over an output orders its nodes by `chunk_id`
(lexicographic). Chunk ids are global and stable, so the order does not depend on how many shards
wrote the output or in which order their parts are listed.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

log = logging.getLogger(__name__)

EDGES_FILE = "edges.parquet"
EDGES_SCHEMA = pa.schema([
    ("src_chunk_id", pa.string()),
    ("dst_chunk_id", pa.string()),
    ("type", pa.string()),
    ("weight", pa.float32()),
])


def _committed_parts(output_dir: Path) -> Optional[set[str]]:
    """Names of committed parts from `manifest*.json`, or None when no manifest lists any."""
    names: set[str] = set()
    for manifest in sorted(output_dir.glob("manifest*.json")):
        try:
            data = json.loads(manifest.read_text())
        except (OSError, ValueError) as err:
            log.warning("cannot read %s (%s); reading every part file", manifest, err)
            return None
        names.update(str(p) for p in data.get("parts", []))
    return names or None


def list_part_files(output_dir: str | os.PathLike, table: str) -> list[Path]:
    """`<output>/<table>/part-*.parquet`, sorted, without parts the manifest does not name.

    A part counts as committed when the manifest's `parts` list holds its file name, its stem
    (`part-s0-00000`) or the stem without the `part-` prefix. If the manifest names parts but
    none of them matches (an unknown naming), every file is read and a warning says so.
    """
    output_dir = Path(output_dir)
    files = sorted((output_dir / table).glob("part-*.parquet"))
    committed = _committed_parts(output_dir)
    if committed is None or not files:
        return files

    def ok(f: Path) -> bool:
        stem = f.name[: -len(".parquet")]
        return f.name in committed or stem in committed or stem[len("part-"):] in committed

    kept = [f for f in files if ok(f)]
    if not kept:
        log.warning("manifest names parts %s but none matches %s/part-*.parquet; reading all",
                    sorted(committed)[:3], table)
        return files
    if len(kept) < len(files):
        log.info("ignoring %d uncommitted %s part file(s)", len(files) - len(kept), table)
    return kept


def read_parts(output_dir: str | os.PathLike, table: str, columns: Sequence[str]) -> pa.Table:
    """Concatenate the committed part files of one table (only `columns`)."""
    files = list_part_files(output_dir, table)
    if not files:
        return pa.table({c: pa.array([], type=pa.string()) for c in columns})
    return pa.concat_tables([pq.read_table(f, columns=list(columns)) for f in files],
                            promote_options="default")


def embeddings_to_numpy(column: pa.ChunkedArray | pa.Array, dim: Optional[int] = None) -> np.ndarray:
    """A `fixed_size_list<float32, d>` or `list<float32>` column as float32 (n, d); null rows are 0."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    n = len(arr)
    if isinstance(arr.type, pa.FixedSizeListType):
        d = arr.type.list_size
        values = arr.values.slice(arr.offset * d, n * d)
        out = values.to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(n, d)
    else:
        lengths = pc.list_value_length(arr).fill_null(0).to_numpy()
        nonzero = lengths[lengths > 0]
        d = int(nonzero[0]) if nonzero.size else (dim or 0)
        if nonzero.size and not (nonzero == d).all():
            raise ValueError(f"embedding lists must all have the same length (got {np.unique(nonzero)[:5]})")
        out = np.zeros((n, d), dtype=np.float32)
        rows = lengths > 0
        if rows.any():  # (reshape(-1, 0) of nothing is ambiguous to numpy)
            out[rows] = pc.list_flatten(arr).to_numpy(zero_copy_only=False).reshape(-1, d)
        return out
    if arr.null_count:
        out = out.copy()
        out[~arr.is_valid().to_numpy(zero_copy_only=False)] = 0.0
    return out


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
    files = list_part_files(output_dir, "chunks")
    if not files:
        return ChunkTable(np.array([], dtype=object), np.array([], dtype=object),
                          np.zeros(0, dtype=np.int64), np.zeros((0, 0), np.float32) if with_embeddings else None)
    table = read_parts(output_dir, "chunks", cols)
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
    return ChunkTable(
        chunk_ids=ids[keep],
        doc_ids=np.asarray(table.column("doc_id").to_pylist(), dtype=object)[order],
        ordinal=table.column("ordinal").to_numpy().astype(np.int64)[order],
        embedding=emb,
    )


def load_chunk_ids(output_dir: str | os.PathLike) -> np.ndarray:
    """Only the sorted unique chunk ids (the node order of every graph over this output)."""
    files = list_part_files(output_dir, "chunks")
    if not files:
        return np.array([], dtype=object)
    ids = read_parts(output_dir, "chunks", ["chunk_id"]).column("chunk_id")
    return np.unique(np.asarray(ids.to_pylist(), dtype=object))


@dataclass
class DocumentTable:
    """Documents of an output: ids, corpus-relative paths, language and raw references."""

    doc_ids: list[str]
    rel_paths: list[str]
    languages: list[str]
    references: list[list[str]]


def load_document_table(output_dir: str | os.PathLike) -> DocumentTable:
    files = list_part_files(output_dir, "documents")
    if not files:
        return DocumentTable([], [], [], [])
    first = pq.read_schema(files[0])
    cols = [c for c in ("doc_id", "rel_path", "language", "references") if c in first.names]
    t = read_parts(output_dir, "documents", cols)
    n = t.num_rows
    langs = t.column("language").to_pylist() if "language" in cols else [""] * n
    refs = t.column("references").to_pylist() if "references" in cols else [[]] * n
    return DocumentTable(
        doc_ids=t.column("doc_id").to_pylist(),
        rel_paths=t.column("rel_path").to_pylist(),
        languages=[x or "" for x in langs],
        references=[list(r or []) for r in refs],
    )


def write_parquet_atomic(table: pa.Table, path: Path) -> None:
    """Write to `<path>.tmp` then rename, so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def index_of(ids: pa.Array | pa.ChunkedArray, node_ids: np.ndarray) -> np.ndarray:
    """Position of each id in `node_ids` (int64, -1 when absent), by hashing in Arrow (no Python loop)."""
    value_set = pa.array(node_ids.tolist(), type=pa.string())
    idx = pc.index_in(ids, value_set=value_set)
    return idx.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
