"""The graph-side benchmarks run and report what they claim (speed itself is never asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from hades_gpu.config import load_pipeline_config

REPO = Path(__file__).resolve().parents[2]


def test_bench_isne_reports_each_size_and_the_scaling_summary(tmp_path: Path) -> None:
    """scripts/bench_isne.py end to end on two small sizes: one child process per size, the table,
    the JSON rows and the 1e5 -> 1e6 summary only when both sizes ran."""
    out = tmp_path / "isne.json"
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "bench_isne.py"), "--sizes", "2000,4000",
                           "--max-batches", "2", "--batch-size", "256", "--threads", "1", "--out", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(out.read_text())
    rows = data["sizes"]
    assert [r["nodes"] for r in rows] == [2000, 4000] and data["summary"] == {}
    for r in rows:
        assert r["edges"] > 0 and r["pairs_per_s"] > 0 and r["epoch_seconds"] > 0 and r["peak_rss_mb"] > 0
        assert r["batches_timed_per_epoch"] == 2 and r["epoch_extrapolated"] is True
        assert r["optimizer"] == "rowwise_adagrad" and r["negative_pool"] == 4096
        assert 0 < r["theta_rows_per_step"] <= r["nodes"]
    assert "| 2,000 |" in proc.stdout and "| 4,000 |" in proc.stdout


def test_real_corpus_isne_compares_weighted_and_unweighted_edges(tmp_path: Path, embedder) -> None:
    """The real-corpus ISNE benchmark on a small stdlib package corpus: labels are packages, both
    runs train the same epochs, and the weights change the vectors (so the comparison measures
    something)."""
    from hades_gpu.benchmarks import isne_real

    cfg = load_pipeline_config(profile="low_memory", overrides=["monitoring.progress=off", "isne.dim=16"])
    r = isne_real.run(cfg, tmp_path, megabytes=0.25, epochs=2, min_per_class=5, embedder=embedder)
    assert r["nodes"] > 50 and r["edges"] > r["nodes"] and len(r["classes"]) >= 3
    assert r["labelled_chunks"] <= r["nodes"] and all(n in r["edges_by_type"] for n in ("sequence", "knn"))
    assert r["corpus"]["documents"] > 0 and r["ingest_wall_s"] > 0
    assert set(r["runs"]) == {"weighted", "unweighted"}
    for run in r["runs"].values():
        assert 0 <= run["accuracy"] <= 1 and run["epochs"] == 2 and run["pairs_per_s"] > 0
    assert 0 <= r["text_accuracy"] <= 1
    # same seed and epochs: only the weights differ, and they must change the vectors
    assert r["runs"]["weighted"]["vector_sum"] != r["runs"]["unweighted"]["vector_sum"]
    assert "ISNE, weighted edges" in isne_real.table(r)
    assert np.isfinite(r["graph_seconds"])
    # new documents: every seventh document held out of training, inferred with 0 and 2 rounds
    ind = r["inductive"]
    assert ind["held_out_documents"] >= 1 and 0 < ind["labelled_held_out"] <= ind["held_out_chunks"] < r["nodes"]
    assert set(k for k in ind if k.startswith("rounds_")) == {"rounds_0", "rounds_2"}
    assert all(0 <= ind[k]["accuracy"] <= 1 for k in ("rounds_0", "rounds_2"))
    assert ind["rounds_2"]["zero_vectors"] <= ind["rounds_0"]["zero_vectors"]  # rounds only add information
    assert "new documents inferred, infer_rounds=2" in isne_real.table(r)


def test_the_graph_job_reports_knn_and_isne_rows(tmp_path: Path) -> None:
    """`hades-bench bench=graph` (run_job) on the sample corpus with tiny sizes: kNN rows (real and
    SYNTHETIC-labelled), ISNE rows for each planted-partition size and the corpus's chunk graph."""
    from hades_gpu.benchmarks import jobs
    from hades_gpu.benchmarks.config import BenchConfig

    cfg = load_pipeline_config(profile="low_memory", overrides=["monitoring.progress=off", "isne.dim=16",
                                                                "graph.knn_threshold=0.55"])
    cfg.corpus = str(REPO / "examples" / "sample_corpus")
    bench = BenchConfig(job="graph", knn_sizes=[3000], knn_exact_sizes=[3000], isne_sizes=[2000],
                        isne_max_batches=2, isne_real_epochs=1)
    r = jobs.run_job(cfg, bench, tmp_path / "job", job_info={})
    assert r["status"] == "ok", r["error"]
    assert json.loads((tmp_path / "job" / "result.json").read_text())["isne"] == json.loads(json.dumps(r["isne"]))
    assert any(row["data"] != "real" for row in r["knn"]["rows"])
    # the ANN rows' edges are the run's (its graph.knn_threshold), with their recall measured
    assert {row["threshold"] for row in r["knn"]["rows"] if row["method"] == "ann"} == {0.55}
    sizes = r["isne"]["planted_partition"]["sizes"]
    assert [s["nodes"] for s in sizes] == [2000] and sizes[0]["pairs_per_s"] > 0
    chunk = r["isne"]["chunk_graph"]
    assert chunk["nodes"] == r["chunks"] and set(chunk["runs"]) == {"weighted", "unweighted"}
    assert all(run["epochs"] == 1 for run in chunk["runs"].values())
    # its one line is the stage it timed, not the untimed ingest's tokens and padding
    line = jobs.headline(cfg, bench, r)
    assert "kNN rows" in line and "tokens/s" not in line and "padding" not in line, line
