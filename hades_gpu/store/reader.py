"""Read an ingest output: its committed part files (every shard) as Arrow tables, and the ISNE
vectors. The manifests say which parts are committed (`store.manifest.committed_parts`); a part
file they do not name is an interrupted write and is never read.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from hades_gpu.store.layout import CHUNKS_DIR, DOCUMENTS_DIR, isne_embeddings_files, part_path
from hades_gpu.store.manifest import committed_parts, has_manifest

__all__ = ["DamagedOutputError", "committed_part_files", "committed_parts", "embeddings_to_numpy", "is_ingest_output",
           "read_chunks", "read_documents", "read_files", "read_isne_embeddings", "read_table"]


class DamagedOutputError(FileNotFoundError):
    """The manifest names a part whose file is gone: the output was damaged after it was written."""


def committed_part_files(output: str | os.PathLike, table: str) -> list[Path]:
    """`<output>/<table>/<part>.parquet` of every committed part, sorted by part name."""
    files = [part_path(Path(output), table, part) for part in committed_parts(Path(output))]
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise DamagedOutputError(f"{len(missing)} committed part file(s) are missing, e.g. {missing[0]}; "
                                 f"the output was changed after it was written (re-ingest into a new folder)")
    return files


def read_table(output: str | os.PathLike, table: str, columns: Optional[Sequence[str]] = None,
               missing_ok: bool = False) -> pa.Table:
    """The committed parts of one table, concatenated (only `columns` when given).

    Raises FileNotFoundError when nothing is committed, unless `missing_ok` (then: an empty table of
    string columns named `columns`).
    """
    files = committed_part_files(output, table)
    if not files:
        if missing_ok:
            return pa.table({c: pa.array([], type=pa.string()) for c in (columns or [])})
        raise FileNotFoundError(f"no committed {table} part files under {output} (run hades-ingest first)")
    return read_files(files, columns)


def read_files(files: Sequence[Path], columns: Optional[Sequence[str]] = None) -> pa.Table:
    """Part files already listed (`committed_part_files`), concatenated (only `columns` when given)."""
    return pa.concat_tables([pq.read_table(f, columns=list(columns) if columns else None) for f in files],
                            promote_options="default")


def read_chunks(output: str | os.PathLike, columns: Optional[Sequence[str]] = None) -> pa.Table:
    """All chunk rows (`doc_id, chunk_id, path, ..., embedding`) of an ingest output."""
    return read_table(output, CHUNKS_DIR, columns)


def read_documents(output: str | os.PathLike, columns: Optional[Sequence[str]] = None) -> pa.Table:
    """All document rows (`doc_id, rel_path, ..., references`) of an ingest output."""
    return read_table(output, DOCUMENTS_DIR, columns)


def is_ingest_output(path: str | os.PathLike) -> bool:
    return has_manifest(Path(path))


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


def read_isne_embeddings(output: str | os.PathLike) -> tuple[list[str], np.ndarray]:
    """Every `isne/embeddings-*.parquet` of an output: (chunk ids, float32 (n, d)); later files win."""
    ids: list[str] = []
    vecs: list[np.ndarray] = []
    for f in isne_embeddings_files(Path(output)):
        t = pq.read_table(f, columns=["chunk_id", "isne_embedding"])
        ids.extend(t.column("chunk_id").to_pylist())
        vecs.append(embeddings_to_numpy(t.column("isne_embedding")))
    dims = {v.shape[1] for v in vecs if v.shape[0]}
    if len(dims) > 1:
        raise ValueError(f"isne embeddings of one output must share one dimension (got {sorted(dims)})")
    return ids, (np.concatenate(vecs) if vecs else np.zeros((0, 0), np.float32))
