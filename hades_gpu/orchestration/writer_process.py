"""The dataset writer in a process of its own, so Parquet encoding never competes with the router.

With the writer as a thread, its Parquet encoding (text zstd, the vectors' list levels), row
ordering and part checksums were about half the main process's CPU at the feed ceiling (measured on
the 12 MB feed corpus: 0.20-0.22 s of 0.6 s), and the main process is the one process every worker
and the embedder wait on. `WriterProcess` is the same `DatasetWriter` (`store.writer`: commit order,
kill points, resume, manifest, exactly-once) run in a child; the main process only sends it what
the writer thread used to receive:

```
 main process                                          writer process (python -m ...writer_process)
 router   ── ("begin", key, ref, result) ─────────────►  DatasetWriter.begin_document
          ── ("abandon", key) / ("unchanged", ...) ───►  .abandon / .note_unchanged
 writer thread ── ("rows", [SlabRows, ...]) ──────────►  rows_of(...) -> .add_rows (encode, commit)
 run end  ── ("flush",) / ("close",) / ("discard",) ──►  reply ("flushed") / ("closed", totals)
          ◄── ("committed", documents, rows) per part;  ("error", line, traceback) before it exits
```

One socket pair carries everything in order, so a document's "begin" always precedes its rows.
Backpressure is the socket: a writer behind on encoding blocks the main writer thread's send, the
write queue fills, and the embed stage and workers wait, as with the thread.

The child is started as a fresh interpreter (as the workers are, never `multiprocessing` spawn: no
re-import of the user's main module) and dies with the thread that started it (PR_SET_PDEATHSIG), so
a killed run never leaves a writer committing into an output that the next run is repairing. The
main process holds the output lock for the child's life (the child takes none: a second flock on the
same file from another process would wait on ours). If the child dies, the next call raises
`WriterProcessError` with one line saying how it ended; what it had not committed is ingested again by
the next run (commit order in `store.writer`).
"""

from __future__ import annotations

import logging
import os
import pickle
import queue as queue_mod
import signal
import socket
import subprocess
import sys
import threading
import traceback
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import hades_gpu
from hades_gpu.child_process import describe_exit, pdeathsig_preexec
from hades_gpu.config import ProfileConfig, WriterMode
from hades_gpu.records import DocumentRef, DocumentResult
from hades_gpu.store.lock import OutputLock
from hades_gpu.store.manifest import Manifest
from hades_gpu.store.writer import DatasetWriter

log = logging.getLogger(__name__)

_PACKAGE_ROOT = str(Path(hades_gpu.__file__).resolve().parent.parent)
START_TIMEOUT_S = 120.0  # start-up includes repairing the output (verifying its parts' checksums)
SOCKET_BUFFER_BYTES = 4 << 20  # a block of rows (~1 MB) crosses in one or two wake-ups, not ten
ROW_FIELDS = ("doc_key", "ordinal", "char_start", "char_end", "n_tokens", "chunk_ids", "text_offsets", "text",
              "vectors")  # pipeline.SlabRows, in its field order
NOTES_PER_MESSAGE = 256  # per-document messages sent together at the latest after this many
STOP_TIMEOUT_S = 30.0  # after "close"/"discard" was answered, the child only exits


class WriterProcessError(RuntimeError):
    """The writer process failed or died; what it had not committed is redone by the next run."""


@dataclass
class WriterSetup:
    """What the child needs to open the shard's `DatasetWriter`."""

    output: str
    shard: str
    dim: int
    rows_per_part: int
    log_level: int


class WriterProcess:
    """A `DatasetWriter` in a child process, behind the stage's sink interface.

    Args:
        output (Path): dataset folder.
        shard (str): shard name (part and manifest names).
        dim (int): embedding width.
        rows_per_part (int): chunks per part file.

    Raises:
        OutputLockedError: another run holds this output and shard.
        WriterProcessError: the child could not open the output (its line says why).
    """

    def __init__(self, output: Path, shard: str, dim: int, rows_per_part: int) -> None:
        self.output = Path(output)
        self.shard = shard
        self.dim = dim
        self.parts_written = 0
        self.rows_written = 0
        self.documents_committed = 0
        self.on_commit: Optional[Callable[[int, int], None]] = None  # (documents, rows) per commit
        self._send_lock = threading.Lock()
        self._notes: list[tuple] = []  # per-document messages not yet sent (see _note)
        self._replies: "queue_mod.Queue[tuple]" = queue_mod.Queue()
        self._failure: Optional[WriterProcessError] = None
        self._finished = False
        self.output_lock = OutputLock(self.output, shard).acquire()  # held for the child (module docstring)
        try:
            self._proc, self._conn = self._start(WriterSetup(str(self.output), shard, dim, rows_per_part,
                                                             logging.getLogger("hades_gpu").getEffectiveLevel()))
            ready = self._first_reply()
            self.row_group_rows: int = ready[1]
            self.damaged: list = ready[2]
            self.removed_orphans: list[str] = ready[3]
            self.manifest = Manifest.load(self.output, shard)  # this process's reads (resume); after the child's repair
        except BaseException:
            self._kill()
            self.output_lock.release()
            raise
        self._reader = threading.Thread(target=self._read_replies, name="hades-writer-replies", daemon=True)
        self._reader.start()

    # -- the child ------------------------------------------------------------------------------------
    @staticmethod
    def _start(setup: WriterSetup) -> tuple[subprocess.Popen, Connection]:
        parent_sock, child_sock = socket.socketpair()
        for sock, option in ((parent_sock, socket.SO_SNDBUF), (child_sock, socket.SO_RCVBUF)):
            sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER_BYTES)  # capped by the kernel's *mem_max
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([_PACKAGE_ROOT] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
        env["OPENBLAS_NUM_THREADS"] = "1"  # no linear algebra here (see workers._start_worker)
        child_fd = child_sock.fileno()
        try:
            proc = subprocess.Popen([sys.executable, "-m", "hades_gpu.orchestration.writer_process", str(child_fd)],
                                    pass_fds=(child_fd,), env=env, stdin=subprocess.DEVNULL, close_fds=True,
                                    preexec_fn=pdeathsig_preexec(signal.SIGKILL))
        finally:
            child_sock.close()
        conn = Connection(parent_sock.detach())
        try:
            conn.send(setup)
        except OSError:
            pass  # it died at once: the first reply says how
        return proc, conn

    def _first_reply(self) -> tuple:
        if not self._conn.poll(START_TIMEOUT_S):
            raise WriterProcessError(f"writer process (PID {self._proc.pid}) did not open {self.output} in "
                                     f"{START_TIMEOUT_S:.0f} s")
        try:
            reply = self._conn.recv()
        except (EOFError, OSError):
            raise self._died() from None
        if reply[0] == "error":
            raise WriterProcessError(f"writer process: {reply[1]}")
        return reply

    def _read_replies(self) -> None:
        """Commit notices update the totals; answers go to the waiting call; the end is recorded."""
        while True:
            try:
                reply = self._conn.recv()
            except (EOFError, OSError):
                if not self._finished:
                    self._failure = self._failure or self._died()
                self._replies.put(("gone",))
                return
            if reply[0] == "committed":
                self.parts_written += 1
                self.documents_committed += reply[1]
                self.rows_written += reply[2]
                if self.on_commit is not None:
                    self.on_commit(reply[1], reply[2])
            elif reply[0] == "error":
                self._failure = WriterProcessError(f"writer process: {reply[1]}")
                log.debug("writer process traceback:\n%s", reply[2])
            else:
                self._replies.put(reply)

    def _died(self) -> WriterProcessError:
        try:
            code = self._proc.wait(timeout=5.0)
        except subprocess.TimeoutExpired:
            code = None
        return WriterProcessError(f"writer process (PID {self._proc.pid}) ended ({describe_exit(code)}) before "
                                  "the run did; the documents it had not committed are ingested again by the next run")

    def _note(self, message: tuple) -> None:
        """A per-document message: held back and sent with the next send (they are one message per
        document; one socket message each was ~10k reads in the child per 12 MB)."""
        if self._failure is not None:
            raise self._failure
        with self._send_lock:
            self._notes.append(message)
            if len(self._notes) < NOTES_PER_MESSAGE:
                return
        self._send(None)

    def _send(self, message: Optional[tuple], buffers: Sequence[memoryview] = ()) -> None:
        """`message` after the held-back document messages (so a document's "begin" always precedes
        its rows), then its out-of-band buffers."""
        if self._failure is not None:
            raise self._failure
        with self._send_lock:
            notes, self._notes = self._notes, []
            try:
                if notes:
                    self._conn.send(("notes", notes))
                if message is not None:
                    self._conn.send(message)
                for buffer in buffers:
                    self._conn.send_bytes(buffer)
            except OSError:
                self._reader.join(timeout=10.0)  # it records how the child ended
                raise (self._failure or self._died()) from None

    def _call(self, message: tuple, answer: str) -> tuple:
        self._send(message)
        reply = self._replies.get()
        if reply[0] != answer:
            self._reader.join(timeout=10.0)
            raise self._failure or self._died()
        return reply

    # -- sink interface (the stage calls these) -------------------------------------------------------
    def begin_document(self, key: int, ref: DocumentRef, result: DocumentResult) -> None:
        self._note(("begin", key, ref, result))

    def abandon(self, key: int) -> None:
        self._note(("abandon", key))

    def note_unchanged(self, rel_path: str, size: int, mtime_ns: int) -> None:
        self._note(("unchanged", rel_path, int(size), int(mtime_ns)))

    def add_slab_rows(self, parts: Sequence[Any]) -> None:
        """Several embedded batches' rows (`pipeline.SlabRows`), turned into Arrow columns and written
        by the child: the Arrow building is the writer's CPU too.

        The columns go out of band (pickle protocol 5): each array and byte string is written to the
        socket from its own memory and arrives as one bytes object the child's arrays view. Pickled
        in band, they were copied twice more and the child spent ~0.2 s more CPU per 20k rows."""
        buffers: list[pickle.PickleBuffer] = []
        columns = [tuple(pickle.PickleBuffer(value) if isinstance(value, bytes) else value
                         for value in (getattr(part, name) for name in ROW_FIELDS)) for part in parts]
        header = pickle.dumps(columns, protocol=5, buffer_callback=buffers.append)
        self._send(("rows", len(buffers), header), [buffer.raw() for buffer in buffers])

    # -- run end ----------------------------------------------------------------------------------------
    def flush(self) -> None:
        """Commit every ready document (returns once the child has)."""
        self._call(("flush",), "flushed")

    def close(self) -> None:
        """Commit what is ready, save the stat updates, and end the child; the totals are the child's."""
        if self._finished:
            return
        try:
            totals = self._call(("close",), "closed")[1]
            self._finished = True
            self.parts_written, self.rows_written, self.documents_committed = totals
            self._wait_exit()
        finally:
            self._end()

    def discard_open_part(self) -> None:
        """A failed run: drop the part being filled, uncommitted, and end the child (no-op once ended)."""
        if self._finished:
            return
        try:
            if self._failure is None and self._proc.poll() is None:
                try:
                    self._call(("discard",), "discarded")
                    self._finished = True
                    self._wait_exit()
                except WriterProcessError:
                    pass  # it is gone already: its temporary part file is removed by the next start
        finally:
            self._end()

    def _wait_exit(self) -> None:
        try:
            self._proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            log.warning("writer process (PID %d) did not exit %.0f s after it closed; killed", self._proc.pid,
                        STOP_TIMEOUT_S)
            self._kill()

    def _kill(self) -> None:
        if self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()

    def _end(self) -> None:
        self._finished = True
        self._kill()
        self._conn.close()
        self.manifest.close()
        self.output_lock.release()

    @property
    def pid(self) -> int:
        return self._proc.pid


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity where the platform has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def use_process(mode: str, num_workers: int, cores: Optional[int] = None) -> bool:
    """Whether profile.writer `mode` puts the writer in a process. "auto": only with a core to spare
    for it besides the workers' and the main process's; on a box without one (2 cores, 2 workers:
    the 12 MB feed ran ~7-20% slower with the process) the thread's CPU is cheaper than a second
    interpreter's and the rows' trip over a socket."""
    if mode == WriterMode.PROCESS:
        return True
    if mode == WriterMode.THREAD:
        return False
    if mode != WriterMode.AUTO:
        raise ValueError(f"profile.writer must be one of {'|'.join(WriterMode.values())} (got {mode!r})")
    return (usable_cores() if cores is None else cores) >= num_workers + 2


def open_writer(output: Path, shard: str, dim: int, profile: ProfileConfig) -> "DatasetWriter | WriterProcess":
    """The run's sink under `profile.writer` (`use_process`): a `WriterProcess`, or the `DatasetWriter`
    itself (a thread of this process then encodes)."""
    if use_process(profile.writer, profile.num_workers):
        return WriterProcess(Path(output), shard, dim, profile.writer_rows_per_part)
    return DatasetWriter(Path(output), shard, dim, profile.writer_rows_per_part)


# -- the child ---------------------------------------------------------------------------------------
def serve(conn: Connection) -> int:
    """Run one shard's `DatasetWriter` on what the parent sends, until "close" or "discard"."""
    from hades_gpu.orchestration.pipeline import SlabRows, rows_of

    try:
        setup: WriterSetup = conn.recv()
    except EOFError:
        return 0
    logging.basicConfig(level=setup.log_level, format=f"hades-writer[{os.getpid()}] %(levelname)s %(name)s: %(message)s")
    try:
        writer = DatasetWriter(Path(setup.output), setup.shard, setup.dim, setup.rows_per_part, lock=False)
    except Exception as err:  # noqa: BLE001 - reported to the parent in one line
        conn.send(("error", _one_line(err), traceback.format_exc()))
        return 1
    writer.on_commit = lambda documents, rows: conn.send(("committed", documents, rows))
    conn.send(("ready", writer.row_group_rows, writer.damaged, writer.removed_orphans))
    try:
        while True:
            try:
                message = conn.recv()
            except EOFError:
                return 0  # the parent is gone: nothing uncommitted is kept (the next run redoes it)
            op = message[0]
            if op == "notes":
                for note in message[1]:
                    apply_note(writer, note)
            elif op == "rows":
                buffers = [conn.recv_bytes() for _ in range(message[1])]
                columns = pickle.loads(message[2], buffers=buffers)
                writer.add_rows(rows_of([SlabRows(*fields) for fields in columns]))
            elif op == "flush":
                writer.flush()
                conn.send(("flushed",))
            elif op == "close":
                writer.close()
                conn.send(("closed", (writer.parts_written, writer.rows_written, writer.documents_committed)))
                return 0
            elif op == "discard":
                writer.discard_open_part()
                conn.send(("discarded",))
                return 0
            else:
                raise ValueError(f"unknown writer message {op!r}")
    except Exception as err:  # noqa: BLE001 - reported to the parent in one line, then this process ends
        try:
            writer.discard_open_part()
        finally:
            conn.send(("error", _one_line(err), traceback.format_exc()))
        return 1


def apply_note(writer: DatasetWriter, note: tuple) -> None:
    """One per-document message, as the writer thread's sink would have been called."""
    op = note[0]
    if op == "begin":
        writer.begin_document(note[1], note[2], note[3])
    elif op == "abandon":
        writer.abandon(note[1])
    elif op == "unchanged":
        writer.note_unchanged(note[1], note[2], note[3])
    else:
        raise ValueError(f"unknown writer note {op!r}")


def _one_line(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}".splitlines()[0]


def main(argv: list[str]) -> int:
    code = serve(Connection(int(argv[1])))
    # Everything it wrote is closed and fsynced by now; the interpreter's teardown (pyarrow's, ~0.06 s)
    # would only keep the run waiting for this process to exit.
    logging.shutdown()
    sys.stderr.flush()
    os._exit(code)


__all__ = ["WriterProcess", "WriterProcessError", "WriterSetup", "open_writer", "use_process", "usable_cores", "serve", "main"]


if __name__ == "__main__":
    sys.exit(main(sys.argv))
