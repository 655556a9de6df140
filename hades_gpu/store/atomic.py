"""The one way a file of the output folder is written: a temporary beside it, fsync'd, renamed over
the target, and the folder fsync'd, so a crash (even a power loss) leaves the old file or the new one,
never a torn one, and a finished write survives.

Every writer of the output (parts, edges, ISNE vectors and checkpoint, metrics) goes through here.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import pyarrow as pa
import pyarrow.parquet as pq


def fsync_dir(folder: Path) -> None:
    """Make a rename or unlink in `folder` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


CHECKSUM = "sha256"  # `sha256sum <file>` gives the same hex digest
_HASH_BLOCK = 1 << 20


@dataclass(frozen=True)
class FileRecord:
    """What the writer knew of a file the moment it was committed: its size, checksum, row count
    (Parquet) and stat (mtime and ctime, which `os.utime` cannot reset), for `store.verify`."""

    size: int
    checksum: str
    rows: int = -1
    mtime_ns: int = 0
    ctime_ns: int = 0


def file_checksum(path: str | os.PathLike) -> str:
    """`sha256:<hex>` of the file's bytes, read in 1 MiB blocks."""
    digest = hashlib.new(CHECKSUM)
    with open(path, "rb", buffering=0) as fh:
        buf = bytearray(_HASH_BLOCK)
        view = memoryview(buf)
        while True:
            n = fh.readinto(buf)
            if not n:
                break
            digest.update(view[:n])
    return f"{CHECKSUM}:{digest.hexdigest()}"


def temporary_path(path: Path) -> Path:
    """`.<name>.tmp-<pid>` beside `path`: hidden, never a name a reader lists, one per process."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def check_writable(folders: list[Path]) -> None:
    """Create and remove a file in each existing folder of `folders`: a read-only output (mode,
    immutable flag, read-only mount) is one OSError naming the folder at the start, not SQLite's
    "unable to open database file" or pyarrow's text about a hidden temporary in the middle of a run.
    (`os.access` says yes to root, whom an immutable flag still stops.)"""
    for folder in folders:
        if not folder.is_dir():
            continue
        try:
            fd, name = tempfile.mkstemp(prefix=".write-check-", dir=folder)
        except OSError as err:
            raise OSError(err.errno, f"cannot write in this output folder ({err.strerror}): make it writable, "
                                     f"or ingest into another", str(folder)) from err
        os.close(fd)
        os.unlink(name)


def _replace(tmp: Path, path: Path) -> None:
    """`os.replace`, with a folder in the file's place named (the rename said "Is a directory" about
    the hidden temporary, and every later run failed the same way)."""
    try:
        os.replace(tmp, path)
    except (IsADirectoryError, OSError) as err:
        if not path.is_dir():
            raise
        raise IsADirectoryError(errno.EISDIR, f"a folder stands where this file belongs: remove it (it is made "
                                              f"again; the committed chunks are kept)", str(path)) from err


class StreamedFile:
    """A file written piece by piece at a temporary path (`tmp`), then committed exactly as
    `atomic_path` commits (checksum, fsync, rename, fsync of the folder) or discarded. Until then
    readers never see it; a crash leaves only the hidden temporary, which start-up removes."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = temporary_path(self.path)

    def commit(self) -> FileRecord:
        """Make the written temporary `path` (durably); its `FileRecord` (size, checksum, stat)."""
        try:
            checksum = file_checksum(self.tmp)  # still in the page cache
            with open(self.tmp, "rb") as fh:
                os.fsync(fh.fileno())
            _replace(self.tmp, self.path)
        except BaseException:
            self.discard()
            raise
        fsync_dir(self.path.parent)
        st = self.path.stat()  # after the rename (a rename changes the ctime)
        return FileRecord(size=st.st_size, checksum=checksum, mtime_ns=st.st_mtime_ns, ctime_ns=st.st_ctime_ns)

    def discard(self) -> None:
        self.tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, record: Optional[list] = None) -> Iterator[Path]:
    """Yield a temporary path to write `path`'s new content to; on success it is fsync'd and renamed
    over `path`, on an error it is removed and `path` is left as it was. With `record` (a list), the
    committed file's `FileRecord` (size, checksum of the bytes written, stat after the rename) is
    appended to it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path)
    try:
        yield tmp
        checksum = file_checksum(tmp) if record is not None else ""  # still in the page cache
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        _replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    if record is not None:
        st = path.stat()  # after the rename (a rename changes the ctime)
        record.append(FileRecord(size=st.st_size, checksum=checksum, mtime_ns=st.st_mtime_ns, ctime_ns=st.st_ctime_ns))


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Replace `path` with `data` atomically and durably."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_parquet(table: pa.Table, path: str | os.PathLike, compression: str | dict[str, str] = "zstd",
                         use_dictionary: bool | list[str] = True,
                         write_statistics: bool | list[str] = True) -> FileRecord:
    """Replace `path` with `table` as Parquet, atomically and durably. `use_dictionary` may name the
    columns worth dictionary-encoding (repeated values), sparing the writer the attempt on the rest;
    `compression` may be per column and `write_statistics` name the columns to keep min/max of.
    Returns the committed file's `FileRecord` (rows, size, sha256, stat)."""
    record: list[FileRecord] = []
    with atomic_path(path, record) as tmp:
        pq.write_table(table, tmp, compression=compression, use_dictionary=use_dictionary,
                       write_statistics=write_statistics)
    rec = record[0]
    return FileRecord(size=rec.size, checksum=rec.checksum, rows=table.num_rows, mtime_ns=rec.mtime_ns,
                      ctime_ns=rec.ctime_ns)


_OS_ERROR_IN_TEXT = re.compile(r"\(os error (\d+)\)")


def os_error_behind(err: BaseException, path: str | os.PathLike) -> Optional[OSError]:
    """The OS error a library's own save function failed on, as an OSError naming `path`, or None.

    Why: safetensors raises `SafetensorError` ("I/O error: No space left on device (os error 28)")
    and torch.save a RuntimeError ("enforce fail ... unexpected pos") with the file object's OSError
    as its context: a full disk or a file-size limit read as a bug (a traceback), not as the one line
    the command line gives an OSError."""
    seen: set[int] = set()
    link: Optional[BaseException] = err
    while link is not None and id(link) not in seen:
        seen.add(id(link))
        if isinstance(link, OSError) and link.errno is not None:
            return OSError(link.errno, link.strerror or os.strerror(link.errno), os.fspath(path))
        link = link.__cause__ or link.__context__
    found = _OS_ERROR_IN_TEXT.search(str(err))
    if found:
        code = int(found.group(1))
        return OSError(code, os.strerror(code), os.fspath(path))
    return None


def atomic_write_with(path: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """Replace `path` with whatever `write(tmp)` writes (a library's own save function). Its failures
    on the OS's side (a full disk, a size limit, no permission) are raised as that OSError, naming
    `path` (`os_error_behind`)."""
    with atomic_path(path) as tmp:
        try:
            write(tmp)
        except OSError:
            raise
        except Exception as err:  # noqa: BLE001 - a library's own error type: an OSError behind it, or as it is
            behind = os_error_behind(err, path)
            if behind is None:
                raise
            raise behind from err
