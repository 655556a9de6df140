"""What users rely on, checked on what the running pipeline does and stores (not on parts a test
builds itself): resume does no work, chunks cover their documents, the pipeline's own queues and
batches stay within their budgets."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from corpus_helpers import copy_files, stdlib_sources
from embedder_helpers import RecordingEmbedder
from hades_gpu.config import load_pipeline_config
from hades_gpu.pipelines import CodeParallelPipeline, TextParallelPipeline
from hades_gpu.store.reader import read_chunks, read_documents

FAST = ["isne.enabled=false", "monitoring.progress=off"]


def config(*overrides, profile="balanced"):
    return load_pipeline_config(profile, [*FAST, *overrides])


@pytest.fixture
def mixed_corpus(sample_corpus: Path) -> Path:
    """The sample corpus plus real stdlib sources and prose with CRLF, tabs, long lines, non-ASCII."""
    copy_files(stdlib_sources(12), sample_corpus / "lib")
    prose = sample_corpus / "prose"
    prose.mkdir()
    paragraphs = [f"Paragraph {i}: " + " ".join(f"wörd{j}\tcafé" for j in range(40 + 7 * i)) for i in range(30)]
    (prose / "crlf.md").write_bytes("\r\n\r\n".join(["# Title", *paragraphs]).encode())
    (prose / "one-long-line.txt").write_text("x" * 20 + " ".join(f"token{i}" for i in range(3000)))
    (prose / "spaces.txt").write_text("\n\n\n   lead\n\n" + "\n".join(f"line {i} ✓ end" for i in range(400)) + "\n\n   ")
    return sample_corpus


def first_run(corpus: Path, out: Path, embedder, *overrides) -> RecordingEmbedder:
    rec = RecordingEmbedder(embedder)
    result = TextParallelPipeline(config(*overrides), embedder=rec).process_batch([corpus], output=out)
    assert result.documents_ingested > 0 and rec.rows_embedded == result.chunks_written
    return rec


def test_rerun_over_an_unchanged_output_reads_and_embeds_nothing(mixed_corpus, tmp_path, embedder):
    out = tmp_path / "out"
    first_run(mixed_corpus, out, embedder)
    n_docs = len(read_documents(out))
    rows = len(read_chunks(out))
    rec = RecordingEmbedder(embedder)
    again = TextParallelPipeline(config(), embedder=rec).process_batch([mixed_corpus], output=out)
    assert rec.calls == []  # the model is never called
    docs = again.metrics["documents"]
    assert docs["unchanged_not_read"] == n_docs and docs["read"] == 0  # size+mtime path: not even read
    assert again.documents_ingested == 0 and len(read_chunks(out)) == rows


def test_touched_files_are_read_not_embedded_and_then_skipped_unread(mixed_corpus, tmp_path, embedder):
    out = tmp_path / "out"
    first_run(mixed_corpus, out, embedder)
    n_docs = len(read_documents(out))
    before = read_chunks(out).to_pandas().sort_values("chunk_id").reset_index(drop=True)
    for path in mixed_corpus.rglob("*"):
        if path.is_file():
            st = path.stat()
            os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))  # touched, not changed
    rec = RecordingEmbedder(embedder)
    touched = TextParallelPipeline(config(), embedder=rec).process_batch([mixed_corpus], output=out)
    assert rec.calls == []
    docs = touched.metrics["documents"]
    assert docs["unchanged_same_hash"] == n_docs and docs["unchanged_not_read"] == 0  # content-hash path
    after = read_chunks(out).to_pandas().sort_values("chunk_id").reset_index(drop=True)
    assert after.chunk_id.tolist() == before.chunk_id.tolist()
    assert np.array_equal(np.stack(after.embedding), np.stack(before.embedding))
    # the new mtimes were recorded: the next run skips them without reading
    third = TextParallelPipeline(config(), embedder=RecordingEmbedder(embedder)).process_batch([mixed_corpus], output=out)
    assert third.metrics["documents"]["unchanged_not_read"] == n_docs and third.metrics["documents"]["read"] == 0


def test_a_changed_document_is_the_only_one_embedded(mixed_corpus, tmp_path, embedder):
    out = tmp_path / "out"
    first_run(mixed_corpus, out, embedder)
    target = mixed_corpus / "docs" / "design.txt"
    target.write_text(target.read_text() + "\n\nA new closing paragraph about resumable ingestion.\n")
    rec = RecordingEmbedder(embedder)
    result = TextParallelPipeline(config(), embedder=rec).process_batch([mixed_corpus], output=out)
    assert result.documents_ingested == 1
    chunks = read_chunks(out).to_pandas()
    mine = chunks[chunks.path == str(target)]
    assert rec.rows_embedded == len(mine) > 0
    assert result.metrics["documents"]["read"] == 1


def _covered(length: int, spans) -> np.ndarray:
    cover = np.zeros(length + 1, dtype=np.int64)
    for a, b in spans:
        cover[a] += 1
        cover[b] -= 1
    return np.cumsum(cover)[:length] > 0


@pytest.mark.parametrize("pipeline", [TextParallelPipeline, CodeParallelPipeline])
def test_stored_chunks_cover_every_non_whitespace_character(mixed_corpus, tmp_path, embedder, pipeline):
    """For every stored document, the union of its [char_start, char_end) spans covers every
    non-whitespace character of the file, and each chunk's text is exactly its span."""
    out = tmp_path / "out"
    result = pipeline(config(), embedder=embedder).process_batch([mixed_corpus], output=out)
    chunks = read_chunks(out).to_pandas()
    docs = read_documents(out).to_pandas()
    assert len(docs) == result.documents_ingested >= 20
    for path, group in chunks.groupby("path"):
        text = Path(path).read_bytes().decode("utf-8")  # no newline translation: offsets index this
        for row in group.itertuples():
            assert text[row.char_start:row.char_end] == row.text, (path, row.ordinal)
        covered = _covered(len(text), zip(group.char_start, group.char_end))
        missing = [i for i in np.flatnonzero(~covered) if not text[i].isspace()]
        assert not missing, f"{path}: {len(missing)} characters in no chunk, first at {missing[0]}: " \
                            f"{text[missing[0]:missing[0] + 40]!r}"
        assert sorted(group.ordinal) == list(range(len(group)))
    assert set(chunks.path) == set(docs.path)


def test_pipeline_queues_and_batches_stay_within_their_budgets(tmp_path, embedder):
    """A slow embedder makes the pipeline's own queues fill: each stays within its byte budget (the
    high watermark, or one item when the queue was empty), backpressure really happened, and every
    batch the model got respects the batch budget."""
    corpus = copy_files(stdlib_sources(40), tmp_path / "corpus")
    budget = 256 * 1024
    cfg = config(f"profile.queue_max_bytes={budget}", "profile.queue_max_items=64", "profile.max_batch_tokens=2048",
                 "profile.max_batch_size=16", "profile.length_bucket=16", "profile.high_watermark=0.8",
                 "profile.low_watermark=0.5", profile="low_memory")
    rec = RecordingEmbedder(embedder, delay_s=0.01)
    result = TextParallelPipeline(cfg, embedder=rec).process_batch([corpus], output=tmp_path / "out")
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    queues = metrics["queues"]
    assert set(queues) == {"batches", "embedded"}  # documents travel as slabs, bounded by the ring
    slabs = metrics["slabs"]
    assert slabs["count"] >= cfg.profile.ring_slots and slabs["bytes"] > 0
    for name, q in queues.items():
        assert q["max_bytes"] == budget and q["max_items"] == 64
        assert q["peak_items"] <= 64, name
        assert q["peak_bytes"] <= 0.8 * budget or q["peak_items"] == 1, (name, q)
    # backpressure: the slab ring (workers left without a slab to pack into) or a queue held producers back
    assert slabs["starved_grants"] + sum(q["put_waits"] for q in queues.values()) > 0, "budgets went untested"
    assert rec.calls and result.chunks_written == rec.rows_embedded
    for rows, length in rec.calls:
        assert rows <= 16 and rows * length <= 2048 and length <= cfg.embedder.max_seq_len
        assert length % 16 == 0 or length == cfg.embedder.max_seq_len
    assert metrics["batches"] == len(rec.calls)


def test_binary_and_bad_files_never_cost_a_good_chunk(mixed_corpus, tmp_path, embedder):
    """Adding bad inputs to a corpus changes nothing about the good documents' stored chunks."""
    clean = tmp_path / "clean"
    TextParallelPipeline(config(), embedder=embedder).process_batch([mixed_corpus], output=clean)
    dirty_corpus = tmp_path / "dirty-corpus"
    shutil.copytree(mixed_corpus, dirty_corpus)
    (dirty_corpus / "blob.txt").write_bytes(bytes(range(256)) * 64)
    (dirty_corpus / "bad.md").write_bytes(b"ok \xff\xfe broken \x80")
    (dirty_corpus / "empty.py").write_bytes(b"")
    dirty = tmp_path / "dirty"
    # strict: bad.md is skipped as decode_error (the default, detect, would ingest it as cp1252)
    result = TextParallelPipeline(config("documents.decode_errors=strict"), embedder=embedder).process_batch(
        [dirty_corpus], output=dirty)
    assert {re.sub(r".*/", "", s["path"]) for s in result.skipped} >= {"blob.txt", "bad.md", "empty.py"}
    key = lambda df: sorted(zip(df.path.str.replace(str(dirty_corpus), "", regex=False)  # noqa: E731
                                .str.replace(str(mixed_corpus), "", regex=False), df.ordinal, df.text))
    assert key(read_chunks(dirty).to_pandas()) == key(read_chunks(clean).to_pandas())


def test_code_pipeline_treats_every_file_as_code(mixed_corpus, tmp_path, embedder):
    """CodeParallelPipeline's flag must change something on prose files (a corpus of .py files alone
    would make it a no-op): every stored chunk is code, prose files get language "unknown"."""
    text = TextParallelPipeline(config(), embedder=embedder).process_batch([mixed_corpus], output=tmp_path / "t")
    code = CodeParallelPipeline(config(), embedder=embedder).process_batch([mixed_corpus], output=tmp_path / "c")
    t_docs = read_documents(tmp_path / "t").to_pandas().set_index("rel_path")
    c_docs = read_documents(tmp_path / "c").to_pandas().set_index("rel_path")
    assert set(t_docs.modality) == {"prose", "code"} and set(c_docs.modality) == {"code"}
    prose = t_docs.index[t_docs.modality == "prose"]
    assert len(prose) >= 5 and (c_docs.loc[prose, "language"] == "unknown").all()
    assert set(read_chunks(tmp_path / "c", ["modality"]).column("modality").to_pylist()) == {"code"}
    assert text.documents_ingested == code.documents_ingested
