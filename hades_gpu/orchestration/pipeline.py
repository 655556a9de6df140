"""Stage wiring: packed slabs -> embed threads -> writer, the main process being a router.

```
 worker processes ──► router thread ──► [batch queue] ──► embed threads (N) ──► [write queue] ──► writer thread
 (read, chunk, tokenize,  (documents to the   (slab handles)     (embedder.embed on the    (rows copied out   (Arrow columns
  pack into slabs)         sink; slab handles                     slab's own ids/mask; rows  of the slab +      -> sink.add_rows)
                           to the queue)                          copied out, slab released) vectors)
```

A *source* yields `workers.PoolEvent`s: `WorkerPoolSource` (the worker processes over discovered files)
or `ChunkedDocuments` (documents already chunked in memory, packed by this process with the same
`SlabPacker` the workers run: model-only benchmarks, tests). No per-chunk Python object crosses a
process boundary and no per-chunk Python loop runs here: a batch is routed by its slab index, and
the writer builds Arrow arrays from the slab's columns. A slab goes back to the ring as soon as the
embedder returned (its host-to-device copies are complete) and its rows were copied out, so a writer
busy encoding or committing a part never holds slabs the workers need.

Memory is bounded by the ring (every batch in flight holds a slab) and by the queues' byte budgets.
The first exception in any thread aborts every queue, stops the others and is re-raised by `run()`:
a failure never hangs the pipeline.
"""

from __future__ import annotations

import logging
import queue as queue_mod
import threading
import time
from typing import Any, Callable, Iterable, Iterator, Optional, Protocol, Sequence

import numpy as np
import pyarrow as pa

from hades_gpu.config import ProfileConfig
from hades_gpu.embedding.base import EmbedderError
from hades_gpu.gpu.slabs import SlabLayout, SlabRing, copies_to_cuda
from hades_gpu import exit_guard
from hades_gpu.orchestration.batcher import LengthSortedBatcher, effective_budget
from hades_gpu.orchestration.monitoring import ProgressReporter, RunMetrics
from hades_gpu.orchestration.queue import MemoryAwareQueue, PipelineAborted, QueueClosed
from hades_gpu.orchestration.slab_packer import SlabPacker
from hades_gpu.orchestration.slab_rows import (WRITE_BLOCK_ROWS, WRITE_BLOCK_WAIT_S, SlabRows, copy_rows, row_schema,
                                               rows_from_slab, rows_of)
from hades_gpu.orchestration.workers import (SLABS_PER_WORKER, AbandonEvent, BatchEvent, DocumentEvent, PoolEvent,
                                             WorkerPool)
from hades_gpu.documents.document_list import DocumentList, as_document_list
from hades_gpu.records import ChunkedDocument, DocumentRef, DocumentResult, SlabBatch

log = logging.getLogger(__name__)

TEXT_BYTES_PER_TOKEN = 12  # a slab's text area per batch token; real text averages about 4 bytes per token
WRITER_PROCESS_SLABS = 2  # slabs in transit to a writer process, besides the workers' and embed threads'


def slab_layout(profile: ProfileConfig, max_seq_len: int, vector_dim: int = 0) -> SlabLayout:
    """A slab per batch of the profile; `vector_dim` > 0 adds room for its vectors (a writer process
    reads them there). A batch holds at most `max_batch_size` rows of at most `max_seq_len` tokens, so
    its text area is sized for the smaller of that and `max_batch_tokens` (max_batch_tokens=10^8 made
    13 slabs of 1.2 GB for batches of 16k tokens, and 10^13 an mmap traceback)."""
    batch_tokens = min(int(profile.max_batch_tokens), int(profile.max_batch_size) * int(max_seq_len))
    return SlabLayout(max_rows=profile.max_batch_size, max_len=max_seq_len,
                      text_bytes=TEXT_BYTES_PER_TOKEN * batch_tokens, vector_dim=vector_dim)


def slab_count(profile: ProfileConfig, num_workers: int, concurrency: int, writer_process: bool = False) -> int:
    """Slabs in the ring: the profile's `ring_slots`, but at least enough for every worker's grants,
    two batches per embed thread (one embedding, one queued) and one on its way to the queue; with a
    writer process, two more that are on their way to it (it hands each back once it copied it)."""
    needed = SLABS_PER_WORKER * max(1, num_workers) + 2 * max(1, concurrency) + 1
    return max(profile.ring_slots, needed + (WRITER_PROCESS_SLABS if writer_process else 0))


class DocumentSource(Protocol):
    """Yields `PoolEvent`s until it has no more or `stop` is set."""

    def events(self, stop: threading.Event, stage: "StreamingPipeline") -> Iterator[PoolEvent]: ...


class LargestFirst:
    """The documents still to hand out, largest first, as `(index, ref)` from `popleft()`: one int64
    per document (a deque of `(index, DocumentRef)` tuples held ~90 bytes a document, besides the refs)."""

    def __init__(self, refs: DocumentList) -> None:
        self.refs = refs
        self.order = np.argsort(-refs.sizes(), kind="stable")  # equal sizes keep discovery's order
        self.next = 0

    def popleft(self) -> tuple[int, DocumentRef]:
        if self.next >= len(self.order):
            raise IndexError("no documents left")
        index = int(self.order[self.next])
        self.next += 1
        return index, self.refs[index]

    def __len__(self) -> int:
        return len(self.order) - self.next


class WorkerPoolSource:
    """Discovered files read, chunked, tokenized and packed by the worker processes.

    Args:
        pool (WorkerPool): the processes (its ring is the stage's ring).
        refs (Sequence[DocumentRef]): the files, in submission order.
        known_hash (callable, optional): the content hash an output already holds for a file (resume:
            a worker then reports it unchanged instead of packing it). Default: none known.
    """

    def __init__(self, pool: WorkerPool, refs: Sequence[DocumentRef],
                 known_hash: Optional[Callable[[DocumentRef], Optional[str]]] = None) -> None:
        self.pool = pool
        self.refs = as_document_list(refs)
        self.known_hash = known_hash if known_hash is not None else (lambda ref: None)

    def events(self, stop: threading.Event, stage: "StreamingPipeline") -> Iterator[PoolEvent]:
        # largest files first: the last documents are then small, so no worker is left finishing a big
        # one while the others idle (2-worker feed ~2% faster); each keeps its index in `refs`
        todo = LargestFirst(self.refs)
        while not stop.is_set():
            if stage.budget_fn is not None:
                self.pool.set_budget(stage.current_budget())
            self.pool.refill(todo, self.known_hash)
            if not todo and self.pool.inflight == 0:
                return
            yield from self.pool.poll(timeout=0.2)


class ChunkedDocuments:
    """Documents already chunked and tokenized, in memory, packed into slabs by a thread of this
    process with the same `SlabPacker` the workers run."""

    def __init__(self, docs: Iterable[ChunkedDocument]) -> None:
        self.docs = docs

    def events(self, stop: threading.Event, stage: "StreamingPipeline") -> Iterator[PoolEvent]:
        # The packer runs in its own thread: it blocks on the ring while the router, this generator's
        # caller, hands filled slabs on to the embed threads (which free them).
        events: queue_mod.Queue = queue_mod.Queue(maxsize=1024)
        done = object()

        def put(item: object) -> None:
            while not stop.is_set():
                try:
                    events.put(item, timeout=0.2)
                    return
                except queue_mod.Full:
                    continue
            raise PipelineAborted("stopped")

        def acquire(block: bool) -> Optional[int]:
            if not block:
                return stage.ring.try_acquire()
            while True:
                slab = stage.ring.acquire(timeout=0.2)
                if slab is not None:
                    return slab
                if stop.is_set():
                    raise PipelineAborted("stopped")

        def pack() -> None:
            try:
                packer = SlabPacker(stage.new_batcher(), stage.special_ids, acquire, stage.ring.view,
                                    lambda batch: put(BatchEvent(batch)))
                for key, doc in enumerate(self.docs):
                    n = len(doc.chunks) if doc.skip_reason is None else 0
                    put(DocumentEvent(key, key, doc.ref, DocumentResult(
                        key=key, content_hash=doc.content_hash, n_chunks=n,
                        tokens=sum(c.n_tokens for c in doc.chunks) if n else 0, references=list(doc.references),
                        skip_reason=doc.skip_reason, skip_detail=doc.skip_detail, encoding=doc.encoding)))
                    if n:
                        packer.add(key, doc.chunks)
                packer.flush()
                put(done)
            except BaseException as err:  # noqa: BLE001 - handed to the router, which re-raises it
                try:
                    events.put(err, timeout=1.0)
                except queue_mod.Full:
                    pass

        thread = threading.Thread(target=pack, name="hades-packer", daemon=True)
        thread.start()
        try:
            while True:
                try:
                    item = events.get(timeout=0.2)
                except queue_mod.Empty:
                    if stop.is_set():
                        return
                    continue
                if item is done:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item  # type: ignore[misc]
        finally:
            thread.join(timeout=0.5)  # it exits on its own once `stop` is set or it is done


class Sink(Protocol):
    """Where documents and their rows go (`store.writer.DatasetWriter`; `writer_process.WriterProcess`
    has `take_slab(view, batch, vectors)` instead of `add_rows`: it reads the rows in the slab)."""

    def begin_document(self, key: int, ref: DocumentRef, result: DocumentResult) -> None: ...

    def add_rows(self, rows: pa.RecordBatch) -> None: ...

    def abandon(self, key: int) -> None: ...


class EmbedFn(Protocol):
    concurrency: int

    def embed(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray: ...


class StreamingPipeline:
    """Runs a source's documents through the stages once; construct a new one per run.

    Args:
        profile (ProfileConfig): queue budgets, watermarks, batch budget, ring size (the defaults).
        source (DocumentSource): `WorkerPoolSource` or `ChunkedDocuments`.
        embedder: thread-safe `embed(ids, mask) -> float32 (B, dim)` with a `concurrency`.
        sink (Sink): `begin_document` (router thread), `abandon` (router thread), `add_rows` (writer).
        metrics (RunMetrics, optional): counters to update (default: a new one).
        triage (callable, optional): ``triage(ref, result) -> bool``, whether a document's rows will
            be written (skips and unchanged documents are recorded by the caller and return False).
            Default: every document that was neither skipped nor unchanged.
        special_ids (tuple, optional): (CLS, SEP, PAD) token ids (default: the tokenizer's).
        max_seq_len (int): model's longest sequence (default 256).
        governor (optional): GPU memory governor; its `batch_token_budget` sizes batches.
        progress (ProgressReporter, optional): updated from the calling thread.
        ring (SlabRing, optional): the slabs (required with a `WorkerPoolSource`: its pool's ring).
        queues (tuple, optional): (batches, embedded) queues instead of the profile's.
        budget_fn (callable, optional): the batch token budget policy instead of the governor's.
    """

    def __init__(self, profile: ProfileConfig, source: DocumentSource, embedder: EmbedFn, sink: Sink,
                 metrics: Optional[RunMetrics] = None,
                 triage: Optional[Callable[[DocumentRef, DocumentResult], bool]] = None,
                 special_ids: Optional[tuple[int, int, int]] = None, max_seq_len: int = 256,
                 governor: Any = None, progress: Optional[ProgressReporter] = None, *,
                 ring: Optional[SlabRing] = None,
                 queues: Optional[tuple[MemoryAwareQueue, MemoryAwareQueue]] = None,
                 budget_fn: Optional[Callable[[int], int]] = None) -> None:
        self.profile = profile
        self.source = source
        self.embedder = embedder
        self.sink = sink
        self.metrics = metrics if metrics is not None else RunMetrics()
        self.triage = triage if triage is not None else (lambda ref, r: r.skip_reason is None and not r.unchanged)
        if special_ids is None:
            from hades_gpu.documents.tokenizer import special_ids as tokenizer_special_ids

            special_ids = tokenizer_special_ids()
        self.special_ids = special_ids
        self.max_seq_len = max_seq_len
        self.governor = governor
        self.progress = progress
        self.concurrency = max(1, int(getattr(embedder, "concurrency", 1)))
        self._owns_ring = ring is None
        self.ring = ring if ring is not None else SlabRing(slab_count(profile, 0, self.concurrency),
                                                           slab_layout(profile, max_seq_len),
                                                           pin=copies_to_cuda(embedder))
        # the batch-budget policy: the governor's (it also applies without NVML readings: it holds
        # batches small after an OOM), unless one is given
        if budget_fn is None and governor is not None:
            budget_fn = governor.batch_token_budget
        self.budget_fn = budget_fn
        if queues is None:
            q = dict(max_bytes=profile.queue_max_bytes, max_items=profile.queue_max_items,
                     high_watermark=profile.high_watermark, low_watermark=profile.low_watermark,
                     backoff_initial_s=profile.backoff_initial_s, backoff_max_s=profile.backoff_max_s)
            queues = (MemoryAwareQueue("batches", **q), MemoryAwareQueue("embedded", **q))
        self.batch_queue, self.write_queue = queues
        # a sink that takes whole slabs (a writer process) never sees the write queue: its all-zero stats
        # read as an idle queue in metrics.json, so it is left out there
        self.metrics.queues = [self.batch_queue] if callable(getattr(sink, "take_slab", None)) else \
            [self.batch_queue, self.write_queue]
        self.metrics.ring = self.ring
        self._stop = threading.Event()
        self._error: Optional[BaseException] = None
        self._error_lock = threading.Lock()
        self._draining = False  # interrupted: rows already embedded still go to the sink (_interrupt)
        self._embedders_left = self.concurrency
        self._embedders_lock = threading.Lock()

    # -- parts a source uses ------------------------------------------------------------------------
    def new_batcher(self) -> LengthSortedBatcher:
        p = self.profile
        return LengthSortedBatcher(p.max_batch_tokens, p.max_batch_size, p.length_bucket, self.max_seq_len,
                                   p.lookahead_batches, budget_fn=self.budget_fn)

    def current_budget(self) -> int:
        return effective_budget(self.profile.max_batch_tokens, self.max_seq_len, self.budget_fn)

    # -- failure handling -------------------------------------------------------------------------
    def _fail(self, err: BaseException) -> None:
        with self._error_lock:
            if self._error is None:  # the first failure is the cause; later ones are its echoes
                self._error = err
        if isinstance(err, EmbedderError):
            # the embedder (a Triton server gone past its retries) failed: the rows it embedded before
            # are good, so they still reach the sink, as after Ctrl-C, and the caller commits the
            # documents they complete (they were dropped with up to writer_commit_interval_s of work)
            self._draining = True
        self._stop.set()
        self.batch_queue.abort(err)
        if not self._draining:
            self.write_queue.abort(err)

    def _interrupt(self, err: KeyboardInterrupt) -> None:
        """Ctrl-C (or SIGTERM as `exit_guard.Terminated`): nothing more is embedded, but the rows already
        embedded still reach the sink (the write queue is closed, not aborted, once the last embed
        thread ends), so the caller can commit the documents they complete
        (`pipelines.ingest._keep_finished_documents`)."""
        self._draining = True
        self._fail(err)

    def _guard(self, fn: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                fn()
            except BaseException as err:  # noqa: BLE001 - any stage error must stop the pipeline
                if not isinstance(err, PipelineAborted):
                    log.debug("stage %s failed", threading.current_thread().name, exc_info=True)
                self._fail(err)
        return run

    # -- stages -----------------------------------------------------------------------------------
    def _route(self) -> None:
        """Documents to the sink, slab handles to the embed queue (per document and per batch only)."""
        read_meter, batch_meter = self.metrics.stages["read_chunk"], self.metrics.stages["batch"]
        for event in self.source.events(self._stop, self):
            if isinstance(event, BatchEvent):
                batch = event.batch
                batch_meter.record(items=1, tokens=batch.real_tokens, busy_s=batch.busy_s)
                self.metrics.add_padding(batch.real_tokens, batch.padded_tokens)
                while not self.batch_queue.put(batch, timeout=0.5):
                    if self._stop.is_set():
                        raise PipelineAborted("stopped")
            elif isinstance(event, DocumentEvent):
                r = event.result
                read_meter.record(items=1, nbytes=event.ref.size, tokens=r.tokens, busy_s=r.busy_s)
                if self.triage(event.ref, r) and r.n_chunks:
                    self.sink.begin_document(event.key, event.ref, r)
                elif r.n_chunks:  # rejected after its rows were packed: the sink drops them
                    self.sink.abandon(event.key)
            elif isinstance(event, AbandonEvent):
                self.sink.abandon(event.key)
        if not self._stop.is_set():
            self.batch_queue.close()

    def _embed(self) -> None:
        meter = self.metrics.stages["embed"]
        # a sink in a process of its own (`writer_process.WriterProcess`) takes the slab itself: it
        # reads the rows there and hands the slab back to the ring once it has copied them
        take_slab = getattr(self.sink, "take_slab", None)
        write_meter = self.metrics.stages["write"]
        try:
            while True:
                try:
                    batch: SlabBatch = self.batch_queue.get()
                except QueueClosed:
                    break
                view = self.ring.view(batch.slab)
                ids, mask = view.tokens(batch.rows, batch.length)
                t0 = time.perf_counter()
                vectors = self.embedder.embed(ids, mask)
                meter.record(items=batch.rows, tokens=batch.real_tokens, busy_s=time.perf_counter() - t0)
                if take_slab is not None:
                    try:
                        take_slab(view, batch, vectors)
                    except BaseException:
                        self.ring.release(batch.slab)  # never handed over: the run stops, nothing reads it
                        raise
                    write_meter.record(items=batch.rows, nbytes=batch.text_len + vectors.nbytes)
                    continue
                # The rows leave the slab here and it goes back to the ring at once (embed returned: no
                # copy from it is still running). Released only by the writer, slabs piled up in the write
                # queue whenever the writer encoded a row group or committed a part, and the workers
                # starved for slabs (measured: ~0.2 s of slab waits per worker on a 1.5 s feed run).
                try:
                    rows = copy_rows(view, batch, vectors)  # it makes them a float32 C-order array
                finally:
                    self.ring.release(batch.slab)
                while not self.write_queue.put(rows, timeout=0.5):
                    if self._stop.is_set():
                        raise PipelineAborted("stopped")
        finally:
            with self._embedders_lock:
                self._embedders_left -= 1
                last = self._embedders_left == 0
            if last:
                self.write_queue.close()

    def _write(self) -> None:
        """Hand the sink the rows of several embedded batches (copied out of their slabs by the embed
        threads) as one block: about `WRITE_BLOCK_ROWS` rows (the sink's `row_group_rows` when
        smaller), and never older than `WRITE_BLOCK_WAIT_S` while no batch arrives."""
        meter = self.metrics.stages["write"]
        staged: list[SlabRows] = []
        staged_rows = 0
        # never more than the sink's own row group (its parts are cut between row groups)
        limit = max(1, min(WRITE_BLOCK_ROWS, int(getattr(self.sink, "row_group_rows", WRITE_BLOCK_ROWS))))

        def hand_over() -> None:
            nonlocal staged, staged_rows
            if staged:
                t0 = time.perf_counter()
                rows = rows_of(staged)
                staged, staged_rows = [], 0
                self.sink.add_rows(rows)
                meter.record(items=rows.num_rows, nbytes=rows.nbytes, busy_s=time.perf_counter() - t0)

        while True:
            try:
                done: SlabRows = self.write_queue.get(timeout=WRITE_BLOCK_WAIT_S if staged else None)
            except TimeoutError:
                hand_over()
                continue
            except QueueClosed:
                hand_over()
                return
            staged.append(done)
            staged_rows += done.rows
            if staged_rows >= limit:
                hand_over()

    # -- run --------------------------------------------------------------------------------------
    def run(self) -> None:
        """Run the source's documents through; returns when every stage finished, raises the first
        stage error."""
        threads = [threading.Thread(target=self._guard(self._route), name="hades-router", daemon=True)]
        threads += [threading.Thread(target=self._guard(self._embed), name=f"hades-embed-{i}", daemon=True)
                    for i in range(self.concurrency)]
        threads.append(threading.Thread(target=self._guard(self._write), name="hades-writer", daemon=True))
        watch_failures = getattr(self.sink, "watch_failures", None)  # a sink of its own process
        if watch_failures is not None:
            watch_failures(self._fail)
        for t in threads:
            t.start()
        try:
            while any(t.is_alive() for t in threads):
                for t in threads:
                    t.join(timeout=0.1)
                if self.progress is not None:
                    self.progress.update()
                if exit_guard.exiting():  # the interpreter exits under this run (a daemon thread's, ...)
                    raise KeyboardInterrupt("the interpreter is exiting")
        except KeyboardInterrupt as err:
            self._interrupt(err)
            for t in threads:
                t.join(timeout=10)
            raise
        finally:
            if self._owns_ring and not any(t.is_alive() for t in threads):
                self.ring.close()
        if self._error is not None:
            err = self._error
            if isinstance(err, PipelineAborted) and err.__cause__ is not None:
                err = err.__cause__
            raise err


__all__ = ["StreamingPipeline", "WorkerPoolSource", "ChunkedDocuments", "Sink", "DocumentSource", "row_schema",
           "rows_from_slab", "rows_of", "copy_rows", "SlabRows", "slab_layout", "slab_count"]
