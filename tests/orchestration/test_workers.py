"""The worker pool with real processes, real files and real shared-memory slabs: every chunk is packed
exactly once with the tokenizer's ids, a worker that dies (by its own hand on a CRASH file, or
SIGKILLed mid-batch from outside) costs nothing but time, no slab is handed out twice or leaked, the
GPU governor's budget reaches the workers, and the worker loop itself (`run_worker`) keeps its
protocol when driven in-process over a real pipe.

No stand-in on the worker side: the processes run the real `process_document` (or
`corpus_helpers.crash_on_marker`, which really kills its process on files named *CRASH*), and every
row is compared with `process_document` run here in the test process. On the main-process side the
model is `RowModel` (tests/support/pipeline_helpers.py), a stand-in whose vector of a row indexes a
record of the exact ids it was given, so a misrouted row is caught without a real model's cost;
`CheckedRing` is a real `SlabRing` that also asserts acquire and release alternate per slab.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from multiprocessing import Pipe
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow.parquet as pq
import pytest

from corpus_helpers import (SAMPLE_CORPUS, copy_files, crash_on_marker, environment_probe, exit_at_start, failing_warm_up,
                            record_warm_up, stdlib_sources)
from hades_gpu.config import ChunkingConfig, DocumentsConfig, ProfileConfig
from hades_gpu.documents.chunking import process_document
from hades_gpu.documents.discovery import discover
from hades_gpu.documents.tokenizer import special_ids
from hades_gpu.gpu.slabs import CHUNK_ID_BYTES, SlabLayout, SlabRing
from hades_gpu.orchestration.monitoring import RunMetrics
from hades_gpu.orchestration.pipeline import StreamingPipeline, WorkerPoolSource
from hades_gpu.orchestration.worker_main import WorkerSetup, run_worker
from hades_gpu.orchestration.workers import (START_DEATHS_LIMIT, AbandonEvent, BatchEvent, DocumentEvent, WorkerLaunch,
                                             WorkerPool, WorkerStartError)
from hades_gpu.records import ChunkedDocument, DocumentRef, DocumentResult, SlabBatch
from hades_gpu.store.layout import CHUNKS_DIR, DOCUMENTS_DIR
from hades_gpu.store.writer import DatasetWriter
from pipeline_helpers import CheckedRing, RecordingSink, RowModel

CLS, SEP, PAD = special_ids()
DOCS_CFG, CHUNK_CFG = DocumentsConfig(), ChunkingConfig()


def packing(**kw) -> dict:
    return {**dict(max_batch_tokens=1024, max_batch_size=8, length_bucket=16, max_seq_len=256, lookahead_batches=4,
                   special_ids=(CLS, SEP, PAD)), **kw}


def ring_for(pack: dict, count: int = 8) -> CheckedRing:
    return CheckedRing(count, SlabLayout(pack["max_batch_size"], pack["max_seq_len"], 12 * pack["max_batch_tokens"]),
                       pin=False)


def slab_rows(ring: SlabRing, batch: SlabBatch) -> list[dict]:
    """A batch's rows read out of its slab: columns and the real ids of each row."""
    view, n = ring.view(batch.slab), batch.rows
    ids, mask = view.tokens(n, batch.length)
    offsets = view.column("text_offsets")[: n + 1]
    blob = batch.inline_text if batch.inline_text is not None else view.column("text")[: batch.text_len].tobytes()
    ids_bytes = view.chunk_ids(n).tobytes()
    return [dict(key=int(view.column("doc_key")[r]), ordinal=int(view.column("ordinal")[r]),
                 char_start=int(view.column("char_start")[r]), char_end=int(view.column("char_end")[r]),
                 n_tokens=int(view.column("n_tokens")[r]),
                 chunk_id=ids_bytes[r * CHUNK_ID_BYTES:(r + 1) * CHUNK_ID_BYTES].decode("ascii"),
                 text=blob[offsets[r]:offsets[r + 1]].decode("utf-8"), ids=ids[r][mask[r].astype(bool)].tolist())
            for r in range(n)]


class Drained:
    """What `drain` saw: every event, the rows of every batch, and the shape of each batch."""

    def __init__(self) -> None:
        self.documents: list[DocumentEvent] = []
        self.abandoned: set[int] = set()
        self.rows: dict[int, list[dict]] = {}  # key -> rows
        self.shapes: list[tuple[int, int]] = []
        self.order_problems: list[str] = []
        self.overwritten: list[int] = []

    def final(self) -> dict[int, DocumentEvent]:
        """index -> the answer that counts (abandoned attempts left out); fails on a second one."""
        out: dict[int, DocumentEvent] = {}
        for e in self.documents:
            if e.key in self.abandoned:
                continue
            assert e.index not in out, f"document {e.index} answered twice"
            out[e.index] = e
        return out

    def live_rows(self, key: int) -> list[dict]:
        return self.rows.get(key, [])


def drain(pool: WorkerPool, refs, start_index: int = 0, known=None, hold: int = 0, limit_s: float = 60.0) -> Drained:
    """Hand out `refs` as the workers have room (`refill`) and poll until every answer and row
    arrived. Each slab is read at once and again when it is released, `hold` batches later (a slow
    embedder): a slab handed to a worker while still held would have changed in between."""
    out, held = Drained(), deque()
    todo = deque(enumerate(refs, start_index))
    begun: set[int] = set()
    deadline = time.monotonic() + limit_s

    def release_one() -> None:
        batch, rows = held.popleft()
        if slab_rows(pool.ring, batch) != rows:
            out.overwritten.append(batch.slab)
        pool.ring.release(batch.slab)

    while todo or pool.inflight:
        assert time.monotonic() < deadline, "the pool did not answer in time"
        pool.refill(todo, known if known else (lambda ref: None))
        for event in pool.poll(timeout=0.2):
            if isinstance(event, DocumentEvent):
                out.documents.append(event)
                begun.add(event.key)
            elif isinstance(event, AbandonEvent):
                out.abandoned.add(event.key)
            elif isinstance(event, BatchEvent):
                rows = slab_rows(pool.ring, event.batch)
                out.shapes.append((event.batch.rows, event.batch.length))
                for row in rows:
                    if row["key"] not in begun:
                        out.order_problems.append(f"row of key {row['key']} before its document")
                    out.rows.setdefault(row["key"], []).append(row)
                held.append((event.batch, rows))
                while len(held) > hold:
                    release_one()
    while held:
        release_one()
    return out


def expected_rows(doc: ChunkedDocument) -> list[dict]:
    return [dict(ordinal=c.ordinal, char_start=c.char_start, char_end=c.char_end, n_tokens=c.n_tokens,
                 chunk_id=c.chunk_id, text=c.text, ids=[CLS, *c.token_ids.tolist(), SEP]) for c in doc.chunks]


def strip_key(rows: list[dict]) -> list[dict]:
    return sorted(({k: v for k, v in r.items() if k != "key"} for r in rows), key=lambda r: r["ordinal"])


def corpus_refs(tmp_path: Path, extra: dict | None = None, n_stdlib: int = 6):
    corpus = copy_files(stdlib_sources(n_stdlib), tmp_path / "c")
    for name, text in (extra or {}).items():
        (corpus / name).write_text(text, encoding="utf-8")
    refs, _ = discover([str(corpus), str(SAMPLE_CORPUS)], DOCS_CFG)
    return refs


def test_the_pool_packs_every_chunk_once_with_the_tokenizers_ids(tmp_path):
    """Two workers, few slabs and a slow consumer: every chunk exactly once, each row equal to what
    `process_document` gives here (text, offsets, ordinal, chunk id, token count, ids with [CLS] and
    [SEP]); a document's report comes before its rows; unchanged and skipped documents send no rows;
    the ring holds the workers back (starved grants) and no slab is handed out twice or overwritten
    while held; the pool never has more documents out than its capacity."""
    refs = corpus_refs(tmp_path, {"empty.txt": "", "naïve.md": "Grüße aus Köln — ünïcödé.\n" * 60})
    truth = {r.path: process_document(r, DOCS_CFG, CHUNK_CFG) for r in refs}
    unchanged = next(r for r in refs if r.rel_path.endswith("circle.py"))
    pack = packing()
    ring = ring_for(pack, count=5)
    with WorkerPool(2, process_document, (DOCS_CFG, CHUNK_CFG), ring, pack, max_inflight_per_worker=3) as pool:
        assert pool.num_workers == 2 and len(set(pool.pids())) == 2
        got = drain(pool, refs, known=lambda r: truth[r.path].content_hash if r is unchanged else None, hold=2)
        assert pool.restarts == 0 and pool.starved_grants > 0
    assert ring.free == ring.count and ring.violations == [] and got.overwritten == [] and got.order_problems == []
    assert ring.max_out <= ring.count
    answers = got.final()
    assert sorted(answers) == list(range(len(refs))) and not got.abandoned
    assert len({e.key for e in got.documents}) == len(got.documents)  # a key per attempt
    for index, event in answers.items():
        doc, r = truth[refs[index].path], event.result
        assert event.ref == refs[index] and r.key == event.key and r.content_hash == doc.content_hash
        if refs[index] is unchanged:
            assert r.unchanged and r.n_chunks == 0 and event.key not in got.rows
        elif doc.skip_reason is not None:
            assert (r.skip_reason, r.skip_detail, r.n_chunks) == (doc.skip_reason, doc.skip_detail, 0)
            assert event.key not in got.rows
        else:
            assert (r.n_chunks, r.tokens, r.references) == (len(doc.chunks), sum(c.n_tokens for c in doc.chunks),
                                                           doc.references)
            assert strip_key(got.live_rows(event.key)) == expected_rows(doc)
    assert {a.result.skip_reason for a in answers.values()} == {None, "empty"}
    assert sum(len(v) for v in got.rows.values()) > 50
    assert all(rows <= 8 and rows * length <= 1024 and length % 16 == 0 for rows, length in got.shapes)


def test_the_pipeline_over_real_workers_writes_every_chunk_once(tmp_path):
    """`StreamingPipeline` with a `WorkerPoolSource` over two real workers: every chunk reaches the
    sink exactly once, the model saw each chunk's own tokenizer ids, and a document whose content hash
    the output already holds is reported unchanged and never reaches the model."""
    refs = corpus_refs(tmp_path, n_stdlib=8)
    truth = {r.path: process_document(r, DOCS_CFG, CHUNK_CFG) for r in refs}
    known = next(r for r in refs if r.rel_path.endswith("overview.md"))
    prof = dataclasses.replace(ProfileConfig(), max_batch_tokens=1024, max_batch_size=8, length_bucket=16,
                               lookahead_batches=4, queue_max_bytes=512 * 1024, queue_max_items=16)
    pack = packing()
    ring = ring_for(pack, count=2 * 2 + 2 * 2 + 1)
    model, sink, metrics = RowModel(concurrency=2), RecordingSink(), RunMetrics()
    with WorkerPool(2, process_document, (DOCS_CFG, CHUNK_CFG), ring, pack, max_inflight_per_worker=3) as pool:
        source = WorkerPoolSource(pool, refs, lambda r: truth[r.path].content_hash if r is known else None)
        StreamingPipeline(prof, source, model, sink, metrics, special_ids=(CLS, SEP, PAD), max_seq_len=256,
                          ring=ring).run()
    assert ring.violations == [] and ring.free == ring.count
    begun = {ref.path for ref, _ in sink.live_keys().values()}
    assert begun == {r.path for r in refs if r is not known and truth[r.path].skip_reason is None}
    chunks = [c for r in refs if r.path in begun for c in truth[r.path].chunks]
    counts = sink.count_by_chunk()
    assert set(counts) == {c.chunk_id for c in chunks} and set(counts.values()) == {1} and sink.complete()
    rows = sink.row_by_chunk()
    for c in chunks:
        row = rows[c.chunk_id]
        assert (row["ordinal"], row["char_start"], row["char_end"], row["n_tokens"], row["text"]) == \
            (c.ordinal, c.char_start, c.char_end, c.n_tokens, c.text)
        assert model.ids_of(row["embedding"]).tolist() == [CLS, *c.token_ids.tolist(), SEP]
    assert len(model.rows) == len(chunks)  # the unchanged document's chunks were never embedded
    s = metrics.snapshot()
    assert s["stages"]["read_chunk"]["items"] == len(refs) and s["batches"] == len(model.calls)
    assert s["real_tokens"] == sum(c.n_tokens + 2 for c in chunks)


def test_the_source_hands_out_the_largest_files_first_a_share_per_message(monkeypatch):
    """`WorkerPoolSource` submits the largest files first (each keeps its index), a worker gets a
    share of documents per message once half its share is reported, and workers run with one
    OpenBLAS thread whatever the parent's environment says."""
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "8")
    sizes = [5, 90, 17, 3, 60, 60, 41, 8, 99, 1, 26]
    refs = [_fake(f"doc{i}", size) for i, size in enumerate(sizes)]
    shares: list[int] = []
    pack = packing()
    with WorkerPool(1, environment_probe, (), ring_for(pack), pack, max_inflight_per_worker=4) as pool:
        send = pool._send_tasks
        monkeypatch.setattr(pool, "_send_tasks", lambda worker, tasks: (shares.append(len(tasks)), send(worker, tasks)))
        events = [e for e in WorkerPoolSource(pool, refs).events(threading.Event(), SimpleNamespace(budget_fn=None))
                  if isinstance(e, DocumentEvent)]
    assert [e.ref.size for e in events] == sorted(sizes, reverse=True)
    assert all(refs[e.index] == e.ref for e in events) and len({e.index for e in events}) == len(refs)
    assert shares[0] == 4 and sum(shares) == len(refs) and all(n >= 2 for n in shares[:-1])  # not one per document
    assert {e.result.content_hash for e in events} == {"1"}


def test_dead_worker_is_restarted_and_document_named(tmp_path):
    refs = corpus_refs(tmp_path, {"CRASH.txt": "this file kills its worker\n"}, n_stdlib=6)
    pack = packing()
    ring = ring_for(pack)
    with WorkerPool(1, crash_on_marker, (DOCS_CFG, CHUNK_CFG), ring, pack, max_inflight_per_worker=2) as pool:
        first_pid = pool.pids()
        got = drain(pool, refs)
        assert pool.restarts == 2  # the first try and the one retry each killed the worker
        assert pool.pids() != first_pid
    assert ring.free == ring.count and ring.violations == []
    answers = got.final()
    assert sorted(answers) == list(range(len(refs)))  # every document answered exactly once
    crashed = [e for e in answers.values() if e.result.skip_reason == "worker_crashed"]
    assert [Path(e.ref.path).name for e in crashed] == ["CRASH.txt"]
    assert crashed[0].result.skip_detail == "worker exited with code 3 twice on it"
    assert crashed[0].result.content_hash == ""
    for e in answers.values():  # nothing lost: every other document's rows all arrived, under its live key
        if e.result.skip_reason is None:
            doc = process_document(e.ref, DOCS_CFG, CHUNK_CFG)
            assert e.result.n_chunks == len(doc.chunks) > 0
            assert strip_key(got.live_rows(e.key)) == expected_rows(doc)


def test_two_crashing_documents_are_each_retried_once_and_queued_ones_are_not_charged(tmp_path):
    """A document queued behind a crashing one is handed on without using up its own retry: here the
    second CRASH file sits behind the first, so it is tried twice too (4 restarts, not 3)."""
    corpus = tmp_path / "c"
    corpus.mkdir()
    for name in ("a_CRASH.txt", "b_CRASH.txt", "c_ok.txt", "d_ok.txt"):
        (corpus / name).write_text(f"{name}: some words to chunk\n")
    refs, _ = discover([str(corpus)], DOCS_CFG)
    refs = sorted(refs, key=lambda r: Path(r.path).name)
    pack = packing()
    ring = ring_for(pack)
    with WorkerPool(1, crash_on_marker, (DOCS_CFG, CHUNK_CFG), ring, pack, max_inflight_per_worker=4) as pool:
        got = drain(pool, refs)
        assert pool.restarts == 4
    answers = got.final()
    assert {Path(e.ref.path).name: e.result.skip_reason for e in answers.values()} == {
        "a_CRASH.txt": "worker_crashed", "b_CRASH.txt": "worker_crashed", "c_ok.txt": None, "d_ok.txt": None}
    assert all(len(got.live_rows(e.key)) == e.result.n_chunks == 1 for e in answers.values()
               if e.result.skip_reason is None)
    assert ring.free == ring.count and ring.violations == []


class KillMidBatch(WorkerPool):
    """A real pool whose first worker is SIGKILLed from outside (as the OOM killer would) right after
    the first batch arrived: the large first document has then sent only some of its rows."""

    killed_pid = None

    def poll(self, timeout: float = 0.2):
        events = super().poll(timeout)
        if self.killed_pid is None and any(isinstance(e, BatchEvent) for e in events):
            self.killed_pid = self.pids()[0]
            os.kill(self.killed_pid, signal.SIGKILL)
        return events


class CountingWriter(DatasetWriter):
    """The real writer, counting the attempts it was told to drop."""

    abandons = 0

    def abandon(self, key: int) -> None:
        self.abandons += 1
        super().abandon(key)


def test_a_worker_killed_mid_batch_loses_nothing(tmp_path):
    """The full pipeline into a real dataset: the killed worker's partly delivered document is
    abandoned and redone under a new key, the documents queued behind it are handed on, and the
    dataset holds every chunk of every document exactly once; no slab is lost with the worker."""
    big = max(stdlib_sources(40), key=lambda p: p.stat().st_size)
    corpus = copy_files([big], tmp_path / "c" / "a_big")
    copy_files(stdlib_sources(5), tmp_path / "c" / "b_rest")
    refs, _ = discover([str(tmp_path / "c")], DOCS_CFG)
    refs = sorted(refs, key=lambda r: r.rel_path)
    assert refs[0].path == str(corpus / big.name)
    truth = {r.path: process_document(r, DOCS_CFG, CHUNK_CFG) for r in refs}
    assert len(truth[refs[0].path].chunks) >= 20  # spans many batches of one chunk each
    # max_batch_tokens == max_seq_len: each full-length chunk is a batch of its own
    pack = packing(max_batch_tokens=256, max_batch_size=4)
    prof = dataclasses.replace(ProfileConfig(), max_batch_tokens=256, max_batch_size=4, length_bucket=16,
                               lookahead_batches=4, queue_max_bytes=1 << 20, queue_max_items=8)
    ring = ring_for(pack, count=7)
    writer = CountingWriter(tmp_path / "out", "s0", RowModel.dim, rows_per_part=40)
    model = RowModel(concurrency=2)
    with KillMidBatch(1, process_document, (DOCS_CFG, CHUNK_CFG), ring, pack, max_inflight_per_worker=3) as pool:
        StreamingPipeline(prof, WorkerPoolSource(pool, refs), model, writer, RunMetrics(),
                          special_ids=(CLS, SEP, PAD), max_seq_len=256, ring=ring).run()
        assert pool.killed_pid is not None and pool.restarts == 1 and pool.pids() != [pool.killed_pid]
    writer.close()
    assert writer.abandons >= 1  # the big document's first attempt was dropped
    assert ring.free == ring.count and ring.violations == []  # nothing held by the dead worker leaked
    chunks = pq.read_table(tmp_path / "out" / CHUNKS_DIR).to_pylist()
    documents = pq.read_table(tmp_path / "out" / DOCUMENTS_DIR).to_pylist()
    ids = [c["chunk_id"] for c in chunks]
    assert len(ids) == len(set(ids))  # exactly once
    want = {c.chunk_id: c for d in truth.values() for c in d.chunks}
    assert set(ids) == set(want)
    assert sorted(d["path"] for d in documents) == sorted(truth)
    assert all(d["n_chunks"] == len(truth[d["path"]].chunks) for d in documents)
    for row in chunks:
        c = want[row["chunk_id"]]
        assert (row["text"], row["ordinal"], row["char_start"], row["n_tokens"]) == \
            (c.text, c.ordinal, c.char_start, c.n_tokens)
        assert model.ids_of(np.asarray(row["embedding"])).tolist() == [CLS, *c.token_ids.tolist(), SEP]
    assert len(model.rows) > len(want)  # the rows sent before the kill were embedded, then dropped


def test_set_budget_shrinks_later_batches_also_in_restarted_workers(tmp_path):
    """The GPU governor's smaller budget (`pool.set_budget`) sizes every batch packed afterwards by
    the live worker, and by a worker started after it was set (after a CRASH file killed one)."""
    refs = corpus_refs(tmp_path, n_stdlib=4)
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "CRASH.txt").write_text("boom\n")
    crash, _ = discover([str(tmp_path / "x")], DOCS_CFG)
    pack = packing(max_batch_tokens=4096, max_batch_size=32, lookahead_batches=2)
    ring = ring_for(pack, count=4)
    with WorkerPool(1, crash_on_marker, (DOCS_CFG, CHUNK_CFG), ring, pack, max_inflight_per_worker=4) as pool:
        full = drain(pool, refs)
        pool.set_budget(600)
        live = drain(pool, refs, start_index=len(refs))
        assert pool.restarts == 0
        restarted = drain(pool, crash + refs, start_index=2 * len(refs))
        assert pool.restarts == 2
    assert max(rows * length for rows, length in full.shapes) > 600  # the full budget was in use
    for later in (live, restarted):
        assert later.shapes and all(rows * length <= 600 for rows, length in later.shapes)
        assert max(rows for rows, _ in later.shapes) > 1
        assert sum(len(v) for v in later.rows.values()) == sum(len(v) for v in full.rows.values())
    assert ring.free == ring.count


def test_the_slab_mapping_is_shared_between_processes():
    """What the parent writes into a slab the child sees through the inherited memfd and vice versa;
    the memory is an anonymous memfd, so nothing is left in /dev/shm by a killed process."""
    layout = SlabLayout(max_rows=2, max_len=16, text_bytes=32)
    ring = SlabRing(3, layout, pin=False)
    assert os.readlink(f"/proc/self/fd/{ring.fd}").startswith("/memfd:hades-slabs")
    ring.view(2).column("input_ids")[:] = np.arange(32) * 3
    child = (
        "import sys, numpy as np\n"
        "from hades_gpu.gpu.slabs import SlabLayout, SlabMapping\n"
        f"m = SlabMapping({ring.fd}, SlabLayout(2, 16, 32), 3)\n"
        "assert m.views[2].column('input_ids').tolist() == [i * 3 for i in range(32)], 'parent write not seen'\n"
        "m.views[1].column('text')[:5] = np.frombuffer(b'hello', dtype=np.uint8)\n"
        "m.views[1].column('doc_key')[:2] = [7, 9]\n"
    )
    proc = subprocess.run([sys.executable, "-c", child], pass_fds=(ring.fd,), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert ring.view(1).column("text")[:5].tobytes() == b"hello"
    assert ring.view(1).column("doc_key")[:2].tolist() == [7, 9]
    assert ring.view(0).column("doc_key").tolist() == [0, 0]  # other slabs untouched
    ring.close()


def test_the_ring_hands_out_each_slab_once_and_wakes_a_waiter_on_release():
    ring = SlabRing(2, SlabLayout(1, 8, 0), pin=False)
    a, b = ring.acquire(), ring.try_acquire()
    assert {a, b} == {0, 1} and ring.free == 0 and ring.try_acquire() is None
    t0 = time.monotonic()
    assert ring.acquire(timeout=0.1) is None and time.monotonic() - t0 >= 0.09 and ring.waits == 1
    with pytest.raises(ValueError, match="not in use"):
        ring.release(5)
    got = []
    waiter = threading.Thread(target=lambda: got.append(ring.acquire(timeout=5)))
    waiter.start()
    time.sleep(0.05)
    ring.release(b)
    waiter.join(5)
    assert got == [b]
    ring.release(a)
    with pytest.raises(ValueError, match="not in use"):
        ring.release(a)  # twice
    from multiprocessing.connection import wait

    assert wait([ring.wake_socket()], 0) == [ring.wake_socket()]  # releases wake the pool's poll
    ring.drain_wakeups()
    assert wait([ring.wake_socket()], 0) == []
    ring.close()
    ring.close()  # idempotent


# -- the worker loop, in process --------------------------------------------------------------------

def _fake_or_real(ref, factor):
    if ref.rel_path == "bad":
        raise ValueError(f"cannot read {ref.rel_path}")
    if ref.rel_path == "forced":
        return ChunkedDocument(ref=dataclasses.replace(ref, modality="code"), content_hash="f")
    if os.path.exists(ref.path):
        return process_document(ref, DOCS_CFG, CHUNK_CFG)
    return ChunkedDocument(ref=ref, content_hash=str(ref.size * factor))


def _fake(rel: str, size: int) -> DocumentRef:
    return DocumentRef(path=f"/nonexistent/{rel}", rel_path=rel, size=size, modality="prose", language="text")


def _setup(**kw) -> WorkerSetup:
    base = dict(max_batch_tokens=1024, max_batch_size=8, length_bucket=16, max_seq_len=256,
                lookahead_batches=100, special_ids=(CLS, SEP, PAD), idle_flush_s=0.05)
    base.update(kw)
    layout = SlabLayout(base["max_batch_size"], base["max_seq_len"], 12 * base["max_batch_tokens"])
    return WorkerSetup(layout=layout, slab_count=4, process_fn=_fake_or_real, fn_args=(10,), **base)


def _start_loop(conn, setup: WorkerSetup, ring: SlabRing, **kw):
    """`run_worker` in a thread; the list it appends an escaping exception to (it must return cleanly)."""
    errors: list[BaseException] = []

    def loop() -> None:
        try:
            run_worker(conn, setup, ring.mapping, **kw)
        except BaseException as err:  # noqa: BLE001 - handed to the test
            errors.append(err)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    return thread, errors


def _receive(conn, until, limit_s: float = 20.0) -> list:
    """Reports in the order the worker made them (a message is one report or a list of them)."""
    got, deadline = [], time.monotonic() + limit_s
    while not until(got):
        assert conn.poll(max(0.0, deadline - time.monotonic())), f"the worker stopped answering after {got!r}"
        msg = conn.recv()
        got.extend(msg if isinstance(msg, list) else [msg])
    return got


def test_the_worker_loop_answers_each_task_in_order_and_flushes_rows_when_idle(monkeypatch):
    """The loop every worker process runs, driven here in-process over a real pipe and a real ring:
    one `DocumentResult` per task in task order, an exception is that document's `worker_error`, a
    `known_hash` equal to the content hash is `unchanged` with no rows, a changed document's rows
    follow its result, and they are written out when no new task comes (the look-ahead window here
    is far from full), without any further message; ``stop`` ends it and nothing after it runs."""
    monkeypatch.delenv("TOKENIZERS_PARALLELISM", raising=False)
    real = [r for r in discover([str(SAMPLE_CORPUS)], DOCS_CFG)[0] if r.rel_path.endswith(("api.rst", "overview.md"))]
    truth = [process_document(r, DOCS_CFG, CHUNK_CFG) for r in real]
    ring = SlabRing(4, _setup().layout, pin=False)
    parent, child = Pipe()
    marked: list[int] = []
    worker, errors = _start_loop(child, _setup(), ring, mark_reading=marked.append)
    parent.send(("slabs", [0, 1, 2, 3]))
    tasks = [(4, _fake("a", 3), None), (7, _fake("bad", 1), None), (9, _fake("b", 5), "50"),
             (10, real[0], truth[0].content_hash), (11, _fake("forced", 2), None), (12, real[1], "stale")]
    for key, ref, known in tasks:
        parent.send(("tasks", [(key, ref, known)]))
    n_rows = len(truth[1].chunks)
    got = _receive(parent, lambda g: sum(m.rows for m in g if isinstance(m, SlabBatch)) >= n_rows)
    results = [m for m in got if isinstance(m, DocumentResult)]
    assert [r.key for r in results] == [4, 7, 9, 10, 11, 12]  # in task order
    assert marked == [4, 7, 9, 10, 11, 12]  # each marked as being read (the document charged if it dies)
    assert [r.content_hash for r in results[:3]] == ["30", "", "50"]
    assert (results[1].skip_reason, results[1].skip_detail) == ("worker_error", "ValueError: cannot read bad")
    assert results[0].skip_reason is None and results[0].n_chunks == 0 and results[0].ref is None
    assert results[2].unchanged and results[2].n_chunks == 0  # "50" is its content hash
    assert results[3].unchanged and results[3].n_chunks == 0 and results[3].content_hash == truth[0].content_hash
    assert results[4].ref is not None and results[4].ref.modality == "code"  # the process function changed it
    r12 = results[5]
    assert not r12.unchanged and r12.n_chunks == n_rows and r12.tokens == sum(c.n_tokens for c in truth[1].chunks)
    batches = [m for m in got if isinstance(m, SlabBatch)]
    assert got.index(r12) < got.index(batches[0])  # a document's result precedes its rows
    rows = [row for b in batches for row in slab_rows(ring, b)]
    assert {row["key"] for row in rows} == {12}  # no rows for the unchanged document
    assert strip_key(rows) == expected_rows(truth[1])
    assert os.environ["TOKENIZERS_PARALLELISM"] == "false"
    assert not parent.poll(0.2)  # nothing more
    parent.send(("stop",))
    parent.send(("tasks", [(13, _fake("late", 1), None)]))
    worker.join(5)
    assert not worker.is_alive() and errors == []
    assert not parent.poll(0.1)  # the task after stop was never answered
    ring.close()


def test_the_worker_loop_sends_reports_several_to_a_message():
    """`reports_per_message`: results without rows wait until that many are due (then one message,
    in task order) or until the worker would wait for the parent; no per-document key messages."""
    ring = SlabRing(4, _setup().layout, pin=False)
    parent, child = Pipe()
    worker, errors = _start_loop(child, _setup(reports_per_message=3), ring)
    try:
        parent.send(("slabs", [0, 1]))
        parent.send(("tasks", [(k, _fake(f"f{k}", 1), None) for k in range(7)]))
        messages = []
        while sum(len(m) if isinstance(m, list) else 1 for m in messages) < 7:
            assert parent.poll(20), f"the worker stopped answering after {messages!r}"
            messages.append(parent.recv())
        assert [[r.key for r in m] for m in messages[:2]] == [[0, 1, 2], [3, 4, 5]]
        assert isinstance(messages[2], DocumentResult) and messages[2].key == 6  # out of tasks: sent alone
        assert not parent.poll(0.2)
        parent.send(("stop",))
        worker.join(5)
        assert errors == []
    finally:
        ring.close()


def test_a_worker_process_tunes_its_collector_after_the_first_document():
    """`tune_gc` (what a worker process's `main` passes): the larger gen-0 threshold from the start,
    start-up objects frozen after the first document, and rows still correct. Restored afterwards:
    this runs inside the test process."""
    import gc

    from hades_gpu.orchestration.worker_main import GC_GEN0_THRESHOLD

    before = gc.get_threshold()
    gc.unfreeze()
    real = next(r for r in discover([str(SAMPLE_CORPUS)], DOCS_CFG)[0] if r.rel_path.endswith("api.rst"))
    truth = process_document(real, DOCS_CFG, CHUNK_CFG)
    ring = SlabRing(4, _setup().layout, pin=False)
    parent, child = Pipe()
    try:
        worker, errors = _start_loop(child, _setup(), ring, tune_gc=True)
        parent.send(("slabs", [0, 1, 2, 3]))
        parent.send(("tasks", [(1, real, None)]))
        got = _receive(parent, lambda g: sum(m.rows for m in g if isinstance(m, SlabBatch)) >= len(truth.chunks))
        assert gc.get_threshold()[0] == GC_GEN0_THRESHOLD and gc.get_threshold()[1:] == before[1:]
        assert gc.get_freeze_count() > 0
        rows = [row for b in got if isinstance(b, SlabBatch) for row in slab_rows(ring, b)]
        assert strip_key(rows) == expected_rows(truth)
        parent.send(("stop",))
        worker.join(5)
        assert errors == []
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
        ring.close()


def test_the_worker_loop_ends_when_its_parent_is_gone_and_waits_while_it_lives():
    ring = SlabRing(4, _setup().layout, pin=False)
    for waiting_for_a_slab in (False, True):
        parent, child = Pipe()
        worker, errors = _start_loop(child, _setup(), ring)
        if waiting_for_a_slab:  # a document to pack and no slab granted: it waits in acquire
            real = next(r for r in discover([str(SAMPLE_CORPUS)], DOCS_CFG)[0] if r.rel_path.endswith("api.rst"))
            parent.send(("tasks", [(1, real, None)]))
            got = _receive(parent, lambda g: len(g) == 1)
            assert isinstance(got[0], DocumentResult) and got[0].key == 1
        worker.join(1.0)
        assert worker.is_alive()  # an idle (or slab-starved) worker with a live parent keeps waiting
        parent.close()  # the parent is gone: EOF on the pipe
        worker.join(5)
        assert not worker.is_alive() and errors == []  # returned, not died of the EOF
    ring.close()


def test_the_worker_loop_applies_a_budget_message_and_stops_on_an_unknown_one():
    real = discover([str(SAMPLE_CORPUS), *map(str, stdlib_sources(3))], DOCS_CFG)[0]
    total = sum(len(process_document(r, DOCS_CFG, CHUNK_CFG).chunks) for r in real)
    setup = _setup(max_batch_tokens=4096, max_batch_size=32)
    ring = SlabRing(4, setup.layout, pin=False)
    parent, child = Pipe()
    worker, errors = _start_loop(child, setup, ring)
    parent.send(("budget", 512))
    parent.send(("slabs", [0, 1, 2, 3]))
    for key, ref in enumerate(real):
        parent.send(("tasks", [(key, ref, None)]))
    batches: list[SlabBatch] = []
    while sum(b.rows for b in batches) < total:
        assert parent.poll(10), "the worker stopped answering"
        msg = parent.recv()
        for report in (msg if isinstance(msg, list) else [msg]):
            if isinstance(report, SlabBatch):
                batches.append(report)
                parent.send(("slabs", [report.slab]))  # read: the slab may be granted again
    assert all(b.rows * b.length <= 512 for b in batches) and max(b.rows for b in batches) > 1
    assert max(b.length for b in batches) == 256  # full-length chunks were among them: 2 rows at most
    parent.send(("what",))
    worker.join(5)
    assert not worker.is_alive()  # an unknown message is a bug on the parent's side: the loop stops
    assert len(errors) == 1 and "unknown message 'what'" in str(errors[0])
    ring.close()


def test_stop_lets_the_workers_exit_without_waiting_and_restarts_none():
    """`stop` only tells the workers to exit (the ingest commits its last part meanwhile); a poll
    after it sees them gone without restarting any or granting slabs; `close` then reaps them."""
    pack = packing()
    ring = ring_for(pack)
    with WorkerPool(2, environment_probe, (), ring, pack) as pool:
        pids = pool.pids()
        t0 = time.monotonic()
        pool.stop()
        assert time.monotonic() - t0 < 0.5
        deadline = time.monotonic() + 20
        while any(w.proc.poll() is None for w in pool._workers):
            assert time.monotonic() < deadline, "the workers did not exit after stop"
            pool.poll(timeout=0.05)
        free = ring.free
        pool.poll(timeout=0.05)
        assert pool.restarts == 0 and ring.free == free
        assert sorted(w.proc.pid for w in pool._workers) == sorted(pids)  # the same processes, exited
    assert all(w.proc.returncode == 0 for w in pool._workers)


def _warmed_pids(folder: Path, count: int, limit_s: float = 60.0) -> set[int]:
    """The process ids that ran `record_warm_up` into `folder`, once `count` have."""
    deadline = time.monotonic() + limit_s
    while len(list(folder.iterdir())) < count:
        assert time.monotonic() < deadline, "the launched workers did not warm up"
        time.sleep(0.02)
    return {int(p.name) for p in folder.iterdir()}


def _rows_by_document(drained: Drained) -> dict[str, list[tuple]]:
    return {e.ref.rel_path: sorted((r["ordinal"], r["char_start"], r["char_end"], r["text"]) for r in drained.live_rows(e.key))
            for e in drained.final().values()}


def test_launched_workers_warm_up_before_their_pool_exists_and_the_pool_adopts_them(tmp_path):
    """`WorkerLaunch` starts the processes and runs the warm-up in each before any pool (slabs,
    setup) exists; the pool then uses those very processes, and every chunk arrives once, as
    `process_document` makes it here. A worker the pool restarts (a CRASH file) warms up too."""
    warm = tmp_path / "warm"
    warm.mkdir()
    refs = corpus_refs(tmp_path, {"CRASH.txt": "this file kills its worker\n"}, n_stdlib=4)
    launch = WorkerLaunch(2, functools.partial(record_warm_up, str(warm)))
    assert _warmed_pids(warm, 2) == set(launch.pids())
    pack = packing()
    with WorkerPool(2, crash_on_marker, (DOCS_CFG, CHUNK_CFG), ring_for(pack), pack, max_inflight_per_worker=3,
                    launched=launch) as pool:
        assert sorted(pool.pids()) == sorted(launch_pids := _warmed_pids(warm, 2))
        assert len(launch) == 0  # handed over: closing the launch no longer touches them
        launch.close()
        drained = drain(pool, refs)
        assert all(pool.pids()) and pool.restarts == 2  # the CRASH file killed a worker twice
        assert len(_warmed_pids(warm, 2 + pool.restarts)) == 2 + pool.restarts  # each new worker warmed up
        assert launch_pids <= _warmed_pids(warm, 4)
    got = _rows_by_document(drained)
    for ref in refs:
        if "CRASH" in ref.rel_path:
            continue
        doc = process_document(ref, DOCS_CFG, CHUNK_CFG)
        expected = [(c.ordinal, c.char_start, c.char_end, c.text) for c in doc.chunks]
        assert got.get(ref.rel_path, []) == expected, ref.rel_path


def test_a_launch_no_pool_adopts_stops_its_workers_cleanly(tmp_path):
    """The embedder failed to load, say: the launched workers exit on their own when the launch
    closes (their pipe ends), not killed, and quickly."""
    warm = tmp_path / "warm"
    warm.mkdir()
    with WorkerLaunch(2, functools.partial(record_warm_up, str(warm))) as launch:
        procs = [proc for proc, _conn in launch._started]
        _warmed_pids(warm, 2)
    assert all(p.returncode == 0 for p in procs), [p.returncode for p in procs]
    # and one closed before its workers got as far as the warm-up
    with WorkerLaunch(1) as launch:
        procs = [proc for proc, _conn in launch._started]
    assert all(p.returncode == 0 for p in procs), [p.returncode for p in procs]


def test_a_failing_warm_up_leaves_the_worker_working(tmp_path):
    refs = corpus_refs(tmp_path, n_stdlib=2)
    pack = packing()
    with WorkerPool(1, process_document, (DOCS_CFG, CHUNK_CFG), ring_for(pack), pack,
                    launched=WorkerLaunch(1, failing_warm_up)) as pool:
        drained = drain(pool, refs)
        assert pool.restarts == 0
    got = _rows_by_document(drained)
    assert got and all(got[r.rel_path] == [(c.ordinal, c.char_start, c.char_end, c.text)
                                           for c in process_document(r, DOCS_CFG, CHUNK_CFG).chunks]
                       for r in refs if process_document(r, DOCS_CFG, CHUNK_CFG).chunks)


def test_workers_that_die_before_their_first_message_end_the_run_instead_of_restarting_forever(tmp_path):
    """A worker that cannot start (an import that fails in its environment, here: it exits during
    its warm-up) was restarted forever (1,631 restarts a minute, the run never ended). After
    `START_DEATHS_LIMIT` deaths in a row (2 per worker above that) the pool raises
    `WorkerStartError`; deaths on a document (a CRASH file) do not count (see the test above)."""
    refs = corpus_refs(tmp_path, n_stdlib=2)
    pack = packing()
    t0 = time.monotonic()
    with WorkerPool(2, process_document, (DOCS_CFG, CHUNK_CFG), ring_for(pack), pack,
                    launched=WorkerLaunch(2, exit_at_start)) as pool:
        with pytest.raises(WorkerStartError, match=r"die before their first document \(4 in a row, the last exit code 3\)"):
            drain(pool, refs)
        assert pool.restarts == max(START_DEATHS_LIMIT, 4) - 1
    assert time.monotonic() - t0 < 60
