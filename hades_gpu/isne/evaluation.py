"""Quality checks as in the paper: planted partitions and a k-NN classifier on dot products.

- `sbm_graph`: a stochastic block model (planted partition) graph, generated block pair by block
  pair with numpy (no per-node loop).
- `knn_predict` / `knn_cv_accuracy`: the paper's protocol — k = 15 nearest neighbours by dot product,
  majority vote, 5-fold cross-validation — in torch, in blocks (scikit-learn is not installed).
- `evaluate`: ISNE vs a lookup-table Node2Vec trained by the same trainer with the same loss, walks
  and budget (only the neighbour mean switched off), and the inductive test: nodes removed before
  training get vectors from their neighbours' θ (with `isne.infer_rounds` rounds through held-out
  neighbours, and with none: the paper's inference, reported beside it); accuracy on them / accuracy
  on training nodes.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from hades_gpu.config import IsneConfig
from hades_gpu.isne.inference import neighbor_mean
from hades_gpu.isne.sampling import CSRGraph
from hades_gpu.isne.trainer import train_isne


def sbm_graph(n: int, blocks: int, p_in: float, p_out: float, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Planted partition: n nodes in `blocks` equal communities (label = community); an edge joins
    two nodes with probability p_in inside a community and p_out across.

    The edge count of each block pair is drawn Binomial(pairs, p), then that many node pairs are
    drawn uniformly (duplicates and self loops dropped: a negligible thinning at sparse p).

    Returns:
        (edge_index, labels): int64 (2, E) symmetric, int64 (n,).
    """
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(blocks), int(np.ceil(n / blocks)))[:n]
    rng.shuffle(labels)
    members = [np.flatnonzero(labels == b) for b in range(blocks)]
    us, vs = [], []
    for a in range(blocks):
        for b in range(a, blocks):
            na, nb = len(members[a]), len(members[b])
            pairs = na * (na - 1) // 2 if a == b else na * nb
            m = rng.binomial(pairs, p_in if a == b else p_out)
            us.append(members[a][rng.integers(0, na, m)])
            vs.append(members[b][rng.integers(0, nb, m)])
    u, v = np.concatenate(us), np.concatenate(vs)
    lo, hi = np.minimum(u, v), np.maximum(u, v)
    keep = lo != hi
    key = np.unique(lo[keep].astype(np.int64) * n + hi[keep])
    lo, hi = key // n, key % n
    ei = torch.as_tensor(np.stack([np.concatenate([lo, hi]), np.concatenate([hi, lo])]))
    return ei, torch.as_tensor(labels, dtype=torch.long)


@torch.no_grad()
def knn_predict(train_x: Tensor, train_y: Tensor, test_x: Tensor, k: int = 15, num_classes: Optional[int] = None,
                block: int = 4096) -> Tensor:
    """Majority vote of the k training rows with the largest dot product (ties: the smaller label)."""
    num_classes = int(train_y.max()) + 1 if num_classes is None else num_classes
    k = min(k, train_x.shape[0])
    out = torch.empty(test_x.shape[0], dtype=torch.long)
    for s in range(0, test_x.shape[0], block):
        sims = test_x[s:s + block] @ train_x.T  # (b, n_train)
        idx = sims.topk(k, dim=1).indices  # (b, k)
        votes = torch.zeros(idx.shape[0], num_classes)
        votes.scatter_add_(1, train_y[idx], torch.ones(idx.shape, dtype=votes.dtype))
        out[s:s + block] = votes.argmax(1)
    return out


def knn_cv_accuracy(x: Tensor, y: Tensor, k: int = 15, folds: int = 5, seed: int = 0) -> float:
    """Mean accuracy of `knn_predict` over `folds`-fold cross-validation (random folds)."""
    x, y = x.float().cpu(), y.cpu()
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))
    parts = perm.chunk(folds)
    num_classes = int(y.max()) + 1
    accs = []
    for f in range(folds):
        test = parts[f]
        train = torch.cat([parts[g] for g in range(folds) if g != f])
        pred = knn_predict(x[train], y[train], x[test], k, num_classes)
        accs.append(float((pred == y[test]).float().mean()))
    return float(np.mean(accs))


@dataclass
class EvalReport:
    nodes: int
    edges: int  # undirected
    blocks: int
    p_in: float
    p_out: float
    isne_acc: float
    node2vec_acc: float
    heldout_fraction: float
    inductive_train_acc: float  # 5-fold CV on the training nodes' vectors
    inductive_heldout_acc: float  # held-out nodes classified against the training nodes
    inductive_ratio: float
    inductive_heldout_acc_plain: float  # the same with infer_rounds=0 (trained neighbours only, the paper's)
    inductive_ratio_plain: float
    isne_epochs: int
    node2vec_epochs: int
    isne_seconds: float
    node2vec_seconds: float
    inductive_seconds: float
    config: dict

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def remove_nodes(edge_index: Tensor, num_nodes: int, heldout: Tensor) -> Tensor:
    """Edges with neither end in `heldout` (a bool (N,) mask)."""
    keep = ~(heldout[edge_index[0]] | heldout[edge_index[1]])
    return edge_index[:, keep]


def evaluate(n: int = 20000, blocks: int = 10, p_in: float = 5 / 1999, p_out: float = 5 / 18000,
             cfg: Optional[IsneConfig] = None, heldout_fraction: float = 0.15, k: int = 15, folds: int = 5,
             seed: int = 0, device: Optional[str] = None) -> EvalReport:
    """The whole quality protocol on one SBM graph (see the module docstring)."""
    cfg = cfg or IsneConfig()
    ei, y = sbm_graph(n, blocks, p_in, p_out, seed)
    n_edges = ei.shape[1] // 2

    t = time.perf_counter()
    isne = train_isne(ei, n, cfg, aggregate=True, device=device)
    isne_s = time.perf_counter() - t
    # final vectors: exact neighbour mean over the *full* graph (held-out validation edges included)
    full = CSRGraph.from_edge_index(ei, n, device=isne.csr.device)
    x_isne = neighbor_mean(isne.model.theta.weight.detach(), full).cpu()
    acc_isne = knn_cv_accuracy(x_isne, y, k, folds, seed)

    t = time.perf_counter()
    n2v = train_isne(ei, n, cfg, aggregate=False, device=device)  # same loss, walks, epochs, stopping
    n2v_s = time.perf_counter() - t
    acc_n2v = knn_cv_accuracy(n2v.model.theta.weight.detach().cpu(), y, k, folds, seed)

    # inductive: drop a random node set, train on the rest, infer the dropped nodes from neighbours
    t = time.perf_counter()
    g = torch.Generator().manual_seed(seed + 1)
    held = torch.zeros(n, dtype=torch.bool)
    held[torch.randperm(n, generator=g)[: int(round(heldout_fraction * n))]] = True
    ind = train_isne(remove_nodes(ei, n, held), n, cfg, aggregate=True, device=device)
    theta = ind.model.theta.weight.detach()
    known = torch.where(held, -1, torch.arange(n)).to(theta.device)  # held-out nodes have no θ
    x_ind = neighbor_mean(theta, full.to(theta.device), known=known, rounds=cfg.infer_rounds).cpu()
    tr = (~held).nonzero().squeeze(1)
    te = held.nonzero().squeeze(1)
    acc_tr = knn_cv_accuracy(x_ind[tr], y[tr], k, folds, seed)  # training nodes: the same in both
    pred = knn_predict(x_ind[tr], y[tr], x_ind[te], k, blocks)
    acc_te = float((pred == y[te]).float().mean())
    x_plain = neighbor_mean(theta, full.to(theta.device), known=known, nodes=te.to(theta.device)).cpu()
    acc_plain = float((knn_predict(x_ind[tr], y[tr], x_plain, k, blocks) == y[te]).float().mean())
    ind_s = time.perf_counter() - t

    return EvalReport(
        nodes=n, edges=n_edges, blocks=blocks, p_in=p_in, p_out=p_out,
        isne_acc=acc_isne, node2vec_acc=acc_n2v, heldout_fraction=heldout_fraction,
        inductive_train_acc=acc_tr, inductive_heldout_acc=acc_te,
        inductive_ratio=acc_te / acc_tr if acc_tr > 0 else float("nan"),
        inductive_heldout_acc_plain=acc_plain,
        inductive_ratio_plain=acc_plain / acc_tr if acc_tr > 0 else float("nan"),
        isne_epochs=isne.epochs_run, node2vec_epochs=n2v.epochs_run,
        isne_seconds=isne_s, node2vec_seconds=n2v_s, inductive_seconds=ind_s,
        config=dataclasses.asdict(cfg),
    )
