"""`documents.remove_missing`: documents the corpus no longer has leave the output (their parts written
again without them, one manifest transaction), every other chunk exactly once; off by default; a
missing source or an empty run removes nothing; a SIGKILL at any point of the removal leaves a
consistent output that the next run finishes."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from corpus_helpers import REPO
from store_faults import assert_same_chunks_exactly_once, chunk_rows, config, ingest, write_corpus

from hades_gpu.store.manifest import Manifest
from hades_gpu.store.reader import read_documents
from hades_gpu.store.verify import verify_output
from hades_gpu.store.writer import KILL_ENV

GONE = ("doc02.md", "doc05.md")


def _ingest_removing(sources: list[Path], out: Path):
    from hades_gpu.benchmarks.feed_bench import ZeroCostEmbedder
    from hades_gpu.pipelines import TextParallelPipeline

    cfg = config()
    cfg.documents.remove_missing = True
    return TextParallelPipeline(cfg, embedder=ZeroCostEmbedder(dim=cfg.embedder.dim)).ingest(sources, out)


# `_ingest_removing` in a fresh interpreter (killed, or run without root's permission override)
_REMOVING_SCRIPT = ("import sys; sys.path[:0] = [%r, %r]; from pathlib import Path; "
                    "from test_remove_missing import _ingest_removing; _ingest_removing([Path(sys.argv[1])], Path(sys.argv[2]))"
                    % (str(REPO / "tests" / "support"), str(REPO / "tests" / "store")))


def _rel_paths(out: Path) -> set[str]:
    return set(read_documents(out, ["rel_path"]).column("rel_path").to_pylist())


@pytest.fixture()
def outputs(tmp_path: Path) -> tuple[Path, Path, object]:
    """An output of 8 documents (several a part) whose corpus then loses two, and the reference: an
    output made from the smaller corpus."""
    corpus = write_corpus(tmp_path / "corpus")
    out = tmp_path / "out"
    ingest(corpus, out)
    with Manifest.load(out, "s0") as m:
        assert m.part_contents(m.lookup(GONE[0]).part)[0] >= 2  # shares its part: the others must survive
    for name in GONE:
        (corpus / name).unlink()
    reference = tmp_path / "reference"
    ingest(corpus, reference)
    return corpus, out, chunk_rows(reference)


def test_documents_no_longer_in_the_corpus_are_removed(outputs, caplog) -> None:
    corpus, out, reference = outputs
    with caplog.at_level(logging.INFO, logger="hades_gpu.pipelines.ingest"):
        kept = ingest(corpus, out)  # off by default: the output keeps them, and says so in one line
    assert kept.documents_removed == 0 and set(GONE) <= _rel_paths(out)
    said = [r.getMessage() for r in caplog.records if "not found by this run" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith("2 document(s)") and GONE[0] in said[0], said
    assert "documents.remove_missing=true" in said[0]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="hades_gpu.pipelines.ingest"):
        result = _ingest_removing([corpus], out)
    assert result.documents_removed == 2 and result.documents_unchanged == 6 and result.documents_ingested == 0
    assert result.metrics["documents_removed"] == 2
    assert_same_chunks_exactly_once(out, reference)
    assert _rel_paths(out) == {f"doc{i:02d}.md" for i in range(8)} - set(GONE)
    assert verify_output(out).ok
    assert any("removed 2 document(s) no longer in the corpus" in r.getMessage() for r in caplog.records)
    assert _ingest_removing([corpus], out).documents_removed == 0  # nothing more to remove


@pytest.mark.parametrize("case", ["missing source", "empty corpus"])
def test_nothing_is_removed_when_a_source_is_missing_or_nothing_was_found(outputs, tmp_path, caplog, case) -> None:
    corpus, out, _ = outputs
    sources = [corpus, tmp_path / "typo"] if case == "missing source" else [tmp_path / "empty"]
    (tmp_path / "empty").mkdir()
    with caplog.at_level(logging.WARNING, logger="hades_gpu.pipelines.ingest"):
        result = _ingest_removing(sources, out)
    assert result.documents_removed == 0 and set(GONE) <= _rel_paths(out)
    said = [r.getMessage() for r in caplog.records if "documents.remove_missing: nothing removed" in r.getMessage()]
    assert len(said) == 1 and ("typo" in said[0] if case == "missing source" else "found no documents" in said[0])


@pytest.mark.parametrize("point", ["after_old_rewritten", "before_manifest_commit", "after_manifest_commit"])
def test_a_kill_at_any_point_of_a_removal_loses_nothing(outputs, point) -> None:
    corpus, out, reference = outputs
    proc = subprocess.run([sys.executable, "-c", _REMOVING_SCRIPT, str(corpus), str(out)], cwd=REPO, capture_output=True,
                          text=True, env={**os.environ, KILL_ENV: point}, timeout=180)
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stderr[-2000:])
    assert verify_output(out).ok  # right after the kill: the manifest names exactly what is on disk
    assert (set(GONE) <= _rel_paths(out)) == (point != "after_manifest_commit")
    result = _ingest_removing([corpus], out)
    assert result.documents_removed == (0 if point == "after_manifest_commit" else 2)
    assert_same_chunks_exactly_once(out, reference)
    assert verify_output(out).ok


def test_a_shard_whose_share_of_the_corpus_is_now_empty_removes_its_deleted_documents(tmp_path) -> None:
    """By-hand shards and the cluster's shard tasks: every file of shard 1 deleted, the corpus not
    empty. The shard said "this run found no documents" and kept them, searchable, on every re-run."""
    import dataclasses

    import pyarrow.parquet as pq

    from hades_gpu.benchmarks.feed_bench import ZeroCostEmbedder
    from hades_gpu.pipelines import TextParallelPipeline
    from hades_gpu.records import ShardSpec

    corpus = write_corpus(tmp_path / "corpus")

    def run(out: Path, shard: str, remove: bool, planned: bool = False):
        cfg = config()
        cfg = dataclasses.replace(cfg, shard=shard, documents=dataclasses.replace(cfg.documents, remove_missing=remove))
        pipeline = TextParallelPipeline(cfg, embedder=ZeroCostEmbedder(dim=cfg.embedder.dim))
        if planned:  # as a cluster shard task: the driver's refs for this shard (none), the corpus had some
            return pipeline.ingest_planned([], [], out, corpus_found=True)
        return pipeline.ingest([corpus], out)

    for out, planned in ((tmp_path / "by_hand", False), (tmp_path / "cluster", True)):
        for shard in ("0/2", "1/2"):
            run(out, shard, False)
        label = ShardSpec.parse("1/2").label
        shard_docs = {r for p in (out / "documents").glob(f"part-{label}-*.parquet")
                      for r in pq.read_table(p, columns=["rel_path"]).column("rel_path").to_pylist()}
        assert shard_docs and len(shard_docs) < 8
        for name in shard_docs:
            (corpus / name).unlink(missing_ok=True)
        run(out, "0/2", True)
        assert run(out, "1/2", True, planned).documents_removed == len(shard_docs)
        assert not shard_docs & _rel_paths(out) and len(_rel_paths(out)) == 8 - len(shard_docs)
        assert verify_output(out).ok
        write_corpus(corpus)  # the next case starts from the whole corpus again


def test_documents_whose_folder_cannot_be_searched_are_kept_not_removed(outputs, caplog) -> None:
    """A folder made readable but not searchable (chmod 644): its files were skipped as unreadable and
    remove_missing deleted their documents, files still there. Run without root's permission override
    (setpriv drops CAP_DAC_OVERRIDE / CAP_DAC_READ_SEARCH), so the permission error is real."""
    import shutil

    corpus, out, _ = outputs
    setpriv = shutil.which("setpriv")
    if setpriv is None or os.geteuid() != 0:
        pytest.skip("needs setpriv and root to drop the permission override (else chmod alone does)")
    (corpus / "sub").mkdir()
    (corpus / "sub" / "kept.md").write_text("# Kept\n\n" + "words " * 200)
    assert _ingest_removing([corpus], out).documents_ingested == 1
    (corpus / "sub").chmod(0o644)  # listable, not searchable: its files cannot be stat'ed or opened
    try:
        caps = "-dac_override,-dac_read_search"
        proc = subprocess.run([setpriv, f"--bounding-set={caps}", f"--inh-caps={caps}", sys.executable, "-c",
                               _REMOVING_SCRIPT, str(corpus), str(out)], cwd=REPO, capture_output=True, text=True,
                              timeout=180)
    finally:
        (corpus / "sub").chmod(0o755)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "sub/kept.md" in _rel_paths(out), proc.stderr[-2000:]  # kept, not removed
    assert "not read by this run" in proc.stderr and "kept with their chunks" in proc.stderr
    assert not set(GONE) & _rel_paths(out)  # the files really gone were removed as before


def test_a_document_whose_path_is_a_folder_now_is_removed(tmp_path, caplog) -> None:
    """`becomedir.md` replaced by a folder of that name: its old chunks stayed and search returned the
    folder as a hit; the "not found" line counted it, and files handled as no longer documents."""
    corpus = write_corpus(tmp_path / "corpus")
    out = tmp_path / "out"
    ingest(corpus, out)
    (corpus / "doc03.md").unlink()
    (corpus / "doc03.md").mkdir()
    (corpus / "doc03.md" / "inner.md").write_text("# Inner\n\n" + "text " * 100)
    (corpus / "doc05.md").unlink()
    with caplog.at_level(logging.INFO, logger="hades_gpu.pipelines.ingest"):
        result = ingest(corpus, out)  # remove_missing off
    assert "doc03.md" not in _rel_paths(out) and "doc03.md/inner.md" in _rel_paths(out)
    assert "doc05.md" in _rel_paths(out)  # only gone: kept, as remove_missing is off
    said = [r.getMessage() for r in caplog.records]
    assert any("whose path is a folder now" in m and "doc03.md" in m for m in said), said
    found = [m for m in said if "not found by this run" in m]
    assert len(found) == 1 and found[0].startswith("1 document(s)") and "doc05.md" in found[0]
    assert result.documents_ingested == 1 and verify_output(out).ok
    # counted too: the warning said "removed 1" while the summary and metrics said 0
    assert result.documents_removed == 1 and result.metrics["documents_removed"] == 1


@pytest.mark.parametrize("given", ["subfolder", "one file"])
def test_remove_missing_keeps_documents_whose_files_are_there_outside_the_given_corpus(tmp_path, caplog, given) -> None:
    """An output of `c`, then `corpus=c/sub` (or one file of it) with `remove_missing`: every document
    outside `c/sub` was removed as "no longer in the corpus" while its file was there. They are kept
    now, with one line; a document whose file is really gone still goes."""
    corpus = write_corpus(tmp_path / "corpus")
    (corpus / "sub").mkdir()
    for i in range(3):  # names of their own: a name the output holds already is that document's identity
        shutil.copy(corpus / f"doc0{i}.md", corpus / "sub" / f"part{i}.md")
    out = tmp_path / "out"
    ingest(corpus, out)
    before = _rel_paths(out)
    assert len(before) == 11 and "sub/part1.md" in before
    (corpus / "doc05.md").unlink()  # really gone
    (corpus / "sub" / "part1.md").write_text("# Edited\n\n" + "changed " * 80)
    source = corpus / "sub" if given == "subfolder" else corpus / "sub" / "part1.md"
    with caplog.at_level(logging.INFO, logger="hades_gpu.pipelines.ingest"):
        result = _ingest_removing([source], out)
    assert result.documents_ingested == 1
    assert _rel_paths(out) == before - {"doc05.md"}, _rel_paths(out) ^ before
    assert result.documents_removed == 1
    said = [r.getMessage() for r in caplog.records if "outside this run's corpus" in r.getMessage()]
    kept = 7 if given == "subfolder" else 7 + 2  # the other files of sub/ are outside one file given alone
    assert len(said) == 1 and said[0].startswith(f"{kept} document(s)"), said
    assert verify_output(out).ok


def test_remove_missing_keeps_documents_outside_the_corpus_whose_folder_cannot_be_read(tmp_path) -> None:
    """`corpus=r/a` with remove_missing while r/b could not be searched (chmod 000): the files of r/b,
    still there, were taken for gone and their documents removed. Run without root's override."""
    import shutil

    setpriv = shutil.which("setpriv")
    if setpriv is None or os.geteuid() != 0:
        pytest.skip("needs setpriv and root to drop the permission override")
    corpus = tmp_path / "r"
    write_corpus(corpus / "a", n_docs=3)
    (corpus / "b").mkdir()
    for i in range(3):
        (corpus / "b" / f"b{i}.md").write_text(f"# B {i}\n\n" + "beta words " * 60)
    out = tmp_path / "out"
    ingest(corpus, out)
    before = _rel_paths(out)
    (corpus / "b").chmod(0)
    try:
        caps = "-dac_override,-dac_read_search"
        proc = subprocess.run([setpriv, f"--bounding-set={caps}", f"--inh-caps={caps}", sys.executable, "-c",
                               _REMOVING_SCRIPT, str(corpus / "a"), str(out)], cwd=REPO, capture_output=True,
                              text=True, timeout=180)
    finally:
        (corpus / "b").chmod(0o755)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert _rel_paths(out) == before, before ^ _rel_paths(out)


def test_a_corpus_given_through_a_link_keeps_the_identities_the_output_holds(tmp_path) -> None:
    """`corpus=r`, then `corpus=L/a` with L -> r: the files of r/a were stored a second time under the
    link's names ("x.md" beside "a/x.md"), and remove_missing called the first copies outside the corpus."""
    corpus = tmp_path / "r"
    write_corpus(corpus / "a", n_docs=3)
    write_corpus(corpus / "b", n_docs=2)
    out = tmp_path / "out"
    ingest(corpus, out)
    before = _rel_paths(out)
    (tmp_path / "L").symlink_to(corpus)
    (corpus / "a" / "doc01.md").write_text("# Edited\n\n" + "changed words " * 40)
    result = _ingest_removing([tmp_path / "L" / "a"], out)
    assert _rel_paths(out) == before, before ^ _rel_paths(out)
    assert result.documents_ingested == 1 and result.documents_removed == 0
    assert verify_output(out).ok


def test_a_new_hard_link_does_not_take_the_file_from_the_name_the_output_holds(tmp_path) -> None:
    """`ln c/doc02.md c/a-link.md`: the walk meets "a-link.md" first, so the file was stored a second
    time under it, "doc02.md" became a duplicate skip, and remove_missing removed "doc02.md" as gone."""
    corpus = write_corpus(tmp_path / "corpus", n_docs=4)
    out = tmp_path / "out"
    ingest(corpus, out)
    before = _rel_paths(out)
    os.link(corpus / "doc02.md", corpus / "a-link.md")
    result = _ingest_removing([corpus], out)
    assert _rel_paths(out) == before, before ^ _rel_paths(out)
    assert result.documents_removed == 0 and result.documents_ingested == 0
    assert [(os.path.basename(s["path"]), s["reason"]) for s in result.skipped] == [("a-link.md", "duplicate")]
    assert verify_output(out).ok
