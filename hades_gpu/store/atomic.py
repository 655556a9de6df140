"""The one way a file of the output folder is written: a temporary beside it, fsync'd, renamed over
the target, and the folder fsync'd, so a crash (even a power loss) leaves the old file or the new one,
never a torn one, and a finished write survives.

Every writer of the output (parts, edges, ISNE vectors and checkpoint, metrics) goes through here.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Callable, Iterator

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


def temporary_path(path: Path) -> Path:
    """`.<name>.tmp-<pid>` beside `path`: hidden, never a name a reader lists, one per process."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path to write `path`'s new content to; on success it is fsync'd and renamed
    over `path`, on an error it is removed and `path` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path)
    try:
        yield tmp
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Replace `path` with `data` atomically and durably."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_parquet(table: pa.Table, path: str | os.PathLike, compression: str = "zstd",
                         use_dictionary: bool | list[str] = True) -> None:
    """Replace `path` with `table` as Parquet, atomically and durably. `use_dictionary` may name the
    columns worth dictionary-encoding (repeated values), sparing the writer the attempt on the rest."""
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression=compression, use_dictionary=use_dictionary)


def atomic_write_with(path: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """Replace `path` with whatever `write(tmp)` writes (a library's own save function)."""
    with atomic_path(path) as tmp:
        write(tmp)
