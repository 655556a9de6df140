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
