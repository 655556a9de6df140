"""Issue 13: replacing a changed document is one atomic step. A run is SIGKILLed at each named point of
the commit (`HADES_TEST_KILL_AT`, store/writer.py) while it replaces a changed document; the output is
consistent right after the kill (`hades-verify` clean), and once the document reverts to its old
content a re-run ends with every chunk exactly once, as a clean run has it."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest

from corpus_helpers import REPO
from store_faults import assert_same_chunks_exactly_once, chunk_rows, ingest, write_corpus

from hades_gpu.store.manifest import Manifest
from hades_gpu.store.verify import verify_output
from hades_gpu.store.writer import KILL_ENV, KILL_POINTS

CHANGED = "doc03.md"


@pytest.mark.parametrize("writer", ["thread", "process"])
def test_a_kill_at_any_point_of_replacing_a_changed_document_loses_nothing(tmp_path, writer):
    """With the writer a thread the run itself is killed; with the writer a process (profile.writer)
    that process is killed at the point, and the run fails with one line saying so."""
    corpus = write_corpus(tmp_path / "corpus")
    clean = tmp_path / "clean"
    ingest(corpus, clean)
    reference = chunk_rows(clean)
    with Manifest.load(clean, "s0") as m:
        old_part = m.lookup(CHANGED).part
        assert m.part_contents(old_part)[0] >= 2  # the changed document shares its part: the rest must survive

    old_text = (corpus / CHANGED).read_text()
    outs = {point: shutil.copytree(clean, tmp_path / point, copy_function=shutil.copy2) for point in KILL_POINTS}
    (corpus / CHANGED).write_text("A new first paragraph.\n\n" + old_text)
    script = ("import sys; sys.path.insert(0, %r); from pathlib import Path; from store_faults import ingest; "
              "ingest(Path(sys.argv[1]), Path(sys.argv[2]), writer=sys.argv[3])" % str(REPO / "tests" / "support"))
    procs = {point: subprocess.Popen([sys.executable, "-c", script, str(corpus), str(out), writer], cwd=REPO,
                                     env={**__import__("os").environ, KILL_ENV: point},
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for point, out in outs.items()}
    for point, proc in procs.items():
        log, _ = proc.communicate(timeout=180)
        if writer == "thread":
            assert proc.returncode == -signal.SIGKILL, f"{point}: not killed there (rc {proc.returncode}):\n{log[-2000:]}"
        else:
            assert proc.returncode == 1, f"{point}: rc {proc.returncode}:\n{log[-2000:]}"
            line = [ln for ln in log.splitlines() if ln.startswith("hades_gpu.orchestration.writer_process.WriterProcessError")]
            assert line and "killed by SIGKILL" in line[0] and "ingested again by the next run" in line[0], log[-2000:]

    for point, out in outs.items():
        report = verify_output(out)  # right after the kill: the manifest names exactly what is on disk
        assert report.ok, (point, report.lines())
        with Manifest.load(out, "s0") as m:
            replaced = m.lookup(CHANGED).content_hash != Manifest.load(clean, "s0").lookup(CHANGED).content_hash
        assert replaced == (point == "after_manifest_commit"), point

    time.sleep(0.01)
    (corpus / CHANGED).write_text(old_text)  # the change is undone (a new mtime, the old content)
    for point, out in outs.items():
        result = ingest(corpus, out, writer=writer)
        assert_same_chunks_exactly_once(out, reference)
        assert result.documents_ingested == (1 if point == "after_manifest_commit" else 0), point
        report = verify_output(out)  # ingest without the graph stage: its note only (no orphans, no lock)
        assert report.ok and [n for n in report.notes if "no chunk graph" not in n] == [], (point, report.notes)
        docs = {p: pq.read_table(out / "documents" / f"{p}.parquet").num_rows for p in Manifest.load(out, "s0").parts()}
        assert sum(docs.values()) == 8, (point, docs)


def test_the_replace_transaction_commits_whole_or_not_at_all(tmp_path):
    from hades_gpu.store.atomic import FileRecord
    from hades_gpu.store.manifest import DocumentEntry, Replacement

    m = Manifest.load(tmp_path, "s0")
    rec = FileRecord(size=1, checksum="sha256:x", rows=1)
    m.commit_part("part-s0-00001", [(r, DocumentEntry(r, "h1", 1, "part-s0-00001")) for r in ("a", "b", "c")],
                  files={"chunks": rec, "documents": rec})

    def boom():
        raise RuntimeError("killed inside the transaction")

    new = [("a", DocumentEntry("a", "h2", 1, "part-s0-00002"))]
    rewrite = Replacement("part-s0-00001", "part-s0-00003", {"chunks": rec, "documents": rec})
    try:
        m.commit_part("part-s0-00002", new, files={"chunks": rec}, replaced=[rewrite], before_commit=boom)
    except RuntimeError:
        pass
    assert m.parts() == ["part-s0-00001"] and {e.part for _, e in m.documents()} == {"part-s0-00001"}
    assert set(m.part_files()) == {"part-s0-00001"}
    m.commit_part("part-s0-00002", new, files={"chunks": rec}, replaced=[rewrite])
    assert m.parts() == ["part-s0-00002", "part-s0-00003"]
    assert {r: e.part for r, e in m.documents()} == {"a": "part-s0-00002", "b": "part-s0-00003", "c": "part-s0-00003"}
    assert set(m.part_files()) == {"part-s0-00002", "part-s0-00003"} and m.next_part_number() == 4
    assert m.drop_parts(["part-s0-00003"]) == 2 and m.next_part_number() == 4  # a dropped number is never reused
