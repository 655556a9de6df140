"""The pool of worker processes that read, chunk, tokenize and pack documents into slabs.

Processes, not threads: chunking is Python code that would hold the GIL against the embed stage.
Each worker is a fresh interpreter running `worker_main` (see there why not `multiprocessing`'s
spawn), joined to the main process by one socket pair; the slabs it writes into are the main
process's `gpu.slabs.SlabRing`, mapped through an inherited file descriptor.

The pool is the main process's event source. `poll` returns what the workers reported:

- `DocumentEvent`: a document was read and chunked (or skipped, or found unchanged);
- `BatchEvent`: a slab was filled with a batch (route it to the embedder);
- `AbandonEvent`: the rows already received under a key must be dropped, because the worker
  that was packing that document died before all its rows arrived; the document is retried under a
  new key, so each chunk is still written exactly once.

A worker that dies (a segfault in a native library, the OOM killer) is restarted; the document it
was working on is retried once and skipped with reason ``worker_crashed`` when it kills a worker
twice; documents merely queued behind it are handed on without being charged. Slabs granted to a
dead worker go back to the ring. At most ``max_inflight_per_worker`` documents are handed to a
worker before it reports them, and at most ``slabs_per_worker`` free slabs are granted to one; both
are topped up, several per message, once half are reported or used.
"""

from __future__ import annotations

import logging
import os
import selectors
import socket
import subprocess
import sys
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.reduction import sendfds
from typing import Callable, Optional, Protocol, Union

from hades_gpu import child_process
from hades_gpu.child_process import child_env, describe_exit, start_module
from hades_gpu.gpu.slabs import SlabRing
from hades_gpu.orchestration.reading_board import ReadingBoard
from hades_gpu.orchestration.worker_main import WorkerSetup
from hades_gpu.records import ChunkedDocument, DocumentRef, DocumentResult, SlabBatch

log = logging.getLogger(__name__)


class DocumentQueue(Protocol):
    """Documents not yet handed to a worker: `(index, ref)` from the left (`pipeline.LargestFirst`)."""

    def popleft(self) -> tuple[int, DocumentRef]: ...

    def __len__(self) -> int: ...


# workers in a row (at least; 2 per worker above that) that die before their first message end the
# run with `WorkerStartError`: restarting them forever hung a run whose workers cannot import
START_DEATHS_LIMIT = 4

LIVENESS_CHECK_S = 0.05  # at most this often: waitpid on every worker (see WorkerPool.poll)
# free slabs granted to a worker at a time: 2 left each worker waiting for the main process's round
# trip on most batches; 4 and 8 ran the 2-worker feed alike (~8% faster than 2)
SLABS_PER_WORKER = 4


class WorkerStartError(RuntimeError):
    """Worker processes keep dying before their first document: the run cannot go on."""


@dataclass
class DocumentEvent:
    key: int
    index: int
    ref: DocumentRef
    result: DocumentResult


@dataclass
class BatchEvent:
    batch: SlabBatch


@dataclass
class AbandonEvent:
    key: int


PoolEvent = Union[DocumentEvent, BatchEvent, AbandonEvent]


@dataclass
class _Task:
    key: int
    index: int
    ref: DocumentRef
    known_hash: Optional[str]
    attempt: int


@dataclass
class _Delivery:
    task: _Task
    expected: int
    received: int = 0


@dataclass
class _Worker:
    proc: subprocess.Popen
    conn: Connection
    pending: "OrderedDict[int, _Task]" = field(default_factory=OrderedDict)  # handed out, no result yet
    delivering: dict[int, _Delivery] = field(default_factory=dict)  # result in, rows still arriving
    slabs: set[int] = field(default_factory=set)  # granted and not yet sent back
    dead: bool = False
    reported: bool = False  # it sent a message: it got past its start-up


def _import_path() -> list[str]:
    """The parent's sys.path, made absolute (a Hydra job may change the working directory)."""
    return [os.path.abspath(p) if p else os.getcwd() for p in sys.path]


def _spawn(slot: int, warm_up: Optional[Callable[[], object]]) -> tuple[subprocess.Popen, Connection]:
    """A worker process that imports its modules and runs `warm_up` while it waits for its slabs
    (`WorkerPool._attach` sends them)."""
    env = child_env()
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    proc, conn = start_module("hades_gpu.orchestration.worker_main", [str(slot)], env=env)
    try:
        conn.send(_import_path())
        conn.send(("warm_up", warm_up))
    except OSError:
        pass  # it died at once: the pool finds it dead and starts another
    return proc, conn


def _stop_unattached(started: list[tuple[subprocess.Popen, Connection]], timeout: float = 5.0) -> None:
    """Stop workers that have no slabs yet: their pipe closes, so they exit (killed after `timeout`)."""
    for _proc, conn in started:
        conn.close()
    deadline = time.monotonic() + timeout
    for proc, _conn in started:
        try:
            proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class WorkerLaunch:
    """Worker processes started before their pool exists, for a `WorkerPool` to adopt.

    Why: a worker needs ~0.35 s (interpreter, imports, the tokenizer and its fast twin) before its
    first document, and the main process spends that long or longer before it can make the pool
    (the embedder loads the model, the slab ring is sized from it). Started first, the workers warm
    up meanwhile. Used as a context manager: the processes a pool did not adopt are stopped on exit.

    Args:
        num_workers (int): processes to start.
        warm_up (callable, optional): picklable, run once in each worker before its first document
            (`documents.chunking.warm_up`); a failure there is logged and ignored.
    """

    def __init__(self, num_workers: int, warm_up: Optional[Callable[[], object]] = None) -> None:
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1 (got {num_workers})")
        self.warm_up = warm_up
        self._started: list[tuple[subprocess.Popen, Connection]] = []
        try:
            for slot in range(num_workers):
                self._started.append(_spawn(slot, warm_up))
        except BaseException:
            self.close()
            raise

    def __len__(self) -> int:
        return len(self._started)

    def pids(self) -> list[int]:
        """The process ids of the workers not yet handed over."""
        return [proc.pid for proc, _conn in self._started]

    def take(self) -> list[tuple[subprocess.Popen, Connection]]:
        """The processes, handed over once (the launch no longer stops them)."""
        started, self._started = self._started, []
        return started

    def close(self, timeout: float = 5.0) -> None:
        """Stop the processes not taken."""
        started, self._started = self._started, []
        _stop_unattached(started, timeout)

    def __enter__(self) -> "WorkerLaunch":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class WorkerPool:
    """`num_workers` processes running `process_fn(ref, *fn_args) -> ChunkedDocument` and packing
    its chunks into `ring`'s slabs.

    Args:
        num_workers (int): processes to start.
        process_fn (callable): a top-level function of an importable module, run per document.
        fn_args (tuple): extra arguments passed to every call (configs).
        ring (SlabRing): the slabs the workers write batches into.
        packing (dict): `WorkerSetup` fields for the batcher: max_batch_tokens, max_batch_size,
            length_bucket, max_seq_len, lookahead_batches, special_ids.
        max_inflight_per_worker (int): documents handed to one worker before it reports them.
        slabs_per_worker (int): free slabs granted to one worker at a time.
        launched (WorkerLaunch, optional): processes started ahead (`num_workers` of them), adopted
            instead of starting new ones; a restarted worker warms up with the launch's `warm_up`.
    """

    def __init__(self, num_workers: int, process_fn: Callable[..., ChunkedDocument], fn_args: tuple, ring: SlabRing,
                 packing: dict, max_inflight_per_worker: int = 8, slabs_per_worker: int = SLABS_PER_WORKER,
                 launched: Optional[WorkerLaunch] = None) -> None:
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1 (got {num_workers})")
        if launched is not None and len(launched) != num_workers:
            raise ValueError(f"the launch started {len(launched)} worker(s), the pool needs {num_workers}")
        self.ring = ring
        self._warm_up = launched.warm_up if launched is not None else None
        self._per_worker = max(1, max_inflight_per_worker)
        # A worker holds back its document results until a quarter of its share is done (a batch
        # header goes at once): the refill at half its share then still comes before it runs dry.
        self._setup = WorkerSetup(layout=ring.layout, slab_count=ring.count, process_fn=process_fn, fn_args=fn_args,
                                  log_level=logging.getLogger("hades_gpu").getEffectiveLevel(),
                                  reports_per_message=max(1, self._per_worker // 4), **packing)
        self._board = ReadingBoard(num_workers)
        self._slabs_per_worker = max(1, slabs_per_worker)
        self._next_key = 0
        self._budget: Optional[int] = None
        self.restarts = 0
        self.starved_grants = 0
        self._start_deaths = 0  # workers in a row that died before their first message
        self._start_death_limit = max(START_DEATHS_LIMIT, 2 * num_workers)
        self._closed = False
        self._stopped = False
        self._next_liveness_check = 0.0
        # one selector for the pool's life (multiprocessing.connection.wait builds one per call)
        self._selector = selectors.DefaultSelector()
        self._selector.register(ring.wake_socket(), selectors.EVENT_READ, None)
        self._workers: list[_Worker] = []
        adopted = launched.take() if launched is not None else []
        try:
            for slot in range(num_workers):
                self._workers.append(self._attach(slot, *(adopted[slot] if adopted else _spawn(slot, None))))
        except BaseException:
            _stop_unattached(adopted[len(self._workers):])
            self.close()
            raise

    # -- processes ----------------------------------------------------------------------------------
    def _attach(self, slot: int, proc: subprocess.Popen, conn: Connection) -> _Worker:
        """Make a started worker process this pool's `slot`: its slab ring and reading board (file
        descriptors, passed over its socket), then its setup."""
        self._board.clear(slot)
        worker = _Worker(proc=proc, conn=conn)
        self._selector.register(conn.fileno(), selectors.EVENT_READ, worker)
        try:
            with socket.socket(fileno=os.dup(conn.fileno())) as sock:
                sendfds(sock, [self.ring.fd, self._board.fd])
            conn.send(self._setup)
            if self._budget is not None:
                conn.send(("budget", self._budget))
        except OSError:
            worker.dead = True  # it died at once: the next poll restarts it
        return worker

    def _start_worker(self, slot: int) -> _Worker:
        return self._attach(slot, *_spawn(slot, self._warm_up))

    @property
    def num_workers(self) -> int:
        return len(self._workers)

    def pids(self) -> list[int]:
        return [w.proc.pid for w in self._workers if not w.dead]

    # -- tasks --------------------------------------------------------------------------------------
    @property
    def inflight(self) -> int:
        """Documents handed out whose result or rows have not all arrived."""
        return sum(len(w.pending) + len(w.delivering) for w in self._workers)

    def refill(self, todo: "DocumentQueue", known_hash: Callable[[DocumentRef], Optional[str]]) -> None:
        """Top up, from the left of `todo` (index, ref), every live worker whose unreported documents
        fell to half its `max_inflight_per_worker`, all of its share in one message. One message per
        document was a third of the router's messages (measured: 897 sends for 897 documents)."""
        low = self._per_worker // 2
        for worker in self._workers:
            if not todo:
                return
            if worker.dead or len(worker.pending) > low:
                continue
            tasks = []
            for _ in range(min(self._per_worker - len(worker.pending), len(todo))):
                index, ref = todo.popleft()
                tasks.append(_Task(self._new_key(), index, ref, known_hash(ref), 1))
            self._send_tasks(worker, tasks)

    def _new_key(self) -> int:
        self._next_key += 1
        return self._next_key - 1

    def _send_task(self, task: _Task) -> None:
        worker = min((w for w in self._workers if not w.dead), key=lambda w: len(w.pending), default=None)
        self._send_tasks(worker if worker is not None else self._workers[0], [task])

    def _send_tasks(self, worker: _Worker, tasks: list[_Task]) -> None:
        for task in tasks:
            worker.pending[task.key] = task
        try:
            worker.conn.send(("tasks", [(t.key, t.ref, t.known_hash) for t in tasks]))
        except OSError:
            worker.dead = True  # found by the next poll, which hands its tasks on

    def set_budget(self, tokens: int) -> None:
        """The batch token budget every worker's batcher uses from now on (GPU memory pressure)."""
        if tokens == self._budget:
            return
        self._budget = tokens
        for w in self._workers:
            try:
                w.conn.send(("budget", tokens))
            except OSError:
                w.dead = True

    # -- events -------------------------------------------------------------------------------------
    def poll(self, timeout: float = 0.2) -> list[PoolEvent]:
        """What the workers reported within `timeout` seconds; dead workers are restarted here."""
        events: list[PoolEvent] = []
        for key, _mask in self._selector.select(timeout):
            worker = key.data
            if worker is None:
                self.ring.drain_wakeups()
                continue
            if not worker.dead:
                # one message per readiness: the selector is level-triggered, so the rest comes next
                # call (Connection.poll would build a selector per message)
                try:
                    self._receive_all(worker, worker.conn.recv(), events)
                except (EOFError, OSError):
                    worker.dead = True
        # a dead worker's socket reads EOF (marked dead above); waitpid per worker on every message
        # as well cost the router ~10% of its CPU at 2 workers, so that check runs at most every
        # LIVENESS_CHECK_S (it catches an exit whose EOF the select has not reported yet)
        now = time.monotonic()
        check_exits = now >= self._next_liveness_check
        if check_exits:
            self._next_liveness_check = now + LIVENESS_CHECK_S
        for slot, worker in enumerate(self._workers):
            if check_exits and not worker.dead and worker.proc.poll() is not None:
                self._drain(worker, events)  # it exited after the select: read what it sent before dying
                worker.dead = True
            if worker.dead and not self._stopped:
                events.extend(self._replace(slot))
        self._grant()
        return events

    def _drain(self, worker: _Worker, events: list[PoolEvent]) -> None:
        """Receive every message waiting on a worker's pipe; EOF marks it dead."""
        try:
            while worker.conn.poll(0):
                self._receive_all(worker, worker.conn.recv(), events)
        except (EOFError, OSError):
            worker.dead = True

    def _receive_all(self, worker: _Worker, msg: object, events: list[PoolEvent]) -> None:
        """One message from a worker: a report, or a list of reports in the order they were made."""
        worker.reported = True
        for report in (msg if isinstance(msg, list) else (msg,)):
            event = self._receive(worker, report)
            if event is not None:
                events.append(event)

    def _receive(self, worker: _Worker, msg: object) -> Optional[PoolEvent]:
        if isinstance(msg, DocumentResult):
            task = worker.pending.pop(msg.key)
            if msg.n_chunks:
                worker.delivering[msg.key] = _Delivery(task, msg.n_chunks)
            return DocumentEvent(msg.key, task.index, msg.ref if msg.ref is not None else task.ref, msg)
        if isinstance(msg, SlabBatch):
            worker.slabs.discard(msg.slab)
            for key, count in msg.doc_counts:  # per document, not per chunk
                delivery = worker.delivering.get(key)
                if delivery is not None:
                    delivery.received += count
                    if delivery.received >= delivery.expected:
                        del worker.delivering[key]
            return BatchEvent(msg)
        raise TypeError(f"unexpected message from a worker: {type(msg).__name__}")

    def _replace(self, slot: int) -> list[PoolEvent]:
        """Restart a dead worker; retry or give up on what it held (see the module docstring)."""
        worker = self._workers[slot]
        try:
            code = worker.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            worker.proc.kill()
            code = worker.proc.wait()
        started = self._board.reading(slot)  # read before the slot's next worker clears it
        self._selector.unregister(worker.conn.fileno())
        worker.conn.close()
        # died before its first message and before it began a document: it could not start at all
        self._start_deaths = self._start_deaths + 1 if not worker.reported and started is None else 0
        if self._start_deaths >= self._start_death_limit:
            raise WorkerStartError(
                f"worker processes die before their first document ({self._start_deaths} in a row, the last "
                f"{describe_exit(code)}): they cannot start in this environment (their error is printed above)")
        # (a SIGTERM to the whole process group while the run is stopping: not news under its one line)
        log.log(logging.DEBUG if child_process.stopping.is_set() else logging.WARNING,
                "worker pid %s died (exit code %s) holding %d document(s); restarting", worker.proc.pid, code,
                len(worker.pending) + len(worker.delivering))
        for slab in sorted(worker.slabs):
            self.ring.release(slab)  # granted, never filled and sent: nobody else holds it
        worker.slabs.clear()
        self._workers[slot] = self._start_worker(slot)
        self.restarts += 1
        events: list[PoolEvent] = []
        retries: list[_Task] = []
        # Who is charged a try: the document it marked on the board as being read and whose result never
        # came (read, or reported but not yet sent); when it died between documents (packing, idle),
        # the documents whose rows it was still packing.
        reading = started if started in worker.pending else None
        suspects = {reading} if reading is not None else set(worker.delivering)
        for key, delivery in worker.delivering.items():
            events.append(AbandonEvent(key))  # some of its rows are lost with the worker: redo it all
            retries.append(delivery.task)
        retries.extend(worker.pending.values())
        charged: list[_Task] = []
        for task in retries:
            if task.key in suspects:
                if task.attempt >= 2:
                    events.append(DocumentEvent(task.key, task.index, task.ref, DocumentResult(
                        key=task.key, content_hash="", skip_reason="worker_crashed",
                        skip_detail=f"worker exited with code {code} twice on it")))
                    continue
                task.attempt += 1
            charged.append(task)
        retries = charged
        for task in retries:
            self._send_task(_Task(self._new_key(), task.index, task.ref, task.known_hash, task.attempt))
        return events

    def _grant(self) -> None:
        """Top up to `slabs_per_worker` free slabs every live worker that holds half of that or fewer,
        the emptiest first (a grant per slab was a message per batch)."""
        if self._stopped:
            return
        low = self._slabs_per_worker // 2
        needy = [i for i, w in enumerate(self._workers) if not w.dead and len(w.slabs) <= low]
        if not needy:
            return
        if not self.ring.free:
            if any(not self._workers[i].slabs for i in needy):
                self.starved_grants += 1  # a worker has no slab to pack into: backpressure from the ring
            return
        grants: dict[int, list[int]] = {}
        while True:
            held = [(len(self._workers[i].slabs) + len(grants.get(i, [])), i) for i in needy]
            count, emptiest = min(held)
            if count >= self._slabs_per_worker:
                break
            slab = self.ring.try_acquire()
            if slab is None:
                break
            grants.setdefault(emptiest, []).append(slab)
        for i, slabs in grants.items():
            worker = self._workers[i]
            worker.slabs.update(slabs)
            try:
                worker.conn.send(("slabs", slabs))
            except OSError:
                worker.dead = True  # its slabs return to the ring when it is replaced

    # -- shutdown -----------------------------------------------------------------------------------
    def stop(self) -> None:
        """Tell every worker to exit, without waiting (`close` waits): the caller can finish its own
        work meanwhile. No document may be handed out afterwards."""
        if self._stopped:
            return
        self._stopped = True
        for worker in self._workers:
            try:
                worker.conn.send(("stop",))
            except OSError:
                pass

    def close(self, timeout: float = 5.0) -> None:
        """Stop every worker: ``stop`` first, then kill whatever did not exit in time."""
        if self._closed:
            return
        self.stop()
        self._closed = True
        deadline = time.monotonic() + timeout
        for worker in self._workers:
            try:
                worker.proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                worker.proc.kill()
                worker.proc.wait()
            worker.conn.close()
            for slab in sorted(worker.slabs):
                self.ring.release(slab)  # granted, never sent back: the exited worker no longer holds it
            worker.slabs.clear()
        self._selector.close()
        self._board.close()

    def __enter__(self) -> "WorkerPool":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["WorkerPool", "WorkerLaunch", "WorkerStartError", "START_DEATHS_LIMIT", "DocumentEvent", "BatchEvent",
           "AbandonEvent", "PoolEvent"]
