"""Blocked kNN (graph/knn.py) against a brute-force reference: neighbours, ties, devices."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hades_gpu.graph.knn import knn_blocked, knn_brute_force


@pytest.mark.parametrize("block", [1, 7, 64, 1000])
def test_knn_blocked_equals_brute_force(block: int) -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(101, 16)).astype(np.float32)
    x[5] = 0.0  # a missing embedding: no neighbours, nobody's neighbour
    got = knn_blocked(x, k=5, threshold=0.1, block_size=block)
    ref = knn_brute_force(x, k=5, threshold=0.1)
    np.testing.assert_array_equal(got[0], ref[0])
    np.testing.assert_array_equal(got[1], ref[1])
    np.testing.assert_allclose(got[2], ref[2], atol=1e-5)
    assert 5 not in got[0] and 5 not in got[1]
    assert (got[0] != got[1]).all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_knn_cuda_equals_cpu() -> None:
    rng = np.random.default_rng(2)
    x = rng.normal(size=(5000, 64)).astype(np.float32)
    cpu = knn_blocked(x, k=10, threshold=0.0, block_size=1024, device="cpu")
    gpu = knn_blocked(x, k=10, threshold=0.0, block_size=1024, device="cuda")
    np.testing.assert_array_equal(cpu[0], gpu[0])
    np.testing.assert_array_equal(cpu[1], gpu[1])
    np.testing.assert_allclose(cpu[2], gpu[2], atol=1e-5)


@pytest.mark.parametrize("block", [5, 7, 64, 4096])
def test_knn_ties_go_to_the_smaller_index(block: int) -> None:
    """Duplicated vectors give exactly equal similarities: the k kept must be the lowest indices
    (torch.topk alone keeps an arbitrary subset of equal values)."""
    rng = np.random.default_rng(0)
    groups = rng.integers(0, 5, 300)
    scale = rng.uniform(0.5, 2.0, (300, 1)).astype(np.float32)  # normalises back to the exact basis vector
    x = np.eye(16, dtype=np.float32)[groups] * scale
    src, dst, sim = knn_blocked(x, k=6, threshold=-1.0, block_size=block)
    ref = knn_brute_force(x, k=6, threshold=-1.0)
    np.testing.assert_array_equal(src, ref[0])
    np.testing.assert_array_equal(dst, ref[1])
    np.testing.assert_array_equal(sim, ref[2])
    for i in (0, 150, 299):  # spelled out: the 6 smallest other indices of the same group
        same = [j for j in np.flatnonzero(groups == groups[i]) if j != i][:6]
        assert dst[src == i].tolist() == same


def test_knn_brute_force_reference_cases() -> None:
    x = np.array([[1, 0], [1, 0.1], [0, 1], [0, 0], [-1, 0]], np.float32)
    src, dst, sim = knn_brute_force(x, k=10, threshold=0.0)  # k larger than n - 1
    assert src.dtype == np.int64 and dst.dtype == np.int64 and sim.dtype == np.float32
    pairs = set(zip(src.tolist(), dst.tolist()))
    assert 3 not in src and 3 not in dst  # the zero vector has no neighbours and is nobody's
    assert (0, 1) in pairs and (1, 2) in pairs and (0, 2) in pairs  # cosine(0, 2) == 0 meets threshold 0
    assert (0, 4) not in pairs
    np.testing.assert_allclose(sim[(src == 0) & (dst == 1)], 1 / np.sqrt(1.01), rtol=1e-6)
    s1, d1, _ = knn_brute_force(x, k=1, threshold=-1.0)
    assert dict(zip(s1.tolist(), d1.tolist())) == {0: 1, 1: 0, 2: 1, 4: 2}
    s2, d2, _ = knn_brute_force(np.eye(3, dtype=np.float32), k=5, threshold=-1.0)
    assert len(s2) == 6  # every other node of 3, never itself
    f64 = knn_brute_force(np.array([[1.0, 1e-9], [1.0, 0.0], [0.0, 1.0]]), k=1, threshold=0.5)
    assert f64[1].tolist() == [1, 0]
