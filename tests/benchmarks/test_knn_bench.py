"""The kNN benchmark's rows (benchmarks/knn_bench.py): labelled data, measured recall, extrapolation."""

from __future__ import annotations

import json

import numpy as np

from hades_gpu.benchmarks.knn_bench import SYNTHETIC, main, synthetic_chunk_embeddings
from hades_gpu.config import GraphConfig


def test_synthetic_vectors_are_unit_and_clustered() -> None:
    x = synthetic_chunk_embeddings(2000, 64, seed=1)
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-5)
    s = x @ x.T
    np.fill_diagonal(s, -1)
    assert np.median(s.max(axis=1)) > s.mean() + 0.2  # neighbours are much closer than random pairs


def test_bench_rows_and_json(tmp_path) -> None:
    out = tmp_path / "bench_knn.json"
    assert main(["--sizes", "2000", "--exact-sizes", "2000", "--dim", "64", "--k", "5", "--out", str(out)]) == 0
    assert main(["--sizes", "3000", "--exact-sizes", "", "--dim", "64", "--k", "5", "--out", str(out),
                 "--threshold", "0.6", "--sweep-sizes", "3000", "--sweep-nprobes", "1,2,64"]) == 0
    saved = json.loads(out.read_text())
    rows = saved["rows"]
    ann = [r for r in rows if r["method"] == "ann"]
    assert {r["n"] for r in ann} == {2000, 3000} and all(r["data"] == SYNTHETIC for r in rows)
    assert all(0.9 <= r["recall_at_k"] <= 1.0 and r["recall_sample"] == 1000 for r in ann)
    # the edges are built (and their recall measured) at the threshold asked for, the pipeline's default otherwise
    assert {r["n"]: r["threshold"] for r in ann} == {2000: GraphConfig().knn_threshold, 3000: 0.6}
    assert all(r["edge_recall"] >= 0.95 and r["edge_target_met"] and 1 <= r["edge_nprobe"] <= r["nprobe"] for r in ann)
    # the sweep: one row per setting on one index, recall rising with nprobe, extrapolated times labelled
    sweep = saved["sweeps"]
    assert [r["nprobe"] for r in sweep] == [1, 2, 64] and all(r["n"] == 3000 and r["threshold"] == 0.6 for r in sweep)
    assert sweep[0]["recall_at_k"] < sweep[2]["recall_at_k"] and sweep[2]["edge_recall"] >= 0.99
    assert all(r["all_rows_search_s_extrapolated"] > 0 and r["timed_queries"] == 3000 for r in sweep)
    exact = {r["n"]: r for r in rows if r["method"] == "exact"}
    assert not exact[2000]["extrapolated"] and exact[3000]["extrapolated"]
    assert abs(exact[3000]["total_s"] - exact[2000]["total_s"] * 2.25) < 1e-6 * max(exact[3000]["total_s"], 1)
