"""`hades-ingest embedder=triton` end to end against a real server, and a server killed mid-run."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from hades_gpu.embedding.triton_metrics import metric_total
from hades_gpu.embedding.triton_server import TritonServer
from requirements import skip_or_fail  # tests/support

MODEL = "minilm_python"
COMMON = ["isne.enabled=false", "monitoring.progress=off"]


def _hades_ingest() -> str:
    exe = shutil.which("hades-ingest", path=os.path.dirname(sys.executable))
    if exe is None:
        skip_or_fail("the hades-ingest console script is not installed (pip install -e .)")
    return exe


def ingest(corpus: Path, out: Path, *overrides: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([_hades_ingest(), f"corpus={corpus}", f"output={out}", *COMMON, *overrides],
                          capture_output=True, text=True, timeout=timeout)


def chunk_rows(out: Path) -> tuple[list[str], dict[str, np.ndarray]]:
    """Every row of every `chunks/part-*.parquet` on disk (committed or not): ids in order, vectors by id."""
    ids: list[str] = []
    vecs: dict[str, np.ndarray] = {}
    for part in sorted((out / "chunks").glob("part-*.parquet")):
        table = pq.read_table(part, columns=["chunk_id", "embedding"])
        emb = np.asarray(table.column("embedding").to_pylist(), dtype=np.float32)
        for cid, v in zip(table.column("chunk_id").to_pylist(), emb):
            ids.append(cid)
            vecs[cid] = v
    return ids, vecs


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """~40 chunks of real text: small Python stdlib modules (the same files on every run)."""
    root = tmp_path_factory.mktemp("corpus")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    total = 0
    for p in sorted(stdlib.glob("*.py")):
        size = p.stat().st_size
        if 1500 <= size <= 7000 and not p.name.startswith("_"):
            shutil.copy(p, root / p.name)
            total += size
        if total >= 26_000:
            break
    return root


@pytest.fixture(scope="module")
def local_run(corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("local") / "out"
    proc = ingest(corpus, out, "embedder=local")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_ingest_with_triton_matches_local(triton_server, corpus, local_run, tmp_path):
    before = metric_total(triton_server.metrics(), "nv_inference_request_success", MODEL)
    out = tmp_path / "triton"
    proc = ingest(corpus, out, "embedder=triton", f"embedder.url={triton_server.grpc_url}", f"embedder.model={MODEL}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert metric_total(triton_server.metrics(), "nv_inference_request_success", MODEL) > before  # it went to Triton
    ids, vecs = chunk_rows(out)
    ref_ids, ref_vecs = chunk_rows(local_run)
    assert len(ids) == len(set(ids)) and set(ids) == set(ref_ids) and len(ids) >= 20
    a = np.stack([vecs[c] for c in ref_ids])
    b = np.stack([ref_vecs[c] for c in ref_ids])
    cosine = np.sum(a * b, axis=1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cosine.min() >= 0.999, f"per-chunk cosine min {cosine.min():.6f}"


def test_server_killed_mid_run_then_rerun_completes(triton_server, corpus, local_run, tmp_path):
    """Kill the server during an ingest: the run stops with a clear error; a re-run (against a live
    server) completes with every chunk exactly once."""
    out = tmp_path / "killed"
    doomed = TritonServer(models=[MODEL], log_file=tmp_path / "doomed.log").start()
    overrides = ["embedder=triton", f"embedder.url={doomed.grpc_url}", "embedder.retries=2",
                 "embedder.retry_backoff_s=0.2", "embedder.timeout_s=30",
                 "profile.max_batch_tokens=1024", "profile.writer_rows_per_part=4"]  # small batches and parts
    proc = subprocess.Popen([_hades_ingest(), f"corpus={corpus}", f"output={out}", *COMMON, *overrides],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                done = metric_total(doomed.metrics(), "nv_inference_request_success", MODEL)
            except OSError:  # the metrics port may answer a moment after gRPC is ready (seen under load)
                done = 0
            if done >= 3:  # a few batches embedded (and some parts written): mid-run
                break
            time.sleep(0.1)
        assert proc.poll() is None, "the ingest finished before the server could be killed"
        doomed.kill()
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        doomed.stop()
    assert proc.returncode != 0
    assert f"Triton at {doomed.grpc_url} model '{MODEL}'" in stderr, stderr[-3000:]

    rerun = ingest(corpus, out, *overrides[:1], f"embedder.url={triton_server.grpc_url}",
                   "profile.writer_rows_per_part=4")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    ids, vecs = chunk_rows(out)
    ref_ids, ref_vecs = chunk_rows(local_run)
    assert len(ids) == len(set(ids)), "a chunk was written twice"
    assert set(ids) == set(ref_ids), f"lost {len(set(ref_ids) - set(ids))}, extra {len(set(ids) - set(ref_ids))}"
    cosine = np.array([float(np.dot(vecs[c], ref_vecs[c])) for c in ref_ids])
    assert cosine.min() >= 0.999
