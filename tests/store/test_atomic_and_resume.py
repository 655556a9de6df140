"""store/atomic.py (the one writer of every output file) and store/resume.py (the one resume policy)."""

from __future__ import annotations

import dataclasses
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hades_gpu.records import ChunkedDocument, DocumentRef
from hades_gpu.store.atomic import atomic_path, atomic_write_bytes, atomic_write_parquet, atomic_write_with
from hades_gpu.store.manifest import DocumentEntry, Manifest
from hades_gpu.store.resume import Resume, ResumePolicy


def test_a_write_replaces_the_file_whole_or_leaves_it_as_it_was(tmp_path, monkeypatch):
    target = tmp_path / "deep" / "metrics.json"
    atomic_write_bytes(target, b"old")
    assert target.read_bytes() == b"old"
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half of the ne")
            raise RuntimeError("disk full")
    assert target.read_bytes() == b"old" and sorted(p.name for p in target.parent.iterdir()) == ["metrics.json"]
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(fd) or real_fsync(fd))
    atomic_write_parquet(pa.table({"a": [1, 2]}), tmp_path / "edges.parquet")
    assert pq.read_table(tmp_path / "edges.parquet").column("a").to_pylist() == [1, 2]
    assert len(synced) >= 2  # the file before the rename, the folder after it
    atomic_write_with(tmp_path / "model.bin", lambda p: p.write_bytes(b"weights"))
    assert (tmp_path / "model.bin").read_bytes() == b"weights"
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def _doc(rel: str, size: int, mtime: int, content_hash: str) -> ChunkedDocument:
    ref = DocumentRef(path=f"/c/{rel}", rel_path=rel, size=size, modality="prose", language="text", mtime_ns=mtime)
    return ChunkedDocument(ref=ref, content_hash=content_hash)


def test_resume_decides_unchanged_changed_and_new_from_stat_then_content(tmp_path):
    m = Manifest.load(tmp_path, "s0")
    m.commit_part("part-s0-00001", [("a.md", DocumentEntry("da", "h-a", 2, "part-s0-00001", 100, 5))])
    policy = ResumePolicy(m)
    same = _doc("a.md", 100, 5, "h-a")
    assert policy.by_stat(same.ref) is Resume.UNCHANGED  # not even read
    touched = dataclasses.replace(same, ref=dataclasses.replace(same.ref, mtime_ns=6))
    assert policy.by_stat(touched.ref) is Resume.READ and policy.by_content(touched) is Resume.UNCHANGED
    grown = _doc("a.md", 101, 5, "h-a2")
    assert policy.by_stat(grown.ref) is Resume.READ and policy.by_content(grown) is Resume.CHANGED
    new = _doc("b.md", 100, 5, "h-a")
    assert policy.by_stat(new.ref) is Resume.READ and policy.by_content(new) is Resume.NEW


def test_resume_asks_the_manifest_once_per_document_and_never_when_the_output_was_empty(tmp_path):
    empty = Manifest.load(tmp_path / "fresh", "s0")
    asked: list[str] = []
    lookup = empty.lookup
    empty.lookup = lambda rel: asked.append(rel) or lookup(rel)  # counts the real lookups
    policy = ResumePolicy(empty)
    ref = _doc("a.md", 100, 5, "h-a").ref
    assert policy.by_stat(ref) is Resume.READ and policy.known_hash(ref) is None and asked == []
    # this run's own commit does not answer its later lookups (made before its rows are written)
    empty.commit_part("part-s0-00001", [("a.md", DocumentEntry("da", "h-a", 2, "part-s0-00001", 100, 5))])
    assert policy.known_hash(ref) is None

    m = Manifest.load(tmp_path / "held", "s0")
    m.commit_part("part-s0-00001", [("a.md", DocumentEntry("da", "h-a", 2, "part-s0-00001", 100, 5))])
    lookup = m.lookup
    m.lookup = lambda rel: asked.append(rel) or lookup(rel)
    policy = ResumePolicy(m)
    touched = dataclasses.replace(ref, mtime_ns=6)
    assert policy.by_stat(touched) is Resume.READ and policy.known_hash(touched) == "h-a"
    assert asked == ["a.md"]  # the task's hash came with the stat check
    assert policy.known_hash(touched) == "h-a" and asked == ["a.md", "a.md"]  # asked again after that
    assert policy.known_hash(_doc("b.md", 1, 1, "x").ref) is None


def _texts_by_path(out) -> dict:
    from hades_gpu.store.reader import read_chunks

    t = read_chunks(out, ["path", "text"])
    return {os.path.basename(p): x for p, x in zip(t.column("path").to_pylist(), t.column("text").to_pylist())}


def test_two_files_swapped_with_the_same_size_and_mtime_are_read_again(tmp_path):
    """`mv a t; mv b a; mv t b` of two files of one size and mtime (as `tar x`, `cp -p`, `rsync -t`
    leave them): the run found both unchanged by size and mtime and kept each one's old chunks for
    good ("re-ingest it" changed nothing). Inode and ctime are part of the resume check now."""
    from store_faults import ingest

    corpus, out = tmp_path / "c", tmp_path / "out"
    corpus.mkdir()
    (corpus / "a.txt").write_text("Alpha file talks about the wolverine.\n")
    (corpus / "b.txt").write_text("Bravo file talks about the albatross.\n")
    for name in ("a.txt", "b.txt"):
        os.utime(corpus / name, ns=(1_700_000_000_000_000_000, 1_700_000_000_000_000_000))
    ingest(corpus, out)
    os.rename(corpus / "a.txt", corpus / "t")
    os.rename(corpus / "b.txt", corpus / "a.txt")
    os.rename(corpus / "t", corpus / "b.txt")
    second = ingest(corpus, out)
    assert second.documents_ingested == 2, second.metrics["documents"]
    assert _texts_by_path(out) == {"a.txt": "Bravo file talks about the albatross.",
                                   "b.txt": "Alpha file talks about the wolverine."}
    third = ingest(corpus, out)
    assert third.metrics["documents"]["unchanged_not_read"] == 2  # not read again once recorded


def test_a_manifest_from_before_stat_tags_is_read_once_then_trusted(tmp_path):
    """An output whose manifest has no stat_tag column: opened read-only (verify) it reads as before;
    the next run adds the column and reads each document once (found unchanged by its hash, not
    embedded), the run after trusts the stat."""
    import sqlite3

    from store_faults import ingest, write_corpus

    from hades_gpu.store.verify import verify_output

    corpus = write_corpus(tmp_path / "c", n_docs=4)
    out = tmp_path / "out"
    ingest(corpus, out)
    with sqlite3.connect(out / "manifest-s0.sqlite") as db:
        db.execute("ALTER TABLE documents DROP COLUMN stat_tag")
    assert verify_output(out).ok
    again = ingest(corpus, out)
    assert again.documents_ingested == 0 and again.metrics["documents"]["unchanged_same_hash"] == 4
    last = ingest(corpus, out)
    assert last.metrics["documents"]["unchanged_not_read"] == 4
