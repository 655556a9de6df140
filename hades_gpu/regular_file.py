"""Opening a path that must be a regular file, without blocking: the one check the reader of
documents, discovery and `store.reader.chunk_source` share.

Why one place: a path that is a FIFO blocks `open()` until a writer comes (a file replaced by one
hung every search whose hits held it), and "not a regular file" is what the ingest keys on to remove
a committed document whose file is now a FIFO, a socket or a device.
"""

from __future__ import annotations

import os
import stat

NOT_A_REGULAR_FILE = "not a regular file"  # the start of the skip detail: `not a regular file (fifo)`


class NotRegularFileError(OSError):
    """The path opened is a folder, FIFO, socket or device (`kind`)."""

    def __init__(self, path: str | os.PathLike, kind: str) -> None:
        super().__init__(f"{NOT_A_REGULAR_FILE} ({kind})")  # str(err) is this detail
        self.path = os.fspath(path)
        self.kind = kind


def file_kind(mode: int) -> str:
    """What a non-regular file is, in a word (for skip details)."""
    if stat.S_ISDIR(mode):
        return "directory"
    if stat.S_ISFIFO(mode):
        return "fifo"
    if stat.S_ISSOCK(mode):
        return "socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "device"
    return "special file"


def open_regular(path: str | os.PathLike, follow_symlinks: bool = True) -> tuple[int, os.stat_result]:
    """(file descriptor, its stat) of `path` opened for reading, non-blocking (a FIFO does not wait
    for a writer). Raises `NotRegularFileError` (the descriptor closed) when it is no regular file;
    the OS's own errors (missing, permissions) pass through. ``follow_symlinks=False``: a path whose
    last component is a symbolic link raises OSError(ELOOP) instead of opening the link's target
    (`O_NOFOLLOW`: a file replaced by a link after discovery is not read through it)."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    if not follow_symlinks:
        flags |= getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(path, flags)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotRegularFileError(path, file_kind(st.st_mode))
    except BaseException:
        os.close(fd)
        raise
    return fd, st


__all__ = ["NOT_A_REGULAR_FILE", "NotRegularFileError", "file_kind", "open_regular"]
