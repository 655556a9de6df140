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
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import Tensor

from hades_gpu import exit_guard
from hades_gpu.config import EarlyStopMetric, IsneConfig, IsneOptimizer
from hades_gpu.gpu.device import select_device
from hades_gpu.isne.host_heap import keep_freed_memory
from hades_gpu.isne.model import ISNE
from hades_gpu.isne.optim import RowSparseAdam, RowwiseAdagrad, rows_strictly_increasing  # noqa: F401 (re-exported)
from hades_gpu.isne.resume import TrainingState, load_training_state, save_training_state, training_key
from hades_gpu.isne.sampling import CSRGraph, random_walks
from hades_gpu.isne.validation import (EarlyStopper, fixed_validation_walks, link_auc,  # noqa: F401 (re-exported)
                                       validation_auc, validation_walk_loss)

log = logging.getLogger(__name__)


@dataclass
class EdgeSplit:
    """`train` (2, E_train) symmetric edge index (and its (E_train,) weights when the graph has
    them); `val_pos`/`val_neg` (2, P) held-out / random pairs."""

    train: Tensor
    val_pos: Tensor
    val_neg: Tensor
    train_weight: Optional[Tensor] = None


@dataclass
class TrainResult:
    model: ISNE  # best θ restored, on the training device
    csr: CSRGraph  # the training graph (held-out edges removed)
    history: list[dict] = field(default_factory=list)  # one dict per epoch
    epochs_run: int = 0
    best_epoch: int = 0
    best_val_auc: Optional[float] = None
    stopped_early: bool = False
    stopped_by_budget: bool = False
    pos_pairs: int = 0
    train_seconds: float = 0.0  # optimisation steps only (validation excluded)
    seconds: float = 0.0  # everything
    num_train_edges: int = 0  # undirected
    num_val_edges: int = 0
    device: str = "cpu"
    peak_device_bytes: Optional[int] = None
    resumed_from_epoch: int = 0  # epochs a saved training state had completed (0: trained from the start)
    last_epoch_partial: bool = False  # the time budget ended the last epoch before its last batch

    @property
    def pairs_per_s(self) -> float:
        return self.pos_pairs / self.train_seconds if self.train_seconds > 0 else 0.0


def _si(x: float) -> str:
    """1234567 -> '1.23 M' (log lines)."""
    for div, unit in ((1e9, " G"), (1e6, " M"), (1e3, " k")):
        if abs(x) >= div:
            return f"{x / div:.2f}{unit}"
    return f"{x:.0f}"


def _duration(seconds: float) -> str:
    """125 -> '2m05s'."""
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


# `isne.lr: null` picks these: PyTorch-BigGraph's row-wise Adagrad default, and the Adam rate the
# planted-partition evaluation was tuned with (scripts/eval_isne.py).
DEFAULT_LR: dict[str, float] = {"rowwise_adagrad": 0.1, "sparse_adam": 0.01, "adam": 0.01}


def _warn_budget(where: str, budget_s: Optional[float]) -> None:
    """A warning: a caller who asked for `epochs` gets fewer (the default budget is the ingest's time)."""
    log.warning("isne: stopped %s: the time budget of %.3g s is reached (isne.time_budget_s, else "
                "isne.time_budget_vs_embedding x the ingest's seconds; no budget: time_budget_s=null and "
                "time_budget_vs_embedding=0)", where, budget_s)


def make_optimizer(params: list[Tensor], cfg: IsneConfig) -> torch.optim.Optimizer:
    """`isne.optimizer` over θ: row-wise Adagrad, lazy (row-sparse) Adam, or dense Adam. The model's
    gradients have sorted, unique rows and are cleared every step, so the row optimizers trust them."""
    lr = cfg.lr if cfg.lr is not None else DEFAULT_LR[str(cfg.optimizer)]
    if cfg.optimizer == IsneOptimizer.ROWWISE_ADAGRAD:
        return RowwiseAdagrad(params, lr=lr, rows_unique=True)
    if cfg.optimizer == IsneOptimizer.SPARSE_ADAM:
        return RowSparseAdam(params, lr=lr, rows_unique=True)
    return torch.optim.Adam(params, lr=lr)


def draw_negatives(candidates: Tensor, shape: tuple[int, int], pool: int,
                   generator: Optional[torch.Generator] = None) -> Tensor:
    """Negatives for one step: each uniform over `candidates`, drawn from a per-step pool.

    With ``pool > 0``, `pool` nodes are drawn uniformly (with replacement) for the step and every
    negative is a uniform pick among them, so each negative is still marginally uniform over the
    candidates (the loss's expectation is unchanged) while the step computes h() for at most `pool`
    negative nodes instead of one per negative slot. Why: independent negatives made half the
    distinct nodes of a step on a large graph (82k of 160k at 1e6 nodes), each bringing `fanout`
    θ rows with no reuse; shared per-batch negatives are what PyTorch-BigGraph and GraphVite do for
    the same reason. ``pool=0`` draws every negative independently.
    """
    dev = candidates.device
    source = candidates
    if 0 < pool < shape[0] * shape[1]:
        source = candidates.index_select(0, torch.randint(candidates.numel(), (pool,), generator=generator, device=dev))
    picks = torch.randint(source.numel(), shape, generator=generator, device=dev)
    return source.index_select(0, picks.view(-1)).view(shape)


def undirected_pairs(edge_index: Tensor, num_nodes: int, edge_weight: Optional[Tensor] = None):
    """Unique (u < v) pairs of an edge index, self loops dropped: (2, E_u); with `edge_weight`, also
    each pair's weight (the largest over its copies: a symmetrised graph has the same in both)."""
    u = torch.minimum(edge_index[0], edge_index[1])
    v = torch.maximum(edge_index[0], edge_index[1])
    keep = u != v
    key, inv = torch.unique(u[keep] * num_nodes + v[keep], return_inverse=True)
    pairs = torch.stack([key // num_nodes, key % num_nodes])
    if edge_weight is None:
        return pairs
    w = torch.zeros(key.numel(), dtype=torch.float32).scatter_reduce_(
        0, inv, edge_weight[keep].float(), reduce="amax", include_self=False)
    return pairs, w


def split_edges(edge_index: Tensor, num_nodes: int, val_fraction: float, seed: int = 0,
                edge_weight: Optional[Tensor] = None) -> EdgeSplit:
    """Hold out `val_fraction` of the undirected edges, never isolating a node; random negatives.
    With `edge_weight` ((E,), aligned with `edge_index`) the training edges keep their weights."""
    if edge_weight is None:
        pairs, w = undirected_pairs(edge_index.cpu(), num_nodes), None
    else:
        pairs, w = undirected_pairs(edge_index.cpu(), num_nodes, edge_weight.cpu())
    g = torch.Generator().manual_seed(seed)
    n_und = pairs.shape[1]
    n_val = int(round(val_fraction * n_und))
    empty = torch.zeros(2, 0, dtype=torch.long)

    def both_ways(mask: Optional[Tensor]) -> tuple[Tensor, Optional[Tensor]]:
        p = pairs if mask is None else pairs[:, mask]
        pw = None if w is None else (w if mask is None else w[mask])
        return torch.cat([p, p.flip(0)], 1), None if pw is None else torch.cat([pw, pw])

    if n_val == 0:
        train, train_w = both_ways(None)
        return EdgeSplit(train, empty, empty, train_w)
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
    train, train_w = both_ways(~is_val)
    nodes = torch.unique(train.reshape(-1))
    neg = nodes[torch.randint(nodes.numel(), (2, val.shape[1]), generator=g)]
    neg = neg[:, neg[0] != neg[1]]
    return EdgeSplit(train, val, neg, train_w)


class _StateSaver:
    """Saves the training state at epoch ends, at most every `cfg.checkpoint_interval_s` (none when no
    path is given or the interval is None) (`isne.resume`)."""

    def __init__(self, path: Optional[str | Path], cfg: IsneConfig, key: str) -> None:
        self.path = Path(path) if path is not None else None
        self.interval = cfg.checkpoint_interval_s
        self.key = key
        self.last = time.perf_counter()

    def load(self) -> Optional[TrainingState]:
        return load_training_state(self.path, self.key) if self.path is not None else None

    def maybe_save(self, epoch: int, model: ISNE, opt: torch.optim.Optimizer, gen: torch.Generator,
                   stopper: EarlyStopper, result: TrainResult, best_theta: Optional[Tensor]) -> None:
        if self.path is None or self.interval is None or time.perf_counter() - self.last < self.interval:
            return
        t = time.perf_counter()
        try:
            save_training_state(self.path, TrainingState(
                key=self.key, epoch=epoch, theta=model.theta.weight.detach().cpu(), optimizer=opt.state_dict(),
                generator=gen.get_state(), train_seconds=result.train_seconds, pos_pairs=result.pos_pairs,
                best_epoch=result.best_epoch, stopper={"best": stopper.best, "bad": stopper.bad},
                best_theta=best_theta.cpu() if best_theta is not None else None, history=result.history))
        except OSError as err:  # only a checkpoint: a full disk here must not end the training itself
            self.last = time.perf_counter()
            log.warning("isne: could not save the training state after epoch %d (%s); training goes on, and a stop "
                        "now resumes from the previous saved state, if any", epoch, err)
            return
        self.last = time.perf_counter()
        log.info("isne: training state saved after epoch %d (%.1f s): %s", epoch, self.last - t, self.path)


def _restore(state: TrainingState, model: ISNE, opt: torch.optim.Optimizer, gen: torch.Generator,
             stopper: EarlyStopper, result: TrainResult) -> Optional[Tensor]:
    """Put a saved state back into the run's objects; returns early stopping's best θ (or None)."""
    with torch.no_grad():
        model.theta.weight.copy_(state.theta)
    opt.load_state_dict(state.optimizer)
    gen.set_state(state.generator)
    stopper.best, stopper.bad = state.stopper["best"], int(state.stopper["bad"])
    result.epochs_run, result.best_epoch = state.epoch, state.best_epoch
    result.train_seconds, result.pos_pairs = float(state.train_seconds), int(state.pos_pairs)
    result.history = list(state.history)
    device = model.theta.weight.device
    return state.best_theta.to(device) if state.best_theta is not None else None


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
    time_budget_s: Optional[float] = None,
    edge_weight: Optional[Tensor] = None,
    state_path: Optional[str | Path] = None,
    on_batch: Optional[Callable[[int, int, int, int], None]] = None,
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
        edge_weight (Tensor, optional): (E,) positive weights aligned with `edge_index`; used
            (weighted walks and neighbour means) when `cfg.edge_weights`.
        time_budget_s (float, optional): stop at the first batch boundary after this many seconds
            of training (default: `cfg.time_budget_s`; the stage resolves `time_budget_vs_embedding`).
        state_path (path, optional): where the training state is saved at epoch ends (at most every
            `cfg.checkpoint_interval_s`) and, with `cfg.resume`, resumed from when it matches this
            graph and these settings (`isne.resume`). Default: no state (a stopped run starts over).
        on_batch (callable, optional): ``on_batch(epoch, batches done in it, batches per epoch,
            epochs)`` after each batch (a progress bar; no device value is read, so no sync).

    Returns:
        TrainResult: the model with the best θ, the training CSR and per-epoch history.
    """
    cfg = cfg or IsneConfig()
    dev = select_device(cfg.device) if device is None else torch.device(device)
    # CPU: a step's ~100 MB buffers stay in the heap instead of an mmap + page faults per step (host_heap)
    with keep_freed_memory(cfg.keep_freed_memory and dev.type == "cpu"):
        return _train_isne(edge_index, num_nodes, cfg, dev, aggregate=aggregate, epochs=epochs, batch_size=batch_size,
                           max_batches_per_epoch=max_batches_per_epoch, split=split, time_budget_s=time_budget_s,
                           edge_weight=edge_weight, state_path=state_path, on_batch=on_batch)


def _train_isne(edge_index: Tensor, num_nodes: int, cfg: IsneConfig, dev: torch.device, *, aggregate: bool,
                epochs: Optional[int], batch_size: Optional[int], max_batches_per_epoch: Optional[int],
                split: Optional[EdgeSplit], time_budget_s: Optional[float], edge_weight: Optional[Tensor],
                state_path: Optional[str | Path] = None,
                on_batch: Optional[Callable[[int, int, int, int], None]] = None) -> TrainResult:
    """`train_isne` on a resolved device."""
    t_all = time.perf_counter()
    time_budget_s = cfg.time_budget_s if time_budget_s is None else time_budget_s
    epochs = cfg.epochs if epochs is None else epochs
    batch_size = cfg.batch_size if batch_size is None else batch_size
    amp = bool(cfg.amp and dev.type == "cuda")
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)

    weights = edge_weight if cfg.edge_weights else None
    split = split or split_edges(edge_index, num_nodes, cfg.val_fraction, cfg.seed, weights)
    csr = CSRGraph.from_edge_index(split.train, num_nodes, device=dev, edge_weight=split.train_weight)
    has_val = split.val_pos.shape[1] > 0

    # θ drawn once, on the CPU from the seed: CPU and CUDA start alike
    model = ISNE(num_nodes, cfg.dim, aggregate=aggregate, sparse=cfg.optimizer != IsneOptimizer.ADAM,
                 init_std=cfg.init_std, generator=torch.Generator().manual_seed(cfg.seed))
    model.to(dev)
    params = list(model.parameters())
    opt = make_optimizer(params, cfg)

    gen = torch.Generator(device=dev)
    gen.manual_seed(cfg.seed)
    starts = (csr.degree() > 0).nonzero().squeeze(1)  # (S,) nodes with neighbours
    result = TrainResult(model=model, csr=csr, num_train_edges=split.train.shape[1] // 2,
                         num_val_edges=split.val_pos.shape[1], device=str(dev))
    if starts.numel() == 0 or epochs <= 0:
        result.seconds = time.perf_counter() - t_all
        return result

    stopper = EarlyStopper(cfg, has_val)
    best_theta: Optional[Tensor] = None
    val_walks = fixed_validation_walks(csr, starts, cfg)  # reported every epoch, whatever stops training
    n_batches = math.ceil(starts.numel() / batch_size)
    if max_batches_per_epoch is not None:
        n_batches = min(n_batches, max_batches_per_epoch)
    length, k = cfg.walk_length, cfg.num_negatives
    saver = _StateSaver(state_path, cfg, training_key(edge_index, num_nodes, weights, cfg, aggregate=aggregate,
                                                      device_type=dev.type, batch_size=batch_size,
                                                      max_batches_per_epoch=max_batches_per_epoch)
                        if state_path is not None else "")
    first_epoch = 1
    resumed = saver.load() if cfg.resume else None
    if resumed is not None and resumed.epoch > epochs:
        # a state from a longer training (120 epochs asked, stopped at 47) answered `epochs=5` with
        # the 47-epoch model, silently: fewer epochs than it holds start from the beginning (as many
        # as it holds finish from it: the model an uninterrupted run of `epochs` ends with)
        log.warning("isne: the saved training state %s is after epoch %d, more than the %d asked for: training "
                    "from the start", state_path, resumed.epoch, epochs)
        resumed = None
    if resumed is not None:
        best_theta = _restore(resumed, model, opt, gen, stopper, result)
        first_epoch = resumed.epoch + 1
        result.resumed_from_epoch = resumed.epoch
        log.info("isne: resuming from the training state %s after epoch %d (%.1f s trained)", state_path,
                 resumed.epoch, resumed.train_seconds)
    t_train = time.perf_counter() - result.train_seconds  # a resumed run's seconds count against the budget
    for epoch in range(first_epoch, epochs + 1):
        model.train()
        t0 = time.perf_counter()
        loss_sum = torch.zeros((), device=dev)  # accumulated on the device: no per-step sync
        pairs = torch.zeros((), dtype=torch.long, device=dev)
        perm = starts[torch.randperm(starts.numel(), generator=gen, device=dev)]
        done = 0
        for b in range(n_batches):
            if exit_guard.exiting():  # the interpreter exits under this training: stop as on Ctrl-C
                raise KeyboardInterrupt("the interpreter is exiting")
            if time_budget_s is not None and time.perf_counter() - t_train >= time_budget_s:
                result.stopped_by_budget = True  # stop at a batch boundary; the epoch so far counts
                break
            batch = perm[b * batch_size:(b + 1) * batch_size]  # (B,)
            walks = random_walks(csr, batch.repeat(cfg.walks_per_node), length, gen)  # (W, L)
            neg = draw_negatives(starts, (k * walks.shape[0], length), cfg.negative_pool, gen)
            loss, n_pos = model.loss(walks, neg, csr, cfg.context_size, cfg.fanout, gen, amp)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()  # queued asynchronously on CUDA: the CPU goes on to sample the next batch
            loss_sum += loss.detach()
            pairs += n_pos
            done += 1
            if on_batch is not None:
                on_batch(epoch, done, n_batches, epochs)
        if done == 0:  # the budget ran out at an epoch boundary: said as when it cuts an epoch
            if result.stopped_by_budget:
                _warn_budget(f"after {epoch - 1} of {epochs} epoch(s)", time_budget_s)
            break
        # sync point: the CPU waits here for the epoch's last step
        epoch_loss = float(loss_sum.item()) / done
        epoch_pairs = int(pairs.item())
        dt = time.perf_counter() - t0
        result.train_seconds += dt
        result.pos_pairs += epoch_pairs
        rec: dict = {"epoch": epoch, "loss": epoch_loss, "seconds": dt, "pos_pairs": epoch_pairs,
                     "pairs_per_s": epoch_pairs / dt if dt > 0 else 0.0, "batches": done,
                     "of_batches": n_batches, "partial": done < n_batches}
        result.last_epoch_partial = done < n_batches
        result.epochs_run = epoch
        model.eval()
        if has_val:
            rec["val_auc"] = validation_auc(model, csr, split)
        rec["val_walk_loss"] = validation_walk_loss(model, csr, val_walks, cfg)
        if stopper.update(epoch, rec):
            result.best_epoch = epoch
            if stopper.metric != EarlyStopMetric.OFF:
                best_theta = model.theta.weight.detach().clone()
        result.history.append(rec)
        elapsed = time.perf_counter() - t_train
        eta = (epochs - epoch) * elapsed / epoch
        if time_budget_s is not None:
            eta = min(eta, max(0.0, time_budget_s - elapsed))
        log.info("isne epoch %d/%d: loss %.4f%s%s, %s pairs/s, %.1f s, ETA %s%s", epoch, epochs, epoch_loss,
                 f", val walk loss {rec['val_walk_loss']:.4f}" if "val_walk_loss" in rec else "",
                 f", link auc {rec['val_auc']:.4f}" if "val_auc" in rec else "",
                 _si(rec["pairs_per_s"]), dt, _duration(eta),
                 f" (budget {time_budget_s:.3g} s)" if time_budget_s is not None else "")
        if result.stopped_by_budget:
            # a warning: a caller who asked for `epochs` gets fewer (the default budget is the ingest's time)
            # an epoch cut short is said to be one: "stopped after 3 of 3 epochs" hid 15 of 72 batches
            where = (f"in epoch {epoch} of {epochs}, after {done} of {n_batches} batches" if done < n_batches
                     else f"after {epoch} of {epochs} epoch(s)")
            _warn_budget(where, time_budget_s)
            break
        if stopper.should_stop():
            result.stopped_early = epoch < epochs
            if result.stopped_early:  # said, as a budget stop is (it was only in metrics.json)
                log.info("isne: stopped early after epoch %d of %d: no gain above isne.min_delta in isne.patience=%d "
                         "epoch(s); the best epoch's θ (%d) is kept", epoch, epochs, cfg.patience, result.best_epoch)
            break
        if epoch < epochs:
            saver.maybe_save(epoch, model, opt, gen, stopper, result, best_theta)

    if best_theta is not None and result.best_epoch != result.epochs_run:
        with torch.no_grad():
            model.theta.weight.copy_(best_theta)
    if has_val and result.history:
        result.best_val_auc = result.history[result.best_epoch - 1].get("val_auc")
    model.eval()
    if dev.type == "cuda":
        result.peak_device_bytes = int(torch.cuda.max_memory_allocated(dev))
    result.seconds = time.perf_counter() - t_all
    return result
