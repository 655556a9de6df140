"""StreamingPipeline's routing on real documents, in one process, fast: every chunk reaches the sink
exactly once with the vector of its own row, documents the triage rejects are never written (and
skipped ones never reach the model), batch shapes and counters are exact, the first stage error
stops every thread and is raised; and the shared-memory slabs the batches travel in are never
handed out while a batch in them is queued, embedded or being copied out (they go back to the ring
before the writer gets the rows, so a stalled writer holds none), nor lose a text that did not fit.

Real chunks come from `process_document` on the sample corpus and a few standard-library files,
packed into real slabs by the `ChunkedDocuments` source (the same `SlabPacker` the worker processes
run; tests/orchestration/test_workers.py runs the real processes). One stand-in keeps this a fast
unit test of the wiring: `RowModel` (tests/support/pipeline_helpers.py) is a stand-in *model* whose
vector of a row is a function of that row's token ids and indexes a record of the exact ids it was
given, so a row routed to the wrong chunk, or a slab overwritten before its rows were copied out,
is caught. The sink (`RecordingSink`) holds the columnar contract as strictly as the real writer.
"""

from __future__ import annotations

import dataclasses
import re
import signal
import threading
import time

import numpy as np
import pyarrow as pa
import pytest

from corpus_helpers import stdlib_sources
from hades_gpu.config import ChunkingConfig, DocumentsConfig, ProfileConfig
from hades_gpu.documents.chunking import process_document
from hades_gpu.documents.discovery import discover
from hades_gpu.documents.tokenizer import special_ids
from hades_gpu.gpu.slabs import SlabLayout, SlabRing
from hades_gpu.orchestration.batcher import bucket_length
from hades_gpu.orchestration.monitoring import RunMetrics
from hades_gpu.orchestration.pipeline import (ChunkedDocuments, StreamingPipeline, row_schema, slab_count,
                                              slab_layout)
from hades_gpu.orchestration.queue import MemoryAwareQueue
from hades_gpu.orchestration.workers import SLABS_PER_WORKER, BatchEvent
from pipeline_helpers import CheckedRing, RecordingSink, RowModel, row_vector

CLS, SEP, PAD = special_ids()
UNICODE_TEXT = "Naïve café — Grüße, 東京 and ünïcödé words.\n" * 40


@pytest.fixture
def docs(sample_corpus):
    """The sample corpus (plus an empty file, an undecodable one and a non-ASCII one) and eight
    standard-library files, chunked by the real `process_document`."""
    (sample_corpus / "empty.txt").write_text("")
    (sample_corpus / "latin1.txt").write_bytes(b"caf\xe9 au lait\n" * 20)
    (sample_corpus / "unicode.md").write_text(UNICODE_TEXT, encoding="utf-8")
    strict = DocumentsConfig(decode_errors="strict")  # the latin-1 file stays a skipped document
    found, _ = discover([str(sample_corpus), *map(str, stdlib_sources(8))], strict)
    chunked = [process_document(r, strict, ChunkingConfig()) for r in found]
    assert {d.skip_reason for d in chunked} == {None, "empty", "decode_error"}
    return chunked


def profile(**kw) -> ProfileConfig:
    base = dict(max_batch_tokens=1024, max_batch_size=8, length_bucket=16, lookahead_batches=4, ring_slots=3,
                queue_max_bytes=512 * 1024, queue_max_items=16)
    return dataclasses.replace(ProfileConfig(), **{**base, **kw})


def keep_all(ref, result) -> bool:
    return result.skip_reason is None and not result.unchanged


def run_bounded(p: StreamingPipeline, limit_s: float = 60.0):
    """`p.run()` in a thread: the exception it raised (or None); fails if it hangs."""
    errors: list[BaseException] = []

    def target() -> None:
        try:
            p.run()
        except BaseException as err:  # noqa: BLE001 - handed to the test
            errors.append(err)

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(limit_s)
    assert not t.is_alive(), "the pipeline hung"
    return errors[0] if errors else None


def stage_threads_alive(wait_s: float = 2.0) -> list[str]:
    deadline = time.monotonic() + wait_s
    while True:
        alive = [t.name for t in threading.enumerate() if t.name.startswith("hades-") and t.is_alive()]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.02)


def calls_with_rows(model: RowModel):
    """Each embed call's shape with the real ids of its rows."""
    out, pos = [], 0
    for rows, length in model.calls:
        out.append((rows, length, model.rows[pos:pos + rows]))
        pos += rows
    return out


def assert_rows_are_the_chunks(sink: RecordingSink, model: RowModel, chunks) -> None:
    """Every chunk exactly once, with its own columns and the vector of its own row."""
    counts = sink.count_by_chunk()
    assert set(counts) == {c.chunk_id for c in chunks} and set(counts.values()) == {1}
    got = sink.row_by_chunk()
    for c in chunks:
        row, want = got[c.chunk_id], np.array([CLS, *c.token_ids, SEP])
        assert (row["ordinal"], row["char_start"], row["char_end"], row["n_tokens"], row["text"]) == \
            (c.ordinal, c.char_start, c.char_end, c.n_tokens, c.text)
        np.testing.assert_array_equal(model.ids_of(row["embedding"]), want)  # the exact ids of its own row
        np.testing.assert_array_equal(row["embedding"][1:], row_vector(want))


def test_every_chunk_reaches_the_sink_once_with_its_own_rows_vector(docs):
    triaged = []

    def keep(ref, result):
        triaged.append(ref.rel_path)
        return keep_all(ref, result) and not ref.rel_path.endswith("overview.md")

    model, sink, metrics = RowModel(concurrency=3, delay_s=0.002), RecordingSink(), RunMetrics()
    p = StreamingPipeline(profile(), ChunkedDocuments(docs), model, sink, metrics, keep, (CLS, SEP, PAD), 256)
    p.run()
    wanted = [d for d in docs if d.skip_reason is None and not d.ref.rel_path.endswith("overview.md")]
    rejected = [d for d in docs if d.ref.rel_path.endswith("overview.md")]
    assert len(rejected) == 1 and rejected[0].chunks
    assert sorted(triaged) == sorted(d.ref.rel_path for d in docs)  # every document triaged once
    # only the documents the triage kept were begun, each under its own key
    assert sorted(ref.rel_path for ref, _ in sink.begun.values()) == sorted(d.ref.rel_path for d in wanted)
    chunks = [c for d in wanted for c in d.chunks]
    assert len(chunks) > 50
    assert_rows_are_the_chunks(sink, model, chunks)
    assert sink.complete()
    # skipped documents have nothing to embed; the rejected one's rows were packed but never written
    packed = [c for d in docs if d.skip_reason is None for c in d.chunks]
    assert sorted(len(r) for r in model.rows) == sorted(c.n_tokens + 2 for c in packed)
    assert sink.dropped_rows == len(rejected[0].chunks)
    # batch shapes: rows, token budget, and the length is the bucketed longest row, no more
    for rows, length, real in calls_with_rows(model):
        assert rows <= 8 and rows * length <= 1024
        assert length == bucket_length(max(len(r) for r in real), 16, 256)
    assert model.threads == {"hades-embed-0", "hades-embed-1", "hades-embed-2"}  # embed.concurrency threads
    s = metrics.snapshot()
    assert s["stages"]["read_chunk"]["items"] == len(docs)
    assert s["stages"]["embed"]["items"] == s["stages"]["write"]["items"] == len(packed)
    assert s["batches"] == len(model.calls) == s["stages"]["batch"]["items"]
    assert s["real_tokens"] == sum(c.n_tokens + 2 for c in packed) == s["stages"]["embed"]["tokens"]
    assert s["padded_tokens"] == sum(r * n for r, n in model.calls) > s["real_tokens"]
    assert set(s["queues"]) == {"batches", "embedded"}
    for q in s["queues"].values():
        assert q["max_bytes"] == 512 * 1024 and q["max_items"] == 16 and q["items"] == 0
        assert q["puts"] == q["gets"] == len(model.calls)
    assert p.ring.free == p.ring.count  # every slab given back


class BadCountModel(RowModel):
    """Returns one vector too few: the writer must refuse the batch rather than misalign rows."""

    def embed(self, ids, mask):
        return super().embed(ids, mask)[:-1]


class BrokenSink(RecordingSink):
    def __init__(self, where: str) -> None:
        super().__init__()
        self.where = where

    def add_rows(self, rows) -> None:
        if self.where == "add_rows":
            raise OSError("disk full")
        super().add_rows(rows)

    def begin_document(self, key, ref, result) -> None:
        if self.where == "begin_document" and len(self.begun) == 3:
            raise ValueError("manifest is read-only")
        super().begin_document(key, ref, result)


@pytest.mark.parametrize("failing, error, match", [
    ("model", RuntimeError, "model crashed on purpose"),
    ("add_rows", OSError, "disk full"),
    ("begin_document", ValueError, "manifest is read-only"),
    ("vector count", ValueError, r"returned \d+ vectors for \d+ rows"),
])
def test_the_first_stage_error_stops_every_thread_and_is_raised(docs, failing, error, match):
    model = {"model": RowModel(concurrency=2, fail_on_call=3), "vector count": BadCountModel()}.get(
        failing, RowModel(concurrency=2))
    sink = BrokenSink(failing)
    p = StreamingPipeline(profile(max_batch_size=2, max_batch_tokens=512), ChunkedDocuments(docs), model, sink,
                          RunMetrics(), keep_all, (CLS, SEP, PAD), 256)
    err = run_bounded(p)
    assert isinstance(err, error) and re.search(match, str(err))
    total = sum(-(-len(d.chunks) // 2) for d in docs if d.skip_reason is None)
    assert len(model.calls) < total  # stopped, not run to the end
    assert stage_threads_alive() == []  # router, packer, embed threads and writer all ended


def test_a_model_failure_with_every_slab_taken_still_ends_the_run(docs):
    """The packer waits for a slab while the failed embed thread will never free one: it must see
    the stop and give up rather than wait for ever."""
    ring = SlabRing(1, slab_layout(profile(max_batch_size=2), 256), pin=False)
    model = RowModel(concurrency=1, fail_on_call=1)
    p = StreamingPipeline(profile(max_batch_size=2, max_batch_tokens=512, queue_max_items=64), ChunkedDocuments(docs),
                          model, RecordingSink(), RunMetrics(), keep_all, (CLS, SEP, PAD), 256, ring=ring)
    err = run_bounded(p)
    assert isinstance(err, RuntimeError) and "model crashed on purpose" in str(err)
    assert len(model.calls) == 1 and stage_threads_alive() == []
    ring.close()


class PlainModel:
    """A model without a `concurrency` attribute that answers in float64: the pipeline must run one
    embed thread and hand the sink float32."""

    dim = 5

    def __init__(self) -> None:
        self.threads: set[str] = set()

    def embed(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        self.threads.add(threading.current_thread().name)
        return np.stack([row_vector(ids[i][mask[i].astype(bool)]) for i in range(ids.shape[0])]).astype(np.float64)


class FixedBudget:
    """The governor's side the pipeline uses: a batch token budget below the profile's."""

    def __init__(self, tokens: int) -> None:
        self.tokens = tokens

    def batch_token_budget(self, ceiling: int) -> int:
        return min(ceiling, self.tokens)


def test_pipeline_builds_its_ring_and_queues_from_the_profile():
    prof = profile(ring_slots=3, high_watermark=0.7, low_watermark=0.3, backoff_initial_s=0.002, backoff_max_s=0.03)
    p = StreamingPipeline(prof, ChunkedDocuments([]), RowModel(concurrency=3), RecordingSink(), RunMetrics(), keep_all,
                          (CLS, SEP, PAD), 256)
    # a worker's grants, two batches per embed thread and one more beat ring_slots
    assert p.concurrency == 3 and p.ring.count == slab_count(prof, 0, 3) == SLABS_PER_WORKER + 2 * 3 + 1
    assert p.ring.layout == slab_layout(prof, 256) == SlabLayout(max_rows=8, max_len=256, text_bytes=12 * 1024)
    for q in (p.batch_queue, p.write_queue):
        assert (q.max_bytes, q.max_items) == (512 * 1024, 16)
        assert (q._high, q._low) == (int(0.7 * 512 * 1024), int(0.3 * 512 * 1024))
        assert (q._backoff_initial, q._backoff_max) == (0.002, 0.03)
    assert [q.name for q in p.metrics.queues] == ["batches", "embedded"]
    p.run()  # no documents: ends at once, and closes the ring it made
    assert p.ring._closed
    plain = StreamingPipeline(profile(ring_slots=20), ChunkedDocuments([]), PlainModel(), RecordingSink())
    assert plain.concurrency == 1 and plain.ring.count == 20 and plain.budget_fn is None
    assert plain.triage(None, dataclasses.replace(_result(), unchanged=True)) is False
    assert plain.triage(None, dataclasses.replace(_result(), skip_reason="empty")) is False
    assert plain.triage(None, _result()) is True
    governed = StreamingPipeline(profile(), ChunkedDocuments([]), PlainModel(), RecordingSink(),
                                 governor=FixedBudget(300))
    assert governed.current_budget() == 300 and governed.new_batcher()._budget() == 300
    assert StreamingPipeline(profile(), ChunkedDocuments([]), PlainModel(), RecordingSink(), governor=FixedBudget(300),
                             budget_fn=lambda base: 700).current_budget() == 700  # a given policy wins
    for unused in (plain, governed):
        unused.ring.close()


def _result():
    from hades_gpu.records import DocumentResult

    return DocumentResult(key=0, content_hash="h", n_chunks=1)


def test_stage_meters_count_bytes_tokens_and_time_and_vectors_are_float32(docs):
    metrics, sink, model = RunMetrics(), RecordingSink(), PlainModel()
    p = StreamingPipeline(profile(), ChunkedDocuments(docs), model, sink, metrics, keep_all, (CLS, SEP, PAD), 256)
    t0 = time.perf_counter()
    p.run()
    wall = time.perf_counter() - t0
    assert model.threads == {"hades-embed-0"}  # one embed thread without a `concurrency`
    assert sink.embedding_types == {row_schema(5).field("embedding").type}  # float32 x 5
    s = metrics.snapshot()["stages"]
    assert s["read_chunk"]["bytes"] == sum(d.ref.size for d in docs)
    assert s["read_chunk"]["tokens"] == sum(c.n_tokens for d in docs for c in d.chunks)
    assert s["batch"]["tokens"] == metrics.real_tokens and s["batch"]["items"] == metrics.batches
    assert s["write"]["bytes"] == sink.nbytes and s["write"]["items"] == len(sink.rows())
    for stage in ("batch", "embed", "write"):
        assert 0 < s[stage]["busy_s"] <= wall  # time.perf_counter() differences, not sums


@pytest.mark.parametrize("policy", ["governor", "budget_fn"])
def test_the_batch_budget_sizes_every_batch_the_running_pipeline_cuts(docs, policy):
    model = RowModel(concurrency=1)
    kw = {"governor": FixedBudget(300)} if policy == "governor" else {"budget_fn": lambda base: 300}
    p = StreamingPipeline(profile(max_batch_tokens=4096, max_batch_size=32), ChunkedDocuments(docs), model,
                          RecordingSink(), RunMetrics(), keep_all, (CLS, SEP, PAD), 256, **kw)
    p.run()
    assert model.calls and all(rows * length <= 300 or rows == 1 for rows, length in model.calls)
    assert max(rows for rows, _ in model.calls) > 1  # the budget cut batches, it did not only keep single rows


class SlabCheckingModel(RowModel):
    """RowModel that, at every call, checks that the ids it is given lie in a slab the ring counts
    as out (not free, not granted elsewhere), and sleeps so batches pile up in the queues."""

    def __init__(self, ring: CheckedRing, **kw) -> None:
        super().__init__(**kw)
        self.ring = ring
        self.problems: list[str] = []
        self.slabs_seen: set[int] = set()

    def embed(self, ids, mask):
        slab = self.ring.slab_of(ids)
        if self.ring.slab_of(mask) != slab or not self.ring.holds(slab):
            self.problems.append(f"embedding from slab {slab}, which is not held for this batch")
        self.slabs_seen.add(slab)
        return super().embed(ids, mask)


def test_a_slab_is_never_handed_out_while_its_batch_is_queued_embedded_or_copied_out(docs):
    """The ring and queues given in are the ones used; with few slabs, each is reused many times,
    never while out, and the model reads the slab in place (no copy)."""
    prof = profile(max_batch_size=4, max_batch_tokens=512)
    ring = CheckedRing(4, slab_layout(prof, 256), pin=False)
    queues = (MemoryAwareQueue("b", max_bytes=1 << 20, max_items=2), MemoryAwareQueue("e", max_bytes=1 << 20,
                                                                                      max_items=2))
    model, sink = SlabCheckingModel(ring, concurrency=2, delay_s=0.003), RecordingSink()
    p = StreamingPipeline(prof, ChunkedDocuments(docs), model, sink, RunMetrics(), keep_all, (CLS, SEP, PAD), 256,
                          ring=ring, queues=queues)
    assert p.ring is ring and (p.batch_queue, p.write_queue) == queues
    p.run()
    assert ring.violations == [] and model.problems == []
    assert model.slabs_seen == {0, 1, 2, 3} and min(ring.handed.values()) > 3  # really reused
    # the writer-side check: each row's columns and its vector come from the same batch
    assert_rows_are_the_chunks(sink, model, [c for d in docs if d.skip_reason is None for c in d.chunks])
    assert ring.free == ring.count and not ring._closed  # all back; a ring given in is the caller's to close
    ring.close()


class InlineCounter:
    """The `ChunkedDocuments` source, counting batches whose texts travelled in the header."""

    def __init__(self, inner: ChunkedDocuments) -> None:
        self.inner = inner
        self.inline = self.in_slab = 0

    def events(self, stop, stage):
        for event in self.inner.events(stop, stage):
            if isinstance(event, BatchEvent):
                if event.batch.inline_text is not None:
                    self.inline += 1
                else:
                    self.in_slab += 1
            yield event


@pytest.mark.parametrize("text_bytes", [0, 2500])
def test_texts_that_do_not_fit_the_slab_go_inline_and_come_out_exact(docs, text_bytes):
    prof = profile(max_batch_size=4, max_batch_tokens=1024)
    ring = CheckedRing(5, SlabLayout(max_rows=4, max_len=256, text_bytes=text_bytes), pin=False)
    source, model, sink = InlineCounter(ChunkedDocuments(docs)), RowModel(concurrency=1), RecordingSink()
    StreamingPipeline(prof, source, model, sink, RunMetrics(), keep_all, (CLS, SEP, PAD), 256, ring=ring).run()
    assert source.inline > 0 and (source.in_slab > 0) == (text_bytes > 0)  # both ways taken when some fit
    chunks = [c for d in docs if d.skip_reason is None for c in d.chunks]
    assert any(c.text != c.text.encode("ascii", "ignore").decode() for c in chunks)  # multi-byte texts among them
    assert_rows_are_the_chunks(sink, model, chunks)
    assert ring.free == ring.count
    ring.close()


class SlowModel(RowModel):
    """RowModel that takes `delay_s` per call and records which stage threads exist meanwhile."""

    def __init__(self, delay_s: float, **kw) -> None:
        super().__init__(delay_s=delay_s, **kw)
        self.stage_threads: dict[str, bool] = {}

    def embed(self, ids, mask):
        for t in threading.enumerate():
            if t.name.startswith("hades-"):
                self.stage_threads[t.name] = t.daemon
        return super().embed(ids, mask)


def test_ctrl_c_ends_the_run_promptly_and_stage_threads_are_named_daemons(docs):
    """Ctrl-C (KeyboardInterrupt in the main thread, as the terminal sends it) stops every stage and
    reaches the caller within seconds; the stage threads carry their names (logs, stack dumps) and
    are daemons, so one stuck in a library call cannot keep the process alive."""
    import _thread

    class InterruptingModel(SlowModel):
        """Sends the Ctrl-C from inside the run (its 4th call), not after a fixed time: a timer raced
        a busy CI box's run to its end and the interrupt arrived after `run()` had returned."""

        sent = threading.Event()
        gate = threading.Lock()

        def embed(self, ids, mask):
            with self.gate:
                send = len(self.calls) >= 3 and not self.sent.is_set()
                if send:
                    self.sent.set()
            if send:  # once, from whichever embed thread gets there first
                _thread.interrupt_main()
            return super().embed(ids, mask)

    model = InterruptingModel(0.05, concurrency=2)
    p = StreamingPipeline(profile(max_batch_size=2, max_batch_tokens=512), ChunkedDocuments(docs), model,
                          RecordingSink(), RunMetrics(), keep_all, (CLS, SEP, PAD), 256)
    # Python's own SIGINT handler, as in a terminal: a suite started in the background by a
    # non-interactive shell inherits SIGINT ignored, and `interrupt_main` then does nothing (the
    # fresh-clone CI run failed so)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    t0 = time.monotonic()
    try:
        with pytest.raises(KeyboardInterrupt):
            p.run()
    finally:
        signal.signal(signal.SIGINT, previous if previous is not None else signal.SIG_DFL)
    assert time.monotonic() - t0 < 10
    calls = len(model.calls)
    time.sleep(0.3)
    assert len(model.calls) == calls  # nothing runs on after the interrupt
    assert stage_threads_alive() == []
    assert set(model.stage_threads) == {"hades-router", "hades-packer", "hades-embed-0", "hades-embed-1",
                                        "hades-writer"} and all(model.stage_threads.values())


def test_progress_is_updated_while_the_run_goes(docs):
    class CountingProgress:
        def __init__(self) -> None:
            self.updates = 0

        def update(self) -> None:
            self.updates += 1

    progress = CountingProgress()
    p = StreamingPipeline(profile(), ChunkedDocuments(docs), SlowModel(0.02, concurrency=1), RecordingSink(),
                          RunMetrics(), keep_all, (CLS, SEP, PAD), 256, progress=progress)
    p.run()
    assert progress.updates >= 2  # from the calling thread while the stages run, not only at the end


def test_rows_from_slab_copies_the_columns_out():
    """The writer's Arrow block owns its memory: reusing the slab afterwards cannot change it."""
    from hades_gpu.orchestration.batcher import BatchPlan
    from hades_gpu.orchestration.pipeline import rows_from_slab
    from hades_gpu.orchestration.slab_packer import PackedRow, fill_slab
    from hades_gpu.records import Chunk

    ring = SlabRing(1, SlabLayout(max_rows=2, max_len=16, text_bytes=64), pin=False)
    chunks = [Chunk("d", f"{i:016x}", "/p", "prose", i, 10 * i, 10 * i + 5, f"text {i} é", np.arange(3 + i) + 7)
              for i in range(2)]
    batch = fill_slab(BatchPlan([PackedRow(41, c) for c in chunks], 16), ring.view(0), 0, CLS, SEP, PAD)
    ids, mask = ring.view(0).tokens(2, 16)
    assert ids[1, :7].tolist() == [CLS, 7, 8, 9, 10, SEP, PAD] and mask.sum(axis=1).tolist() == [5, 6]
    assert (batch.rows, batch.length, batch.real_tokens, batch.inline_text) == (2, 16, 11, None)
    rows = rows_from_slab(ring.view(0), batch, np.ones((2, 3)))
    before = rows.to_pylist()
    for name in ("text", "chunk_id", "doc_key", "ordinal", "char_start", "char_end", "n_tokens"):
        ring.view(0).column(name)[:] = 0
    assert rows.to_pylist() == before
    assert [r["text"] for r in before] == ["text 0 é", "text 1 é"] and before[1]["doc_key"] == 41
    assert rows.schema == row_schema(3) and isinstance(rows, pa.RecordBatch)
    with pytest.raises(ValueError, match="3 vectors for 2 rows"):
        rows_from_slab(ring.view(0), batch, np.ones((3, 3)))
    ring.close()


def test_rows_of_several_batches_equal_their_blocks_one_after_another():
    """The writer hands the sink several batches' rows as one block: the same rows, in order, as
    each batch's own block (text offsets shifted, chunk ids and vectors concatenated)."""
    from hades_gpu.orchestration.batcher import BatchPlan
    from hades_gpu.orchestration.pipeline import copy_rows, rows_from_slab, rows_of
    from hades_gpu.orchestration.slab_packer import PackedRow, fill_slab
    from hades_gpu.records import Chunk

    ring = SlabRing(3, SlabLayout(max_rows=3, max_len=16, text_bytes=64), pin=False)
    parts, singles = [], []
    for slab, count in enumerate((2, 1, 3)):
        chunks = [Chunk("d", f"{slab:08x}{i:08x}", "/p", "prose", i, 7 * i, 7 * i + 4, f"s{slab} t{i} é" * (i + 1),
                        np.arange(2 + i) + 5) for i in range(count)]
        batch = fill_slab(BatchPlan([PackedRow(10 + slab, c) for c in chunks], 16), ring.view(slab), slab, CLS, SEP, PAD)
        vectors = np.full((count, 4), float(slab), dtype=np.float32)
        singles.append(rows_from_slab(ring.view(slab), batch, vectors))
        parts.append(copy_rows(ring.view(slab), batch, vectors))
    block = rows_of(parts)
    assert block.schema == row_schema(4) and block.num_rows == 6
    assert block.to_pylist() == [row for single in singles for row in single.to_pylist()]
    with pytest.raises(ValueError, match="one vector width"):
        rows_of([parts[0], copy_rows(ring.view(1), fill_slab(BatchPlan([PackedRow(1, Chunk(
            "d", "0" * 16, "/p", "prose", 0, 0, 1, "x", np.arange(2)))], 16), ring.view(1), 1, CLS, SEP, PAD),
            np.zeros((1, 5), dtype=np.float32))])
    ring.close()


class StallingSink(RecordingSink):
    """A sink whose first block blocks until the model has embedded every packed row (a writer busy
    encoding or committing a part for a long time); it gives up after `limit_s`."""

    row_group_rows = 8  # the writer thread hands over a block per 8 rows: the stall comes early

    def __init__(self, model: RowModel, rows_expected: int, limit_s: float) -> None:
        super().__init__()
        self.model, self.rows_expected, self.limit_s = model, rows_expected, limit_s
        self.embedded_while_stalled = 0

    def add_rows(self, rows) -> None:
        if self.blocks == 0:
            deadline = time.monotonic() + self.limit_s
            while len(self.model.rows) < self.rows_expected and time.monotonic() < deadline:
                time.sleep(0.01)
            self.embedded_while_stalled = len(self.model.rows)
        super().add_rows(rows)


def test_a_stalled_writer_holds_no_slab_so_packing_and_embedding_go_on(docs):
    """Slabs go back to the ring when the embed thread has copied a batch's rows out, not when the
    writer gets to them: with three slabs and the sink stalled on its first block, every batch is
    still packed and embedded (the write queue's byte budget holds the copies)."""
    packed = [c for d in docs if d.skip_reason is None for c in d.chunks]
    model = RowModel(concurrency=1)
    sink = StallingSink(model, len(packed), limit_s=20.0)
    p = StreamingPipeline(profile(ring_slots=3, queue_max_items=4096, queue_max_bytes=256 * 2**20),
                          ChunkedDocuments(docs), model, sink, RunMetrics(), keep_all, (CLS, SEP, PAD), 256,
                          ring=SlabRing(3, slab_layout(profile(), 256), pin=False))
    assert run_bounded(p) is None
    assert sink.embedded_while_stalled == len(packed) > 3 * 8  # far more rows than three slabs hold
    assert_rows_are_the_chunks(sink, model, packed)
    assert p.ring.free == p.ring.count
    p.ring.close()


def test_the_packer_goes_on_without_a_slab_until_its_backlog_is_full():
    """Batches that find no free slab wait in the backlog and `add` returns; only a backlog over
    `max_backlog` (or a flush) waits for slabs; every row is written once, batches in cut order."""
    from hades_gpu.orchestration.batcher import LengthSortedBatcher
    from hades_gpu.orchestration.slab_packer import SlabPacker
    from hades_gpu.records import Chunk

    ring = SlabRing(2, SlabLayout(max_rows=2, max_len=16, text_bytes=256), pin=False)
    free: list[int] = []
    waits: list[int] = []  # backlog length at each blocking acquire
    emitted = []

    def acquire(block: bool):
        if free:
            return free.pop(0)
        if not block:
            return None
        waits.append(packer.backlog)
        return 0 if not emitted or emitted[-1].slab == 1 else 1  # the test "frees" the other slab

    def emit(batch) -> None:
        emitted.append(batch)

    batcher = LengthSortedBatcher(32, 2, 1, 16, lookahead_batches=2)  # 2 rows of <= 16 a batch, 64-token window
    packer = SlabPacker(batcher, (CLS, SEP, PAD), acquire, ring.view, emit, max_backlog=100)
    chunks = [Chunk("d", f"{i:016x}", "/p", "prose", i, i, i + 1, f"t{i}", np.arange(4) + i) for i in range(40)]
    pairs = iter(range(0, 40, 2))
    while packer.backlog < 3:
        i = next(pairs)
        packer.add(i, chunks[i:i + 2])
    assert not emitted and not waits  # no slab: nothing written, nothing blocked
    free.extend([0, 1])
    i = next(pairs)
    packer.add(i, chunks[i:i + 2])
    assert len(emitted) == 2 and not waits  # the free slabs were used at once, without waiting
    packer.max_backlog = 1
    for i in pairs:
        packer.add(i, chunks[i:i + 2])
        assert packer.backlog <= 1
    assert waits and all(w > 1 for w in waits)  # blocked only for a backlog over max_backlog
    packer.flush()
    assert packer.backlog == 0 and packer.buffered_rows == 0
    assert sum(b.rows for b in emitted) == 40 and sum(n for b in emitted for _, n in b.doc_counts) == 40
    ring.close()


def test_the_slab_text_area_is_sized_for_the_largest_batch_that_can_exist():
    """profile.max_batch_tokens=10^8 reserved 13 slabs of 1.2 GB for batches that never exceed
    max_batch_size x max_seq_len tokens; 10^13 failed in mmap with a traceback."""
    huge = slab_layout(profile(max_batch_tokens=10**13, max_batch_size=64), 256)
    assert huge.text_bytes == 12 * 64 * 256
    assert slab_layout(profile(max_batch_tokens=1024, max_batch_size=64), 256).text_bytes == 12 * 1024


def test_metrics_leave_out_the_write_queue_a_slab_taking_sink_never_uses():
    """With profile.writer=process metrics.json showed queues.embedded all zeros, an idle queue."""

    class SlabSink(RecordingSink):
        def take_slab(self, view, batch, vectors):  # pragma: no cover - never run here
            raise AssertionError

    for sink, names in ((RecordingSink(), ["batches", "embedded"]), (SlabSink(), ["batches"])):
        metrics = RunMetrics()
        StreamingPipeline(profile(), ChunkedDocuments([]), RowModel(), sink, metrics, keep_all, (CLS, SEP, PAD), 256)
        assert [q.name for q in metrics.queues] == names
