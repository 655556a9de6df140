"""TritonEmbedder against a real tritonserver: same vectors as local, dynamic batching, clear errors.

`embedder` is the session's local embedder (tests/conftest.py); `remote` the Triton one.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

pytest.importorskip("tritonclient.grpc", reason="tritonclient[grpc] is not installed (the lent GPU machine has none)")

import tritonclient.grpc as grpcclient  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

from hades_gpu.embedding.base import EmbedderError
from hades_gpu.embedding.export import local_text_chunks, token_batch
from hades_gpu.embedding.triton import TritonEmbedder, embedder_for
from hades_gpu.embedding.triton_server import free_port, metric_total

MODEL = "minilm_python"


@pytest.fixture(scope="module")
def remote(triton_server):
    emb = embedder_for(triton_server.grpc_url, MODEL)
    yield emb
    emb.close()


@pytest.fixture(scope="module")
def real_batches():
    """Real text: full 254-token chunks and shorter ones, padded like the batcher (bucket 16)."""
    full = local_text_chunks(24, chunk_tokens=254, seed=3)
    short = local_text_chunks(12, chunk_tokens=60, seed=4)
    return [token_batch(full[:16], bucket=16), token_batch(full[16:], bucket=16), token_batch(short, bucket=16)]


def test_embedder_reads_model_config(remote):
    assert remote.dim == 384
    assert remote.max_batch_size == 128
    assert remote.concurrency == remote.cfg.max_inflight


def test_triton_matches_local_embedder(remote, embedder, real_batches):
    for ids, mask in real_batches:
        served = remote.embed(ids, mask)
        local = embedder.embed(ids, mask)
        assert served.dtype == np.float32 and served.shape == (ids.shape[0], 384)
        np.testing.assert_allclose(np.linalg.norm(served, axis=1), 1.0, atol=1e-3)
        cosine = np.sum(served * local, axis=1) / np.linalg.norm(served, axis=1) / np.linalg.norm(local, axis=1)
        assert cosine.min() >= 0.999, f"per-chunk cosine min {cosine.min():.6f}"


def test_batch_larger_than_max_batch_size_is_split(remote, embedder):
    ids, mask = token_batch([f"sentence number {i} about triton" for i in range(remote.max_batch_size + 37)])
    out = remote.embed(ids, mask)
    assert out.shape == (ids.shape[0], 384)
    ref = embedder.embed(ids[:5], mask[:5])
    assert np.min(np.sum(out[:5] * ref, axis=1)) >= 0.999


def test_dynamic_batching_merges_concurrent_requests(triton_server, real_batches):
    ids, mask = real_batches[2]  # short rows: many cheap requests
    ids, mask = ids[:2], mask[:2]
    before = triton_server.metrics()
    n_threads, per_thread = 8, 6
    embs = [embedder_for(triton_server.grpc_url, MODEL, max_inflight=1) for _ in range(n_threads)]
    barrier = threading.Barrier(n_threads)

    def client(emb):
        barrier.wait()
        return [emb.embed(ids, mask) for _ in range(per_thread)]

    with ThreadPoolExecutor(n_threads) as pool:
        results = list(pool.map(client, embs))
    for emb in embs:
        emb.close()
    assert all(r.shape == (2, 384) for rs in results for r in rs)
    after = triton_server.metrics()
    requests = metric_total(after, "nv_inference_request_success", MODEL) - metric_total(
        before, "nv_inference_request_success", MODEL)
    executions = metric_total(after, "nv_inference_exec_count", MODEL) - metric_total(
        before, "nv_inference_exec_count", MODEL)
    assert requests == n_threads * per_thread
    assert executions < requests, f"{requests} requests in {executions} executions: nothing merged"


def test_bad_request_fails_alone(triton_server, real_batches):
    """A malformed request merged with good ones gets its own error; the good ones are served."""
    ids, mask = real_batches[2]
    client = grpcclient.InferenceServerClient(triton_server.grpc_url)

    def send(a, b):
        x = grpcclient.InferInput("input_ids", list(a.shape), "INT64")
        x.set_data_from_numpy(a)
        y = grpcclient.InferInput("attention_mask", list(b.shape), "INT64")
        y.set_data_from_numpy(b)
        try:
            return client.infer(MODEL, [x, y]).as_numpy("embedding")
        except InferenceServerException as err:
            return err

    jobs = [(ids, mask)] * 3 + [(ids + 100_000, mask), (ids, mask[:, :8])]
    with ThreadPoolExecutor(len(jobs)) as pool:
        out = list(pool.map(lambda j: send(*j), jobs))
    client.close()
    assert all(isinstance(o, np.ndarray) and o.shape == (ids.shape[0], 384) for o in out[:3])
    assert isinstance(out[3], InferenceServerException) and "input_ids must be in [0, 30522)" in out[3].message()
    assert isinstance(out[4], InferenceServerException) and "attention_mask must have the shape" in out[4].message()


def test_unreachable_server_is_one_line_error():
    url = f"127.0.0.1:{free_port()}"
    with pytest.raises(EmbedderError) as info:
        embedder_for(url, MODEL)
    msg = str(info.value)
    assert "\n" not in msg and url in msg and MODEL in msg and "unreachable" in msg


def test_missing_model_is_one_line_error(triton_server):
    with pytest.raises(EmbedderError) as info:
        embedder_for(triton_server.grpc_url, "no_such_model")
    msg = str(info.value)
    assert "\n" not in msg and triton_server.grpc_url in msg and "no_such_model" in msg
    assert "no such model" in msg and MODEL in msg  # says what the repository does have
