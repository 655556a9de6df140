"""A batch's rows out of its slab and into Arrow columns: what the writer thread of the stage and
the writer process (`writer_process`) both do with an embedded batch, kept apart from the stage so
the writer process imports only this (and the store), not the stage's threads and metrics."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

import numpy as np
import pyarrow as pa

from hades_gpu.gpu.slabs import CHUNK_ID_BYTES, SlabView
from hades_gpu.records import SlabBatch
from hades_gpu.store.arrow_columns import numeric

# the writer thread hands the sink one block per this many rows (or after this long without a batch)
WRITE_BLOCK_ROWS = 512
WRITE_BLOCK_WAIT_S = 0.05


@lru_cache(maxsize=8)
def row_schema(dim: int) -> pa.Schema:
    """Columns of the row blocks the writer thread hands the sink (one per embedded batch)."""
    return pa.schema([("doc_key", pa.int64()), ("ordinal", pa.int32()), ("char_start", pa.int64()),
                      ("char_end", pa.int64()), ("n_tokens", pa.int32()), ("chunk_id", pa.string()),
                      ("text", pa.string()), ("embedding", pa.list_(pa.float32(), dim))])


@dataclass
class SlabRows:
    """One batch's row columns copied out of its slab (which may be reused at once), and its vectors."""

    doc_key: np.ndarray
    ordinal: np.ndarray
    char_start: np.ndarray
    char_end: np.ndarray
    n_tokens: np.ndarray
    chunk_ids: bytes  # CHUNK_ID_BYTES ASCII bytes per row
    text_offsets: np.ndarray  # int32 (rows + 1,), from 0
    text: bytes
    vectors: np.ndarray  # float32 (rows, dim)

    @property
    def rows(self) -> int:
        return int(self.doc_key.shape[0])

    @property
    def nbytes(self) -> int:
        """What it holds in memory (the write queue's byte budget counts it)."""
        arrays = (self.doc_key, self.ordinal, self.char_start, self.char_end, self.n_tokens, self.text_offsets,
                  self.vectors)
        return sum(int(a.nbytes) for a in arrays) + len(self.chunk_ids) + len(self.text)


def copy_rows(view: SlabView, batch: SlabBatch, vectors: np.ndarray) -> SlabRows:
    """A batch's rows copied out of its slab; its vectors as the embedder returned them."""
    n = batch.rows
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if vectors.shape[0] != n:
        raise ValueError(f"the embedder returned {vectors.shape[0]} vectors for {n} rows")
    text = batch.inline_text if batch.inline_text is not None else view.column("text")[: batch.text_len].tobytes()
    return SlabRows(view.column("doc_key")[:n].copy(), view.column("ordinal")[:n].copy(),
                    view.column("char_start")[:n].copy(), view.column("char_end")[:n].copy(),
                    view.column("n_tokens")[:n].copy(), view.chunk_ids(n).tobytes(),
                    view.column("text_offsets")[: n + 1].copy(), text, vectors)


def rows_of(parts: Sequence[SlabRows]) -> pa.RecordBatch:
    """Several batches' rows as one block of Arrow columns (`row_schema`), built once: per batch,
    eight Arrow arrays and a record batch were ~a third of the writer thread's Python time."""
    if not parts:
        raise ValueError("rows_of needs at least one batch")
    n = sum(p.rows for p in parts)
    dims = {int(p.vectors.shape[1]) if p.vectors.ndim == 2 else 0 for p in parts}
    if len(dims) != 1:
        raise ValueError(f"batches of one block must have one vector width (got {sorted(dims)})")
    dim = dims.pop()
    one = len(parts) == 1
    texts = [p.text for p in parts]
    if one:
        offsets = parts[0].text_offsets
    else:  # each batch's offsets start at 0: shift them by the text before it
        bases = np.cumsum([0] + [len(t) for t in texts[:-1]], dtype=np.int64)
        if int(bases[-1]) + len(texts[-1]) > 2**31 - 1:
            raise ValueError("a block's text must stay under 2 GiB (32-bit string offsets)")
        offsets = np.concatenate([p.text_offsets[:-1] + np.int32(b) for p, b in zip(parts, bases)]
                                 + [np.array([int(bases[-1]) + len(texts[-1])], dtype=np.int32)])
    text = pa.StringArray.from_buffers(n, pa.py_buffer(offsets.astype(np.int32, copy=False)),
                                       pa.py_buffer(texts[0] if one else b"".join(texts)))
    id_offsets = np.arange(0, CHUNK_ID_BYTES * (n + 1), CHUNK_ID_BYTES, dtype=np.int32)
    ids = parts[0].chunk_ids if one else b"".join(p.chunk_ids for p in parts)
    chunk_id = pa.StringArray.from_buffers(n, pa.py_buffer(id_offsets), pa.py_buffer(ids))

    def column(name: str) -> pa.Array:
        values = getattr(parts[0], name) if one else np.concatenate([getattr(p, name) for p in parts])
        return numeric(values, copy=False)  # copies made above (copy_rows / concatenate)

    # the embedders' own arrays (a fresh one per call): viewed, not copied, as pa.array did
    vectors = parts[0].vectors if one else np.concatenate([p.vectors for p in parts])
    embedding = pa.FixedSizeListArray.from_arrays(numeric(vectors.reshape(-1), copy=False), dim)
    return pa.RecordBatch.from_arrays(
        [column("doc_key"), column("ordinal"), column("char_start"), column("char_end"), column("n_tokens"),
         chunk_id, text, embedding], schema=row_schema(dim))


def rows_from_slab(view: SlabView, batch: SlabBatch, vectors: np.ndarray) -> pa.RecordBatch:
    """A batch's rows as Arrow columns copied out of its slab (the slab may be reused afterwards)."""
    return rows_of([copy_rows(view, batch, vectors)])


__all__ = ["WRITE_BLOCK_ROWS", "WRITE_BLOCK_WAIT_S", "row_schema", "SlabRows", "copy_rows", "rows_of", "rows_from_slab"]
