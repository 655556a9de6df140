"""NN-descent's local join over dense kNN lists (graph/neighbor_lists.py) and its use after the
approximate all-rows search (`knn_ann` with `graph.knn_join_rounds`): never worse, exact cosines,
a fixed point at the exact lists, recall measured not predicted, the search raised when short."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from knn_helpers import K, ann_cfg, clustered, ids_for

from hades_gpu.graph.ann import knn_ann, open_or_build
from hades_gpu.graph.build import knn_edges
from hades_gpu.graph.knn import knn_blocked
from hades_gpu.graph.neighbor_lists import entries_of, join_round, lists_of, lists_recall, top_k_per_row


def _exact_lists(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    src, dst, sim = knn_blocked(x, k, -1.0)
    return lists_of(src, dst, sim, len(x), k)


def _recall(rows: np.ndarray, exact_rows: np.ndarray) -> float:
    return float(np.mean([len(set(a[a >= 0]) & set(b)) / len(b) for a, b in zip(rows, exact_rows)]))


def test_a_join_round_finds_neighbours_of_neighbours_and_keeps_the_list_invariants() -> None:
    x = clustered(2000, clusters=100, spread=1.0, seed=1)
    exact_rows, exact_sims = _exact_lists(x, K)
    rng = np.random.default_rng(0)
    # damaged lists: a third of every row's neighbours replaced by random rows (their true cosines)
    rows = exact_rows.copy()
    swap = rng.random(rows.shape) < 0.33
    rows[swap] = rng.integers(0, len(x), int(swap.sum()))
    rows[rows == np.arange(len(x))[:, None]] = (rows[rows == np.arange(len(x))[:, None]] + 1) % len(x)
    sims = np.einsum("nd,nkd->nk", x, x[rows]).astype(np.float32)
    s, d, w = top_k_per_row(*entries_of(rows, sims), K, len(x))  # sorted, one copy of a repeated row
    rows, sims = lists_of(s, d, w, len(x), K)
    before = _recall(rows, exact_rows)
    new_rows, new_sims, offers = join_round(x, rows, sims)
    after = _recall(new_rows, exact_rows)
    assert offers > 0 and after > before + 0.2 and after > 0.95, (before, after)
    filled = new_rows >= 0
    assert filled.all()
    assert not (new_rows == np.arange(len(x))[:, None]).any()  # never itself
    assert all(len(set(r)) == K for r in new_rows)  # never twice
    assert (np.diff(new_sims, axis=1) <= 0).all()  # best first
    np.testing.assert_allclose(new_sims, np.einsum("nd,nkd->nk", x, x[new_rows]), atol=1e-5)  # exact cosines
    assert (new_sims[:, -1] >= sims[:, -1] - 1e-6).all()  # no row's k-th got worse


def test_the_exact_lists_are_a_fixed_point() -> None:
    x = clustered(800, clusters=40, seed=2)
    rows, sims = _exact_lists(x, K)
    new_rows, new_sims, offers = join_round(x, rows, sims)
    assert offers == 0 and new_rows is rows and new_sims is sims


def test_rows_with_fewer_than_k_neighbours_are_filled() -> None:
    """A short list (padding -1 / -inf) takes any offer: its k-th is -inf."""
    x = clustered(300, clusters=10, seed=3)
    exact_rows, _ = _exact_lists(x, 5)
    rows, sims = _exact_lists(x, 5)
    rows[:, 3:], sims[:, 3:] = -1, -np.inf
    before = _recall(rows, exact_rows)  # 3 of 5
    new_rows, new_sims, _ = join_round(x, rows, sims)
    assert (new_rows >= 0).mean() > 0.85 and _recall(new_rows, exact_rows) > before + 0.05


def test_lists_recall_counts_as_the_tuning_does() -> None:
    top = np.array([[0.9, 0.8, 0.4], [0.7, 0.6, 0.3]], np.float32)
    got = np.array([[0.9, 0.4, -np.inf], [0.7, 0.6, 0.3]], np.float32)
    recall, edges = lists_recall(got, top, 0.5)
    assert recall == pytest.approx(5 / 6)  # ties with the k-th count (0.4 >= 0.4)
    assert edges == pytest.approx(3 / 4)  # 0.8 of row 0 missed; 0.4 and 0.3 are no edges


def test_knn_ann_with_the_join_measures_its_lists_and_beats_the_search_alone(caplog) -> None:
    """At a low nprobe the joined lists reach what the search alone does not; the recall knn_ann
    reports is what an independent full count gives (the tuning's sample: 1,000 of 3,000 rows)."""
    x = clustered(3000, clusters=300, spread=1.5, seed=5)
    exact = knn_blocked(x, K, -1.0)
    exact_pairs = set(zip(exact[0].tolist(), exact[1].tolist()))

    def recall_of(src: np.ndarray, dst: np.ndarray) -> float:
        return len(set(zip(src.tolist(), dst.tolist())) & exact_pairs) / len(exact_pairs)

    plain = ann_cfg(knn_nprobe=2, knn_max_nprobe=2, knn_target_recall=1.0, knn_threshold=-1.0, knn_join_rounds=0)
    idx = open_or_build(ids_for(len(x)), x, K, plain, None)
    alone = recall_of(*knn_ann(idx, x, K, -1.0, plain)[:2])
    joined_cfg = ann_cfg(knn_nprobe=2, knn_max_nprobe=2, knn_target_recall=1.0, knn_threshold=-1.0, knn_join_rounds=3)
    with caplog.at_level(logging.INFO, logger="hades_gpu.graph.ann"):
        src, dst, sim = knn_ann(idx, x, K, -1.0, joined_cfg)
    joined = recall_of(src, dst)
    assert joined > alone + 0.05, (alone, joined)
    assert abs(idx.info.edge_recall - joined) < 0.03 and abs(idx.info.lists_recall_at_k - joined) < 0.03
    assert 1 <= idx.info.join_rounds <= 3 and idx.info.seconds["join"] > 0
    assert any("local join round 1" in r.getMessage() for r in caplog.records)
    # the knn_blocked contract: sorted by src, similarity descending, no self, no pair twice
    assert (np.diff(src) >= 0).all() and not (src == dst).any()
    assert len(set(zip(src.tolist(), dst.tolist()))) == len(src)
    same_row = src[1:] == src[:-1]
    assert (sim[1:][same_row] <= sim[:-1][same_row]).all()


def test_short_lists_after_the_join_search_again_higher(caplog) -> None:
    """The tuning starts the search where the reverse-joined edges are predicted at
    graph.knn_join_start_recall; when the joined lists still fall short of the target, every row is
    searched again at twice the nprobe, and the measured recall meets it."""
    x = clustered(3000, clusters=3000, spread=3.0, seed=4)  # nearly uniform: hard for few lists
    cfg = ann_cfg(knn_nprobe=1, knn_max_nprobe=64, knn_target_recall=0.97, knn_threshold=-1.0,
                  knn_join_rounds=1, knn_join_start_recall=0.3)
    idx = open_or_build(ids_for(len(x)), x, K, cfg, None)
    start = idx.info.edge_nprobe
    with caplog.at_level(logging.INFO, logger="hades_gpu.graph.ann"):
        src, dst, _ = knn_ann(idx, x, K, -1.0, cfg)
    again = [r.getMessage() for r in caplog.records if "searching every row again" in r.getMessage()]
    assert again and idx.info.edge_nprobe > start
    assert idx.info.edge_target_met and idx.info.edge_recall >= 0.97
    exact = knn_blocked(x, K, -1.0)
    found = len(set(zip(src.tolist(), dst.tolist())) & set(zip(exact[0].tolist(), exact[1].tolist())))
    assert found / len(exact[0]) >= 0.95


def test_the_measured_setting_is_saved_so_the_next_build_reuses_the_index(tmp_path: Path, caplog) -> None:
    """knn.json carries what the all-rows search measured (its nprobe and the joined edges' recall),
    not the tuning's prediction below the target, which made every later build re-tune."""
    x = clustered(4000, clusters=400, spread=1.0, seed=6)
    cfg = ann_cfg(knn_threshold=0.5)
    _, _, _, info = knn_edges(ids_for(len(x)), x, cfg, tmp_path)
    assert info["edge_target_met"] and info["join_rounds"] >= 0 and info["lists_recall_at_k"] > 0
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="hades_gpu.graph.ann"):
        _, _, _, again = knn_edges(ids_for(len(x)), x, cfg, tmp_path)
    assert again["reused"] and not any("re-tuning" in r.getMessage() for r in caplog.records)
    assert again["edge_nprobe"] == info["edge_nprobe"] and again["edge_recall"] >= cfg.knn_target_recall


def test_knn_json_and_metrics_hold_no_nan_without_the_join(tmp_path: Path) -> None:
    """`"lists_recall_at_k": NaN` (not JSON) was written when the join was off; and a later build with
    the join off re-tunes an index whose edges' setting was chosen for the join (it reused it, 0.918)."""
    import json

    from hades_gpu.store.layout import knn_index_meta_path

    def strict(text: str) -> dict:
        return json.loads(text, parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))

    x = clustered(3000, clusters=300, spread=1.0, seed=8)
    _, _, _, joined = knn_edges(ids_for(len(x)), x, ann_cfg(knn_threshold=0.5), tmp_path)
    plain_cfg = ann_cfg(knn_threshold=0.5, knn_join_rounds=0)
    _, _, _, plain = knn_edges(ids_for(len(x)), x, plain_cfg, tmp_path)
    meta = strict(knn_index_meta_path(tmp_path).read_text())
    assert meta["join_config"] == 0 and plain["lists_recall_at_k"] is None
    json.dumps(plain, allow_nan=False)
    assert plain["edge_nprobe"] >= joined["edge_nprobe"]  # re-tuned for no join: not the join's lower start
