"""A pool of worker processes that read, chunk and tokenize documents.

Processes, not threads: chunking is Python code that would hold the GIL against the embed stage.
Each worker owns a task queue, so the pool always knows which documents a worker holds: when a
worker dies (a segfault in a native library, the OOM killer) it is restarted and its documents are
retried once; a document that kills a worker twice is skipped with reason ``worker_crashed``. The
pool never has more than ``max_inflight`` documents handed out, which bounds the result pipe too.

Workers are started with the *spawn* method: the HF tokenizers thread pool is disabled after a fork
(FACTS.md), and each worker loads its own tokenizer.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import queue as queue_mod
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from hades_gpu.records import ChunkedDocument, DocumentRef

log = logging.getLogger(__name__)

# (task index, document ref, attempt)
Task = tuple[int, DocumentRef, int]


def _worker_main(task_q: Any, result_q: Any, process_fn: Callable[..., ChunkedDocument], fn_args: tuple,
                 parent_pid: int) -> None:
    """Worker loop: one `ChunkedDocument` per task; errors become that document's skip reason.

    A worker whose parent died (SIGKILL leaves no chance to send the stop sentinel) exits on its own
    within a second instead of lingering as an orphan.
    """
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    while True:
        try:
            task = task_q.get(timeout=1.0)
        except queue_mod.Empty:
            if os.getppid() != parent_pid:
                return
            continue
        if task is None:
            return
        index, ref, _attempt = task
        try:
            doc = process_fn(ref, *fn_args)
        except Exception as err:  # a bug or a pathological file must not kill the run
            doc = ChunkedDocument(ref=ref, content_hash="", skip_reason="worker_error",
                                  skip_detail=f"{type(err).__name__}: {err}")
        result_q.put((index, doc))


def _reset_foreign_start_method() -> None:
    """Make `spawn` the default again inside a joblib/loky worker (Hydra's joblib launcher).

    A process spawned from a loky worker inherits the start method "loky" in its preparation data
    and dies at start-up ("cannot find context for 'loky'") because it never imports loky.
    """
    if mp.get_start_method(allow_none=True) not in (None, "spawn", "fork", "forkserver"):
        mp.set_start_method("spawn", force=True)


@dataclass
class _Worker:
    process: Any
    tasks: Any
    inflight: dict[int, Task] = field(default_factory=dict)


class WorkerPool:
    """`num_workers` processes running `process_fn(ref, *fn_args) -> ChunkedDocument`.

    Args:
        num_workers (int): processes to start.
        process_fn (callable): a top-level (picklable) function run per document.
        fn_args (tuple): extra arguments passed to every call (configs).
        max_inflight_per_worker (int): documents handed to one worker before it reports back.
    """

    def __init__(self, num_workers: int, process_fn: Callable[..., ChunkedDocument], fn_args: tuple = (),
                 max_inflight_per_worker: int = 8) -> None:
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1 (got {num_workers})")
        _reset_foreign_start_method()
        self._ctx = mp.get_context("spawn")
        self._process_fn = process_fn
        self._fn_args = fn_args
        self._per_worker = max(1, max_inflight_per_worker)
        self._results = self._ctx.Queue()
        self._workers: list[_Worker] = [self._start_worker() for _ in range(num_workers)]
        self.restarts = 0
        self._closed = False

    def _start_worker(self) -> _Worker:
        tasks = self._ctx.Queue()
        proc = self._ctx.Process(target=_worker_main, args=(tasks, self._results, self._process_fn, self._fn_args, os.getpid()),
                                 daemon=True, name="hades-worker")
        proc.start()
        return _Worker(process=proc, tasks=tasks)

    @property
    def num_workers(self) -> int:
        return len(self._workers)

    @property
    def inflight(self) -> int:
        return sum(len(w.inflight) for w in self._workers)

    @property
    def capacity(self) -> int:
        return self._per_worker * len(self._workers)

    def pids(self) -> list[int]:
        return [w.process.pid for w in self._workers if w.process.pid is not None]

    def has_room(self) -> bool:
        return self.inflight < self.capacity

    def submit(self, index: int, ref: DocumentRef, attempt: int = 1) -> None:
        """Hand a document to the least-loaded worker (call only when `has_room()`)."""
        worker = min(self._workers, key=lambda w: len(w.inflight))
        task: Task = (index, ref, attempt)
        worker.inflight[index] = task
        worker.tasks.put(task)

    def get_result(self, timeout: float = 0.5) -> Optional[tuple[int, ChunkedDocument]]:
        """Next finished document, or None if none arrived in `timeout` (dead workers are handled)."""
        try:
            index, doc = self._results.get(timeout=timeout)
        except queue_mod.Empty:
            return self._reap_dead_workers()
        for worker in self._workers:
            if worker.inflight.pop(index, None) is not None:
                break
        return index, doc

    def _reap_dead_workers(self) -> Optional[tuple[int, ChunkedDocument]]:
        """Restart dead workers; retry the document that killed one once, then report it as skipped.

        A worker handles its queue in order, so the oldest unanswered task is the one it was working
        on when it died; the others were only queued behind it and are handed on unchanged.
        """
        given_up: Optional[tuple[int, ChunkedDocument]] = None
        for slot, worker in enumerate(self._workers):
            if worker.process.is_alive() or self._closed:
                continue
            code = worker.process.exitcode
            log.warning("worker pid %s died (exit code %s) holding %d document(s); restarting",
                        worker.process.pid, code, len(worker.inflight))
            replacement = self._start_worker()
            self._workers[slot] = replacement
            self.restarts += 1
            for position, (index, ref, attempt) in enumerate(worker.inflight.values()):
                if position == 0 and attempt >= 2:
                    given_up = (index, ChunkedDocument(ref=ref, content_hash="", skip_reason="worker_crashed",
                                                       skip_detail=f"worker exited with code {code} twice on it"))
                    continue
                retry = attempt + 1 if position == 0 else attempt
                replacement.inflight[index] = (index, ref, retry)
                replacement.tasks.put((index, ref, retry))
            if given_up is not None:
                return given_up
        return given_up

    def close(self, timeout: float = 5.0) -> None:
        """Stop every worker: a sentinel first, then terminate whatever did not exit in time."""
        if self._closed:
            return
        self._closed = True
        for worker in self._workers:
            try:
                worker.tasks.put(None)
            except (OSError, ValueError):
                pass
        deadline = time.monotonic() + timeout
        for worker in self._workers:
            worker.process.join(max(0.0, deadline - time.monotonic()))
            if worker.process.is_alive():
                worker.process.terminate()
                worker.process.join(1.0)
        for worker in self._workers:
            worker.tasks.close()
            worker.tasks.cancel_join_thread()
        self._results.close()
        self._results.cancel_join_thread()

    def __enter__(self) -> "WorkerPool":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
