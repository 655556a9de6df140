"""Run metrics as users read them (metrics.json, progress): exact counters, rates from the wall clock,
peak memory that includes a real child process, progress lines on a schedule."""

from __future__ import annotations

import logging
import multiprocessing as mp
import time

import pytest

from hades_gpu.orchestration.monitoring import PeakMemorySampler, ProgressReporter, RunMetrics, StageMeter
from hades_gpu.orchestration.queue import MemoryAwareQueue


def test_stage_meter_counts_and_rates():
    m = StageMeter("embed")
    m.record(items=3, nbytes=300, tokens=30, busy_s=0.5)
    m.record(items=2, nbytes=200, tokens=20)
    assert (m.items, m.bytes, m.tokens, m.busy_s) == (5, 500, 50, 0.5)
    assert m.first_at is not None and m.last_at >= m.first_at
    d = m.to_dict(wall_s=2.0)
    assert d == {"items": 5, "bytes": 500, "tokens": 50, "busy_s": 0.5, "items_per_s": 2.5, "bytes_per_s": 250.0,
                 "tokens_per_s": 25.0}
    assert StageMeter("x").to_dict(0.0)["items_per_s"] == 0.0  # no division by zero


def test_run_metrics_snapshot_is_exact():
    m = RunMetrics()
    m.documents_total = 7
    m.document_done(4)
    m.document_done(2)
    m.documents_resumed = 1
    m.documents_unchanged_stat, m.documents_unchanged_hash, m.documents_read = 1, 0, 6
    m.add_padding(real=90, padded=120)
    m.add_padding(real=10, padded=30)
    m.add_skip("/c/a.bin", "binary", "NUL bytes")
    m.add_skip("/c/b.txt", "decode_error")
    m.add_skip("/c/c.bin", "binary")
    q = MemoryAwareQueue("documents", max_bytes=1024, max_items=4)
    q.put(b"x" * 10)
    m.queues = [q]
    m.extra["embedder"] = "test embedder"
    m.stages["embed"].record(items=6, tokens=100)
    time.sleep(0.01)
    m.finish()
    s = m.snapshot()
    assert s["documents"] == {"total": 7, "done": 2, "resumed": 1, "unchanged_not_read": 1, "unchanged_same_hash": 0,
                              "read": 6, "skipped": 3, "skipped_by_reason": {"binary": 2, "decode_error": 1}}
    assert s["chunks"] == 6 and s["batches"] == 2 and (s["real_tokens"], s["padded_tokens"]) == (100, 150)
    assert s["padding_efficiency"] == pytest.approx(100 / 150)
    assert s["chunks_per_s"] == pytest.approx(6 / s["wall_s"]) and s["tokens_per_s"] == pytest.approx(100 / s["wall_s"])
    assert s["skipped"][0] == {"path": "/c/a.bin", "reason": "binary", "detail": "NUL bytes"}
    assert s["skipped"][1]["detail"] == ""
    assert s["queues"]["documents"]["items"] == 1 and s["queues"]["documents"]["max_bytes"] == 1024
    assert s["embedder"] == "test embedder" and s["stages"]["embed"]["items"] == 6
    assert set(s["stages"]) == {"read_chunk", "batch", "embed", "write"}
    wall = m.wall_s
    time.sleep(0.02)
    assert m.wall_s == wall  # frozen at finish()
    assert RunMetrics().padding_efficiency == 1.0


def _hold_memory(ready, done) -> None:  # top level: picklable for spawn
    block = bytearray(80 * 2**20)  # 80 MiB, touched so it is resident
    for i in range(0, len(block), 4096):
        block[i] = 1
    ready.set()
    done.wait(30)


def test_peak_memory_counts_a_real_child_process():
    ctx = mp.get_context("spawn")
    ready, done = ctx.Event(), ctx.Event()
    sampler = PeakMemorySampler(interval_s=0.02)
    base = sampler.sample()
    assert base > 0 and sampler.peak_main_rss > 0
    child = ctx.Process(target=_hold_memory, args=(ready, done))
    child.start()
    try:
        assert ready.wait(60)
        sampler.start()
        time.sleep(0.2)
        sampler.stop()
    finally:
        done.set()
        child.join(30)
    assert sampler.peak_rss >= base + 70 * 2**20  # the child's 80 MiB are in the peak ...
    assert sampler.peak_main_rss < sampler.peak_rss - 60 * 2**20  # ... and not in the main process's
    assert sampler._thread is not None and not sampler._thread.is_alive()


def test_progress_logs_on_schedule_and_is_silent_when_off(caplog):
    caplog.set_level(logging.INFO, logger="hades_gpu.orchestration.monitoring")
    m = RunMetrics()
    m.documents_total = 10
    m.document_done(3)
    m.documents_resumed = 2
    m.stages["embed"].record(items=30)
    off = ProgressReporter(m, mode="off", interval_s=0.0)
    off.start()
    off.update()
    off.stop()
    assert not caplog.records
    p = ProgressReporter(m, mode="auto", interval_s=0.05)  # pytest's stderr is not a terminal: log lines
    assert p.enabled and not p.use_bar
    p.update()  # less than interval_s since start: nothing yet
    assert not caplog.records
    time.sleep(0.06)
    p.update()
    p.update()  # right after a line: nothing
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and lines[0].startswith("progress: 3/10 documents, 30 chunks")  # 1 done + 2 unchanged
    assert ProgressReporter(m, mode="on").use_bar is True


def test_progress_bar_on_a_terminal_shows_documents_rate_and_eta():
    import io

    from rich.console import Console

    m = RunMetrics()
    m.documents_total = 10
    for _ in range(4):
        m.document_done(5)
    m.documents_resumed = 1
    m.add_skip("/x.bin", "binary")
    m.stages["embed"].record(items=20)
    out = io.StringIO()
    p = ProgressReporter(m, mode="on", console=Console(file=out, force_terminal=True, width=160, color_system=None))
    p.start()
    p.update()
    p.stop()
    text = out.getvalue()
    assert "ingest" in text and "6/10" in text and "docs" in text  # 4 done + 1 unchanged + 1 skipped
    assert "20 chunks" in text and "chunks/s" in text and "ETA" in text
    assert p._progress is None
    ProgressReporter(m, mode="off").start()  # off: no bar, nothing to stop
