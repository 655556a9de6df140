"""Run metrics as users read them (metrics.json, progress): exact counters, rates from the wall clock,
peak memory that includes a real child process, progress lines on a schedule."""

from __future__ import annotations

import logging
import re
import sys
import multiprocessing as mp
import os
import time

import psutil

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
    # items_per_busy_s: its own speed while it worked (5 items in 0.5 busy seconds), not the run's
    assert d == {"items": 5, "bytes": 500, "tokens": 50, "busy_s": 0.5, "items_per_s": 2.5, "bytes_per_s": 250.0,
                 "tokens_per_s": 25.0, "items_per_busy_s": 10.0}
    assert StageMeter("x").to_dict(0.0)["items_per_s"] == 0.0  # no division by zero
    assert StageMeter("x").to_dict(1.0)["items_per_busy_s"] == 0.0


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
    m.document_done(3, chunks_read=60)  # its 60 chunks read, 30 of them embedded below
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
    assert len(lines) == 1 and lines[0].startswith("progress: 3/10 documents read, 30/60 chunks embedded")  # 1 done + 2 unchanged
    m.finished = m.started + 8.0  # a known wall clock: 8 s
    caplog.clear()
    time.sleep(0.06)
    p.update()
    # 30 chunks / 8 s; done: 3/10 read x 30/60 embedded = 0.15 of the work; ETA = 8 s x 0.85 / 0.15
    # (the documents-only ETA said 19 s with half the read chunks still to embed)
    assert [r.getMessage() for r in caplog.records] == [
        "progress: 3/10 documents read, 30/60 chunks embedded (3.8 chunks/s), ETA 45s"]
    fresh = RunMetrics()
    fresh.documents_total = 4
    fresh.finished = fresh.started  # nothing done, no time passed: no division by zero, ETA unknown
    caplog.clear()
    q = ProgressReporter(fresh, mode="auto", interval_s=0.0)
    q.update()
    assert [r.getMessage() for r in caplog.records] == ["progress: 0/4 documents read, 0/0 chunks embedded (0.0 chunks/s), ETA ?"]
    over = RunMetrics()
    over.documents_total, over.documents_resumed = 2, 5  # more answered than discovered: ETA 0, not negative
    over.finished = over.started + 1.0
    caplog.clear()
    ProgressReporter(over, mode="auto", interval_s=0.0).update()
    assert caplog.records[-1].getMessage().endswith("ETA 0s")
    # `on` where no bar can be drawn (pytest's stderr): log lines, as `auto` (rich drew nothing live)
    on = ProgressReporter(m, mode="on", interval_s=0.0)
    assert on.use_bar is False and on.enabled is True
    caplog.clear()
    on.update()
    assert caplog.records and caplog.records[-1].getMessage().startswith("progress: ")


def test_progress_bar_on_a_terminal_shows_documents_rate_and_eta():
    """The bar was documents read: full, "ETA 0:00:00" and its clock stopped from the first seconds
    while nearly every chunk was still to embed. It is now the share of the work, as the log line's."""
    import io

    from rich.console import Console

    m = RunMetrics()
    m.documents_total = 10
    for _ in range(4):
        m.document_done(5, chunks_read=10)
    m.documents_resumed = 1
    m.add_skip("/x.bin", "binary")
    m.stages["embed"].record(items=20)
    m.finished = m.started + 8.0
    out = io.StringIO()
    # 80 columns: a 40-wide bar and long labels cut the elapsed time and the ETA off there
    p = ProgressReporter(m, mode="on", console=Console(file=out, force_terminal=True, width=80, color_system=None))
    p.start()
    m.documents_total, m.documents_done = 10, 10  # every document read, half the chunks embedded
    m.chunks_read = 40
    p.update()
    task = p._progress.tasks[0]
    assert task.completed == 500 and not task.finished  # half the work: not a full bar
    m.documents_done = 4
    p.stop()
    text = out.getvalue()
    plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text).replace("\r", "\n")
    last = [line for line in plain.splitlines() if line.strip()][-1]
    # the columns in order: name, bar, documents read, chunks embedded, rate, elapsed, "ETA", remaining
    assert re.fullmatch(r"\s*ingest ━+\s+6/10 docs, 20/40 chunks 2\.5/s \d:\d\d:\d\d ETA "
                        r"(-:--:--|\d:\d\d:\d\d)\s*", last), last  # 4 done + 1 unchanged + 1 skipped; 20 chunks / 8 s
    assert "…" not in plain  # nothing cut off at 80 columns
    assert "XX" not in text
    assert p._progress is None
    ProgressReporter(m, mode="off").start()  # off: no bar, nothing to stop


class _Terminal:
    def isatty(self) -> bool:
        return True

    def write(self, text: str) -> int:
        return len(text)

    def flush(self) -> None:
        pass


def test_progress_mode_auto_draws_a_bar_only_on_a_terminal_and_off_never(monkeypatch):
    monkeypatch.setattr(sys, "stderr", _Terminal())
    m = RunMetrics()
    assert ProgressReporter(m, mode="auto").use_bar is True
    off = ProgressReporter(m, mode="off")
    assert off.use_bar is False and off.enabled is False
    off.start()
    assert off._progress is None


def test_stage_meter_rounding_and_rates_over_a_near_zero_wall():
    m = StageMeter("embed")
    m.record(items=5, busy_s=0.123456)
    d = m.to_dict(0.0)
    assert d["busy_s"] == 0.1235 and d["items_per_s"] == pytest.approx(5e9)


def test_snapshot_rates_are_zero_when_no_time_passed():
    m = RunMetrics()
    m.document_done(3)
    m.add_padding(real=10, padded=12)
    m.finished = m.started
    s = m.snapshot()
    assert s["chunks_per_s"] == 0.0 and s["tokens_per_s"] == 0.0 and s["chunks"] == 3


HOLD = ("b = bytearray(80 * 2**20)\n"
        "for i in range(0, len(b), 4096): b[i] = 1\n"
        "print('ready', flush=True)\n"
        "import sys; sys.stdin.read()\n")


def test_peak_memory_counts_a_grandchild_once_even_when_named_twice():
    """Worker processes may start their own children: the sum walks the whole tree, and a pid both
    found as a child and named in `extra_pids` is counted once."""
    import os
    import signal
    import subprocess

    parent = subprocess.Popen([sys.executable, "-c", f"import subprocess, sys; subprocess.run([sys.executable, '-c', {HOLD!r}])"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert parent.stdout.readline().strip() == "ready"
        sampler = PeakMemorySampler(extra_pids=lambda: [parent.pid, os.getpid(), parent.pid])
        main = sampler._proc.memory_info().rss
        total = sampler.sample()
        assert main + 70 * 2**20 <= total < main + 150 * 2**20  # the grandchild's 80 MiB, once
        assert sampler.peak_rss == total and sampler.peak_main_rss >= main
    finally:
        os.killpg(parent.pid, signal.SIGKILL)
        parent.wait(30)


def test_the_sampler_thread_keeps_sampling_between_start_and_stop():
    """A peak that came and went while the run was going is in the report (the thread samples on its
    own every interval_s; start and stop alone would miss it)."""
    sampler = PeakMemorySampler(interval_s=0.01)
    sampler.start()
    base = sampler.peak_main_rss
    block = bytearray(120 * 2**20)
    for i in range(0, len(block), 4096):
        block[i] = 1
    time.sleep(0.3)
    del block
    import gc

    gc.collect()
    time.sleep(0.05)
    sampler.stop()
    assert sampler.peak_main_rss >= base + 100 * 2**20
    assert sampler._thread.daemon and sampler._thread.name == "hades-rss-sampler" and not sampler._thread.is_alive()


def test_descendant_pids_finds_grandchildren_like_psutil():
    """The /proc children-file walk sees the same family as psutil's full scan."""
    import subprocess
    import sys

    from hades_gpu.orchestration.monitoring import descendant_pids

    code = "import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(30)']); print(p.pid, flush=True); time.sleep(30)"
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        grandchild = int(child.stdout.readline())
        found = descendant_pids(os.getpid())
        assert child.pid in found and grandchild in found
        assert sorted(found) == sorted(p.pid for p in psutil.Process().children(recursive=True))
    finally:
        for pid in (grandchild, child.pid):
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass
        child.wait(10)


def _ingest_on_a_terminal(tmp_path, epochs: int, stdout) -> str:
    """A real `hades-ingest` of four notes with ISNE, its stderr (and `stdout`, given None) a
    pseudo-terminal: what the terminal showed, escape sequences removed."""
    import os
    import pty
    import subprocess
    import sys

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(4):
        (corpus / f"n{i}.md").write_text(f"# Note {i}\n\n" + "Circles, squares and their areas in a note. " * 30)
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "hades_gpu.ingest", f"corpus={corpus}", f"output={tmp_path / 'out'}",
                             f"isne.epochs={epochs}", "isne.batch_size=8", "isne.early_stop=off",
                             "isne.time_budget_vs_embedding=0"], stdout=slave if stdout is None else stdout,
                            stderr=slave, env={**os.environ, "COLUMNS": "120"})
    os.close(slave)
    seen = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        seen += chunk
    assert proc.wait(timeout=300) == 0, seen[-3000:]
    os.close(master)
    return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", seen.decode("utf-8", "replace"))


def test_on_a_terminal_the_ingest_and_isne_bars_go_to_stderr_not_into_redirected_stdout(tmp_path):
    """`hades-ingest ... > log` on a terminal drew the ingest bar into the log file (rich draws on
    stdout unless told otherwise; the terminal test looked at stderr), and ISNE training showed no
    progress at all without a logging configuration (`train(epochs=50)` sat silent). Real command, its
    stderr a pseudo-terminal, its stdout a file."""
    with open(tmp_path / "stdout.txt", "w") as stdout:
        terminal = _ingest_on_a_terminal(tmp_path, 2, stdout)
    assert re.search(r"ingest .*━.*4/4 docs", terminal), terminal[-2000:]
    assert re.search(r"isne .*epoch 2/2, batch \d+/\d+", terminal), terminal[-2000:]
    logged = (tmp_path / "stdout.txt").read_text()
    assert "━" not in logged and "docs," not in logged and "batch" not in logged, logged  # no bar frame
    assert "document(s) ingested" in logged


def test_the_share_done_counts_bytes_read_and_an_interrupted_bar_is_not_drawn_full():
    """The largest files are read first, so by count the share read stayed small while most of the
    bytes were read: the ETA was 3-14x too long for most of a run. And an interrupted run's last frame
    was a full bar with "ETA 0:00:00"."""
    import io

    from rich.console import Console

    m = RunMetrics()
    m.documents_total, m.documents_done = 10, 2  # the two largest files: 80% of the bytes
    m.bytes_to_read, m.bytes_read = 100, 80
    m.chunks_read = 40
    m.stages["embed"].record(items=40)
    p = ProgressReporter(m, mode="on", console=Console(file=io.StringIO(), force_terminal=True, width=80))
    assert p._share(2, 40) == pytest.approx(0.8)
    p.start()
    m.stages["embed"].record(items=0)
    p.stop(finished=False)
    assert p._progress is None
    fresh = ProgressReporter(m, mode="on", console=Console(file=io.StringIO(), force_terminal=True, width=80))
    fresh.start()
    task = fresh._progress.tasks[0]
    fresh.stop(finished=False)
    assert task.completed == 800 and not task.finished  # the share done, not the full 1000


def test_log_lines_on_the_bars_terminal_print_above_the_bar_not_glued_to_its_frame(tmp_path):
    """With stdout and stderr on one terminal, each ISNE epoch line (Hydra logs to stdout) was written
    straight after the bar's last frame: `isne ━━━╸ epoch 2/3 ... ETA 0:00:01[2026-...] - isne epoch 2/3`."""
    text = _ingest_on_a_terminal(tmp_path, 3, None)
    lines = re.split(r"[\r\n]+", text)
    epochs = [ln for ln in lines if "isne epoch" in ln and "][hades_gpu" in ln]
    assert len(epochs) == 3, text[-3000:]
    assert all("pairs/s" in ln and "ETA" in ln for ln in epochs), epochs  # whole lines: not wrapped at 120 columns
    assert not [ln for ln in lines if "][hades_gpu" in ln and "━" in ln], text[-3000:]
