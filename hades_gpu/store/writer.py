"""Parquet dataset writer with exactly-once documents across crashes and re-runs.

A document's rows are written only once all its chunks are embedded, and always into one part file,
so a part holds whole documents. Commit order makes a SIGKILL at any point safe:
1. write `chunks/<part>.parquet` and `documents/<part>.parquet` (temporary name, then rename);
2. rewrite older parts that held earlier versions of re-ingested (changed) documents without them;
3. commit the part in the manifest (one SQLite transaction, `store.manifest`), which now names it.
On start-up, part files the manifest does not name are deleted; their documents are not in the
manifest, so they are ingested again: nothing is lost and nothing is written twice.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from hades_gpu.records import ChunkedDocument, EmbeddedBatch
from hades_gpu.store.atomic import atomic_write_parquet, fsync_dir
from hades_gpu.store.layout import CHUNKS_DIR, DOCUMENT_SCHEMA, DOCUMENTS_DIR, chunk_schema, part_name, part_path
from hades_gpu.store.manifest import DocumentEntry, Manifest

log = logging.getLogger(__name__)


@dataclass
class _Pending:
    doc: ChunkedDocument
    embeddings: np.ndarray  # float32 (n_chunks, dim)
    remaining: int
    size: int
    mtime_ns: int


class DatasetWriter:
    """Collects embedded chunks per document and commits whole documents in part files.

    Args:
        output (Path): dataset folder.
        shard (str): shard name used in part and manifest names.
        dim (int): embedding width.
        rows_per_part (int): chunks per part file (a part is cut only between documents).
    """

    def __init__(self, output: Path, shard: str, dim: int, rows_per_part: int) -> None:
        self.output = Path(output)
        self.shard = shard
        self.dim = dim
        self.rows_per_part = rows_per_part
        self.chunks_dir = self.output / CHUNKS_DIR
        self.docs_dir = self.output / DOCUMENTS_DIR
        self.chunks_dir.mkdir(parents=True, exist_ok=True)
        self.docs_dir.mkdir(parents=True, exist_ok=True)
        self.manifest = Manifest.load(self.output, shard)
        self.removed_orphans = self._remove_orphans()
        self._pending: dict[str, _Pending] = {}
        self._ready: list[_Pending] = []
        self._ready_rows = 0
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self.parts_written = 0
        self.rows_written = 0
        self.documents_committed = 0
        self.on_commit: Optional[Callable[[int, int], None]] = None  # (documents, rows) per commit
        self._stat_updates: dict[str, tuple[int, int]] = {}  # rel_path -> (size, mtime_ns), see note_unchanged

    # -- start-up ----------------------------------------------------------------------------------
    def _remove_orphans(self) -> list[str]:
        """Delete part files (and temporaries) of this shard that the manifest does not name."""
        committed = set(self.manifest.parts())
        removed = []
        prefix = f"part-{self.shard}-"
        for folder in (self.chunks_dir, self.docs_dir):
            for path in folder.iterdir():
                name = path.name
                is_tmp = name.startswith(f".{prefix}")
                is_orphan = name.startswith(prefix) and path.stem not in committed
                if is_tmp or is_orphan:
                    path.unlink()
                    removed.append(str(path))
        if removed:
            fsync_dir(self.chunks_dir)
            fsync_dir(self.docs_dir)
            log.info("resume: removed %d interrupted part file(s)", len(removed))
        return removed

    # -- stage calls ---------------------------------------------------------------------------------
    def begin_document(self, doc: ChunkedDocument) -> None:
        """Register a document before its chunks arrive (called by the batcher thread). Its size and
        mtime (from discovery, `DocumentRef`) go into the manifest for the next run's resume check."""
        entry = _Pending(doc=doc, embeddings=np.zeros((len(doc.chunks), self.dim), dtype=np.float32),
                         remaining=len(doc.chunks), size=doc.ref.size, mtime_ns=doc.ref.mtime_ns)
        with self._lock:
            if entry.remaining == 0:
                self._ready.append(entry)
            else:
                self._pending[doc.ref.doc_id] = entry

    def add(self, batch: EmbeddedBatch) -> None:
        """Store a batch's embeddings; commit a part once enough whole documents are ready."""
        if batch.embeddings.shape != (len(batch.chunks), self.dim):
            raise ValueError(f"embeddings must be ({len(batch.chunks)}, {self.dim}) (got {batch.embeddings.shape})")
        with self._lock:
            for row, chunk in enumerate(batch.chunks):
                entry = self._pending.get(chunk.doc_id)
                if entry is None:
                    raise KeyError(f"chunk {chunk.chunk_id} of unregistered document {chunk.doc_id}")
                entry.embeddings[chunk.ordinal] = batch.embeddings[row]
                entry.remaining -= 1
                if entry.remaining == 0:
                    del self._pending[chunk.doc_id]
                    self._ready.append(entry)
                    self._ready_rows += len(entry.doc.chunks)
            should_flush = self._ready_rows >= self.rows_per_part
        if should_flush:
            self.flush()

    def flush(self) -> None:
        """Commit every ready document as one part (no-op when none is ready)."""
        with self._flush_lock:
            with self._lock:
                ready, self._ready, self._ready_rows = self._ready, [], 0
            if ready:
                self._commit(ready)

    def note_unchanged(self, rel_path: str, size: int, mtime_ns: int) -> None:
        """A committed document was read again (its size or mtime changed) and its content hash is the
        same: remember the new size and mtime, so the next run skips it without reading it. Saved at
        close; lost on a crash, which only costs that next run a re-read."""
        with self._lock:
            self._stat_updates[rel_path] = (int(size), int(mtime_ns))

    def close(self) -> None:
        """Commit what is ready. Documents still missing chunks are left uncommitted (redone next run)."""
        self.flush()
        with self._flush_lock, self._lock:
            updates, self._stat_updates = self._stat_updates, {}
            self.manifest.update_stats(updates)
        with self._lock:
            incomplete = len(self._pending)
        if incomplete:
            log.warning("%d document(s) were not fully embedded and were not committed", incomplete)
        self.manifest.close()

    @property
    def pending_documents(self) -> int:
        with self._lock:
            return len(self._pending)

    # -- commit ----------------------------------------------------------------------------------------
    def _commit(self, ready: list[_Pending]) -> None:
        part = part_name(self.shard, self.manifest.next_part_number())
        chunk_table, doc_table = self._tables(ready)
        atomic_write_parquet(chunk_table, part_path(self.output, CHUNKS_DIR, part))
        atomic_write_parquet(doc_table, part_path(self.output, DOCUMENTS_DIR, part))

        replaced: dict[str, set[str]] = {}  # old part -> doc ids to drop from it
        for entry in ready:
            old = self.manifest.lookup(entry.doc.ref.rel_path)
            if old is not None:
                replaced.setdefault(old.part, set()).add(old.doc_id)
        for old_part, doc_ids in replaced.items():
            self._drop_documents(old_part, doc_ids)

        self.manifest.commit_part(part, [
            (entry.doc.ref.rel_path, DocumentEntry(doc_id=entry.doc.ref.doc_id, content_hash=entry.doc.content_hash,
                                                   n_chunks=len(entry.doc.chunks), part=part, size=entry.size,
                                                   mtime_ns=entry.mtime_ns))
            for entry in ready])
        self.parts_written += 1
        self.rows_written += chunk_table.num_rows
        self.documents_committed += len(ready)
        if self.on_commit is not None:
            self.on_commit(len(ready), chunk_table.num_rows)

    def _tables(self, ready: list[_Pending]) -> tuple[pa.Table, pa.Table]:
        chunks = [c for entry in ready for c in entry.doc.chunks]
        embeddings = np.concatenate([e.embeddings for e in ready]) if chunks else np.zeros((0, self.dim), np.float32)
        emb_array = pa.FixedSizeListArray.from_arrays(pa.array(embeddings.reshape(-1), type=pa.float32()), self.dim)
        chunk_table = pa.Table.from_arrays([
            pa.array([c.doc_id for c in chunks], pa.string()),
            pa.array([c.chunk_id for c in chunks], pa.string()),
            pa.array([c.path for c in chunks], pa.string()),
            pa.array([c.modality for c in chunks], pa.string()),
            pa.array([c.ordinal for c in chunks], pa.int32()),
            pa.array([c.char_start for c in chunks], pa.int64()),
            pa.array([c.char_end for c in chunks], pa.int64()),
            pa.array([c.n_tokens for c in chunks], pa.int32()),
            pa.array([c.text for c in chunks], pa.string()),
            emb_array,
        ], schema=chunk_schema(self.dim))
        docs = [e.doc for e in ready]
        doc_table = pa.Table.from_arrays([
            pa.array([d.ref.doc_id for d in docs], pa.string()),
            pa.array([d.ref.path for d in docs], pa.string()),
            pa.array([d.ref.rel_path for d in docs], pa.string()),
            pa.array([d.ref.modality for d in docs], pa.string()),
            pa.array([d.ref.language for d in docs], pa.string()),
            pa.array([d.content_hash for d in docs], pa.string()),
            pa.array([len(d.chunks) for d in docs], pa.int32()),
            pa.array([list(d.references) for d in docs], pa.list_(pa.string())),
        ], schema=DOCUMENT_SCHEMA)
        return chunk_table, doc_table

    def _drop_documents(self, part: str, doc_ids: set[str]) -> None:
        """Rewrite an older part without the given documents (they were re-ingested)."""
        for folder in (self.chunks_dir, self.docs_dir):
            path = folder / f"{part}.parquet"
            if not path.exists():
                continue
            table = pq.read_table(path)
            keep = pa.array([d not in doc_ids for d in table.column("doc_id").to_pylist()])
            atomic_write_parquet(table.filter(keep), path)
