"""Approximate kNN (graph/ann.py): recall against exact blocks, the knn_blocked contract, the saved
index (round trip, stale, damaged) and the ANN path through build_graph on a real ingest."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from hades_gpu.config import GraphConfig
from hades_gpu.graph.ann import (AnnIndex, IndexUnusable, fingerprint, knn_ann, load_index, merge_reverse, normalise,
                                 open_or_build)
from hades_gpu.graph.build import knn_edges
from hades_gpu.graph.knn import knn_blocked
from hades_gpu.store.layout import knn_index_ids_path, knn_index_meta_path, knn_index_path
from knn_helpers import K, ann_cfg, clustered, ids_for

@pytest.mark.parametrize("spec", ["IVF{nlist}_HNSW32,PQ{pq_m}x4fs,RFlat", "IVF{nlist},Flat"])
def test_ann_edges_meet_the_target_recall_and_the_knn_blocked_contract(tmp_path: Path, spec: str) -> None:
    x = clustered(5000 if "PQ" in spec else 3000)  # the PQ default needs >= 4096 vectors
    x[[3, 400]] = 0.0  # missing embeddings: no neighbours, nobody's neighbour
    threshold = 0.3
    cfg = ann_cfg(knn_threshold=threshold, knn_index=spec)
    assert GraphConfig().knn_index == "IVF{nlist}_HNSW32,PQ{pq_m}x4fs,RFlat"  # the default is tested here
    src, dst, sim, info = knn_edges(ids_for(len(x)), x, cfg, tmp_path)
    assert info["method"] == "ann" and info["index_type"].endswith(spec.split(",", 1)[1].replace("{pq_m}", "96"))
    assert info["recall_at_k"] >= cfg.knn_target_recall and info["target_met"]
    assert info["recall_sample"] == cfg.knn_recall_sample and info["nprobe"] >= 1
    assert info["nprobe"] > 1  # nprobe=1 does not reach the target on this data: the loop raised it

    es, ed, esim = knn_blocked(x, K, -1.0)  # exact top-k without the threshold
    exact = set(zip(es.tolist(), ed.tolist()))
    got = set(zip(src.tolist(), dst.tolist()))
    # every exact neighbour at or above the threshold that ANN missed counts against recall
    exact_kept = {p for p, s in zip(zip(es.tolist(), ed.tolist()), esim) if s >= threshold}
    assert len(got & exact_kept) / len(exact_kept) >= cfg.knn_target_recall
    assert len(got - exact) / len(got) <= 1 - cfg.knn_target_recall  # found pairs are (mostly) true neighbours
    assert (sim >= threshold).all()
    assert (src != dst).all()
    assert not ({3, 400} & (set(src.tolist()) | set(dst.tolist())))
    np.testing.assert_allclose(sim, np.einsum("ij,ij->i", x[src], x[dst]), atol=1e-5)  # true cosines
    assert np.bincount(src, minlength=len(x)).max() <= K
    order = np.lexsort((dst, -sim, src))
    assert (order == np.arange(len(src))).all()  # sorted like knn_blocked


def test_a_threshold_above_every_similarity_gives_no_knn_edges() -> None:
    x = clustered(3000, clusters=300, spread=1.5, seed=8)
    src, dst, sim, info = knn_edges(ids_for(len(x)), x, ann_cfg(knn_threshold=0.999), None)
    assert info["method"] == "ann" and len(src) == len(dst) == len(sim) == 0
    assert info["edge_recall"] == 1.0  # no true edge to miss


def test_exact_stays_below_the_threshold_node_count() -> None:
    x = clustered(500)
    cfg = GraphConfig(knn_k=K, knn_threshold=0.2, knn_exact_max_nodes=500)
    src, dst, sim, info = knn_edges(ids_for(len(x)), x, cfg, None)
    ref = knn_blocked(x, K, 0.2)
    assert info["method"] == "exact"
    np.testing.assert_array_equal(src, ref[0])
    np.testing.assert_array_equal(dst, ref[1])


def test_saved_index_round_trip_gives_identical_answers(tmp_path: Path) -> None:
    x = clustered(2000, seed=1)
    ids = ids_for(len(x))
    cfg = ann_cfg()
    built = open_or_build(ids, x, K, cfg, tmp_path)
    assert knn_index_path(tmp_path).is_file() and knn_index_meta_path(tmp_path).is_file()
    loaded = load_index(tmp_path, cfg, check_current=False)
    assert loaded.info.reused and loaded.nprobe == built.nprobe
    assert loaded.fingerprint == fingerprint(ids, x)
    queries = clustered(50, seed=7)
    b_ids, b_sims = built.search(queries, 5)
    l_ids, l_sims = loaded.search(queries, 5)
    np.testing.assert_array_equal(b_ids, l_ids)
    np.testing.assert_array_equal(b_sims, l_sims)
    cids, _ = loaded.search_chunk_ids(queries, 5)
    assert cids[0, 0] == ids[l_ids[0, 0]]
    # the reopened index of unchanged chunks is reused, not rebuilt
    again = open_or_build(ids, x, K, cfg, tmp_path)
    assert again.info.reused


def test_stale_fingerprint_triggers_a_rebuild(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    x = clustered(2000, seed=2)
    ids = ids_for(len(x))
    cfg = ann_cfg()
    open_or_build(ids, x, K, cfg, tmp_path)
    x2 = x.copy()
    x2[10] = x2[11]  # one chunk's embedding changed
    with caplog.at_level(logging.WARNING, logger="hades_gpu.graph.ann"):
        idx = open_or_build(ids, x2, K, cfg, tmp_path)
    assert not idx.info.reused
    assert any("stale" in r.getMessage() and "rebuilding" in r.getMessage() for r in caplog.records)
    assert load_index(tmp_path, cfg, check_current=False).fingerprint == fingerprint(ids, x2)  # the rebuilt one was saved
    found, _ = idx.search(x2[[10]], 2)
    assert set(found[0].tolist()) == {10, 11}  # answers come from the new vectors


@pytest.mark.parametrize("damage", ["flip_index", "truncate_index", "ids", "meta", "meta_list", "meta_null"])
def test_damaged_index_is_reported_and_rebuilt(tmp_path: Path, caplog: pytest.LogCaptureFixture, damage: str) -> None:
    """A flipped byte, a cut file, and a knn.json that is valid JSON of the wrong shape or with null
    where a number goes (each crashed hades-isne with a traceback: a user's hand edit)."""
    x = clustered(2000, seed=3)
    ids = ids_for(len(x))
    cfg = ann_cfg()
    ref = open_or_build(ids, x, K, cfg, tmp_path)
    expect = ref.search(x[:20], 5)
    path = {"flip_index": knn_index_path, "truncate_index": knn_index_path, "ids": knn_index_ids_path,
            "meta": knn_index_meta_path, "meta_list": knn_index_meta_path,
            "meta_null": knn_index_meta_path}[damage](tmp_path)
    data = bytearray(path.read_bytes())
    if damage == "truncate_index":
        data = data[: len(data) // 2]
    elif damage == "meta_list":
        data = bytearray(b"[]")
    elif damage == "meta_null":
        data = bytearray(json.dumps({**json.loads(bytes(data)), "edge_nprobe": None}).encode())
    else:
        data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(IndexUnusable) as err:
        load_index(tmp_path, cfg, check_current=False)
    # the one line names the damaged file and says so (a checksum mismatch, or what could not be read)
    assert path.name in str(err.value) and "damaged" in str(err.value), str(err.value)
    with caplog.at_level(logging.WARNING, logger="hades_gpu.graph.ann"):
        idx = open_or_build(ids, x, K, cfg, tmp_path)
    lines = [r.getMessage() for r in caplog.records if "rebuilding" in r.getMessage()]
    assert len(lines) == 1 and "damaged" in lines[0], lines
    assert not idx.info.reused
    got = idx.search(x[:20], 5)
    np.testing.assert_array_equal(got[0], expect[0])
    assert load_index(tmp_path, cfg, check_current=False).info.reused  # the rebuilt index was saved and now loads


@pytest.mark.parametrize("join_rounds", [0, 2])
def test_recall_cap_is_one_clear_line(caplog: pytest.LogCaptureFixture, join_rounds: int) -> None:
    """Without the local join the tuning says it; with it, the all-rows search, which measures the
    joined lists (the tuning only predicts where the search starts)."""
    x = clustered(3000, clusters=3000, spread=3.0, seed=4)  # nearly uniform: hard for 1 of many lists
    cfg = ann_cfg(knn_max_nprobe=1, knn_target_recall=0.99, knn_threshold=-1.0,  # every top-k is an edge
                  knn_join_rounds=join_rounds)
    with caplog.at_level(logging.WARNING, logger="hades_gpu.graph.ann"):
        idx = open_or_build(ids_for(len(x)), x, K, cfg, None)
        knn_ann(idx, x, K, -1.0, cfg)
    assert idx.nprobe == 1 and not idx.info.target_met and idx.info.recall_at_k < 0.99
    assert not idx.info.edge_target_met and idx.info.join_rounds == min(join_rounds, idx.info.join_rounds)
    lines = [r.getMessage() for r in caplog.records if "knn_target_recall" in r.getMessage()]
    assert len(lines) == 1 and "knn_max_nprobe=1" in lines[0], lines


def test_edges_are_searched_at_the_setting_tuned_for_them(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Clusters of ~10 rows and k = 10: a row's cluster-mates are its edges above the threshold (in
    its own list), its last neighbours far points that only many lists find. The edges get a lower
    nprobe than plain recall@k needs and still meet the target against an independent exact count;
    the index keeps (and saves) the setting tuned for queries."""
    x = clustered(4000, clusters=400, spread=1.0, seed=6)
    threshold = 0.5
    cfg = ann_cfg(knn_threshold=threshold)
    src, dst, sim, info = knn_edges(ids_for(len(x)), x, cfg, tmp_path)
    assert info["edge_nprobe"] < info["nprobe"]  # the point: fewer lists for the edges
    assert info["edge_threshold"] == threshold
    assert info["edge_recall"] >= cfg.knn_target_recall and info["edge_target_met"]
    assert info["recall_at_k"] >= cfg.knn_target_recall and info["target_met"]
    es, ed, _ = knn_blocked(x, K, threshold)  # the exact edges
    exact = set(zip(es.tolist(), ed.tolist()))
    assert len(set(zip(src.tolist(), dst.tolist())) & exact) / len(exact) >= cfg.knn_target_recall

    idx = open_or_build(ids_for(len(x)), x, K, cfg, tmp_path)
    assert idx.info.reused and idx.nprobe == info["nprobe"] and idx.info.edge_nprobe == info["edge_nprobe"]
    again = knn_ann(idx, x, K, threshold)
    assert idx.nprobe == info["nprobe"]  # restored after the edges' search
    # the edges' search ran at edge_nprobe: the same edges as an unthresholded search there, cut
    idx.nprobe = info["edge_nprobe"]
    s_all, d_all, sim_all = knn_ann(idx, x, K, -1.0)  # another threshold: the index's current setting
    idx.nprobe = info["nprobe"]
    seen: list[int] = []
    search = idx.search

    def recording_search(queries: np.ndarray, k: int):
        seen.append(idx.nprobe)
        return search(queries, k)

    idx.search = recording_search  # type: ignore[method-assign]
    knn_ann(idx, x, K, 0.45)  # a threshold the edges were not tuned at: searched at the queries' setting
    assert set(seen) == {info["nprobe"]}, seen
    seen.clear()
    knn_ann(idx, x, K, threshold)  # the tuned threshold: at the edges' setting
    assert set(seen) == {info["edge_nprobe"]} and idx.nprobe == info["nprobe"], seen
    del idx.search
    cut = sim_all >= threshold
    assert set(zip(again[0].tolist(), again[1].tolist())) == set(zip(s_all[cut].tolist(), d_all[cut].tolist()))
    # ... where plain recall@k is below the target: that setting would not do for queries
    ps, pd, _ = knn_blocked(x, K, -1.0)
    plain = len(set(zip(s_all.tolist(), d_all.tolist())) & set(zip(ps.tolist(), pd.tolist()))) / len(ps)
    assert plain < cfg.knn_target_recall

    # another threshold re-tunes the saved index (not a rebuild); an index saved without the edge
    # recall (an older output) is re-tuned too
    for change in ("threshold", "older_meta"):
        meta_path = knn_index_meta_path(tmp_path)
        if change == "older_meta":
            meta = json.loads(meta_path.read_text())
            for key in ("threshold", "edge_recall", "edge_nprobe", "edge_refine_factor", "edge_target_met"):
                meta.pop(key)
            meta_path.write_text(json.dumps(meta))
        cfg2 = ann_cfg(knn_threshold=0.45 if change == "threshold" else threshold)
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="hades_gpu.graph.ann"):
            idx = open_or_build(ids_for(len(x)), x, K, cfg2, tmp_path)
        assert idx.info.reused and idx.info.threshold == cfg2.knn_threshold, change
        assert any("re-tuning" in r.getMessage() for r in caplog.records), change
        assert not any("rebuilding" in r.getMessage() for r in caplog.records), change
        assert idx.info.edge_recall >= cfg2.knn_target_recall
        assert json.loads(meta_path.read_text())["threshold"] == cfg2.knn_threshold  # saved re-tuned


def test_the_hnsw_quantizer_search_width_follows_nprobe_down_as_well_as_up() -> None:
    """The edges' search runs at a lower nprobe than the tuning ended on: the quantizer's efSearch
    must come down with it (a width left from a high nprobe slows every query)."""
    import faiss

    x = clustered(5000)
    idx = open_or_build(ids_for(len(x)), x, K, ann_cfg(knn_index=GraphConfig().knn_index), None)
    quantizer = faiss.downcast_index(idx.ivf.quantizer)
    idx.nprobe = 64
    assert quantizer.hnsw.efSearch == 128
    idx.nprobe = 4
    assert quantizer.hnsw.efSearch == 16  # FAISS's default, the floor
    with idx.setting(idx.info.edge_nprobe, idx.info.edge_refine_factor):
        assert quantizer.hnsw.efSearch == max(16, 2 * idx.info.edge_nprobe)
    assert idx.nprobe == 4 and quantizer.hnsw.efSearch == 16


def test_recall_measurement_matches_an_independent_count() -> None:
    """Both recalls the index reports are what a full comparison against exact search gives
    (roughly: the sample is 1000 of 3000 rows), at a deliberately low nprobe (2: at 1 a neighbour
    in another list never probes the row's own, so the join adds nothing): recall@k of a plain
    query search of every row, and the edges' recall of `knn_ann`'s output (its reverse join
    included; threshold -1: every top-k neighbour is an edge)."""
    x = clustered(3000, clusters=300, spread=1.5, seed=5)
    cfg = ann_cfg(knn_nprobe=2, knn_max_nprobe=2, knn_target_recall=1.0, knn_threshold=-1.0)
    idx = open_or_build(ids_for(len(x)), x, K, cfg, None)
    exact = knn_blocked(x, K, -1.0)
    exact_pairs = set(zip(exact[0].tolist(), exact[1].tolist()))

    def recall_of(src: np.ndarray, dst: np.ndarray) -> float:
        return len(set(zip(src.tolist(), dst.tolist())) & exact_pairs) / len(exact_pairs)

    rows = np.arange(len(x))
    own, _ = idx.first_k(normalise(x)[0], rows, K)
    queries = recall_of(np.repeat(rows, K)[own.ravel() >= 0], own.ravel()[own.ravel() >= 0])
    src, dst, _ = knn_ann(idx, x, K, -1.0)
    edges = recall_of(src, dst)
    assert queries < 0.99  # the test is not vacuous: this setting misses neighbours
    assert edges > queries + 0.02  # the reverse join finds what one side missed
    assert abs(idx.info.recall_at_k - queries) < 0.05
    assert abs(idx.info.edge_recall - edges) < 0.05


def test_merge_reverse_joins_both_directions_keeps_the_best_k_and_sorts() -> None:
    # row 0 found 1 (0.9) and 2 (0.5); row 3 found 0 (0.8); row 1 found 0 (0.9): the same pair both ways
    src = np.array([0, 0, 1, 3], np.int64)
    dst = np.array([1, 2, 0, 0], np.int64)
    sim = np.array([0.9, 0.5, 0.9, 0.8], np.float32)
    s, d, w = merge_reverse(src, dst, sim, 2, 4)
    got = [(a, b, round(c, 3)) for a, b, c in zip(s.tolist(), d.tolist(), w.tolist())]
    # 0: {1 0.9, 3 0.8 (reverse), 2 0.5} -> best 2; 1: {0}; 2: {0 (reverse)}; 3: {0}
    assert got == [(0, 1, 0.9), (0, 3, 0.8), (1, 0, 0.9), (2, 0, 0.5), (3, 0, 0.8)]
    # ties: similarity descending, then dst ascending
    s, d, w = merge_reverse(np.array([5, 5, 2], np.int64), np.array([4, 1, 5], np.int64),
                            np.array([0.7, 0.7, 0.7], np.float32), 3, 6)
    assert list(zip(s.tolist(), d.tolist())) == [(1, 5), (2, 5), (4, 5), (5, 1), (5, 2), (5, 4)]
    # a pair found both ways with different similarities (PQ-only distances): once, the larger one
    s, d, w = merge_reverse(np.array([0, 1], np.int64), np.array([1, 0], np.int64),
                            np.array([0.6, 0.7], np.float32), 2, 2)
    assert list(zip(s.tolist(), d.tolist(), w.tolist())) == [(0, 1, np.float32(0.7)), (1, 0, np.float32(0.7))]
    # nothing found (every neighbour below the threshold): nothing, not an error
    s, d, w = merge_reverse(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32), 3, 5)
    assert len(s) == len(d) == len(w) == 0
    # negative similarities sort below positive ones, descending
    s, d, w = merge_reverse(np.array([0, 0, 0, 0], np.int64), np.array([1, 2, 3, 4], np.int64),
                            np.array([-0.5, 0.25, -0.0, -1.0], np.float32), 4, 5)
    assert d[s == 0].tolist() == [2, 3, 1, 4]


def test_build_graph_on_a_real_ingest_takes_the_ann_path(tmp_path: Path, embedder) -> None:
    """A real ingest (sample corpus, the local embedder) with graph.knn_exact_max_nodes=1: the
    edges.parquet is valid, records the ANN method, and (one IVF list: exhaustive) its kNN edges
    are the exact ones."""
    from corpus_helpers import SAMPLE_CORPUS

    from hades_gpu.config import load_pipeline_config
    from hades_gpu.graph import build_graph, load_graph
    from hades_gpu.pipelines.ingest import TextParallelPipeline

    out = tmp_path / "out"
    cfg = load_pipeline_config("balanced", ["isne.enabled=false", "monitoring.progress=off"])
    TextParallelPipeline(cfg, embedder=embedder).process_batch([SAMPLE_CORPUS], output=out)
    exact = build_graph(out, cfg.graph)
    exact_knn = pq.read_table(out / "edges.parquet").to_pydict()
    cfg.graph.knn_exact_max_nodes = 1
    g = build_graph(out, cfg.graph)
    assert g.knn["method"] == "ann" and g.knn["recall_at_k"] == 1.0 and g.metrics()["knn"]["nprobe"] >= 1
    assert exact.knn["method"] == "exact"
    t = pq.read_table(out / "edges.parquet").to_pydict()

    def knn_pairs(d: dict) -> dict:
        return {(s, e): w for s, e, k, w in zip(d["src_chunk_id"], d["dst_chunk_id"], d["type"], d["weight"])
                if k == "knn"}

    # the same pairs; weights to float32 rounding (FAISS's inner product and the exact matrix product
    # sum in different orders: a weight on a 5th-decimal rounding edge once came out 0.73193 vs 0.73194)
    ann_pairs, exact_pairs = knn_pairs(t), knn_pairs(exact_knn)
    assert ann_pairs.keys() == exact_pairs.keys() and ann_pairs
    assert max(abs(ann_pairs[p] - exact_pairs[p]) for p in ann_pairs) < 1e-5
    data = load_graph(out)
    assert data.num_nodes == g.num_nodes and data.edge_index.shape[1] > 0
    assert knn_index_path(out).is_file()


def test_a_saved_index_serves_only_the_k_threshold_and_target_it_was_measured_at() -> None:
    """`tuned_for`: a saved index is re-tuned when k, the threshold or the target differ from what
    it measured (or either recall is below the target); reused as is only when all match."""
    from hades_gpu.graph.ann import AnnInfo, tuned_for

    cfg = ann_cfg(knn_threshold=0.5, knn_target_recall=0.95)
    info = AnnInfo(k=K, threshold=0.5, recall_at_k=0.96, edge_recall=0.97, join_config=cfg.knn_join_rounds)
    assert tuned_for(info, K, cfg)
    # a setting chosen with the local join after it is too low without (a user's reuse went to 0.918)
    assert not tuned_for(info, K, ann_cfg(knn_threshold=0.5, knn_target_recall=0.95, knn_join_rounds=0))
    assert not tuned_for(AnnInfo(k=K, threshold=0.5, recall_at_k=0.96, edge_recall=0.97), K, cfg)  # older index
    assert not tuned_for(info, K + 5, cfg)  # measured at another k
    assert not tuned_for(info, K, ann_cfg(knn_threshold=0.6, knn_target_recall=0.95))
    assert not tuned_for(info, K, ann_cfg(knn_threshold=0.5, knn_target_recall=0.965))  # plain recall short
    assert not tuned_for(info, K, ann_cfg(knn_threshold=0.5, knn_target_recall=0.975))  # both short
    assert not tuned_for(AnnInfo(k=K, threshold=0.5, recall_at_k=0.96, edge_recall=float("nan"),
                                 join_config=cfg.knn_join_rounds), K, cfg)


def test_ann_edges_on_fewer_rows_than_k() -> None:
    """k above the rows there are: every other row is a neighbour (at threshold -1), each once."""
    x = clustered(6, clusters=2, seed=9)
    index = AnnIndex.build(ids_for(6), x, ann_cfg())
    src, dst, sim = knn_ann(index, x, K, -1.0)
    assert sorted(zip(src.tolist(), dst.tolist())) == [(i, j) for i in range(6) for j in range(6) if i != j]
    assert bool((np.diff(src) >= 0).all()) and sim.dtype == np.float32



def test_an_index_of_an_earlier_state_of_the_chunks_is_noted_by_verify_and_removed_by_an_exact_build(
        tmp_path: Path, embedder) -> None:
    """Chunks removed after an ANN build, then the graph built exactly: the index left behind was
    reported clean by hades-verify while search refused it as stale (a user's find). verify notes it;
    the exact build removes it (and keeps an index that is still current)."""
    import shutil

    from corpus_helpers import SAMPLE_CORPUS

    from hades_gpu.config import load_pipeline_config
    from hades_gpu.graph import build_graph
    from hades_gpu.pipelines.ingest import TextParallelPipeline
    from hades_gpu.store.verify import verify_output

    corpus, out = tmp_path / "corpus", tmp_path / "out"
    shutil.copytree(SAMPLE_CORPUS, corpus)
    cfg = load_pipeline_config("balanced", ["isne.enabled=false", "monitoring.progress=off",
                                            "documents.remove_missing=true"])
    TextParallelPipeline(cfg, embedder=embedder).process_batch([corpus], output=out)
    cfg.graph.knn_exact_max_nodes = 1
    build_graph(out, cfg.graph)
    assert knn_index_meta_path(out).is_file()
    cfg.graph.knn_exact_max_nodes = 10 ** 6
    build_graph(out, cfg.graph)  # the same chunks, built exactly: the index is still theirs, kept
    assert knn_index_meta_path(out).is_file()
    assert not [n for n in verify_output(out).notes if "kNN index" in n]
    victim = sorted(p for p in corpus.rglob("*") if p.is_file())[0]
    victim.unlink()
    TextParallelPipeline(cfg, embedder=embedder).process_batch([corpus], output=out)
    notes = [n for n in verify_output(out).notes if "kNN index" in n]
    assert len(notes) == 1 and "earlier state of the chunks" in notes[0], verify_output(out).notes
    build_graph(out, cfg.graph)
    assert not knn_index_meta_path(out).exists() and not knn_index_path(out).exists()
    assert not knn_index_ids_path(out).exists()
    assert not [n for n in verify_output(out).notes if "kNN index" in n]
