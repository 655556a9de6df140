"""Stage wiring: worker processes -> batcher -> embed threads -> sink, joined by bounded queues.

```
 feeder thread ──► [doc queue] ──► batcher thread ──► [batch queue] ──► embed threads (N) ──► [write queue] ──► writer thread
 (worker pool:                     (length-sorted,     (ring slots         (embedder.embed,                      (sink.add)
  read+chunk+tokenize)              token budget)       bound it too)        GIL released)
```

The parts are handed in (compose, don't inherit): a *source* of chunked documents (the worker pool
over discovered files, `WorkerPoolSource`, or documents already in memory, `ChunkedDocuments`), the
batcher, the ring, the three queues and the batch-budget policy. Whatever is not given is built from
the profile, as PyG's NeighborLoader builds a default sampler. Every benchmark runs this stage, never a
copy of it. The first exception in any thread aborts every queue, stops the others and is re-raised
by `run()`: a failure never hangs the pipeline.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable, Iterable, Iterator, Optional, Protocol, Sequence

import numpy as np

from hades_gpu.config import ProfileConfig
from hades_gpu.gpu.host_ring import HostBufferRing
from hades_gpu.orchestration.batcher import BatchPlan, LengthSortedBatcher, fill_batch
from hades_gpu.orchestration.monitoring import ProgressReporter, RunMetrics
from hades_gpu.orchestration.queue import MemoryAwareQueue, PipelineAborted, QueueClosed
from hades_gpu.orchestration.workers import WorkerPool
from hades_gpu.records import ChunkedDocument, DocumentRef, EmbeddedBatch

log = logging.getLogger(__name__)


class DocumentSource(Protocol):
    """Yields chunked documents until it has no more or `stop` is set."""

    def documents(self, stop: threading.Event) -> Iterator[ChunkedDocument]: ...


class WorkerPoolSource:
    """Discovered files read, chunked and tokenized by the worker processes, as they finish.

    Args:
        pool (WorkerPool): the processes (at most `pool.has_room()` documents in flight).
        refs (Sequence[DocumentRef]): the files, in submission order.
    """

    def __init__(self, pool: WorkerPool, refs: Sequence[DocumentRef]) -> None:
        self.pool = pool
        self.refs = list(refs)

    def documents(self, stop: threading.Event) -> Iterator[ChunkedDocument]:
        for index, ref in enumerate(self.refs):
            while not self.pool.has_room():
                if stop.is_set():
                    return
                result = self.pool.get_result(timeout=0.2)
                if result is not None:
                    yield result[1]
            self.pool.submit(index, ref)
        while self.pool.inflight:
            if stop.is_set():
                return
            result = self.pool.get_result(timeout=0.2)
            if result is not None:
                yield result[1]


class ChunkedDocuments:
    """Documents already chunked and tokenized, in memory (model-only benchmarks, tests)."""

    def __init__(self, docs: Iterable[ChunkedDocument]) -> None:
        self.docs = docs

    def documents(self, stop: threading.Event) -> Iterator[ChunkedDocument]:
        for doc in self.docs:
            if stop.is_set():
                return
            yield doc


class Sink(Protocol):
    def begin_document(self, doc: ChunkedDocument) -> None: ...

    def add(self, batch: EmbeddedBatch) -> None: ...


class EmbedFn(Protocol):
    concurrency: int

    def embed(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray: ...


class StreamingPipeline:
    """Runs documents through the stages once; construct a new one per run.

    Args:
        profile (ProfileConfig): queue budgets, watermarks, batch budget, ring size (the defaults).
        source (DocumentSource): chunked documents (`WorkerPoolSource`, `ChunkedDocuments`).
        embedder: thread-safe `embed(ids, mask) -> float32 (B, dim)` with a `concurrency`.
        sink (Sink): receives `begin_document` (batcher thread) then `add` (writer thread).
        metrics (RunMetrics, optional): counters to update (default: a new one).
        triage (callable, optional): decides per document whether to embed it (skips, unchanged
            documents are recorded by the caller and return False). Default: not skipped.
        special_ids (tuple, optional): (CLS, SEP, PAD) token ids (default: the tokenizer's).
        max_seq_len (int): model's longest sequence (default 256).
        governor (optional): GPU memory governor; its `batch_token_budget` sizes batches. Waiting for
            memory headroom happens inside the CUDA embedder's `embed`, which can also free its cache.
        progress (ProgressReporter, optional): updated from the calling thread.
        batcher, ring, queues, budget_fn (optional): parts to use instead of the profile's defaults;
            `queues` is (documents, batches, embedded).
    """

    def __init__(self, profile: ProfileConfig, source: DocumentSource, embedder: EmbedFn, sink: Sink,
                 metrics: Optional[RunMetrics] = None, triage: Optional[Callable[[ChunkedDocument], bool]] = None,
                 special_ids: Optional[tuple[int, int, int]] = None, max_seq_len: int = 256,
                 governor: Any = None, progress: Optional[ProgressReporter] = None, *,
                 batcher: Optional[LengthSortedBatcher] = None, ring: Optional[HostBufferRing] = None,
                 queues: Optional[tuple[MemoryAwareQueue, MemoryAwareQueue, MemoryAwareQueue]] = None,
                 budget_fn: Optional[Callable[[int], int]] = None) -> None:
        self.profile = profile
        self.source = source
        self.embedder = embedder
        self.sink = sink
        self.metrics = metrics if metrics is not None else RunMetrics()
        self.triage = triage if triage is not None else (lambda doc: doc.skip_reason is None)
        if special_ids is None:
            from hades_gpu.documents.tokenizer import special_ids as tokenizer_special_ids

            special_ids = tokenizer_special_ids()
        self.cls_id, self.sep_id, self.pad_id = special_ids
        self.governor = governor
        self.progress = progress
        self.concurrency = max(1, int(getattr(embedder, "concurrency", 1)))
        self.ring = ring if ring is not None else HostBufferRing(
            slots=max(profile.ring_slots, self.concurrency + 2), max_rows=profile.max_batch_size, max_len=max_seq_len)
        # the batch-budget policy: the governor's (it also applies without NVML readings: it holds
        # batches small after an OOM), unless one is given
        if budget_fn is None and governor is not None:
            budget_fn = governor.batch_token_budget
        self.batcher = batcher if batcher is not None else LengthSortedBatcher(
            profile.max_batch_tokens, profile.max_batch_size, profile.length_bucket, max_seq_len,
            profile.lookahead_batches, budget_fn=budget_fn)
        if queues is None:
            q = dict(max_bytes=profile.queue_max_bytes, max_items=profile.queue_max_items,
                     high_watermark=profile.high_watermark, low_watermark=profile.low_watermark,
                     backoff_initial_s=profile.backoff_initial_s, backoff_max_s=profile.backoff_max_s)
            queues = (MemoryAwareQueue("documents", **q), MemoryAwareQueue("batches", **q),
                      MemoryAwareQueue("embedded", **q))
        self.doc_queue, self.batch_queue, self.write_queue = queues
        self.metrics.queues = [self.doc_queue, self.batch_queue, self.write_queue]
        self._stop = threading.Event()
        self._error: Optional[BaseException] = None
        self._error_lock = threading.Lock()
        self._embedders_left = self.concurrency
        self._embedders_lock = threading.Lock()

    # -- failure handling -------------------------------------------------------------------------
    def _fail(self, err: BaseException) -> None:
        with self._error_lock:
            if self._error is None:  # the first failure is the cause; later ones are its echoes
                self._error = err
        self._stop.set()
        for queue in (self.doc_queue, self.batch_queue, self.write_queue):
            queue.abort(err)

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
    def _feed(self) -> None:
        meter = self.metrics.stages["read_chunk"]
        for doc in self.source.documents(self._stop):
            meter.record(items=1, nbytes=doc.ref.size, tokens=sum(c.n_tokens for c in doc.chunks))
            while not self.doc_queue.put(doc, timeout=0.5):
                if self._stop.is_set():
                    raise PipelineAborted("stopped")
        if not self._stop.is_set():
            self.doc_queue.close()

    def _batch(self) -> None:
        meter = self.metrics.stages["batch"]
        while True:
            try:
                doc = self.doc_queue.get()
            except QueueClosed:
                break
            if not self.triage(doc):
                continue
            self.sink.begin_document(doc)
            if not doc.chunks:
                continue
            t0 = time.perf_counter()
            plans = self.batcher.add(doc.chunks)
            meter.record(items=0, busy_s=time.perf_counter() - t0)
            for plan in plans:
                self._emit(plan)
        for plan in self.batcher.flush():
            self._emit(plan)
        self.batch_queue.close()

    def _emit(self, plan: BatchPlan) -> None:
        slot = None
        while slot is None:
            if self._stop.is_set():
                raise PipelineAborted("stopped")
            slot = self.ring.acquire(timeout=0.2)
        t0 = time.perf_counter()
        batch = fill_batch(plan, self.ring, slot, self.cls_id, self.sep_id, self.pad_id)
        self.metrics.stages["batch"].record(items=1, tokens=batch.real_tokens, busy_s=time.perf_counter() - t0)
        self.metrics.add_padding(batch.real_tokens, batch.padded_tokens)
        while not self.batch_queue.put(batch, timeout=0.5):
            if self._stop.is_set():
                raise PipelineAborted("stopped")

    def _embed(self) -> None:
        meter = self.metrics.stages["embed"]
        try:
            while True:
                try:
                    batch = self.batch_queue.get()
                except QueueClosed:
                    break
                t0 = time.perf_counter()
                try:
                    vectors = self.embedder.embed(batch.input_ids, batch.attention_mask)
                finally:
                    if batch.slot >= 0:
                        self.ring.release(batch.slot)
                meter.record(items=len(batch.chunks), tokens=batch.real_tokens, busy_s=time.perf_counter() - t0)
                out = EmbeddedBatch(chunks=batch.chunks, embeddings=np.asarray(vectors, dtype=np.float32))
                while not self.write_queue.put(out, timeout=0.5):
                    if self._stop.is_set():
                        raise PipelineAborted("stopped")
        finally:
            with self._embedders_lock:
                self._embedders_left -= 1
                last = self._embedders_left == 0
            if last:
                self.write_queue.close()

    def _write(self) -> None:
        meter = self.metrics.stages["write"]
        while True:
            try:
                batch = self.write_queue.get()
            except QueueClosed:
                return
            t0 = time.perf_counter()
            self.sink.add(batch)
            meter.record(items=len(batch.chunks), nbytes=batch.nbytes, busy_s=time.perf_counter() - t0)

    # -- run --------------------------------------------------------------------------------------
    def run(self) -> None:
        """Run the source's documents through; returns when every stage finished, raises the first
        stage error."""
        threads = [threading.Thread(target=self._guard(self._feed), name="hades-feeder", daemon=True),
                   threading.Thread(target=self._guard(self._batch), name="hades-batcher", daemon=True)]
        threads += [threading.Thread(target=self._guard(self._embed), name=f"hades-embed-{i}", daemon=True)
                    for i in range(self.concurrency)]
        threads.append(threading.Thread(target=self._guard(self._write), name="hades-writer", daemon=True))
        for t in threads:
            t.start()
        try:
            while any(t.is_alive() for t in threads):
                for t in threads:
                    t.join(timeout=0.1)
                if self.progress is not None:
                    self.progress.update()
        except KeyboardInterrupt as err:
            self._fail(err)
            for t in threads:
                t.join(timeout=10)
            raise
        if self._error is not None:
            err = self._error
            if isinstance(err, PipelineAborted) and err.__cause__ is not None:
                err = err.__cause__
            raise err
