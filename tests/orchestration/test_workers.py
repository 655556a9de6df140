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
