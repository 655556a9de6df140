"""The minilm_text ensemble on a real tritonserver: strings in, the local embedder's vectors out.

The session's server (conftest.py) serves minilm_text, whose steps are minilm_tokenizer (Python
backend, the project's tokenizer) and minilm_python. `embedder` is the session's local embedder.
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
from hades_gpu.embedding.texts import embed_texts
from hades_gpu.embedding.triton import embedder_for

TEXT_MODEL, TOKENIZER, EMBEDDING = "minilm_text", "minilm_tokenizer", "minilm_python"


@pytest.fixture(scope="module")
def remote(triton_server):
    emb = embedder_for(triton_server.grpc_url, EMBEDDING)
    yield emb
    emb.close()


@pytest.fixture(scope="module")
def texts():
    """Real text of local files (stdlib code and /usr/share/doc prose), long and short, plus strings
    where tokenizers differ: over-long (cut at 254 tokens), accents, CJK, emoji, special-token
    literals, empty."""
    long_text = " ".join(local_text_chunks(3, chunk_tokens=200, seed=7))  # ~600 tokens: cut like ingest
    return (local_text_chunks(6, chunk_tokens=254, seed=5) + local_text_chunks(6, chunk_tokens=30, seed=6)
            + [long_text, "Café naïve résumé Zürich", "東京都の天気は晴れです。", "emoji 😀👍🏽 ✓",
               "[CLS] special [SEP] tokens [PAD]", "", "   ", "def f(x):\n\treturn x ** 2\n"])


def _stats(url: str, model: str) -> tuple[int, int]:
    """(inference_count, execution_count) of `model` from the server's statistics API."""
    client = grpcclient.InferenceServerClient(url)
    try:
        stats = client.get_inference_statistics(model).model_stats
    finally:
        client.close()
    return sum(s.inference_count for s in stats), sum(s.execution_count for s in stats)


def test_ensemble_vectors_match_local_ingest_rows(remote, embedder, texts):
    """Strings through the ensemble = the local embedder on rows built like ingest's batcher
    (export.token_batch: [CLS] ids[:254] [SEP], pad 0), by code apart from the server's tokenizer."""
    served = remote.embed_texts(texts)
    assert served.dtype == np.float32 and served.shape == (len(texts), 384)
    ids, mask = token_batch(texts)
    local = embedder.embed(ids, mask)
    cosine = np.sum(served * local, axis=1)
    assert cosine.min() >= 0.999, f"row {int(np.argmin(cosine))}: cosine {cosine.min():.6f}"
    # rows are distinct texts: a shifted or repeated row would match a neighbour better than itself
    distinct = [i for i, t in enumerate(texts) if t.strip()]
    sims = served[distinct] @ local[distinct].T
    assert (np.argmax(sims, axis=1) == np.arange(len(distinct))).all()


def test_local_embed_texts_matches_ensemble(remote, embedder, texts):
    """`embed_texts` on the local embedder (length-sorted batches) gives the ensemble's vectors, in order."""
    local = embed_texts(embedder, texts)
    served = embed_texts(remote, texts)
    assert local.shape == served.shape == (len(texts), 384)
    assert np.sum(local * served, axis=1).min() >= 0.999


def test_tokenizer_model_ids_are_ingest_ids(triton_server, texts):
    """The tokenizer step alone returns ingest's rows: [CLS] ids[:254] [SEP], each request padded to its longest."""
    client = grpcclient.InferenceServerClient(triton_server.grpc_url)
    try:
        data = np.array([[t.encode()] for t in texts], dtype=np.object_)
        x = grpcclient.InferInput("text", list(data.shape), "BYTES")
        x.set_data_from_numpy(data)
        result = client.infer(TOKENIZER, [x])
    finally:
        client.close()
    ids, mask = token_batch(texts)
    np.testing.assert_array_equal(result.as_numpy("input_ids"), ids)
    np.testing.assert_array_equal(result.as_numpy("attention_mask"), mask)
    assert ids.shape[1] == 256  # the over-long text was cut to max_seq_len


def test_concurrent_clients_are_merged_at_both_steps(triton_server):
    """8 clients at once: both steps' statistics show fewer executions than inferences."""
    before = {m: _stats(triton_server.grpc_url, m) for m in (TOKENIZER, EMBEDDING)}
    n_threads, per_thread = 8, 5
    embs = [embedder_for(triton_server.grpc_url, EMBEDDING, max_inflight=1) for _ in range(n_threads)]
    barrier = threading.Barrier(n_threads)

    def client(k: int):
        barrier.wait()
        return [embs[k].embed_texts([f"client {k} query {j} about dynamic batching"]) for j in range(per_thread)]

    with ThreadPoolExecutor(n_threads) as pool:
        results = list(pool.map(client, range(n_threads)))
    for emb in embs:
        emb.close()
    assert all(r.shape == (1, 384) for rs in results for r in rs)
    for model in (TOKENIZER, EMBEDDING):
        inferences, executions = (a - b for a, b in zip(_stats(triton_server.grpc_url, model), before[model]))
        assert inferences == n_threads * per_thread, model
        assert executions < inferences, f"{model}: {inferences} inferences in {executions} executions: none merged"


def test_invalid_utf8_fails_alone(triton_server):
    """Bytes that are not UTF-8 get their own one-line error; a good request merged with it is served."""
    client = grpcclient.InferenceServerClient(triton_server.grpc_url)

    def send(payload: bytes):
        data = np.array([[payload]], dtype=np.object_)
        x = grpcclient.InferInput("text", [1, 1], "BYTES")
        x.set_data_from_numpy(data)
        try:
            return client.infer(TEXT_MODEL, [x]).as_numpy("embedding")
        except InferenceServerException as err:
            return err

    with ThreadPoolExecutor(4) as pool:
        out = list(pool.map(send, [b"good text", b"bad \xff\xfe text", b"more good text", b"ok"]))
    client.close()
    assert isinstance(out[1], InferenceServerException)
    assert "text must be UTF-8" in out[1].message() and "\n" not in out[1].message()
    assert all(isinstance(o, np.ndarray) and o.shape == (1, 384) for o in (out[0], out[2], out[3]))


def test_missing_text_model_is_one_line_error(triton_server):
    """A server without the text model still serves `embed`; `embed_texts` says what to do."""
    emb = embedder_for(triton_server.grpc_url, EMBEDDING, text_model="no_such_text_model")
    try:
        with pytest.raises(EmbedderError) as info:
            emb.embed_texts(["hello"])
    finally:
        emb.close()
    msg = str(info.value)
    assert "\n" not in msg and "no_such_text_model" in msg and "hades-serve --models" in msg


def test_lone_surrogate_is_one_line_error(remote):
    with pytest.raises(ValueError, match="item 1"):
        remote.embed_texts(["fine", "bad \udc80"])


def test_search_with_the_triton_embedder_matches_local(triton_server, search_output, embedder, capsys):
    """`--embedder triton`: the query goes through minilm_text; the hits are the local embedder's."""
    from hades_gpu.config import load_pipeline_config
    from hades_gpu.retrieval.search import Searcher
    from hades_gpu.retrieval.search_cli import search_cli

    out = str(search_output[0])
    queries = ["Return the number of days in a month", "Decode a Base64 encoded bytes-like object",
               "Wrap a single paragraph of text", "Locate the insertion point for x in a sorted list"]
    triton_cfg = load_pipeline_config("balanced", ["embedder=triton", f"embedder.url={triton_server.grpc_url}"])
    with Searcher(out, triton_cfg) as remote_search, Searcher(out, load_pipeline_config(), embedder=embedder) as local:
        assert "minilm_python" in remote_search.embedder_name
        for q in queries:
            served, here = remote_search.search(q, 10), local.search(q, 10)
            assert [h.chunk_id for h in served.hits] == [h.chunk_id for h in here.hits], q
            np.testing.assert_allclose([h.score for h in served.hits], [h.score for h in here.hits], atol=2e-3)
    assert search_cli([out, queries[0], "-k", "2", "--embedder", "triton", f"embedder.url={triton_server.grpc_url}"]) == 0
    # the header names the model the query went through first (it said minilm_python only)
    assert "embedder triton minilm_text -> minilm_python @ " in capsys.readouterr().out
