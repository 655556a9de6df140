"""Typed records that cross stage boundaries, defined once.

Every queue in the pipeline carries one of these. They are plain dataclasses of numpy arrays and
builtins so they pickle cheaply between processes and report their own size to the byte-bounded
queues (`nbytes`).
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

PROSE = "prose"
CODE = "code"


def stable_id(*parts: str, length: int = 16) -> str:
    """A short, stable, global id from strings (never from a counter), so shards never collide."""
    h = hashlib.blake2b(digest_size=length // 2)
    for part in parts:
        h.update(part.encode("utf-8", "surrogatepass"))
        h.update(b"\x00")
    return h.hexdigest()


def user_path(path: "str | os.PathLike[str]") -> Path:
    """A file or folder a user named, absolute and with ``~`` expanded, as shells, pandas and pyarrow
    read it. Why: pyarrow expands ``~`` and Python does not, so an output ``~/out`` was half
    ``./~/out`` (manifest, lock) and half ``$HOME/out`` (parts), and a relative path given to the
    Python API broke once the caller changed directory."""
    return Path(os.path.abspath(os.path.expanduser(os.fspath(path))))


def path_argument(value: object, name: str) -> Path:
    """`user_path` of an API argument that must name a file or folder: bytes are decoded as the
    filesystem does (`process_batch` took bytes sources and `train` failed on a bytes path), and
    anything else that is no path is a TypeError naming the argument (not pathlib's bare "expected
    str, bytes or os.PathLike object, not int")."""
    if isinstance(value, bytes):
        value = os.fsdecode(value)
    if not isinstance(value, (str, os.PathLike)):
        raise TypeError(f"{name} must be a path (str, bytes or os.PathLike), got {type(value).__name__}: {value!r}")
    return user_path(value)


def display_path(path: str) -> str:
    """`path` as valid text: itself when it is valid Unicode, else each byte of the name that is not
    UTF-8 (a surrogate escape, as ``os.fsdecode`` gives it) written as ``\\xHH``.

    Used for every path that is stored as text (Parquet, the manifest, reports): ``caf\\xe9.txt``
    for the name ``b"caf\\xe9.txt"``. The exact bytes are kept beside it (``rel_path_bytes``,
    ``path_bytes`` in the documents table). Escapes, unlike U+FFFD, keep two names that differ only
    in undecodable bytes apart.
    """
    try:
        path.encode("utf-8")
        return path
    except UnicodeEncodeError:
        pass
    return _fsencode(path).decode("utf-8", "backslashreplace")


# C0 and C1 control characters, DEL, and the Unicode line and paragraph separators
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def printable(text: str) -> str:
    """`text` for one line of a terminal or a log: control characters written as ``\\n``, ``\\t``,
    ``\\r`` or ``\\xHH`` (``\\u2028``...). A file may be named ``"a\\nb.md"`` or carry an escape
    sequence; printed raw, a report line about it became two lines or recoloured the terminal.
    Stored paths keep such names exactly (only what is printed is escaped). A name's bytes that are
    not UTF-8 (surrogate escapes) are written ``\\xHH`` as `display_path` stores them (printed raw,
    they were bytes no terminal or grep reads as text)."""
    text = display_path(text)
    if not _UNPRINTABLE.search(text):
        return text
    return _UNPRINTABLE.sub(lambda m: _ESCAPES.get(m.group(), m.group().encode("unicode_escape").decode("ascii")), text)


def error_line(err: BaseException, limit: Optional[int] = None) -> str:
    """The first line of an error's message, or its type's name when it has none (one-line reports);
    with `limit`, at most that many characters, a cut marked with "…" (a bare slice stopped mid-path,
    as if the path ended there)."""
    text = str(err).strip()
    line = text.splitlines()[0] if text else type(err).__name__
    if limit is not None and len(line) > limit:
        line = line[: max(limit - 1, 0)] + "…"
    return line


def _fsencode(path: str) -> bytes:
    try:
        return os.fsencode(path)
    except UnicodeEncodeError:  # a surrogate that is no escape (not from the OS): keep it, losslessly
        return path.encode("utf-8", "surrogatepass")


# ---- shards: ``shard=3/16`` selects one of 16 (`documents.sharding` is the rule) ----
UNSHARDED = "s0"
_SPEC = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
_LABEL = re.compile(r"^s\d+of\d+$")  # reserved: the names `i/n` shards write under


def shard_label(index: int, count: int) -> str:
    """The name a shard's part files, manifest and lock carry: ``s03of16`` (sorts by index)."""
    width = len(str(count - 1))
    return f"s{index:0{width}d}of{count}"


@dataclass(frozen=True)
class ShardSpec:
    """One shard of a run: `index` of `count` (count 1 = the whole corpus), named `label`."""

    index: int
    count: int
    label: str

    @property
    def sharded(self) -> bool:
        """One of several hash-selected shards (a plain name is the whole corpus)."""
        return self.count > 1

    @classmethod
    def parse(cls, text: str) -> "ShardSpec":
        """``"i/n"`` (0 <= i < n) selects shard i of n; a plain name (``s0``, the default) is the
        whole corpus written under that name. Raises ValueError with one line otherwise."""
        text = str(text).strip()
        m = _SPEC.match(text)
        if m:
            index, count = int(m.group(1)), int(m.group(2))
            if count < 1 or not 0 <= index < count:
                raise ValueError(f"shard must be i/n with 0 <= i < n (got {text!r})")
            if count == 1:
                return cls(0, 1, UNSHARDED)
            return cls(index, count, shard_label(index, count))
        if not _NAME.match(text):
            raise ValueError(f"shard must be i/n (e.g. 3/16) or a name of letters, digits, '_', '-', '.' (got {text!r})")
        if _LABEL.match(text):  # a by-hand name that passes for a hash shard would mix with their map
            raise ValueError(f"shard {text!r} is a name the i/n shards use: give i/n (e.g. 3/16) or another name")
        return cls(0, 1, text)


def path_within(path: str, folder: str) -> bool:
    """Whether absolute `path` lies strictly inside absolute `folder` (as text, no links resolved)."""
    return path.startswith(folder.rstrip(os.sep) + os.sep)


def stat_tag(st: "os.stat_result") -> int:
    """The file's inode and ctime folded into one int64 (as git's index keeps both): a rename, a
    swap or a rewrite changes it, whatever the size and mtime say. A chmod changes it too: that
    costs the next run a re-read (the content hash then finds the document unchanged)."""
    return (int(st.st_ino) * 1_000_003 + int(st.st_ctime_ns)) & 0x7FFF_FFFF_FFFF_FFFF


@dataclass(frozen=True)
class DocumentRef:
    """A file found by discovery, before it is read."""

    path: str  # absolute path
    rel_path: str  # path relative to the corpus root: the document's identity
    size: int
    modality: str  # PROSE | CODE
    language: str  # "python", "markdown", "text", "javascript", ...
    mtime_ns: int = 0  # st_mtime_ns at discovery: with size, the resume check that needs no read
    # the exact bytes of the relative path when `rel_path` had to be escaped (`display_path`), else None
    rel_path_raw: Optional[bytes] = None
    # `stat_tag(st)` at discovery (inode and ctime): with size and mtime, the resume check. Size and
    # mtime alone missed a file swapped or renamed over by another of the same size and mtime (`tar x`,
    # `cp -p`, `rsync -t`, `mv` keep mtimes): its old chunks stayed, "re-ingest it" changed nothing.
    stat_tag: int = 0  # 0: not known (a ref made by hand): size and mtime decide alone

    def __post_init__(self) -> None:
        # A name that is not valid UTF-8 (surrogate escapes from os.fsdecode) becomes its escaped text
        # form here, once: the identity (doc id, manifest key, Parquet columns) is always valid text,
        # and the exact bytes travel in `rel_path_raw`.
        shown = display_path(self.rel_path)
        if shown != self.rel_path:
            if self.rel_path_raw is None:
                object.__setattr__(self, "rel_path_raw", _fsencode(self.rel_path))
            object.__setattr__(self, "rel_path", shown)

    @functools.cached_property
    def doc_id(self) -> str:
        """`stable_id(rel_path)`, hashed once per object: the main process asked three times per
        document (resume, writer, documents table)."""
        return stable_id(self.rel_path)

    @property
    def rel_path_bytes(self) -> bytes:
        """The relative path exactly as the file system names it."""
        return self.rel_path_raw if self.rel_path_raw is not None else os.fsencode(self.rel_path)

    @property
    def path_bytes(self) -> bytes:
        """The absolute path exactly as the file system names it (`path` keeps surrogate escapes)."""
        return _fsencode(self.path)


@dataclass
class Chunk:
    """One chunk of a document with its tokens (without special tokens)."""

    doc_id: str
    chunk_id: str
    path: str
    modality: str
    ordinal: int
    char_start: int
    char_end: int
    text: str
    token_ids: np.ndarray  # int32 (n_tokens,), content tokens only; [CLS]/[SEP] are added by the batcher

    @property
    def n_tokens(self) -> int:
        return int(self.token_ids.shape[0])

    @property
    def nbytes(self) -> int:
        return 200 + len(self.text) * 2 + int(self.token_ids.nbytes)


@dataclass
class ChunkedDocument:
    """A worker's result for one document: its chunks, or the reason it was skipped."""

    ref: DocumentRef
    content_hash: str
    chunks: list[Chunk] = field(default_factory=list)
    skip_reason: Optional[str] = None  # binary | empty | decode_error | unreadable | missing | too_large | ...
    skip_detail: str = ""
    # prose documents keep their links; code documents their imports (for the graph's reference edges)
    references: list[str] = field(default_factory=list)
    encoding: str = ""  # the codec its text was decoded with (`documents.reading.Decoded.encoding`)

    @property
    def nbytes(self) -> int:
        return 256 + sum(c.nbytes for c in self.chunks)


@dataclass
class TokenBatch:
    """A padded model batch. `input_ids`/`attention_mask` may be views into a reused ring buffer."""

    input_ids: np.ndarray  # int64 (B, L), L a multiple of the length bucket
    attention_mask: np.ndarray  # int64 (B, L)
    chunks: list[Chunk]  # the B chunks, in row order
    slot: int = -1  # ring-buffer slot to release once the batch is embedded (-1: not from a ring)
    real_tokens: int = 0  # sum of attention_mask

    @property
    def padded_tokens(self) -> int:
        return int(self.input_ids.shape[0] * self.input_ids.shape[1])

    @property
    def nbytes(self) -> int:
        return int(self.input_ids.nbytes + self.attention_mask.nbytes) + sum(len(c.text) * 2 for c in self.chunks)


@dataclass
class EmbeddedBatch:
    """A batch's chunks with their embeddings (float32, L2-normalised)."""

    chunks: list[Chunk]
    embeddings: np.ndarray  # float32 (B, dim)

    @property
    def nbytes(self) -> int:
        return int(self.embeddings.nbytes) + sum(c.nbytes for c in self.chunks)


@dataclass
class DocumentResult:
    """A worker's report on one document. Its chunks do not travel here: they go into slabs."""

    key: int  # this attempt's key: the `doc_key` of its rows in the slabs
    content_hash: str
    n_chunks: int = 0  # rows that will arrive in slabs (0 when skipped or unchanged)
    tokens: int = 0  # content tokens over all its chunks
    references: list[str] = field(default_factory=list)
    skip_reason: Optional[str] = None
    skip_detail: str = ""
    unchanged: bool = False  # content hash equals the one the main process sent: not packed
    busy_s: float = 0.0  # worker time spent reading and chunking it
    ref: Optional[DocumentRef] = None  # the document as the worker saw it, when that differs (CodeParallelPipeline)
    encoding: str = ""  # the codec its text was decoded with (documents table column `encoding`)


@dataclass
class SlabBatch:
    """A packed model batch lying in a shared-memory slab: the handle the main process routes.

    Row columns (document keys, ordinals, offsets, chunk ids, texts) and the padded token arrays are
    in the slab (`gpu.slabs.SlabView`); this header says how much of it is filled.
    """

    slab: int
    rows: int
    length: int  # padded sequence length (a multiple of the length bucket)
    real_tokens: int  # sum of the attention mask
    text_len: int  # UTF-8 bytes of the rows' texts
    inline_text: Optional[bytes] = None  # the texts, when they did not fit the slab's text area
    busy_s: float = 0.0  # worker time spent packing it
    doc_counts: list[tuple[int, int]] = field(default_factory=list)  # (document key, rows) in this batch

    @property
    def padded_tokens(self) -> int:
        return self.rows * self.length

    @property
    def nbytes(self) -> int:
        return self.rows * self.length * 16 + self.text_len
