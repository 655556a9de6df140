"""CSR, random walks and neighbour sampling (hades_gpu/isne/sampling.py)."""

from __future__ import annotations

import pytest
import torch

from hades_gpu.isne.evaluation import sbm_graph
from hades_gpu.isne.model import ISNE
from hades_gpu.isne.sampling import CSRGraph, random_walks, sample_neighbors


def _graph() -> tuple[torch.Tensor, int]:
    # 0-1, 0-2, 0-3, 1-2, 3-4, and 5 isolated; plus a hub 6 with 40 neighbours 7..46
    und = [(0, 1), (0, 2), (0, 3), (1, 2), (3, 4)] + [(6, j) for j in range(7, 47)]
    ei = torch.tensor(und, dtype=torch.long).T
    return torch.cat([ei, ei.flip(0)], 1), 47


def test_csr_from_edge_index() -> None:
    ei, n = _graph()
    csr = CSRGraph.from_edge_index(ei, n)
    assert csr.num_nodes == n and csr.num_edges == ei.shape[1]
    assert csr.col[csr.rowptr[0]:csr.rowptr[1]].tolist() == [1, 2, 3]
    assert csr.degree()[5] == 0 and csr.degree()[6] == 40
    with pytest.raises(ValueError, match="outside"):
        CSRGraph.from_edge_index(ei, 10)


def test_walks_only_follow_edges() -> None:
    ei, n = _graph()
    csr = CSRGraph.from_edge_index(ei, n)
    edges = set(map(tuple, ei.T.tolist()))
    g = torch.Generator().manual_seed(0)
    start = torch.arange(n).repeat(50)
    walks = random_walks(csr, start, 12, g)
    assert walks.shape == (start.numel(), 12) and (walks[:, 0] == start).all()
    a, b = walks[:, :-1].reshape(-1), walks[:, 1:].reshape(-1)
    step = b >= 0
    assert all((x, y) in edges for x, y in zip(a[step].tolist(), b[step].tolist()))
    # only walks from the isolated node stop, right after their start
    dead = (walks < 0).any(1)
    assert set(start[dead].tolist()) == {5}
    assert (walks[start == 5, 1:] == -1).all()


def test_walk_steps_are_uniform_over_neighbours() -> None:
    ei, n = _graph()
    csr = CSRGraph.from_edge_index(ei, n)
    walks = random_walks(csr, torch.full((40000,), 6), 2, torch.Generator().manual_seed(1))
    counts = torch.bincount(walks[:, 1], minlength=n)[7:47].float()
    assert counts.sum() == 40000
    assert (counts - 1000).abs().max() < 200  # each of 40 neighbours ~1000 times (sd ~31)


def test_sample_neighbors_all_when_fanout_covers_degree() -> None:
    ei, n = _graph()
    csr = CSRGraph.from_edge_index(ei, n)
    nodes = torch.tensor([0, 5, 3, 0, 4])
    nbrs, offsets, counts = sample_neighbors(csr, nodes, fanout=3)
    assert counts.tolist() == [3, 0, 2, 3, 1]
    assert offsets.tolist() == [0, 3, 3, 5, 8]
    assert nbrs.tolist() == [1, 2, 3, 0, 4, 1, 2, 3, 3]
    full = sample_neighbors(csr, nodes, fanout=None)
    assert torch.equal(full[0], nbrs) and torch.equal(full[2], counts)


def test_sample_neighbors_above_fanout_is_a_uniform_subset() -> None:
    ei, n = _graph()
    csr = CSRGraph.from_edge_index(ei, n)
    g = torch.Generator().manual_seed(2)
    nodes = torch.full((5000,), 6)
    nbrs, offsets, counts = sample_neighbors(csr, nodes, fanout=8, generator=g)
    assert (counts == 8).all() and nbrs.numel() == 5000 * 8
    rows = nbrs.view(5000, 8)
    assert ((rows >= 7) & (rows < 47)).all()
    assert all(len(set(r)) == 8 for r in rows[:500].tolist())  # without replacement
    freq = torch.bincount(nbrs, minlength=n)[7:47].float()  # expected 5000 * 8 / 40 = 1000 each
    assert (freq - 1000).abs().max() < 200


def test_sampled_neighbour_mean_equals_dense_reference() -> None:
    """With fanout >= degree, h = D^-1 A θ exactly (isolated rows: 0)."""
    ei, _ = sbm_graph(300, 3, 0.05, 0.01, seed=3)
    n = 300
    csr = CSRGraph.from_edge_index(ei, n)
    model = ISNE(n, 16)
    adj = torch.zeros(n, n)
    adj[ei[0], ei[1]] = 1.0
    deg = adj.sum(1, keepdim=True)
    dense = torch.where(deg > 0, adj @ model.theta.weight.detach() / deg.clamp_min(1), torch.zeros(1))
    fanout = int(csr.degree().max())
    nodes = torch.randperm(n)
    got = model.embed(nodes, csr, fanout=fanout, generator=torch.Generator().manual_seed(0)).detach()
    torch.testing.assert_close(got, dense[nodes], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.node_embeddings(csr), dense, rtol=1e-5, atol=1e-6)


def test_sampled_neighbour_mean_is_unbiased_below_fanout() -> None:
    ei, n = _graph()
    csr = CSRGraph.from_edge_index(ei, n)
    model = ISNE(n, 4)
    g = torch.Generator().manual_seed(5)
    est = model.embed(torch.full((4000,), 6), csr, fanout=5, generator=g).detach().mean(0)
    exact = model.theta.weight.detach()[7:47].mean(0)
    torch.testing.assert_close(est, exact, atol=0.01, rtol=0.0)


def test_weighted_walk_steps_follow_the_edge_weights() -> None:
    """With weights, a step takes an edge with probability weight / row total, in every row
    (first, middle and last rows of the CSR, so the running-sum lookup is checked at its ends)."""
    und = [(0, 1), (0, 2), (0, 3), (4, 5), (4, 6), (7, 8), (7, 9)]
    w_und = [1.0, 2.0, 7.0, 3.0, 1.0, 0.5, 4.5]
    ei = torch.tensor(und, dtype=torch.long).T
    ei = torch.cat([ei, ei.flip(0)], 1)
    w = torch.tensor(w_und + w_und)
    csr = CSRGraph.from_edge_index(ei, 10, edge_weight=w)
    g = torch.Generator().manual_seed(2)
    for start, expect in ((0, {1: 0.1, 2: 0.2, 3: 0.7}), (4, {5: 0.75, 6: 0.25}), (7, {8: 0.1, 9: 0.9}),
                          (9, {7: 1.0})):
        nxt = random_walks(csr, torch.full((20000,), start), 2, g)[:, 1]
        freq = torch.bincount(nxt, minlength=10).float() / 20000
        for node, p in expect.items():
            assert abs(float(freq[node]) - p) < 0.015, (start, node, float(freq[node]), p)
        assert float(freq[[i for i in range(10) if i not in expect]].sum()) == 0.0
    with pytest.raises(ValueError, match="> 0"):
        CSRGraph.from_edge_index(ei, 10, edge_weight=torch.zeros(ei.shape[1]))


def test_weighted_neighbour_mean_is_the_weighted_average() -> None:
    from hades_gpu.isne.inference import neighbor_mean

    ei = torch.tensor([[0, 0, 1, 2], [1, 2, 0, 0]])
    csr = CSRGraph.from_edge_index(ei, 4, edge_weight=torch.tensor([1.0, 3.0, 1.0, 3.0]))
    theta = torch.tensor([[0.0, 0.0], [4.0, 0.0], [0.0, 8.0], [9.0, 9.0]])
    h = neighbor_mean(theta, csr)
    torch.testing.assert_close(h, torch.tensor([[1.0, 6.0], [0.0, 0.0], [0.0, 0.0], [0.0, 0.0]]))
    model = ISNE(4, 2)
    with torch.no_grad():
        model.theta.weight.copy_(theta)
    torch.testing.assert_close(model.embed(torch.tensor([0, 3]), csr).detach(), h[[0, 3]])


def test_walks_on_a_graph_without_edges_stop_at_their_start() -> None:
    csr = CSRGraph.from_edge_index(torch.zeros(2, 0, dtype=torch.long), 4)
    walks = random_walks(csr, torch.tensor([0, 3, 2]), 5)
    assert walks[:, 0].tolist() == [0, 3, 2] and bool((walks[:, 1:] == -1).all())
