"""The evaluation protocol's parts, fast and exact: the planted-partition graph, the kNN classifier and
its cross-validation, node removal, and one tiny end-to-end `evaluate` whose report is consistent."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from hades_gpu.config import IsneConfig
from hades_gpu.isne.evaluation import evaluate, knn_cv_accuracy, knn_predict, remove_nodes, sbm_graph


def test_sbm_graph_is_a_clean_planted_partition():
    n, blocks = 3000, 4
    ei, y = sbm_graph(n, blocks, p_in=0.02, p_out=0.002, seed=3)
    assert ei.dtype == torch.long and y.dtype == torch.long and y.shape == (n,)
    assert sorted(torch.bincount(y).tolist()) == [750] * 4
    pairs = set(map(tuple, ei.T.tolist()))
    assert len(pairs) == ei.shape[1]  # no duplicates
    assert all((b, a) in pairs for a, b in pairs) and all(a != b for a, b in pairs)  # symmetric, no loops
    same = (y[ei[0]] == y[ei[1]]).sum().item() / 2
    cross = (y[ei[0]] != y[ei[1]]).sum().item() / 2
    want_in = 4 * 750 * 749 / 2 * 0.02  # expected counts (a few %% thinned by duplicate draws)
    want_out = 6 * 750 * 750 * 0.002
    assert 0.9 * want_in < same < 1.05 * want_in and 0.9 * want_out < cross < 1.05 * want_out
    again, y2 = sbm_graph(n, blocks, 0.02, 0.002, seed=3)
    assert torch.equal(again, ei) and torch.equal(y2, y)
    assert not torch.equal(sbm_graph(n, blocks, 0.02, 0.002, seed=4)[0][:, :50], ei[:, :50])
    assert sorted(torch.bincount(sbm_graph(10, 3, 0.5, 0.1)[1]).tolist()) == [2, 4, 4]  # ceil(10/3) per block


def test_knn_predict_votes_the_k_largest_dot_products():
    train = torch.tensor([[1.0, 0, 0], [0.9, 0.1, 0], [0, 1, 0], [0, 0.9, 0.1], [0, 0, 1], [0.1, 0, 0.9]])
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    test = torch.tensor([[2.0, 0.1, 0], [0, 3, 0], [0, 0.2, 5], [1, 1, 0]])
    for block in (1, 2, 4096):
        got = knn_predict(train, labels, test, k=2, block=block)
        assert got.tolist() == [0, 1, 2, 0]  # the last: one vote each for 0 and 1, the smaller label wins
    assert knn_predict(train, labels, test, k=50).tolist() == [0, 0, 0, 0]  # k capped at 6: a 2-2-2 tie
    assert knn_predict(train, labels + 1, test[:1], k=1, num_classes=5).tolist() == [1]


def test_knn_cv_accuracy_on_separable_and_on_shuffled_labels():
    rng = np.random.default_rng(0)
    centres = np.eye(4) * 10
    y = torch.as_tensor(rng.integers(0, 4, 400))
    x = torch.as_tensor(centres[y.numpy()] + rng.normal(size=(400, 4)), dtype=torch.float32)
    assert knn_cv_accuracy(x, y, k=5, folds=5) == 1.0
    shuffled = y[torch.randperm(400, generator=torch.Generator().manual_seed(1))]
    assert knn_cv_accuracy(x, shuffled, k=5, folds=5) < 0.45  # chance is 0.25
    assert knn_cv_accuracy(x, y, k=5, folds=4, seed=2) == 1.0
    # an odd one out per class is misclassified in every fold: accuracy is exactly the majority share
    x2 = x.clone()
    x2[:4] = torch.as_tensor(centres[(y[:4].numpy() + 1) % 4], dtype=torch.float32)
    assert knn_cv_accuracy(x2, y, k=5, folds=5) == pytest.approx(1.0 - 4 / 400, abs=1e-6)  # equal folds of 80


def test_remove_nodes_drops_every_edge_touching_them():
    ei = torch.tensor([[0, 1, 1, 2, 3, 4], [1, 0, 2, 1, 4, 3]])
    held = torch.tensor([False, False, True, False, False])
    assert remove_nodes(ei, 5, held).tolist() == [[0, 1, 3, 4], [1, 0, 4, 3]]
    assert remove_nodes(ei, 5, torch.zeros(5, dtype=torch.bool)).shape == ei.shape


def test_tiny_evaluate_report_is_consistent():
    cfg = IsneConfig(dim=8, epochs=2, batch_size=128, walk_length=6, walks_per_node=1, device="cpu", patience=10)
    r = evaluate(n=400, blocks=4, p_in=0.05, p_out=0.002, cfg=cfg, heldout_fraction=0.2, k=5, folds=3, seed=1)
    ei, _ = sbm_graph(400, 4, 0.05, 0.002, 1)
    assert (r.nodes, r.edges, r.blocks, r.p_in, r.p_out) == (400, ei.shape[1] // 2, 4, 0.05, 0.002)
    assert r.isne_epochs == r.node2vec_epochs == 2 and r.heldout_fraction == 0.2
    for acc in (r.isne_acc, r.node2vec_acc, r.inductive_train_acc, r.inductive_heldout_acc):
        assert 0.0 <= acc <= 1.0
    assert r.isne_acc > 0.4  # 4 clear communities, even after 2 epochs: chance is 0.25
    assert r.inductive_ratio == r.inductive_heldout_acc / r.inductive_train_acc
    assert r.config == dataclasses.asdict(cfg) and r.as_dict()["nodes"] == 400
    assert min(r.isne_seconds, r.node2vec_seconds, r.inductive_seconds) > 0
