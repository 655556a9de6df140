"""Read an ingest output: its committed part files (every shard) as Arrow tables, and the ISNE
vectors. The manifests say which parts are committed (`store.manifest.committed_parts`); a part
file they do not name is an interrupted write and is never read.
"""

from __future__ import annotations

import codecs
import os
import threading
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Sequence, Union

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from hades_gpu.documents.reading import content_hash
from hades_gpu.records import error_line
from hades_gpu.regular_file import NotRegularFileError, open_regular
from hades_gpu.store.layout import CHUNKS_DIR, DOCUMENTS_DIR, ISNE_MODEL_ID_KEY, isne_embeddings_files, part_path
from hades_gpu.store.manifest import committed_parts, has_manifest

__all__ = ["DamagedOutputError", "SourceChangedError", "chunk_source", "committed_part_files", "committed_parts",
           "embeddings_to_numpy", "is_ingest_output", "read_chunks", "read_documents", "read_files",
           "read_isne_embeddings", "read_table", "source_path"]


class DamagedOutputError(FileNotFoundError):
    """The manifest names a part whose file is gone, or a file of the output cannot be read: the
    output was damaged after it was written. Its message is one line naming the file."""


def committed_part_files(output: str | os.PathLike, table: str) -> list[Path]:
    """`<output>/<table>/<part>.parquet` of every committed part, sorted by part name."""
    files = [part_path(Path(output), table, part) for part in committed_parts(Path(output))]
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise DamagedOutputError(f"{len(missing)} committed part file(s) are missing, e.g. {missing[0]}; "
                                 f"the output was changed after it was written (an ingest into the same output ingests their "
                                 f"documents again)")
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
    """Part files already listed (`committed_part_files`), concatenated (only `columns` when given).

    Raises:
        DamagedOutputError: a committed part that is no readable Parquet, named (pyarrow's "Error
            creating dataset ... magic bytes not found" named no file and no remedy).
    """
    tables = []
    for f in files:
        try:
            tables.append(pq.read_table(f, columns=list(columns) if columns else None))
        except (pa.ArrowException, OSError) as err:
            if isinstance(err, FileNotFoundError):
                raise
            raise DamagedOutputError(f"damaged output file: committed part {f} ({error_line(err, 200)}): `hades-verify "
                                     f"{Path(f).parent.parent}` names every such file; an ingest into the same "
                                     f"output with the same corpus writes their documents again") from err
    return pa.concat_tables(tables, promote_options="default")


def read_chunks(output: str | os.PathLike, columns: Optional[Sequence[str]] = None) -> pa.Table:
    """All chunk rows (`doc_id, chunk_id, path, ..., embedding`) of an ingest output."""
    return read_table(output, CHUNKS_DIR, columns)


def read_documents(output: str | os.PathLike, columns: Optional[Sequence[str]] = None) -> pa.Table:
    """All document rows (`doc_id, rel_path, ..., references`) of an ingest output."""
    return read_table(output, DOCUMENTS_DIR, columns)


def _committed_path_pairs(output: str | os.PathLike, column: str, wanted: set[str]) -> Iterator[tuple[str, str]]:
    """(path, rel_path) of the committed documents whose `column` is in `wanted`, in commit order; one
    documents part at a time, so memory follows a part, not the output."""
    if not wanted:
        return
    values = pa.array(sorted(wanted), type=pa.string())
    for f in committed_part_files(output, DOCUMENTS_DIR):
        t = pq.read_table(f, columns=["path", "rel_path"])
        hit = t.filter(pc.is_in(t.column(column), value_set=values))
        yield from zip(hit.column("path").to_pylist(), hit.column("rel_path").to_pylist())


def committed_paths_of_documents(output: str | os.PathLike, rel_paths: set[str]) -> dict[str, str]:
    """rel_path (identity) -> the absolute path it was read from, of the committed documents among
    `rel_paths` (parts are in commit order: the latest read wins)."""
    return {rel: path for path, rel in _committed_path_pairs(output, "rel_path", rel_paths)}


def committed_rel_paths_of_files(output: str | os.PathLike, paths: set[str]) -> dict[str, str]:
    """Absolute path -> rel_path (identity) of the committed documents read from one of `paths`."""
    found: dict[str, str] = {}
    for path, rel in _committed_path_pairs(output, "path", paths):
        found.setdefault(path, rel)
    return found


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


def check_chunk_vectors(vectors: np.ndarray, output: str | os.PathLike, chunk_ids: Sequence[str]) -> None:
    """Raise `DamagedOutputError` when chunk vectors were damaged on disk after they were written.

    Every embedder writes unit vectors; a part whose bytes were overwritten reads as vectors of
    norm 1e15 or NaN, which silently reorders every search and kNN edge. Parquet stores no checksum
    that pyarrow checks by default, so the values are checked here: not finite, or a norm outside
    0.1x-10x the median row's (any embedder's vectors are alike in length; a user's unnormalised
    ones included). `hades-verify` compares whole files with their recorded checksums."""
    if not len(vectors):
        return
    norms = np.linalg.norm(vectors, axis=1)
    finite = np.isfinite(norms)
    typical = float(np.median(norms[finite])) if finite.any() else 0.0
    bad = ~finite | (norms > 10 * typical) | (norms < 0.1 * typical)
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise DamagedOutputError(
            f"{int(bad.sum())} chunk vector(s) of {output} are damaged (not finite or far from every other's "
            f"length), e.g. chunk {chunk_ids[first]}: `hades-verify {output}` names the part; an ingest into the "
            f"same output replaces it")


# ISNE vectors are neighbour means of θ: lengths vary (0 for an isolated chunk), so only a length this
# far above the median non-zero one is damage (bytes overwritten read as 1e15 or NaN), or above a
# length no training reaches (θ starts at 0.1 per value; a file of two vectors has no median to speak of)
ISNE_ABSURD_NORM_RATIO = 1e3
ISNE_ABSURD_NORM = 1e6


def damaged_isne_rows(vectors: np.ndarray) -> np.ndarray:
    """bool (n,): ISNE vectors damaged on disk: not finite, `ISNE_ABSURD_NORM_RATIO` times the median
    non-zero length, or above `ISNE_ABSURD_NORM` (search called such a chunk's vector "missing";
    verify said ok)."""
    if not len(vectors):
        return np.zeros(0, dtype=bool)
    with np.errstate(over="ignore", invalid="ignore"):
        norms = np.linalg.norm(vectors.astype(np.float64), axis=1)
    finite = np.isfinite(norms)
    nonzero = norms[finite & (norms > 0)]
    typical = float(np.median(nonzero)) if nonzero.size else 0.0
    relative = (norms > ISNE_ABSURD_NORM_RATIO * typical) if typical > 0 else np.zeros(len(norms), dtype=bool)
    return ~finite | relative | (norms > ISNE_ABSURD_NORM)


def isne_vectors_with_damage(column: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """An ISNE vectors column as float32 (n, d) and its damaged rows (`damaged_isne_rows`, and null
    rows: the stage never writes one), for the readers and `hades-verify` alike."""
    vectors = embeddings_to_numpy(column)
    return vectors, damaged_isne_rows(vectors) | ~column.is_valid().to_numpy(zero_copy_only=False)


def read_isne_embeddings(output: str | os.PathLike) -> tuple[list[str], np.ndarray]:
    """Every `isne/embeddings-*.parquet` of an output: (chunk ids, float32 (n, d)); later files win."""
    ids: list[str] = []
    vecs: list[np.ndarray] = []
    for f in isne_embeddings_files(Path(output)):
        try:
            t = pq.read_table(f, columns=["chunk_id", "isne_embedding"])
            vectors, bad = isne_vectors_with_damage(t.column("isne_embedding"))
        except (pa.ArrowException, OSError, ValueError, KeyError) as err:
            raise DamagedOutputError(f"{f}: damaged ISNE vectors file ({error_line(err, 300)}); `hades-isne output={output}` "
                                     "writes it again") from err
        vecs.append(vectors)
        ids.extend(t.column("chunk_id").to_pylist())
        if bad.any():
            first = t.column("chunk_id")[int(np.flatnonzero(bad)[0])].as_py()
            raise DamagedOutputError(f"{f}: {int(bad.sum())} damaged ISNE vector(s) (not finite, or of an absurd "
                                     f"length), e.g. chunk {first}; `hades-isne output={output}` writes them again")
    dims = {v.shape[1] for v in vecs if v.shape[0]}
    if len(dims) > 1:
        raise ValueError(f"isne embeddings of one output must share one dimension (got {sorted(dims)})")
    return ids, (np.concatenate(vecs) if vecs else np.zeros((0, 0), np.float32))


def isne_vectors_model_ids(output: str | os.PathLike) -> set[Optional[str]]:
    """The `model_id` of the ISNE model each `isne/embeddings-*.parquet` was made by (None: a file
    written before the id existed, or vectors of no model: an empty graph or one without edges)."""
    found: set[Optional[str]] = set()
    for f in isne_embeddings_files(Path(output)):
        try:
            meta = pq.read_schema(f).metadata or {}
        except (pa.ArrowException, OSError) as err:
            raise DamagedOutputError(f"{f}: damaged ISNE vectors file ({error_line(err, 300)}); `hades-isne "
                                     f"output={output}` writes it again") from err
        raw = meta.get(ISNE_MODEL_ID_KEY)
        found.add(raw.decode("utf-8", "replace") if raw else None)
    return found


class SourceChangedError(ValueError):
    """The file of a document is no longer what was ingested (its content hash differs)."""


def source_path(row: Mapping[str, Any], relative: bool = False) -> str:
    """The exact path of a document row (a dict of the documents table, e.g. from ``to_pylist()``).

    The ``path``/``rel_path`` columns are valid text, with bytes of a name that are not UTF-8 written
    as ``\\xHH`` (`hades_gpu.records.display_path`); this gives the name the file system knows (a
    str with surrogate escapes, as ``os.listdir`` returns it: ``open()`` and `pathlib` take it, and
    ``os.fsencode`` turns it into the raw bytes). Rows of outputs older than the byte columns give
    their text column back.
    """
    raw = row.get("rel_path_bytes" if relative else "path_bytes")
    if raw is not None:
        return os.fsdecode(bytes(raw))
    return row["rel_path" if relative else "path"]


_DOCUMENT_LOOKUP = ("doc_id", "path", "rel_path", "path_bytes", "rel_path_bytes", "encoding", "content_hash")


class _DocumentIndex:
    """The documents table's lookup rows by doc id, by exact name bytes and by text name (first row wins
    in each, as the former linear scans did)."""

    def __init__(self, docs: pa.Table) -> None:
        names = set(docs.schema.names)
        rows = docs.select([c for c in _DOCUMENT_LOOKUP if c in names]).to_pylist()
        self.by_id: dict[str, dict[str, Any]] = {}
        self.by_bytes: dict[bytes, dict[str, Any]] = {}
        self.by_name: dict[str, dict[str, Any]] = {}
        for row in rows:
            self.by_id.setdefault(row["doc_id"], row)
        for row in rows:
            for column in ("path_bytes", "rel_path_bytes"):
                if row.get(column) is not None:
                    self.by_bytes.setdefault(row[column], row)
        for row in rows:
            for column in ("path", "rel_path"):
                self.by_name.setdefault(row[column], row)


# output folder -> (its committed documents parts with size and mtime, their index). `chunk_source` per
# chunk row (the README's check, search's hits) read and scanned the whole documents table on every
# call: 0.13 s a call at 20k documents. Rebuilt when a commit changes the parts.
_document_indexes: dict[str, tuple[tuple, _DocumentIndex]] = {}
_document_indexes_guard = threading.Lock()
_DOCUMENT_INDEXES_KEPT = 4


def _document_index(output: str | os.PathLike) -> _DocumentIndex:
    files = committed_part_files(output, DOCUMENTS_DIR)
    signature = tuple((str(f), st.st_size, st.st_mtime_ns) for f, st in ((f, f.stat()) for f in files))
    key = os.path.realpath(output)
    with _document_indexes_guard:
        kept = _document_indexes.get(key)
        if kept is not None and kept[0] == signature:
            return kept[1]
    index = _DocumentIndex(read_documents(output))
    with _document_indexes_guard:
        _document_indexes.pop(key, None)
        _document_indexes[key] = (signature, index)
        while len(_document_indexes) > _DOCUMENT_INDEXES_KEPT:
            _document_indexes.pop(next(iter(_document_indexes)))
    return index


def _find_document(output: str | os.PathLike, key: Union[str, bytes, os.PathLike]) -> dict[str, Any]:
    index = _document_index(output)
    if isinstance(key, os.PathLike):
        key = os.fspath(key)
    raw = key if isinstance(key, bytes) else None
    if raw is None:
        try:
            raw = os.fsencode(key)
        except UnicodeEncodeError:
            raw = None
    # doc id first, then exact bytes, then the text columns
    row = index.by_id.get(key) if isinstance(key, str) else None  # type: ignore[arg-type]
    if row is None and raw is not None:
        row = index.by_bytes.get(raw)
    if row is None and isinstance(key, str):
        row = index.by_name.get(key)
    if row is None:
        raise KeyError(f"no document {key!r} in {output} (give a doc_id, a path or a rel_path)")
    return dict(row)  # a copy: the caller may not change the cached row


def _legacy_encoding(data: bytes) -> str:
    """What hades-gpu used before the ``encoding`` column existed: a BOM's codec, else UTF-8."""
    for bom, codec in ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"), (codecs.BOM_UTF8, "utf-8-sig"),
                       (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16")):
        if data.startswith(bom):
            return codec
    return "utf-8"


def chunk_source(output: str | os.PathLike, path_or_doc_id: Union[str, bytes, os.PathLike]) -> str:
    """The text a document's ``char_start``/``char_end`` index, read again from its file.

    That is the file decoded as hades-gpu decoded it: with the recorded ``encoding`` (a BOM removed,
    line endings kept as they are, ``\\r\\n`` included), so for every chunk row of the document
    ``chunk_source(output, doc_id)[char_start:char_end] == text``. (``open(path).read()`` is not that
    text: it translates newlines, keeps a UTF-8 BOM, and uses the locale's encoding.)

    Args:
        output: the ingest output folder.
        path_or_doc_id: a ``doc_id``, the document's absolute path or its ``rel_path`` (as text, with
            surrogate escapes, or as bytes).

    Raises:
        KeyError: no such document in the output.
        SourceChangedError: the file's bytes are not those that were ingested (content hash differs).
        OSError: the file cannot be read.
    """
    row = _find_document(output, path_or_doc_id)
    try:
        # a file replaced by a FIFO since the ingest blocked a plain open (and every search whose hits
        # held it) for ever
        fd, _ = open_regular(source_path(row))
    except NotRegularFileError as err:
        raise SourceChangedError(f"{row['path']} is no longer a regular file ({err.kind}); re-ingest it") from err
    with open(fd, "rb", closefd=True) as fh:
        data = fh.read()
    digest = content_hash(data)
    if row.get("content_hash") and digest != row["content_hash"]:
        raise SourceChangedError(f"{row['path']} changed since it was ingested (content hash {digest[:12]}... "
                                 f"!= {row['content_hash'][:12]}...); re-ingest it")
    encoding = row.get("encoding") or _legacy_encoding(data)
    return data.decode(encoding, "replace")
