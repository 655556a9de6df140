"""The manifest of one shard: which part files are committed and which documents they hold.

A part file exists on disk before the manifest names it, so after a crash the manifest is the truth:
parts it does not name are interrupted writes and are removed, and their documents are ingested
again.

Why SQLite (it ships with Python): a commit must cost the same with 10 or 10^6 documents already
in the shard. A JSON file has to be rewritten whole at every commit; a SQLite transaction touches
only the B-tree pages of the rows it writes, and a document lookup is an index probe instead of a
dict held in memory. `synchronous=FULL` with the rollback journal makes a committed transaction
survive a SIGKILL or a power loss; a torn write is rolled back on the next open. The database sits
beside the parts as `manifest-<shard>.sqlite`; it needs a filesystem with working POSIX locks
(local disks and cluster filesystems; not every NFS mount).

Each committed part also has one `part_files` row per file (chunks/ and documents/): its row count,
size, sha256 and stat when the writer wrote it (`store.atomic.FileRecord`), so `store.verify` can
tell a committed part that is still as written from one deleted, truncated or altered since. A part
committed before that table existed has no rows there; it is checked against its documents' rows.
(Added tables and an index only: the version stays 2, and an older build can still read the file.)

Older outputs have `manifest.json` / `manifest-<shard>.json`; opening such a shard imports it once
(then removes the JSON), and `committed_parts` still reads one that was never opened for writing.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sqlite3
import threading
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import numpy as np

from hades_gpu.store.atomic import FileRecord, fsync_dir

log = logging.getLogger(__name__)

MANIFEST_VERSION = 2
LEGACY_JSON_VERSION = 1
_ENTRY_COLUMNS = "doc_id, content_hash, n_chunks, part, size, mtime_ns, stat_tag"  # a DocumentEntry's fields, in order
_INSERT_DOCUMENT = ("INTO documents (rel_path, doc_id, content_hash, n_chunks, part, size, mtime_ns, stat_tag) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?)")
LOOKUP_BATCH = 500  # keys per IN (...) query: under SQLite's bound-parameter limit (999 before 3.32)
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS parts (number INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE);
CREATE TABLE IF NOT EXISTS documents (
    rel_path TEXT PRIMARY KEY, doc_id TEXT NOT NULL, content_hash TEXT NOT NULL, n_chunks INTEGER NOT NULL,
    part TEXT NOT NULL, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL, stat_tag INTEGER);
CREATE TABLE IF NOT EXISTS part_files (
    part TEXT NOT NULL, tbl TEXT NOT NULL, rows INTEGER NOT NULL, size INTEGER NOT NULL, checksum TEXT NOT NULL,
    mtime_ns INTEGER NOT NULL, ctime_ns INTEGER NOT NULL, PRIMARY KEY (part, tbl));
CREATE INDEX IF NOT EXISTS documents_by_part ON documents(part);
"""


def manifest_path(output: Path, shard: str) -> Path:
    return Path(output) / f"manifest-{shard}.sqlite"


def legacy_manifest_path(output: Path, shard: str) -> Path:
    """The JSON manifest of older outputs: `manifest.json` for shard s0, `manifest-<shard>.json` else."""
    return Path(output) / ("manifest.json" if shard == "s0" else f"manifest-{shard}.json")


def _in_batches(keys: Iterable[str]) -> Iterator[tuple[tuple[str, ...], str]]:
    """The distinct `keys` in batches of `LOOKUP_BATCH`, each with its ``?,?,...`` placeholders."""
    unique = list(dict.fromkeys(keys))
    for start in range(0, len(unique), LOOKUP_BATCH):
        batch = tuple(unique[start:start + LOOKUP_BATCH])
        yield batch, ",".join("?" * len(batch))


class ManifestError(ValueError):
    """A manifest that cannot be read (damaged, or written by an unknown version)."""


# Same model, other runtime or precision: openvino/onnxruntime/torch x fp32/bf16 agree to 0.99999 on
# the probe (measured), int8 to >= 0.981 on every chunk (export.export_openvino_int8); another model
# of the same width answers far lower (a constant-vector model: 0.05)
MODEL_PROBE_MIN_COSINE = 0.95


class SettingsChangedError(ManifestError):
    """This run would chunk or embed differently from the run that made the output's chunks."""


@dataclass
class Replacement:
    """An older part that held earlier versions of documents a commit replaces: it is retired, and its
    other documents move to `new_part` (the old part rewritten without the replaced ones; None when
    nothing of it survives, or when its file could not be read: then its documents are dropped)."""

    old_part: str
    new_part: Optional[str] = None
    files: Optional[dict[str, FileRecord]] = None


@dataclass
class DocumentEntry:
    doc_id: str
    content_hash: str
    n_chunks: int
    part: str
    size: int = 0
    mtime_ns: int = 0
    stat_tag: Optional[int] = None  # None: recorded before tags were (the next run reads it once)

    def same_stat(self, size: int, mtime_ns: int, stat_tag: Optional[int] = None) -> bool:
        """The file's size and mtime (and, when given, inode and ctime: `records.stat_tag`) are as
        recorded: no re-read needed."""
        return self.size == size and self.mtime_ns == mtime_ns and (stat_tag is None or self.stat_tag == stat_tag)


def _has_stat_tags(conn: sqlite3.Connection) -> bool:
    """Whether the documents table has the stat_tag column (manifests from before it have not)."""
    return "stat_tag" in {row[1] for row in conn.execute("PRAGMA table_info(documents)")}


def _part_number(name: str) -> int:
    return int(name.rsplit("-", 1)[-1])


def _connect(path: Path, readonly: bool = False) -> sqlite3.Connection:
    if Path(path).is_dir():  # SQLite said "disk I/O error" or "unable to open database file"
        raise ManifestError(f"manifest {path} is a folder, not a SQLite file: remove it (the next run then ingests "
                            f"every document again) or point output= at another folder")
    uri = f"file:{path}?mode=ro" if readonly else f"file:{path}"
    conn = sqlite3.connect(uri, uri=True, timeout=30.0, check_same_thread=False, isolation_level=None)
    conn.execute("PRAGMA synchronous=FULL")
    return conn


class Manifest:
    """Committed parts and finished documents of one shard (a SQLite database, module docstring).

    Thread-safe: the batcher thread looks documents up while the writer thread commits.
    """

    def __init__(self, output: Path, shard: str, conn: sqlite3.Connection) -> None:
        self.output = Path(output)
        self.shard = shard
        self.path = manifest_path(output, shard)
        self._conn = conn
        self._lock = threading.Lock()
        # a manifest opened read-only from before stat tags has no such column: its entries read None
        tagged = _has_stat_tags(conn)
        self._entry_columns = _ENTRY_COLUMNS if tagged else _ENTRY_COLUMNS.replace("stat_tag", "NULL")

    # -- open ----------------------------------------------------------------------------------
    @classmethod
    def load(cls, output: Path, shard: str) -> "Manifest":
        """Open (or create) the shard's manifest; a legacy JSON manifest is imported first."""
        output = Path(output)
        output.mkdir(parents=True, exist_ok=True)
        path = manifest_path(output, shard)
        legacy = legacy_manifest_path(output, shard)
        fresh = not path.exists()
        try:
            conn = _connect(path)
            conn.executescript(_SCHEMA)
            if not _has_stat_tags(conn):
                conn.execute("ALTER TABLE documents ADD COLUMN stat_tag INTEGER")  # a manifest from before tags
                conn.commit()
            version = conn.execute("SELECT value FROM meta WHERE key = 'version'").fetchone()
        except sqlite3.DatabaseError as err:
            raise unreadable_manifest(path, err) from err
        if version is None:
            conn.execute("INSERT OR REPLACE INTO meta VALUES ('version', ?), ('shard', ?)", (str(MANIFEST_VERSION), shard))
        elif int(version[0]) != MANIFEST_VERSION:
            conn.close()
            raise ManifestError(f"manifest {path} has version {version[0]}, expected {MANIFEST_VERSION}")
        manifest = cls(output, shard, conn)
        if fresh:
            fsync_dir(output)
        if legacy.exists() and manifest.part_count() == 0 and manifest.document_count() == 0:
            manifest._import_legacy(legacy)
        return manifest

    def _import_legacy(self, legacy: Path) -> None:
        raw = read_legacy_json(legacy)
        docs = [DocumentEntry(**entry) for entry in raw.get("documents", {}).values()]
        rels = list(raw.get("documents", {}))
        with self._transaction() as cur:
            cur.executemany("INSERT INTO parts VALUES (?, ?)", [(_part_number(p), p) for p in raw.get("parts", [])])
            cur.executemany("INSERT " + _INSERT_DOCUMENT,
                            [(rel, d.doc_id, d.content_hash, d.n_chunks, d.part, d.size, d.mtime_ns, d.stat_tag)
                             for rel, d in zip(rels, docs)])
        legacy.unlink()
        fsync_dir(legacy.parent)
        log.info("manifest: imported %s (%d parts, %d documents) into %s", legacy.name, self.part_count(),
                 len(docs), self.path.name)

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> "Manifest":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Cursor]:
        """One write transaction (BEGIN IMMEDIATE ... COMMIT, ROLLBACK on an error), under the lock."""
        with self._lock:
            cur = self._conn.cursor()
            cur.execute("BEGIN IMMEDIATE")
            try:
                yield cur
            except BaseException:
                if self._conn.in_transaction:  # SQLite may have rolled back itself (disk full): keep its error
                    cur.execute("ROLLBACK")
                raise
            cur.execute("COMMIT")

    def _query(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self._lock:
            return self._conn.execute(sql, args).fetchall()

    # -- read ------------------------------------------------------------------------------------
    def parts(self) -> list[str]:
        return [name for (name,) in self._query("SELECT name FROM parts ORDER BY number")]

    def part_count(self) -> int:
        return int(self._query("SELECT COUNT(*) FROM parts")[0][0])

    def document_count(self) -> int:
        return int(self._query("SELECT COUNT(*) FROM documents")[0][0])

    def next_part_number(self) -> int:
        """Never a number used before (retired and dropped parts included), so an old file of that
        name can never be mistaken for a new part."""
        used = int(self._query("SELECT COALESCE(MAX(number), 0) FROM parts")[0][0]) + 1
        mark = self._query("SELECT value FROM meta WHERE key = 'next_part'")
        return max(used, int(mark[0][0]) if mark else 0)

    def settings(self) -> dict[str, Any]:
        """What the output's chunks were made with (`check_settings`); empty before its first run."""
        row = self._query("SELECT value FROM meta WHERE key = 'settings'")
        return json.loads(row[0][0]) if row else {}

    def check_settings(self, settings: dict[str, Any]) -> None:
        """Refuse a run whose chunking or model differs from what made this output's chunks; record
        `settings` otherwise (keys new to the record are added). Without it a run with another
        `chunking.chunk_tokens` or model found every document unchanged and kept the old chunks, and
        a changed document got chunks of the new kind beside the old ones (vectors of another
        dimension broke the dataset's schema).

        Raises:
            SettingsChangedError: naming each differing setting, old and new.
        """
        recorded = self.settings()
        changed = [f"{key}={recorded[key]!r} (this run: {value!r})" for key, value in sorted(settings.items())
                   if key in recorded and recorded[key] != value]
        if changed and not self.parts():
            # nothing committed under the old settings (a first run that failed before its first
            # commit): they describe no chunk, so they were refused for an output that held none
            log.info("%s: no chunks committed yet; this run's settings replace those of an earlier run (%s)",
                     self.output, "; ".join(changed))
            with self._transaction() as cur:
                cur.execute("INSERT OR REPLACE INTO meta VALUES ('settings', ?)", (json.dumps(settings, sort_keys=True),))
            return
        if changed:
            raise SettingsChangedError(
                f"{self.output} holds chunks made with {'; '.join(changed)}: ingest into a new output folder "
                f"(or delete this one); one dataset would mix chunks of both settings")
        if any(key not in recorded for key in settings):
            with self._transaction() as cur:
                cur.execute("INSERT OR REPLACE INTO meta VALUES ('settings', ?)",
                            (json.dumps({**recorded, **settings}, sort_keys=True),))

    def check_model_probe(self, vector: Sequence[float], embedder: str) -> None:
        """Refuse a run whose embedder answers a fixed probe text (`embedding.texts.model_probe`)
        unlike the one that embedded this output's chunks (cosine < `MODEL_PROBE_MIN_COSINE`); record
        the answer when none is recorded or nothing is committed yet. The settings fingerprint the
        local model folder only: a Triton server running another model of the same width mixed its
        vectors into the output silently."""
        new = np.asarray(vector, dtype=np.float64).ravel()
        row = self._query("SELECT value FROM meta WHERE key = 'model_probe'")
        if row and self.parts():
            cosine = probe_cosine(np.asarray(json.loads(row[0][0])["vector"], dtype=np.float64), new)
            if cosine < MODEL_PROBE_MIN_COSINE:
                made_by = json.loads(row[0][0]).get("embedder", "?")
                raise SettingsChangedError(
                    f"{self.output} holds vectors of another model: this embedder ({embedder}) answers a probe text "
                    f"with cosine {cosine:.3f} to the vector of the one that embedded it ({made_by}): serve the same "
                    f"model, or ingest into a new output folder; one dataset would mix vectors of both")
            return
        with self._transaction() as cur:
            cur.execute("INSERT OR REPLACE INTO meta VALUES ('model_probe', ?)",
                        (json.dumps({"vector": [round(float(x), 6) for x in new], "embedder": embedder}),))

    def part_files(self) -> dict[str, dict[str, FileRecord]]:
        """part -> {table: FileRecord} for every committed part that has its files recorded."""
        out: dict[str, dict[str, FileRecord]] = {}
        for part, tbl, rows, size, checksum, mtime, ctime in self._query(
                "SELECT part, tbl, rows, size, checksum, mtime_ns, ctime_ns FROM part_files"):
            out.setdefault(part, {})[tbl] = FileRecord(size=size, checksum=checksum, rows=rows, mtime_ns=mtime,
                                                       ctime_ns=ctime)
        return out

    def part_contents(self, part: str) -> tuple[int, int]:
        """(documents, chunks) the manifest says `part` holds (an index probe)."""
        docs, chunks = self._query("SELECT COUNT(*), COALESCE(SUM(n_chunks), 0) FROM documents WHERE part = ?",
                                   (part,))[0]
        return int(docs), int(chunks)

    def contents_by_part(self) -> dict[str, tuple[int, int]]:
        """part -> (documents, chunks) for every part (one scan of the documents)."""
        return {part: (int(d), int(c)) for part, d, c in
                self._query("SELECT part, COUNT(*), SUM(n_chunks) FROM documents GROUP BY part")}

    def lookup(self, rel_path: str) -> Optional[DocumentEntry]:
        row = self._query(f"SELECT {self._entry_columns} FROM documents WHERE rel_path = ?", (rel_path,))
        return DocumentEntry(*row[0]) if row else None

    def lookup_many(self, rel_paths: Iterable[str]) -> dict[str, DocumentEntry]:
        """The entries of those of `rel_paths` the manifest holds, in queries of `LOOKUP_BATCH` keys:
        a part's commit asks for all its documents, one query each was ~15% of the main process's
        CPU on a corpus of 1 KB files."""
        found: dict[str, DocumentEntry] = {}
        for batch, marks in _in_batches(rel_paths):
            for rel, *rest in self._query(f"SELECT rel_path, {self._entry_columns} FROM documents "
                                          f"WHERE rel_path IN ({marks})", batch):
                found[rel] = DocumentEntry(*rest)
        return found

    def absent_from(self, rel_paths: Iterable[str]) -> list[str]:
        """The documents' rel_paths that are not among `rel_paths` (a run's discovered documents), in
        rel_path order. The comparison runs in SQLite over a temporary table: a Python set of 10^7
        paths would be a gigabyte of the main process."""
        with self._lock:
            cur = self._conn.cursor()
            cur.execute("CREATE TEMP TABLE IF NOT EXISTS found (rel_path TEXT PRIMARY KEY) WITHOUT ROWID")
            try:
                cur.executemany("INSERT OR IGNORE INTO found VALUES (?)", ((r,) for r in rel_paths))
                return [r for (r,) in cur.execute("SELECT rel_path FROM documents WHERE rel_path NOT IN "
                                                  "(SELECT rel_path FROM found) ORDER BY rel_path")]
            finally:
                cur.execute("DROP TABLE temp.found")
                self._conn.commit()

    def documents(self) -> Iterator[tuple[str, DocumentEntry]]:
        """Every (rel_path, entry), in rel_path order (a scan: for reports and tests, not per document)."""
        for rel, *rest in self._query(f"SELECT rel_path, {self._entry_columns} FROM documents ORDER BY rel_path"):
            yield rel, DocumentEntry(*rest)

    def is_unchanged(self, rel_path: str, size: int, mtime_ns: int, stat_tag: Optional[int] = None) -> bool:
        """True when the document is done and its stat is as recorded (no re-read needed)."""
        entry = self.lookup(rel_path)
        return entry is not None and entry.same_stat(size, mtime_ns, stat_tag)

    # -- write -----------------------------------------------------------------------------------
    def commit_part(self, part: str, documents: Iterable[tuple[str, DocumentEntry]],
                    files: Optional[dict[str, FileRecord]] = None, replaced: Iterable[Replacement] = (),
                    before_commit: Optional[Callable[[], None]] = None) -> None:
        """One transaction: name `part` committed with its `files`, record its documents (replacing
        their older entries), and for each `Replacement` retire the old part and point its other
        documents at its rewrite. Either all of it is committed or none of it. `before_commit` runs
        inside the transaction, just before COMMIT (a test's kill point)."""
        numbers = [_part_number(part)]
        with self._transaction() as cur:
            cur.execute("INSERT INTO parts VALUES (?, ?)", (_part_number(part), part))
            self._insert_files(cur, part, files)
            numbers += self._apply_replacements(cur, replaced)
            cur.executemany("INSERT OR REPLACE " + _INSERT_DOCUMENT,
                            [(rel, d.doc_id, d.content_hash, d.n_chunks, d.part, d.size, d.mtime_ns, d.stat_tag)
                             for rel, d in documents])
            self._raise_mark(cur, max(numbers) + 1)
            if before_commit is not None:
                before_commit()

    def remove_documents(self, rel_paths: Iterable[str], replaced: Iterable[Replacement] = (),
                         before_commit: Optional[Callable[[], None]] = None) -> int:
        """One transaction: forget the documents at `rel_paths` and, for each `Replacement`, retire the
        old part that held some of them and point its other documents at its rewrite (as
        `commit_part`). Returns how many documents were forgotten."""
        with self._transaction() as cur:
            removed = 0  # first: a part left with nothing else is then retired without counting them twice
            for batch, marks in _in_batches(rel_paths):
                removed += cur.execute(f"DELETE FROM documents WHERE rel_path IN ({marks})", batch).rowcount
            numbers = self._apply_replacements(cur, replaced)
            if numbers:
                self._raise_mark(cur, max(numbers) + 1)
            if before_commit is not None:
                before_commit()
        return removed

    @staticmethod
    def _apply_replacements(cur: sqlite3.Cursor, replaced: Iterable[Replacement]) -> list[int]:
        """Retire each replacement's old part, its other documents moved to the rewrite (or dropped
        when there is none); returns the part numbers of the rewrites."""
        numbers = []
        for rep in replaced:
            if rep.new_part is not None:
                numbers.append(_part_number(rep.new_part))
                cur.execute("INSERT INTO parts VALUES (?, ?)", (_part_number(rep.new_part), rep.new_part))
                Manifest._insert_files(cur, rep.new_part, rep.files)
                cur.execute("UPDATE documents SET part = ? WHERE part = ?", (rep.new_part, rep.old_part))
            else:
                cur.execute("DELETE FROM documents WHERE part = ?", (rep.old_part,))
            cur.execute("DELETE FROM parts WHERE name = ?", (rep.old_part,))
            cur.execute("DELETE FROM part_files WHERE part = ?", (rep.old_part,))
        return numbers

    @staticmethod
    def _insert_files(cur: sqlite3.Cursor, part: str, files: Optional[dict[str, FileRecord]]) -> None:
        if files:
            cur.executemany("INSERT OR REPLACE INTO part_files VALUES (?, ?, ?, ?, ?, ?, ?)",
                            [(part, tbl, f.rows, f.size, f.checksum, f.mtime_ns, f.ctime_ns)
                             for tbl, f in files.items()])

    @staticmethod
    def _raise_mark(cur: sqlite3.Cursor, number: int) -> None:
        cur.execute("INSERT INTO meta VALUES ('next_part', ?) ON CONFLICT(key) DO UPDATE SET value = "
                    "MAX(CAST(value AS INTEGER), CAST(excluded.value AS INTEGER))", (str(number),))

    def drop_parts(self, parts: Iterable[str]) -> int:
        """Forget damaged parts and their documents (so a run ingests those again); returns how many
        documents were dropped. Their files become orphans (removed by the writer at start)."""
        parts = list(parts)
        if not parts:
            return 0
        with self._transaction() as cur:
            dropped = 0
            for part in parts:
                dropped += cur.execute("DELETE FROM documents WHERE part = ?", (part,)).rowcount
                cur.execute("DELETE FROM parts WHERE name = ?", (part,))
                cur.execute("DELETE FROM part_files WHERE part = ?", (part,))
            self._raise_mark(cur, max(_part_number(p) for p in parts) + 1)
        return dropped

    def record_files(self, part: str, files: dict[str, FileRecord]) -> None:
        """Record (or refresh) the files of a committed part: a part committed before files were
        recorded, checked and hashed at start, or one whose stat changed but whose bytes did not."""
        with self._transaction() as cur:
            self._insert_files(cur, part, files)

    def update_stats(self, updates: dict[str, tuple[int, int, Optional[int]]]) -> None:
        """New (size, mtime_ns, stat_tag) of documents read again and found identical (see DatasetWriter)."""
        if not updates:
            return
        with self._transaction() as cur:
            cur.executemany("UPDATE documents SET size = ?, mtime_ns = ?, stat_tag = ? WHERE rel_path = ?",
                            [(size, mtime, tag, rel) for rel, (size, mtime, tag) in updates.items()])


def damaged(err: BaseException) -> bool:
    """Whether a SQLite error says the database file is damaged (not merely locked or unwritable)."""
    name = getattr(err, "sqlite_errorname", "")
    return name in ("SQLITE_NOTADB", "SQLITE_CORRUPT") or (
        not name and ("not a database" in str(err) or "malformed" in str(err)))


def unreadable_manifest(path: Path, err: BaseException) -> "ManifestError":
    """The one-line error for a manifest that cannot be read; for a damaged one, what to do."""
    if isinstance(err, sqlite3.DatabaseError) and damaged(err):
        return ManifestError(f"manifest {path} is damaged ({err}): move it aside and re-run the ingest of this "
                             "shard over its corpus; its documents are ingested again and its old parts replaced")
    journal = Path(f"{path}-journal")
    if "readonly" in str(err) and journal.is_file() and journal.stat().st_size:
        # a journal left by a write that was cut off: a read-only open (verify, search) may not roll it back
        return ManifestError(f"manifest {path} has a journal left by an interrupted write ({journal.name}), which a "
                             f"read-only open cannot roll back ({err}): run hades-ingest on this output once (a "
                             "writable open rolls it back), then try again")
    return ManifestError(f"manifest {path} is unreadable: {err}")


def read_legacy_json(path: Path) -> dict[str, Any]:
    try:
        raw: dict[str, Any] = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise unreadable_manifest(path, err) from err
    if raw.get("version") != LEGACY_JSON_VERSION:
        raise ManifestError(f"manifest {path} has version {raw.get('version')!r}, expected {LEGACY_JSON_VERSION}")
    return raw


@contextlib.contextmanager
def _read_only(path: Path) -> Iterator[sqlite3.Connection]:
    """A read-only connection to a manifest (another shard's, or one a run is writing), closed after."""
    conn = _connect(path, readonly=True)
    try:
        yield conn
    finally:
        conn.close()


def committed_parts(output: Path) -> list[str]:
    """Names of the parts every shard's manifest of `output` has committed (read-only; sorted)."""
    output = Path(output)
    parts: list[str] = []
    for path in sorted(output.glob("manifest-*.sqlite")):
        try:
            with _read_only(path) as conn:
                parts.extend(name for (name,) in conn.execute("SELECT name FROM parts"))
        except sqlite3.DatabaseError as err:
            raise unreadable_manifest(path, err) from err
    for path in sorted(output.glob("manifest*.json")):
        parts.extend(str(p) for p in read_legacy_json(path).get("parts", []))
    return sorted(set(parts))


def committed_document_count(output: Path, shard: str) -> int:
    """Documents shard `shard` of `output` has committed so far (0 when it has no manifest yet);
    read-only, safe while that shard's run writes (the cluster driver's progress)."""
    path = manifest_path(Path(output), shard)
    if not path.is_file():
        return 0
    try:
        with _read_only(path) as conn:
            row = conn.execute("SELECT COUNT(*) FROM documents").fetchone()
    except sqlite3.DatabaseError:
        return 0  # being created this moment: counted at the next poll
    return int(row[0]) if row else 0


def recorded_model_probes(output: Path) -> list[tuple[str, np.ndarray, str]]:
    """(shard, probe vector, embedder description) of each manifest of `output` that recorded what its
    model answers (`Manifest.check_model_probe`); read-only, unreadable manifests left out."""
    found = []
    for path in sorted(Path(output).glob("manifest-*.sqlite")):
        try:
            with _read_only(path) as conn:
                row = conn.execute("SELECT value FROM meta WHERE key = 'model_probe'").fetchone()
        except (sqlite3.DatabaseError, ManifestError):
            continue
        if row:
            record = json.loads(row[0])
            found.append((path.name[len("manifest-"):-len(".sqlite")], np.asarray(record["vector"], dtype=np.float64),
                          str(record.get("embedder", "?"))))
    return found


def probe_cosine(recorded: np.ndarray, answer: Sequence[float]) -> float:
    """Cosine of two probe vectors; -1 when their widths differ."""
    new = np.asarray(answer, dtype=np.float64).ravel()
    if recorded.shape != new.shape:
        return -1.0
    return float(recorded @ new / (np.linalg.norm(recorded) * np.linalg.norm(new) or 1.0))


def claimed_by_other_shards(output: Path, shard: str, rel_paths: Iterable[str]) -> dict[str, str]:
    """rel_path -> the other shard (manifest) of `output` that has it committed, for those of
    `rel_paths` another shard's manifest holds (read-only). Two by-hand shard names over the same
    corpus wrote every chunk twice, one copy per manifest."""
    output = Path(output)
    others = [p for p in sorted(output.glob("manifest-*.sqlite")) if p != manifest_path(output, shard)]
    claimed: dict[str, str] = {}
    if not others:
        return claimed
    wanted = list(rel_paths)
    for path in others:
        other = path.name[len("manifest-"):-len(".sqlite")]
        try:
            with _read_only(path) as conn:
                for batch, marks in _in_batches(wanted):
                    for (rel,) in conn.execute(f"SELECT rel_path FROM documents WHERE rel_path IN ({marks})", batch):
                        claimed.setdefault(rel, other)
        except sqlite3.DatabaseError as err:
            raise unreadable_manifest(path, err) from err
    return claimed


def uncommitted_indices(output: Path, rel_paths: Iterable[str]) -> "array[int]":
    """Positions in `rel_paths` of those no manifest of `output` has committed (read-only), in
    batches: a resume of millions of documents holds no set of their names (and the positions are
    8 bytes each, not Python ints)."""
    manifests = sorted(Path(output).glob("manifest-*.sqlite"))
    absent = array("q")
    batch: list[str] = []
    start = 0

    def check() -> None:
        found: set[str] = set()
        for path in manifests:
            try:
                with _read_only(path) as conn:
                    for keys, marks in _in_batches(batch):
                        found.update(r for (r,) in conn.execute(
                            f"SELECT rel_path FROM documents WHERE rel_path IN ({marks})", keys))
            except sqlite3.DatabaseError:
                continue  # nothing committed there to read (a new or damaged one: opening it for the run reports it)
        absent.extend(start + i for i, rel in enumerate(batch) if rel not in found)

    for rel in rel_paths:
        batch.append(rel)
        if len(batch) >= 50 * LOOKUP_BATCH:
            check()
            start += len(batch)
            batch = []
    if batch:
        check()
    return absent


def has_manifest(output: Path) -> bool:
    output = Path(output)
    return any(output.glob("manifest-*.sqlite")) or any(output.glob("manifest*.json"))
