"""The worker pool with real processes and real files."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from hades_gpu.config import load_pipeline_config
from hades_gpu.documents.chunking import process_document
from hades_gpu.documents.discovery import discover
from hades_gpu.orchestration.queue import MemoryAwareQueue, QueueClosed
from hades_gpu.orchestration.workers import WorkerPool

from corpus_helpers import copy_files, crash_on_marker, stdlib_sources


def test_slow_consumer_keeps_queued_bytes_under_budget(tmp_path):
    cfg = load_pipeline_config("low_memory")
    corpus = copy_files(stdlib_sources(40), tmp_path / "c")
    refs, _ = discover([str(corpus)], cfg.documents)
    budget = 1024 * 1024
    queue = MemoryAwareQueue("documents", max_bytes=budget, max_items=1000, high_watermark=0.8, low_watermark=0.4)

    def produce():
        with WorkerPool(2, process_document, (cfg.documents, cfg.chunking), max_inflight_per_worker=4) as pool:
            pending = list(enumerate(refs))
            while pending or pool.inflight:
                while pending and pool.has_room():
                    pool.submit(*pending.pop(0))
                result = pool.get_result(timeout=0.5)
                if result is not None:
                    queue.put(result[1])
        queue.close()

    producer = threading.Thread(target=produce)
    producer.start()
    received = []
    while True:
        try:
            doc = queue.get(timeout=120)
        except QueueClosed:
            break
        received.append(doc)
        time.sleep(0.05)  # the slow consumer
    producer.join()
    stats = queue.stats()
    assert len(received) == len(refs) and {d.ref.path for d in received} == {r.path for r in refs}
    largest = max(d.nbytes for d in received)
    assert largest < 0.4 * budget
    assert stats.peak_bytes <= 0.8 * budget  # the producer never queued past the high watermark
    assert stats.put_waits > 0  # and it really was held back


def test_dead_worker_is_restarted_and_document_named(tmp_path):
    cfg = load_pipeline_config("low_memory")
    corpus = copy_files(stdlib_sources(6), tmp_path / "c")
    (corpus / "CRASH.txt").write_text("this file kills its worker\n")
    refs, _ = discover([str(corpus)], cfg.documents)
    results = {}
    with WorkerPool(1, crash_on_marker, (cfg.documents, cfg.chunking), max_inflight_per_worker=2) as pool:
        pending = list(enumerate(refs))
        deadline = time.monotonic() + 120
        while (pending or pool.inflight) and time.monotonic() < deadline:
            while pending and pool.has_room():
                pool.submit(*pending.pop(0))
            got = pool.get_result(timeout=0.5)
            if got is not None:
                results[got[0]] = got[1]
        assert pool.restarts == 2  # the first try and the one retry each killed the worker
    assert len(results) == len(refs)  # every document answered exactly once
    crashed = [d for d in results.values() if d.skip_reason == "worker_crashed"]
    assert [Path(d.ref.path).name for d in crashed] == ["CRASH.txt"]
    assert crashed[0].skip_detail == "worker exited with code 3 twice on it" and crashed[0].content_hash == ""
    assert all(d.chunks for d in results.values() if d.skip_reason is None)


def test_two_crashing_documents_are_each_retried_once_and_queued_ones_are_not_charged(tmp_path):
    """A document queued behind a crashing one is handed on without using up its own retry: here the
    second CRASH file sits behind the first, so it is tried twice too (4 restarts, not 3)."""
    cfg = load_pipeline_config("low_memory")
    corpus = tmp_path / "c"
    corpus.mkdir()
    for name in ("a_CRASH.txt", "b_CRASH.txt", "c_ok.txt", "d_ok.txt"):
        (corpus / name).write_text(f"{name}: some words to chunk\n")
    refs, _ = discover([str(corpus)], cfg.documents)
    refs = sorted(refs, key=lambda r: Path(r.path).name)
    results = {}
    with WorkerPool(1, crash_on_marker, (cfg.documents, cfg.chunking), max_inflight_per_worker=4) as pool:
        for i, ref in enumerate(refs):
            pool.submit(i, ref)
        deadline = time.monotonic() + 120
        while pool.inflight and time.monotonic() < deadline:
            got = pool.get_result(timeout=0.5)
            if got is not None:
                assert got[0] not in results
                results[got[0]] = got[1]
        assert pool.restarts == 4
    assert {Path(d.ref.path).name: d.skip_reason for d in results.values()} == {
        "a_CRASH.txt": "worker_crashed", "b_CRASH.txt": "worker_crashed", "c_ok.txt": None, "d_ok.txt": None}


def _double_or_fail(ref, factor):
    from hades_gpu.records import ChunkedDocument

    if ref.rel_path == "bad":
        raise ValueError(f"cannot read {ref.rel_path}")
    return ChunkedDocument(ref=ref, content_hash=str(ref.size * factor))


def test_the_worker_loop_answers_each_task_in_order_and_turns_errors_into_skips(monkeypatch):
    """The loop every worker process runs, driven here in-process (the real-process tests above see
    it only from outside): one answer per task with its index, an exception is that document's
    `worker_error`, the sentinel ends it, and tokenizers are told not to fork threads."""
    import os
    import queue

    from hades_gpu.orchestration.workers import _worker_main
    from hades_gpu.records import DocumentRef

    monkeypatch.delenv("TOKENIZERS_PARALLELISM", raising=False)
    ref = lambda rel, size: DocumentRef(path=f"/c/{rel}", rel_path=rel, size=size, modality="prose", language="text")  # noqa: E731
    tasks, results = queue.Queue(), queue.Queue()
    for task in ((4, ref("a", 3), 1), (7, ref("bad", 1), 2), (9, ref("b", 5), 1), None, (11, ref("late", 1), 1)):
        tasks.put(task)
    _worker_main(tasks, results, _double_or_fail, (10,), os.getppid())
    got = [results.get_nowait() for _ in range(results.qsize())]
    assert [i for i, _ in got] == [4, 7, 9]  # in order; nothing after the sentinel
    assert [d.content_hash for _, d in got] == ["30", "", "50"]
    assert (got[1][1].skip_reason, got[1][1].skip_detail) == ("worker_error", "ValueError: cannot read bad")
    assert got[0][1].skip_reason is None and got[1][1].ref.rel_path == "bad"
    assert os.environ["TOKENIZERS_PARALLELISM"] == "false"


def test_the_worker_loop_exits_when_its_parent_is_gone_and_waits_while_it_lives():
    import os
    import queue

    from hades_gpu.orchestration.workers import _worker_main

    t0 = time.monotonic()
    _worker_main(queue.Queue(), queue.Queue(), _double_or_fail, (1,), parent_pid=-1)  # not our parent
    assert time.monotonic() - t0 < 5
    tasks = queue.Queue()
    alive = threading.Thread(target=_worker_main, args=(tasks, queue.Queue(), _double_or_fail, (1,), os.getppid()),
                             daemon=True)
    alive.start()
    alive.join(1.5)
    assert alive.is_alive()  # an idle worker with a live parent keeps waiting for work
    tasks.put(None)
    alive.join(5)
    assert not alive.is_alive()
