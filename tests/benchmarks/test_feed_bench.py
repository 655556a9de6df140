"""`hades-bench bench=feed` / scripts/bench_feed.py on a tiny corpus, one worker: the fields, the
stand-in's label everywhere, and tokens that are those of the dataset written. No speed asserted."""

from __future__ import annotations

import json
import shutil

import numpy as np

from corpus_helpers import SAMPLE_CORPUS
from hades_gpu.benchmarks.config import BenchConfig
from hades_gpu.benchmarks.feed_bench import LABEL, ZeroCostEmbedder, main
from hades_gpu.benchmarks.jobs import run_job
from hades_gpu.config import load_pipeline_config
from hades_gpu.store.reader import read_chunks

FEED_FIELDS = {"label", "embedder", "workers", "documents", "chunks", "tokens", "bytes", "wall_s", "tokens_per_s",
               "chunks_per_s", "mb_per_s", "main_cpu_pct_of_core", "workers_cpu_pct_of_core", "peak_rss_bytes",
               "hf", "x_hf_tokens", "x_hf_bytes"}
HF_FIELDS = {"files", "tokens", "bytes", "seconds", "tokens_per_s", "threads", "env"}


def test_the_stand_in_is_labelled_and_gives_unit_vectors_as_incompressible_as_a_models():
    emb = ZeroCostEmbedder()
    out = emb.embed(np.zeros((3, 7), np.int64), np.ones((3, 7), np.int64))
    assert out.shape == (3, 384) and out.dtype == np.float32
    assert np.allclose(np.linalg.norm(out, axis=1), 1.0)
    assert emb.description == LABEL and "ZERO-COST STAND-IN" in LABEL
    # rows do not repeat within a Parquet page's worth of rows, across calls too
    more = np.concatenate([emb.embed(np.zeros((500, 7), np.int64), None) for _ in range(3)])
    rows = np.concatenate([out, more])
    assert len(np.unique(rows, axis=0)) == len(rows) == 1503
    cycle = emb.embed(np.zeros((ZeroCostEmbedder.POOL_ROWS, 1), np.int64), None)
    assert cycle[-1].tolist() == rows[-1].tolist()  # POOL_ROWS rows later the pool comes round again
    # so the writer compresses them as little as a model's vectors (zstd: a constant row shrank ~100x)
    raw = rows.tobytes()
    assert len(zstd_compressed(raw)) > 0.8 * len(raw)


def zstd_compressed(data: bytes) -> bytes:
    import pyarrow as pa

    return pa.compress(data, codec="zstd", asbytes=True)


def test_feed_job_on_a_tiny_corpus_with_one_worker(tmp_path):
    corpus = tmp_path / "corpus"
    shutil.copytree(SAMPLE_CORPUS, corpus)
    cfg = load_pipeline_config("low_memory", ["monitoring.progress=off"])
    cfg.corpus = str(corpus)
    cfg.profile.num_workers = 1
    job_dir = tmp_path / "job"
    result = run_job(cfg, BenchConfig(job="feed", keep_dataset=True), job_dir, job_info={})
    on_disk = json.loads((job_dir / "result.json").read_text())
    assert on_disk["status"] == "ok", on_disk["error"]
    assert FEED_FIELDS <= set(on_disk) and HF_FIELDS <= set(on_disk["hf"])
    assert on_disk["label"] == on_disk["embedder"] == on_disk["embedder_name"] == LABEL
    assert on_disk["workers"] == on_disk["hf"]["threads"] == 1
    assert on_disk["hf"]["env"]["RAYON_NUM_THREADS"] == "1"
    chunks = read_chunks(job_dir / "dataset", ["n_tokens", "path"])
    assert result["tokens"] == on_disk["tokens"] == sum(chunks.column("n_tokens").to_pylist()) > 0
    assert on_disk["chunks"] == chunks.num_rows == on_disk["chunks_written"]
    assert on_disk["hf"]["files"] == len(set(chunks.column("path").to_pylist())) == on_disk["documents"]
    assert on_disk["hf"]["tokens"] > 0 and on_disk["main_cpu_pct_of_core"] > 0


def test_the_script_writes_json_and_a_labelled_table(tmp_path, capsys):
    corpus = tmp_path / "corpus"
    shutil.copytree(SAMPLE_CORPUS, corpus)
    out = tmp_path / "feed.json"
    main(["--corpus", str(corpus), "--workers", "1", "--profile", "low_memory", "--workdir", str(tmp_path / "w"),
          "--writers", "thread,process", "--out", str(out)])
    data = json.loads(out.read_text())
    assert data["label"] == LABEL and len(data["runs"]) == 2
    assert [r["writer"] for r in data["runs"]] == ["thread", "process"]  # what each run really used
    assert data["runs"][0]["hf"] == data["runs"][1]["hf"]  # one baseline per worker count
    assert data["runs"][0]["chunks"] == data["runs"][1]["chunks"] > 0
    for run in data["runs"]:
        assert FEED_FIELDS <= set(run) and run["label"] == LABEL
    printed = capsys.readouterr().out
    assert LABEL in printed and "| workers | writer |" in printed and LABEL in data["table"]
    assert "| 1 | process |" in data["table"]


def test_the_small_files_corpus_is_real_files_under_the_cap(tmp_path, capsys):
    from hades_gpu.benchmarks.corpus import build_small_files_corpus

    sizes = build_small_files_corpus(tmp_path / "a", 0.3, max_bytes=2048)
    files = sorted(p for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert 0.3e6 <= sum(sizes.values()) <= 0.3e6 + 2048 and len(files) >= 0.3e6 / 2048
    assert all(0 < f.stat().st_size <= 2048 for f in files) and sizes["code"] > 0 and sizes["prose"] > 0
    build_small_files_corpus(tmp_path / "b", 0.3, max_bytes=2048)  # the same seed: the same files
    assert [f.read_bytes() for f in files] == [f.read_bytes() for f in sorted((tmp_path / "b").rglob("*")) if f.is_file()]
    out = tmp_path / "feed.json"
    main(["--small-files", "1024", "--corpus-mb", "0.05", "--workers", "1", "--profile", "low_memory",
          "--workdir", str(tmp_path / "w"), "--out", str(out)])
    data = json.loads(out.read_text())
    assert data["small_files_max_bytes"] == 1024 and data["runs"][0]["documents"] >= 50
    assert data["corpus"].endswith("corpus-small") and LABEL in capsys.readouterr().out


def test_the_feed_jobs_console_line_names_the_stand_in(tmp_path):
    """`hades-bench bench=feed` printed "feed balanced max_batch_tokens=4096: 131.5 chunks/s" with no
    word that no model ran (result.json and the report said so; the console, where people read, not)."""
    import os
    import subprocess
    import sys

    from corpus_helpers import REPO

    corpus = tmp_path / "corpus"
    shutil.copytree(SAMPLE_CORPUS, corpus)
    args = ["bench=feed", f"corpus={corpus}", f"output={tmp_path / 'job'}", "profile.num_workers=1",
            "isne.enabled=false", "monitoring.progress=off"]
    code = f"import sys; from hades_gpu.cli import bench_main; sys.argv[1:] = {args!r}; bench_main()"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [ln for ln in proc.stdout.splitlines() if "chunks/s" in ln]
    assert lines and all(LABEL in ln for ln in lines), proc.stdout[-2000:]
