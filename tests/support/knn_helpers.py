"""Vectors and configs shared by the kNN tests (tests/graph/test_ann.py, test_neighbor_lists.py)."""

from __future__ import annotations

import numpy as np

from hades_gpu.config import GraphConfig

DIM = 384
K = 10


def clustered(n: int = 3000, clusters: int = 60, spread: float = 1.0, seed: int = 0) -> np.ndarray:
    """Unit-sphere Gaussian mixture: `clusters` centres, noise of norm ~`spread` around each."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, DIM))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    x = centres[rng.integers(0, clusters, n)] + spread * rng.standard_normal((n, DIM)) / np.sqrt(DIM)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def ids_for(n: int) -> np.ndarray:
    return np.array([f"chunk-{i:06d}" for i in range(n)], dtype=object)


def ann_cfg(**kw) -> GraphConfig:
    """ANN forced; IVF-Flat (quick to train) unless the test names `knn_index`."""
    kw.setdefault("knn_index", "IVF{nlist},Flat")
    kw.setdefault("knn_nprobe", 1)
    return GraphConfig(knn_k=K, knn_exact_max_nodes=0, **kw)
