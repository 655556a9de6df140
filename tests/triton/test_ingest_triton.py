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


def test_a_server_running_another_model_is_refused_before_it_mixes_vectors_in(corpus, tmp_path, triton_server):
    """The settings fingerprint the client's model folder, not what the server runs: a server
    running another 384-wide model added its vectors beside MiniLM's, exit 0. The run now checks
    what the model answers to a probe text against what made the output (a real second server
    whose python model answers a constant vector: a different model of the same shape)."""
    from hades_gpu.embedding.triton_server import default_model_repository

    repo = tmp_path / "repo"
    (repo / "constant" / "1").mkdir(parents=True)
    config = (Path(default_model_repository()) / MODEL / "config.pbtxt").read_text()
    (repo / "constant" / "config.pbtxt").write_text(config.replace(f'name: "{MODEL}"', 'name: "constant"'))
    (repo / "constant" / "1" / "model.py").write_text(
        "import numpy as np\nimport triton_python_backend_utils as pb_utils\n\n\nclass TritonPythonModel:\n"
        "    def execute(self, requests):\n        out = []\n        for request in requests:\n"
        "            rows = pb_utils.get_input_tensor_by_name(request, 'input_ids').as_numpy().shape[0]\n"
        "            v = np.full((rows, 384), 384 ** -0.5, dtype=np.float32)\n"
        "            out.append(pb_utils.InferenceResponse([pb_utils.Tensor('embedding', v)]))\n"
        "        return out\n")
    docs = tmp_path / "docs"
    shutil.copytree(corpus, docs)
    out = tmp_path / "out"
    first = ingest(docs, out)  # the local embedder
    assert first.returncode == 0, first.stderr[-2000:]
    before = chunk_rows(out)[0]
    with (docs / sorted(p.name for p in docs.iterdir())[0]).open("a") as f:
        f.write("\n# one more line\n")
    # the same model served: accepted (cosine ~1 to the local one)
    same = ingest(docs, out, "embedder=triton", f"embedder.url={triton_server.grpc_url}", f"embedder.model={MODEL}")
    assert same.returncode == 0, same.stderr[-2000:]
    with (docs / sorted(p.name for p in docs.iterdir())[1]).open("a") as f:
        f.write("\n# one more line\n")
    other = TritonServer(repo, ["constant"], log_file=tmp_path / "constant.log").start()
    try:
        committed = chunk_rows(out)[0]
        proc = ingest(docs, out, "embedder=triton", f"embedder.url={other.grpc_url}", "embedder.model=constant")
        # queries too: that server's answers would rank the chunks at random, silently
        from hades_gpu.config import load_pipeline_config
        from hades_gpu.retrieval.search import Searcher, SearchError

        cfg = load_pipeline_config(overrides=["embedder=triton", f"embedder.url={other.grpc_url}",
                                              "embedder.model=constant"])
        with pytest.raises(SearchError, match=r"was embedded by another model than this embedder's \(triton constant"):
            Searcher(out, cfg)
    finally:
        other.stop()
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("hades-ingest: error:")]
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr[-2000:]
    assert "holds vectors of another model" in lines[0] and "constant" in lines[0], lines[0]
    assert chunk_rows(out)[0] == committed and len(committed) >= len(before)  # nothing written
