"""CUDA graph capture: the policy (CPU), and on a GPU the dedicated capture stream, replay against eager
on fresh inputs in several buckets out of order, and two threads capturing and replaying at once."""

from __future__ import annotations

import dataclasses
import threading

import numpy as np
import pytest
import torch

from hades_gpu.gpu.cuda_graphs import CapturePolicy, GraphCache

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


# -- the policy (no GPU needed) ---------------------------------------------------------------------


def test_policy_captures_on_the_nth_use_within_the_cap():
    p = CapturePolicy(graph_after=2, max_graphs=1)
    key = (8, 64)
    p.note_use(key)
    assert not p.should_capture(key, captured=0, blocked=False)  # first use stays eager
    p.note_use(key)
    assert p.should_capture(key, captured=0, blocked=False)
    assert not p.should_capture(key, captured=0, blocked=True)  # memory pressure: no capture
    assert not p.should_capture(key, captured=1, blocked=False)  # cap reached


def test_policy_retries_a_failed_bucket_later_and_gives_up_then_reset_clears():
    p = CapturePolicy(graph_after=1, retry_after=4, max_failures=2)
    key = (16, 128)
    p.note_use(key)
    assert p.should_capture(key, 0, False)
    p.note_failure(key)  # failed at use 1: retry at use 1 + 4
    answers = []
    for _ in range(4):
        p.note_use(key)
        answers.append(p.should_capture(key, 0, False))
    assert answers == [False, False, False, True]  # uses 2, 3, 4, 5
    p.note_failure(key)  # second failure: the cap
    for _ in range(50):
        p.note_use(key)
    assert not p.should_capture(key, 0, False)
    assert p.failed_buckets == 1
    p.reset()  # graphs dropped, fresh pool: failures are forgotten (they used to stick forever)
    assert p.should_capture(key, 0, False) and p.failed_buckets == 0


def test_policy_success_forgets_the_failure():
    p = CapturePolicy(graph_after=1, retry_after=1)
    key = (8, 8)
    p.note_use(key)
    p.note_failure(key)
    p.note_use(key)
    assert p.should_capture(key, 0, False)
    p.note_success(key)
    assert p.failed_buckets == 0


def test_policy_validates():
    with pytest.raises(ValueError, match="graph_after"):
        CapturePolicy(graph_after=0)


def test_graph_cache_refuses_the_cpu():
    with pytest.raises(ValueError, match="CUDA device"):
        GraphCache(lambda i, m: i, torch.device("cpu"), CapturePolicy())


# -- on a GPU --------------------------------------------------------------------------------------


@pytest.mark.gpu
@needs_cuda
def test_capture_stream_is_dedicated_and_on_its_device():
    dev = torch.device("cuda", torch.cuda.device_count() - 1)
    cache = GraphCache(lambda i, m: (i * m).float().sum(1, keepdim=True), dev, CapturePolicy(graph_after=1))
    try:
        assert cache.stream_source in ("cupy", "cuda-python"), cache.stream_source
        assert cache.capture_stream.device == dev
        pool = [torch.cuda.Stream(device=dev) for _ in range(70)]  # more than the pool's 32 per priority
        pool += [torch.cuda.Stream(device=dev, priority=-1) for _ in range(70)]
        assert cache.capture_stream.cuda_stream not in {s.cuda_stream for s in pool}
        ids = torch.randint(0, 1000, (8, 16), device=dev)
        with torch.cuda.stream(pool[5]):  # replay on a pool stream, as a producer would
            got = cache.run((8, 16), ids, torch.ones_like(ids))
            torch.cuda.current_stream(dev).synchronize()
        assert got is not None and torch.equal(got, ids.float().sum(1, keepdim=True))
        assert cache.metrics()["graph_replays"] == 1
    finally:
        cache.close()


def _encoder_embedder(**gpu):
    from hades_gpu.config import PipelineConfig
    from hades_gpu.embedding.cuda_embedder import CudaEmbedder

    cfg = PipelineConfig()
    cfg.embedder = dataclasses.replace(cfg.embedder, device="cuda", precision="bf16")
    cfg.gpu = dataclasses.replace(cfg.gpu, **gpu)
    return CudaEmbedder(cfg, graph_after=1)


def _random_batch(rng: np.random.Generator, rows: int, length: int) -> tuple[np.ndarray, np.ndarray]:
    """Token ids with [CLS]/[SEP] and varied real lengths (fresh values each call)."""
    ids = rng.integers(1000, 29000, (rows, length)).astype(np.int64)
    mask = np.zeros_like(ids)
    for r in range(rows):
        n = int(rng.integers(2, length + 1))
        ids[r, 0], ids[r, n - 1] = 101, 102
        ids[r, n:] = 0
        mask[r, :n] = 1
    return ids, mask


def _eager(embedder, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The same encoder at the same padded bucket shape, run eagerly (no graph)."""
    rows, length = ids.shape
    from hades_gpu.embedding.cuda_embedder import row_bucket

    bp, lp = row_bucket(rows), embedder.padded_length(length)
    pid = np.zeros((bp, lp), np.int64)
    pm = np.zeros((bp, lp), np.int64)
    pm[:, 0] = 1
    pid[:rows, :length], pm[:rows, :length] = ids, mask
    with torch.inference_mode():
        out = embedder.encoder(torch.from_numpy(pid).to(embedder.device), torch.from_numpy(pm).to(embedder.device))
    return out[:rows].float().cpu().numpy()


@pytest.mark.gpu
@needs_cuda
def test_graph_replay_equals_eager_on_fresh_inputs_in_buckets_out_of_order():
    emb = _encoder_embedder()
    rng = np.random.default_rng(7)
    shapes = [(8, 64), (24, 128), (56, 256), (5, 40)]  # four buckets; (5, 40) pads rows and columns
    try:
        for shape in shapes:  # capture each bucket (graph_after=1) on throw-away inputs
            emb.embed(*_random_batch(rng, *shape))
        assert emb.metrics()["graphs_captured"] == len(shapes)
        order = [2, 0, 3, 1, 2, 3, 0, 1, 1, 2]  # out of capture order, repeats, fresh values each time
        before = emb.metrics()["graph_replays"]
        for i in order:
            ids, mask = _random_batch(rng, *shapes[i])
            got = emb.embed(ids, mask)
            want = _eager(emb, ids, mask)
            cos = (got * want).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
            assert cos.min() >= 0.9999, (shapes[i], cos.min())
            np.testing.assert_allclose(got, want, atol=5e-3)
        assert emb.metrics()["graph_replays"] - before == len(order)
    finally:
        emb.close()


@pytest.mark.gpu
@needs_cuda
def test_two_threads_capture_and_replay_at_once():
    """Two embedders (two capture streams, one process-wide capture lock) and two threads on one of
    them: every result equals its eager reference, nothing deadlocks."""
    a, b = _encoder_embedder(), _encoder_embedder()
    rng = np.random.default_rng(11)
    plans = {k: [_random_batch(rng, *s) for s in shapes] for k, shapes in
             {"a0": [(8, 32), (16, 64), (8, 96)] * 4, "a1": [(32, 48), (8, 160), (16, 64)] * 4,
              "b0": [(8, 32), (40, 72), (24, 200)] * 4}.items()}
    owner = {"a0": a, "a1": a, "b0": b}
    want = {k: [_eager(owner[k], i, m) for i, m in batches] for k, batches in plans.items()}
    got: dict[str, list[np.ndarray]] = {k: [] for k in plans}
    errors: list[BaseException] = []
    start = threading.Barrier(len(plans))

    def work(key: str) -> None:
        try:
            start.wait(timeout=60)
            for ids, mask in plans[key]:
                got[key].append(owner[key].embed(ids, mask))
        except BaseException as err:  # reported by the main thread
            errors.append(err)

    threads = [threading.Thread(target=work, args=(k,)) for k in plans]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        assert not any(t.is_alive() for t in threads), "a thread hung"
        assert not errors, errors
        for key in plans:
            for g, w in zip(got[key], want[key]):
                np.testing.assert_allclose(g, w, atol=5e-3)
        assert a.metrics()["graphs_captured"] >= 4 and b.metrics()["graphs_captured"] >= 3
        assert a.metrics()["graph_capture_failures"] == 0 and b.metrics()["graph_capture_failures"] == 0
    finally:
        a.close()
        b.close()
