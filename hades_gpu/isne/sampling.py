"""CSR graphs, uniform random walks and neighbour sampling in plain, vectorised torch.

torch-cluster and pyg-lib have no wheels for this torch (../shared/FACTS.md), so walks and
neighbour samples are written here. Each routine loops over *steps* (walk length, fanout), never over
nodes: one step is a handful of gathers over all walks / nodes at once, on whatever device the CSR
lives on (CPU or CUDA).

Sync points (the CPU waits for the device): `sample_neighbors` (the rows above `fanout` and, with
`fanout=None`, the number of neighbours have data-dependent sizes). `random_walks` has none.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor


@dataclass
class CSRGraph:
    """A graph in compressed sparse row form: the neighbours of node v are
    ``col[rowptr[v]:rowptr[v + 1]]``.

    Attributes:
        rowptr (Tensor): int64 (N + 1,).
        col (Tensor): int64 (E,), sorted by source node.
        weight (Tensor, optional): float32 (E,) positive edge weights aligned with `col`; None =
            every edge weighs 1 (uniform walks, plain neighbour means).
    """

    rowptr: Tensor
    col: Tensor
    weight: Optional[Tensor] = None
    _cum_weight: Optional[Tensor] = field(default=None, repr=False, compare=False)

    @property
    def num_nodes(self) -> int:
        return int(self.rowptr.numel() - 1)

    @property
    def num_edges(self) -> int:
        return int(self.col.numel())

    @property
    def device(self) -> torch.device:
        return self.col.device

    def degree(self) -> Tensor:
        """int64 (N,)."""
        return self.rowptr[1:] - self.rowptr[:-1]

    def to(self, device: torch.device | str) -> "CSRGraph":
        return CSRGraph(self.rowptr.to(device), self.col.to(device),
                        None if self.weight is None else self.weight.to(device))

    def cum_weight(self) -> Tensor:
        """float64 (E,) running sum of `weight` over all edges (row after row), for weighted walks."""
        if self._cum_weight is None:
            self._cum_weight = torch.cumsum(self.weight.double(), 0)
        return self._cum_weight

    @classmethod
    def from_edge_index(cls, edge_index: Tensor, num_nodes: int, device: Optional[torch.device | str] = None,
                        edge_weight: Optional[Tensor] = None) -> "CSRGraph":
        """From a (2, E) edge index (taken as given: pass a symmetrised one for an undirected graph)
        and optional (E,) positive weights."""
        if edge_index.dim() != 2 or edge_index.shape[0] != 2:
            raise ValueError(f"edge_index must have shape (2, E) (got {tuple(edge_index.shape)})")
        ei = edge_index.to(device) if device is not None else edge_index
        src, dst = ei[0].long(), ei[1].long()
        if src.numel() and (int(src.max()) >= num_nodes or int(dst.max()) >= num_nodes or int(src.min()) < 0):
            raise ValueError(f"edge_index holds node ids outside [0, {num_nodes})")
        order = torch.argsort(src * max(num_nodes, 1) + dst)
        col = dst[order].contiguous()
        weight = None
        if edge_weight is not None:
            w = edge_weight.to(src.device).float()
            if w.shape != src.shape:
                raise ValueError(f"edge_weight must have one value per edge ({src.numel()}), got {tuple(w.shape)}")
            if w.numel() and not bool((w > 0).all()):
                raise ValueError("edge weights must be > 0 (drop an edge instead of weighting it 0)")
            weight = w[order].contiguous()
        counts = torch.bincount(src, minlength=num_nodes)
        rowptr = torch.zeros(num_nodes + 1, dtype=torch.long, device=src.device)
        rowptr[1:] = torch.cumsum(counts, 0)
        return cls(rowptr, col, weight)


def random_walks(csr: CSRGraph, start: Tensor, walk_length: int, generator: Optional[torch.Generator] = None) -> Tensor:
    r"""Random walks: node :math:`w_{t+1}` is drawn from :math:`N(w_t)`, uniformly, or with
    probability proportional to the edge's weight when the CSR has weights.

    A walk that reaches a node without neighbours stops there; its remaining positions are -1.
    (In an undirected graph that only happens to walks *starting* at an isolated node.)

    Args:
        csr (CSRGraph): the graph.
        start (Tensor): int64 (B,) start nodes, on the CSR's device.
        walk_length (int): nodes per walk, the start included (B, walk_length).
        generator (torch.Generator, optional): on the CSR's device, for reproducible walks.

    Returns:
        int64 (B, walk_length): ``walks[:, 0] == start``.
    """
    b = start.numel()
    walks = torch.full((b, walk_length), -1, dtype=torch.long, device=start.device)
    walks[:, 0] = start
    if csr.num_edges == 0 or walk_length < 2:
        return walks
    cur = start.clone()
    alive = torch.ones(b, dtype=torch.bool, device=start.device)
    last_edge = csr.num_edges - 1
    for t in range(1, walk_length):  # a loop over steps; every walk advances at once
        node = cur.clamp_min(0)
        lo = csr.rowptr.index_select(0, node)
        deg = csr.rowptr.index_select(0, node + 1) - lo  # (B,)
        alive = alive & (deg > 0)
        u = torch.rand(b, device=start.device, dtype=torch.float64, generator=generator)
        if csr.weight is None:
            slot = lo + (u * deg).long()  # uniform in [lo, lo + deg)
        else:  # P(slot) = weight / row total: invert the running sum of the weights inside the row
            cw = csr.cum_weight()
            hi = (lo + deg - 1).clamp(0, last_edge)
            before = torch.where(lo > 0, cw.index_select(0, (lo - 1).clamp_min(0)), torch.zeros_like(u))
            target = before + u * (cw.index_select(0, hi) - before)
            slot = torch.searchsorted(cw, target, right=True).clamp(lo, hi)
        nxt = csr.col.index_select(0, slot.clamp_max(last_edge))
        cur = torch.where(alive, nxt, torch.full_like(nxt, -1))
        walks[:, t] = cur
    return walks


def sample_neighbor_slots(csr: CSRGraph, nodes: Tensor, fanout: Optional[int] = None,
                          generator: Optional[torch.Generator] = None) -> tuple[Tensor, Tensor, Tensor]:
    r"""Up to `fanout` neighbours of each node, sampled uniformly *without* replacement.

    A node with degree <= `fanout` (or `fanout=None`) keeps all its neighbours, so the mean over the
    sample is then exact. Above `fanout`, a uniform `fanout`-subset of the neighbour slots is drawn
    with Robert Floyd's algorithm, vectorised over nodes: `fanout` steps, each a comparison against
    the slots chosen so far (O(U * fanout^2) work, no per-node loop, no (U, max degree) matrix).

    Args:
        csr (CSRGraph): the graph.
        nodes (Tensor): int64 (U,) nodes (any order, repeats allowed).
        fanout (int, optional): at most this many neighbours per node; None = all.
        generator (torch.Generator, optional): on the CSR's device.

    Returns:
        (slots, offsets, counts): int64 (M,) edge positions (indices into `csr.col` and
        `csr.weight`) laid out node after node, int64 (U,) start of each node's run (the `offsets`
        of `torch.nn.functional.embedding_bag`), int64 (U,) run lengths (0 for a node without
        neighbours). M = sum(counts).
    """
    lo = csr.rowptr.index_select(0, nodes)
    deg = csr.rowptr.index_select(0, nodes + 1) - lo  # (U,)
    if fanout is None:
        counts = deg
        offsets = torch.cumsum(counts, 0) - counts
        # slot index of every neighbour: lo[row] + (position within the row)
        row = torch.repeat_interleave(torch.arange(nodes.numel(), device=nodes.device), counts)  # sync point
        pos = torch.arange(row.numel(), device=nodes.device) - offsets[row]
        return lo[row] + pos, offsets, counts
    counts = deg.clamp_max(fanout)
    slots = torch.arange(fanout, device=nodes.device).expand(nodes.numel(), fanout).clone()  # (U, F)
    big = (deg > fanout).nonzero().squeeze(1)  # sync point: data-dependent size (H,)
    if big.numel():
        d = deg[big]  # (H,)
        chosen = torch.empty(big.numel(), fanout, dtype=torch.long, device=nodes.device)  # (H, F)
        for s in range(fanout):  # Floyd: j = d - F + s; t ~ U[0, j]; take t unless taken, else j
            j = d - fanout + s
            u = torch.rand(big.numel(), device=nodes.device, dtype=torch.float64, generator=generator)
            t = torch.minimum((u * (j + 1)).long(), j)
            taken = (chosen[:, :s] == t[:, None]).any(dim=1) if s else torch.zeros_like(t, dtype=torch.bool)
            chosen[:, s] = torch.where(taken, j, t)
        slots[big] = chosen
    mask = torch.arange(fanout, device=nodes.device)[None, :] < counts[:, None]  # (U, F): first `counts` used
    edges = (lo[:, None] + slots)[mask] if csr.num_edges else torch.zeros(0, dtype=torch.long, device=nodes.device)
    offsets = torch.cumsum(counts, 0) - counts
    return edges, offsets, counts


def sample_neighbors(csr: CSRGraph, nodes: Tensor, fanout: Optional[int] = None,
                     generator: Optional[torch.Generator] = None) -> tuple[Tensor, Tensor, Tensor]:
    """`sample_neighbor_slots` with neighbour ids instead of edge positions: (neighbors (M,),
    offsets (U,), counts (U,))."""
    edges, offsets, counts = sample_neighbor_slots(csr, nodes, fanout, generator)
    return csr.col.index_select(0, edges), offsets, counts


def bag_index(counts: Tensor) -> Tensor:
    """The bag (node) of each slot of runs laid out bag after bag: int64 (sum(counts),)."""
    return torch.repeat_interleave(torch.arange(counts.numel(), device=counts.device), counts)


def bag_weights(csr: CSRGraph, edges: Tensor, offsets: Tensor, counts: Tensor) -> Tensor:
    r"""Per-slot weights of the neighbour mean: :math:`w_e / \sum_{e' \in \mathrm{bag}} w_{e'}`
    (float32 (M,)); 1 / count without edge weights. With them, h() is the weighted mean
    :math:`\sum_n w_{vn} \theta_n / \sum_n w_{vn}` over the (sampled) neighbours."""
    bag = bag_index(counts)  # (M,)
    if csr.weight is None:
        return (1.0 / counts.clamp_min(1).float()).index_select(0, bag)
    w = csr.weight.index_select(0, edges)
    total = torch.zeros(counts.numel(), dtype=w.dtype, device=w.device).index_add_(0, bag, w)
    return w / total.index_select(0, bag)
