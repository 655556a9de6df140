"""ISNE model, loss, inductive inference, isolated nodes and checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from hades_gpu.isne.inference import infer_from_checkpoint, neighbor_mean
from hades_gpu.isne.checkpoint import load_checkpoint, save_checkpoint
from hades_gpu.isne.model import ISNE, skipgram_loss
from hades_gpu.isne.sampling import CSRGraph


def _sym(pairs: list[tuple[int, int]]) -> torch.Tensor:
    ei = torch.tensor(pairs, dtype=torch.long).T
    return torch.cat([ei, ei.flip(0)], 1)


def test_skipgram_loss_matches_explicit_pairs() -> None:
    torch.manual_seed(0)
    w, length, d, c, k = 3, 7, 5, 3, 2
    h_walk = torch.randn(w, length, d)
    h_neg = torch.randn(k, w, length, d)
    valid = torch.ones(w, length, dtype=torch.bool)
    valid[1, 4:] = False  # a walk that died after 4 nodes
    loss, n_pos = skipgram_loss(h_walk, valid, h_neg, c)
    pos, neg = [], []
    for i in range(w):
        for j in range(length - c + 1):
            if not valid[i, j]:
                continue
            for o in range(1, c):
                if valid[i, j + o]:
                    pos.append(F.logsigmoid(h_walk[i, j] @ h_walk[i, j + o]))
                for kk in range(k):
                    neg.append(F.logsigmoid(-(h_walk[i, j] @ h_neg[kk, i, j + o])))
    ref = -torch.stack(pos).mean() - torch.stack(neg).mean()
    assert int(n_pos) == len(pos)
    torch.testing.assert_close(loss, ref)


def test_isolated_node_is_the_zero_vector() -> None:
    ei = _sym([(0, 1), (1, 2)])  # node 3 isolated
    csr = CSRGraph.from_edge_index(ei, 4)
    model = ISNE(4, 8)
    h = model.embed(torch.tensor([3, 1]), csr, fanout=2)
    assert torch.equal(h[0], torch.zeros(8))
    torch.testing.assert_close(h[1], model.theta.weight[[0, 2]].mean(0))
    assert torch.equal(model.node_embeddings(csr)[3], torch.zeros(8))
    # an empty graph: every node isolated
    empty = CSRGraph.from_edge_index(torch.zeros(2, 0, dtype=torch.long), 4)
    assert torch.equal(model.embed(torch.arange(4), empty, fanout=3), torch.zeros(4, 8))


def test_gradient_is_sparse_and_only_touches_sampled_neighbours() -> None:
    ei = _sym([(0, 1), (1, 2), (2, 3), (4, 5)])
    csr = CSRGraph.from_edge_index(ei, 6)
    model = ISNE(6, 4)
    walks = torch.tensor([[0, 1, 2, 3]])
    neg = torch.tensor([[0, 1, 1, 2]])
    loss, _ = model.loss(walks, neg, csr, context_size=2, fanout=4)
    loss.backward()
    grad = model.theta.weight.grad
    assert grad.is_sparse
    touched = set(grad.coalesce().indices()[0].tolist())
    assert touched == {0, 1, 2, 3}  # neighbours of {0, 1, 2, 3}; nodes 4, 5 untouched


def test_unseen_node_vector_is_mean_of_trained_neighbours(tmp_path: Path) -> None:
    """Checkpoint over nodes a..d; the current graph adds x (linked to a, c and the new y), y and
    the isolated z. h(x) = mean(θ_a, θ_c): y has no θ and is left out. y is linked only to the new
    x, so it has no trained neighbour and gets 0, like the isolated z."""
    theta = torch.randn(4, 6)
    path = save_checkpoint(tmp_path / "model.safetensors", theta, ["a", "b", "c", "d"], {"dim": 6})
    ckpt = load_checkpoint(path)
    assert ckpt.node_ids == ["a", "b", "c", "d"] and ckpt.config == {"dim": 6}
    torch.testing.assert_close(ckpt.theta, theta)

    ids = ["x", "a", "b", "c", "d", "y", "z"]  # a new order: the checkpoint maps by id
    ei = _sym([(1, 2), (2, 3), (3, 4), (0, 1), (0, 3), (0, 5)])
    vecs, known = infer_from_checkpoint(ckpt, ids, ei)
    assert known.tolist() == [False, True, True, True, True, False, False]
    torch.testing.assert_close(vecs[0], (theta[0] + theta[2]) / 2)  # x: mean of θ_a, θ_c
    torch.testing.assert_close(vecs[1], theta[1])  # a: neighbours b (trained) and x (new)
    torch.testing.assert_close(vecs[3], (theta[1] + theta[3]) / 2)  # c: b, d (x is new)
    assert torch.equal(vecs[5], torch.zeros(6)) and torch.equal(vecs[6], torch.zeros(6))


def test_new_neighbours_join_the_mean_with_their_estimates_for_the_rounds_asked() -> None:
    """Trained a, b, c (rows 0..2); new x (linked to a, c, y), y (linked to x, b), w (linked to y
    only), isolated z. Round 0 is the paper's mean over trained neighbours; each further round lets
    a new neighbour in with its previous estimate, and a new node without any estimate stays out
    (w has none until y has one). Trained nodes keep the mean over trained neighbours. With edge
    weights the means are weighted the same way."""
    theta = torch.randn(3, 5, dtype=torch.float64).float()
    a, b, c = theta
    names = ["a", "b", "c", "x", "y", "w", "z"]
    ix = {n: i for i, n in enumerate(names)}
    pairs = [("x", "a"), ("x", "c"), ("x", "y"), ("y", "b"), ("w", "y"), ("a", "b")]
    ei = _sym([(ix[p], ix[q]) for p, q in pairs])
    csr = CSRGraph.from_edge_index(ei, len(names))
    known = torch.tensor([0, 1, 2, -1, -1, -1, -1])
    x0, y0 = (a + c) / 2, b
    zero = torch.zeros(5)
    want = {
        0: [x0, y0, zero],
        1: [(a + b + c) / 3, (x0 + b) / 2, y0],
        2: [(a + c + (x0 + b) / 2) / 3, ((a + b + c) / 3 + b + y0) / 3, (x0 + b) / 2],  # w has y0 now
    }
    for rounds, (x, y, w) in want.items():
        got = neighbor_mean(theta, csr, known=known, rounds=rounds)
        for name, vec in (("x", x), ("y", y), ("w", w), ("z", zero), ("a", b), ("b", a)):
            torch.testing.assert_close(got[ix[name]], vec, msg=f"{name} after {rounds} round(s)")
        part = neighbor_mean(theta, csr, known=known, nodes=torch.tensor([ix["w"], ix["a"]]), rounds=rounds)
        torch.testing.assert_close(part, got[[ix["w"], ix["a"]]])  # the same for a subset of nodes
    weight = torch.tensor([1.0, 3.0, 2.0, 1.0, 1.0, 1.0])
    wcsr = CSRGraph.from_edge_index(ei, len(names), edge_weight=torch.cat([weight, weight]))
    got = neighbor_mean(theta, wcsr, known=known, rounds=1)
    torch.testing.assert_close(got[ix["x"]], (1 * a + 3 * c + 2 * y0) / 6)
    torch.testing.assert_close(got[ix["y"]], (2 * (1 * a + 3 * c) / 4 + 1 * b) / 3)  # x's estimate weighted too


def test_neighbor_mean_batches_agree() -> None:
    ei = _sym([(i, (i * 7 + 3) % 50) for i in range(50)] + [(i, i + 1) for i in range(49)])
    csr = CSRGraph.from_edge_index(ei, 50)
    theta = torch.randn(50, 8)
    torch.testing.assert_close(neighbor_mean(theta, csr, batch_size=7), neighbor_mean(theta, csr))


def test_node2vec_mode_is_a_lookup_table() -> None:
    csr = CSRGraph.from_edge_index(_sym([(0, 1)]), 3)
    model = ISNE(3, 4, aggregate=False)
    torch.testing.assert_close(model.embed(torch.tensor([2, 0]), csr), model.theta.weight[[2, 0]])


def test_checkpoint_rejects_other_files(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(ValueError, match="not an ISNE checkpoint"):
        load_checkpoint(tmp_path / "x.safetensors")
    with pytest.raises(ValueError, match="len\\(node_ids\\)"):
        save_checkpoint(tmp_path / "y.safetensors", torch.zeros(3, 2), ["a"], {})


def test_sparse_and_dense_gradients_agree() -> None:
    ei = _sym([(i, (i * 5 + 1) % 30) for i in range(30)] + [(i, i + 1) for i in range(29)])
    csr = CSRGraph.from_edge_index(ei, 30)
    walks = torch.randint(30, (8, 6), generator=torch.Generator().manual_seed(0))
    neg = torch.randint(30, (16, 6), generator=torch.Generator().manual_seed(1))
    grads = []
    for sparse in (True, False):
        model = ISNE(30, 4, sparse=sparse)
        with torch.no_grad():
            model.theta.weight.copy_(torch.arange(120, dtype=torch.float32).view(30, 4).sin())
        loss, _ = model.loss(walks, neg, csr, context_size=3, fanout=None)
        loss.backward()
        g = model.theta.weight.grad
        grads.append(g.to_dense() if g.is_sparse else g)
    torch.testing.assert_close(grads[0], grads[1])


@pytest.mark.parametrize("sparse", [True, False])
def test_neighbor_mean_gradient_matches_plain_autograd(sparse: bool) -> None:
    """The hand-written backward of h() (bag sums transposed into one embedding_bag) against
    autograd through per-bag index_select + mean: repeated rows, an empty bag, every row touched
    or not."""
    from hades_gpu.isne.model import neighbor_mean_rows

    g = torch.Generator().manual_seed(3)
    n, d = 40, 6
    counts = torch.tensor([3, 0, 5, 1, 7, 2, 0, 4])
    nbrs = torch.randint(n, (int(counts.sum()),), generator=g)
    nbrs[:3] = 11  # one row three times in one bag
    offsets = torch.cumsum(counts, 0) - counts
    grad_h = torch.randn(counts.numel(), d, generator=g)
    w = torch.nn.Parameter(torch.randn(n, d, generator=g))
    neighbor_mean_rows(w, nbrs, offsets, counts, sparse_grad=sparse).backward(grad_h)
    got = w.grad.to_dense() if w.grad.is_sparse else w.grad
    assert w.grad.is_sparse == sparse
    if sparse:
        rows = w.grad._indices()[0]
        assert torch.equal(rows, torch.unique(nbrs))  # one sorted row per distinct neighbour

    ref_w = torch.nn.Parameter(w.detach().clone())
    bags = [ref_w.index_select(0, nbrs[o:o + c]).mean(0) if c else torch.zeros(d)
            for o, c in zip(offsets.tolist(), counts.tolist())]
    torch.stack(bags).backward(grad_h)
    torch.testing.assert_close(got, ref_w.grad)
    h = neighbor_mean_rows(w, nbrs, offsets, counts, sparse_grad=sparse)
    torch.testing.assert_close(h, torch.stack(bags).detach())


def test_theta_is_drawn_once_from_the_given_generator(monkeypatch):
    """One N(0, init_std^2) draw per model (nn.Embedding's own N(0, 1) fill is skipped), from the
    generator given: two models from equal seeds start equal, other seeds differ."""
    calls = []
    real = torch.Tensor.normal_

    def counting(self, *args, **kwargs):
        calls.append(tuple(self.shape))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "normal_", counting)
    a = ISNE(50, 8, init_std=0.5, generator=torch.Generator().manual_seed(3))
    assert calls == [(50, 8)]
    b = ISNE(50, 8, init_std=0.5, generator=torch.Generator().manual_seed(3))
    c = ISNE(50, 8, init_std=0.5, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a.theta.weight, b.theta.weight) and not torch.equal(a.theta.weight, c.theta.weight)


def test_walk_positions_at_node_zero_are_scored() -> None:
    """Only -1 (past a dead end) leaves a position out: node 0 is a node like any other. On a cycle
    every walk is whole, so every window pair counts, those that touch node 0 included."""
    n = 6
    ring = torch.arange(n)
    ei = torch.cat([torch.stack([ring, (ring + 1) % n]), torch.stack([(ring + 1) % n, ring])], dim=1)
    csr = CSRGraph.from_edge_index(ei, n)
    walks = torch.tensor([[0, 1, 2, 3], [5, 0, 1, 0]])
    neg = torch.tensor([[3, 4, 2, 5], [2, 3, 4, 1]])
    _, n_pos = ISNE(n, 8, generator=torch.Generator().manual_seed(0)).loss(walks, neg, csr, context_size=2)
    assert int(n_pos) == 2 * 3  # 2 walks x 3 windows x 1 context node
