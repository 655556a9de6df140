"""`shard=i/n` by hand (a user's own scheduler): n runs write exactly the single-box run's chunks,
each once; a shard re-run is a no-op; the graph and ISNE stage runs once over all shards."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from corpus_helpers import SAMPLE_CORPUS, copy_files, stdlib_sources

from hades_gpu.config import load_pipeline_config
from hades_gpu.pipelines import ISNETrainingPipeline, TextParallelPipeline
from hades_gpu.store.reader import read_chunks, read_isne_embeddings
from hades_gpu.store.shard_map import ShardMapError, read_shard_done

COLUMNS = ["chunk_id", "doc_id", "text", "char_start", "char_end", "embedding"]


def by_chunk(out) -> dict[str, dict]:
    rows = read_chunks(out, COLUMNS).to_pylist()
    ids = [r["chunk_id"] for r in rows]
    assert len(ids) == len(set(ids)), "a chunk was written twice"
    return {r["chunk_id"]: r for r in rows}


def same_chunks(a: dict[str, dict], b: dict[str, dict]) -> float:
    """Asserts equal ids, texts and offsets; returns the smallest embedding cosine."""
    assert a.keys() == b.keys()
    worst = 1.0
    for cid, ra in a.items():
        rb = b[cid]
        assert (ra["text"], ra["char_start"], ra["char_end"], ra["doc_id"]) == (rb["text"], rb["char_start"],
                                                                               rb["char_end"], rb["doc_id"])
        x, y = np.asarray(ra["embedding"]), np.asarray(rb["embedding"])
        worst = min(worst, float(x @ y / (np.linalg.norm(x) * np.linalg.norm(y))))
    return worst


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    base = tmp_path_factory.mktemp("shard_corpus")
    dest = copy_files(stdlib_sources(10), base / "corpus" / "code")
    copy_files(sorted(p for p in SAMPLE_CORPUS.rglob("*") if p.is_file()), base / "corpus" / "prose")
    return dest.parent


def cfg_for(shard: str = "s0", isne: bool = False):
    return load_pipeline_config("balanced", [f"shard={shard}", "monitoring.progress=off", f"isne.enabled={str(isne).lower()}",
                                             "isne.epochs=2", "profile.num_workers=1"])


def test_three_shard_runs_write_the_single_box_chunks_once_each(tmp_path, corpus, embedder, caplog):
    TextParallelPipeline(cfg_for(), embedder=embedder).process_batch([corpus], output=tmp_path / "single")
    single = by_chunk(tmp_path / "single")

    sharded = tmp_path / "sharded"
    counts = []
    with caplog.at_level(logging.INFO, logger="hades_gpu.pipelines.ingest"):
        for i in range(3):
            r = TextParallelPipeline(cfg_for(f"{i}/3", isne=True), embedder=embedder).process_batch([corpus], output=sharded)
            assert r.isne is None  # left for one run over all shards
            counts.append(r.documents_ingested)
            record = read_shard_done(sharded, f"s{i}of3")
            assert record is not None and record["documents_ingested"] == r.documents_ingested
    assert "graph and ISNE stage runs once over all shards" in caplog.text
    assert sum(counts) == len({r["doc_id"] for r in single.values()}) and min(counts) > 0
    assert same_chunks(by_chunk(sharded), single) >= 0.99999

    again = TextParallelPipeline(cfg_for("1/3"), embedder=embedder).process_batch([corpus], output=sharded)
    assert again.chunks_written == 0 and again.documents_unchanged == counts[1]

    with pytest.raises(ShardMapError, match="split into 3 shards"):
        TextParallelPipeline(cfg_for(), embedder=embedder).process_batch([corpus], output=sharded)
    with pytest.raises(ShardMapError, match="not 4"):
        TextParallelPipeline(cfg_for("0/4"), embedder=embedder).process_batch([corpus], output=sharded)

    ISNETrainingPipeline(cfg_for(isne=True)).train(corpus_path=sharded, epochs=2)
    ids, vecs = read_isne_embeddings(sharded)
    assert sorted(ids) == sorted(single) and vecs.shape[0] == len(single)  # one file, every chunk once


def test_the_graph_stage_over_a_sharded_output_with_a_shard_missing_says_so(tmp_path, embedder, caplog):
    """The README's scheduler recipe (one job per shard, then hades-isne): a failed job went unnoticed,
    the graph covered half the corpus, exit 0, not a word."""
    from hades_gpu.isne.stage import run_isne_stage

    corpus = copy_files(stdlib_sources(6, max_bytes=6_000), tmp_path / "corpus")
    out = tmp_path / "out"
    TextParallelPipeline(cfg_for("0/2"), embedder=embedder).process_batch([corpus], output=out)
    with caplog.at_level(logging.WARNING, logger="hades_gpu.isne.stage"):
        run_isne_stage(cfg_for(isne=True), out)
    warned = [r.getMessage() for r in caplog.records if "have not finished" in r.getMessage()]
    assert len(warned) == 1 and warned[0].startswith("1 of 2 shard(s)") and "s1of2" in warned[0], caplog.text
