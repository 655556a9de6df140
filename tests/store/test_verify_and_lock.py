"""Issue 13, "nothing lost, ever": committed parts verified at every start (a deleted, truncated or
altered part is named in one line and its documents ingested again), `hades-verify`, and the output
lock (a second run refuses naming the holder; a dead holder's lock is taken over). Real files, real
worker processes, real signals; a stand-in embedder (`ZeroCostEmbedder`) where the model is not the point."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from corpus_helpers import REPO
from store_faults import assert_same_chunks_exactly_once, chunk_rows, ingest, ingest_subprocess, snapshot, write_corpus

from hades_gpu.store.lock import OutputLockedError, lock_output, read_holder
from hades_gpu.store.manifest import Manifest
from hades_gpu.store.verify import main as verify_main, verify_output


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    """(corpus, a clean output of it, its (path, ordinal, text) rows): built once for the module."""
    root = tmp_path_factory.mktemp("clean")
    corpus = write_corpus(root / "corpus")
    out = root / "out"
    ingest(corpus, out)
    return corpus, out, chunk_rows(out)


def _copy(out: Path, dest: Path) -> Path:
    shutil.copytree(out, dest, copy_function=shutil.copy2)
    (dest / ".lock-s0").unlink(missing_ok=True)
    return dest


def _warnings(caplog, word: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and word in r.getMessage()]


def test_deleted_truncated_and_altered_parts_are_named_once_and_their_documents_come_back(clean, tmp_path, caplog):
    corpus, clean_out, reference = clean
    out = _copy(clean_out, tmp_path / "out")
    parts = Manifest.load(out, "s0").parts()
    assert len(parts) >= 4, parts
    deleted, truncated, flipped, flipped_mtime = parts[0], parts[1], parts[2], parts[3]
    (out / "chunks" / f"{deleted}.parquet").unlink()
    with open(out / "documents" / f"{truncated}.parquet", "r+b") as fh:
        fh.truncate(os.path.getsize(fh.name) // 2)
    for part, keep_mtime in ((flipped, False), (flipped_mtime, True)):  # one bit of a text data page
        path = out / "chunks" / f"{part}.parquet"
        st = path.stat()
        text = pq.ParquetFile(path).metadata.row_group(0).column(8)
        data = bytearray(path.read_bytes())
        data[text.data_page_offset + text.total_compressed_size // 2] ^= 0x01
        path.write_bytes(bytes(data))
        if keep_mtime:  # the mtime set back: the ctime still tells (os.utime cannot set it)
            os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))

    # hades-verify first: one line per problem, exit 1, and the output is left exactly as it was
    before = snapshot(out)
    proc = subprocess.run([sys.executable, "-m", "hades_gpu.store.verify", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 4, lines
    assert any(deleted in line and "missing" in line for line in lines)
    assert any(truncated in line and "size" in line for line in lines)
    assert sum("checksum mismatch" in line for line in lines) == 2, lines
    assert snapshot(out) == before

    # the next run: each damaged part named in exactly one warning line, then every chunk exactly once
    caplog.set_level(logging.INFO)
    result = ingest(corpus, out)
    for part in (deleted, truncated, flipped, flipped_mtime):
        named = _warnings(caplog, part)
        assert len(named) == 1, named
        assert "this run ingests again those its corpus holds" in named[0]
    assert result.documents_ingested >= 4 and result.documents_unchanged == 8 - result.documents_ingested
    assert_same_chunks_exactly_once(out, reference)
    assert verify_main([str(out)]) == 0


def test_hades_verify_on_a_clean_output_and_bad_arguments(clean, tmp_path, capsys):
    _, clean_out, _ = clean
    out = _copy(clean_out, tmp_path / "out")
    before = snapshot(out)
    report = verify_output(out)
    assert report.ok and report.parts_checked == len(Manifest.load(clean_out, "s0").parts())
    assert report.bytes_hashed == sum((p.stat().st_size for p in out.glob("*/part-*.parquet")))
    assert verify_main([str(out)]) == 0 and capsys.readouterr().out == ""
    assert verify_main([str(out), "--quick"]) == 0
    assert snapshot(out) == before
    assert verify_main([str(tmp_path / "nowhere")]) == 2
    assert f"{tmp_path / 'nowhere'} does not exist" in capsys.readouterr().err  # not "is not an ingest output"
    assert verify_main([str(tmp_path)]) == 2
    assert "not an ingest output (no manifest in it)" in capsys.readouterr().err
    # parts without their manifest: said to be that (it read as a folder that was never an output)
    orphan = _copy(clean_out, tmp_path / "orphan")
    for manifest in orphan.glob("manifest-*.sqlite"):
        manifest.unlink()
    assert verify_main([str(orphan)]) == 2
    assert "its chunks/ parts are there but no manifest-*.sqlite: the manifest was deleted or moved" \
        in capsys.readouterr().err
    from hades_gpu.pipelines.isne_training import ISNETrainingPipeline
    from hades_gpu.retrieval.search import Searcher, SearchError

    with pytest.raises(SearchError, match="the manifest was deleted or moved"):
        Searcher(orphan)
    with pytest.raises(Exception, match="the manifest was deleted or moved"):
        ISNETrainingPipeline().train(corpus_path=orphan)
    assert verify_main(["--no-such-flag"]) == 2
    # quick (a run's start) trusts an unchanged stat; full finds bytes changed beneath it
    (out / "chunks" / "part-s0-00001.parquet").unlink()
    assert verify_main([str(out), "--quick"]) == 1
    assert capsys.readouterr().out.count("\n") == 1


HOLDER = """
import sys, time
from hades_gpu.store.lock import lock_output
lock = lock_output(sys.argv[1], sys.argv[2])
print("locked", flush=True)
time.sleep(120)
"""


def _holder(out: Path, shard: str = "s0") -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(out), shard], cwd=REPO, stdout=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONPATH": os.environ.get("PYTHONPATH", str(REPO))})
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_second_run_refuses_naming_the_holder_and_a_killed_holders_lock_is_taken_over(clean, tmp_path, caplog):
    corpus, clean_out, reference = clean
    out = _copy(clean_out, tmp_path / "out")
    parts_before = sorted(p.name for p in (out / "chunks").iterdir())
    holder = _holder(out)
    try:
        t0 = time.monotonic()
        with pytest.raises(OutputLockedError) as err:
            ingest(corpus, out)
        assert time.monotonic() - t0 < 5  # at once, not after discovery or a wait
        message = str(err.value)
        assert "\n" not in message and f"PID {holder.pid}" in message and socket.gethostname() in message
        assert err.value.pid == holder.pid and isinstance(err.value, RuntimeError)
        assert sorted(p.name for p in (out / "chunks").iterdir()) == parts_before  # nothing touched
        with lock_output(out, "s1"):  # another shard of the same output is free
            pass
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    assert read_holder(out / ".lock-s0")["pid"] == holder.pid  # the dead run's record is still there
    caplog.set_level(logging.INFO, logger="hades_gpu.store.lock")
    result = ingest(corpus, out)  # taken over: the kernel dropped the dead holder's flock
    assert result.documents_unchanged == 8
    assert any(f"left by PID {holder.pid}" in r.getMessage() for r in caplog.records)
    assert_same_chunks_exactly_once(out, reference)


FORKING_HOLDER = """
import os, sys, time
from hades_gpu.store.lock import lock_output
lock = lock_output(sys.argv[1], "s0")
child = os.fork()
if child == 0:  # inherits the locked descriptor and outlives the holder
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 1)
    os.dup2(null, 2)  # (not the test's pipes, which would keep it waiting)
    time.sleep(120)
    os._exit(0)
print(child, flush=True)
os._exit(0)
"""


def test_a_lock_whose_holder_died_but_a_forked_child_keeps_the_descriptor_is_taken_over(tmp_path):
    proc = subprocess.run([sys.executable, "-c", FORKING_HOLDER, str(tmp_path)], cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    child = int(proc.stdout.strip())
    try:
        dead = read_holder(tmp_path / ".lock-s0")["pid"]
        assert dead != child
        with lock_output(tmp_path, "s0") as lock:  # the writer is dead on this host: replaced
            assert read_holder(lock.path)["pid"] == os.getpid()
    finally:
        os.kill(child, signal.SIGKILL)


def test_another_thread_of_the_same_process_is_refused_like_another_process(tmp_path):
    """The flock belongs to the process, so a second thread used to get in (counted as a re-entry)
    and race the first for the same part files. The owning thread may still re-enter."""
    import threading

    from hades_gpu.store.lock import OutputLock

    out = tmp_path / "out"
    with OutputLock(out, "s0"):
        with OutputLock(out, "s0"):  # re-entry by the holding thread (pipeline, then its writer)
            pass
        caught: list[BaseException] = []

        def other() -> None:
            try:
                OutputLock(out, "s0").acquire()
            except BaseException as err:  # noqa: BLE001 - handed to the test's thread
                caught.append(err)

        t = threading.Thread(target=other, name="second-ingest")
        t.start()
        t.join()
        assert len(caught) == 1 and isinstance(caught[0], OutputLockedError)
        assert f"PID {os.getpid()}" in str(caught[0]) and "MainThread" in str(caught[0])
    done = threading.Thread(target=lambda: OutputLock(out, "s0").acquire().release())
    done.start()
    done.join()  # released: any thread may take it now


def test_two_threads_ingesting_into_one_output_one_is_refused_and_each_chunk_is_written_once(tmp_path, embedder):
    import threading

    from hades_gpu.config import load_pipeline_config
    from hades_gpu.pipelines import TextParallelPipeline
    from hades_gpu.store.reader import read_chunks

    corpus = write_corpus(tmp_path / "corpus")
    out = tmp_path / "out"
    config = load_pipeline_config("low_memory", ["isne.enabled=false", "monitoring.progress=off"])
    barrier = threading.Barrier(2)
    outcomes: list[object] = []

    def run() -> None:
        barrier.wait()
        try:
            outcomes.append(TextParallelPipeline(config, embedder=embedder).process_batch([corpus], output=out))
        except BaseException as err:  # noqa: BLE001 - handed to the test's thread
            outcomes.append(err)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    refused = [o for o in outcomes if isinstance(o, OutputLockedError)]
    assert len(outcomes) == 2 and len(refused) == 1, outcomes
    ids = read_chunks(out, ["chunk_id"]).column("chunk_id").to_pylist()
    assert ids and len(ids) == len(set(ids))
    assert verify_output(out).ok


def test_isne_training_is_refused_while_another_thread_ingests_into_the_output(tmp_path, embedder):
    """`train()` while a thread of the same process was still ingesting: it trained on the chunks
    committed so far (69 of 1351) and said nothing; the lock check left out every lock of this process,
    not only the calling thread's own."""
    import threading

    from hades_gpu.config import load_pipeline_config
    from hades_gpu.pipelines import ISNETrainingPipeline, TextParallelPipeline
    from hades_gpu.store.lock import OutputLock, held_elsewhere

    out = tmp_path / "out"
    config = load_pipeline_config("low_memory", ["isne.enabled=false", "monitoring.progress=off"])
    TextParallelPipeline(config, embedder=embedder).process_batch([write_corpus(tmp_path / "corpus")], output=out)
    taken, done = threading.Event(), threading.Event()

    def ingesting() -> None:  # the lock an ingest holds while it runs
        with OutputLock(out, "s0"):
            taken.set()
            done.wait(60)

    t = threading.Thread(target=ingesting, name="ingest-thread")
    t.start()
    try:
        assert taken.wait(30)
        assert [(shard, holder.get("thread")) for shard, holder in held_elsewhere(out)] == [("s0", "ingest-thread")]
        with pytest.raises(OutputLockedError, match="ingest-thread"):
            ISNETrainingPipeline(config).train(corpus_path=out, epochs=1)
        with OutputLock(out, "s1"):  # this thread's own lock is no other run's
            assert [shard for shard, _ in held_elsewhere(out)] == ["s0"]
    finally:
        done.set()
        t.join()
    assert held_elsewhere(out) == []


def test_hades_verify_takes_output_equals_folder_as_the_other_commands_do(clean, capsys):
    """`hades-verify output=o` said "output=o is not an ingest output" (exit 2)."""
    _, out, _ = clean
    assert verify_main([f"output={out}"]) == 0
    assert "hades-verify: ok" in capsys.readouterr().err


def test_damaged_graph_and_isne_files_are_named_by_hades_verify(search_output, tmp_path, capsys):
    """`edges.parquet` cut short and the ISNE vectors overwritten: verify said "ok", exit 0, while
    search refused the output saying "`hades-verify` names every damaged file"."""
    out = _copy(search_output[0], tmp_path / "out")
    assert verify_main([str(out)]) == 0
    capsys.readouterr()
    edges = out / "edges.parquet"
    edges.write_bytes(edges.read_bytes()[:500])
    vectors = sorted((out / "isne").glob("embeddings-*.parquet"))[0]
    vectors.write_bytes(b"garbage\n")
    model = out / "isne" / "model.safetensors"
    model.write_bytes(model.read_bytes()[:100])
    assert verify_main([str(out)]) == 1
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert len(lines) == 3 and all("unreadable" in ln and "hades-isne" in ln for ln in lines), captured.out
    assert {Path(ln.split(":")[0]).name for ln in lines} == {"edges.parquet", vectors.name, "model.safetensors"}
    assert "damaged: " in captured.err and "3 problem(s)" in captured.err


def test_isne_vectors_that_are_not_finite_are_damage_named_by_verify_and_search_and_inferred_again(
        search_output, tmp_path, capsys, embedder):
    """One ISNE vector overwritten with NaN (schema and metadata kept): verify said "ok", search said
    the chunk "has no ISNE vector (ingested after the last ISNE stage ...)", and an ingest kept it."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from hades_gpu.config import load_pipeline_config
    from hades_gpu.pipelines import TextParallelPipeline
    from hades_gpu.retrieval.search import search
    from hades_gpu.store.reader import DamagedOutputError, read_isne_embeddings

    out, corpus = search_output
    out = _copy(out, tmp_path / "out")
    path = sorted((out / "isne").glob("embeddings-*.parquet"))[0]
    table = pq.read_table(path)
    column = table.column("isne_embedding")
    rows = column.to_pylist()
    rows[3] = [float("nan")] * len(rows[3])
    damaged = table.set_column(table.schema.get_field_index("isne_embedding"), table.schema.field("isne_embedding"),
                               pa.array(rows, type=column.type))
    pq.write_table(damaged.replace_schema_metadata(table.schema.metadata), path)
    assert verify_main([str(out)]) == 1
    captured = capsys.readouterr()
    assert "1 damaged ISNE vector(s)" in captured.out and "hades-isne" in captured.out, captured.out
    with pytest.raises(DamagedOutputError, match="damaged ISNE vector"):
        search(out, "parse the arguments", k=3, expand="isne")
    cfg = load_pipeline_config("balanced", ["monitoring.progress=off", "isne.epochs=3"])
    TextParallelPipeline(cfg, embedder=embedder).process_batch([corpus], output=out)  # nothing changed but the vector
    _, vectors = read_isne_embeddings(out)
    assert np.isfinite(vectors).all() and verify_main([str(out)]) == 0


def test_an_output_whose_shards_have_not_all_finished_is_noted(tmp_path, embedder, capsys):
    """A killed cluster driver leaves some shards unrun: their parts verify, so verify said "ok"
    with no word that the output lacks those shards' files."""
    from corpus_helpers import copy_files, stdlib_sources

    from hades_gpu.config import load_pipeline_config
    from hades_gpu.pipelines import TextParallelPipeline

    corpus = copy_files(stdlib_sources(4, max_bytes=6_000), tmp_path / "corpus")
    out = tmp_path / "out"
    cfg = load_pipeline_config("balanced", ["shard=0/2", "monitoring.progress=off", "isne.enabled=false"])
    TextParallelPipeline(cfg, embedder=embedder).process_batch([corpus], output=out)
    assert verify_main([str(out)]) == 0  # not damage: a note
    err = capsys.readouterr().err
    assert "note: 1 of 2 shard(s) have not finished" in err and "s1of2" in err, err


def test_verify_notes_a_missing_graph_and_only_a_lock_that_someone_holds(clean, tmp_path):
    """"ok" said nothing of an output whose graph and ISNE stage never ran; a lock record left by
    another host's run (no flock held) was reported as a run writing the output."""
    import json

    _, clean_out, _ = clean
    out = _copy(clean_out, tmp_path / "out")
    report = verify_output(out)
    assert report.ok and any("no chunk graph or ISNE vectors yet" in n and f"hades-isne output={out}" in n
                             for n in report.notes), report.notes
    (out / ".lock-s0").write_text(json.dumps({"pid": 1, "host": "otherhost", "start_time": 0}))
    assert not any("locked" in n for n in verify_output(out).notes)
    holder = _holder(out)
    try:
        assert any("shard s0 is locked by PID" in n for n in verify_output(out).notes)
    finally:
        holder.kill()
        holder.wait()


def test_verify_notes_a_graph_and_isne_vectors_of_an_earlier_state_of_the_chunks(search_output, tmp_path):
    """"ok" and nothing else for edges to removed chunks and ISNE rows of chunks no longer there."""
    import pyarrow as pa

    out = _copy(search_output[0], tmp_path / "out")
    assert not [n for n in verify_output(out).notes if "older than the chunks" in n or "ISNE vectors:" in n]
    edges = pq.read_table(out / "edges.parquet")
    gone = pa.array(["gone-chunk"] * edges.num_rows, type=edges.schema.field("dst_chunk_id").type)
    pq.write_table(edges.set_column(edges.schema.get_field_index("dst_chunk_id"), "dst_chunk_id", gone),
                   out / "edges.parquet")
    isne = next((out / "isne").glob("embeddings-*.parquet"))
    table = pq.read_table(isne)
    pq.write_table(table.slice(1), isne)  # one chunk loses its row
    report = verify_output(out)
    assert report.ok, report.lines()
    assert any(f"edges.parquet is older than the chunks: {edges.num_rows} edge end(s)" in n for n in report.notes)
    assert any("ISNE vectors: 1 chunk(s) have none" in n and "0 row(s)" in n for n in report.notes), report.notes
    assert not [n for n in report.notes if "were not made by" in n]  # the vectors are the model's own
    # vectors another model made (a stage stopped between writing the model and the vectors)
    from hades_gpu.store.layout import ISNE_MODEL_ID_KEY

    pq.write_table(table.replace_schema_metadata({ISNE_MODEL_ID_KEY: b"another-model"}), isne)
    assert any("ISNE vectors were not made by" in n for n in verify_output(out).notes)



def test_a_link_folder_or_fifo_at_the_lock_path_is_refused_and_nothing_is_written_through_it(tmp_path):
    """A symbolic link planted at `.lock-s0` was followed and the file it points to emptied (the lock
    is truncated and rewritten); a FIFO there blocked reading the holder. Each is refused in one
    OSError naming the path and what to do, and nothing is written outside the output."""
    from hades_gpu.cli import classify_error
    from hades_gpu.store.lock import OutputLock

    out = tmp_path / "out"
    out.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("precious data\n")
    (out / ".lock-s0").symlink_to(victim)
    with pytest.raises(OSError, match="is a symbolic link, not a lock file: remove it") as info:
        OutputLock(out, "s0").acquire()
    assert victim.read_text() == "precious data\n"
    code, line = classify_error(info.value)
    assert code == 1 and line.startswith(str(out / ".lock-s0")) and "\n" not in line

    (out / ".lock-s0").unlink()
    (out / ".lock-s0").mkdir()
    with pytest.raises(OSError, match="is a folder, not a lock file: remove it"):
        OutputLock(out, "s0").acquire()
    (out / ".lock-s0").rmdir()
    os.mkfifo(out / ".lock-s0")
    with pytest.raises(OSError, match="is not a regular file, so not a lock file: remove it"):
        OutputLock(out, "s0").acquire()  # returns at once: neither the record read nor the open blocks
    (out / ".lock-s0").unlink()
    os.link(victim, out / ".lock-s0")  # a hard link: writing the lock would empty the other name's file
    with pytest.raises(OSError, match="has 1 other hard link"):
        OutputLock(out, "s0").acquire()
    assert victim.read_text() == "precious data\n"
    (out / ".lock-s0").unlink()
    with OutputLock(out, "s0"):  # a plain lock file again: taken as usual
        assert read_holder(out / ".lock-s0")["pid"] == os.getpid()


def test_a_long_inner_error_is_cut_visibly_not_mid_path_as_if_it_ended_there(tmp_path):
    """A damaged part's reader error was sliced at 200-300 characters, mid-path and unmarked
    ("... input source '/tmp/probe_store/d_tr): hades-verify ..."): the cut is marked now."""
    from hades_gpu.records import error_line

    long = OSError(f"Could not open Parquet input source '{tmp_path / ('x' * 400)}': Parquet magic bytes not found")
    line = error_line(long, 120)
    assert len(line) == 120 and line.endswith("…")
    assert error_line(ValueError("short\nsecond line"), 120) == "short" and error_line(ValueError()) == "ValueError"


def _without_permission_override() -> tuple[str, ...]:
    """A command prefix under which permission bits hold for this process (root overrides them)."""
    if os.geteuid() != 0:
        return ()
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root without setpriv: a file's permissions cannot be made to hold")
    caps = "-dac_override,-dac_read_search"
    return (setpriv, f"--bounding-set={caps}", f"--inh-caps={caps}")


def test_a_part_file_that_cannot_be_read_is_not_damage_the_run_refuses_and_changes_nothing(tmp_path: Path) -> None:
    """`chmod 000` on a good part: the run's start called it damaged, deleted it and dropped its
    documents, which a run over another folder never ingested again (27 chunks gone, exit 0, verify
    ok after). Now the run refuses in one line naming the file and changes nothing."""
    corpus = write_corpus(tmp_path / "corpus")
    out = tmp_path / "out"
    ingest(corpus, out)
    before = chunk_rows(out)
    other = tmp_path / "other"
    other.mkdir()
    (other / "zebra.md").write_text("# Zebra\n\n" + "stripes " * 150)
    with Manifest.load(out, "s0") as m:
        part = m.parts()[1]
    target = out / "chunks" / f"{part}.parquet"
    listing = sorted(p.name for p in (out / "chunks").iterdir())
    target.chmod(0)
    try:
        proc = ingest_subprocess(other, out, prefix=_without_permission_override())
        report = verify_output(out) if os.geteuid() != 0 else None
        verify = subprocess.run([*_without_permission_override(), sys.executable, "-m", "hades_gpu.store.verify",
                                 str(out)], cwd=REPO, capture_output=True, text=True, timeout=120)
    finally:
        target.chmod(0o644)
    assert proc.returncode != 0 and "PermissionError" in proc.stderr and "cannot be read" in proc.stderr, proc.stderr[-2000:]
    assert verify.returncode == 1 and "hades-verify: unreadable:" in verify.stderr, verify.stderr[-2000:]
    assert sorted(p.name for p in (out / "chunks").iterdir()) == listing
    with Manifest.load(out, "s0") as m:
        assert part in m.parts()
    assert chunk_rows(out) == before and verify_output(out).ok
    if report is not None:
        assert not report.ok and any("unreadable" in ln for ln in report.lines())


def test_strays_in_the_part_folders_are_noted_and_a_folder_named_like_a_part_does_not_block_a_run(
        tmp_path: Path, caplog) -> None:
    """A folder `chunks/part-s0-00099.parquet`: verify promised the next run would remove it, and every
    run then failed "Is a directory". A text file or a copied part in chunks/: verify said ok, while
    the README's `pd.read_parquet("<output>/chunks")` failed or read the copy's rows twice."""
    corpus = write_corpus(tmp_path / "corpus")
    out = tmp_path / "out"
    ingest(corpus, out)
    first = sorted((out / "chunks").glob("part-*.parquet"))[0]
    (out / "chunks" / "part-s0-00099.parquet").mkdir()
    shutil.copy(first, out / "chunks" / "copy.parquet")
    (out / "documents" / "notes.txt").write_text("hello")
    (out / "chunks" / ".DS_Store").write_text("")  # names pyarrow's dataset reading skips: no trouble
    (out / "chunks" / "_SUCCESS").write_text("")
    report = verify_output(out)
    assert report.ok
    strays = [n for n in report.notes if "no part of this output" in n]
    assert len(strays) == 2 and any("chunks/" in n and "e.g. copy.parquet" in n for n in strays), report.notes
    assert any("documents/" in n and "notes.txt" in n for n in strays), report.notes
    assert not any("uncommitted" in n for n in report.notes), report.notes  # the folder is no run's leftover
    (corpus / "doc01.md").write_text("# Changed\n\n" + "new words " * 50)
    with caplog.at_level(logging.WARNING, logger="hades_gpu.store.writer"):
        ingest(corpus, out)  # it failed "Is a directory" before anything else
    assert any("is a folder named like a part file" in r.getMessage() for r in caplog.records)
    assert (out / "chunks" / "part-s0-00099.parquet").is_dir() and (out / "chunks" / "copy.parquet").is_file()
    assert verify_output(out).ok
    reference = tmp_path / "reference"
    ingest(corpus, reference)
    assert chunk_rows(out) == chunk_rows(reference)  # each chunk once (the helper's no-stray check would fail)


def test_isne_damage_is_found_in_a_file_of_two_vectors_and_in_null_rows(tmp_path):
    """The length test compared with the file's median: in a two-chunk output a row of 1e20 was its own
    median's half and passed, and a null row read as an isolated chunk's 0."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from hades_gpu.isne.stage import write_isne_embeddings
    from hades_gpu.store.reader import DamagedOutputError, damaged_isne_rows, read_isne_embeddings

    ok = np.full((2, 4), 0.3, np.float32)
    assert not damaged_isne_rows(ok).any() and not damaged_isne_rows(np.zeros((2, 4), np.float32)).any()
    huge = ok.copy()
    huge[1] = 1e20
    assert damaged_isne_rows(huge).tolist() == [False, True]
    out = tmp_path / "out"
    (out / "isne").mkdir(parents=True)
    path = out / "isne" / "embeddings-s0.parquet"
    write_isne_embeddings(path, np.array(["a", "b"], dtype=object), ok)
    assert read_isne_embeddings(out)[0] == ["a", "b"]
    table = pq.read_table(path)
    column = table.column("isne_embedding")
    nulled = pa.array([column[0].as_py(), None], type=column.type)
    pq.write_table(table.set_column(1, table.schema.field("isne_embedding"), nulled)
                   .replace_schema_metadata(table.schema.metadata), path)
    with pytest.raises(DamagedOutputError, match="1 damaged ISNE vector"):
        read_isne_embeddings(out)
