"""CudaEmbedder: the batched path against an unbatched transformers reference (CPU), and on CUDA the
bf16 path, CUDA graphs and the stream producer (marked `gpu`, skipped without a device). Also device
selection and the stream producer's CPU fallback."""

from __future__ import annotations

import dataclasses
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from hades_gpu.config import EmbedderConfig, PipelineConfig
from hades_gpu.documents.tokenizer import load_tokenizer, special_ids
from hades_gpu.embedding.base import Embedder, EmbedderError
from hades_gpu.embedding.cuda_embedder import CudaEmbedder, flops_per_token, load_hf_model, resolve_precision
from hades_gpu.gpu.device import DeviceError, select_device
from hades_gpu.gpu.host_ring import HostBufferRing
from hades_gpu.gpu.stream_producer import StreamProducer

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def token_rows(n: int = 12, max_len: int = 160) -> list[list[int]]:
    """[CLS] ... [SEP] token ids of `n` pieces of a stdlib source file, of very different lengths."""
    text = Path(textwrap.__file__).read_text(encoding="utf-8")
    tok = load_tokenizer()
    cls, sep, _ = special_ids()
    rows, pos = [], 0
    for i in range(n):
        size = [40, 500, 250, 15, 1200, 300, 120, 700, 60, 200, 30, 400][i % 12]
        piece = text[pos:pos + size]
        pos += size
        ids = tok.encode(piece, add_special_tokens=False).ids[: max_len - 2]
        rows.append([cls, *ids, sep])
    return rows


def pad(rows: list[list[int]], bucket: int = 16) -> tuple[np.ndarray, np.ndarray]:
    length = max(len(r) for r in rows)
    length = -(-length // bucket) * bucket if bucket else length
    ids = np.zeros((len(rows), length), dtype=np.int64)
    mask = np.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = r
        mask[i, : len(r)] = 1
    return ids, mask


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return (a * b).sum(1)


def config(**embedder: object) -> PipelineConfig:
    cfg = PipelineConfig()
    cfg.embedder = dataclasses.replace(cfg.embedder, **embedder)
    return cfg


@pytest.fixture(scope="module")
def rows() -> list[list[int]]:
    return token_rows()


@pytest.fixture(scope="module")
def reference(rows) -> np.ndarray:
    """transformers' own BertModel forward, one row at a time, no padding: mean pool + normalise."""
    hf = load_hf_model()
    out = []
    with torch.inference_mode():
        for r in rows:
            hidden = hf(input_ids=torch.tensor([r]), attention_mask=torch.ones(1, len(r), dtype=torch.long))
            v = hidden.last_hidden_state[0].mean(0)
            out.append(torch.nn.functional.normalize(v, dim=0).numpy())
    return np.stack(out)


@pytest.fixture(scope="module")
def cpu_embedder():
    e = CudaEmbedder(config(device="cpu"))
    yield e
    e.close()


# -- CPU ---------------------------------------------------------------------------------------


def test_is_an_embedder(cpu_embedder):
    assert isinstance(cpu_embedder, Embedder)
    assert cpu_embedder.dim == 384 and cpu_embedder.concurrency == 1
    assert cpu_embedder.dtype == torch.float32 and "fp32" in cpu_embedder.description
    assert cpu_embedder.governor.active is False


def test_batched_path_matches_unbatched_reference(cpu_embedder, rows, reference):
    ids, mask = pad(rows)
    got = cpu_embedder.embed(ids, mask)
    assert got.shape == (len(rows), 384) and got.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    assert cosine_rows(got, reference).min() >= 0.9999


def test_row_order_pieces_and_unbucketed_length(cpu_embedder, rows, reference):
    perm = np.random.default_rng(3).permutation(len(rows))
    ids, mask = pad([rows[i] for i in perm], bucket=0)  # odd length: padded to the bucket inside
    old = cpu_embedder._max_rows
    cpu_embedder._max_rows = 3  # output buffers of 3 rows: several pieces per call
    try:
        got = cpu_embedder.embed(ids, mask)
    finally:
        cpu_embedder._max_rows = old
    assert cosine_rows(got, reference[perm]).min() >= 0.9999


def test_the_embedder_does_not_resize_batches_the_batcher_cut(cpu_embedder, rows, monkeypatch):
    """The batcher is the one place that sizes batches: however small the governor's budget, a batch
    reaches the model whole (only an OOM or the buffers' capacity splits it)."""
    ids, mask = pad(rows)
    seen = []
    real_forward = cpu_embedder.encoder.forward
    monkeypatch.setattr(cpu_embedder.encoder, "forward", lambda i, m: seen.append(tuple(i.shape)) or real_forward(i, m))
    monkeypatch.setattr(cpu_embedder.governor, "batch_token_budget", lambda base: 1)
    cpu_embedder.embed(ids, mask)
    assert [s[0] for s in seen] == [len(rows)]


def test_oom_in_forward_splits_and_keeps_every_row(cpu_embedder, rows, reference, monkeypatch):
    encoder = cpu_embedder.encoder
    real_forward = encoder.forward
    seen = []

    def forward(ids, mask):  # the only fake: a forward that runs out of memory above 3 rows
        seen.append(ids.shape[0])
        if ids.shape[0] > 3:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.00 GiB")
        return real_forward(ids, mask)

    monkeypatch.setattr(encoder, "forward", forward)
    before = cpu_embedder.metrics()["oom_splits"]
    ids, mask = pad(rows)
    got = cpu_embedder.embed(ids, mask)
    assert cosine_rows(got, reference).min() >= 0.9999
    assert sum(n for n in seen if n <= 3) == len(rows)
    assert cpu_embedder.metrics()["oom_splits"] - before == sum(1 for n in seen if n > 3)


def test_concurrent_calls_are_safe(cpu_embedder, rows, reference):
    halves = [rows[:6], rows[6:]]
    out: dict[int, np.ndarray] = {}

    def work(k: int) -> None:
        out[k] = cpu_embedder.embed(*pad(halves[k]))

    threads = [threading.Thread(target=work, args=(k,)) for k in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    got = np.concatenate([out[0], out[1]])
    assert cosine_rows(got, reference).min() >= 0.9999


def test_bf16_on_cpu_from_an_embedder_config(rows, reference):
    """The factory may hand over the embedder section only; bf16 compute keeps cosine >= 0.999."""
    e = CudaEmbedder(EmbedderConfig(device="cpu", precision="bf16"))
    try:
        assert e.dtype == torch.bfloat16
        got = e.embed(*pad(rows[:4]))
    finally:
        e.close()
    assert got.dtype == np.float32
    assert cosine_rows(got, reference[:4]).min() >= 0.999
    with pytest.raises(EmbedderError, match="closed"):
        e.embed(*pad(rows[:1]))


def test_bad_inputs(cpu_embedder):
    ids, mask = pad([[101, 2000, 102]])
    with pytest.raises(ValueError, match=r"equal \(B, L\)"):
        cpu_embedder.embed(ids, mask[:, :2])
    assert cpu_embedder.embed(ids[:0], mask[:0]).shape == (0, 384)
    with pytest.raises(EmbedderError, match="int8"):
        resolve_precision("int8", torch.device("cpu"))


def test_flops_per_token():
    # MiniLM-L6 at L=256: 6 x (2*384*1152 + 4*256*384 + 2*384*384 + 4*384*1536)
    assert flops_per_token(256) == 6 * (884736 + 393216 + 294912 + 2359296)
    assert flops_per_token(512) > flops_per_token(128)


def test_stream_producer_cpu_fallback_is_synchronous_and_ordered():
    def compute(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:  # (B, L) -> (B, 4)
        s = (ids * mask).sum(1, keepdim=True).to(torch.float32)
        return torch.cat([s, s + 1, s * 2, mask.sum(1, keepdim=True).float()], 1)

    producer = StreamProducer(torch.device("cpu"), compute, out_dim=4, max_rows=8, max_len=16)
    assert producer.side_streams is False
    batches = [(np.full((3, 16), i, np.int64), np.ones((3, 16), np.int64)) for i in range(7)]
    got = list(producer.map(batches, depth=3))
    assert [int(g[0, 0]) for g in got] == [16 * i for i in range(7)]
    for (ids, mask), g in zip(batches, got):
        np.testing.assert_array_equal(g, producer.run(ids, mask))
    assert producer.metrics()["batches"] == 14


# -- device selection ----------------------------------------------------------------------------


def test_select_device_cpu_and_errors():
    assert select_device("cpu") == torch.device("cpu")
    assert select_device(" CPU ") == torch.device("cpu")
    for bad in ("gpu", "cuda:", "cpu:0", "cuda:x", ""):
        with pytest.raises(DeviceError, match="auto|cpu|cuda|cuda:N"):
            select_device(bad)
    with pytest.raises(DeviceError, match=r"cuda:99 requested but"):
        select_device("cuda:99")


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only behaviour")
def test_select_device_without_cuda():
    assert select_device("auto") == torch.device("cpu")
    with pytest.raises(DeviceError, match="cuda requested but no CUDA device is visible"):
        select_device("cuda")


@pytest.mark.gpu
@needs_cuda
def test_select_device_with_cuda():
    n = torch.cuda.device_count()
    assert select_device("auto") == torch.device("cuda", 0)
    assert select_device("cuda") == torch.device("cuda", 0)
    with pytest.raises(DeviceError, match=rf"cuda:{n} requested but only {n} CUDA device\(s\) visible"):
        select_device(f"cuda:{n}")


# -- CUDA ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gpu_embedder():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    e = CudaEmbedder(config(device="cuda", precision="bf16"), graph_after=2)
    yield e
    e.close()


@pytest.mark.gpu
@needs_cuda
def test_cuda_bf16_matches_fp32(gpu_embedder, rows, reference):
    fp32 = CudaEmbedder(config(device="cuda", precision="fp32"))
    try:
        ids, mask = pad(rows)
        want = fp32.embed(ids, mask)
    finally:
        fp32.close()
    got = gpu_embedder.embed(ids, mask)
    assert gpu_embedder.dtype == torch.bfloat16
    assert cosine_rows(want, reference).min() >= 0.9999  # fp32 on the GPU == the CPU reference
    assert cosine_rows(got, want).min() >= 0.999


@pytest.mark.gpu
@needs_cuda
def test_cuda_graph_path_equals_eager(rows):
    # an embedder of its own: the module's shared one has used this bucket in earlier tests, so its
    # "first" call would already be a capture and the test would compare replay with replay
    e = CudaEmbedder(config(device="cuda", precision="bf16"), graph_after=2)
    try:
        ids, mask = pad((rows * 2)[:16])  # 16 rows: no row padding, the graph runs the same shapes
        eager = e.embed(ids, mask)  # first use of the bucket: eager
        first = e.metrics()
        assert first["eager_batches"] == 1 and first["graphs_captured"] == 0, first
        graphed = e.embed(ids, mask)  # second use: captured, then replayed
        again = e.embed(ids, mask)  # replayed
        after = e.metrics()
        assert after["graphs_captured"] == 1, after
        assert after["graph_replays"] >= 2, after
        assert after["eager_batches"] == 1, after
        np.testing.assert_allclose(graphed, eager, atol=2e-3)
        assert cosine_rows(graphed, eager).min() >= 0.9999
        np.testing.assert_array_equal(graphed, again)
        # rows not a multiple of 8: the graph pads rows, results for the real rows unchanged
        e.embed(ids[:13], mask[:13])
        odd = e.embed(ids[:13], mask[:13])
        assert cosine_rows(odd, eager[:13]).min() >= 0.9999
    finally:
        e.close()


@pytest.mark.gpu
@needs_cuda
def test_stream_producer_keeps_order_and_matches_sync(gpu_embedder):
    device = gpu_embedder.device

    def compute(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:  # (B, L) -> (B, 8)
        x = (ids * mask).to(torch.float32)
        return torch.stack([x.sum(1), x.max(1).values, mask.sum(1).float()] + [x.mean(1)] * 5, 1)

    rng = np.random.default_rng(0)
    batches = []
    for i in range(40):
        rows_, length = int(rng.integers(1, 33)), 16 * int(rng.integers(1, 9))
        batches.append((rng.integers(0, 30000, (rows_, length)).astype(np.int64),
                        (rng.random((rows_, length)) < 0.8).astype(np.int64)))
    want = [compute(torch.from_numpy(i), torch.from_numpy(m)).numpy() for i, m in batches]

    side = StreamProducer(device, compute, 8, max_rows=32, max_len=128, side_streams=True, slots=4)
    sync = StreamProducer(device, compute, 8, max_rows=32, max_len=128, side_streams=False)
    for got in (list(side.map(batches, depth=3)), list(sync.map(batches, depth=3))):
        for g, w in zip(got, want):
            np.testing.assert_allclose(g, w, rtol=1e-6)
    assert side.metrics()["staged_inputs"] == 40  # plain numpy inputs go through pinned staging

    # pinned inputs from the ring are copied straight from the ring; threads overlap safely
    ring = HostBufferRing(slots=4, max_rows=32, max_len=128)
    results: dict[int, np.ndarray] = {}

    def worker(k: int) -> None:
        for j in range(k, len(batches), 2):
            ids, mask = batches[j]
            slot = ring.acquire(timeout=10)
            hi, hm = ring.views(slot, *ids.shape)
            hi[:], hm[:] = ids, mask
            results[j] = side.run(hi, hm)
            ring.release(slot)

    staged = side.metrics()["staged_inputs"]
    threads = [threading.Thread(target=worker, args=(k,)) for k in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert side.metrics()["staged_inputs"] == staged
    for j, w in enumerate(want):
        np.testing.assert_allclose(results[j], w, rtol=1e-6)


@pytest.mark.gpu
@needs_cuda
def test_cuda_governor_active(gpu_embedder):
    m = gpu_embedder.metrics()["governor"]
    assert m["active"] is True, m["reason"]


# -- length buckets that do not divide the model's length -------------------------------------------


def long_rows(n: int, length: int) -> list[list[int]]:
    """`n` rows of exactly `length` tokens ([CLS] ... [SEP]) cut from a stdlib source file."""
    tok = load_tokenizer()
    cls, sep, _ = special_ids()
    ids = tok.encode(Path(textwrap.__file__).read_text(encoding="utf-8"), add_special_tokens=False).ids
    body = length - 2
    assert len(ids) >= n * body
    return [[cls, *ids[i * body:(i + 1) * body], sep] for i in range(n)]


def test_bucket_that_does_not_divide_the_model_length():
    """length_bucket 24 and 512-token rows: padding to 528 would ask for positions the model lacks."""
    cfg = config(device="cpu", max_seq_len=512)
    cfg.profile = dataclasses.replace(cfg.profile, length_bucket=24, max_batch_tokens=2048)
    e = CudaEmbedder(cfg)
    try:
        assert e.padded_length(512) == 512 and e.padded_length(500) == 504 and e.padded_length(505) == 512
        rows = long_rows(2, 512) + long_rows(1, 505)
        hf = load_hf_model()
        with torch.inference_mode():
            want = np.stack([torch.nn.functional.normalize(
                hf(input_ids=torch.tensor([r]), attention_mask=torch.ones(1, len(r), dtype=torch.long))
                .last_hidden_state[0].mean(0), dim=0).numpy() for r in rows])
        got = e.embed(*pad(rows, bucket=0))
        assert cosine_rows(got, want).min() >= 0.9999
    finally:
        e.close()


def test_texts_are_truncated_at_the_configured_max_seq_len():
    """embed_texts (search queries) truncates as ingest does, at embedder.max_seq_len, not the default 256."""
    from hades_gpu.embedding.texts import embed_texts

    e = CudaEmbedder(config(device="cpu", precision="fp32", max_seq_len=32))
    try:
        assert e.max_seq_len == 32
        text = Path(textwrap.__file__).read_text(encoding="utf-8")[:4000]
        np.testing.assert_allclose(embed_texts(e, [text]), embed_texts(e, [text], max_seq_len=32), atol=1e-6)
        assert cosine_rows(embed_texts(e, [text]), embed_texts(e, [text], max_seq_len=256))[0] < 0.999
    finally:
        e.close()


def test_max_seq_len_beyond_the_models_positions_is_refused():
    with pytest.raises(EmbedderError, match=r"max_seq_len must be <= .*512 \(got 1024\)"):
        CudaEmbedder(config(device="cpu", max_seq_len=1024))


def test_packaged_or_env_model_dir_is_used(monkeypatch, tmp_path):
    from hades_gpu.documents.tokenizer import MODEL_DIR_ENV, ModelFilesError, model_dir

    monkeypatch.setenv(MODEL_DIR_ENV, str(tmp_path))  # an empty folder: one line naming the variable
    with pytest.raises(ModelFilesError, match=rf"{MODEL_DIR_ENV} must name a model folder.*missing config.json"):
        model_dir()


# -- a real CUDA OOM, and an ingest on CUDA ---------------------------------------------------------


@pytest.mark.gpu
@needs_cuda
def test_real_cuda_oom_splits_keeps_every_row_and_recovers():
    cfg = config(device="cuda", precision="bf16")
    cfg.profile = dataclasses.replace(cfg.profile, max_batch_tokens=65536, max_batch_size=256)
    cfg.gpu = dataclasses.replace(cfg.gpu, oom_hold_s=1.0)
    e = CudaEmbedder(cfg, graph_after=1)
    dev = e.device
    rows = long_rows(6, 256)
    rng = np.random.default_rng(5)
    batch = [rows[int(i)] for i in rng.integers(0, len(rows), 256)]  # 256 x 256 tokens, one piece
    ids, mask = pad(batch, bucket=0)
    try:
        want = e.embed(ids[:8], mask[:8])  # fits easily; also warms the weights' kernels
        torch.cuda.synchronize(dev)
        e.release_memory()
        total = torch.cuda.get_device_properties(dev).total_memory
        # leave ~96 MiB above what is held now: a 256-row batch needs far more (its FFN alone is
        # 256 x 256 x 1536 x 2 bytes = 192 MiB), an 8..32-row piece fits
        limit = (torch.cuda.memory_reserved(dev) + 96 * 2**20) / total
        torch.cuda.set_per_process_memory_fraction(limit, dev)
        try:
            got = e.embed(ids, mask)
        finally:
            torch.cuda.set_per_process_memory_fraction(1.0, dev)
        m = e.metrics()
        assert m["oom_errors"] >= 1 and m["oom_splits"] >= 1, m
        assert got.shape == (256, 384)
        ref = {tuple(r): v for r, v in zip(map(tuple, batch[:8]), want)}
        for r, v in zip(map(tuple, batch), got):  # every row, in order, right vector
            if r in ref:
                assert float(np.dot(v, ref[r])) >= 0.999
        assert np.isfinite(got).all() and np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-3)
        assert e.governor.metrics()["oom_events"] >= 1
        # recovery: after the hold the batch runs again with no new OOM, and the budget grows back
        time.sleep(1.2)
        assert not e.governor.holding
        before = e.metrics()["oom_errors"]
        again = e.embed(ids, mask)
        assert e.metrics()["oom_errors"] == before
        assert cosine_rows(again, got).min() >= 0.999
        base = cfg.profile.max_batch_tokens
        deadline = time.monotonic() + 5.0
        while e.governor.batch_token_budget(base) < base and time.monotonic() < deadline:
            time.sleep(2 * cfg.gpu.poll_interval_s)  # one doubling per fresh reading
        assert e.governor.batch_token_budget(base) == base
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, dev)
        e.close()
