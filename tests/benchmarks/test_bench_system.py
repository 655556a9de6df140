"""The benchmark package: one corpus builder, the shipped stage timed on documents in memory, one
metrics-to-row function, and the `embed_only` job running that stage."""

from __future__ import annotations

import numpy as np
import pytest

from hades_gpu.benchmarks.corpus import build_corpus, pick_files
from hades_gpu.benchmarks.rows import metrics_row
from hades_gpu.benchmarks.stage import documents_from_texts, embed_documents
from hades_gpu.config import load_pipeline_config
from hades_gpu.documents.tokenizer import special_ids


def test_corpus_builder_is_deterministic_and_keeps_its_share(tmp_path):
    a = build_corpus(tmp_path / "a", 0.3, code_share=1.0, seed=3)
    b = build_corpus(tmp_path / "b", 0.3, code_share=1.0, seed=3)
    names = lambda root: sorted(p.name for p in root.rglob("*") if p.is_file())  # noqa: E731
    assert a == b and names(tmp_path / "a") == names(tmp_path / "b")
    assert a["prose"] == 0 and 0.3e6 <= a["code"] < 0.3e6 + 200_000
    build_corpus(tmp_path / "c", 0.3, code_share=1.0, seed=4)
    assert names(tmp_path / "a") != names(tmp_path / "c")  # another seed, other files
    kinds = {kind for kind, _ in pick_files(0.5, code_share=0.6)}
    assert "code" in kinds


def test_the_stage_on_documents_in_memory_gives_each_chunk_its_own_vector(embedder):
    """Every text comes back with the vector the embedder gives it alone: the shipped stage batches,
    pads and routes them, and nothing of that leaks into a vector."""
    cfg = load_pipeline_config("low_memory")
    texts = [f"document {i}: " + " ".join(["word"] * (3 + 7 * i)) for i in range(23)]
    docs = documents_from_texts(texts, cfg.chunking.chunk_tokens)
    run = embed_documents(cfg, docs, embedder)
    assert run.embeddings.shape == (23, 384) and run.batches == len(run.shapes) > 1
    cls_id, sep_id, _ = special_ids()
    for i in (0, 11, 22):
        ids = np.array([[cls_id, *docs[i].chunks[0].token_ids, sep_id]], dtype=np.int64)
        alone = embedder.embed(ids, np.ones_like(ids))[0]
        assert float(alone @ run.embeddings[i]) > 0.9999
    assert run.real_tokens == sum(len(d.chunks[0].token_ids) + 2 for d in docs)
    assert run.padded_tokens == sum(r * n for r, n in run.shapes) >= run.real_tokens


def test_metrics_row_uses_the_benchmarks_wall_when_given():
    snap = {"wall_s": 2.0, "documents": {"done": 3, "skipped": 1}, "chunks": 10, "batches": 2, "real_tokens": 400,
            "padded_tokens": 500, "padding_efficiency": 0.8, "memory": {"peak_rss_bytes": 123},
            "queues": {"q": {"put_waits": 2, "put_wait_s": 0.5}, "r": {"put_waits": 1, "put_wait_s": 0.25}},
            "stages": {"embed": {"items_per_s": 5.0, "busy_s": 1.5}}, "embedder": "x"}
    row = metrics_row(snap)
    assert (row["chunks_per_s"], row["tokens_per_s"], row["pipeline_s"]) == (5.0, 200.0, 2.0)
    assert (row["backpressure_waits"], row["backpressure_wait_s"]) == (3, 0.75) and row["embedder"] == "x"
    slow = metrics_row(snap, wall_s=4.0)
    assert (slow["chunks_per_s"], slow["pipeline_chunks_per_s"], slow["wall_s"]) == (2.5, 5.0, 4.0)
    assert metrics_row({**snap, "wall_s": 0.0})["chunks_per_s"] == 0.0
    with pytest.raises(KeyError):
        metrics_row({"wall_s": 1.0})
