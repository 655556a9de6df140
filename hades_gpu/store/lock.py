"""The output lock: one run at a time per output folder and shard (`<output>/.lock-<shard>`).

Shard runs of a cluster share one output, each holding its own shard's lock. The lock is an
`fcntl.flock` on the lock file, so the kernel releases it when the holder dies, however it dies
(SIGKILL included): a lock file left by a dead run is simply locked again by the next one. The holder
writes its PID, host, process start time and start date into the file, so a refused run can say who
holds it (`OutputLockedError`, one line).

A dead holder is detected, for the message and for one corner case, as "the PID written in the file
is not alive on this host" (`os.kill(pid, 0)` fails, or the PID now belongs to a process started at
another time). The corner case: the flock is still held although the PID that wrote the file is dead
(a process it forked without exec inherited the descriptor). Then the lock file is replaced by a new
one (locked before it is renamed into place, under a short `.lock-<shard>.takeover` flock so two
takers cannot both win).

(`filelock` is not used here: its Unix lock truncates the file on every attempt, which would erase
the holder's PID before a refused run could read it.)

A thread that already holds a lock may take it again (it is counted): `pipelines` holds it for the
whole run while `DatasetWriter` takes it for its own life. Another thread of the same process is
refused like another process: the flock is the process's, so without this two threads ingesting into
one output both got in and raced for the same part files.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import stat
import socket
import threading
import time
from pathlib import Path
from typing import Any, Optional

from hades_gpu.regular_file import open_regular
from hades_gpu.store.layout import ISNE_LOCK_NAME

log = logging.getLogger(__name__)

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None  # type: ignore[assignment]


class OutputLockedError(RuntimeError):
    """Another live run holds the output folder's lock for this shard."""

    def __init__(self, output: Path, shard: str, holder: dict[str, Any]) -> None:
        self.output = Path(output)
        self.shard = shard
        self.holder = holder
        self.pid = holder.get("pid")
        self.host = holder.get("host")
        since = holder.get("started")
        what = "its graph and ISNE stage" if shard == ISNE_LOCK_NAME else f"shard {shard}"
        thread = holder.get("thread")
        super().__init__(f"output {output} ({what}) is in use by PID {self.pid} on host {self.host}"
                         + (f" (thread {thread!r} of this process)" if thread else "")
                         + (f" since {since}" if since else "")
                         + "; wait for that run to finish or stop it, or write to another output")

    def __reduce__(self):  # re-raised in a parent process (joblib/loky, multiprocessing)
        return (type(self), (self.output, self.shard, self.holder))


def lock_path(output: Path, shard: str) -> Path:
    return Path(output) / f".lock-{shard}"


def _process_start_time(pid: int) -> Optional[float]:
    try:
        import psutil

        return float(psutil.Process(pid).create_time())
    except Exception:  # noqa: BLE001 - psutil missing, process gone, no permission
        return None


def pid_alive(pid: int, start_time: Optional[float] = None) -> bool:
    """Is `pid` a live process on this host (and, when `start_time` is given, the same process)?"""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, someone else's
    if start_time is not None:
        now = _process_start_time(pid)
        if now is not None and abs(now - start_time) > 1.0:
            return False  # the PID was reused by a later process
    return True


def read_holder(path: Path) -> dict[str, Any]:
    """The holder's record in a lock file ({} when empty or unreadable, or no regular file: a FIFO
    there blocked the read, a link was read through)."""
    try:
        fd, _ = open_regular(path, follow_symlinks=False)
        with open(fd, "rb") as fh:
            raw = fh.read(1 << 16).decode("utf-8")
        return json.loads(raw) if raw.strip() else {}
    except (OSError, ValueError):
        return {}


def holder_alive(holder: dict[str, Any]) -> bool:
    """False only when the holder is known dead: on this host and its PID is not alive."""
    if not holder or holder.get("host") != socket.gethostname():
        return True  # another host's PID cannot be checked from here
    return pid_alive(int(holder.get("pid", 0)), holder.get("start_time"))


_held: dict[str, list] = {}  # lock file realpath -> [fd, count, owning thread's ident, its name]
_held_guard = threading.Lock()


def _my_record() -> bytes:
    return json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                       "start_time": _process_start_time(os.getpid()),
                       "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}).encode()


def _try_flock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError as err:
        if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        raise


def _open_lock_file(path: Path, flags: int) -> int:
    """`os.open` of a lock file, which must be a regular file: never through a symbolic link, since
    the lock is truncated and rewritten (a link planted at `.lock-s0` emptied the file it pointed
    to, outside the output). A link, folder or other non-file there is an OSError naming the path
    and what to do (one line at the command line)."""
    try:
        fd = os.open(path, flags | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0), 0o644)
    except OSError as err:
        if err.errno in (errno.ELOOP, errno.EISDIR):
            what = "a symbolic link" if err.errno == errno.ELOOP else "a folder"
            raise OSError(err.errno, f"is {what}, not a lock file: remove it (hades-gpu makes lock files "
                          "itself)", str(path)) from None
        raise
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise OSError(errno.EEXIST, "is not a regular file, so not a lock file: remove it (hades-gpu makes "
                      "lock files itself)", str(path))
    if st.st_nlink > 1:  # a hard link to a file elsewhere: rewriting the lock would empty that file
        os.close(fd)
        raise OSError(errno.EEXIST, f"has {st.st_nlink - 1} other hard link(s), so it is no lock file of this "
                      "output: remove it (hades-gpu makes lock files itself)", str(path))
    return fd


def _write_record(fd: int) -> None:
    os.ftruncate(fd, 0)
    os.pwrite(fd, _my_record(), 0)


class OutputLock:
    """The exclusive lock of one output folder and shard (module docstring). Use as a context manager
    or `acquire()` / `release()`; `acquire` raises `OutputLockedError` at once when a live run holds it."""

    def __init__(self, output: str | os.PathLike, shard: str) -> None:
        self.output = Path(output)
        self.shard = shard
        self.path = lock_path(self.output, shard)
        self._key = ""
        self._acquired = False

    def acquire(self) -> "OutputLock":
        if self._acquired:
            return self
        self.output.mkdir(parents=True, exist_ok=True)
        self._key = os.path.realpath(self.path)
        with _held_guard:
            entry = _held.get(self._key)
            if entry is not None:
                if entry[2] != threading.get_ident():
                    raise OutputLockedError(self.output, self.shard, {
                        **read_holder(self.path), "pid": os.getpid(), "host": socket.gethostname(),
                        "thread": entry[3]})
                entry[1] += 1
                self._acquired = True
                return self
            fd = self._lock_file()
            _held[self._key] = [fd, 1, threading.get_ident(), threading.current_thread().name]
        self._acquired = True
        return self

    def _lock_file(self) -> int:
        if fcntl is None:  # pragma: no cover
            raise RuntimeError("the output lock needs fcntl (a POSIX system)")
        for _ in range(20):
            previous = read_holder(self.path)
            fd = _open_lock_file(self.path, os.O_RDWR | os.O_CREAT)
            if _try_flock(fd):
                if self._still_at_path(fd):
                    if previous and not holder_alive(previous):
                        log.info("lock: took over %s left by PID %s (not alive on this host)", self.path.name,
                                 previous.get("pid"))
                    _write_record(fd)
                    return fd
                os.close(fd)  # replaced while we were locking it: lock the new file
                continue
            holder = read_holder(self.path)
            os.close(fd)
            if not holder:  # locked a moment ago, its record not yet written
                time.sleep(0.05)
                continue
            if not holder_alive(holder):
                fd = self._take_over(holder)
                if fd is not None:
                    return fd
                continue
            raise OutputLockedError(self.output, self.shard, holder)
        raise OutputLockedError(self.output, self.shard, read_holder(self.path))

    def _still_at_path(self, fd: int) -> bool:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return False
        mine = os.fstat(fd)
        return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)

    def _take_over(self, dead: dict[str, Any]) -> Optional[int]:
        """Replace a lock file whose flock outlived its (dead) writer; None when someone else did."""
        guard = _open_lock_file(self.path.with_name(self.path.name + ".takeover"), os.O_RDWR | os.O_CREAT)
        try:
            fcntl.flock(guard, fcntl.LOCK_EX)
            if read_holder(self.path) != dead:
                return None  # another taker was first: start over
            tmp = self.path.with_name(f"{self.path.name}.new-{os.getpid()}")
            fd = _open_lock_file(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC)
            fcntl.flock(fd, fcntl.LOCK_EX)
            _write_record(fd)
            os.replace(tmp, self.path)
            log.warning("lock: %s was held for PID %s, which is not alive on this host; replaced it",
                        self.path.name, dead.get("pid"))
            return fd
        finally:
            os.close(guard)

    def release(self) -> None:
        if not self._acquired:
            return
        self._acquired = False
        with _held_guard:
            entry = _held.get(self._key)
            if entry is None:
                return
            entry[1] -= 1
            if entry[1] == 0:
                del _held[self._key]
                fd = entry[0]
                try:
                    os.ftruncate(fd, 0)  # no stale holder to name
                except OSError:
                    pass
                os.close(fd)  # releases the flock

    def __enter__(self) -> "OutputLock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def held_elsewhere(output: str | os.PathLike, skip: tuple[str, ...] = ()) -> list[tuple[str, dict[str, Any]]]:
    """(shard, holder) of each lock of `output` that another live process, or another thread of this
    one, holds now (this thread's own and the names in `skip` left out): who is writing the output at
    this moment. Each lock file is tried with a non-blocking flock and let go at once."""
    found = []
    for path in sorted(Path(output).glob(".lock-*")):
        name = path.name[len(".lock-"):]
        if name in skip or ".takeover" in name or ".new-" in name:
            continue
        with _held_guard:
            entry = _held.get(os.path.realpath(path))
        if entry is not None:
            if entry[2] != threading.get_ident():  # an ingest in another thread (ISNE trained on part of it)
                found.append((name, {**read_holder(path), "pid": os.getpid(), "host": socket.gethostname(),
                                     "thread": entry[3]}))
            continue  # this thread's own run (an ingest running its graph and ISNE stage)
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue  # gone meanwhile: nobody holds it
        try:
            if fcntl is None or _try_flock(fd):
                continue  # free (the flock goes with the descriptor)
        finally:
            os.close(fd)
        holder = read_holder(path)
        if holder and holder_alive(holder):
            found.append((name, holder))
    return found


def running_shards(output: str | os.PathLike) -> set[str]:
    """Names of the shards of `output` whose run is in progress now: their lock held by another live
    process, or by this one (a run in another thread, or this thread's own)."""
    names = {name for name, _ in held_elsewhere(output)}
    with _held_guard:
        mine = set(_held)
    for path in Path(output).glob(".lock-*"):
        if os.path.realpath(path) in mine:
            names.add(path.name[len(".lock-"):])
    return names


def lock_output(output: str | os.PathLike, shard: str) -> OutputLock:
    """Take the output lock of (`output`, `shard`) now; release it with `.release()` or `with`."""
    return OutputLock(output, shard).acquire()
