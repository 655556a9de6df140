"""The writer in a process of its own (`profile.writer`, `orchestration.writer_process`): it writes
exactly what the writer thread writes, and real faults lose nothing: the writer process SIGKILLed in
the middle of a run (the run fails with one line; the next run redoes what was not committed), and
the run SIGKILLed (its writer process dies with it; the next run resumes). Commit-point kills of the
writer process: tests/store/test_atomic_replace.py; a run from standard input with the writer
process: tests/pipelines/test_entry_points.py."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from hades_gpu.config import load_pipeline_config
from hades_gpu.gpu.slabs import CHUNK_ID_BYTES, SlabLayout, SlabRing
from hades_gpu.orchestration.writer_process import WriterProcess, WriterProcessError, use_process
from hades_gpu.pipelines import TextParallelPipeline
from hades_gpu.records import SlabBatch
from hades_gpu.store.reader import committed_parts, read_chunks, read_documents
from hades_gpu.store.verify import verify_output

from corpus_helpers import copy_files, stdlib_sources
from pipeline_helpers import row_vector
from store_faults import assert_same_chunks_exactly_once, chunk_rows

CHUNK_COLUMNS = ["chunk_id", "doc_id", "path", "ordinal", "char_start", "char_end", "n_tokens", "text", "embedding"]


class IdVectors:
    """Stand-in model: a row's vector is a function of its real token ids only (`row_vector`, then
    zeros), so two runs of one corpus give every chunk the same vector whatever the batch order.
    `on_call(n)` runs before call n returns (the fault hook)."""

    dim = 384
    concurrency = 1
    max_batch_size = 0
    description = "id-vectors stand-in (no model)"

    def __init__(self, on_call=None) -> None:
        self.calls = 0
        self.on_call = on_call

    def embed(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        self.calls += 1
        if self.on_call is not None:
            self.on_call(self.calls)
        out = np.zeros((ids.shape[0], self.dim), dtype=np.float32)
        for i in range(ids.shape[0]):
            out[i, :5] = row_vector(ids[i][mask[i].astype(bool)])
        return out

    def close(self) -> None:
        pass


def ingest(corpus: Path, out: Path, writer: str, embedder=None, rows_per_part: int = 12):
    """Small batches without look-ahead: documents complete, and parts are committed, all along the run."""
    cfg = load_pipeline_config("balanced", ["isne.enabled=false", "monitoring.progress=off", "profile.num_workers=2",
                                            "profile.max_batch_size=8", "profile.lookahead_batches=1",
                                            f"profile.writer={writer}", f"profile.writer_rows_per_part={rows_per_part}"])
    return TextParallelPipeline(cfg, embedder=embedder or IdVectors()).process_batch([corpus], output=out)


def writer_children() -> list[psutil.Process]:
    return [p for p in psutil.Process().children() if "hades_gpu.orchestration.writer_process" in " ".join(p.cmdline())]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return copy_files(stdlib_sources(30), tmp_path_factory.mktemp("wp") / "corpus")


def test_auto_puts_the_writer_in_a_process_only_with_a_core_to_spare():
    assert use_process("auto", num_workers=2, cores=4)
    assert not use_process("auto", num_workers=2, cores=3)  # workers + main would share the writer's core
    assert use_process("process", num_workers=8, cores=1) and not use_process("thread", num_workers=1, cores=64)
    with pytest.raises(ValueError, match="profile.writer must be one of auto|process|thread"):
        use_process("fork", num_workers=1, cores=4)


def test_the_writer_process_writes_what_the_writer_thread_writes(corpus, tmp_path):
    thread = ingest(corpus, tmp_path / "thread", "thread")
    process = ingest(corpus, tmp_path / "process", "process")
    assert thread.metrics["writer"] == "thread" and process.metrics["writer"] == "process"
    assert process.metrics["parts_written"] > 3  # parts were committed while rows still arrived
    # docs/metrics.md lists rows_written beside parts_written: it was never in metrics.json
    assert process.metrics["rows_written"] == process.chunks_written == thread.metrics["rows_written"]
    assert (process.documents_ingested, process.chunks_written) == (thread.documents_ingested, thread.chunks_written)

    def rows(out: Path):
        return read_chunks(out, CHUNK_COLUMNS).sort_by("chunk_id")

    assert rows(tmp_path / "process").equals(rows(tmp_path / "thread"))
    docs = ["doc_id", "rel_path", "content_hash", "n_chunks"]
    assert read_documents(tmp_path / "process", docs).sort_by("doc_id").equals(
        read_documents(tmp_path / "thread", docs).sort_by("doc_id"))
    assert verify_output(tmp_path / "process").ok
    assert not writer_children()  # it exited with the run


def test_a_writer_process_killed_mid_run_fails_the_run_in_one_line_and_the_next_run_loses_nothing(corpus, tmp_path):
    reference = chunk_rows(ingest(corpus, tmp_path / "reference", "thread").output_dir)
    killed: list[int] = []
    out = tmp_path / "out"

    def kill_the_writer(call: int) -> None:
        if not killed and committed_parts(out):  # a part committed, the rest still to come
            (child,) = writer_children()
            os.kill(child.pid, signal.SIGKILL)  # a real kill, as the OOM killer would
            killed.append(child.pid)
            deadline = time.monotonic() + 10  # dead before the run goes on (reaped by the run, not here)
            try:
                while child.status() != psutil.STATUS_ZOMBIE and time.monotonic() < deadline:
                    time.sleep(0.01)
            except psutil.NoSuchProcess:
                pass

    with pytest.raises(WriterProcessError) as err:
        ingest(corpus, out, "process", embedder=IdVectors(kill_the_writer))
    line = str(err.value)
    assert "\n" not in line and f"PID {killed[0]}" in line and "killed by SIGKILL" in line
    assert "ingested again by the next run" in line
    assert not writer_children()
    report = verify_output(out)  # what it had committed is intact; its unfinished part is not named
    assert report.ok, report.lines()

    again = ingest(corpus, out, "process")
    assert again.documents_unchanged > 0  # committed before the kill: kept, not embedded again
    assert_same_chunks_exactly_once(out, reference)


def test_a_writer_process_that_dies_is_reported_at_once_without_waiting_for_a_send(tmp_path):
    """The stage must hear of the death by itself: the slabs the child held never come back, so
    the workers wait for slabs, no batch comes, nothing is sent to the child again, and a run that
    only learnt of it on its next send waited forever (seen: 1 run in 9 of the test above)."""
    writer = WriterProcess(tmp_path / "out", "s0", 4, 10)
    heard: list[BaseException] = []
    writer.watch_failures(heard.append)
    (child,) = writer_children()
    os.kill(child.pid, signal.SIGKILL)
    deadline = time.monotonic() + 20
    while not heard and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(heard) == 1 and isinstance(heard[0], WriterProcessError), heard
    assert "killed by SIGKILL" in str(heard[0])
    writer.discard_open_part()
    assert not writer_children()


def test_an_error_in_the_writer_process_fails_the_run_in_one_line_and_releases_the_output(tmp_path):
    """Rows of a document never begun: the `DatasetWriter` in the child raises (as it raises in the
    thread); the parent's next call raises `WriterProcessError` with the child's error in one line."""
    out = tmp_path / "out"
    writer = WriterProcess(out, "s0", 4, 10)
    ring = SlabRing(2, SlabLayout(max_rows=2, max_len=4, text_bytes=64, vector_dim=4), pin=False)
    writer.attach_ring(ring)
    slab = ring.acquire()
    view = ring.view(slab)
    view.column("doc_key")[0] = 7
    view.column("text_offsets")[:2] = [0, 1]
    view.column("text")[:1] = ord("x")
    view.column("chunk_id")[:CHUNK_ID_BYTES] = ord("0")
    writer.take_slab(view, SlabBatch(slab=slab, rows=1, length=4, real_tokens=1, text_len=1), np.ones((1, 4), np.float32))
    with pytest.raises(WriterProcessError) as err:
        writer.flush()
    assert "\n" not in str(err.value)
    assert "KeyError" in str(err.value) and "unregistered document key 7" in str(err.value)
    assert ring.free == 2  # the slab came back: the child copies a batch out before it writes it
    writer.discard_open_part()
    ring.close()
    assert not writer_children()
    free = subprocess.run([sys.executable, "-c", "import sys; from hades_gpu.store.lock import lock_output; "
                           "lock_output(sys.argv[1], 's0').release()", str(out)], capture_output=True, text=True)
    assert free.returncode == 0, free.stderr  # the output lock went with the failed writer
    assert verify_output(out).ok
