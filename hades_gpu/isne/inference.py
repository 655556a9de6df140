r"""Inductive inference: vectors for nodes from their neighbours' trained θ, without training.

.. math::
    h(v) = \frac{1}{|K(v)|} \sum_{n \in K(v)} \theta_n, \qquad K(v) = N(v) \cap \text{trained nodes}

Neighbours that are themselves new (no θ) are left out of the mean. A node with no trained
neighbour (isolated, or linked only to other new nodes) gets the zero vector, as isolated nodes do
in training (`hades_gpu.isne.model`). For the nodes of the training graph with all their neighbours
trained, this is exactly the model's h() with fanout = infinity. With edge weights (`isne.edge_weights`)
the mean is weighted by them, over the trained neighbours.
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
                  batch_size: int = 1 << 16) -> Tensor:
    """Exact mean of trained neighbours' θ, in batches of nodes.

    Args:
        theta (Tensor): (M, d) trained parameters.
        csr (CSRGraph): graph over N nodes (the current one, new nodes included).
        known (Tensor, optional): int64 (N,), row of θ for each node, -1 for a node without θ.
            Default: node i is row i (M == N).
        nodes (Tensor, optional): int64 (B,) nodes to embed. Default: all N.
        batch_size (int, optional): nodes per step. (default: 65536)

    Returns:
        float32 (B, d) (or (N, d)), on θ's device.
    """
    device = theta.device
    csr = csr.to(device)
    n = csr.num_nodes
    if known is None:
        if theta.shape[0] != n:
            raise ValueError(f"theta must have one row per node without `known` (got {theta.shape[0]} rows, {n} nodes)")
    else:
        known = known.to(device)
    nodes = torch.arange(n, device=device) if nodes is None else nodes.to(device)
    out = torch.zeros(nodes.numel(), theta.shape[1], dtype=torch.float32, device=device)
    for b0 in range(0, nodes.numel(), batch_size):
        batch = nodes[b0:b0 + batch_size]
        edges, offsets, counts = sample_neighbor_slots(csr, batch, None)  # all neighbours
        nbrs = csr.col[edges]
        if known is not None:
            rows = torch.repeat_interleave(torch.arange(batch.numel(), device=device), counts)
            idx = known[nbrs]
            keep = idx >= 0
            nbrs, rows, edges = idx[keep], rows[keep], edges[keep]
            counts = torch.bincount(rows, minlength=batch.numel())
            offsets = torch.cumsum(counts, 0) - counts
        slot_w = bag_weights(csr, edges, offsets, counts)  # plain or edge-weighted mean, as in training
        out[b0:b0 + batch.numel()] = F.embedding_bag(nbrs, theta.float(), offsets, mode="sum", per_sample_weights=slot_w)
    return out


def infer_from_checkpoint(ckpt: IsneCheckpoint, node_ids: Sequence[str], edge_index: Tensor,
                          nodes: Optional[Tensor] = None, device: torch.device | str = "cpu",
                          batch_size: int = 1 << 16, edge_weight: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """h() of `nodes` of the current graph (ids `node_ids`, undirected `edge_index`, optional (E,)
    weights: pass them when the model was trained with `isne.edge_weights`) from a checkpoint.

    Returns:
        (vectors, known): float32 (B, d) on the CPU; bool (N,), True where the node has a trained θ.
    """
    pos = {cid: i for i, cid in enumerate(ckpt.node_ids)}
    known = torch.as_tensor(np.fromiter((pos.get(c, -1) for c in node_ids), dtype=np.int64, count=len(node_ids)))
    csr = CSRGraph.from_edge_index(edge_index, len(node_ids), edge_weight=edge_weight)
    theta = ckpt.theta.to(device)
    vecs = neighbor_mean(theta, csr, known=known, nodes=nodes, batch_size=batch_size)
    return vecs.cpu(), known >= 0
