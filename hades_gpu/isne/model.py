r"""ISNE: Inductive Shallow Node Embedding (Kiss & Szűcs, 2024).

`"Unsupervised Graph Representation Learning with Inductive Shallow Node Embedding"
<https://doi.org/10.1007/s40747-024-01545-6>`_, Complex & Intelligent Systems 10(5):7333–7348.

A node has no vector of its own. Every node n owns a free parameter vector θ_n (a row of an
N x d table) and the embedding of v is the mean over its neighbours:

.. math::
    h(v) = \frac{1}{|N(v)|} \sum_{n \in N(v)} \theta_n

so a node added after training gets a vector from its neighbours' θ without any training
(`hades_gpu.isne.inference`). Training minimises Node2Vec's skip-gram loss with negative sampling
(`skipgram_loss`) with h() on *both* sides of each pair, as the paper does.

In a mini-batch, h(v) averages at most `fanout` neighbours sampled without replacement
(`hades_gpu.isne.sampling.sample_neighbors`); with fanout >= deg(v) it is exact.

**Isolated nodes** (no neighbours): h(v) = 0, the zero vector (an empty mean). Such a node carries no
graph information; 0 has dot product 0 with every vector, so it is never anybody's near neighbour and
nothing pretends otherwise. Training never starts walks from them or draws them as negatives.

With ``aggregate=False`` the same module is a lookup-table Node2Vec (h(v) = θ_v), the baseline of
`scripts/eval_isne.py`.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hades_gpu.isne.inference import neighbor_mean
from hades_gpu.isne.sampling import CSRGraph, bag_index, bag_weights, sample_neighbor_slots



class ISNE(nn.Module):
    r"""The parameter table θ and the neighbour-mean encoder h().

    .. math::
        h(v) = \frac{1}{|\tilde N(v)|} \sum_{n \in \tilde N(v)} \theta_n, \qquad
        \tilde N(v) \subseteq N(v),\ |\tilde N(v)| = \min(\mathrm{deg}(v), \mathrm{fanout})

    Args:
        num_nodes (int): N, rows of θ.
        dim (int): d, the embedding size.
        aggregate (bool, optional): h(v) = neighbour mean (ISNE); False: h(v) = θ_v (Node2Vec).
            (default: :obj:`True`)
        sparse (bool, optional): sparse gradients for θ (for `torch.optim.SparseAdam`).
            (default: :obj:`True`)
        init_std (float, optional): θ starts as N(0, init_std²). (default: :obj:`0.1`; PyG's
            Node2Vec uses 1.0, which saturates the sigmoid of 64-d dot products and slowed both
            ISNE and the Node2Vec baseline in `scripts/eval_isne.py`: lookup-table Node2Vec reached
            0.31 accuracy instead of 0.78 after the same 20 epochs)
        generator (torch.Generator, optional): for θ's initial draw (the trainer's is seeded, on the
            CPU, so CPU and CUDA runs start from the same θ). (default: torch's global one)

    Shapes:
        - **θ:** (N, d)
        - **embed:** nodes (U,) -> (U, d)
    """

    def __init__(self, num_nodes: int, dim: int, aggregate: bool = True, sparse: bool = True,
                 init_std: float = 0.1, generator: Optional[torch.Generator] = None) -> None:
        super().__init__()
        self.num_nodes = num_nodes
        self.dim = dim
        self.aggregate = aggregate
        self.sparse = sparse
        self.init_std = init_std
        # _weight: nn.Embedding would fill a fresh table with N(0, 1) only for reset_parameters to
        # overwrite it (each fill of a 1e6 x 64 table costs ~0.35 s on the CPU)
        self.theta = nn.Embedding(num_nodes, dim, sparse=sparse, _weight=torch.empty(num_nodes, dim))
        self.reset_parameters(generator)

    def reset_parameters(self, generator: Optional[torch.Generator] = None) -> None:
        with torch.no_grad():
            self.theta.weight.normal_(0.0, self.init_std, generator=generator)

    def embed(self, nodes: Tensor, csr: CSRGraph, fanout: Optional[int] = None,
              generator: Optional[torch.Generator] = None) -> Tensor:
        """h(nodes): (U,) int64 -> (U, d). `fanout=None` averages all neighbours (exact)."""
        if not self.aggregate:
            rows, inv = torch.unique(nodes, return_inverse=True)  # sync point
            return gather_rows(self.theta.weight, rows, sparse_grad=self.sparse)[inv]
        edges, offsets, counts = sample_neighbor_slots(csr, nodes, fanout, generator)  # (M,), (U,), (U,)
        slot_w = bag_weights(csr, edges, offsets, counts)  # 1/count, or w / bag total with edge weights
        return neighbor_mean_rows(self.theta.weight, csr.col.index_select(0, edges), offsets, counts, slot_w,
                                  sparse_grad=self.sparse)

    def loss(self, walks: Tensor, negatives: Tensor, csr: CSRGraph, context_size: int,
             fanout: Optional[int] = None, generator: Optional[torch.Generator] = None,
             amp: bool = False) -> tuple[Tensor, Tensor]:
        """Skip-gram loss of one mini-batch (see `skipgram_loss`).

        Every node in the batch (walk or negative) gets one h(), computed once over one neighbour
        sample: the batch is a sampled subgraph.

        Args:
            walks (Tensor): int64 (W, L) random walks, -1 after a dead end.
            negatives (Tensor): int64 (K * W, L) random nodes (column 0 unused).
            csr (CSRGraph): the training graph.
            context_size (int): c, window length (anchor + c - 1 context nodes).
            amp (bool, optional): score pairs in bfloat16 (θ and the loss stay float32).

        Returns:
            (loss, n_pos): scalar loss and the number of positive pairs (a 0-dim tensor on the
            device; reading it is a sync point, so the trainer accumulates it there).
        """
        w, length = walks.shape
        nodes = torch.cat([walks.reshape(-1), negatives.reshape(-1)])
        # sync point: unique's output size is data-dependent (U distinct nodes)
        uniq, inv = torch.unique(nodes.clamp_min(0), return_inverse=True)  # -1 -> 0, masked below
        h = self.embed(uniq, csr, fanout, generator)  # (U, d)
        # two lookups rather than slices of one: a slice's backward zero-fills the whole tensor.
        # index_select, not F.embedding: its backward is one index_add_ into (U, d), where
        # embedding's dense backward sorts the indices first (~17 vs ~11 ms a lookup at 1e6 nodes)
        h_walk = h.index_select(0, inv[: w * length]).view(w, length, -1)  # (W, L, d)
        h_neg = h.index_select(0, inv[w * length:]).view(-1, w, length, h.shape[1])  # (K, W, L, d)
        if amp:
            h_walk, h_neg = h_walk.to(torch.bfloat16), h_neg.to(torch.bfloat16)
        return skipgram_loss(h_walk, walks >= 0, h_neg, context_size)

    @torch.no_grad()
    def node_embeddings(self, csr: CSRGraph, batch_size: int = 1 << 16) -> Tensor:
        """Exact h() of every node (all neighbours, no sampling): (N, d) float32."""
        if not self.aggregate:
            return self.theta.weight.detach().clone()
        return neighbor_mean(self.theta.weight.detach(), csr, batch_size=batch_size)


class _GatherRows(torch.autograd.Function):
    """`weight[rows]` whose gradient is a sparse COO tensor flagged coalesced (rows sorted, unique)."""

    @staticmethod
    def forward(ctx, weight: Tensor, rows: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(rows)
        ctx.shape = weight.shape
        return weight.index_select(0, rows)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        (rows,) = ctx.saved_tensors
        g = torch.sparse_coo_tensor(rows.unsqueeze(0), grad.contiguous(), ctx.shape, is_coalesced=True,
                                    check_invariants=False)
        return g, None


def gather_rows(weight: Tensor, rows: Tensor, sparse_grad: bool) -> Tensor:
    """Rows of `weight` ((M',) int64, sorted and unique) -> (M', d); sparse or dense gradient."""
    if sparse_grad and torch.is_grad_enabled() and weight.requires_grad:
        return _GatherRows.apply(weight, rows)
    return weight.index_select(0, rows)


class _NeighborMean(torch.autograd.Function):
    r"""h = per-bag weighted mean of θ rows, straight from the (N, d) table; the backward is the
    transposed bag sum, also an `embedding_bag`.

    Forward: ``h[u] = sum(slot_w[s] * θ[nbrs[s]] for s in bag u)`` (one `embedding_bag`, no (M, d)
    temporary; slot weights 1/count for the plain mean). Backward: the slots are sorted by θ row once
    (one sort of M int64), and

    .. math::
        \frac{\partial L}{\partial \theta_r} = \sum_{s:\ \mathrm{nbrs}_s = r} w_s\, g_{\mathrm{bag}(s)}

    is one `embedding_bag(mode="sum", per_sample_weights=w)` over the bag gradients, giving one
    gradient row per distinct θ row, already sorted and unique (a coalesced sparse COO gradient).
    Why not `torch.unique` + gather + `embedding_bag`'s own backward: on a 1e6-node graph that path
    gathered the M' distinct rows once forwards, and the autograd backward of `embedding_bag` sorts
    and scatters (M, d) values: 0.3 s of a 1.25 s CPU step, against ~0.05 s here.
    """

    @staticmethod
    def forward(ctx, weight: Tensor, nbrs: Tensor, offsets: Tensor, counts: Tensor, slot_w: Tensor,
                sparse_grad: bool) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(nbrs, counts, slot_w)
        ctx.shape = weight.shape
        ctx.sparse_grad = sparse_grad
        # an empty bag gives zeros
        return F.embedding_bag(nbrs, weight, offsets, mode="sum", per_sample_weights=slot_w.to(weight.dtype))

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        nbrs, counts, slot_w = ctx.saved_tensors
        n, d = ctx.shape
        grad = grad.contiguous().float()
        if nbrs.numel() == 0:
            rows = nbrs
            vals = grad.new_zeros(0, d)
        else:
            bag = bag_index(counts)  # (M,)
            order = torch.argsort(nbrs)
            rows, per_row = torch.unique_consecutive(nbrs.index_select(0, order), return_counts=True)  # (R,), (R,)
            row_offsets = torch.cumsum(per_row, 0) - per_row
            vals = F.embedding_bag(bag.index_select(0, order), grad, row_offsets, mode="sum",
                                   per_sample_weights=slot_w.index_select(0, order).to(grad.dtype))
        if ctx.sparse_grad:
            g = torch.sparse_coo_tensor(rows.unsqueeze(0), vals, (n, d), is_coalesced=True, check_invariants=False)
        else:
            g = grad.new_zeros(n, d).index_add_(0, rows, vals)
        return g, None, None, None, None, None


def neighbor_mean_rows(weight: Tensor, nbrs: Tensor, offsets: Tensor, counts: Tensor, slot_w: Optional[Tensor] = None,
                       sparse_grad: bool = True) -> Tensor:
    """h() of U bags of θ rows ((M,) ids laid out bag after bag, optional (M,) slot weights that sum
    to 1 per bag; default 1/count) -> (U, d); sparse or dense gradient."""
    if slot_w is None:
        slot_w = (1.0 / counts.clamp_min(1).float()).index_select(0, bag_index(counts))
    if torch.is_grad_enabled() and weight.requires_grad:
        return _NeighborMean.apply(weight, nbrs, offsets, counts, slot_w, sparse_grad)
    return F.embedding_bag(nbrs, weight, offsets, mode="sum", per_sample_weights=slot_w.to(weight.dtype))


def skipgram_loss(h_walk: Tensor, valid: Tensor, h_neg: Tensor, context_size: int) -> tuple[Tensor, Tensor]:
    r"""Node2Vec's skip-gram loss with negative sampling over context windows of walks.

    For a walk :math:`(w_0, ..., w_{L-1})` the windows start at :math:`j = 0..L-c` and pair the
    anchor :math:`w_j` with :math:`w_{j+o}`, :math:`o = 1..c-1` (exactly the pairs of
    `torch_geometric.nn.Node2Vec.pos_sample`). Each anchor also meets K random nodes
    :math:`r^{(k)}_{j+o}` (word2vec-style negatives; PyG pairs two random nodes instead):

    .. math::
        \mathcal{L} = -\operatorname{mean}_{(j,o)} \log\sigma\big(h(w_j)^\top h(w_{j+o})\big)
                      -\operatorname{mean}_{(j,o,k)} \log\sigma\big(-h(w_j)^\top h(r^{(k)}_{j+o})\big)

    Pairs that touch a -1 position (past a dead end) are left out.

    Args:
        h_walk (Tensor): (W, L, d) h() of the walks' nodes.
        valid (Tensor): bool (W, L), False past a dead end.
        h_neg (Tensor): (K, W, L, d) h() of random nodes.
        context_size (int): c.

    Returns:
        (loss, n_pos): scalar float32 loss; number of positive pairs scored (0-dim int64).
    """
    w, length, _ = h_walk.shape
    c = context_size
    n_win = length - c + 1
    if n_win < 1:
        raise ValueError(f"context_size must be <= walk length (got {c} > {length})")
    anchor_ok = valid[:, :n_win]  # (W, Lw)
    # All dot products within a walk in one batched matmul (W, L, L); the pairs (j, j + o),
    # j < Lw, are a band of it, picked with one index_select (flat column j * L + j + o). More
    # products than needed (L x L instead of Lw x (c-1)), but one GEMM without (W, Lw, d)
    # temporaries or slices (whose backward zero-fills a full-size tensor) is several times faster
    # than multiply-and-sum on the CPU; its backward is one index_add and two GEMMs.
    dev = h_walk.device
    j = torch.arange(n_win, device=dev)[:, None]
    o = torch.arange(1, c, device=dev)[None, :]
    band = (j * length + j + o).reshape(-1)  # (Lw * (c-1),)
    s_pos = torch.matmul(h_walk, h_walk.transpose(-1, -2))  # (W, L, L)
    s_pos = s_pos.reshape(w, -1).index_select(1, band).view(w, n_win, c - 1).float()  # (W, Lw, c-1)
    s_neg = torch.matmul(h_walk.unsqueeze(0), h_neg.transpose(-1, -2))  # (K, W, L, L)
    k = h_neg.shape[0]
    s_neg = s_neg.reshape(k, w, -1).index_select(2, band).view(k, w, n_win, c - 1).float()  # (K, W, Lw, c-1)
    ctx_ok = (anchor_ok[:, :, None] & valid[:, (j + o)]).float()  # (W, Lw, c-1)
    n_pos = ctx_ok.sum()
    pos_sum = (F.logsigmoid(s_pos) * ctx_ok).sum()
    neg_sum = (F.logsigmoid(-s_neg) * anchor_ok[None, :, :, None].float()).sum()
    n_anchor = anchor_ok.sum() * (c - 1) * k
    loss = -pos_sum / n_pos.clamp_min(1) - neg_sum / n_anchor.clamp_min(1)
    return loss, n_pos.long()
