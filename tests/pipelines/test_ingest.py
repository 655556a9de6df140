"""End-to-end ingest over real worker processes, real files and the real embedder."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from hades_gpu.config import load_pipeline_config
from hades_gpu.pipelines import CodeParallelPipeline, TextParallelPipeline
from hades_gpu.store.manifest import Manifest
from hades_gpu.store.reader import chunk_source, committed_parts, is_ingest_output, read_chunks, read_documents

from corpus_helpers import REPO, copy_files, stdlib_sources
from embedder_helpers import RecordingEmbedder

FAST = ["isne.enabled=false", "monitoring.progress=off"]


def config(*overrides, profile="balanced"):
    return load_pipeline_config(profile, [*FAST, *overrides])


def _wait_for_committed_parts(proc: subprocess.Popen, out: Path, parts: int = 1, timeout_s: float = 240) -> None:
    """Until the run in `proc` has committed `parts` parts to `out` (mid-run), it ends, or `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        if (out / "manifest-s0.sqlite").exists() and len(committed_parts(out)) >= parts:
            return
        time.sleep(0.05)


def assert_exactly_once(output: Path) -> "object":
    """Every committed document has ordinals 0..n-1 exactly once; chunk ids are unique."""
    table = read_chunks(output, ["doc_id", "chunk_id", "ordinal"]).to_pandas()
    assert table.chunk_id.is_unique
    docs = read_documents(output, ["doc_id", "n_chunks"]).to_pandas()
    assert docs.doc_id.is_unique
    counts = table.groupby("doc_id").ordinal.apply(sorted)
    for doc_id, n in zip(docs.doc_id, docs.n_chunks):
        assert counts.get(doc_id, []) == list(range(n)), doc_id
    return table


def test_sample_corpus_with_bad_inputs(sample_corpus, tmp_path, embedder):
    bad = sample_corpus / "bad"
    bad.mkdir()
    (bad / "blob.txt").write_bytes(bytes(range(256)) * 8)  # binary with a text extension
    (bad / "empty.md").write_bytes(b"")
    (bad / "latin1.txt").write_bytes("caf\xe9 cr\xe8me br\xfbl\xe9e, " .encode("latin-1") * 20)
    (bad / "notes.md").mkdir()  # a folder that looks like a file: unreadable as a document
    missing = tmp_path / "does-not-exist.md"
    out = tmp_path / "out"
    result = TextParallelPipeline(config(), embedder=embedder).process_batch(
        [sample_corpus, missing], output=out)

    reasons = {Path(s["path"]).name: s["reason"] for s in result.skipped}
    assert reasons["blob.txt"] == "binary"
    assert reasons["empty.md"] == "empty"
    assert "latin1.txt" not in reasons  # decode_errors=detect (default): ingested as cp1252
    assert reasons["does-not-exist.md"] == "missing"
    assert reasons["diagram.png"] == "binary"
    assert result.errors  # per-document errors, keyed by path
    good = {"overview.md", "api.rst", "design.txt", "__init__.py", "measures.py", "circle.py", "polygon.py",
            "latin1.txt"}
    docs = read_documents(out).to_pandas()
    assert set(Path(p).name for p in docs.path) == good
    assert result.documents_ingested == len(good)

    table = assert_exactly_once(out)
    chunks = read_chunks(out).to_pandas()
    for row in chunks.itertuples():  # offsets reproduce the text
        assert chunk_source(out, row.doc_id)[row.char_start:row.char_end] == row.text
    assert docs.set_index(docs.path.map(lambda p: Path(p).name)).encoding.to_dict()["latin1.txt"] == "cp1252"
    emb = np.stack(chunks.embedding.to_numpy())
    assert emb.shape == (len(table), 384) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-3)

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["documents"]["skipped_by_reason"]["binary"] == 2
    assert 0 < metrics["padding_efficiency"] <= 1
    assert metrics["memory"]["peak_rss_bytes"] > 0
    assert {"read_chunk", "batch", "embed", "write"} <= set(metrics["stages"])

    assert metrics["ingest_totals"] == {"runs": 1, "wall_s": metrics["wall_s"], "chunks": len(table)}
    # what was read and written, also when given as process_batch's arguments (both were null)
    assert (metrics["config"]["corpus"], metrics["config"]["output"]) == ([str(sample_corpus), str(missing)], str(out))

    # a second run over the same output writes nothing twice
    again = TextParallelPipeline(config(), embedder=embedder).process_batch([sample_corpus], output=out)
    assert again.documents_ingested == 0 and again.documents_unchanged == len(good)
    assert json.loads((out / "metrics.json").read_text())["config"]["corpus"] == str(sample_corpus)
    assert len(read_chunks(out)) == len(table)
    # its metrics.json is its own (0 chunks), but the embedding timing ISNE's budget uses is carried
    noop = json.loads((out / "metrics.json").read_text())
    assert noop["chunks"] == 0 and noop["ingest_totals"] == metrics["ingest_totals"]
    from hades_gpu.isne.stage import training_budget_s

    assert training_budget_s(config().isne, out, len(table)) == pytest.approx(metrics["wall_s"])

    # a changed document replaces its rows; the others stay
    (sample_corpus / "docs" / "design.txt").write_text("Design notes\n\nRewritten entirely.\n")
    third = TextParallelPipeline(config(), embedder=embedder).process_batch([sample_corpus], output=out)
    assert third.documents_ingested == 1
    after = assert_exactly_once(out)
    texts = read_chunks(out, ["text"]).column("text").to_pylist()
    assert any("Rewritten entirely" in t for t in texts) and not any("Composition over inheritance" in t for t in texts)
    assert len(after) < len(table) + 1


def test_output_inside_the_corpus_is_not_ingested_by_the_next_run(sample_corpus, tmp_path, embedder):
    out = sample_corpus / "ingested"  # `hades-ingest corpus=. output=./ingested` and run again
    first = TextParallelPipeline(config(), embedder=embedder).process_batch([sample_corpus], output=out)
    assert (out / "metrics.json").is_file()
    again = TextParallelPipeline(config(), embedder=embedder).process_batch([sample_corpus], output=out)
    assert again.documents_ingested == 0 and again.documents_unchanged == first.documents_ingested
    assert {s["reason"] for s in again.skipped if str(out) in s["path"]} == {"output_folder"}
    paths = set(read_documents(out, ["path"]).column("path").to_pylist())
    assert not any(p.startswith(str(out)) for p in paths), paths
    assert_exactly_once(out)
    # another output over the same corpus: the first output is recognised by its manifest and skipped
    elsewhere = TextParallelPipeline(config(), embedder=embedder).process_batch(  # one source given as bytes
        os.fsencode(sample_corpus), output=tmp_path / "b")
    assert elsewhere.documents_ingested == first.documents_ingested
    assert [s["path"] for s in elsewhere.skipped if s["reason"] == "output_folder"] == [str(out)]
    # sources as a one-shot generator: discovered once (the empty-corpus check does not re-read them)
    third = TextParallelPipeline(config(), embedder=embedder).process_batch(
        (p for p in [sample_corpus]), output=tmp_path / "c")
    assert third.documents_ingested == first.documents_ingested


def test_embeddings_match_sentence_transformers(sample_corpus, tmp_path, embedder, sentence_transformer):
    out = tmp_path / "out"
    TextParallelPipeline(config(), embedder=embedder).process_batch([sample_corpus], output=out)
    chunks = read_chunks(out).to_pandas()
    reference = sentence_transformer.encode(list(chunks.text), batch_size=16, normalize_embeddings=True)
    ours = np.stack(chunks.embedding.to_numpy())
    cosine = (ours * reference).sum(axis=1)
    assert cosine.min() >= 0.999, cosine.min()


def test_code_pipeline_chunks_python_by_definitions(tmp_path, embedder):
    files = [p for p in stdlib_sources(40) if p.name in {"bisect.py", "heapq.py", "textwrap.py", "colorsys.py"}]
    corpus = copy_files(files, tmp_path / "code")
    out = tmp_path / "out"
    result = CodeParallelPipeline(config(), embedder=embedder).process_batch([corpus], output=out)
    assert result.documents_ingested == len(files) and not result.skipped
    chunks = read_chunks(out).to_pandas()
    assert set(chunks.modality) == {"code"}
    starts = chunks[chunks.text.str.startswith("def ") | chunks.text.str.startswith("class ")]
    assert len(starts) >= len(files)  # definitions begin chunks


def _run_ingest(args, **kw):
    return subprocess.Popen([sys.executable, "-m", "hades_gpu.ingest", *args], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


@pytest.mark.parametrize("writer", ["thread", "process"])
def test_resume_after_sigkill(tmp_path, embedder, writer):
    """SIGKILL mid-run, then a re-run: every chunk exactly once, and the re-run embeds exactly the
    chunks of the documents the killed run had not committed (nothing committed is embedded again).
    A writer process dies with the run (it must not go on committing into an output the next run
    repairs)."""
    import psutil

    corpus = copy_files(stdlib_sources(60), tmp_path / "corpus")
    out = tmp_path / "out"
    args = [f"corpus={corpus}", f"output={out}", "profile=low_memory", "profile.writer_rows_per_part=40",
            f"profile.writer={writer}", *FAST]
    proc = _run_ingest(args)
    _wait_for_committed_parts(proc, out, parts=2)
    assert proc.poll() is None, "ingest finished before it could be killed: " + proc.stdout.read()
    writers = [p for p in psutil.Process(proc.pid).children()
               if "hades_gpu.orchestration.writer_process" in " ".join(p.cmdline())]
    assert len(writers) == (writer == "process")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    gone, alive = psutil.wait_procs(writers, timeout=10)
    assert not alive, f"writer process {[p.pid for p in alive]} outlived the killed run"
    with Manifest.load(out, "s0") as manifest:
        done_before = {rel for rel, _ in manifest.documents()}
    assert 0 < len(done_before) < 60

    rec = RecordingEmbedder(embedder)
    cfg = config("profile.writer_rows_per_part=40", f"profile.writer={writer}", profile="low_memory")
    result = TextParallelPipeline(cfg, embedder=rec).process_batch([corpus], output=out)
    assert result.documents_unchanged == len(done_before)
    assert result.metrics["documents"]["read"] == 60 - len(done_before)  # committed ones not even read
    assert_exactly_once(out)
    docs = read_documents(out).to_pandas()
    assert len(docs) == 60
    unfinished = docs[~docs.rel_path.isin(done_before)]
    assert rec.rows_embedded == int(unfinished.n_chunks.sum()) == result.chunks_written
    # every part file on disk is committed (interrupted ones were removed)
    committed = set(committed_parts(out))
    assert {p.stem for p in (out / "chunks").glob("*.parquet")} == committed


def test_ctrl_c_at_a_terminal_is_one_line_and_leaves_no_process(tmp_path, embedder):
    """Ctrl-C at a terminal signals the whole foreground process group: the run, its workers and its
    writer process. The run alone answers it (one line, exit 130; the children leave SIGINT to it:
    each printed a KeyboardInterrupt traceback before), no child outlives it, and a re-run completes
    with every chunk once."""
    import psutil

    corpus = copy_files(stdlib_sources(60), tmp_path / "corpus")
    out = tmp_path / "out"
    args = [f"corpus={corpus}", f"output={out}", "profile=balanced", "profile.writer_rows_per_part=40",
            "profile.writer=process", *FAST]
    proc = subprocess.Popen([sys.executable, "-m", "hades_gpu.ingest", *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)  # a terminal's group
    _wait_for_committed_parts(proc, out)
    assert proc.poll() is None, "ingest finished before it could be interrupted: " + proc.stderr.read()
    children = psutil.Process(proc.pid).children(recursive=True)
    assert any("writer_process" in " ".join(c.cmdline()) for c in children)
    os.killpg(proc.pid, signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    # 130, not 134: the native teardown after an interrupt sometimes aborted (cli._exit_interrupted)
    assert proc.returncode == 130, (proc.returncode, stderr[-3000:])
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert lines == ["hades-ingest: error: interrupted (committed parts are kept: re-run to resume)"], stderr[-3000:]
    gone, alive = psutil.wait_procs(children, timeout=10)
    assert not alive, [c.pid for c in alive]

    cfg = config("profile.writer_rows_per_part=40", "profile.writer=process")
    result = TextParallelPipeline(cfg, embedder=embedder).process_batch([corpus], output=out)
    assert result.documents_unchanged > 0 and result.documents_unchanged + result.documents_ingested == 60
    assert_exactly_once(out)


@pytest.mark.parametrize("whole_group", [False, True])
def test_sigterm_is_one_line_and_the_parts_committed_by_the_interval_are_kept(tmp_path, embedder, whole_group):
    """`timeout`, systemd and Kubernetes stop a run with SIGTERM to its main process: it died silently
    (exit 143, no line). And with parts of 20k rows, a run stopped before its first full part kept
    nothing: parts are now committed at least every `profile.writer_commit_interval_s`. A SIGTERM to
    the whole process group (`kill -TERM -<pgid>`) reaches the workers too: a pool thread logged
    "worker ... died; restarting" under the one line."""
    import psutil

    corpus = copy_files(stdlib_sources(20, max_bytes=12_000), tmp_path / "corpus")  # small: the run is done twice
    out = tmp_path / "out"
    args = [f"corpus={corpus}", f"output={out}", "profile=balanced", "profile.writer_rows_per_part=1000000",
            "profile.writer_commit_interval_s=0.3", *FAST]
    proc = subprocess.Popen([sys.executable, "-m", "hades_gpu.ingest", *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=whole_group)
    _wait_for_committed_parts(proc, out)  # a part far below writer_rows_per_part: the interval committed it
    assert proc.poll() is None, "ingest finished before it could be stopped: " + proc.stderr.read()
    children = psutil.Process(proc.pid).children(recursive=True)
    if whole_group:
        os.killpg(proc.pid, signal.SIGTERM)
    else:
        os.kill(proc.pid, signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, (proc.returncode, stderr[-3000:])
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert lines == ["hades-ingest: error: terminated by SIGTERM (committed parts are kept: re-run to resume)"], \
        stderr[-3000:]
    gone, alive = psutil.wait_procs(children, timeout=10)
    assert not alive, [c.pid for c in alive]

    result = TextParallelPipeline(config(), embedder=embedder).process_batch([corpus], output=out)
    assert result.documents_unchanged > 0 and result.documents_unchanged + result.documents_ingested == 20
    assert_exactly_once(out)


def test_a_file_replaced_by_a_fifo_or_a_symlink_loses_its_chunks_and_never_blocks_a_reader(tmp_path, embedder):
    """A file replaced by a FIFO: `chunk_source` (and every search whose hits held it) blocked for
    ever opening it. A file replaced by a FIFO or by a symlink (not followed) kept its old chunks,
    and the error said "re-ingest it", which skipped it again and kept them."""
    import threading

    from hades_gpu.store.reader import SourceChangedError

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for name in "abcd":
        (corpus / f"{name}.md").write_text(f"# {name}\n\n" + " ".join(f"{name} word{i}." for i in range(200)))
    out = tmp_path / "out"
    TextParallelPipeline(config(), embedder=embedder).process_batch([corpus], output=out)
    (corpus / "b.md").unlink()
    os.mkfifo(corpus / "b.md")
    (corpus / "c.md").unlink()
    (corpus / "c.md").symlink_to(corpus / "d.md")
    outcome: list = []

    def read_source() -> None:
        try:
            chunk_source(out, "b.md")
        except SourceChangedError as err:
            outcome.append(err)

    reader = threading.Thread(target=read_source, daemon=True)
    reader.start()
    reader.join(timeout=30)
    assert not reader.is_alive() and outcome and "no longer a regular file" in str(outcome[0])

    result = TextParallelPipeline(config(), embedder=embedder).process_batch([corpus], output=out)
    assert result.documents_removed == 2
    assert sorted(read_documents(out, ["rel_path"]).column("rel_path").to_pylist()) == ["a.md", "d.md"]
    assert_exactly_once(out)


def test_an_empty_list_of_paths_is_refused_before_anything_is_written(tmp_path, embedder):
    """An empty glob or list returned quietly ("no documents found in (no paths given)") and left an
    empty output behind, so a script whose glob matched nothing exited 0."""
    from hades_gpu.config import ConfigError

    pipeline = TextParallelPipeline(config(), embedder=embedder)
    for empty in ([], (p for p in []), ()):
        with pytest.raises(ConfigError, match="no paths given"):
            pipeline.process_batch(empty, output=tmp_path / "out")
        with pytest.raises(ConfigError, match="no paths given"):
            pipeline.ingest(empty, output=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_an_output_that_is_a_file_is_a_config_error(tmp_path, embedder):
    """A file or /dev/null as the output was a bare FileExistsError traceback from a mkdir (the CLI
    already said it in one line)."""
    from hades_gpu.config import ConfigError

    (tmp_path / "afile").write_text("mine")
    (tmp_path / "doc.md").write_text("# A\n\ntext\n")
    pipeline = TextParallelPipeline(config(), embedder=embedder)
    for output, what in ((tmp_path / "afile", "is a file"), ("/dev/null", "is no folder")):
        with pytest.raises(ConfigError, match=what):
            pipeline.process_batch([tmp_path / "doc.md"], output=output)
    assert (tmp_path / "afile").read_text() == "mine"


_THREAD_RUN = """
import sys, threading
from hades_gpu.config import load_pipeline_config
from hades_gpu.pipelines import TextParallelPipeline

corpus, out = sys.argv[1], sys.argv[2]
cfg = load_pipeline_config("balanced", ["isne.enabled=false", "monitoring.progress=off",
                                        "profile.writer_rows_per_part=1000000", "profile.writer_commit_interval_s=0.3"])

def go():
    TextParallelPipeline(cfg).process_batch([corpus], output=out)

thread = threading.Thread(target=go, daemon=sys.argv[3] == "daemon")
thread.start()
print("started", flush=True)
if sys.argv[3] == "daemon":
    sys.stdin.readline()  # the main thread ends (normally) when the test says so: the daemon's run is cut off
else:
    while thread.is_alive():
        thread.join(0.2)  # Ctrl-C here: CPython 3.11 then marks the thread stopped and does not wait for it
"""


@pytest.mark.parametrize("how", ["ctrl-c-during-join", "ctrl-c-twice", "daemon"])
def test_a_run_in_a_thread_is_stopped_cleanly_when_the_interpreter_exits(tmp_path, embedder, how):
    """process_batch in a thread while the interpreter exits under it (Ctrl-C in the main thread's
    `join(timeout)`, or a daemon thread when the main thread ends): the process aborted with
    `terminate called without an active exception` (exit 134), the run's threads cut off and its
    workers left as zombies. Now the run stops as on Ctrl-C, commits what is finished, and the
    process exits as Python's own would; a re-run completes with every chunk once. Ctrl-C again
    while it waits ends the process at once (exit 130; it aborted, exit 134, as before)."""
    corpus = copy_files(stdlib_sources(60), tmp_path / "corpus")
    out = tmp_path / "out"
    script = tmp_path / "thread_run.py"
    script.write_text(_THREAD_RUN)
    mode = "daemon" if how == "daemon" else "join"
    proc = subprocess.Popen([sys.executable, str(script), str(corpus), str(out), mode], cwd=tmp_path,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_committed_parts(proc, out)
    assert proc.poll() is None, "ingest finished before the interpreter could exit under it: " + proc.stderr.read()
    if how == "daemon":
        proc.stdin.write("\n")
        proc.stdin.flush()
    else:
        proc.send_signal(signal.SIGINT)
    seen = ""
    if how == "ctrl-c-twice":  # again, once the exit wait has begun
        while "the interpreter is exiting" not in seen and proc.poll() is None:
            seen += proc.stderr.readline()
        proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=180)
    stderr = seen + stderr
    assert "terminate called" not in stderr and "Fatal Python error" not in stderr, stderr[-3000:]
    expected_rc = {"daemon": 0, "ctrl-c-during-join": -signal.SIGINT, "ctrl-c-twice": 130}[how]
    assert proc.returncode == expected_rc, (proc.returncode, stderr[-3000:])
    assert "the interpreter is exiting while 1 run(s) are still going: stopping them as on Ctrl-C" in stderr
    if how == "ctrl-c-twice":
        assert "interrupted again: exiting without waiting for the run(s) to commit" in stderr
    kept = len(read_documents(out, ["doc_id"]))
    assert 0 < kept < 60
    assert_exactly_once(out)

    result = TextParallelPipeline(config(), embedder=embedder).process_batch([corpus], output=out)
    assert result.documents_unchanged == kept and result.documents_ingested == 60 - kept
    assert_exactly_once(out)


_SIGTERM_SCRIPT = """
import os, sys
from pathlib import Path
from hades_gpu.config import load_pipeline_config
from hades_gpu.embedding.factory import build_embedder
from hades_gpu.pipelines import TextParallelPipeline

corpus, out, marker = sys.argv[1], sys.argv[2], Path(sys.argv[3])
cfg = load_pipeline_config("balanced", ["isne.enabled=false", "monitoring.progress=off", "profile.max_batch_tokens=512",
                                        "profile.writer_rows_per_part=1000000", "profile.writer_commit_interval_s=3600"])
inner = build_embedder(cfg)

class Marking:  # the real embedder; after 3 batches it tells the test (a file) that the run is mid-way
    def __init__(self):
        self.calls = 0
    def __getattr__(self, name):
        return getattr(inner, name)
    def embed(self, ids, mask):
        self.calls += 1
        if self.calls == 3:
            marker.touch()
        return inner.embed(ids, mask)

try:
    TextParallelPipeline(cfg, embedder=Marking()).process_batch([corpus], output=out)
finally:
    print("the caller's finally ran", flush=True)  # not under SIGTERM's default action: the process ends
"""


def test_sigterm_in_library_use_commits_the_finished_documents_then_ends_the_process(tmp_path, embedder):
    """A script calling process_batch, stopped by SIGTERM (`timeout`, Kubernetes): the process died
    at once with whatever the commit interval had committed (here none), and no line. Now the run
    commits its finished documents, says so in one line and the process ends by SIGTERM as before."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(40):  # one-chunk documents: many are finished after a few batches
        (corpus / f"note{i:02d}.md").write_text(f"# Note {i}\n\n" + " ".join(f"n{i} w{j}." for j in range(40)))
    out, marker = tmp_path / "out", tmp_path / "mid-run"
    script = tmp_path / "sigterm_run.py"
    script.write_text(_SIGTERM_SCRIPT)
    proc = subprocess.Popen([sys.executable, str(script), str(corpus), str(out), str(marker)], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None and not marker.exists():
        time.sleep(0.02)
    assert proc.poll() is None, "ingest finished before it could be stopped: " + proc.stderr.read()
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=180)
    assert proc.returncode == -signal.SIGTERM, (proc.returncode, stderr[-3000:])
    assert "terminated by SIGTERM: the finished documents are committed; re-run to resume" in stderr
    assert "Traceback" not in stderr and stdout == "", (stdout, stderr[-3000:])
    kept = len(read_documents(out, ["doc_id"]))
    assert 0 < kept < 40, kept  # the default action: 0 (nothing committed by the interval yet)
    assert_exactly_once(out)
    result = TextParallelPipeline(config(), embedder=embedder).process_batch([corpus], output=out)
    assert result.documents_unchanged == kept and result.documents_ingested == 40 - kept
    assert_exactly_once(out)


def _notes_committed_only_at_the_end(tmp_path: Path, writer: str):
    """(corpus, output, config): 40 one-chunk documents (many finish after a few batches) and parts
    committed only at the run's end, so whatever a stopped run keeps, its stop committed."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(40):
        (corpus / f"note{i:02d}.md").write_text(f"# Note {i}\n\n" + " ".join(f"n{i} w{j}." for j in range(40)))
    cfg = config("profile.writer_rows_per_part=1000000", "profile.writer_commit_interval_s=3600",
                 f"profile.writer={writer}", "profile.max_batch_tokens=512")
    return corpus, tmp_path / "out", cfg


class _InterruptAfter(RecordingEmbedder):
    """The real embedder; after `calls` batches it sends this process SIGINT, as Ctrl-C does (the
    signal is real; only its timing is chosen), then goes on embedding."""

    def __init__(self, inner, calls: int) -> None:
        super().__init__(inner)
        self.after = calls
        self._count = itertools.count(1)  # the call's number, taken atomically (embed threads run at once)

    def embed(self, input_ids, attention_mask):
        number = next(self._count)
        vectors = super().embed(input_ids, attention_mask)
        if number == self.after:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.5)  # the main thread takes the interrupt while the run is still going
        return vectors


@pytest.mark.parametrize("writer", ["thread", "process"])
def test_ctrl_c_commits_the_documents_already_embedded(tmp_path, embedder, writer, monkeypatch):
    """Ctrl-C kept nothing that was not committed yet: with 20k-row parts and a 60 s commit interval,
    minutes of embedded documents were dropped and embedded again by the next run. The documents
    whose every chunk is embedded are now committed when the run is interrupted."""
    corpus, out, cfg = _notes_committed_only_at_the_end(tmp_path, writer)
    interrupting = _InterruptAfter(embedder, calls=3)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(KeyboardInterrupt):  # relative paths, as a script in its folder gives them
        TextParallelPipeline(cfg, embedder=interrupting).process_batch(["corpus"], output="out")
    kept = len(read_documents(out, ["doc_id"]))
    assert 0 < kept < 40, kept  # without the commit at the interrupt: 0
    assert_exactly_once(out)
    # metrics.json says what this run committed (there was none), and its totals count it
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["interrupted"] is True and metrics["ingest_totals"]["chunks"] == kept
    assert metrics["documents"]["done"] == kept  # the committed ones, not the ones read (112 read, 29 committed)
    # what it read and wrote, absolute (an interrupted run's record had null for both)
    assert (metrics["config"]["corpus"], metrics["config"]["output"]) == (str(corpus), str(out))

    again = RecordingEmbedder(embedder)
    result = TextParallelPipeline(cfg, embedder=again).process_batch([corpus], output=out)
    assert result.documents_unchanged == kept and result.documents_ingested == 40 - kept
    assert again.rows_embedded == 40 - kept  # the kept documents are not embedded again
    assert_exactly_once(out)
    totals = json.loads((out / "metrics.json").read_text())["ingest_totals"]
    assert totals["runs"] == 2 and totals["chunks"] == 40


class _FailAfter(RecordingEmbedder):
    """The real embedder until call `calls`, which raises the EmbedderError a Triton embedder raises
    when its server is gone past every retry. A stand-in for that fault at a chosen moment: the real
    server kill is in tests/triton/test_ingest_triton.py, where its moment cannot be chosen."""

    def __init__(self, inner, calls: int) -> None:
        super().__init__(inner)
        self.after = calls
        self._count = itertools.count(1)

    def embed(self, input_ids, attention_mask):
        from hades_gpu.embedding.base import EmbedderError

        if next(self._count) >= self.after:
            raise EmbedderError("Triton at 127.0.0.1:1 model 'minilm_python': inference failed after 6 attempts")
        return super().embed(input_ids, attention_mask)


@pytest.mark.parametrize("writer", ["thread", "process"])
def test_an_embedder_that_fails_mid_run_keeps_the_documents_already_embedded(tmp_path, embedder, writer, caplog):
    """A Triton server gone past its retries dropped every row not yet committed (up to
    writer_commit_interval_s of embedding), where Ctrl-C commits the finished documents. The rows
    embedded before the failure are good, so the documents they complete are now committed too."""
    import logging

    from hades_gpu.embedding.base import EmbedderError

    corpus, out, cfg = _notes_committed_only_at_the_end(tmp_path, writer)
    with caplog.at_level(logging.INFO, logger="hades_gpu.pipelines.ingest"):
        with pytest.raises(EmbedderError, match="inference failed"):
            TextParallelPipeline(cfg, embedder=_FailAfter(embedder, calls=4)).process_batch([corpus], output=out)
    kept = len(read_documents(out, ["doc_id"]))
    assert 0 < kept < 40, kept  # without the commit at the failure: 0
    assert any(r.getMessage().startswith(f"the embedder failed: {kept} document(s) of this run are committed")
               for r in caplog.records)
    assert_exactly_once(out)
    again = RecordingEmbedder(embedder)
    result = TextParallelPipeline(cfg, embedder=again).process_batch([corpus], output=out)
    assert result.documents_unchanged == kept and again.rows_embedded == 40 - kept
    assert_exactly_once(out)


def test_a_file_that_is_no_longer_a_document_loses_its_earlier_chunks(tmp_path, embedder, caplog):
    """Emptied, turned binary or whitespace only: the run said "skipped a.txt: empty" and kept the old
    version's chunks, so search kept finding text the file no longer has."""
    import logging

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    texts = {name: f"# {name}\n\n" + " ".join(f"{name} says word{i}." for i in range(300)) for name in "abcd"}
    for name, text in texts.items():
        (corpus / f"{name}.md").write_text(text)
    out = tmp_path / "out"
    TextParallelPipeline(config(), embedder=embedder).process_batch([corpus], output=out)
    before = read_chunks(out, ["path"]).column("path").to_pylist()
    assert {Path(p).name for p in before} == {"a.md", "b.md", "c.md", "d.md"}

    (corpus / "a.md").write_bytes(b"")
    (corpus / "b.md").write_bytes(bytes(range(256)) * 8)
    (corpus / "c.md").write_text("  \n\n\t\n")
    with caplog.at_level(logging.WARNING, logger="hades_gpu.pipelines.ingest"):
        result = TextParallelPipeline(config(), embedder=embedder).process_batch([corpus], output=out)
    assert result.documents_removed == 3 and result.documents_unchanged == 1
    after = read_chunks(out, ["path"]).column("path").to_pylist()
    assert {Path(p).name for p in after} == {"d.md"} and after.count(str(corpus / "d.md")) == before.count(
        str(corpus / "d.md"))
    assert sorted(read_documents(out).column("rel_path").to_pylist()) == ["d.md"]
    lines = [r.getMessage() for r in caplog.records if "no longer a document" in r.getMessage()]
    assert len(lines) == 1 and "removed 3 document(s)" in lines[0]
    assert_exactly_once(out)

    (corpus / "a.md").write_text(texts["a"])  # written again: back, once
    result = TextParallelPipeline(config(), embedder=embedder).process_batch([corpus], output=out)
    assert result.documents_ingested == 1 and result.documents_removed == 0
    assert {Path(p).name for p in read_chunks(out, ["path"]).column("path").to_pylist()} == {"a.md", "d.md"}
    assert_exactly_once(out)


def test_a_subfolder_or_a_parent_given_later_keeps_each_files_identity(tmp_path, embedder):
    """`corpus=c6` then `corpus=c6/sub` into one output named `c6/sub/x.txt` "sub/x.txt" and then
    "x.txt": a second copy of its chunks. A file already in the output keeps its identity, found
    by its absolute path, in both directions and for a file given alone."""
    root = tmp_path / "c6"
    (root / "sub").mkdir(parents=True)
    (root / "top.md").write_text("# Top\n\n" + "The top level says hello. " * 40)
    (root / "sub" / "x.md").write_text("# Sub\n\n" + "The subfolder says hello. " * 40)

    def rels(out):
        return sorted(read_documents(out, ["rel_path"]).column("rel_path").to_pylist())

    out = tmp_path / "down"
    TextParallelPipeline(config(), embedder=embedder).process_batch([root], output=out)
    again = TextParallelPipeline(config(), embedder=embedder).process_batch([root / "sub"], output=out)
    assert again.documents_unchanged == 1 and again.documents_ingested == 0
    alone = TextParallelPipeline(config(), embedder=embedder).process_batch([root / "sub" / "x.md"], output=out)
    assert alone.documents_unchanged == 1 and alone.documents_ingested == 0
    (root / "sub" / "x.md").write_text("# Sub\n\n" + "The subfolder now says goodbye. " * 40)
    edited = TextParallelPipeline(config(), embedder=embedder).process_batch([root / "sub"], output=out)
    assert edited.documents_ingested == 1 and rels(out) == ["sub/x.md", "top.md"]
    texts = " ".join(read_chunks(out, ["text"]).column("text").to_pylist())
    assert "goodbye" in texts and "subfolder says hello" not in texts  # replaced, not added
    assert_exactly_once(out)

    up = tmp_path / "up"
    TextParallelPipeline(config(), embedder=embedder).process_batch([root / "sub"], output=up)
    parent = TextParallelPipeline(config(), embedder=embedder).process_batch([root], output=up)
    assert parent.documents_unchanged == 1 and parent.documents_ingested == 1
    assert rels(up) == ["top.md", "x.md"]
    assert_exactly_once(up)

    # a name the run gives another file stays that file's: sub/sub/x.md is "sub/x.md" in a run of sub
    (root / "sub" / "sub").mkdir()
    (root / "sub" / "sub" / "x.md").write_text("# Deeper\n\n" + "The deeper folder speaks. " * 40)
    deeper = TextParallelPipeline(config(), embedder=embedder).process_batch([root / "sub"], output=out)
    assert deeper.documents_ingested == 2 and rels(out) == ["sub/x.md", "top.md", "x.md"]
    assert_exactly_once(out)


def test_multirun_over_two_profiles(sample_corpus, tmp_path):
    out = tmp_path / "sweep"
    proc = _run_ingest(["-m", "profile=balanced,low_memory", f"corpus={sample_corpus}", f"output={out}", *FAST])
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, output
    jobs = sorted(p for p in out.iterdir() if p.is_dir() and is_ingest_output(p))
    assert len(jobs) == 2
    assert jobs[0].name.startswith("0_") and "profile=balanced" in jobs[0].name
    assert jobs[1].name.startswith("1_") and "profile=low_memory" in jobs[1].name
    counts = [len(read_chunks(j)) for j in jobs]
    assert counts[0] == counts[1] > 0
    profiles = [json.loads((j / "metrics.json").read_text())["config"]["profile"]["name"] for j in jobs]
    assert profiles == ["balanced", "low_memory"]


def test_bad_override_is_one_line_naming_the_key(tmp_path):
    proc = _run_ingest([f"corpus={tmp_path}", f"output={tmp_path / 'o'}", "profile.high_watermark=2.0"])
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert "profile.low_watermark/high_watermark must be 0 < low < high <= 1" in output
    assert "Traceback" not in output


class FailingEmbedder:
    """Injected fault: an embedder that fails on its third batch (a runtime crash we cannot cause for real)."""

    def __init__(self, inner):
        self.inner, self.calls = inner, 0
        self.dim, self.concurrency, self.max_batch_size = inner.dim, inner.concurrency, 0
        self.description = "failing"

    def embed(self, ids, mask):
        self.calls += 1
        if self.calls == 3:
            raise RuntimeError("runtime crashed")
        return self.inner.embed(ids, mask)

    def close(self):
        pass


def test_stage_failure_stops_pipeline_then_rerun_completes(tmp_path, embedder):
    corpus = copy_files(stdlib_sources(30), tmp_path / "corpus")
    out = tmp_path / "out"
    cfg = config("profile.max_batch_tokens=1024", "profile.writer_rows_per_part=10", profile="low_memory")
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="runtime crashed"):
        TextParallelPipeline(cfg, embedder=FailingEmbedder(embedder)).process_batch([corpus], output=out)
    assert time.monotonic() - start < 120
    result = TextParallelPipeline(cfg, embedder=embedder).process_batch([corpus], output=out)
    assert result.documents_ingested + result.documents_unchanged == 30
    assert_exactly_once(out)


@pytest.mark.parametrize("writer", ["thread", "process"])
def test_a_failed_run_releases_the_output_while_its_traceback_is_kept(tmp_path, embedder, writer):
    """A notebook keeps the last traceback (`sys.last_traceback`), and with it the failed run's
    writer: the output stayed locked (and its manifest open), so another thread of the kernel was
    refused it until the traceback went. A failed run now ends its writer before raising."""
    import threading

    corpus = copy_files(stdlib_sources(4), tmp_path / "corpus")
    out = tmp_path / "out"
    cfg = config(f"profile.writer={writer}")
    try:
        TextParallelPipeline(cfg, embedder=FailingEmbedder(embedder)).process_batch([corpus], output=out)
    except RuntimeError as err:
        kept = err  # the traceback, and every frame of the failed run, stay alive
    assert "runtime crashed" in str(kept)
    results: list = []
    other = threading.Thread(target=lambda: results.append(
        TextParallelPipeline(cfg, embedder=embedder).process_batch([corpus], output=out)))
    other.start()
    other.join(timeout=300)
    assert results and results[0].documents_ingested == 4, "another thread was refused the output"
    assert_exactly_once(out)
    del kept


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a box without CUDA")
def test_workers_start_before_the_embedder_loads_and_none_outlive_a_failed_load(sample_corpus, tmp_path):
    """The workers are launched first (they warm up while the model loads); when the embedder then
    fails to load (here: gpu.device=cuda:0 on a box without CUDA, a real DeviceError), the run
    raises that one error and no worker process is left behind."""
    import psutil

    from hades_gpu.gpu.device import DeviceError
    from hades_gpu.orchestration import workers

    me = psutil.Process()
    before = {p.pid for p in me.children(recursive=True)}
    launched: list[int] = []
    real_launch_init = workers.WorkerLaunch.__init__

    def recording_init(self, *args, **kw):
        real_launch_init(self, *args, **kw)
        launched.extend(self.pids())

    with pytest.MonkeyPatch.context() as mp:  # observes the launch; every process is real
        mp.setattr(workers.WorkerLaunch, "__init__", recording_init)
        with pytest.raises(DeviceError, match="cuda:0 requested"):
            TextParallelPipeline(config("gpu.device=cuda:0")).process_batch([sample_corpus], output=tmp_path / "out")
    assert len(launched) == 2  # balanced: 2 workers, started before the embedder was built
    left = [p for p in me.children(recursive=True) if p.pid not in before and p.status() != psutil.STATUS_ZOMBIE]
    assert not left, [(p.pid, p.cmdline()) for p in left]
    assert not any(psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE for pid in launched)


def test_process_batch_without_an_output_is_refused_and_writes_nothing(sample_corpus, tmp_path, monkeypatch):
    """`config.output` unset and no `output=`: it wrote the output into the working directory
    (Path("") is "."); now `ConfigError`, nothing written there."""
    from hades_gpu.config import ConfigError

    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    cfg = config()
    cfg.output = None
    for output in (None, "", "  "):
        with pytest.raises(ConfigError, match="an output folder is required"):
            TextParallelPipeline(cfg).process_batch([sample_corpus], output=output)
    assert list(work.iterdir()) == []


def test_an_output_that_is_the_corpus_folder_is_refused_and_the_corpus_stays_ingestable(sample_corpus, tmp_path):
    from hades_gpu.config import ConfigError

    before = sorted(p.relative_to(sample_corpus) for p in sample_corpus.rglob("*"))
    for output in (sample_corpus, str(sample_corpus) + "/", sample_corpus / "sub" / ".."):
        with pytest.raises(ConfigError, match="is the corpus folder"):
            TextParallelPipeline(config()).process_batch([sample_corpus], output=output)
    assert sorted(p.relative_to(sample_corpus) for p in sample_corpus.rglob("*")) == before
    result = TextParallelPipeline(config()).process_batch([sample_corpus], output=tmp_path / "out")
    assert result.documents_ingested > 0 and not any(s["reason"] == "output_folder" for s in result.skipped)


def test_run_errors_cross_a_process_pool_as_themselves(tmp_path):
    """In a process pool (multiprocessing spawn, as joblib/loky and `Pool.map` use), the job's
    `NothingIngestedError` / `OutputLockedError` reach the caller as themselves: they failed to
    unpickle, which broke the pool (BrokenProcessPool) or killed its result thread (a hang)."""
    import multiprocessing
    import pickle
    from concurrent.futures import ProcessPoolExecutor

    from corpus_helpers import ingest_in_a_child
    from hades_gpu.pipelines.ingest import NothingIngestedError
    from hades_gpu.store.lock import OutputLock, OutputLockedError

    corpus = tmp_path / "binary-only"
    corpus.mkdir()
    (corpus / "blob.bin").write_bytes(bytes(range(256)) * 64)
    locked = tmp_path / "locked"
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        with pytest.raises(NothingIngestedError, match="nothing ingested") as caught:
            pool.submit(ingest_in_a_child, str(corpus), str(tmp_path / "out")).result(timeout=300)
        assert caught.value.result.skipped and caught.value.result.skipped[0]["reason"] == "binary"
        with OutputLock(locked, "s0"):
            with pytest.raises(OutputLockedError, match="is in use by PID") as held:
                pool.submit(ingest_in_a_child, str(corpus), str(locked)).result(timeout=300)
        assert held.value.pid == os.getpid() and held.value.shard == "s0"
    err = pickle.loads(pickle.dumps(held.value))
    assert (str(err), err.output, err.holder) == (str(held.value), held.value.output, held.value.holder)


def _two_projects(tmp_path: Path) -> tuple[Path, Path]:
    for name in ("projA", "projB"):
        (tmp_path / "src" / name).mkdir(parents=True)
        (tmp_path / "src" / name / "README.md").write_text(f"# {name}\n\nThe {name} project reads and writes files.\n")
    return tmp_path / "src" / "projA", tmp_path / "src" / "projB"


def test_one_output_from_two_folders_keeps_both_readmes_with_documents_root(tmp_path, caplog):
    """Filling one output from several folders in turn: without `documents.root` the second
    README.md replaces the first (their identity is the path relative to the folder given) and a
    warning line says so; with `documents.root` set to their parent both are kept, and a single
    edited file given alone replaces its own document instead of adding a second copy."""
    import logging

    a, b = _two_projects(tmp_path)
    out = tmp_path / "plain"
    TextParallelPipeline(config()).process_batch([a], output=out)
    with caplog.at_level(logging.WARNING, logger="hades_gpu.store.writer"):
        TextParallelPipeline(config()).process_batch([b], output=out)
    assert read_documents(out, ["rel_path"]).column("rel_path").to_pylist() == ["README.md"]
    warned = [r.getMessage() for r in caplog.records if "replaced by a file of another folder" in r.getMessage()]
    assert len(warned) == 1 and str(a / "README.md") in warned[0] and str(b / "README.md") in warned[0], warned

    out = tmp_path / "rooted"
    rooted = config(f"documents.root={tmp_path / 'src'}")
    TextParallelPipeline(rooted).process_batch([a], output=out)
    TextParallelPipeline(rooted).process_batch([b], output=out)
    assert sorted(read_documents(out, ["rel_path"]).column("rel_path").to_pylist()) == ["projA/README.md", "projB/README.md"]
    (a / "README.md").write_text("# projA\n\nEdited: the project now also deletes files.\n")
    result = TextParallelPipeline(rooted).process_batch([a / "README.md"], output=out)
    assert result.documents_ingested == 1
    table = assert_exactly_once(out)
    docs = read_documents(out, ["rel_path", "doc_id"]).to_pandas()
    assert sorted(docs.rel_path) == ["projA/README.md", "projB/README.md"]
    texts = read_chunks(out, ["text"]).column("text").to_pylist()
    assert any("deletes files" in t for t in texts) and len(table) == len(texts)


def test_the_same_folder_named_twice_is_walked_once(sample_corpus, tmp_path):
    once = TextParallelPipeline(config()).process_batch([sample_corpus], output=tmp_path / "once")
    twice = TextParallelPipeline(config()).process_batch([sample_corpus, str(sample_corpus) + "/", sample_corpus],
                                                         output=tmp_path / "twice")
    assert (twice.documents_total, twice.chunks_written) == (once.documents_total, once.chunks_written)
    assert sorted(s["reason"] for s in twice.skipped) == sorted(s["reason"] for s in once.skipped)


def test_the_code_pipeline_on_a_text_pipelines_output_is_refused(sample_corpus, tmp_path):
    """`CodeParallelPipeline` chunks every file as code: on an output the text pipeline made it found
    every document unchanged and kept prose chunks, and an edited file then got code chunks beside
    the others' prose ones. It is a setting of the output now, as `chunking.*` is (an output recorded
    before the setting existed takes the first run's)."""
    import json
    import sqlite3

    from hades_gpu.store.manifest import SettingsChangedError, manifest_path

    out = tmp_path / "out"
    TextParallelPipeline(config()).process_batch([sample_corpus], output=out)
    with pytest.raises(SettingsChangedError, match=r"chunking.modality='by_extension' \(this run: 'code'\)"):
        CodeParallelPipeline(config()).process_batch([sample_corpus], output=out)
    # an output recorded without the key (made before it existed): the next run's value is recorded
    with sqlite3.connect(manifest_path(out, "s0")) as db:
        settings = json.loads(db.execute("SELECT value FROM meta WHERE key = 'settings'").fetchone()[0])
        del settings["chunking.modality"]
        db.execute("UPDATE meta SET value = ? WHERE key = 'settings'", (json.dumps(settings),))
    TextParallelPipeline(config()).process_batch([sample_corpus], output=out)
    assert Manifest.load(out, "s0").settings()["chunking.modality"] == "by_extension"


def test_two_by_hand_shard_names_over_one_corpus_write_each_chunk_once(sample_corpus, tmp_path):
    """`shard=abc` then the default `s0` over the same corpus wrote every chunk twice (one manifest
    each, both complete); the second name now skips what the first committed, as ``duplicate``
    naming it, and ingests only what no other name has."""
    from hades_gpu.pipelines.ingest import NothingIngestedError

    out = tmp_path / "out"
    first = TextParallelPipeline(config("shard=abc")).process_batch([sample_corpus], output=out)
    assert first.documents_ingested > 0
    with pytest.raises(NothingIngestedError, match=rf"\({first.documents_ingested} duplicate") as caught:
        TextParallelPipeline(config()).process_batch([sample_corpus], output=out)
    assert all("already in this output under shard 'abc'" in s["detail"]
               for s in caught.value.result.skipped if s["reason"] == "duplicate")
    (sample_corpus / "new.md").write_text("# New\n\nA document only the second name has.\n")
    second = TextParallelPipeline(config()).process_batch([sample_corpus], output=out)
    assert second.documents_ingested == 1
    assert sum(s["reason"] == "duplicate" for s in second.skipped) == first.documents_ingested
    table = read_chunks(out, ["chunk_id", "path"]).to_pandas()
    assert table.chunk_id.is_unique and len(table) == first.chunks_written + second.chunks_written


def test_a_document_another_names_run_in_progress_claimed_is_skipped_and_a_dead_claim_taken_over(sample_corpus,
                                                                                                 tmp_path):
    """Two by-hand names at once each found nothing committed by the other and wrote every chunk
    twice. A run claims what it is about to ingest (store/claims.py); another name's live run (its
    lock held) keeps its claims, a claim whose run has ended is taken over."""
    from hades_gpu.pipelines.ingest import NothingIngestedError
    from hades_gpu.store.claims import claim_documents, claims_path
    from hades_gpu.store.lock import OutputLock

    out = tmp_path / "out"
    out.mkdir()
    rel_paths = sorted(str(p.relative_to(sample_corpus)) for p in sample_corpus.rglob("*") if p.is_file())
    assert claim_documents(out, "other", rel_paths, running=set()) == {}
    with OutputLock(out, "other"):  # the other name's run is in progress
        with pytest.raises(NothingIngestedError, match="duplicate") as caught:
            TextParallelPipeline(config("shard=mine")).process_batch([sample_corpus], output=out)
    details = [s["detail"] for s in caught.value.result.skipped if s["reason"] == "duplicate"]
    assert details and all("being ingested now into this output by the run of shard 'other'" in d for d in details)
    # the other run has ended without committing them: its claims are stale, this run takes them
    result = TextParallelPipeline(config("shard=mine")).process_batch([sample_corpus], output=out)
    assert result.documents_ingested == len(details)
    assert_exactly_once(out)
    with sqlite3.connect(claims_path(out)) as conn:  # a finished run leaves no claims of its own
        assert conn.execute("SELECT count(*) FROM claims WHERE shard = 'mine'").fetchone() == (0,)


def test_a_damaged_claims_file_is_made_anew_or_named_while_another_run_goes(tmp_path, embedder, caplog):
    """claims.sqlite overwritten with garbage failed every later run that had a new document, as
    "manifest database error" (the manifest was intact). It only holds the claims of runs in
    progress: with no other run going it is made anew (one warning); while another name's run goes
    (its lock held) the error names the file and says when to delete it."""
    import logging

    from hades_gpu.cli import classify_error
    from hades_gpu.store.claims import ClaimsDamagedError, claim_documents, claims_path
    from hades_gpu.store.lock import OutputLock

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.md").write_text("# A\n\nfirst document.\n")
    out = tmp_path / "out"
    TextParallelPipeline(config(), embedder=embedder).process_batch([corpus], output=out)
    claims_path(out).write_bytes(os.urandom(8192))
    with pytest.raises(ClaimsDamagedError, match="claims.sqlite is damaged .*delete it once no run is writing") as info:
        claim_documents(out, "s0", ["b.md"], running={"other"})
    assert classify_error(info.value)[0] == 1 and "shards running now: other" in str(info.value)

    # a run with nothing new claims nothing: no warning about a file it does not need (one each run)
    with caplog.at_level(logging.WARNING):
        assert TextParallelPipeline(config(), embedder=embedder).process_batch([corpus], output=out).documents_unchanged == 1
    assert not [r for r in caplog.records if "claims" in r.getMessage()]
    caplog.clear()

    (corpus / "b.md").write_text("# B\n\na new document.\n")
    with caplog.at_level(logging.WARNING, logger="hades_gpu.store.claims"):
        result = TextParallelPipeline(config(), embedder=embedder).process_batch([corpus], output=out)
    assert result.documents_ingested == 1 and result.documents_unchanged == 1
    assert any("claims.sqlite is damaged" in r.getMessage() and "made anew" in r.getMessage() for r in caplog.records)
    assert_exactly_once(out)
    with OutputLock(out, "other"):  # another name's run is going: its claims must not be dropped
        claims_path(out).write_bytes(b"SQLite format 3\x00" + os.urandom(4096))
        (corpus / "c.md").write_text("# C\n\nanother new document.\n")
        with pytest.raises(ClaimsDamagedError):
            TextParallelPipeline(config("shard=mine"), embedder=embedder).process_batch([corpus], output=out)
    claims_path(out).unlink()
    claims_path(out).mkdir()  # a folder there: named, not "manifest database error"
    with pytest.raises(ClaimsDamagedError, match="claims.sqlite is not a file: remove it"):
        TextParallelPipeline(config(), embedder=embedder).process_batch([corpus], output=out)


def test_two_by_hand_names_at_once_over_one_corpus_write_each_chunk_once(tmp_path):
    """Real processes started together: each document is ingested by one of them."""
    corpus = copy_files(stdlib_sources(24), tmp_path / "corpus")
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    runs = [subprocess.Popen([sys.executable, "-m", "hades_gpu.ingest", f"corpus={corpus}", f"output={out}",
                              f"shard={name}", "profile.num_workers=1", *FAST], cwd=REPO, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for name in ("x", "y")]
    for run in runs:
        stdout, stderr = run.communicate(timeout=300)
        assert run.returncode in (0, 1), stderr[-2000:]  # 1: every document was the other's
    table = assert_exactly_once(out)
    assert len(set(read_chunks(out, ["path"]).column("path").to_pylist())) == 24
    assert len(table) == len(read_chunks(out, ["chunk_id"]))


def test_workers_that_cannot_start_end_the_run_with_one_error(sample_corpus, tmp_path, monkeypatch):
    """Workers whose environment is broken (here a `numpy` on PYTHONPATH that fails to import, which
    the main process, already running, does not see) die at start-up: the run ends with
    `WorkerStartError` (one line, exit 1 from the CLI) instead of restarting them forever."""
    from hades_gpu.orchestration.workers import WorkerStartError

    broken = tmp_path / "broken" / "numpy"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text("raise ImportError('numpy is broken in this environment')\n")
    monkeypatch.setenv("PYTHONPATH", str(broken.parent))
    with pytest.raises(WorkerStartError, match="die before their first document"):
        TextParallelPipeline(config()).process_batch([sample_corpus], output=tmp_path / "out")


def test_slabs_are_page_locked_only_for_an_embedder_that_copies_them_to_cuda(sample_corpus, tmp_path, embedder,
                                                                              monkeypatch):
    """Pinning (cudaHostRegister) is asked for by a CUDA embedder only, not by torch being importable:
    a CPU or Triton embedder in a process that imported torch pinned the ring and made a CUDA context.
    Without a GPU the registration itself is recorded instead (the only way to see it here)."""
    import hades_gpu.gpu.slabs as slabs

    asked: list[int] = []

    def record(mapping) -> bool:
        asked.append(mapping.nbytes)
        return False  # not pinned: the run goes on with plain shared memory

    monkeypatch.setattr(slabs, "_register_pinned", record)
    TextParallelPipeline(config(), embedder=embedder).process_batch([sample_corpus], output=tmp_path / "cpu")
    assert asked == []
    cuda_like = RecordingEmbedder(embedder)
    cuda_like.cuda = True  # what CudaEmbedder on a GPU says
    result = TextParallelPipeline(config(), embedder=cuda_like).process_batch([sample_corpus], output=tmp_path / "gpu")
    assert len(asked) == 1 and asked[0] > 0 and result.chunks_written > 0


def test_a_home_relative_or_relative_output_is_one_folder_wherever_the_caller_goes(sample_corpus, tmp_path,
                                                                                   embedder, monkeypatch):
    """``~/out``: pyarrow expanded "~" and Python did not, so manifest and lock went to ./~/out and
    the parts to $HOME/out. The API, search, verify, ISNE and the CLI all read "~" as a shell does."""
    from hades_gpu.pipelines import ISNETrainingPipeline
    from hades_gpu.retrieval.search import Searcher
    from hades_gpu.store.verify import verify_output

    home, cwd = tmp_path / "home", tmp_path / "cwd"
    home.mkdir()
    cwd.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(cwd)
    shutil.copytree(sample_corpus, home / "docs")
    result = TextParallelPipeline(config(), embedder=embedder).process_batch(["~/docs"], output="~/out")
    assert result.output_dir == home / "out" and result.chunks_written > 0
    assert not (cwd / "~").exists()
    assert_exactly_once(home / "out")
    assert verify_output("~/out").ok
    with Searcher("~/out", config(), embedder=embedder) as searcher:
        assert searcher.search("area of a circle", k=2).hits
    rel = TextParallelPipeline(config(), embedder=embedder).process_batch(["../home/docs"], output="rel")
    assert rel.output_dir == cwd / "rel"
    trained = ISNETrainingPipeline(config("isne.enabled=true", "isne.resume=false")).train(corpus_path="rel", epochs=1)
    monkeypatch.chdir(tmp_path)  # the caller moves on: the result's paths still name the files
    assert trained.output_dir == cwd / "rel" and trained.embeddings_path.is_file()
    env = {**os.environ, "HOME": str(home), "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "hades_gpu.ingest", "corpus=~/docs", "output=~/cli", *FAST],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert_exactly_once(home / "cli")
    assert (home / "cli" / ".hydra").is_dir() and not (cwd / "~").exists()


def test_chunk_source_reads_the_documents_table_once_per_commit(tmp_path, embedder, monkeypatch):
    """The README checks every chunk with chunk_source: each call read and scanned the whole documents
    table (0.13 s a call at 20k documents; a 20k-document check had not finished in 10 minutes). It
    is read once per committed state now, and a later commit is seen."""
    import hades_gpu.store.reader as reader

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(5):
        (corpus / f"d{i}.md").write_text(f"Document {i} talks about topic {i} at some length.\n" * 3)
    out = tmp_path / "out"
    TextParallelPipeline(config(), embedder=embedder).process_batch([corpus], output=out)
    reads = []
    real = reader.read_documents
    monkeypatch.setattr(reader, "read_documents", lambda *a, **k: reads.append(1) or real(*a, **k))
    rows = read_chunks(out, ["doc_id", "path", "char_start", "char_end", "text"]).to_pylist()
    for row in rows * 3:
        assert chunk_source(out, row["doc_id"])[row["char_start"]:row["char_end"]] == row["text"]
        assert chunk_source(out, row["path"])[row["char_start"]:row["char_end"]] == row["text"]
    assert len(reads) == 1
    (corpus / "new.md").write_text("A new document about something else entirely.\n")
    TextParallelPipeline(config(), embedder=embedder).process_batch([corpus], output=out)
    assert chunk_source(out, "new.md") == "A new document about something else entirely.\n" and len(reads) == 2


def test_nothing_ingested_names_a_document_not_the_runs_own_output_folder(tmp_path, embedder):
    """Output inside the corpus, the only document empty: the line said "all 2 document(s) ... (1
    output_folder, 1 empty); first: .../out: output_folder" (a user's find)."""
    from hades_gpu.pipelines.ingest import NothingIngestedError

    corpus = tmp_path / "c"
    corpus.mkdir()
    (corpus / "empty.md").write_text("")
    with pytest.raises(NothingIngestedError) as caught:
        TextParallelPipeline(config(), embedder=embedder).process_batch([corpus], output=corpus / "out")
    line = str(caught.value)
    assert "all 1 document(s)" in line and "(1 empty)" in line and "empty.md: empty" in line, line
    assert "output_folder" not in line
