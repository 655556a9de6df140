"""TritonEmbedder against a real tritonserver: same vectors as local, dynamic batching, clear errors.

`embedder` is the session's local embedder (tests/conftest.py); `remote` the Triton one.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from requirements import require_module  # noqa: E402  (tests/support)

require_module("tritonclient.grpc", "tritonclient[grpc] is not installed (the lent GPU machine has none)")

import tritonclient.grpc as grpcclient  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

from hades_gpu.embedding.base import EmbedderError
from hades_gpu.embedding.export import local_text_chunks, token_batch
from hades_gpu.embedding.triton import TritonEmbedder, embedder_for
from hades_gpu.embedding.triton_metrics import metric_total
from hades_gpu.embedding.triton_server import free_port

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


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, axis=1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


@pytest.fixture(scope="module")
def real_texts():
    """Real 254-token and 60-token chunks of local files, as text (ground truth comes from the text)."""
    return local_text_chunks(24, chunk_tokens=254, seed=3) + local_text_chunks(12, chunk_tokens=60, seed=4)


def test_triton_matches_sentence_transformers(remote, sentence_transformer, real_texts):
    """Ground truth is sentence-transformers on the chunk texts, not the local embedder that the
    Triton model itself runs (a bug they share would be invisible)."""
    ids, mask = token_batch(real_texts, bucket=16)
    served = remote.embed(ids, mask)
    assert served.dtype == np.float32 and served.shape == (len(real_texts), 384)
    np.testing.assert_allclose(np.linalg.norm(served, axis=1), 1.0, atol=1e-3)
    reference = sentence_transformer.encode(real_texts, batch_size=8, normalize_embeddings=True)
    cosine = _cosine(served, reference)
    assert cosine.min() >= 0.999, f"per-chunk cosine min {cosine.min():.6f}"


def test_batch_larger_than_max_batch_size_is_split(remote, sentence_transformer):
    """Every row of a batch that the client splits (max_batch_size + 37 rows) comes back in order
    and matches sentence-transformers: not only a prefix."""
    n = remote.max_batch_size + 37
    texts = [f"sentence number {i} about triton, {'dynamic ' * (i % 7)}batching and {i * 7919 % 1000} ids"
             for i in range(n)]
    ids, mask = token_batch(texts)
    out = remote.embed(ids, mask)
    assert out.shape == (n, 384)
    reference = sentence_transformer.encode(texts, batch_size=64, normalize_embeddings=True)
    cosine = _cosine(out, reference)
    assert cosine.min() >= 0.999, (int(np.argmin(cosine)), float(cosine.min()))
    # rows are distinct texts: a shifted or repeated row would match its neighbour better than itself
    assert (np.argmax(out @ reference.T, axis=1) == np.arange(n)).all()


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
    assert "start one with hades-serve (a server still loading its models listens only once" in msg  # not "none is there"


def test_the_http_port_given_for_the_grpc_one_is_named(triton_server):
    """embedder.url pointing at the server's HTTP port said "server unreachable (... Socket closed)"
    with no hint that it was the wrong one of the server's two ports."""
    port = triton_server.http_url.rsplit(":", 1)[1]
    with pytest.raises(EmbedderError, match=r"is this the server's HTTP port\? embedder.url takes the gRPC port"):
        embedder_for(f"127.0.0.1:{port}", MODEL)


def test_missing_model_is_one_line_error(triton_server):
    with pytest.raises(EmbedderError) as info:
        embedder_for(triton_server.grpc_url, "no_such_model")
    msg = str(info.value)
    assert "\n" not in msg and triton_server.grpc_url in msg and "no_such_model" in msg
    assert "no such model" in msg and MODEL in msg  # says what the repository does have


def test_a_max_seq_len_beyond_the_served_models_is_refused_at_start(triton_server):
    """The served model's max_seq_len (its config.pbtxt parameters, read at start) was not compared:
    a run with embedder.max_seq_len=512 failed mid-run on the first long batch."""
    from hades_gpu.config import ConfigError

    with pytest.raises(ConfigError, match=r"embedder.max_seq_len=512 is more than .*max_seq_len 256 in its config"):
        embedder_for(triton_server.grpc_url, MODEL, max_seq_len=512)
    embedder_for(triton_server.grpc_url, MODEL, max_seq_len=128).close()  # shorter rows are fine
    # the other settings that do not fit the served model are usage errors too (exit 2; they were 1)
    with pytest.raises(ConfigError, match=r"must be 256 wide \(embedder.dim\) \(got dims \[384\]\): set embedder.dim"):
        embedder_for(triton_server.grpc_url, MODEL, dim=256)
    with pytest.raises(ConfigError, match="embedder.model is empty"):
        embedder_for(triton_server.grpc_url, " ")


_CONSTANT_MODEL = """import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        out = []
        for request in requests:
            rows = pb_utils.get_input_tensor_by_name(request, "input_ids").as_numpy().shape[0]
            v = np.full((rows, 384), SIGN * 384 ** -0.5, dtype=np.float32)
            v[:, ::2] *= SIGN
            out.append(pb_utils.InferenceResponse([pb_utils.Tensor("embedding", v)]))
        return out
"""


def _constant_repository(root, sign: int):
    """A model repository serving, as minilm_python, a model that answers one constant 384-wide unit
    vector (`sign` picks which of two): a different model of the same name, inputs and width."""
    from pathlib import Path

    from hades_gpu.embedding.triton_server import default_model_repository

    (root / MODEL / "1").mkdir(parents=True)
    (root / MODEL / "config.pbtxt").write_text((Path(default_model_repository()) / MODEL / "config.pbtxt").read_text())
    (root / MODEL / "1" / "model.py").write_text(_CONSTANT_MODEL.replace("SIGN", str(sign)))
    return root


def test_a_server_restarted_with_another_model_of_the_same_name_is_refused_not_mixed_in(tmp_path):
    """The retries rode through a server restarted with another model under the same name and
    width (a new version deployed mid-run), and its vectors were written beside the first model's,
    exit 0. After an outage the client now checks that the server answers its first row as before,
    before it uses any answer: the same model passes, another one fails every call in one line.
    (Real servers on one fixed port: two constant models that answer differently.)"""
    from hades_gpu.embedding.triton_server import TritonServer

    port = free_port()
    ids = np.array([[101, 7592, 2088, 102]], dtype=np.int64)
    mask = np.ones_like(ids)

    def serve(sign: int, name: str) -> TritonServer:
        repo = _constant_repository(tmp_path / name, sign)
        return TritonServer(repo, [MODEL], grpc_port=port, log_file=tmp_path / f"{name}.log").start()

    server = serve(1, "first")
    emb = embedder_for(f"127.0.0.1:{port}", MODEL, retries=40, retry_backoff_s=0.25)
    try:
        first = emb.embed(ids, mask)
        for sign, name in ((1, "same-again"), (-1, "another")):
            server.stop()
            pending = ThreadPoolExecutor(1).submit(emb.embed, ids, mask)  # retried while no server answers
            server = serve(sign, name)
            if sign == 1:
                np.testing.assert_allclose(pending.result(timeout=120), first)  # the same model: ridden through
            else:
                with pytest.raises(EmbedderError, match="since the server came back it answers with another model"):
                    pending.result(timeout=120)
                with pytest.raises(EmbedderError, match="another model"):  # and every later call
                    emb.embed(ids, mask)
    finally:
        emb.close()
        server.stop()


def test_a_dead_backend_process_is_one_line_saying_to_restart_the_server(tmp_path):
    """A model's Python-backend stub killed (the OOM killer): every request failed "inference
    failed: [StatusCode.INTERNAL] Stub process ... is not healthy", with nothing saying that only a
    restart of the server mends it."""
    from hades_gpu.embedding.triton_server import TritonServer

    port = free_port()
    repo = _constant_repository(tmp_path / "repo", 1)
    server = TritonServer(repo, [MODEL], grpc_port=port, log_file=tmp_path / "s.log").start()
    emb = embedder_for(f"127.0.0.1:{port}", MODEL, retries=1, retry_backoff_s=0.1)
    ids = np.array([[101, 7592, 2088, 102]], dtype=np.int64)
    try:
        emb.embed(ids, np.ones_like(ids))
        stubs = server.backend_processes()
        assert list(stubs.values()) == [MODEL], stubs
        import os
        import signal

        os.kill(next(iter(stubs)), signal.SIGKILL)
        with pytest.raises(EmbedderError, match=r"the model's backend process on the server died \(restart the server"):
            for _ in range(50):  # the server notices on the next request
                emb.embed(ids, np.ones_like(ids))
    finally:
        emb.close()
        server.stop()
