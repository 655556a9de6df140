"""store/manifest.py: the SQLite manifest (commits, lookups, damage and versions, older JSON outputs)."""

from __future__ import annotations

import json
import os
import sqlite3

import numpy as np
import pytest

from writer_feed import ChunkFeed, EmbeddedBatch
from hades_gpu.store.manifest import Manifest
from hades_gpu.store.reader import read_chunks
from hades_gpu.store.writer import DatasetWriter

from tests.store.test_writer import DIM, varied_doc, with_stat


def test_damaged_or_foreign_manifest_is_refused(tmp_path):
    (tmp_path / "manifest.json").write_text("{not json")  # an older output's JSON manifest, damaged
    with pytest.raises(ValueError, match="unreadable"):
        Manifest.load(tmp_path, "s0")
    (tmp_path / "manifest.json").write_text(json.dumps({"version": 999, "parts": []}))
    with pytest.raises(ValueError, match="version 999"):
        Manifest.load(tmp_path, "s0")
    (tmp_path / "manifest.json").unlink()
    for path in tmp_path.glob("manifest-*.sqlite"):
        path.unlink()
    (tmp_path / "manifest-s0.sqlite").write_bytes(b"not a database, but long enough to look like a file" * 40)
    # damaged: what to do is said (it read "unreadable: file is not a database" and nothing else)
    remedy = "is damaged .*: move it aside and re-run the ingest of this shard over its corpus"
    with pytest.raises(ValueError, match=remedy):
        Manifest.load(tmp_path, "s0")
    from hades_gpu.store.manifest import ManifestError, committed_parts

    with pytest.raises(ManifestError, match=remedy):
        committed_parts(tmp_path)
    future = tmp_path / "future"
    Manifest.load(future, "s0").close()
    with sqlite3.connect(future / "manifest-s0.sqlite") as conn:
        conn.execute("UPDATE meta SET value = '99' WHERE key = 'version'")
    with pytest.raises(ValueError, match="version 99, expected 2"):
        Manifest.load(future, "s0")
    empty = Manifest.load(tmp_path / "nowhere", "s1")
    assert empty.parts() == [] and list(empty.documents()) == [] and empty.shard == "s1" and empty.next_part_number() == 1


def test_an_older_outputs_json_manifest_is_read_then_imported_once(tmp_path):
    w = ChunkFeed(DatasetWriter(tmp_path, "s2", DIM, rows_per_part=100))
    d = varied_doc("a.py", 2, "old")
    w.begin_document(with_stat(d, 11, 22))
    w.add(EmbeddedBatch(chunks=d.chunks, embeddings=np.ones((2, DIM), np.float32)))
    w.close()
    # rewrite the shard's manifest as an older version wrote it
    entry = Manifest.load(tmp_path, "s2").lookup("a.py")
    (tmp_path / "manifest-s2.sqlite").unlink()
    legacy = {"version": 1, "shard": "s2", "parts": ["part-s2-00001"], "documents": {"a.py": vars(entry)}}
    (tmp_path / "manifest-s2.json").write_text(json.dumps(legacy))
    from hades_gpu.store.reader import committed_parts, is_ingest_output

    assert is_ingest_output(tmp_path) and committed_parts(tmp_path) == ["part-s2-00001"]  # read, not converted
    assert (tmp_path / "manifest-s2.json").exists() and len(read_chunks(tmp_path)) == 2
    m = Manifest.load(tmp_path, "s2")  # opening it for writing imports it
    assert not (tmp_path / "manifest-s2.json").exists()
    assert m.parts() == ["part-s2-00001"] and m.lookup("a.py") == entry and m.next_part_number() == 2
    assert m.is_unchanged("a.py", 11, 22)
    m.close()
    assert committed_parts(tmp_path) == ["part-s2-00001"]


def test_a_commit_costs_the_same_with_many_documents_already_in(tmp_path):
    """The manifest's cost per commit does not grow with what it holds: its file grows by about the
    rows committed, and a commit touches no other row (SQLite; the JSON manifest was rewritten whole)."""
    from hades_gpu.store.manifest import DocumentEntry

    m = Manifest.load(tmp_path, "s0")
    sizes = []
    for part in range(1, 41):
        name = f"part-s0-{part:05d}"
        m.commit_part(name, [(f"dir/{part}/{i}.py", DocumentEntry(f"d{part}-{i}", "h" * 16, 3, name, 100, 5))
                             for i in range(250)])
        sizes.append((tmp_path / "manifest-s0.sqlite").stat().st_size)
    growth = np.diff(sizes)
    assert m.document_count() == 10_000 and m.part_count() == 40
    assert growth[-10:].mean() <= 1.5 * growth[:10].mean()  # linear in rows, not in rows squared
    assert m.lookup("dir/17/3.py").doc_id == "d17-3" and m.lookup("dir/41/0.py") is None


def test_lookup_many_answers_as_lookup_does_over_several_queries(tmp_path):
    from hades_gpu.store.manifest import LOOKUP_BATCH, DocumentEntry

    m = Manifest.load(tmp_path, "s0")
    n = 2 * LOOKUP_BATCH + 7
    m.commit_part("part-s0-00001", [(f"d/{i}.md", DocumentEntry(f"id{i}", f"h{i}", 1, "part-s0-00001", i, i))
                                    for i in range(n)])
    asked = [f"d/{i}.md" for i in range(0, n + 40, 3)] + ["d/3.md", "no such.md"]  # a repeat, absent keys
    found = m.lookup_many(iter(asked))
    assert found == {rel: m.lookup(rel) for rel in asked if m.lookup(rel) is not None}
    assert len(found) == len(range(0, n, 3)) and m.lookup_many([]) == {}


def test_settings_are_recorded_once_and_a_run_with_others_is_refused(tmp_path):
    from hades_gpu.store.manifest import SettingsChangedError

    m = Manifest.load(tmp_path, "s0")
    assert m.settings() == {}
    m.check_settings({"chunking.chunk_tokens": 254, "model": "abc"})
    m.check_settings({"chunking.chunk_tokens": 254, "model": "abc", "embedder.dim": 384})  # a new key: added
    m.close()
    m = Manifest.load(tmp_path, "s0")  # durable
    assert m.settings() == {"chunking.chunk_tokens": 254, "model": "abc", "embedder.dim": 384}
    # no chunk committed yet (a first run failed before its first commit): other settings replace them
    m.check_settings({"chunking.chunk_tokens": 500, "model": "abc", "embedder.dim": 384})
    assert m.settings()["chunking.chunk_tokens"] == 500
    m.check_settings({"chunking.chunk_tokens": 254, "model": "abc", "embedder.dim": 384})
    from hades_gpu.store.manifest import DocumentEntry

    m.commit_part("part-s0-00001", [("a.py", DocumentEntry("da", "h1", 2, "part-s0-00001", 10, 20))])
    with pytest.raises(SettingsChangedError, match=r"chunking.chunk_tokens=254 \(this run: 100\); model='abc' "
                                                   r"\(this run: 'xyz'\): ingest into a new output folder"):
        m.check_settings({"chunking.chunk_tokens": 100, "model": "xyz", "embedder.dim": 384})
    assert m.settings()["chunking.chunk_tokens"] == 254  # the refused run recorded nothing
    m.check_settings({"model": "abc"})  # a subset that agrees is fine


def test_a_part_is_committed_once_and_a_failed_commit_changes_nothing(tmp_path):
    from hades_gpu.store.manifest import DocumentEntry

    m = Manifest.load(tmp_path, "s0")
    m.commit_part("part-s0-00001", [("a.py", DocumentEntry("da", "h1", 2, "part-s0-00001", 10, 20))])
    with pytest.raises(sqlite3.IntegrityError):
        m.commit_part("part-s0-00001", [("b.py", DocumentEntry("db", "h2", 1, "part-s0-00001", 1, 2))])
    assert m.parts() == ["part-s0-00001"] and m.lookup("b.py") is None  # rolled back whole
    m.commit_part("part-s0-00002", [("a.py", DocumentEntry("da", "h3", 3, "part-s0-00002", 11, 21))])
    assert m.lookup("a.py") == DocumentEntry("da", "h3", 3, "part-s0-00002", 11, 21)  # replaced, not added
    assert m.document_count() == 1 and m.next_part_number() == 3
    m.close()
    reopened = Manifest.load(tmp_path, "s0")  # durable: another connection sees it
    assert reopened.parts() == ["part-s0-00001", "part-s0-00002"] and reopened.lookup("a.py").content_hash == "h3"


def test_remove_documents_counts_each_once_and_moves_the_rest(tmp_path):
    """A removed document alone in its part (the part retired whole) and one sharing a part (the part
    rewritten): both counted once, the survivor points at the rewrite, the mark passes every number."""
    from hades_gpu.store.manifest import DocumentEntry, Replacement

    m = Manifest.load(tmp_path, "s0")
    m.commit_part("part-s0-00001", [("alone.md", DocumentEntry("da", "h1", 1, "part-s0-00001", 1, 1))])
    m.commit_part("part-s0-00002", [(f"{n}.md", DocumentEntry(f"d{n}", "h", 1, "part-s0-00002", 1, 1)) for n in "xy"])
    assert m.absent_from(["x.md", "new.md"]) == ["alone.md", "y.md"]
    removed = m.remove_documents(["alone.md", "y.md"], [Replacement("part-s0-00001"),
                                                        Replacement("part-s0-00002", "part-s0-00003")])
    assert removed == 2
    assert m.lookup("alone.md") is None and m.lookup("y.md") is None and m.lookup("x.md").part == "part-s0-00003"
    assert m.parts() == ["part-s0-00003"] and m.next_part_number() == 4
    assert m.absent_from(["x.md"]) == []
    m.close()


def test_the_model_probe_is_recorded_and_another_models_answer_refused_once_chunks_exist(tmp_path):
    import numpy as np

    from hades_gpu.store.manifest import DocumentEntry, SettingsChangedError

    rng = np.random.default_rng(0)
    minilm, other = rng.normal(size=384), rng.normal(size=384)
    m = Manifest.load(tmp_path, "s0")
    m.check_model_probe(other, "first try")  # nothing committed: recorded, and replaced by the next run
    m.check_model_probe(minilm, "local")
    m.commit_part("part-s0-00001", [("a.py", DocumentEntry("da", "h1", 2, "part-s0-00001", 10, 20))])
    m.check_model_probe(minilm + rng.normal(scale=1e-3, size=384), "triton")  # same model, other precision
    with pytest.raises(SettingsChangedError, match=r"holds vectors of another model: this embedder \(server\) answers "
                                                   r"a probe text with cosine -?0\.\d+ .*\(local\)"):
        m.check_model_probe(other, "server")
    m.close()
    with pytest.raises(SettingsChangedError):  # durable
        Manifest.load(tmp_path, "s0").check_model_probe(other, "server")


def test_a_journal_left_by_an_interrupted_write_is_named_by_read_only_opens(tmp_path):
    """A journal beside the manifest (a write cut off) made hades-verify and hades-search say
    "manifest ... is unreadable: attempt to write a readonly database", with no next step."""
    from hades_gpu.store.verify import verify_output

    Manifest.load(tmp_path, "s0").close()
    journal = tmp_path / "manifest-s0.sqlite-journal"
    journal.write_bytes(bytes.fromhex("d9d505f920a163d7") + os.urandom(4088))  # a journal header, then garbage
    with pytest.raises(ValueError, match=r"has a journal left by an interrupted write \(manifest-s0.sqlite-journal\)"
                                         r".*run hades-ingest on this output once"):
        verify_output(tmp_path)
