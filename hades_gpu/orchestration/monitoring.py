"""Run metrics: per-stage rates, queue depth and waits, padding efficiency, peak memory, progress.

Stages update their meters from their own threads (each meter has a lock); a sampler thread records
the peak resident memory of the main process plus its worker processes. `snapshot()` is a plain dict
written to `metrics.json` and rendered as Prometheus text by the live endpoint.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional

import psutil

from hades_gpu.config import ProgressMode
from hades_gpu.console_logs import LogsAbove
from hades_gpu.orchestration.queue import MemoryAwareQueue
from hades_gpu.records import display_path

log = logging.getLogger(__name__)


@dataclass
class StageMeter:
    """Items, bytes and busy time of one stage."""

    name: str
    items: int = 0
    bytes: int = 0
    tokens: int = 0
    busy_s: float = 0.0
    first_at: Optional[float] = None
    last_at: Optional[float] = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def record(self, items: int = 1, nbytes: int = 0, tokens: int = 0, busy_s: float = 0.0) -> None:
        now = time.monotonic()
        with self._lock:
            self.items += items
            self.bytes += nbytes
            self.tokens += tokens
            self.busy_s += busy_s
            if self.first_at is None:
                self.first_at = now - busy_s
            self.last_at = now

    def to_dict(self, wall_s: float) -> dict[str, Any]:
        with self._lock:
            wall = max(wall_s, 1e-9)
            return {
                "items": self.items,
                "bytes": self.bytes,
                "tokens": self.tokens,
                "busy_s": round(self.busy_s, 4),
                "items_per_s": self.items / wall,
                "bytes_per_s": self.bytes / wall,
                "tokens_per_s": self.tokens / wall,
                # the stage's own speed while it worked (the *_per_s above are over the run's wall time,
                # so every stage of a streaming run reads about the same): per thread, busy_s summed
                "items_per_busy_s": self.items / self.busy_s if self.busy_s > 0 else 0.0,
            }


def descendant_pids(pid: int) -> list[int]:
    """Children, grandchildren, ... of `pid`.

    Read from ``/proc/<pid>/task/<tid>/children`` (Linux): psutil's `children()` walks every process
    in /proc to build a parent map, ~10 ms a call and 5% of the main process's CPU at 5 Hz, where
    this reads one small file per thread of the family. psutil where those files do not exist."""
    if not os.path.exists(f"/proc/{pid}/task/{pid}/children"):
        try:
            return [c.pid for c in psutil.Process(pid).children(recursive=True)]
        except psutil.Error:
            return []
    out: list[int] = []
    todo = [pid]
    while todo:
        parent = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{parent}/task")
        except OSError:
            continue  # it ended meanwhile
        for tid in tasks:
            try:
                with open(f"/proc/{parent}/task/{tid}/children", "rb") as f:
                    kids = [int(x) for x in f.read().split()]
            except OSError:
                continue  # the thread ended meanwhile
            out.extend(kids)
            todo.extend(kids)
    return out


class PeakMemorySampler:
    """Samples RSS of this process and its children; keeps the peak of their sum."""

    def __init__(self, interval_s: float = 0.2, extra_pids: Callable[[], Iterable[int]] = lambda: ()) -> None:
        self.interval_s = interval_s
        self._extra_pids = extra_pids
        self._proc = psutil.Process(os.getpid())

        self.peak_rss = 0
        self.peak_main_rss = 0
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def watch(self, pids: Callable[[], Iterable[int]]) -> None:
        """Also read these processes' RSS on every tick (e.g. a worker pool's current PIDs)."""
        self._extra_pids = pids

    def sample(self) -> int:
        total = 0
        try:
            main = self._proc.memory_info().rss
        except psutil.Error:
            return self.peak_rss
        total += main
        self.peak_main_rss = max(self.peak_main_rss, main)
        seen = {self._proc.pid}
        pids = descendant_pids(self._proc.pid) + list(self._extra_pids())
        for pid in pids:
            if pid in seen:
                continue
            seen.add(pid)
            try:
                total += psutil.Process(pid).memory_info().rss
            except psutil.Error:
                continue
        self.peak_rss = max(self.peak_rss, total)
        return total

    def start(self) -> "PeakMemorySampler":
        def loop() -> None:
            while not self._stop.wait(self.interval_s):
                self.sample()

        self.sample()
        self._thread = threading.Thread(target=loop, name="hades-rss-sampler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.sample()


class RunMetrics:
    """All counters of one ingest run."""

    STAGES = ("read_chunk", "batch", "embed", "write")

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.finished: Optional[float] = None
        self.stages = {name: StageMeter(name) for name in self.STAGES}
        self.queues: list[MemoryAwareQueue] = []
        self.ring: Any = None  # the stage's slab ring (count, free), for live monitoring
        self.memory = PeakMemorySampler()
        self.documents_total = 0
        self.documents_done = 0
        self.documents_resumed = 0  # unchanged, by either path below
        self.documents_unchanged_stat = 0  # size + mtime as in the manifest: not read at all
        self.documents_unchanged_hash = 0  # read, content hash as in the manifest: not embedded
        self.documents_read = 0  # documents that came back from the worker processes
        self.bytes_to_read = 0  # file bytes of the documents the workers read this run (the progress share)
        self.bytes_read = 0
        self.chunks_done = 0
        self.chunks_read = 0  # chunks of the documents read so far: what the embedder has to do
        self.real_tokens = 0
        self.padded_tokens = 0
        self.batches = 0
        self.skipped: list[dict[str, str]] = []
        self.extra: dict[str, Any] = {}  # embedder description, governor counters, ...
        self._lock = threading.Lock()

    def add_padding(self, real: int, padded: int) -> None:
        with self._lock:
            self.real_tokens += real
            self.padded_tokens += padded
            self.batches += 1

    def add_skip(self, path: str, reason: str, detail: str = "") -> None:
        # as text (`display_path`: undecodable bytes of a name as \xHH): metrics.json held lone
        # surrogates ("fifo\udcfe.txt"), which JSON tools turn into U+FFFD
        with self._lock:
            self.skipped.append({"path": display_path(path), "reason": reason, "detail": display_path(detail)})

    def document_done(self, n_chunks: int, chunks_read: int = 0) -> None:
        with self._lock:
            self.documents_done += 1
            self.chunks_done += n_chunks
            self.chunks_read += chunks_read

    @property
    def wall_s(self) -> float:
        end = self.finished if self.finished is not None else time.monotonic()
        return end - self.started

    @property
    def padding_efficiency(self) -> float:
        return self.real_tokens / self.padded_tokens if self.padded_tokens else 1.0

    def finish(self) -> None:
        self.finished = time.monotonic()
        self.memory.stop()

    def snapshot(self) -> dict[str, Any]:
        wall = self.wall_s
        with self._lock:
            skipped = list(self.skipped)
            reasons: dict[str, int] = {}
            for s in skipped:
                reasons[s["reason"]] = reasons.get(s["reason"], 0) + 1
            out: dict[str, Any] = {
                "wall_s": wall,
                "documents": {
                    "total": self.documents_total,
                    "done": self.documents_done,
                    "resumed": self.documents_resumed,
                    "unchanged_not_read": self.documents_unchanged_stat,
                    "unchanged_same_hash": self.documents_unchanged_hash,
                    "read": self.documents_read,
                    "skipped": len(skipped),
                    "skipped_by_reason": reasons,
                },
                "chunks": self.chunks_done,
                "chunks_per_s": self.chunks_done / wall if wall else 0.0,
                "tokens_per_s": self.real_tokens / wall if wall else 0.0,
                "batches": self.batches,
                "real_tokens": self.real_tokens,
                "padded_tokens": self.padded_tokens,
                "padding_efficiency": self.padding_efficiency,
            }
        out["stages"] = {name: meter.to_dict(wall) for name, meter in self.stages.items()}
        out["queues"] = {q.name: vars(q.stats()) for q in self.queues}
        out["memory"] = {"peak_rss_bytes": self.memory.peak_rss, "peak_main_rss_bytes": self.memory.peak_main_rss}
        out.update(self.extra)
        out["skipped"] = skipped
        return out


_BAR_STEPS = 1000  # the bar's resolution: the share of the run's work, in thousandths


class ProgressReporter:
    """A rich progress bar on a terminal; a log line every `interval_s` otherwise."""

    def __init__(self, metrics: RunMetrics, mode: str = "auto", interval_s: float = 10.0,
                 console: Any = None) -> None:
        self.metrics = metrics
        self.console = console  # a rich Console for the bar (default: rich's, on stderr)
        self.interval_s = interval_s
        # a bar where one can be drawn (a terminal, or a console given); elsewhere log lines, for `on`
        # too: rich draws no live bar into a file or a CI log, so `on` showed nothing until the end
        self.enabled = mode != ProgressMode.OFF
        self.use_bar = self.enabled and (console is not None or sys.stderr.isatty())
        self._last_log = time.monotonic()
        self._progress: Any = None
        self._task: Any = None
        self._logs = LogsAbove()

    def start(self) -> None:
        if not (self.enabled and self.use_bar):
            return
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        # fits 80 columns (a 40-wide bar and long labels cut the elapsed time and the ETA off there)
        self._progress = Progress(
            TextColumn("[bold]ingest"), BarColumn(bar_width=10), TextColumn("{task.fields[counts]}"),
            TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
            # on stderr, where the tty test looked: rich's own default is stdout, so `hades-ingest ... > log`
            # on a terminal drew the bar's frames into the log file
            transient=False, console=self.console if self.console is not None else Console(stderr=True),
        )
        self._progress.start()
        self._logs.start(self._progress.console)  # log lines above the bar, not glued to its last frame
        self._task = self._progress.add_task("ingest", total=_BAR_STEPS, counts="", rate="")

    def _share(self, done: int, chunks: int) -> float:
        """The share of the run's work done: documents are read well ahead of the embedder (the whole
        corpus was "40/40, ETA 0s" with two thirds of its chunks still to embed), so it is the share
        read times the share of the read chunks embedded. The share read is by bytes: the largest
        files are read first, so by count it stayed small while most of the corpus was read (the ETA
        was 3-14x too long for most of a run)."""
        m = self.metrics
        if m.bytes_to_read:
            read = min(1.0, m.bytes_read / m.bytes_to_read)
        else:
            read = min(1.0, done / m.documents_total) if m.documents_total else 1.0
        return read * (min(1.0, chunks / m.chunks_read) if m.chunks_read else (1.0 if done else 0.0))

    def update(self, final: bool = False) -> None:
        m = self.metrics
        done = m.documents_done + len(m.skipped) + m.documents_resumed
        chunks = m.stages["embed"].items
        rate = chunks / m.wall_s if m.wall_s > 0 else 0.0
        share = self._share(done, chunks)
        if self._progress is not None:
            # the bar is the same share as the log line's ETA (it was documents read: full, "ETA
            # 0:00:00" and its clock stopped while most chunks were still to embed); full only at the end
            steps = _BAR_STEPS if final else min(_BAR_STEPS - 1, int(share * _BAR_STEPS))
            self._progress.update(self._task, completed=steps,
                                  counts=f"{done}/{m.documents_total} docs, {chunks}/{m.chunks_read} chunks",
                                  rate=f"{rate:.1f}/s")
            if final:
                self._progress.refresh()  # the last frame drawn is the finished one
        elif self.enabled and time.monotonic() - self._last_log >= self.interval_s:
            self._last_log = time.monotonic()
            eta = f"{m.wall_s * (1 - share) / share:.0f}s" if share > 0 else "?"
            log.info("progress: %d/%d documents read, %d/%d chunks embedded (%.1f chunks/s), ETA %s", done,
                     m.documents_total, chunks, m.chunks_read, rate, eta)

    def stop(self, finished: bool = True) -> None:
        """`finished=False` (interrupted, failed): the last frame keeps the share done, not a full bar."""
        if self._progress is not None:
            self.update(final=finished)
            self._progress.stop()
            self._progress = None
        self._logs.stop()
