"""Parquet dataset writer with exactly-once documents across crashes and re-runs.

A document's rows are written only once all its chunks are embedded, and always into one part file,
so a part holds whole documents. Commit order makes a SIGKILL at any point safe:
1. write `chunks/<part>.parquet` and `documents/<part>.parquet` (temporary name, then rename; size
   and sha256 kept for the manifest);                                        [after_part_written]
2. older parts that held earlier versions of re-ingested (changed) documents are written again
   without them, under NEW part names (the old files are not touched);      [after_old_rewritten]
3. one SQLite transaction (`store.manifest`) names the new part, points the other documents of each
   older part at its rewrite and retires the older part;    [before_manifest_commit, inside it]
4. only then the retired files are deleted.                               [after_manifest_commit]
Until 3 commits, the manifest names exactly the old files, all still intact; after it, exactly the
new ones. On start-up, committed parts are verified (`store.verify`; a damaged one is dropped with its
documents, which are ingested again), then part files the manifest does not name are deleted (an
interrupted commit's, or retired ones): nothing is lost and nothing is written twice.

The names in brackets are kill points: with `HADES_TEST_KILL_AT=<name>` in the environment the
process SIGKILLs itself there (tests only; `kill_point`).

The writer holds the output lock of its shard (`store.lock`) from open to close; a writer in a
process of its own (`orchestration.writer_process`) is opened with `opened=True`, its parent holding
the lock and having opened the output (`open_output`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from hades_gpu.records import DocumentRef, DocumentResult, display_path, printable
from hades_gpu.store.arrow_columns import binaries, numeric, string_lists, strings, values_of
from hades_gpu.store.atomic import FileRecord, StreamedFile, atomic_write_parquet, fsync_dir
from hades_gpu.store.layout import CHUNKS_DIR, DOCUMENT_SCHEMA, DOCUMENTS_DIR, chunk_schema, part_name, part_path
from hades_gpu.store.lock import OutputLock
from hades_gpu.store.manifest import DocumentEntry, Manifest, Replacement
from hades_gpu.store.verify import PartProblem, repair_at_start

log = logging.getLogger(__name__)

KILL_ENV = "HADES_TEST_KILL_AT"
KILL_POINTS = ("after_part_written", "after_old_rewritten", "before_manifest_commit", "after_manifest_commit")


def kill_point(name: str) -> None:
    """Tests only: SIGKILL this process at the named point of a commit when HADES_TEST_KILL_AT=name."""
    if os.environ.get(KILL_ENV) == name:
        logging.shutdown()
        os.kill(os.getpid(), signal.SIGKILL)


ROW_GROUPS_PER_PART = 4  # ready rows are encoded into the open part in about this many row groups
CHUNK_DICTIONARY_COLUMNS = ["doc_id", "path", "modality"]  # one value per document; the rest are unique


def chunk_write_options(dim: int) -> dict:
    """Parquet options of a chunks part. The embedding column is stored uncompressed and without
    min/max statistics: model vectors barely compress (zstd: 8% smaller) while compressing them was
    30% of the writer's encoding CPU, and a vector column's min/max prune no reader's query."""
    columns = chunk_schema(dim).names
    return dict(compression={name: "none" if name == "embedding" else "zstd" for name in columns},
                use_dictionary=CHUNK_DICTIONARY_COLUMNS,
                write_statistics=[name for name in columns if name != "embedding"])


def open_output(manifest: Manifest, settings: Optional[dict[str, Any]] = None) -> tuple[list[PartProblem], list[str]]:
    """What a writer does before its first row, under the output lock: a run whose `settings` (what
    shapes the chunks) differ from the output's is refused before anything changes
    (`Manifest.check_settings`); damaged committed parts are dropped with their documents
    (`store.verify.repair_at_start`), then part files (and temporaries) of this shard that the
    manifest does not name are deleted. Returns (problems, files removed)."""
    if settings:
        manifest.check_settings(settings)
    output, shard = manifest.output, manifest.shard
    chunks_dir, docs_dir = output / CHUNKS_DIR, output / DOCUMENTS_DIR
    chunks_dir.mkdir(parents=True, exist_ok=True)
    docs_dir.mkdir(parents=True, exist_ok=True)
    damaged = repair_at_start(manifest)
    committed = set(manifest.parts())
    removed = []
    prefix = f"part-{shard}-"
    for folder in (chunks_dir, docs_dir):
        for path in folder.iterdir():
            name = path.name
            is_tmp = name.startswith(f".{prefix}")
            is_orphan = name.startswith(prefix) and path.stem not in committed
            if (is_tmp or is_orphan) and path.is_dir() and not path.is_symlink():
                # not a file this tool writes: left alone (unlinking it failed every later run, "Is a directory")
                log.warning("%s is a folder named like a part file: not the output's, left alone (remove it: readers "
                            "of the whole folder, such as pandas, fail on it)", path)
            elif is_tmp or is_orphan:
                path.unlink()
                removed.append(str(path))
    if removed:
        fsync_dir(chunks_dir)
        fsync_dir(docs_dir)
        log.info("resume: removed %d interrupted part file(s)", len(removed))
    return damaged, removed


def _warn_replaced_from_elsewhere(ready: list["_Document"], old_paths: dict[str, str]) -> None:
    """One warning line when a commit replaces documents whose committed copy was read from another
    file (same path relative to its corpus folder, another folder): an output filled from several
    folders in turn keeps one `README.md`, and that must not happen silently."""
    moved = [(doc.ref.rel_path, old_paths[doc.ref.doc_id], display_path(doc.ref.path)) for doc in ready
             if doc.ref.doc_id in old_paths and old_paths[doc.ref.doc_id] != display_path(doc.ref.path)]
    if moved:
        rel, was, now = moved[0]
        log.warning("store: %d document(s) replaced by a file of another folder with the same relative path, e.g. %s: "
                    "was %s, now %s (documents are identified by their path relative to the corpus folder given; set "
                    "documents.root to a common parent folder to keep both)", len(moved), printable(rel),
                    printable(was), printable(now))


class _OpenPart:
    """The part being filled: its chunk rows are encoded as row groups while the run goes on, so a
    commit only closes the file, and rows wait in memory for one row group, not for a whole part."""

    def __init__(self, path: Path, name: str, number: int, dim: int) -> None:
        self.name = name
        self.number = number
        self.file = StreamedFile(path)
        self.writer = pq.ParquetWriter(self.file.tmp, chunk_schema(dim), **chunk_write_options(dim))
        self.docs: list["_Document"] = []
        self.rows = 0

    def write(self, docs: list["_Document"], table: pa.Table) -> None:
        if table.num_rows:
            self.writer.write_table(table)
        self.docs.extend(docs)
        self.rows += table.num_rows

    def close(self) -> FileRecord:
        self.writer.close()
        return dataclasses.replace(self.file.commit(), rows=self.rows)

    def discard(self) -> None:
        try:
            self.writer.close()
        finally:
            self.file.discard()


@dataclass
class _Document:
    """A document whose rows are arriving (or have all arrived) under one key."""

    key: int
    ref: DocumentRef
    content_hash: str
    n_chunks: int
    references: list[str]
    remaining: int
    encoding: str = ""


class DatasetWriter:
    """Collects embedded chunks per document and commits whole documents in part files.

    Args:
        output (Path): dataset folder.
        shard (str): shard name used in part and manifest names.
        dim (int): embedding width.
        rows_per_part (int): chunks per part file (a part is cut only between documents).
        opened (bool): the output was opened already (`open_output`, under the output lock, by the
            process that started this one: `orchestration.writer_process`); default: take the
            shard's output lock for the writer's life and open the output here.
        settings (dict, optional): what shapes this run's chunks, checked against the output's
            (`open_output`). Default: not checked.
    """

    def __init__(self, output: Path, shard: str, dim: int, rows_per_part: int, opened: bool = False,
                 settings: Optional[dict[str, Any]] = None, commit_interval_s: Optional[float] = None) -> None:
        self.output = Path(output)
        self.shard = shard
        self.dim = dim
        self.rows_per_part = rows_per_part
        self.commit_interval_s = commit_interval_s
        self._last_commit = time.monotonic()
        self.chunks_dir = self.output / CHUNKS_DIR
        self.docs_dir = self.output / DOCUMENTS_DIR
        self.output_lock = OutputLock(self.output, shard)
        if not opened:
            self.output_lock.acquire()  # OutputLockedError: another run's
        try:
            self.manifest = Manifest.load(self.output, shard)
            try:
                self.damaged: list[PartProblem] = []
                self.removed_orphans: list[str] = []
                if not opened:
                    self.damaged, self.removed_orphans = open_output(self.manifest, settings)
            except BaseException:
                self.manifest.close()
                raise
        except BaseException:
            self.output_lock.release()
            raise
        self._pending: dict[int, _Document] = {}  # key -> document still missing rows
        self._abandoned: set[int] = set()
        self._blocks: list[pa.RecordBatch] = []  # rows received, not yet committed
        self._ready: list[_Document] = []
        self._ready_rows = 0
        self._open: Optional[_OpenPart] = None  # guarded by _flush_lock
        self.row_group_rows = max(1, rows_per_part // ROW_GROUPS_PER_PART)
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self.parts_written = 0  # part files written: new ones and older ones rewritten without replaced documents
        self.rows_written = 0
        self.documents_committed = 0
        self.on_commit: Optional[Callable[[int, int], None]] = None  # (documents, rows) per commit
        self._stat_updates: dict[str, tuple[int, int, Optional[int]]] = {}  # rel_path -> stat, see note_unchanged
        self._closed = False

    # -- stage calls ---------------------------------------------------------------------------------
    def begin_document(self, key: int, ref: DocumentRef, result: DocumentResult) -> None:
        """Register a document before its rows arrive (the router calls it when a worker reports the
        document). Its size and mtime (from discovery) go into the manifest for the next run's resume."""
        doc = _Document(key=key, ref=ref, content_hash=result.content_hash, n_chunks=result.n_chunks,
                        references=list(result.references), remaining=result.n_chunks,
                        encoding=result.encoding)
        with self._lock:
            if key in self._pending or key in self._abandoned:
                raise ValueError(f"document key {key} registered twice")
            if doc.remaining == 0:
                self._ready.append(doc)
            else:
                self._pending[key] = doc

    def abandon(self, key: int) -> None:
        """Forget a document attempt (its worker died before all its rows arrived; it is retried
        under a new key): rows already stored and rows still to come under `key` are dropped."""
        with self._lock:
            self._abandoned.add(key)
            self._pending.pop(key, None)

    def add_rows(self, rows: pa.RecordBatch) -> None:
        """Store one embedded batch's rows (`orchestration.pipeline.row_schema`); commit a part once
        enough whole documents are ready. Counted per document, never per row in Python."""
        width = rows.schema.field("embedding").type.list_size
        if width != self.dim:
            raise ValueError(f"embeddings must have {self.dim} dimensions (got {width})")
        keys = values_of(rows.column("doc_key"))
        with self._lock:
            if self._abandoned:
                keep = ~np.isin(keys, np.fromiter(self._abandoned, dtype=np.int64))
                if not keep.all():
                    rows = rows.filter(numeric(keep))
                    keys = keys[keep]
            # a batch holds tens to hundreds of rows: Counter over a list is ~10x cheaper than np.unique's
            # per-call cost here (0.06 s of the writer thread per 1,000 batches)
            for key, count in Counter(keys.tolist()).items():
                doc = self._pending.get(key)
                if doc is None:
                    raise KeyError(f"{count} row(s) of unregistered document key {key}")
                if count > doc.remaining:
                    raise ValueError(f"{doc.ref.rel_path}: {count} more rows than its {doc.n_chunks} chunks")
                doc.remaining -= count
                if doc.remaining == 0:
                    del self._pending[key]
                    self._ready.append(doc)
                    self._ready_rows += doc.n_chunks
            if rows.num_rows:
                self._blocks.append(rows)
            due = self._commit_due()
            should_write = self._ready_rows >= self.row_group_rows or (due and bool(self._ready))
        if should_write or due:
            with self._flush_lock:
                self._write_ready()
                if self._open is not None and (self._open.rows >= self.rows_per_part or due):
                    self._commit(self._open)

    def _commit_due(self) -> bool:
        """`commit_interval_s` has passed since the last commit (or the start): what is ready is
        committed now, however small the part, so an interrupted run keeps it."""
        return self.commit_interval_s is not None and time.monotonic() - self._last_commit >= self.commit_interval_s

    def flush(self) -> None:
        """Commit every ready document: the open part with them (no-op when there is none)."""
        with self._flush_lock:
            self._write_ready()
            if self._open is not None:
                self._commit(self._open)

    def discard_open_part(self) -> None:
        """A failed run: drop the part being filled, uncommitted (its documents are redone next run),
        and end the writer (manifest closed, output lock released), as `WriterProcess` ends its child.
        Why at once: the caller's traceback (a notebook keeps the last one) kept the writer, its lock
        and its database open, and another thread of the process was refused the output."""
        with self._flush_lock:
            part, self._open = self._open, None
            if part is not None:
                part.discard()
        if not self._closed:
            self._closed = True
            self.manifest.close()
            self.output_lock.release()

    def _write_ready(self) -> None:
        """Encode the ready documents' rows into the open part as one row group (under _flush_lock)."""
        with self._lock:
            ready, self._ready, self._ready_rows = self._ready, [], 0
            if not ready:
                return
            rows = self._take_rows([d.key for d in ready if d.n_chunks])
        if self._open is None:
            number = self.manifest.next_part_number()
            name = part_name(self.shard, number)
            self._open = _OpenPart(part_path(self.output, CHUNKS_DIR, name), name, number, self.dim)
        self._open.write(ready, self._chunk_table(ready, rows))

    def _take_rows(self, keys: list[int]) -> Optional[pa.Table]:
        """The stored rows of `keys` (removed from the store), and rows of abandoned keys dropped."""
        if not self._blocks:
            return None
        # one chunk per column first: take/filter over a table of ~1000 small batches (one per embedded
        # batch) resolve chunks per row and cost ~5x the copy itself (measured: 0.29 s vs 0.01 + 0.12 s)
        table = pa.Table.from_batches(self._blocks).combine_chunks()
        doc_keys = values_of(table.column("doc_key"))
        taken = np.isin(doc_keys, np.asarray(keys, dtype=np.int64))
        still = np.isin(doc_keys, np.fromiter(self._pending, dtype=np.int64))
        self._blocks = table.filter(numeric(still)).to_batches() if still.any() else []
        # a view when every row is taken (the usual case); `_chunk_table` copies once
        return table if taken.all() else table.filter(numeric(taken))

    def remove_documents(self, rel_paths: list[str]) -> int:
        """Remove committed documents and their chunks (`documents.remove_missing`): each part holding
        some is written again without them under a new name and one manifest transaction swaps them
        in, as a changed document's older part is (module docstring, steps 2-4). Call it before any
        row is added (it numbers new parts). Returns how many documents were removed."""
        with self._flush_lock:
            if self._open is not None or self._blocks:
                raise RuntimeError("remove_documents runs before the writer takes rows")
            replacements = self._rewrite_parts_without(rel_paths, self.manifest.next_part_number())
            if not replacements:
                return 0
            kill_point("after_old_rewritten")
            removed = self.manifest.remove_documents(rel_paths, replacements,
                                                     before_commit=lambda: kill_point("before_manifest_commit"))
            kill_point("after_manifest_commit")
            self._delete_parts([r.old_part for r in replacements])
            self.parts_written += sum(1 for r in replacements if r.new_part is not None)  # rewritten: written too
            return removed

    def note_unchanged(self, rel_path: str, size: int, mtime_ns: int, stat_tag: Optional[int] = None) -> None:
        """A committed document was read again (its stat changed) and its content hash is the same:
        remember the new size, mtime and stat tag, so the next run skips it without reading it. Saved
        at close; lost on a crash, which only costs that next run a re-read."""
        with self._lock:
            self._stat_updates[rel_path] = (int(size), int(mtime_ns), None if stat_tag is None else int(stat_tag))

    def close(self, interrupted: bool = False) -> None:
        """Commit what is ready. Documents still missing chunks are left uncommitted (redone next run):
        a warning at a run's end, expected (DEBUG) when the run was `interrupted`. A second
        call does nothing (a run interrupted just after closing closes again)."""
        if self._closed:
            return
        self.flush()
        with self._flush_lock, self._lock:
            updates, self._stat_updates = self._stat_updates, {}
            self.manifest.update_stats(updates)
        with self._lock:
            incomplete = len(self._pending)
        if incomplete:
            log.log(logging.DEBUG if interrupted else logging.WARNING,
                    "%d document(s) were not fully embedded and were not committed", incomplete)
        self.manifest.close()
        self.output_lock.release()
        self._closed = True

    @property
    def pending_documents(self) -> int:
        with self._lock:
            return len(self._pending)

    # -- commit ----------------------------------------------------------------------------------------
    def _commit(self, open_part: _OpenPart) -> None:
        """Close the open part and commit its documents (under _flush_lock)."""
        self._open = None
        ready, number, part = open_part.docs, open_part.number, open_part.name
        try:
            chunk_file = open_part.close()
        except BaseException:
            open_part.discard()
            raise
        files = {CHUNKS_DIR: chunk_file,
                 DOCUMENTS_DIR: atomic_write_parquet(self._doc_table(ready), part_path(self.output, DOCUMENTS_DIR, part))}
        kill_point("after_part_written")

        old_paths: dict[str, str] = {}
        replacements = self._rewrite_parts_without([doc.ref.rel_path for doc in ready], number + 1, old_paths)
        kill_point("after_old_rewritten")
        _warn_replaced_from_elsewhere(ready, old_paths)

        self.manifest.commit_part(part, [
            (doc.ref.rel_path, DocumentEntry(doc_id=doc.ref.doc_id, content_hash=doc.content_hash,
                                             n_chunks=doc.n_chunks, part=part, size=doc.ref.size,
                                             mtime_ns=doc.ref.mtime_ns, stat_tag=doc.ref.stat_tag))
            for doc in ready], files=files, replaced=replacements,
            before_commit=lambda: kill_point("before_manifest_commit"))
        kill_point("after_manifest_commit")
        if replacements:
            self._delete_parts([r.old_part for r in replacements])
        self.parts_written += 1 + sum(1 for r in replacements if r.new_part is not None)  # and parts rewritten
        self.rows_written += open_part.rows
        self.documents_committed += len(ready)
        self._last_commit = time.monotonic()
        if self.on_commit is not None:
            self.on_commit(len(ready), open_part.rows)

    def _chunk_table(self, ready: list[_Document], rows: Optional[pa.Table]) -> pa.Table:
        """One row group's rows: ordered by document (as they became ready), then ordinal; the
        per-document columns (doc id, path, modality) taken by each row's document position."""
        if rows is None or rows.num_rows == 0:
            return chunk_schema(self.dim).empty_table()
        ready_keys = np.array([d.key for d in ready], dtype=np.int64)
        order = np.argsort(ready_keys)
        row_keys = values_of(rows.column("doc_key"))
        position = order[np.searchsorted(ready_keys[order], row_keys)]  # each row's document, 0..len(ready)-1
        sort = np.lexsort((values_of(rows.column("ordinal")), position))
        rows = rows.take(numeric(sort, copy=False))  # fresh index arrays: viewed, not copied again
        position = numeric(position[sort], copy=False)
        per_doc = lambda values: strings(values).take(position)  # noqa: E731
        return pa.Table.from_arrays([
            per_doc([d.ref.doc_id for d in ready]), rows.column("chunk_id"),
            per_doc([display_path(d.ref.path) for d in ready]),
            per_doc([d.ref.modality for d in ready]), rows.column("ordinal"), rows.column("char_start"),
            rows.column("char_end"), rows.column("n_tokens"), rows.column("text"), rows.column("embedding"),
        ], schema=chunk_schema(self.dim))

    @staticmethod
    def _doc_table(ready: list[_Document]) -> pa.Table:
        """The part's documents table, one row per document in the order they became ready."""
        return pa.Table.from_arrays([
            strings([d.ref.doc_id for d in ready]),
            strings([display_path(d.ref.path) for d in ready]),  # valid text; exact: path_bytes
            strings([d.ref.rel_path for d in ready]),
            strings([d.ref.modality for d in ready]),
            strings([d.ref.language for d in ready]),
            strings([d.content_hash for d in ready]),
            numeric(np.array([d.n_chunks for d in ready], dtype=np.int32)),
            string_lists([list(d.references) for d in ready]),
            binaries([d.ref.rel_path_bytes for d in ready]),
            binaries([d.ref.path_bytes for d in ready]),
            strings([d.encoding for d in ready]),
        ], schema=DOCUMENT_SCHEMA)

    def _rewrite_parts_without(self, rel_paths: list[str], first_number: int,
                               old_paths: Optional[dict[str, str]] = None) -> list[Replacement]:
        """Every committed part holding some of `rel_paths`' documents, written again without them
        under new names numbered from `first_number` (a commit's changed documents; removed ones).
        `old_paths`, when given, receives doc id -> the source path the dropped copy was read from."""
        by_part: dict[str, set[str]] = {}  # old part -> doc ids to drop from it
        for entry in self.manifest.lookup_many(rel_paths).values():
            by_part.setdefault(entry.part, set()).add(entry.doc_id)
        return [self._rewrite_without(part, doc_ids, part_name(self.shard, first_number + i), old_paths)
                for i, (part, doc_ids) in enumerate(sorted(by_part.items()))]

    def _rewrite_without(self, part: str, doc_ids: set[str], new_part: str,
                         old_paths: Optional[dict[str, str]] = None) -> Replacement:
        """Write `part` again as `new_part` without the given documents (re-ingested or removed); the
        old files are left as they are until the manifest has retired them."""
        try:
            tables = {table: pq.read_table(part_path(self.output, table, part)) for table in (CHUNKS_DIR, DOCUMENTS_DIR)}
        except (OSError, pa.ArrowException) as err:  # damaged during this run: its documents are redone next run
            log.warning("store: committed part %s could not be read to replace changed documents (%s); it is "
                        "retired and its other documents will be ingested again by the next run", part, err)
            return Replacement(part)
        kept = {table: t.filter(pa.array([d not in doc_ids for d in t.column("doc_id").to_pylist()], pa.bool_()))
                for table, t in tables.items()}
        if old_paths is not None:
            docs = tables[DOCUMENTS_DIR]
            old_paths.update((d, p) for d, p in zip(docs.column("doc_id").to_pylist(), docs.column("path").to_pylist())
                             if d in doc_ids)
        if kept[DOCUMENTS_DIR].num_rows == 0:
            return Replacement(part)
        files: dict[str, FileRecord] = {
            table: atomic_write_parquet(t, part_path(self.output, table, new_part),
                                        **(chunk_write_options(self.dim) if table == CHUNKS_DIR else {}))
            for table, t in kept.items()}
        return Replacement(part, new_part, files)

    def _delete_parts(self, parts: list[str]) -> None:
        """Delete retired parts' files (after the manifest stopped naming them; a crash before this
        leaves orphans, which the next start removes)."""
        for part in parts:
            for table in (CHUNKS_DIR, DOCUMENTS_DIR):
                part_path(self.output, table, part).unlink(missing_ok=True)
        fsync_dir(self.chunks_dir)
        fsync_dir(self.docs_dir)
