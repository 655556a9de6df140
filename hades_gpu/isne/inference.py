r"""Inductive inference: vectors for nodes from their neighbours' trained θ, without training.

.. math::
    h(v) = \frac{1}{|K(v)|} \sum_{n \in K(v)} \theta_n, \qquad K(v) = N(v) \cap \text{trained nodes}

That is Kiss & Szűcs' inference, and `rounds=0` gives exactly it: neighbours that are themselves
new (no θ) are left out, and a node with no trained neighbour gets the zero vector, as isolated nodes
do in training (`hades_gpu.isne.model`). New nodes rarely come alone, though: a new document's chunks
are linked to each other (sequence edges) more than to trained chunks. With `rounds` > 0 a new
neighbour takes part in the mean with an estimate of its θ, its own h() from the previous round
(round 0: the plain mean above), so what a new node's new neighbours are linked to reaches it, up to
`rounds` hops away; new neighbours without any estimate yet are still left out. Trained nodes keep
the plain mean over their trained neighbours, as in training. Measured with `scripts/eval_isne.py
--seed 0/1/2` (the 20,000-node planted partition, 15% of the nodes held out, the same trained θ read
both ways): held-out accuracy / training accuracy 0.894 / 0.877 / 0.885 with `rounds=0`, 0.922 /
0.906 / 0.915 with 2 rounds (the default, `isne.infer_rounds`; 1 round scored within 0.005 of 2 in
a side run, but a new document's chunks form chains of new nodes that one round reaches only one
link into).

For the nodes of the training graph with all their neighbours trained, this is exactly the model's
h() with fanout = infinity. With edge weights (`isne.edge_weights`) the mean is weighted by them,
over the neighbours that take part.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from hades_gpu.isne.checkpoint import IsneCheckpoint
from hades_gpu.isne.sampling import CSRGraph, bag_weights, sample_neighbor_slots


@torch.no_grad()
def neighbor_mean(theta: Tensor, csr: CSRGraph, known: Optional[Tensor] = None, nodes: Optional[Tensor] = None,
                  batch_size: int = 1 << 16, rounds: int = 0) -> Tensor:
    """Mean of neighbours' θ, in batches of nodes (see the module docstring for `rounds`).

    Args:
        theta (Tensor): (M, d) trained parameters.
        csr (CSRGraph): graph over N nodes (the current one, new nodes included).
        known (Tensor, optional): int64 (N,), row of θ for each node, -1 for a node without θ.
            Default: node i is row i (M == N).
        nodes (Tensor, optional): int64 (B,) nodes to embed. Default: all N.
        batch_size (int, optional): nodes per step. (default: 65536)
        rounds (int, optional): propagation rounds through new neighbours (0: trained neighbours
            only, the paper's inference). (default: 0)

    Returns:
        float32 (B, d) (or (N, d)), on θ's device.
    """
    device = theta.device
    csr = csr.to(device)
    n = csr.num_nodes
    if known is None:
        if theta.shape[0] != n:
            raise ValueError(f"theta must have one row per node without `known` (got {theta.shape[0]} rows, {n} nodes)")
        known = torch.arange(n, device=device)
    else:
        known = known.to(device)
    nodes = torch.arange(n, device=device) if nodes is None else nodes.to(device)
    new = (known < 0).nonzero().squeeze(1)
    if rounds == 0 or not new.numel():
        return _means(theta.float(), csr, known, nodes, batch_size)[0]
    # rows M.. of an extended table hold the new nodes' current estimates; row_of maps a node to
    # its θ row, its estimate's row, or -1 (new, no estimate yet: left out of means)
    m = theta.shape[0]
    slot = torch.full((n,), -1, dtype=torch.int64, device=device)
    slot[new] = torch.arange(new.numel(), device=device)
    table = torch.empty(m + new.numel(), theta.shape[1], dtype=torch.float32, device=device)
    table[:m] = theta
    row_of = known  # round 0 reads θ rows only
    for _ in range(rounds + 1):  # round 0 is the plain mean, then `rounds` rounds through estimates
        estimates, informed = _means(table, csr, row_of, new, batch_size)  # reads the previous round's
        table[m:] = estimates
        row_of = torch.where(known >= 0, known, torch.where(informed[slot.clamp_min(0)], m + slot, -1))
    is_new = known[nodes] < 0
    out = torch.empty(nodes.numel(), theta.shape[1], dtype=torch.float32, device=device)
    out[is_new] = table[m + slot[nodes[is_new]]] * informed[slot[nodes[is_new]]].unsqueeze(1)
    trained = ~is_new
    if trained.any():  # trained nodes: the plain mean over trained neighbours, as in training
        out[trained] = _means(theta.float(), csr, known, nodes[trained], batch_size)[0]
    return out


def _means(table: Tensor, csr: CSRGraph, row_of: Tensor, nodes: Tensor, batch_size: int) -> tuple[Tensor, Tensor]:
    """(mean of `table[row_of[u]]` over each node's neighbours u with a row (float32 (B, d)), whether
    any neighbour had one (bool (B,))); neighbours whose `row_of` is -1 are left out."""
    device = table.device
    out = torch.zeros(nodes.numel(), table.shape[1], dtype=torch.float32, device=device)
    informed = torch.zeros(nodes.numel(), dtype=torch.bool, device=device)
    for b0 in range(0, nodes.numel(), batch_size):
        batch = nodes[b0:b0 + batch_size]
        edges, offsets, counts = sample_neighbor_slots(csr, batch, None)  # all neighbours
        rows = torch.repeat_interleave(torch.arange(batch.numel(), device=device), counts)
        idx = row_of[csr.col[edges]]
        keep = idx >= 0
        nbrs, rows, edges = idx[keep], rows[keep], edges[keep]
        counts = torch.bincount(rows, minlength=batch.numel())
        offsets = torch.cumsum(counts, 0) - counts
        slot_w = bag_weights(csr, edges, offsets, counts)  # plain or edge-weighted mean, as in training
        out[b0:b0 + batch.numel()] = F.embedding_bag(nbrs, table, offsets, mode="sum", per_sample_weights=slot_w)
        informed[b0:b0 + batch.numel()] = counts > 0
    return out, informed


def infer_from_checkpoint(ckpt: IsneCheckpoint, node_ids: Sequence[str], edge_index: Tensor,
                          nodes: Optional[Tensor] = None, device: torch.device | str = "cpu",
                          batch_size: int = 1 << 16, edge_weight: Optional[Tensor] = None,
                          rounds: int = 0) -> tuple[Tensor, Tensor]:
    """h() of `nodes` of the current graph (ids `node_ids`, undirected `edge_index`, optional (E,)
    weights: pass them when the model was trained with `isne.edge_weights`) from a checkpoint, with
    `rounds` of propagation through new neighbours (`neighbor_mean`).

    Returns:
        (vectors, known): float32 (B, d) on the CPU; bool (N,), True where the node has a trained θ.
    """
    pos = {cid: i for i, cid in enumerate(ckpt.node_ids)}
    known = torch.as_tensor(np.fromiter((pos.get(c, -1) for c in node_ids), dtype=np.int64, count=len(node_ids)))
    csr = CSRGraph.from_edge_index(edge_index, len(node_ids), edge_weight=edge_weight)
    theta = ckpt.theta.to(device)
    vecs = neighbor_mean(theta, csr, known=known, nodes=nodes, batch_size=batch_size, rounds=rounds)
    return vecs.cpu(), known >= 0
