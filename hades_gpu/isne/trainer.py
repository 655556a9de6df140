"""Mini-batch ISNE training on sampled subgraphs, with early stopping on held-out edges.

One step (all tensors on the training device, no per-node Python loop):

1. B start nodes (a slice of a per-epoch permutation of the nodes that have neighbours), each
   repeated `walks_per_node` times -> W = B * walks_per_node uniform random walks of
   `walk_length` nodes on the CSR graph (`sampling.random_walks`);
2. K * W rows of `walk_length` uniformly drawn nodes (K = `num_negatives`) as negatives;
3. every distinct node of 1-2 gets one h() from at most `fanout` sampled neighbours (the sampled
   subgraph); skip-gram loss over the walks' context windows (`model.skipgram_loss`);
4. backward (sparse gradients: only θ rows of sampled neighbours), SparseAdam (`RowSparseAdam`)
   or Adam step.

Memory per step is set by B, walk length and fanout, not by N or E, so a graph whose full-batch
form would not fit on the device still trains; only θ (N x d), its optimizer state and the CSR
(N + E int64) live there.

Early stopping: `val_fraction` of the undirected edges are held out (removed from the training
graph; an edge is only held out if both ends keep a neighbour). After each epoch, link AUC =
P(h(u)·h(v) of a held-out edge > that of a uniformly random pair), with exact h() on the training
graph. Training stops after `patience` epochs without an AUC gain > `min_delta` and the best θ is
restored.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor

from hades_gpu.config import IsneConfig, IsneOptimizer
from hades_gpu.gpu.device import select_device
from hades_gpu.isne.model import ISNE
from hades_gpu.isne.sampling import CSRGraph, random_walks

log = logging.getLogger(__name__)


@dataclass
class EdgeSplit:
    """`train` (2, E_train) symmetric edge index; `val_pos`/`val_neg` (2, P) held-out / random pairs."""

    train: Tensor
    val_pos: Tensor
    val_neg: Tensor


@dataclass
class TrainResult:
    model: ISNE  # best θ restored, on the training device
    csr: CSRGraph  # the training graph (held-out edges removed)
    history: list[dict] = field(default_factory=list)  # one dict per epoch
    epochs_run: int = 0
    best_epoch: int = 0
    best_val_auc: Optional[float] = None
    stopped_early: bool = False
    pos_pairs: int = 0
    train_seconds: float = 0.0  # optimisation steps only (validation excluded)
    seconds: float = 0.0  # everything
    num_train_edges: int = 0  # undirected
    num_val_edges: int = 0
    device: str = "cpu"
    peak_device_bytes: Optional[int] = None

    @property
    def pairs_per_s(self) -> float:
        return self.pos_pairs / self.train_seconds if self.train_seconds > 0 else 0.0


class RowSparseAdam(torch.optim.Optimizer):
    r"""`torch.optim.SparseAdam`'s update (lazy Adam: rows without a gradient keep their parameters
    and moments), done with row gathers and scatters.

    The gradient must be a sparse COO tensor whose indices are rows (as `ISNE.embed` produces:
    sorted, unique, flagged coalesced). Per row r with gradient g (t = step count):

    .. math::
        m_r \leftarrow eta_1 m_r + (1-eta_1) g, \quad v_r \leftarrow eta_2 v_r + (1-eta_2) g^2,
        \quad 	heta_r \leftarrow 	heta_r - \eta rac{\sqrt{1-eta_2^t}}{1-eta_1^t}
              rac{m_r}{\sqrt{v_r} + \epsilon}

    exactly as SparseAdam. Why not SparseAdam itself: on a 1e6-node graph its sparse_mask / sparse
    add_ / coalesce path took 2.2 s of a 3.9 s CPU step; this takes a fraction of that.
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
        if not 0.0 < lr:
            raise ValueError(f"lr must be > 0 (got {lr})")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps))

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        for group in self.param_groups:
            lr, (b1, b2), eps = group["lr"], group["betas"], group["eps"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if not g.is_sparse:
                    raise ValueError("RowSparseAdam needs sparse gradients (got a dense one); use optimizer=adam")
                if not g.is_coalesced():
                    g = g.coalesce()
                rows, vals = g._indices()[0], g._values()  # (R,), (R, d)
                if rows.numel() == 0:
                    continue
                st = self.state[p]
                if not st:
                    st["step"] = 0
                    st["exp_avg"] = torch.zeros_like(p)
                    st["exp_avg_sq"] = torch.zeros_like(p)
                st["step"] += 1
                t = st["step"]
                m = st["exp_avg"].index_select(0, rows).mul_(b1).add_(vals, alpha=1 - b1)  # (R, d)
                v = st["exp_avg_sq"].index_select(0, rows).mul_(b2).addcmul_(vals, vals, value=1 - b2)
                st["exp_avg"].index_copy_(0, rows, m)
                st["exp_avg_sq"].index_copy_(0, rows, v)
                step_size = lr * math.sqrt(1 - b2 ** t) / (1 - b1 ** t)
                p.index_add_(0, rows, m.div_(v.sqrt_().add_(eps)), alpha=-step_size)
        return None


def undirected_pairs(edge_index: Tensor, num_nodes: int) -> Tensor:
    """Unique (u < v) pairs of an edge index, self loops dropped: (2, E_u)."""
    u = torch.minimum(edge_index[0], edge_index[1])
    v = torch.maximum(edge_index[0], edge_index[1])
    keep = u != v
    key = torch.unique(u[keep] * num_nodes + v[keep])
    return torch.stack([key // num_nodes, key % num_nodes])


def split_edges(edge_index: Tensor, num_nodes: int, val_fraction: float, seed: int = 0) -> EdgeSplit:
    """Hold out `val_fraction` of the undirected edges, never isolating a node; random negatives."""
    pairs = undirected_pairs(edge_index.cpu(), num_nodes)  # (2, E_u)
    g = torch.Generator().manual_seed(seed)
    n_und = pairs.shape[1]
    n_val = int(round(val_fraction * n_und))
    empty = torch.zeros(2, 0, dtype=torch.long)
    if n_val == 0:
        return EdgeSplit(torch.cat([pairs, pairs.flip(0)], 1), empty, empty)
    deg = torch.bincount(pairs.reshape(-1), minlength=num_nodes)
    eligible = ((deg[pairs[0]] >= 2) & (deg[pairs[1]] >= 2)).nonzero().squeeze(1)
    chosen = eligible[torch.randperm(eligible.numel(), generator=g)[:n_val]]
    is_val = torch.zeros(n_und, dtype=torch.bool)
    is_val[chosen] = True
    # an endpoint left without any training edge gets its held-out edges back (degrees only grow)
    train_deg = torch.bincount(pairs[:, ~is_val].reshape(-1), minlength=num_nodes)
    orphan = train_deg == 0
    is_val &= ~(orphan[pairs[0]] | orphan[pairs[1]])
    val = pairs[:, is_val]
    train = pairs[:, ~is_val]
    nodes = torch.unique(train.reshape(-1))
    neg = nodes[torch.randint(nodes.numel(), (2, val.shape[1]), generator=g)]
    neg = neg[:, neg[0] != neg[1]]
    return EdgeSplit(torch.cat([train, train.flip(0)], 1), val, neg)


def link_auc(pos: Tensor, neg: Tensor) -> float:
    """Mann–Whitney AUC: P(score of a positive > score of a negative), ties counted half."""
    pos, neg = pos.double().cpu(), neg.double().cpu()
    if pos.numel() == 0 or neg.numel() == 0:
        return float("nan")
    scores = torch.cat([pos, neg])
    order = torch.argsort(scores)
    ranks = torch.empty_like(scores)
    ranks[order] = torch.arange(1, scores.numel() + 1, dtype=torch.float64)
    # average ranks of ties
    uniq, inv, counts = torch.unique(scores, return_inverse=True, return_counts=True)
    if uniq.numel() < scores.numel():
        sums = torch.zeros(uniq.numel(), dtype=torch.float64).index_add_(0, inv, ranks)
        ranks = (sums / counts)[inv]
    n_p, n_n = pos.numel(), neg.numel()
    return float((ranks[:n_p].sum() - n_p * (n_p + 1) / 2) / (n_p * n_n))


@torch.no_grad()
def validation_auc(model: ISNE, csr: CSRGraph, split: EdgeSplit) -> float:
    dev = csr.device
    pos, neg = split.val_pos.to(dev), split.val_neg.to(dev)
    nodes, inv = torch.unique(torch.cat([pos.reshape(-1), neg.reshape(-1)]), return_inverse=True)
    h = model.embed(nodes, csr, fanout=None).float()  # exact h() on the training graph
    hp = h[inv[: pos.numel()]].view(2, -1, h.shape[1])
    hn = h[inv[pos.numel():]].view(2, -1, h.shape[1])
    return link_auc((hp[0] * hp[1]).sum(-1), (hn[0] * hn[1]).sum(-1))


def train_isne(
    edge_index: Tensor,
    num_nodes: int,
    cfg: Optional[IsneConfig] = None,
    *,
    aggregate: bool = True,
    epochs: Optional[int] = None,
    batch_size: Optional[int] = None,
    device: Optional[torch.device | str] = None,
    max_batches_per_epoch: Optional[int] = None,
    split: Optional[EdgeSplit] = None,
) -> TrainResult:
    """Train ISNE (or, with ``aggregate=False``, lookup-table Node2Vec) on an undirected graph.

    Args:
        edge_index (Tensor): int64 (2, E), symmetric (both directions of each edge).
        num_nodes (int): N.
        cfg (IsneConfig, optional): hyper-parameters (default: `IsneConfig()`).
        aggregate (bool, optional): ISNE's neighbour mean; False = Node2Vec baseline. (default: True)
        epochs, batch_size (int, optional): override `cfg.epochs` / `cfg.batch_size`.
        device (optional): default `cfg.device` resolved (auto = CUDA when present).
        max_batches_per_epoch (int, optional): cut epochs short (benchmarks).
        split (EdgeSplit, optional): a ready train/validation split (default: `split_edges`).

    Returns:
        TrainResult: the model with the best θ, the training CSR and per-epoch history.
    """
    cfg = cfg or IsneConfig()
    t_all = time.perf_counter()
    epochs = cfg.epochs if epochs is None else epochs
    batch_size = cfg.batch_size if batch_size is None else batch_size
    dev = select_device(cfg.device) if device is None else torch.device(device)
    amp = bool(cfg.amp and dev.type == "cuda")
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)

    split = split or split_edges(edge_index, num_nodes, cfg.val_fraction, cfg.seed)
    csr = CSRGraph.from_edge_index(split.train, num_nodes, device=dev)
    has_val = split.val_pos.shape[1] > 0

    model = ISNE(num_nodes, cfg.dim, aggregate=aggregate, sparse=cfg.optimizer == IsneOptimizer.SPARSE_ADAM)
    model.reset_parameters(torch.Generator().manual_seed(cfg.seed))  # on the CPU: CPU and CUDA start alike
    model.to(dev)
    params = list(model.parameters())
    opt = RowSparseAdam(params, lr=cfg.lr) if model.sparse else torch.optim.Adam(params, lr=cfg.lr)

    gen = torch.Generator(device=dev)
    gen.manual_seed(cfg.seed)
    starts = (csr.degree() > 0).nonzero().squeeze(1)  # (S,) nodes with neighbours
    result = TrainResult(model=model, csr=csr, num_train_edges=split.train.shape[1] // 2,
                         num_val_edges=split.val_pos.shape[1], device=str(dev))
    if starts.numel() == 0 or epochs <= 0:
        result.seconds = time.perf_counter() - t_all
        return result

    best_auc, best_theta, bad = -math.inf, None, 0
    n_batches = math.ceil(starts.numel() / batch_size)
    if max_batches_per_epoch is not None:
        n_batches = min(n_batches, max_batches_per_epoch)
    length, k = cfg.walk_length, cfg.num_negatives
    for epoch in range(1, epochs + 1):
        model.train()
        t0 = time.perf_counter()
        loss_sum = torch.zeros((), device=dev)  # accumulated on the device: no per-step sync
        pairs = torch.zeros((), dtype=torch.long, device=dev)
        perm = starts[torch.randperm(starts.numel(), generator=gen, device=dev)]
        for b in range(n_batches):
            batch = perm[b * batch_size:(b + 1) * batch_size]  # (B,)
            walks = random_walks(csr, batch.repeat(cfg.walks_per_node), length, gen)  # (W, L)
            neg = starts[torch.randint(starts.numel(), (k * walks.shape[0], length), generator=gen, device=dev)]
            loss, n_pos = model.loss(walks, neg, csr, cfg.context_size, cfg.fanout, gen, amp)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()  # queued asynchronously on CUDA: the CPU goes on to sample the next batch
            loss_sum += loss.detach()
            pairs += n_pos
        # sync point: the CPU waits here for the epoch's last step
        epoch_loss = float(loss_sum.item()) / n_batches
        epoch_pairs = int(pairs.item())
        dt = time.perf_counter() - t0
        result.train_seconds += dt
        result.pos_pairs += epoch_pairs
        rec = {"epoch": epoch, "loss": epoch_loss, "seconds": dt, "pos_pairs": epoch_pairs,
               "pairs_per_s": epoch_pairs / dt if dt > 0 else 0.0}
        result.epochs_run = epoch
        if has_val:
            model.eval()
            auc = validation_auc(model, csr, split)
            rec["val_auc"] = auc
            if auc > best_auc + cfg.min_delta:
                best_auc, bad, result.best_epoch = auc, 0, epoch
                best_theta = model.theta.weight.detach().clone()
            else:
                bad += 1
        else:
            result.best_epoch = epoch
        result.history.append(rec)
        log.info("isne epoch %d: loss %.4f%s, %.0f pairs/s, %.2f s", epoch, epoch_loss,
                 f", val auc {rec['val_auc']:.4f}" if has_val else "", rec["pairs_per_s"], dt)
        if has_val and bad >= cfg.patience:
            result.stopped_early = epoch < epochs
            break

    if best_theta is not None:
        with torch.no_grad():
            model.theta.weight.copy_(best_theta)
        result.best_val_auc = best_auc
    model.eval()
    if dev.type == "cuda":
        result.peak_device_bytes = int(torch.cuda.max_memory_allocated(dev))
    result.seconds = time.perf_counter() - t_all
    return result
