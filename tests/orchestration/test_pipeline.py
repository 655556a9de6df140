"""StreamingPipeline's routing on real documents, fast: every chunk reaches the sink exactly once with
the vector of its own row, triaged documents never reach the model, budgets and counters are exact,
the first stage error stops every thread.

Two stand-ins keep this a fast unit test of the wiring (the end-to-end tests run the real model and
real worker processes): `InlinePool` runs the real `process_document` in the calling thread behind
the WorkerPool interface the pipeline composes, and `RowModel` is a stand-in *model* whose vector of
a row is a function of that row's token ids, so a row routed to the wrong chunk is caught.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections import Counter, deque

import numpy as np
import pytest

from corpus_helpers import SAMPLE_CORPUS, stdlib_sources
from hades_gpu.config import ChunkingConfig, DocumentsConfig, ProfileConfig
from hades_gpu.documents.chunking import process_document
from hades_gpu.documents.discovery import discover
from hades_gpu.documents.tokenizer import special_ids
from hades_gpu.orchestration.monitoring import RunMetrics
from hades_gpu.orchestration.pipeline import ChunkedDocuments, StreamingPipeline, WorkerPoolSource

CLS, SEP, PAD = special_ids()


class InlinePool:
    """The WorkerPool interface, in process: `submit` runs the real `process_document` at once."""

    def __init__(self, capacity: int = 3) -> None:
        self.capacity = capacity
        self.done: deque = deque()
        self.submitted = 0

    @property
    def inflight(self) -> int:
        return len(self.done)

    def has_room(self) -> bool:
        return self.inflight < self.capacity

    def submit(self, index, ref) -> None:
        self.submitted += 1
        self.done.append((index, process_document(ref, DocumentsConfig(), ChunkingConfig())))

    def get_result(self, timeout: float = 0.5):
        return self.done.popleft() if self.done else None


def row_vector(real_ids: np.ndarray) -> np.ndarray:
    """(sum, count, first, last, checksum) of a row's real token ids: identifies the row."""
    ids = real_ids.astype(np.float64)
    return np.array([ids.sum(), len(ids), ids[0], ids[-1], (ids * np.arange(1, len(ids) + 1)).sum() % 9973],
                    dtype=np.float32)


class RowModel:
    """Stand-in model (see the module docstring), recording each call's shape."""

    dim = 5

    def __init__(self, concurrency: int = 2, fail_on_call: int = 0) -> None:
        self.concurrency = concurrency
        self.fail_on_call = fail_on_call
        self.calls: list[tuple[int, int]] = []
        self.threads: set[str] = set()
        self._lock = threading.Lock()

    def embed(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        with self._lock:
            self.calls.append(ids.shape)
            self.threads.add(threading.current_thread().name)
            n = len(self.calls)
        if n == self.fail_on_call:
            raise RuntimeError("model crashed on purpose")
        return np.stack([row_vector(ids[i][mask[i].astype(bool)]) for i in range(ids.shape[0])])


class RecordingSink:
    def __init__(self) -> None:
        self.begun: list[str] = []
        self.rows: dict[str, np.ndarray] = {}
        self.added = Counter()

    def begin_document(self, doc) -> None:
        self.begun.append(doc.ref.rel_path)

    def add(self, batch) -> None:
        for chunk, vec in zip(batch.chunks, batch.embeddings):
            self.added[chunk.chunk_id] += 1
            self.rows[chunk.chunk_id] = vec


def refs():
    found, _ = discover([str(SAMPLE_CORPUS), *map(str, stdlib_sources(8))], DocumentsConfig())
    return found


def profile(**kw) -> ProfileConfig:
    base = dict(max_batch_tokens=1024, max_batch_size=8, length_bucket=16, lookahead_batches=4, ring_slots=3,
                queue_max_bytes=512 * 1024, queue_max_items=16)
    return dataclasses.replace(ProfileConfig(), **{**base, **kw})


def run(model, triage=lambda doc: doc.skip_reason is None, **kw):
    metrics, sink, pool = RunMetrics(), RecordingSink(), InlinePool()
    docs = refs()
    p = StreamingPipeline(profile(**kw), WorkerPoolSource(pool, docs), model, sink, metrics, triage, (CLS, SEP, PAD), 256)
    p.run()
    return p, metrics, sink, pool, docs


def test_every_chunk_reaches_the_sink_once_with_its_own_rows_vector():
    keep = lambda doc: doc.skip_reason is None and not doc.ref.rel_path.endswith("overview.md")  # noqa: E731
    model = RowModel(concurrency=3)
    p, metrics, sink, pool, docs = run(model, triage=keep)
    chunked = [process_document(r, DocumentsConfig(), ChunkingConfig()) for r in docs]
    wanted = [d for d in chunked if keep(d)]
    assert pool.submitted == len(docs)
    assert sorted(sink.begun) == sorted(d.ref.rel_path for d in wanted)  # triaged-out never begun
    chunks = [c for d in wanted for c in d.chunks]
    assert len(chunks) > 50 and set(sink.added) == {c.chunk_id for c in chunks}
    assert set(sink.added.values()) == {1}  # exactly once
    for c in chunks:  # the vector of the chunk's own row: [CLS] ids [SEP]
        np.testing.assert_array_equal(sink.rows[c.chunk_id], row_vector(np.array([CLS, *c.token_ids, SEP])))
    for rows, length in model.calls:
        assert rows <= 8 and rows * length <= 1024 and (length % 16 == 0 or length == 256)
    assert len(model.threads) == 3  # embed.concurrency threads
    s = metrics.snapshot()
    assert s["stages"]["read_chunk"]["items"] == len(docs)
    assert s["stages"]["embed"]["items"] == s["stages"]["write"]["items"] == len(chunks)
    assert s["batches"] == len(model.calls) == s["stages"]["batch"]["items"]
    assert s["real_tokens"] == sum(len(c.token_ids) + 2 for c in chunks)
    assert s["padded_tokens"] == sum(r * n for r, n in model.calls) >= s["real_tokens"]
    assert s["stages"]["embed"]["tokens"] == s["real_tokens"]
    assert set(s["queues"]) == {"documents", "batches", "embedded"}
    for q in s["queues"].values():
        assert q["max_bytes"] == 512 * 1024 and q["max_items"] == 16 and q["items"] == 0
        assert q["puts"] == q["gets"] > 0
    assert p.ring.free_slots == p.ring.slots  # every ring slot given back


def test_first_stage_error_stops_the_run_and_is_raised():
    model = RowModel(concurrency=2, fail_on_call=3)
    with pytest.raises(RuntimeError, match="model crashed on purpose"):
        run(model)
    assert len(model.calls) < 12  # stopped, not run to the end


def test_a_sink_error_is_raised_too():
    class BrokenSink(RecordingSink):
        def add(self, batch) -> None:
            raise OSError("disk full")

    metrics = RunMetrics()
    p = StreamingPipeline(profile(), WorkerPoolSource(InlinePool(), refs()), RowModel(), BrokenSink(), metrics,
                          lambda d: d.skip_reason is None, (CLS, SEP, PAD), 256)
    with pytest.raises(OSError, match="disk full"):
        p.run()


class PlainModel:
    """A model without a `concurrency` attribute that answers in float64: the pipeline must run one
    embed thread and hand the sink float32."""

    dim = 5

    def __init__(self) -> None:
        self.threads: set[str] = set()

    def embed(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        self.threads.add(threading.current_thread().name)
        return np.stack([row_vector(ids[i][mask[i].astype(bool)]) for i in range(ids.shape[0])]).astype(np.float64)


class BytesSink(RecordingSink):
    def __init__(self) -> None:
        super().__init__()
        self.nbytes = 0
        self.dtypes: set = set()

    def add(self, batch) -> None:
        super().add(batch)
        self.nbytes += batch.nbytes
        self.dtypes.add(batch.embeddings.dtype)


def test_pipeline_builds_its_ring_and_queues_from_the_profile():
    prof = profile(ring_slots=3, high_watermark=0.7, low_watermark=0.3, backoff_initial_s=0.002, backoff_max_s=0.03)
    keep = lambda d: d.skip_reason is None  # noqa: E731
    p = StreamingPipeline(prof, ChunkedDocuments([]), RowModel(concurrency=3), RecordingSink(), RunMetrics(), keep,
                          (CLS, SEP, PAD), 256)
    assert p.concurrency == 3 and p.ring.slots == 5  # concurrency + 2 beats ring_slots
    for q in (p.doc_queue, p.batch_queue, p.write_queue):
        assert (q.max_bytes, q.max_items) == (512 * 1024, 16)
        assert (q._high, q._low) == (int(0.7 * 512 * 1024), int(0.3 * 512 * 1024))
        assert (q._backoff_initial, q._backoff_max) == (0.002, 0.03)
    plain = StreamingPipeline(profile(ring_slots=9), ChunkedDocuments([]), PlainModel(), RecordingSink())
    assert plain.concurrency == 1 and plain.ring.slots == 9
    assert plain.batcher._budget_fn is None


def test_stage_meters_count_bytes_tokens_and_time_and_vectors_are_float32():
    metrics, sink, model = RunMetrics(), BytesSink(), PlainModel()
    docs = refs()
    p = StreamingPipeline(profile(), WorkerPoolSource(InlinePool(), docs), model, sink, metrics,
                          lambda d: d.skip_reason is None, (CLS, SEP, PAD), 256)
    t0 = time.perf_counter()
    p.run()
    wall = time.perf_counter() - t0
    assert model.threads == {"hades-embed-0"}  # one embed thread without a `concurrency`
    assert sink.dtypes == {np.dtype(np.float32)}
    chunked = [process_document(r, DocumentsConfig(), ChunkingConfig()) for r in docs]
    s = metrics.snapshot()["stages"]
    assert s["read_chunk"]["bytes"] == sum(r.size for r in docs)
    assert s["read_chunk"]["tokens"] == sum(c.n_tokens for d in chunked for c in d.chunks)
    assert s["batch"]["tokens"] == metrics.real_tokens and s["batch"]["items"] == metrics.batches
    assert s["write"]["bytes"] == sink.nbytes and s["write"]["items"] == len(sink.added)
    for stage in ("batch", "embed", "write"):
        assert 0 < s[stage]["busy_s"] <= wall  # time.perf_counter() differences, not sums


class FixedBudget:
    """The governor's side the pipeline uses: a batch token budget below the profile's."""

    def __init__(self, tokens: int) -> None:
        self.tokens = tokens

    def batch_token_budget(self, ceiling: int) -> int:
        return min(ceiling, self.tokens)


def test_the_governors_budget_sizes_every_batch_the_running_pipeline_cuts():
    model = RowModel(concurrency=1)
    p = StreamingPipeline(profile(max_batch_tokens=4096, max_batch_size=32), WorkerPoolSource(InlinePool(), refs()),
                          model, RecordingSink(), RunMetrics(), lambda d: d.skip_reason is None, (CLS, SEP, PAD), 256,
                          governor=FixedBudget(300))
    p.run()
    assert model.calls and all(rows * length <= 300 or rows == 1 for rows, length in model.calls)
    assert max(rows for rows, _ in model.calls) > 1  # the budget cut batches, it did not only keep single rows


def test_a_model_failure_with_every_ring_slot_taken_still_ends_the_run():
    """The batcher waits for a ring slot while the failed embed thread will never free one: it must
    see the stop and give up rather than wait for ever."""
    model = RowModel(concurrency=1, fail_on_call=1)
    p = StreamingPipeline(profile(ring_slots=1, max_batch_size=2, max_batch_tokens=512, queue_max_items=64),
                          WorkerPoolSource(InlinePool(), refs()), model, RecordingSink(), RunMetrics(),
                          lambda d: d.skip_reason is None, (CLS, SEP, PAD), 256)
    errors = []
    worker = threading.Thread(target=lambda: errors.append(pytest.raises(RuntimeError, p.run)), daemon=True)
    worker.start()
    worker.join(60)
    assert not worker.is_alive(), "the pipeline hung after a model failure"
    assert len(errors) == 1 and "model crashed on purpose" in str(errors[0].value)
    assert len(model.calls) == 1


def test_chunked_documents_and_parts_given_in_are_used_as_given():
    """The stage with documents from memory (as the model-only benchmarks run it) and its parts
    handed in: the given batcher, ring and queues are the ones used, and every chunk arrives once."""
    from hades_gpu.gpu.host_ring import HostBufferRing
    from hades_gpu.orchestration.batcher import LengthSortedBatcher
    from hades_gpu.orchestration.queue import MemoryAwareQueue

    docs = [process_document(r, DocumentsConfig(), ChunkingConfig()) for r in refs()]
    docs = [d for d in docs if d.skip_reason is None]
    batcher = LengthSortedBatcher(512, 4, 8, 256, 2)
    ring = HostBufferRing(slots=4, max_rows=4, max_len=256, pin=False)
    queues = tuple(MemoryAwareQueue(name, max_bytes=1 << 20, max_items=3) for name in ("d", "b", "e"))
    model, sink = RowModel(concurrency=2), RecordingSink()
    p = StreamingPipeline(profile(), ChunkedDocuments(docs), model, sink, batcher=batcher, ring=ring, queues=queues)
    assert p.batcher is batcher and p.ring is ring and (p.doc_queue, p.batch_queue, p.write_queue) == queues
    p.run()
    chunks = [c for d in docs for c in d.chunks]
    assert set(sink.added) == {c.chunk_id for c in chunks} and set(sink.added.values()) == {1}
    assert all(rows <= 4 and rows * length <= 512 for rows, length in model.calls)
    assert {q.name for q in p.metrics.queues} == {"d", "b", "e"} and ring.free_slots == 4


class SlowModel(RowModel):
    """RowModel that takes `delay_s` per call and records which stage threads exist meanwhile."""

    def __init__(self, delay_s: float, **kw) -> None:
        super().__init__(**kw)
        self.delay_s = delay_s
        self.stage_threads: dict[str, bool] = {}

    def embed(self, ids, mask):
        import time as _time

        for t in threading.enumerate():
            if t.name.startswith("hades-"):
                self.stage_threads[t.name] = t.daemon
        _time.sleep(self.delay_s)
        return super().embed(ids, mask)


def test_ctrl_c_ends_the_run_promptly_and_stage_threads_are_named_daemons():
    """Ctrl-C (KeyboardInterrupt in the main thread, as the terminal sends it) stops every stage and
    reaches the caller within seconds; the stage threads carry their names (logs, stack dumps) and
    are daemons, so one stuck in a library call cannot keep the process alive."""
    import _thread

    model = SlowModel(0.05, concurrency=2)
    docs = refs()
    p = StreamingPipeline(profile(max_batch_size=2, max_batch_tokens=512), WorkerPoolSource(InlinePool(), docs), model,
                          RecordingSink(), RunMetrics(), lambda d: d.skip_reason is None, (CLS, SEP, PAD), 256)
    timer = threading.Timer(0.6, _thread.interrupt_main)
    timer.start()
    t0 = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        p.run()
    assert time.monotonic() - t0 < 10
    calls = len(model.calls)
    time.sleep(0.3)
    assert len(model.calls) == calls  # nothing runs on after the interrupt
    assert not [t for t in threading.enumerate() if t.name.startswith("hades-") and t.is_alive()]
    assert set(model.stage_threads) == {"hades-feeder", "hades-batcher", "hades-embed-0", "hades-embed-1",
                                        "hades-writer"} and all(model.stage_threads.values())


def test_progress_is_updated_while_the_run_goes():
    class CountingProgress:
        def __init__(self) -> None:
            self.updates = 0

        def update(self) -> None:
            self.updates += 1

    progress = CountingProgress()
    p = StreamingPipeline(profile(), WorkerPoolSource(InlinePool(), refs()), SlowModel(0.02, concurrency=1),
                          RecordingSink(), RunMetrics(), lambda d: d.skip_reason is None, (CLS, SEP, PAD), 256,
                          progress=progress)
    p.run()
    assert progress.updates >= 2  # from the calling thread while the stages run, not only at the end
