"""Slabs on a CUDA device: the shared mapping is page-locked once (cudaHostRegister), so torch sees
slab views as pinned, the CUDA embedder copies from them without staging, and copies read the
slab's real contents. Marked `gpu`; without a device only the CPU behaviour is checked."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hades_gpu.gpu.slabs import SlabLayout, SlabRing

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only behaviour")
def test_without_cuda_the_ring_is_plain_shared_memory():
    ring = SlabRing(2, SlabLayout(4, 8, 64))
    try:
        assert ring.pinned is False
        ids, _ = ring.view(1).tokens(2, 8)
        ids[:] = 7
        assert not torch.from_numpy(ids).is_pinned()
    finally:
        ring.close()


@pytest.mark.gpu
@needs_cuda
def test_slab_views_are_pinned_and_async_copies_read_them():
    ring = SlabRing(3, SlabLayout(8, 32, 256))
    try:
        assert ring.pinned
        ids, mask = ring.view(2).tokens(8, 32)
        ids[:] = np.arange(8 * 32).reshape(8, 32)
        mask[:] = 1
        host = torch.from_numpy(ids)
        assert host.is_pinned()
        stream = torch.cuda.Stream()
        with torch.cuda.stream(stream):
            dev = host.to("cuda", non_blocking=True)
        stream.synchronize()
        assert torch.equal(dev.cpu(), host)
    finally:
        ring.close()


@pytest.mark.gpu
@needs_cuda
def test_the_cuda_embedder_embeds_straight_from_slabs_without_staging():
    from hades_gpu.config import load_pipeline_config
    from hades_gpu.embedding.cuda_embedder import CudaEmbedder

    cfg = load_pipeline_config("balanced")
    embedder = CudaEmbedder(cfg)
    ring = SlabRing(2, SlabLayout(16, 64, 1024))
    try:
        ids, mask = ring.view(0).tokens(16, 64)
        ids[:] = 1000
        ids[:, 0], ids[:, -1] = 101, 102
        mask[:] = 1
        vectors = embedder.embed(ids, mask)
        assert vectors.shape == (16, embedder.dim) and np.isfinite(vectors).all()
        producer = embedder.metrics()["producer"]
        if producer.get("side_streams", True):
            assert producer.get("staged_inputs", 0) == 0, producer
    finally:
        ring.close()
        embedder.close()
