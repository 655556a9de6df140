"""The worker process: read, chunk, tokenize and pack documents into the main process's slabs.

Started as ``python -m hades_gpu.orchestration.worker_main <pipe-fd> <slot>`` by `workers.WorkerPool`
(or ahead of it by `workers.WorkerLaunch`), never through `multiprocessing`'s spawn: spawn re-runs
the user's main module in every child (a plain script without a main guard then starts workers
recursively and dies, and ``python - < script`` fails on ``'<stdin>'``). This module imports only
the package, so workers start the same way from a script, standard input, ``python -c``, a notebook
kernel, a Hydra job or a joblib/loky worker.

Protocol over the pipe (pickled tuples, all small: no chunk crosses it):

- parent -> worker: ``sys.path`` first (so the configured process function can be unpickled), then
  ``("warm_up", callable or None)`` (run at once: the worker may be started before the main process
  has its slabs), then the slab ring's and the reading board's file descriptors (SCM_RIGHTS, one
  `multiprocessing.reduction.sendfds`), then a `WorkerSetup`; afterwards
  ``("tasks", [(key, ref, known_hash), ...])``, ``("slabs", [i, ...])`` (grants),
  ``("budget", tokens)`` (the GPU governor's batch budget) and ``("stop",)``;
- worker -> parent: one `DocumentResult` per task, in task order, then `SlabBatch` headers for the
  batches holding its chunks (a document's result always precedes its rows). Reports are sent
  together, as one list: before the worker reads a document when a batch header is waiting (the
  embedder wants it) or `reports_per_message` reports are, and before the worker waits for the
  parent. The document it is reading is not a message: it is stored in the `ReadingBoard` (the
  document charged if the worker dies now), which the parent reads after a death.
"""

from __future__ import annotations

import gc
import logging
import os
import socket
import sys
import time
from collections import deque
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.reduction import recvfds
from typing import Any, Callable, Optional

from hades_gpu.child_process import leave_interrupts_to_parent
from hades_gpu.gpu.slabs import SlabLayout, SlabMapping
from hades_gpu.orchestration.batcher import LengthSortedBatcher
from hades_gpu.orchestration.reading_board import ReadingBoard
from hades_gpu.orchestration.slab_packer import SlabPacker
from hades_gpu.records import ChunkedDocument, DocumentRef, DocumentResult

log = logging.getLogger(__name__)

# A worker allocates millions of short-lived acyclic objects (ast nodes, spans, token lists) that
# reference counting frees; CPython's default gen-0 threshold (700) still runs the cyclic collector
# every 700 allocations, and each full pass walks the tokenizer's vocabulary too. A larger gen-0
# threshold plus gc.freeze() of what start-up built: process_document 5-7% faster on the 12 MB
# feed corpus (scripts/bench_feed.py's files, one thread). Cycles are still collected.
GC_GEN0_THRESHOLD = 10_000


@dataclass
class WorkerSetup:
    """Everything a worker needs besides its two file descriptors."""

    layout: SlabLayout
    slab_count: int
    process_fn: Callable[..., ChunkedDocument]
    fn_args: tuple
    max_batch_tokens: int
    max_batch_size: int
    length_bucket: int
    max_seq_len: int
    lookahead_batches: int
    special_ids: tuple[int, int, int]
    idle_flush_s: float = 0.02  # no new task for this long: write out the look-ahead window
    reports_per_message: int = 1  # document results held back for one send (a batch header goes at once)
    log_level: int = logging.WARNING


class _Stop(Exception):
    pass


def _result_of(key: int, ref: DocumentRef, doc: ChunkedDocument, known_hash: Optional[str],
               busy_s: float) -> DocumentResult:
    result = _plain_result(key, doc, known_hash, busy_s)
    if doc.ref != ref:
        result.ref = doc.ref  # the process function changed it (e.g. forced modality): the writer stores that
    return result


def _plain_result(key: int, doc: ChunkedDocument, known_hash: Optional[str], busy_s: float) -> DocumentResult:
    if doc.skip_reason is not None:
        return DocumentResult(key=key, content_hash=doc.content_hash, skip_reason=doc.skip_reason,
                              skip_detail=doc.skip_detail, busy_s=busy_s)
    if known_hash is not None and doc.content_hash == known_hash:
        return DocumentResult(key=key, content_hash=doc.content_hash, unchanged=True, busy_s=busy_s)
    return DocumentResult(key=key, content_hash=doc.content_hash, n_chunks=len(doc.chunks),
                          tokens=sum(c.n_tokens for c in doc.chunks), references=list(doc.references), busy_s=busy_s,
                          encoding=doc.encoding)


def run_worker(conn: Connection, setup: WorkerSetup, mapping: SlabMapping, tune_gc: bool = False,
               mark_reading: Callable[[int], None] = lambda key: None) -> None:
    """The worker loop (also driven in-process by tests): returns on ``stop`` or when the parent is gone.

    `tune_gc` (the worker process's own `main`): `GC_GEN0_THRESHOLD`, and everything alive after the
    first document (modules, the tokenizer) frozen out of the collector's passes. `mark_reading(key)`
    runs before each document is read (the process's `main`: its slot of the `ReadingBoard`)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if tune_gc:
        gc.set_threshold(GC_GEN0_THRESHOLD, *gc.get_threshold()[1:])
    frozen = not tune_gc
    tasks: deque[tuple[int, DocumentRef, Optional[str]]] = deque()
    free: deque[int] = deque()
    budget = [setup.max_batch_tokens]

    def handle(msg: tuple) -> None:
        kind = msg[0]
        if kind == "tasks":
            tasks.extend(msg[1])
        elif kind == "slabs":
            free.extend(msg[1])
        elif kind == "budget":
            budget[0] = int(msg[1])
        elif kind == "stop":
            raise _Stop
        else:
            raise ValueError(f"unknown message {kind!r}")

    # Reports wait in `outbox` and go as one message (a list) at the next point where the parent must
    # hear from this worker: before it reads on while a batch header waits or `reports_per_message`
    # reports do, and before any wait for the parent (a slab, a task). A document's result, its
    # batches and the next document's key were three to five pickled messages, each a wake-up of the
    # router; then one per document (with the key the reading board now holds).
    outbox: list[Any] = []
    batch_waiting = [False]  # a batch header is in the outbox: send before reading on

    def send_outbox() -> None:
        if outbox:
            conn.send(outbox[0] if len(outbox) == 1 else list(outbox))
            outbox.clear()
            batch_waiting[0] = False

    def report_batch(batch: Any) -> None:
        outbox.append(batch)
        batch_waiting[0] = True

    def receive_waiting() -> None:
        """Handle every message already waiting (grants, tasks) without blocking."""
        while conn.poll(0):
            handle(conn.recv())

    def acquire(block: bool) -> Optional[int]:
        """A granted slab: waits for one when `block`, else None when none has come yet."""
        if not free:
            receive_waiting()
        while not free:
            if not block:
                return None
            send_outbox()  # the parent frees slabs only for batches it has heard of
            handle(conn.recv())
        return free.popleft()

    batcher = LengthSortedBatcher(setup.max_batch_tokens, setup.max_batch_size, setup.length_bucket, setup.max_seq_len,
                                  setup.lookahead_batches, budget_fn=lambda base: budget[0])
    packer = SlabPacker(batcher, setup.special_ids, acquire, lambda i: mapping.views[i], report_batch)
    try:
        while True:
            if not tasks:
                send_outbox()
                if packer.buffered_rows and not conn.poll(setup.idle_flush_s):
                    packer.flush()  # nothing new to look ahead at: do not hold documents back
                    continue
                handle(conn.recv())
                continue
            key, ref, known_hash = tasks.popleft()
            mark_reading(key)  # so that a death while reading it is charged to this document, not a neighbour
            if batch_waiting[0] or len(outbox) >= setup.reports_per_message:
                send_outbox()
            if packer.backlog:
                packer.write_backlog(block=False)  # slabs granted since the last document
            t0 = time.perf_counter()
            try:
                doc = setup.process_fn(ref, *setup.fn_args)
            except Exception as err:  # a bug or a pathological file must not kill the worker
                doc = ChunkedDocument(ref=ref, content_hash="", skip_reason="worker_error",
                                      skip_detail=f"{type(err).__name__}: {err}")
            result = _result_of(key, ref, doc, known_hash, time.perf_counter() - t0)
            outbox.append(result)  # always before the batches holding its rows
            if result.n_chunks:
                packer.add(key, doc.chunks)
            if not frozen:  # the tokenizer is loaded by the first document
                gc.collect()
                gc.freeze()
                frozen = True
    except (_Stop, EOFError, BrokenPipeError, ConnectionResetError):
        return  # told to stop, or the parent is gone: nothing of ours is worth keeping


def _warm_up(conn: Connection) -> None:
    """Run the parent's warm-up callable (the tokenizer and the chunkers' tables), if it sent one."""
    kind, warm_up = conn.recv()
    if kind != "warm_up":
        raise ValueError(f"expected the warm-up message, got {kind!r}")
    if warm_up is not None:
        try:
            warm_up()
        except Exception as err:  # noqa: BLE001 - the first document would meet it again and say so
            log.debug("warm-up failed: %s: %s", type(err).__name__, err)


def main(argv: list[str]) -> int:
    leave_interrupts_to_parent()  # the parent stops this worker ("stop", or its pipe's end)
    conn = Connection(int(argv[1]))
    slot = int(argv[2])
    try:
        paths = conn.recv()
        for path in reversed(paths):  # the parent's import path, so its process function unpickles here
            if path not in sys.path:
                sys.path.insert(0, path)
        _warm_up(conn)
        with socket.socket(fileno=os.dup(conn.fileno())) as sock:
            slab_fd, board_fd = recvfds(sock, 2)
        setup: WorkerSetup = conn.recv()
    except (EOFError, ConnectionResetError):
        return 0  # the parent went away (or closed a launch it did not use) before the slabs came
    board = ReadingBoard(slot + 1, fd=board_fd)
    logging.basicConfig(level=setup.log_level, format=f"hades-worker[{os.getpid()}] %(levelname)s %(name)s: %(message)s")
    mapping = SlabMapping(slab_fd, setup.layout, setup.slab_count)
    run_worker(conn, setup, mapping, tune_gc=True, mark_reading=lambda key: board.mark(slot, key))
    return 0


__all__ = ["WorkerSetup", "run_worker", "main"]


if __name__ == "__main__":
    sys.exit(main(sys.argv))
