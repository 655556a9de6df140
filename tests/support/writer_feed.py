"""Feed `DatasetWriter` chunk objects the way the pipeline's writer thread feeds it slab rows.

The pipeline hands the writer Arrow row blocks (`orchestration.pipeline.row_schema`) and registers
documents by key; store tests describe documents as `ChunkedDocument`s. `ChunkFeed` turns one into
the other with the same schema, so the tests exercise the writer's real columnar API.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from hades_gpu.orchestration.pipeline import row_schema
from hades_gpu.records import Chunk, ChunkedDocument, DocumentResult
from hades_gpu.store.writer import DatasetWriter


@dataclass
class EmbeddedBatch:
    """Chunks and their vectors, in row order (any mix of documents)."""

    chunks: list[Chunk]
    embeddings: np.ndarray


def rows_of(chunks: list[Chunk], keys: list[int], embeddings: np.ndarray) -> pa.RecordBatch:
    embeddings = np.asarray(embeddings, dtype=np.float32)
    dim = int(embeddings.shape[1])
    return pa.RecordBatch.from_arrays([
        pa.array(keys, pa.int64()), pa.array([c.ordinal for c in chunks], pa.int32()),
        pa.array([c.char_start for c in chunks], pa.int64()), pa.array([c.char_end for c in chunks], pa.int64()),
        pa.array([c.n_tokens for c in chunks], pa.int32()), pa.array([c.chunk_id for c in chunks], pa.string()),
        pa.array([c.text for c in chunks], pa.string()),
        pa.FixedSizeListArray.from_arrays(pa.array(embeddings.reshape(-1), pa.float32()), dim),
    ], schema=row_schema(dim))


class ChunkFeed:
    """A `DatasetWriter` driven with documents and chunk batches; every other attribute is the writer's."""

    def __init__(self, writer: DatasetWriter) -> None:
        self.writer = writer
        self.keys: dict[str, int] = {}  # doc_id -> key of its current attempt
        self._next = 0

    def begin_document(self, doc: ChunkedDocument) -> int:
        key = self._next
        self._next += 1
        self.keys[doc.ref.doc_id] = key
        self.writer.begin_document(key, doc.ref, DocumentResult(
            key=key, content_hash=doc.content_hash, n_chunks=len(doc.chunks),
            tokens=sum(c.n_tokens for c in doc.chunks), references=list(doc.references)))
        return key

    def add(self, batch: EmbeddedBatch) -> None:
        self.writer.add_rows(rows_of(batch.chunks, [self.keys.get(c.doc_id, -1) for c in batch.chunks],
                                     batch.embeddings))

    def __getattr__(self, name: str):
        return getattr(self.writer, name)

    def __setattr__(self, name: str, value) -> None:
        if name in ("writer", "keys", "_next"):
            object.__setattr__(self, name, value)
        else:  # e.g. on_commit
            setattr(self.writer, name, value)
