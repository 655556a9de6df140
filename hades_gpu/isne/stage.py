"""The graph + ISNE stage of an ingest output: graph in, ISNE vectors and checkpoint out.

`run_isne_stage(cfg, output_dir)` is what the job runs after the embeddings are written:

1. builds the chunk graph and writes `<output>/edges.parquet` (always, `hades_gpu.graph`);
2. if `isne.enabled`, or the caller asks for training (`train=True`, as `ISNETrainingPipeline` does):
   - **train** when `<output>/isne/model.safetensors` does not exist, or `isne.retrain`, or the
     caller asks (`train=True`): ISNE on the undirected graph (`hades_gpu.isne.trainer`), checkpoint
     θ + node ids + config, then every chunk's vector = exact neighbour mean of θ over the *full*
     graph (held-out validation edges included);
   - otherwise **infer**: chunks that have no ISNE vector yet (documents added since training) get
     h(v) = mean of their trained neighbours' θ, and of their new neighbours' estimates for
     `isne.infer_rounds` rounds (`hades_gpu.isne.inference`), without retraining; vectors already written are
     kept unchanged (downstream indexes stay valid), rows of chunks no longer in the output are
     dropped; a new chunk with no trained chunk within `isne.infer_rounds` + 1 links gets 0 and is
     counted (`n_uninformed`, one warning): `hades-isne` trains on the current graph;
3. writes `<output>/isne/embeddings-<shard>.parquet` (`chunk_id`, `isne_embedding` list<float32>),
   one row per chunk of the output (ordered by chunk id), joinable on `chunk_id`. The stage works
   on the whole output, so this one file (named after the shard that ran the stage) covers every
   chunk; readers list `isne/embeddings-*.parquet`.

Chunks without neighbours get the zero vector (`hades_gpu.isne.model`, "Isolated nodes").
"""

from __future__ import annotations

import dataclasses
import logging
import time
import uuid
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pyarrow as pa
import torch

from hades_gpu.config import IsneConfig, PipelineConfig
from hades_gpu.graph.build import build_graph
from hades_gpu.gpu.device import DeviceError, following, select_device
from hades_gpu.isne.checkpoint import DamagedCheckpointError, load_checkpoint, save_checkpoint
from hades_gpu.isne.inference import infer_from_checkpoint, neighbor_mean
from hades_gpu.isne.progress import TrainingProgress
from hades_gpu.isne.resume import discard_training_state
from hades_gpu.isne.sampling import CSRGraph
from hades_gpu.isne.trainer import train_isne
from hades_gpu.records import UNSHARDED, ShardSpec, printable
from hades_gpu.store.atomic import atomic_write_parquet, fsync_dir
from hades_gpu.store.shard_map import unfinished_shards
from hades_gpu.store.layout import (DRIVER_LOCK_NAME, ISNE_EMBEDDINGS_SCHEMA, ISNE_LOCK_NAME, ISNE_MODEL_ID_KEY,
                                    edges_path, isne_embeddings_files, isne_embeddings_path, isne_model_path,
                                    isne_training_state_path, metrics_path)
from hades_gpu.store.lock import OutputLock, OutputLockedError, held_elsewhere
from hades_gpu.store.metrics_file import ingest_seconds_per_chunk
from hades_gpu.store.reader import DamagedOutputError, isne_vectors_model_ids, read_isne_embeddings

log = logging.getLogger(__name__)


class NotAnIngestOutputError(FileNotFoundError):
    """The folder given to ISNE training is not a hades-ingest output (no manifest.json)."""


def stage_devices(cfg: PipelineConfig) -> tuple[torch.device, torch.device]:
    """(kNN device, ISNE device): `graph.device` and `isne.device`, ``auto`` meaning `gpu.device`.
    Raises `DeviceError` for one that is not visible: the ingest checks this before its first
    document (a cuda:3 on a box without it was found after the whole corpus was embedded)."""
    found = []
    for key, spec in (("graph.device", cfg.graph.device), ("isne.device", cfg.isne.device)):
        chosen = following(spec, cfg.gpu.device)
        try:
            found.append(select_device(chosen))
        except DeviceError as err:  # named: "cuda:3 requested" did not say which of four settings asked
            where = f"{key}={spec}" + (f" (auto: gpu.device={cfg.gpu.device})" if chosen != spec else "")
            raise DeviceError(f"{where}: {err}") from None
    return found[0], found[1]


def stage_shard_name(shard: str) -> str:
    """The name the stage's files carry: the run's shard name, except that every ``shard=i/n`` run
    (and the cluster driver) writes the unsharded name, so an output holds one ISNE embeddings file."""
    spec = ShardSpec.parse(shard)
    return UNSHARDED if spec.sharded else spec.label


def training_budget_s(cfg: IsneConfig, output_dir: Path, n_chunks: int) -> Optional[float]:
    """Seconds ISNE may train: `isne.time_budget_s`, else `time_budget_vs_embedding` x the seconds
    per chunk that ingesting into the output took (metrics.json's ``ingest_totals``, carried over
    resumes; the by-hand shards' files summed when there is no metrics.json) x the graph's chunks.

    So by default ISNE costs at most as long as embedding the same chunks did. None (no budget,
    only `epochs` and early stopping) when no ingest timing is recorded.
    """
    if cfg.time_budget_s is not None:
        return float(cfg.time_budget_s)
    if cfg.time_budget_vs_embedding <= 0:
        return None
    found = ingest_seconds_per_chunk(output_dir)
    if found is None:
        log.info("isne: no ingest timing in %s; training without a time budget (isne.epochs=%d, early stop %s)",
                 metrics_path(output_dir), cfg.epochs, cfg.early_stop)
        return None
    per_chunk, source = found
    log.debug("isne: ingest took %.4f s per chunk (%s)", per_chunk, source)
    return cfg.time_budget_vs_embedding * per_chunk * n_chunks


def _training_weights(cfg: PipelineConfig, data: Any) -> Optional[torch.Tensor]:
    """The undirected graph's per-edge weights (graph.*_weight by edge type, knn scaled by cosine)
    when `isne.edge_weights`, else None; a weight <= 0 is a configuration error, said in one line."""
    if not cfg.isne.edge_weights:
        return None
    w = data.edge_attr
    if w.numel() and not bool((w > 0).all()):
        raise ValueError("isne.edge_weights needs every edge weight > 0: set graph.sequence_weight, "
                         "same_document_weight, reference_weight and knn_weight_scale > 0 (turn an edge type "
                         "off with graph.<type>=false), or isne.edge_weights=false")
    return w


def write_isne_embeddings(path: Path, chunk_ids: np.ndarray, vecs: np.ndarray, model_id: Optional[str] = None) -> None:
    """`isne/embeddings-<shard>.parquet`: one row per chunk, ordered like `chunk_ids`, tagged with the
    `model_id` of the model that made them; the files other stage names wrote before go, since this
    one covers every chunk of the output (a by-hand shard's ingest wrote embeddings-zz, a later
    `hades-isne` embeddings-s0, and readers, where the later file name wins, took the old model's
    vectors from embeddings-zz)."""
    n, d = vecs.shape
    values = pa.array(np.ascontiguousarray(vecs, dtype=np.float32).reshape(-1), type=pa.float32())
    offsets = pa.array(np.arange(0, (n + 1) * d, d, dtype=np.int32), type=pa.int32())
    schema = ISNE_EMBEDDINGS_SCHEMA
    if model_id is not None:
        schema = schema.with_metadata({**(schema.metadata or {}), ISNE_MODEL_ID_KEY: model_id.encode()})
    table = pa.table({"chunk_id": pa.array(chunk_ids.tolist(), type=pa.string()),
                      "isne_embedding": pa.ListArray.from_arrays(offsets, values)}, schema=schema)
    atomic_write_parquet(table, path)
    stale = [f for f in isne_embeddings_files(path.parent.parent) if f.name != path.name]
    for f in stale:
        f.unlink(missing_ok=True)
    if stale:
        fsync_dir(path.parent)


def run_isne_stage(cfg: PipelineConfig, output_dir: Path, *, train: Optional[bool] = None,
                   epochs: Optional[int] = None, batch_size: Optional[int] = None,
                   driver: Optional[tuple[str, int]] = None) -> dict[str, Any]:
    """Build the chunk graph, then train ISNE or infer new chunks' vectors (module docstring).

    Args:
        cfg (PipelineConfig): `graph`, `isne` and `shard` are read.
        output_dir (Path): an ingest output folder.
        train (bool, optional): force training (True) or inference (False); default: train when no
            model exists or `isne.retrain`.
        epochs, batch_size (int, optional): override `isne.epochs` / `isne.batch_size`.
        driver ((host, pid), optional): the cluster driver this stage runs for: its lock does not
            refuse the stage (any other driver's does: it is still adding chunks).

    Returns:
        dict: n_nodes, n_edges (undirected), n_edges_by_type (rows of edges.parquet), n_isolated, knn,
        mode (trained | inferred | disabled | empty | no_edges), epochs_run, best_epoch, best_val_auc,
        stopped_early, stopped_by_budget, time_budget_s, pos_pairs, pairs_per_s, n_inferred, device, peak_device_bytes,
        resumed_from_epoch (0: trained from the start), paths and seconds {graph, train, infer, write, total}.

    Raises:
        OutputLockedError: another process runs this stage on the same output (`.lock-isne`): two
            trainings at once would only race for the same files; or another process is ingesting
            into it (a shard's lock): the graph would miss the chunks it has not committed yet.
    """
    output_dir = Path(output_dir)
    with OutputLock(output_dir, ISNE_LOCK_NAME):
        # an ingest writing the output now: its graph would be built from a part of the chunks (or none).
        # A cluster driver counts as one (between its discovery and its last shard no shard lock may be
        # held, and hades-isne trained on half the corpus, exit 0), except the driver this stage runs for.
        for shard, holder in held_elsewhere(output_dir, skip=(ISNE_LOCK_NAME,)):
            if shard == DRIVER_LOCK_NAME and driver is not None and \
                    (holder.get("host"), holder.get("pid")) == (driver[0], driver[1]):
                continue
            raise OutputLockedError(output_dir, shard, holder)
        unfinished, count = unfinished_shards(output_dir)
        if unfinished:  # a failed Slurm job of the README's recipe went unnoticed
            log.warning("%d of %d shard(s) of %s have not finished (e.g. %s): the graph and ISNE cover only the "
                        "committed chunks; run the missing shards, then this stage again", len(unfinished), count,
                        printable(str(output_dir)), unfinished[0])
        return _run_isne_stage(cfg, output_dir, train, epochs, batch_size)


def _run_isne_stage(cfg: PipelineConfig, output_dir: Path, train: Optional[bool], epochs: Optional[int],
                    batch_size: Optional[int]) -> dict[str, Any]:
    """`run_isne_stage` under the stage's lock."""
    t_all = time.perf_counter()
    knn_device, dev = stage_devices(cfg)
    graph = build_graph(output_dir, dataclasses.replace(cfg.graph, device=str(knn_device)))
    t_graph = time.perf_counter() - t_all
    data = graph.to_data(undirected=True)
    n = graph.num_nodes
    deg = torch.bincount(data.edge_index[0], minlength=n) if n else torch.zeros(0, dtype=torch.long)
    metrics: dict[str, Any] = {
        "n_nodes": n,
        "n_edges": int(data.edge_index.shape[1] // 2),
        "n_edges_by_type": graph.counts_by_type(),
        "n_isolated": int((deg == 0).sum()),
        "edges_path": str(edges_path(output_dir)),
        "knn": dict(graph.knn),  # method (exact | ann), seconds, measured recall@k, nprobe
        "seconds": {"graph": t_graph},
    }
    if not cfg.isne.enabled and train is not True:  # an explicit train=True (the seed's API) still trains
        metrics["mode"] = "disabled"
        metrics["seconds"]["total"] = time.perf_counter() - t_all
        return metrics

    mpath = isne_model_path(output_dir)
    epath = isne_embeddings_path(output_dir, stage_shard_name(cfg.shard))
    metrics.update(model_path=str(mpath), embeddings_path=str(epath))
    do_train = train if train is not None else (cfg.isne.retrain or not mpath.is_file())
    chunk_ids = graph.chunk_ids
    ckpt = None
    if n and not do_train:
        try:
            ckpt = load_checkpoint(mpath)
        except DamagedCheckpointError as err:  # derived from the output's chunks: train it again
            log.warning("isne: %s; training a new model", err)
            do_train = True

    if n == 0:
        metrics["mode"] = "empty"
        write_isne_embeddings(epath, chunk_ids, np.zeros((0, cfg.isne.dim), np.float32))
    elif do_train and metrics["n_edges"] == 0:
        # nothing to learn: h() is a mean over neighbours, and no chunk has one. No model is saved, so a
        # later run whose graph has edges trains one instead of inferring from untrained θ
        metrics["mode"] = "no_edges"
        log.warning("isne: the graph of %s has %d chunk(s) and no edges; no model trained, every ISNE vector "
                    "is 0 (search ranks these chunks by text alone)", output_dir, n)
        if mpath.is_file():  # trained on an earlier graph: kept, later runs inferred new chunks from it
            log.warning("isne: removing %s, trained on an earlier graph of this output", mpath)
            mpath.unlink()
            fsync_dir(mpath.parent)
        discard_training_state(isne_training_state_path(output_dir))
        write_isne_embeddings(epath, chunk_ids, np.zeros((n, cfg.isne.dim), np.float32))
    elif do_train:
        t = time.perf_counter()
        budget = training_budget_s(cfg.isne, output_dir, n)
        weights = _training_weights(cfg, data)
        state_path = isne_training_state_path(output_dir)
        progress = TrainingProgress(cfg.monitoring.progress, budget_s=budget)
        res = None
        try:
            res = train_isne(data.edge_index, n, cfg.isne, epochs=epochs, batch_size=batch_size, device=dev,
                             time_budget_s=budget, edge_weight=weights, state_path=state_path,
                             on_batch=progress.update if progress.enabled else None)
        finally:
            progress.stop(None if res is None else "time budget reached" if res.stopped_by_budget
                          else "stopped early" if res.stopped_early else "done")
        metrics["seconds"]["train"] = time.perf_counter() - t
        if res.pos_pairs == 0:  # the budget ended training before its first batch: θ is its random start
            _keep_the_earlier_model(cfg, output_dir, mpath, epath, chunk_ids, data, deg, dev, metrics, budget)
        else:
            _save_trained(cfg, output_dir, res, mpath, epath, state_path, chunk_ids, data, weights, dev, metrics,
                          budget)
    else:
        _infer_vectors(cfg, output_dir, ckpt, mpath, epath, chunk_ids, data, deg, dev, metrics)
    if not mpath.is_file():
        metrics["model_path"] = None  # no model exists (no chunks, or no edges): none is named
    metrics["seconds"]["total"] = time.perf_counter() - t_all
    log.info("isne stage (%s): %d nodes, %d undirected edges, %.1f s", metrics["mode"], n, metrics["n_edges"],
             metrics["seconds"]["total"])
    return metrics


def _keep_the_earlier_model(cfg: PipelineConfig, output_dir: Path, mpath: Path, epath: Path, chunk_ids: Any,
                            data: Any, deg: torch.Tensor, dev: torch.device, metrics: dict[str, Any],
                            budget: Optional[float]) -> None:
    """No batch trained: nothing is saved over the model (a budget shorter than one batch wrote the
    random start over the trained model, exit 0). The earlier model, if it loads, gives the vectors
    as for a run that does not train; else every vector is 0, as for a graph without edges."""
    ckpt = None
    if mpath.is_file():
        try:
            ckpt = load_checkpoint(mpath)
        except DamagedCheckpointError as err:
            log.warning("isne: %s", err)
    log.warning("isne: the time budget of %.3g s ended training before its first batch: no model is saved; %s "
                "(raise isne.time_budget_s, or time_budget_vs_embedding=0 for none)", budget or 0.0,
                "the earlier model is kept and gives the vectors" if ckpt is not None else
                "every ISNE vector is 0 until a training runs")
    if ckpt is not None:
        _infer_vectors(cfg, output_dir, ckpt, mpath, epath, chunk_ids, data, deg, dev, metrics)
    else:
        write_isne_embeddings(epath, chunk_ids, np.zeros((len(chunk_ids), cfg.isne.dim), np.float32))
    metrics.update(mode="untrained", kept_model=ckpt is not None, stopped_by_budget=True, time_budget_s=budget,
                   epochs_run=0, pos_pairs=0)


def _save_trained(cfg: PipelineConfig, output_dir: Path, res: Any, mpath: Path, epath: Path, state_path: Path,
                  chunk_ids: Any, data: Any, weights: Optional[torch.Tensor], dev: torch.device,
                  metrics: dict[str, Any], budget: Optional[float]) -> None:
    """The trained model, then every chunk's vector (the exact neighbour mean over the full graph)."""
    n = len(chunk_ids)
    theta = res.model.theta.weight.detach()
    # ties the vectors to this model: a stage that failed between writing the one and the other
    # left a new model beside the old vectors, and later runs mixed vectors of two models
    model_id = uuid.uuid4().hex
    save_checkpoint(mpath, theta, chunk_ids.tolist(), {
        "model_id": model_id,
        "isne": dataclasses.asdict(cfg.isne), "graph": dataclasses.asdict(cfg.graph),
        "num_nodes": n, "dim": int(theta.shape[1]), "aggregate": True,
        "init_std": res.model.init_std, "epochs_run": res.epochs_run, "best_epoch": res.best_epoch,
        "best_val_auc": res.best_val_auc,
    })
    discard_training_state(state_path)  # after the model: a kill between the two only re-runs epochs
    t = time.perf_counter()
    full = CSRGraph.from_edge_index(data.edge_index, n, device=dev, edge_weight=weights)
    vecs = neighbor_mean(theta, full).cpu().numpy()  # exact mean over the full graph
    metrics["seconds"]["infer"] = time.perf_counter() - t
    metrics.update(mode="trained", epochs_run=res.epochs_run, best_epoch=res.best_epoch,
                   best_val_auc=res.best_val_auc, stopped_early=res.stopped_early,
                   stopped_by_budget=res.stopped_by_budget, time_budget_s=budget,
                   last_epoch_partial=res.last_epoch_partial,
                   pos_pairs=res.pos_pairs, pairs_per_s=res.pairs_per_s, n_inferred=n,
                   num_val_edges=res.num_val_edges, device=res.device,
                   peak_device_bytes=res.peak_device_bytes, resumed_from_epoch=res.resumed_from_epoch,
                   history=res.history)
    t = time.perf_counter()
    write_isne_embeddings(epath, chunk_ids, vecs, model_id)
    metrics["seconds"]["write"] = time.perf_counter() - t


def _infer_vectors(cfg: PipelineConfig, output_dir: Path, ckpt: Any, mpath: Path, epath: Path, chunk_ids: Any,
                   data: Any, deg: torch.Tensor, dev: torch.device, metrics: dict[str, Any]) -> None:
    """Every chunk's vector from the saved model `ckpt`: the output's own where it has one made by
    that model, inferred from the neighbours' θ for the rest; written to `epath`, said in `metrics`."""
    n = len(chunk_ids)
    t = time.perf_counter()
    model_id = ckpt.config.get("model_id")
    try:
        old_ids, old_vecs = read_isne_embeddings(output_dir)
        made_by = isne_vectors_model_ids(output_dir)
    except DamagedOutputError as err:  # derived: every chunk's vector is inferred from the model again
        log.warning("isne: %s; inferring every chunk's vector from the model instead", err)
        old_ids, old_vecs = [], np.zeros((0, 0), np.float32)
    else:
        if model_id is not None and old_ids and made_by != {model_id}:
            log.warning("isne: the ISNE vectors in %s were not made by the model %s (a stage stopped between "
                        "writing the two); inferring every chunk's vector from the model", epath.parent, mpath)
            old_ids, old_vecs = [], np.zeros((0, 0), np.float32)
    d = int(ckpt.theta.shape[1])
    if cfg.isne.dim != d:
        log.warning("isne.dim is %d but %s was trained with %d; using the model (set isne.retrain=true "
                    "to train a new one)", cfg.isne.dim, mpath, d)
    pos = {c: i for i, c in enumerate(chunk_ids.tolist())}
    vecs = np.zeros((n, d), np.float32)
    have = np.zeros(n, dtype=bool)
    if old_vecs.shape[0] and old_vecs.shape[1] == d:
        for j, c in enumerate(old_ids):
            i = pos.get(c)
            if i is not None:
                vecs[i] = old_vecs[j]
                have[i] = True
    missing = np.flatnonzero(~have)
    if missing.size:
        trained_weighted = bool(ckpt.config.get("isne", {}).get("edge_weights", False))  # as it was trained
        new, known = infer_from_checkpoint(ckpt, chunk_ids.tolist(), data.edge_index,
                                           edge_weight=data.edge_attr if trained_weighted else None,
                                           nodes=torch.as_tensor(missing), device=dev,
                                           rounds=cfg.isne.infer_rounds)
        vecs[missing] = new.numpy()
    # A new chunk with no trained chunk within infer_rounds + 1 links (a new document that links to
    # nothing already trained, and whose kNN neighbours are all new too) has nothing to average:
    # its vector is 0. Counted and said, not reported as inferred (it was, silently).
    zero = ~np.any(vecs[missing] != 0, axis=1)
    uninformed = int((zero & (deg.numpy()[missing] > 0)).sum())  # isolated chunks are n_isolated
    if uninformed:
        log.warning("isne: %d of %d new chunk(s) have no trained chunk within %d link(s), so their ISNE vector "
                    "is 0 (they rank by text alone); `hades-isne output=%s` trains on the current graph",
                    uninformed, missing.size, cfg.isne.infer_rounds + 1, output_dir)
    metrics["seconds"]["infer"] = time.perf_counter() - t
    # inferred: the new chunks that got a vector (an isolated new chunk's 0 is no inference either)
    metrics.update(mode="inferred", n_inferred=int((~zero).sum()), n_uninformed=uninformed,
                   device=str(dev), n_trained_nodes=len(ckpt.node_ids))
    t = time.perf_counter()
    write_isne_embeddings(epath, chunk_ids, vecs, model_id)
    metrics["seconds"]["write"] = time.perf_counter() - t


