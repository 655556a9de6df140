"""The dataset writer in a process of its own, so Parquet encoding never competes with the router.

With the writer as a thread, its Parquet encoding (text zstd, the vectors' list levels), row
ordering, part checksums and the copy of every batch's rows out of its slab were about two thirds of
the main process's CPU at the feed ceiling (2 workers, 48 MB: 50% of a core in all, 18% with this
process), and the main process is the one process every worker and the embedder wait on.
`WriterProcess` is the same `DatasetWriter` (`store.writer`: commit order, kill points, manifest,
exactly-once) run in a child, which reads every batch from its shared-memory slab:

```
 main process                                           writer process (python -m ...writer_process)
 start    lock, open_output (repair, remove orphans);   DatasetWriter(opened=True)
          ── ("ring", layout, count) + the ring's fd ──►  maps the slabs
 router   ── ("notes", [("begin", key, ref, result),     .begin_document / .abandon / .note_unchanged
               ("abandon", key), ("unchanged", ...)]) ►   (held back, sent before the next message)
 embed    vectors into the slab; ── ("slab", header) ─►  receiving thread: rows copied out of the slab,
          ◄── ("free", slab): back to the ring ────────   slab handed back at once; a writer thread:
                                                          rows_of(...) -> .add_rows (encode, commit)
 run end  ── ("flush",) / ("close",) / ("discard",) ──►  reply ("flushed") / ("closed", totals) / ...
             ("close-interrupted",): Ctrl-C; a close whose not-yet-complete documents are expected
          ◄── ("error", line, traceback) before it exits on a failure
```

One socket pair carries everything in order, so a document's "begin" always precedes its rows.
Memory stays bounded by the ring: a slab is in use until the child copied it, and at most
`COPIED_BATCHES` copied batches wait for its writer thread (then it stops reading, the main process
runs out of slabs, and the workers wait: backpressure).

The output is opened in the main process, under the output lock it holds for the child's life (the
child takes none: a second flock on the same file from another process would wait on ours), so
resume reads a repaired manifest at once and the child's start-up overlaps with the workers'. The
child is a fresh interpreter (as the workers are, never `multiprocessing` spawn: no re-import of the
user's main module) and dies with the thread that started it (PR_SET_PDEATHSIG), so a killed run
never leaves a writer committing into an output the next run is repairing. If the child dies or
fails, the next call raises `WriterProcessError` with one line saying how; what it had not committed
is ingested again by the next run (commit order in `store.writer`).

Where it pays: with a core to spare for it (`use_process`). On 2 cores with 2 workers the three
processes share two cores, and the 2-worker feed ran 4% (48 MB) to 11% (12 MB) slower than with
the thread; there `profile.writer: auto` keeps the thread.
"""

from __future__ import annotations

import logging
import os
import queue as queue_mod
import socket
import subprocess
import sys
import threading
import traceback
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

import numpy as np

from hades_gpu.child_process import describe_exit, die_with_parent, leave_interrupts_to_parent, start_module
from hades_gpu.gpu.slabs import SlabMapping, SlabRing, SlabView
from hades_gpu.records import DocumentRef, DocumentResult, SlabBatch
from hades_gpu.store.lock import OutputLock
from hades_gpu.store.manifest import Manifest
from hades_gpu.store.writer import DatasetWriter, open_output

if TYPE_CHECKING:
    from hades_gpu.config import ProfileConfig

log = logging.getLogger(__name__)

COPIED_BATCHES = 32  # batches the child has copied out of their slabs and not yet handed to its writer
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
    commit_interval_s: Optional[float] = None


class WriterProcess:
    """A `DatasetWriter` in a child process, behind the stage's sink interface.

    Args:
        output (Path): dataset folder.
        shard (str): shard name (part and manifest names).
        dim (int): embedding width.
        rows_per_part (int): chunks per part file.
        commit_interval_s (float, optional): commit a part at least this often (`DatasetWriter`).
        settings (dict, optional): what shapes this run's chunks, checked against the output's
            (`store.writer.open_output`).

    Raises:
        OutputLockedError: another run holds this output and shard.
        ManifestError: the shard's manifest cannot be read.
    A failure of the child, at its start or later, is raised by the next call as `WriterProcessError`.
    """

    def __init__(self, output: Path, shard: str, dim: int, rows_per_part: int,
                 settings: Optional[dict[str, Any]] = None, commit_interval_s: Optional[float] = None) -> None:
        self.output = Path(output)
        self.shard = shard
        self.dim = dim
        self.parts_written = 0  # the child's totals, set by close()
        self.rows_written = 0
        self.documents_committed = 0
        self._send_lock = threading.Lock()
        self._notes: list[tuple] = []  # per-document messages not yet sent (see _note)
        self._ring: Optional[SlabRing] = None  # attach_ring
        self._replies: "queue_mod.Queue[tuple]" = queue_mod.Queue()
        self._failure: Optional[WriterProcessError] = None
        self._on_failure: Optional[Callable[[BaseException], None]] = None  # watch_failures
        self._finished = False
        # The output is opened here, under the lock this process holds for the child (module
        # docstring): resume reads a repaired manifest at once, and the child's start-up (~0.2 s of
        # imports) overlaps with the workers' instead of delaying them. The child only writes.
        self.output_lock = OutputLock(self.output, shard).acquire()
        try:
            self.manifest = Manifest.load(self.output, shard)
            try:
                self.damaged, self.removed_orphans = open_output(self.manifest, settings)
                self._proc, self._conn = self._start(WriterSetup(
                    str(self.output), shard, dim, rows_per_part, logging.getLogger("hades_gpu").getEffectiveLevel(),
                    commit_interval_s))
            except BaseException:
                self.manifest.close()
                raise
        except BaseException:
            self.output_lock.release()
            raise
        self._reader = threading.Thread(target=self._read_replies, name="hades-writer-replies", daemon=True)
        self._reader.start()

    # -- the child ------------------------------------------------------------------------------------
    @staticmethod
    def _start(setup: WriterSetup) -> tuple[subprocess.Popen, Connection]:
        proc, conn = start_module("hades_gpu.orchestration.writer_process", [str(os.getpid())])
        try:
            conn.send(setup)
        except OSError:
            pass  # it died at once: the reply thread finds it gone and says how
        return proc, conn

    def _read_replies(self) -> None:
        """Slabs the child copied go back to the ring; answers go to the waiting call; a failure or
        the child's end is recorded and reported (`watch_failures`)."""
        while True:
            try:
                reply = self._conn.recv()
            except (EOFError, OSError):
                if not self._finished:
                    self._failed(self._failure or self._died())
                self._replies.put(("gone",))
                return
            if reply[0] == "free":
                self._ring.release(reply[1])
            elif reply[0] == "error":
                log.debug("writer process traceback:\n%s", reply[2])
                self._failed(WriterProcessError(f"writer process: {reply[1]}"))
            else:
                self._replies.put(reply)

    def watch_failures(self, fail: Callable[[BaseException], None]) -> None:
        """Call `fail(error)` as soon as the child fails or dies (the stage's abort). Without it a
        run could wait forever: the slabs the child held never come back, the workers wait for
        slabs, and nothing would send to the child again to find it gone."""
        self._on_failure = fail
        if self._failure is not None:
            fail(self._failure)

    def _failed(self, error: WriterProcessError) -> None:
        self._failure = error
        if self._on_failure is not None:
            self._on_failure(error)

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

    def _send(self, message: Optional[tuple], fd: Optional[int] = None) -> None:
        """`message` after the held-back document messages (so a document's "begin" always precedes
        its rows), then the file descriptor `fd` (SCM_RIGHTS)."""
        if self._failure is not None:
            raise self._failure
        with self._send_lock:
            notes, self._notes = self._notes, []
            try:
                if notes:
                    self._conn.send(("notes", notes))
                if message is not None:
                    self._conn.send(message)
                if fd is not None:
                    with socket.fromfd(self._conn.fileno(), socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                        socket.send_fds(sock, [b"F"], [fd])
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

    def note_unchanged(self, rel_path: str, size: int, mtime_ns: int, stat_tag: Optional[int] = None) -> None:
        self._note(("unchanged", rel_path, int(size), int(mtime_ns), stat_tag))

    def attach_ring(self, ring: SlabRing) -> None:
        """Map the run's slabs in the child (their descriptor goes over the socket): the child reads
        every batch from its slab (`take_slab`) and hands the slab back when it has copied it."""
        if ring.layout.vector_dim != self.dim:
            raise ValueError(f"the slabs hold {ring.layout.vector_dim}-wide vectors; the writer writes {self.dim}")
        self._ring = ring
        self._send(("ring", ring.layout, ring.count), fd=ring.fd)

    def take_slab(self, view: SlabView, batch: SlabBatch, vectors: np.ndarray) -> None:
        """Put an embedded batch's vectors into its slab and hand the slab to the child, which copies
        the batch's rows out and gives the slab back to the ring (`attach_ring`). Nothing but this
        header crosses the socket: per batch, this process copies only the vectors (they were the
        only part not in the slab already); copying the rows out and sending them was ~0.4 s of this
        process's CPU per 48 MB of corpus."""
        rows = batch.rows
        if vectors.shape != (rows, self.dim):
            raise ValueError(f"the embedder returned vectors of shape {vectors.shape} for {rows} rows of width {self.dim}")
        view.vectors(rows)[...] = vectors
        self._send(("slab", batch))

    # -- run end ----------------------------------------------------------------------------------------
    def flush(self) -> None:
        """Commit every ready document (returns once the child has)."""
        self._call(("flush",), "flushed")

    def close(self, interrupted: bool = False) -> None:
        """Commit what is ready, save the stat updates, and end the child; the totals are the child's
        (`DatasetWriter.close`)."""
        if self._finished:
            return
        try:
            totals = self._call(("close-interrupted" if interrupted else "close",), "closed")[1]
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


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity where the platform has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def use_process(mode: str, num_workers: int, cores: Optional[int] = None) -> bool:
    """Whether profile.writer `mode` puts the writer in a process. "auto": only with a core to spare
    for it besides the workers' and the main process's; on a box without one (2 cores, 2 workers:
    the 2-worker feed ran 10-17% slower with the process, docs/bench_feed_writer*.json) the thread's
    CPU is cheaper than a second interpreter and the messages per batch."""
    from hades_gpu.config import WriterMode  # the child process never needs the configuration

    if mode == WriterMode.PROCESS:
        return True
    if mode == WriterMode.THREAD:
        return False
    if mode != WriterMode.AUTO:
        raise ValueError(f"profile.writer must be one of {'|'.join(WriterMode.values())} (got {mode!r})")
    return (usable_cores() if cores is None else cores) >= num_workers + 2


def open_writer(output: Path, shard: str, dim: int, profile: "ProfileConfig",
                settings: Optional[dict[str, Any]] = None) -> "DatasetWriter | WriterProcess":
    """The run's sink under `profile.writer` (`use_process`): a `WriterProcess`, or the `DatasetWriter`
    itself (a thread of this process then encodes). `settings`: see `store.writer.open_output`."""
    if use_process(profile.writer, profile.num_workers):
        return WriterProcess(Path(output), shard, dim, profile.writer_rows_per_part, settings,
                             commit_interval_s=profile.writer_commit_interval_s)
    return DatasetWriter(Path(output), shard, dim, profile.writer_rows_per_part, settings=settings,
                         commit_interval_s=profile.writer_commit_interval_s)


# -- the child ---------------------------------------------------------------------------------------
def serve(conn: Connection) -> int:
    """Run one shard's `DatasetWriter` on what the parent sends, until "close" or "discard".

    Two threads: this one receives, applies per-document messages and copies each batch out of its
    slab, handing the slab straight back; a writer thread encodes and commits. A writer busy with a
    row group or a commit so never holds slabs the workers wait for; `COPIED_BATCHES` bounds what
    waits between the two (then this thread stops reading, and the parent's slabs run out:
    backpressure)."""
    from hades_gpu.orchestration.slab_rows import WRITE_BLOCK_ROWS, WRITE_BLOCK_WAIT_S, SlabRows, copy_rows, rows_of

    try:
        setup: WriterSetup = conn.recv()
    except EOFError:
        return 0
    logging.basicConfig(level=setup.log_level, format=f"hades-writer[{os.getpid()}] %(levelname)s %(name)s: %(message)s")
    send_lock = threading.Lock()

    def send(message: tuple) -> None:
        with send_lock:
            conn.send(message)

    def fail(err: BaseException) -> None:
        """Report the error in one line and end the process at once (the other thread may be blocked)."""
        try:
            send(("error", _one_line(err), traceback.format_exc()))
        finally:
            logging.shutdown()
            os._exit(1)

    try:
        writer = DatasetWriter(Path(setup.output), setup.shard, setup.dim, setup.rows_per_part, opened=True,
                               commit_interval_s=setup.commit_interval_s)
    except Exception as err:  # noqa: BLE001 - reported to the parent in one line
        fail(err)
    copied: "queue_mod.Queue[object]" = queue_mod.Queue(maxsize=COPIED_BATCHES)
    limit = max(1, min(WRITE_BLOCK_ROWS, writer.row_group_rows))

    def write() -> None:
        """Rows to the writer in blocks of about `limit` rows (as the stage's writer thread does)."""
        staged: list[SlabRows] = []
        staged_rows = 0
        try:
            while True:
                try:
                    item = copied.get(timeout=WRITE_BLOCK_WAIT_S if staged else None)
                except queue_mod.Empty:
                    item = None
                if isinstance(item, SlabRows):
                    staged.append(item)
                    staged_rows += item.rows
                    if staged_rows < limit:
                        continue
                if staged:
                    writer.add_rows(rows_of(staged))
                    staged, staged_rows = [], 0
                if item == "flush":
                    writer.flush()
                    send(("flushed",))
                elif item in ("close", "close-interrupted"):
                    writer.close(interrupted=item == "close-interrupted")
                    send(("closed", (writer.parts_written, writer.rows_written, writer.documents_committed)))
                    return
                elif item == "discard":
                    writer.discard_open_part()
                    send(("discarded",))
                    return
        except BaseException as err:  # noqa: BLE001 - reported, then the process ends
            try:
                writer.discard_open_part()
            finally:
                fail(err)

    thread = threading.Thread(target=write, name="hades-writer", daemon=True)
    thread.start()
    mapping: Optional[SlabMapping] = None
    try:
        while True:
            try:
                message = conn.recv()
            except EOFError:
                return 0  # the parent is gone: nothing uncommitted is kept (the next run redoes it)
            op = message[0]
            if op == "slab":
                batch: SlabBatch = message[1]
                view = mapping.views[batch.slab]
                rows = copy_rows(view, batch, view.vectors(batch.rows).copy())
                send(("free", batch.slab))
                copied.put(rows)
            elif op == "notes":
                for note in message[1]:
                    apply_note(writer, note)
            elif op == "ring":
                with socket.fromfd(conn.fileno(), socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                    _, fds, _, _ = socket.recv_fds(sock, 1, 1)
                mapping = SlabMapping(fds[0], message[1], message[2])
            elif op in ("flush", "close", "close-interrupted", "discard"):
                copied.put(op)
                if op != "flush":
                    thread.join()
                    return 0
            else:
                raise ValueError(f"unknown writer message {op!r}")
    except Exception as err:  # noqa: BLE001 - reported to the parent in one line, then this process ends
        fail(err)
    return 1


def apply_note(writer: DatasetWriter, note: tuple) -> None:
    """One per-document message, as the writer thread's sink would have been called."""
    op = note[0]
    if op == "begin":
        writer.begin_document(note[1], note[2], note[3])
    elif op == "abandon":
        writer.abandon(note[1])
    elif op == "unchanged":
        writer.note_unchanged(note[1], note[2], note[3], note[4])
    else:
        raise ValueError(f"unknown writer note {op!r}")


def _one_line(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}".splitlines()[0]


def main(argv: list[str]) -> int:
    die_with_parent(int(argv[2]))  # SIGKILL when the thread that started this one ends, however it ends
    leave_interrupts_to_parent()
    code = serve(Connection(int(argv[1])))
    # Everything it wrote is closed and fsynced by now; the interpreter's teardown (pyarrow's, ~0.06 s)
    # would only keep the run waiting for this process to exit.
    logging.shutdown()
    sys.stderr.flush()
    os._exit(code)


__all__ = ["WriterProcess", "WriterProcessError", "WriterSetup", "open_writer", "use_process", "usable_cores", "serve", "main"]


if __name__ == "__main__":
    sys.exit(main(sys.argv))
