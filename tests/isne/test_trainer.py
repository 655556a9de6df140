"""Trainer (split, AUC, early stopping) and the ISNE stage on a synthetic ingest output."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from hades_gpu.config import GraphConfig, IsneConfig, PipelineConfig
from hades_gpu.isne.evaluation import sbm_graph
from hades_gpu.isne.trainer import link_auc, split_edges, train_isne, undirected_pairs
from hades_gpu.isne.validation import fixed_validation_walks, validation_walk_loss
from hades_gpu.isne.stage import NotAnIngestOutputError, run_isne_stage
from hades_gpu.pipelines.isne_training import ISNETrainingPipeline
from hades_gpu.store.reader import read_isne_embeddings
from hades_gpu.records import stable_id


def test_split_holds_out_edges_without_isolating_nodes() -> None:
    ei, _ = sbm_graph(500, 5, 0.03, 0.003, seed=1)
    split = split_edges(ei, 500, 0.2, seed=0)
    und = undirected_pairs(ei, 500)
    train_pairs = set(map(tuple, undirected_pairs(split.train, 500).T.tolist()))
    val = set(map(tuple, split.val_pos.T.tolist()))
    assert val and not (val & train_pairs)
    assert len(val) + len(train_pairs) == und.shape[1]
    assert 0.1 * und.shape[1] < len(val) <= 0.2 * und.shape[1] + 1
    # symmetric training graph; every node that had a neighbour still has one
    tr = set(map(tuple, split.train.T.tolist()))
    assert all((b, a) in tr for a, b in tr)
    deg_all = torch.bincount(ei[0], minlength=500)
    deg_tr = torch.bincount(split.train[0], minlength=500)
    assert ((deg_all > 0) <= (deg_tr > 0)).all()
    # negatives: random pairs, one per held-out positive, self pairs dropped (rare on 500 nodes)
    neg, n_pos = split.val_neg, split.val_pos.shape[1]
    assert neg.shape[0] == 2 and 0.95 * n_pos <= neg.shape[1] <= n_pos
    assert (neg[0] != neg[1]).all() and int(neg.min()) >= 0 and int(neg.max()) < 500


def test_link_auc() -> None:
    assert link_auc(torch.tensor([3.0, 4.0]), torch.tensor([1.0, 2.0])) == 1.0
    assert link_auc(torch.tensor([1.0]), torch.tensor([1.0])) == 0.5
    rng = np.random.default_rng(0)
    p, q = torch.tensor(rng.normal(1, 1, 300)), torch.tensor(rng.normal(0, 1, 200))
    brute = float((p[:, None] > q[None, :]).double().mean())
    assert abs(link_auc(p, q) - brute) < 1e-9


def test_training_learns_and_is_reproducible() -> None:
    ei, _ = sbm_graph(600, 4, 0.04, 0.002, seed=2)
    cfg = IsneConfig(dim=16, epochs=6, batch_size=128, walk_length=10, walks_per_node=2, device="cpu",
                     patience=100)
    a = train_isne(ei, 600, cfg)
    b = train_isne(ei, 600, cfg)
    losses = [h["loss"] for h in a.history]
    assert a.epochs_run == 6 and losses[-1] < losses[0]
    assert a.best_val_auc is not None and a.best_val_auc > 0.6
    assert a.pos_pairs > 0 and a.pairs_per_s > 0
    torch.testing.assert_close(a.model.theta.weight, b.model.theta.weight)  # same seed, same θ


def test_early_stopping_restores_best_theta(caplog) -> None:
    import logging

    caplog.set_level(logging.INFO, logger="hades_gpu.isne.trainer")
    ei, _ = sbm_graph(300, 3, 0.05, 0.005, seed=3)
    cfg = IsneConfig(dim=8, epochs=50, batch_size=64, walk_length=6, walks_per_node=1, device="cpu",
                     patience=1, min_delta=1.0)  # no epoch can halve the loss or gain 1.0 AUC: stop after epoch 2
    for metric in ("walk_loss", "link_auc"):
        res = train_isne(ei, 300, dataclasses.replace(cfg, early_stop=metric))
        assert res.epochs_run == 2 and res.stopped_early and res.best_epoch == 1, metric
        # said, as a budget stop is (it was only in metrics.json)
        assert "stopped early after epoch 2 of 50" in caplog.text and "(1) is kept" in caplog.text, metric
        caplog.clear()
        assert res.best_val_auc == res.history[0]["val_auc"]
        # θ is epoch 1's: its exact h() gives epoch 1's validation figures again
        walks = fixed_validation_walks(res.csr, (res.csr.degree() > 0).nonzero().squeeze(1), cfg)
        assert validation_walk_loss(res.model, res.csr, walks, cfg) == pytest.approx(res.history[0]["val_walk_loss"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_training_on_cuda_with_amp() -> None:
    ei, _ = sbm_graph(2000, 4, 0.01, 0.001, seed=4)
    cfg = IsneConfig(dim=32, epochs=3, batch_size=256, device="cuda", amp=True, patience=100)
    res = train_isne(ei, 2000, cfg)
    assert res.device.startswith("cuda") and res.model.theta.weight.is_cuda
    assert all(np.isfinite(h["loss"]) for h in res.history)
    assert res.history[-1]["loss"] < res.history[0]["loss"]
    assert res.peak_device_bytes and res.peak_device_bytes > 0


# ------------------------------------------------------------------------------- pipeline stage
def _write_output(root: Path, docs: dict[str, int], dim: int = 32, seed: int = 0, part: int = 0,
                  manifest_parts: list[str] | None = None, topic: int = 123) -> list[str]:
    """One chunks/documents part pair (docs: rel_path -> n_chunks) and a manifest naming the parts.
    Chunks of the same `topic` are alike (kNN links them); other topics' are not."""
    rng = np.random.default_rng(seed)
    name = f"part-s0-{part:05d}"
    rows: dict[str, list] = {k: [] for k in ("doc_id", "chunk_id", "ordinal", "embedding")}
    drows: dict[str, list] = {k: [] for k in ("doc_id", "rel_path", "language", "references", "n_chunks")}
    base = np.random.default_rng(topic).normal(size=dim) * 3  # all parts alike: kNN links new chunks to old
    for rel, n in docs.items():
        doc_id = stable_id(rel)
        for k in range(n):
            rows["doc_id"].append(doc_id)
            rows["chunk_id"].append(stable_id(doc_id, "h", str(k)))
            rows["ordinal"].append(k)
            rows["embedding"].append((base + rng.normal(size=dim)).astype(np.float32).tolist())
        drows["doc_id"].append(doc_id)
        drows["rel_path"].append(rel)
        drows["language"].append("markdown")
        drows["references"].append([])
        drows["n_chunks"].append(n)
    for sub in ("chunks", "documents"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"doc_id": rows["doc_id"], "chunk_id": rows["chunk_id"],
                             "ordinal": pa.array(rows["ordinal"], pa.int32()),
                             "embedding": pa.array(rows["embedding"], pa.list_(pa.float32(), dim))}),
                   root / "chunks" / f"{name}.parquet")
    pq.write_table(pa.table({"doc_id": drows["doc_id"], "rel_path": drows["rel_path"],
                             "language": drows["language"],
                             "references": pa.array(drows["references"], pa.list_(pa.string())),
                             "n_chunks": pa.array(drows["n_chunks"], pa.int32())}),
                   root / "documents" / f"{name}.parquet")
    (root / "manifest.json").write_text(json.dumps({"version": 1, "shard": "s0",
                                                    "parts": manifest_parts or [name], "documents": {}}))
    return rows["chunk_id"]


def _cfg() -> PipelineConfig:
    return PipelineConfig(graph=GraphConfig(knn_k=3, knn_threshold=0.0, same_document_fanout=2),
                          isne=IsneConfig(dim=8, epochs=3, batch_size=64, walk_length=6, walks_per_node=2,
                                          device="cpu"))


def test_stage_trains_then_infers_new_chunks_without_retraining(tmp_path: Path) -> None:
    first = _write_output(tmp_path, {f"d{i}.md": 3 + i % 4 for i in range(12)})
    m1 = run_isne_stage(_cfg(), tmp_path)
    assert m1["mode"] == "trained" and m1["n_nodes"] == len(first) and m1["epochs_run"] >= 1
    assert set(m1["n_edges_by_type"]) == {"sequence", "same_document", "reference", "knn"}
    model = tmp_path / "isne" / "model.safetensors"
    assert model.is_file()
    ids1, vecs1 = read_isne_embeddings(tmp_path)
    assert sorted(ids1) == sorted(first) and vecs1.shape == (len(first), 8)
    stamp = model.stat().st_mtime_ns

    # documents added later: their chunks are inferred, old vectors kept, the model untouched
    added = _write_output(tmp_path, {"new1.md": 4, "new2.md": 2}, seed=1, part=1,
                          manifest_parts=["part-s0-00000", "part-s0-00001"])
    m2 = run_isne_stage(_cfg(), tmp_path)
    assert m2["mode"] == "inferred" and m2["n_inferred"] == len(added)
    assert model.stat().st_mtime_ns == stamp
    ids2, vecs2 = read_isne_embeddings(tmp_path)
    assert sorted(ids2) == sorted(first + added)
    old = dict(zip(ids1, vecs1))
    new = dict(zip(ids2, vecs2))
    assert all(np.array_equal(old[c], new[c]) for c in first)
    assert all(np.abs(new[c]).sum() > 0 for c in added)  # kNN links them to trained chunks: not zero

    # asking for retraining trains again
    m3 = run_isne_stage(PipelineConfig(graph=_cfg().graph, isne=IsneConfig(**{**_cfg().isne.__dict__,
                                                                            "retrain": True})), tmp_path)
    assert m3["mode"] == "trained" and m3["n_nodes"] == len(first) + len(added)


def test_vectors_of_another_model_beside_the_model_are_inferred_again(tmp_path: Path, caplog) -> None:
    """A stage that failed between writing the model and the vectors (a full disk, a size limit) left
    a new model beside the old model's vectors; later stages kept those and inferred only new chunks
    from the new θ, mixing two models' vectors without a word. The vectors now carry the model's id:
    vectors of another model are inferred again from the model there, and said."""
    import logging
    import shutil

    from hades_gpu.isne.checkpoint import load_checkpoint
    from hades_gpu.store.reader import isne_vectors_model_ids

    ids = _write_output(tmp_path, {f"d{i}.md": 3 + i % 4 for i in range(12)})
    run_isne_stage(_cfg(), tmp_path)
    old_vectors = tmp_path / "old-vectors.parquet"
    shutil.copy(tmp_path / "isne" / "embeddings-s0.parquet", old_vectors)
    (model_id,) = isne_vectors_model_ids(tmp_path)
    assert model_id and load_checkpoint(tmp_path / "isne" / "model.safetensors").config["model_id"] == model_id

    retrain = PipelineConfig(graph=_cfg().graph, isne=IsneConfig(**{**_cfg().isne.__dict__, "retrain": True,
                                                                    "seed": 7}))
    run_isne_stage(retrain, tmp_path)  # a new model ...
    (new_id,) = isne_vectors_model_ids(tmp_path)
    assert new_id != model_id
    _, right = read_isne_embeddings(tmp_path)
    shutil.copy(old_vectors, tmp_path / "isne" / "embeddings-s0.parquet")  # ... beside the old model's vectors
    with caplog.at_level(logging.WARNING, logger="hades_gpu.isne.stage"):
        m = run_isne_stage(_cfg(), tmp_path)
    assert m["mode"] == "inferred" and m["n_inferred"] == len(ids)
    assert any("were not made by the model" in r.getMessage() for r in caplog.records)
    got_ids, got = read_isne_embeddings(tmp_path)
    assert isne_vectors_model_ids(tmp_path) == {new_id}
    np.testing.assert_allclose(got, right, rtol=1e-4, atol=1e-5)  # the new model's own vectors again


def test_new_chunks_with_no_trained_chunk_near_them_are_counted_and_said(tmp_path: Path, caplog) -> None:
    """A new document that links to nothing trained (its kNN neighbours are all new too) has nothing
    to average: its vectors are 0. The stage reported them as inferred, silently."""
    import logging

    first = _write_output(tmp_path, {f"d{i}.md": 3 for i in range(6)})
    cfg = _cfg()
    cfg.graph.knn_threshold = 0.5  # different topics stay unlinked
    assert run_isne_stage(cfg, tmp_path)["mode"] == "trained"
    added = _write_output(tmp_path, {"far.md": 4}, seed=1, part=1, topic=7,
                          manifest_parts=["part-s0-00000", "part-s0-00001"])
    # and a one-chunk document like nothing else: isolated, its 0 is no inference (it was counted as one)
    _write_output(tmp_path, {"lone.md": 1}, seed=2, part=2, topic=99,
                  manifest_parts=["part-s0-00000", "part-s0-00001", "part-s0-00002"])
    with caplog.at_level(logging.WARNING, logger="hades_gpu.isne.stage"):
        m = run_isne_stage(cfg, tmp_path)
    assert m["mode"] == "inferred" and m["n_uninformed"] == len(added) and m["n_inferred"] == 0
    assert m["n_isolated"] == 1  # far.md's chunks are linked to each other, not to anything trained
    assert any("4 of 5 new chunk(s) have no trained chunk" in r.getMessage() for r in caplog.records)
    ids, vecs = read_isne_embeddings(tmp_path)
    got = dict(zip(ids, vecs))
    assert all(not got[c].any() for c in added) and all(got[c].any() for c in first)


def test_pipeline_api_and_clear_error(tmp_path: Path) -> None:
    with pytest.raises(NotAnIngestOutputError, match="ingest it first") as info:
        ISNETrainingPipeline(_cfg()).train(corpus_path=tmp_path)
    assert f"output={tmp_path}" not in str(info.value)  # an output inside its own corpus is refused
    with pytest.raises(NotAnIngestOutputError, match="does not exist"):
        ISNETrainingPipeline(_cfg()).train(corpus_path=tmp_path / "nowhere")
    with pytest.raises(NotAnIngestOutputError, match="empty path"):
        ISNETrainingPipeline(_cfg()).train(corpus_path="")
    _write_output(tmp_path, {"a.md": 5, "b.md": 5})
    res = ISNETrainingPipeline(_cfg()).train(corpus_path=tmp_path, epochs=2, batch_size=16)
    assert res.metrics["mode"] == "trained" and res.metrics["epochs_run"] <= 2
    assert res.model_path.is_file() and res.embeddings_path.is_file()
    t = pq.read_table(res.embeddings_path)
    assert t.schema.field("isne_embedding").type == pa.list_(pa.float32())
    assert t.num_rows == 10


def test_stage_disabled_still_builds_graph(tmp_path: Path) -> None:
    _write_output(tmp_path, {"a.md": 3})
    cfg = _cfg()
    cfg.isne.enabled = False
    m = run_isne_stage(cfg, tmp_path)
    assert m["mode"] == "disabled" and (tmp_path / "edges.parquet").is_file()
    assert not (tmp_path / "isne").exists()


def test_row_sparse_adam_matches_sparse_adam() -> None:
    from hades_gpu.isne.trainer import RowSparseAdam

    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(20, 3))
    b = torch.nn.Parameter(a.detach().clone())
    opt_a, opt_b = RowSparseAdam([a], lr=0.05), torch.optim.SparseAdam([b], lr=0.05)
    for step in range(5):
        rows = torch.unique(torch.randint(20, (7,), generator=torch.Generator().manual_seed(step)))
        vals = torch.randn(rows.numel(), 3)
        for p, o in ((a, opt_a), (b, opt_b)):
            p.grad = torch.sparse_coo_tensor(rows[None], vals, (20, 3), check_invariants=True).coalesce()
            o.step()
    torch.testing.assert_close(a, b)


def _theta_from_checkpoint(path: Path) -> dict[str, np.ndarray]:
    """θ rows by chunk id, read with safetensors directly (not through the project's loader)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="np") as f:
        theta = f.get_tensor("theta")
        raw = f.get_tensor("node_ids_bytes").tobytes()
        off = f.get_tensor("node_ids_offsets").tolist()
    ids = [raw[off[i]:off[i + 1]].decode() for i in range(len(off) - 1)]
    return dict(zip(ids, theta.astype(np.float64)))


def _neighbours(output: Path) -> dict[str, dict[str, float]]:
    """Undirected neighbours from edges.parquet (both directions, no self loops), each with the
    largest weight over the edges joining the pair."""
    t = pq.read_table(output / "edges.parquet", columns=["src_chunk_id", "dst_chunk_id", "weight"])
    nbrs: dict[str, dict[str, float]] = {}
    for s, d, w in zip(t.column("src_chunk_id").to_pylist(), t.column("dst_chunk_id").to_pylist(),
                       t.column("weight").to_pylist()):
        if s != d:
            for a, b in ((s, d), (d, s)):
                nbrs.setdefault(a, {})[b] = max(w, nbrs.get(a, {}).get(b, float("-inf")))
    return nbrs


def _mean(theta: dict[str, np.ndarray], around: dict[str, float], weighted: bool) -> np.ndarray:
    if not around:
        return np.zeros(8)
    w = np.array([around[n] if weighted else 1.0 for n in around])
    return (w[:, None] * np.stack([theta[n] for n in around])).sum(0) / w.sum()


def _propagated(theta: dict[str, np.ndarray], nbrs: dict[str, dict[str, float]], new: list[str], rounds: int,
                weighted: bool) -> dict[str, np.ndarray]:
    """The inferred vectors of `new` chunks, written out: round 0 averages trained neighbours; each
    further round averages trained neighbours' θ and new neighbours' previous estimates (a new
    neighbour without an estimate is left out); a chunk with nothing to average gets zeros."""
    estimates: dict[str, np.ndarray] = {}
    for _ in range(rounds + 1):
        known = {**theta, **estimates}
        around = {c: {n: w for n, w in nbrs.get(c, {}).items() if n in known} for c in new}
        estimates = {c: _mean(known, around[c], weighted) for c in new if around[c]}
    return {c: estimates.get(c, np.zeros(8)) for c in new}


@pytest.mark.parametrize("weighted, rounds", [(True, 2), (False, 2), (True, 0), (False, 1)])
def test_isne_vectors_are_neighbour_means_of_the_checkpoints_theta(tmp_path: Path, weighted: bool,
                                                                   rounds: int) -> None:
    """Ground truth for the stored vectors: h(v) = mean of θ over v's neighbours in edges.parquet
    (weighted by the edges' weights with isne.edge_weights), θ read back from the checkpoint;
    inferred chunks average their trained neighbours' θ and, for `isne.infer_rounds` rounds, their
    new neighbours' estimates (rounds=0: trained neighbours only)."""
    cfg = _cfg()
    cfg.isne.edge_weights = weighted
    cfg.isne.infer_rounds = rounds
    first = _write_output(tmp_path, {f"d{i}.md": 2 + i % 3 for i in range(10)})
    run_isne_stage(cfg, tmp_path)
    theta = _theta_from_checkpoint(tmp_path / "isne" / "model.safetensors")
    assert sorted(theta) == sorted(first)
    assert np.abs(np.stack(list(theta.values()))).max() > 0
    nbrs = _neighbours(tmp_path)
    assert len({w for around in nbrs.values() for w in around.values()}) > 2  # the weights differ
    ids, vecs = read_isne_embeddings(tmp_path)
    for cid, vec in zip(ids, vecs):
        np.testing.assert_allclose(vec, _mean(theta, nbrs.get(cid, {}), weighted), rtol=1e-5, atol=1e-6)

    added = _write_output(tmp_path, {"new1.md": 3, "new2.md": 1}, seed=1, part=1,
                          manifest_parts=["part-s0-00000", "part-s0-00001"])
    cfg.isne.edge_weights = not weighted  # inference follows the checkpoint, not today's config
    run_isne_stage(cfg, tmp_path)
    assert _theta_from_checkpoint(tmp_path / "isne" / "model.safetensors").keys() == theta.keys()
    nbrs = _neighbours(tmp_path)
    got = dict(zip(*read_isne_embeddings(tmp_path)))
    want = _propagated(theta, nbrs, added, rounds, weighted)
    for cid in added:
        np.testing.assert_allclose(got[cid], want[cid], rtol=1e-5, atol=1e-6)
    assert any(set(nbrs.get(c, {})) != {n for n in nbrs.get(c, {}) if n in theta} for c in added), \
        "no new chunk has a new neighbour: the rounds through new neighbours went unexercised"
    if rounds:  # and they changed something
        plain = _propagated(theta, nbrs, added, 0, weighted)
        assert any(not np.allclose(plain[c], want[c], rtol=1e-5, atol=1e-6) for c in added)


def test_train_result_accounts_for_every_epoch_exactly() -> None:
    ei, _ = sbm_graph(600, 4, 0.05, 0.002, seed=2)
    cfg = IsneConfig(dim=8, epochs=4, batch_size=100, walk_length=6, walks_per_node=1, device="cpu",
                     patience=100, val_fraction=0.1)
    r = train_isne(ei, 600, cfg)
    und = ei.shape[1] // 2
    assert r.num_val_edges > 0 and r.num_train_edges + r.num_val_edges == und
    assert r.device == "cpu" and r.peak_device_bytes is None and r.model.sparse is True
    assert r.epochs_run == len(r.history) == 4 and not r.stopped_early
    assert [h["epoch"] for h in r.history] == [1, 2, 3, 4]
    assert r.pos_pairs == sum(h["pos_pairs"] for h in r.history) > 0
    assert r.train_seconds == pytest.approx(sum(h["seconds"] for h in r.history))
    assert r.seconds >= r.train_seconds > 0
    for h in r.history:
        assert h["pairs_per_s"] == pytest.approx(h["pos_pairs"] / h["seconds"]) and 0 <= h["val_auc"] <= 1
    assert r.history[-1]["loss"] < r.history[0]["loss"]  # it learns
    # the best epoch is the one with the lowest fixed-walk validation loss (early_stop=walk_loss);
    # its link AUC is reported with it
    losses = [h["val_walk_loss"] for h in r.history]
    assert r.best_epoch == 1 + losses.index(min(losses))
    assert r.history[r.best_epoch - 1]["val_auc"] == r.best_val_auc
    auc = train_isne(ei, 600, IsneConfig(**{**cfg.__dict__, "early_stop": "link_auc"}))
    assert auc.best_val_auc == max(h["val_auc"] for h in auc.history)
    dense = train_isne(ei, 600, IsneConfig(**{**cfg.__dict__, "optimizer": "adam"}), epochs=1)
    assert dense.model.sparse is False and dense.epochs_run == 1
    none = train_isne(ei, 600, cfg, epochs=0)
    assert none.epochs_run == 0 and none.history == [] and none.pos_pairs == 0
    lookup = train_isne(ei, 600, cfg, aggregate=False, epochs=1)
    assert lookup.model.aggregate is False


def _both_ways(pairs: list[tuple[int, int]]) -> torch.Tensor:
    return torch.tensor(pairs + [(b, a) for a, b in pairs], dtype=torch.long).T


def test_split_edges_rules_on_a_small_graph() -> None:
    """A triangle 0-1-2 with leaves 3, 4 on node 0 (and node 5 isolated): only triangle edges can be
    held out (both ends need a second neighbour), no node loses its last training edge, the split
    and its negatives are a function of the seed, and val_fraction 0 holds out nothing."""
    edges = [(0, 1), (1, 2), (0, 2), (0, 3), (0, 4)]
    ei = _both_ways(edges)
    none = split_edges(ei, 6, 0.0)
    assert none.val_pos.dtype == none.val_neg.dtype == torch.long
    assert tuple(none.val_pos.shape) == tuple(none.val_neg.shape) == (2, 0)
    assert sorted(map(tuple, none.train.T.tolist())) == sorted(map(tuple, ei.T.tolist()))
    held_any = False
    for seed in range(30):
        s = split_edges(ei, 6, 0.4, seed)
        val = set(map(tuple, s.val_pos.T.tolist()))
        train = set(map(tuple, s.train.T.tolist()))
        assert val <= {(0, 1), (1, 2), (0, 2)}
        assert all((b, a) in train for a, b in train) and not any((a, b) in train for a, b in val)
        assert {tuple(sorted(p)) for p in train} | val == set(edges)
        assert all(any(a == v for a, _ in train) for v in range(5))  # every node keeps a neighbour
        held_any |= bool(val)
        again = split_edges(ei, 6, 0.4, seed)
        assert torch.equal(s.val_pos, again.val_pos) and torch.equal(s.val_neg, again.val_neg)
        assert torch.equal(s.train, again.train)
    assert held_any


def test_the_stage_report_is_exact_and_the_checkpoint_records_its_training(tmp_path: Path) -> None:
    """What metrics.json carries for the stage (users and the benchmarks read it), checked value by
    value against the graph and the training result, and the checkpoint's config read back."""
    from hades_gpu.graph import load_graph
    from hades_gpu.isne.checkpoint import load_checkpoint

    ids = _write_output(tmp_path, {f"d{i}.md": 2 + i % 3 for i in range(9)} | {"alone.md": 1})
    cfg = _cfg()
    m = run_isne_stage(cfg, tmp_path, epochs=2, batch_size=16)
    assert m["knn"]["method"] == "exact"  # 10 documents: far below graph.knn_exact_max_nodes
    assert set(m) == {"n_nodes", "n_edges", "n_edges_by_type", "n_isolated", "edges_path", "knn", "seconds", "model_path",
                      "embeddings_path", "mode", "epochs_run", "best_epoch", "best_val_auc", "stopped_early",
                      "stopped_by_budget", "last_epoch_partial", "time_budget_s", "pos_pairs", "pairs_per_s", "n_inferred", "num_val_edges", "device", "peak_device_bytes",
                      "resumed_from_epoch", "history"}
    assert m["resumed_from_epoch"] == 0 and not (tmp_path / "isne" / "training-state.pt").exists()
    data = load_graph(tmp_path)
    deg = torch.bincount(data.edge_index[0], minlength=data.num_nodes)
    rows = pq.read_table(tmp_path / "edges.parquet").to_pandas()
    assert (m["mode"], m["n_nodes"], m["n_inferred"], m["device"]) == ("trained", len(ids), len(ids), "cpu")
    assert m["n_edges"] == data.edge_index.shape[1] // 2 and m["n_isolated"] == int((deg == 0).sum())
    assert m["n_edges_by_type"] == {t: int((rows.type == t).sum()) for t in ("sequence", "same_document", "reference",
                                                                           "knn")}
    assert m["edges_path"] == str(tmp_path / "edges.parquet") and m["model_path"] == str(tmp_path / "isne" / "model.safetensors")
    assert m["embeddings_path"] == str(tmp_path / "isne" / "embeddings-s0.parquet")
    assert m["epochs_run"] == len(m["history"]) == 2 and 1 <= m["best_epoch"] <= 2 and m["peak_device_bytes"] is None
    losses = [h["val_walk_loss"] for h in m["history"]]
    best = 0  # an epoch is better only by more than isne.min_delta (relative, for walk_loss)
    for i in range(1, len(losses)):
        if losses[i] < losses[best] - cfg.isne.min_delta * abs(losses[best]):
            best = i
    assert m["best_epoch"] == 1 + best and m["num_val_edges"] > 0
    assert m["best_val_auc"] == m["history"][m["best_epoch"] - 1]["val_auc"]
    assert m["stopped_by_budget"] is False and m["time_budget_s"] is None  # _write_output leaves no metrics.json
    assert m["pos_pairs"] == sum(h["pos_pairs"] for h in m["history"]) > 0 and m["pairs_per_s"] > 0
    assert set(m["seconds"]) == {"graph", "train", "infer", "write", "total"}
    assert 0 < m["seconds"]["graph"] <= m["seconds"]["total"] and m["seconds"]["total"] < 600
    ckpt = load_checkpoint(tmp_path / "isne" / "model.safetensors")
    assert sorted(ckpt.node_ids) == sorted(ids) and ckpt.theta.shape == (len(ids), cfg.isne.dim)
    assert {k: ckpt.config[k] for k in ("num_nodes", "dim", "aggregate", "epochs_run", "best_epoch", "best_val_auc")} \
        == {"num_nodes": len(ids), "dim": cfg.isne.dim, "aggregate": True, "epochs_run": 2,
            "best_epoch": m["best_epoch"], "best_val_auc": m["best_val_auc"]}
    assert ckpt.config["isne"]["dim"] == cfg.isne.dim and ckpt.config["graph"]["knn_k"] == cfg.graph.knn_k
    again = run_isne_stage(cfg, tmp_path)  # inference now: its own report
    assert (again["mode"], again["n_inferred"], again["n_trained_nodes"]) == ("inferred", 0, len(ids))
    assert set(again["seconds"]) == {"graph", "infer", "write", "total"}
    off = _cfg()
    off.isne.enabled = False
    assert run_isne_stage(off, tmp_path, train=False)["mode"] == "disabled"  # only train=True overrides the switch


def test_rowwise_adagrad_is_pytorch_biggraphs_update() -> None:
    """Row-wise Adagrad against its formula, row by row: one squared-gradient scalar per row, rows
    without a gradient untouched; a sorted gradient whose coalesced flag autograd dropped is used
    as it is (same result as the coalesced one)."""
    from hades_gpu.isne.optim import RowwiseAdagrad

    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(12, 4))
    ref = p.detach().clone()
    acc = torch.zeros(12)
    opt = RowwiseAdagrad([p], lr=0.3, eps=1e-10)
    for step in range(4):
        rows = torch.unique(torch.randint(12, (5,), generator=torch.Generator().manual_seed(step)))
        vals = torch.randn(rows.numel(), 4)
        coalesced = step % 2 == 0
        p.grad = torch.sparse_coo_tensor(rows[None], vals.clone(), (12, 4), is_coalesced=coalesced, check_invariants=True)
        opt.step()
        for r, g in zip(rows.tolist(), vals):
            acc[r] += (g * g).mean()
            ref[r] -= 0.3 * g / (acc[r].sqrt() + 1e-10)
    torch.testing.assert_close(p.detach(), ref)
    torch.testing.assert_close(opt.state[p]["sum_sq"], acc)
    # an uncoalesced gradient with a repeated row is summed per row first (one update of row 3)
    before = p.detach().clone()
    p.grad = torch.sparse_coo_tensor(torch.tensor([[3, 3, 7]]), torch.ones(3, 4), (12, 4))  # sorted, not unique
    opt.step()
    g3 = torch.full((4,), 2.0)
    acc[3] += (g3 * g3).mean()
    acc[7] += 1.0
    torch.testing.assert_close(p.detach()[3], before[3] - 0.3 * g3 / (acc[3].sqrt() + 1e-10))
    torch.testing.assert_close(opt.state[p]["sum_sq"], acc)
    for bad in (0.0, -0.1):
        with pytest.raises(ValueError, match="lr must be > 0"):
            RowwiseAdagrad([p], lr=bad)


def test_negatives_from_a_pool_stay_uniform_and_bound_the_work() -> None:
    """Pooled negatives: marginally uniform over the candidates (chi-square over many steps), at
    most `pool` distinct nodes per step; pool 0 draws independently."""
    from hades_gpu.isne.trainer import draw_negatives

    cand = torch.arange(100, 150)
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(150)
    steps = 2000
    for _ in range(steps):
        neg = draw_negatives(cand, (20, 10), 16, g)
        assert torch.unique(neg).numel() <= 16 and bool(((neg >= 100) & (neg < 150)).all())
        counts += torch.bincount(neg.reshape(-1), minlength=150)
    # a shared pool makes one step's counts clustered (~12 draws per pool node), so the spread is
    # wider than a multinomial's: sd per candidate ~ sqrt(steps * 16/50 * 12.5^2) ~ 4% of the mean
    expected = steps * 200 / 50
    assert float((counts[100:] - expected).abs().max()) < 0.25 * expected
    assert counts[:100].sum() == 0
    free = draw_negatives(cand, (20, 10), 0, torch.Generator().manual_seed(1))
    assert torch.unique(free).numel() > 16


def test_time_budget_stops_at_a_batch_boundary_and_the_stage_derives_it(tmp_path: Path, caplog) -> None:
    """`isne.time_budget_s` stops training inside an epoch; by default the stage's budget is
    `time_budget_vs_embedding` x the last ingest's seconds per chunk x the graph's chunks; the
    per-epoch log line carries pairs/s and the ETA."""
    import logging

    from hades_gpu.isne.stage import training_budget_s

    ei, _ = sbm_graph(3000, 4, 0.004, 0.0004, seed=5)
    shape = dict(dim=8, batch_size=8, walk_length=6, walks_per_node=1, device="cpu")
    # the budget is a third of one epoch measured here, not a fixed time: a fast box finished a whole
    # epoch inside a fixed 0.5 s budget in CI
    epoch_s = train_isne(ei, 3000, IsneConfig(epochs=1, **shape)).train_seconds
    budget = max(0.05, epoch_s / 3)
    cfg = IsneConfig(epochs=50, time_budget_s=budget, **shape)
    with caplog.at_level(logging.INFO, logger="hades_gpu.isne.trainer"):
        r = train_isne(ei, 3000, cfg)
    assert r.stopped_by_budget and r.epochs_run == 1 and not r.stopped_early
    # train_seconds sums the epochs' own timers, which start a few microseconds after the budget's
    # clock: at the stop it may sit just under the budget (seen in CI: 0.168194 s vs 0.168210 s)
    assert 0 < r.history[0]["batches"] < 3000 // 8 and 0.95 * budget <= r.train_seconds < 30
    line = next(m for m in caplog.messages if m.startswith("isne epoch 1/50"))
    assert "pairs/s" in line and "ETA" in line and "budget 0 s" not in line and "val walk loss" in line
    # a caller who asked for 50 epochs hears, at warning level, that the budget ended it after 1
    stop = [r for r in caplog.records if "time budget" in r.getMessage() and r.levelno == logging.WARNING]
    # ... inside the epoch, and says so: "stopped after 1 of 50 epoch(s)" hid a partial epoch
    done, of = r.history[0]["batches"], r.history[0]["of_batches"]
    assert done < of <= -(-3000 // 8) and r.history[0]["partial"] and r.last_epoch_partial
    assert len(stop) == 1 and f"stopped in epoch 1 of 50, after {done} of {of} batches" in stop[0].getMessage()

    assert training_budget_s(IsneConfig(time_budget_s=7.0), tmp_path, 100) == 7.0
    assert training_budget_s(IsneConfig(), tmp_path, 100) is None  # no metrics.json
    (tmp_path / "metrics.json").write_text(json.dumps({"wall_s": 30.0, "chunks": 600}))
    assert training_budget_s(IsneConfig(), tmp_path, 900) == pytest.approx(45.0)
    assert training_budget_s(IsneConfig(time_budget_vs_embedding=2.0), tmp_path, 900) == pytest.approx(90.0)
    assert training_budget_s(IsneConfig(time_budget_vs_embedding=0.0), tmp_path, 900) is None
    (tmp_path / "metrics.json").write_text(json.dumps({"wall_s": 3.0, "chunks": 0}))  # a run with nothing new
    assert training_budget_s(IsneConfig(), tmp_path, 900) is None


def test_init_std_sets_the_starting_theta() -> None:
    ei, _ = sbm_graph(2000, 4, 0.004, 0.0004, seed=6)
    for std in (0.01, 1.0):
        r = train_isne(ei, 2000, IsneConfig(dim=32, init_std=std, device="cpu"), epochs=0)
        assert r.model.init_std == std
        assert float(r.model.theta.weight.detach().std()) == pytest.approx(std, rel=0.05)


@pytest.mark.parametrize("fanout", [1, 3])
def test_a_step_updates_only_the_sampled_neighbours_rows(fanout: int) -> None:
    """`isne.fanout` reaches the step: on a complete graph (degree 199) one step of 2 walks of 4
    nodes and a negative pool of 2 computes h() for at most 10 distinct nodes, so at most 10 x fanout
    θ rows may change; averaging every neighbour would change all 200."""
    n = 200
    src, dst = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
    keep = src != dst
    ei = torch.stack([src[keep], dst[keep]])
    cfg = IsneConfig(device="cpu", fanout=fanout, batch_size=2, walks_per_node=1, walk_length=4, context_size=2,
                     num_negatives=1, negative_pool=2, val_fraction=0.0, early_stop="off", time_budget_vs_embedding=0.0)
    res = train_isne(ei, n, cfg, epochs=1, max_batches_per_epoch=1)
    from hades_gpu.isne.model import ISNE

    # the θ training starts from: the trainer draws it from the seed on the CPU, as here
    start = ISNE(n, cfg.dim, init_std=cfg.init_std, generator=torch.Generator().manual_seed(cfg.seed)).theta.weight.detach()
    changed = int((res.model.theta.weight.detach() != start).any(dim=1).sum())
    assert 0 < changed <= 10 * fanout
    everyone = train_isne(ei, n, dataclasses.replace(cfg, fanout=n), epochs=1, max_batches_per_epoch=1)
    assert int((everyone.model.theta.weight.detach() != start).any(dim=1).sum()) == n


def test_damaged_model_or_vectors_are_rebuilt_with_one_line(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The model and the ISNE vectors derive from the chunks: a damaged one is said in one warning
    line and made again (model: trained anew; vectors: inferred from the model), never a traceback."""
    import logging

    from hades_gpu.isne.checkpoint import DamagedCheckpointError, load_checkpoint

    ids = _write_output(tmp_path, {f"d{i}.md": 3 + i % 4 for i in range(10)})
    run_isne_stage(_cfg(), tmp_path)
    model, vectors = tmp_path / "isne" / "model.safetensors", tmp_path / "isne" / "embeddings-s0.parquet"
    ids0, vecs0 = read_isne_embeddings(tmp_path)

    vectors.write_bytes(b"PAR1 cut short")
    with caplog.at_level(logging.WARNING, logger="hades_gpu.isne.stage"):
        m = run_isne_stage(_cfg(), tmp_path)
    said = [r.getMessage() for r in caplog.records if r.name == "hades_gpu.isne.stage"]
    assert len(said) == 1 and "damaged ISNE vectors file" in said[0] and str(vectors) in said[0], said
    assert m["mode"] == "inferred" and m["n_inferred"] == len(ids)
    ids1, vecs1 = read_isne_embeddings(tmp_path)
    assert ids1 == ids0 and np.allclose(vecs1, vecs0, atol=1e-5)  # the same neighbour means of the same θ

    model.write_bytes(model.read_bytes()[:100])
    with pytest.raises(DamagedCheckpointError, match="damaged ISNE model"):
        load_checkpoint(model)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="hades_gpu.isne.stage"):
        m = run_isne_stage(_cfg(), tmp_path)
    said = [r.getMessage() for r in caplog.records if r.name == "hades_gpu.isne.stage"]
    assert len(said) == 1 and "damaged ISNE model" in said[0] and "training a new model" in said[0], said
    assert m["mode"] == "trained" and sorted(load_checkpoint(model).node_ids) == sorted(ids)
    assert sorted(read_isne_embeddings(tmp_path)[0]) == sorted(ids)


def test_a_budget_that_runs_out_at_an_epoch_boundary_is_said_too(caplog) -> None:
    """On a small corpus an epoch is one batch: the budget always ran out between epochs, where the
    loop left without the warning a caller who asked for more epochs is owed."""
    import logging

    ei, _ = sbm_graph(200, 2, 0.05, 0.005, seed=1)
    cfg = IsneConfig(dim=8, epochs=50, batch_size=512, walk_length=6, walks_per_node=1, device="cpu",
                     time_budget_s=1e-9, early_stop="off", val_fraction=0.0)
    with caplog.at_level(logging.WARNING, logger="hades_gpu.isne.trainer"):
        r = train_isne(ei, 200, cfg)
    assert r.stopped_by_budget and r.epochs_run == 0
    said = [m for m in caplog.messages if "time budget" in m]
    assert len(said) == 1 and "stopped after 0 of 50 epoch(s)" in said[0], caplog.messages



def test_a_budget_shorter_than_one_batch_keeps_the_earlier_model_and_saves_no_untrained_one(tmp_path: Path) -> None:
    """`hades-isne isne.time_budget_s=1e-6` trained no batch, then saved θ's random start over the
    trained model (and inferred every vector from it), reporting `mode: trained`, exit 0."""
    ids = _write_output(tmp_path, {f"d{i}.md": 3 + i % 4 for i in range(12)})
    first = run_isne_stage(_cfg(), tmp_path, train=True)
    assert first["mode"] == "trained"
    model = tmp_path / "isne" / "model.safetensors"
    model_bytes = model.read_bytes()
    vec_ids, vecs = read_isne_embeddings(tmp_path)
    cfg = _cfg()
    cfg.isne.time_budget_s = 1e-9
    m = run_isne_stage(cfg, tmp_path, train=True)
    assert (m["mode"], m["kept_model"], m["pos_pairs"], m["epochs_run"]) == ("untrained", True, 0, 0)
    assert model.read_bytes() == model_bytes
    again_ids, again = read_isne_embeddings(tmp_path)
    assert again_ids == vec_ids and np.array_equal(again, vecs)
    result = ISNETrainingPipeline(cfg).train(corpus_path=tmp_path)
    assert "ended training before its first batch: the earlier model is kept" in result.summary()
    assert model.read_bytes() == model_bytes
    # no earlier model: none is written, every vector is 0
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    _write_output(fresh, {f"d{i}.md": 3 + i % 4 for i in range(12)})
    m = run_isne_stage(cfg, fresh, train=True)
    assert (m["mode"], m["kept_model"], m["model_path"]) == ("untrained", False, None)
    assert not (fresh / "isne" / "model.safetensors").exists()
    got_ids, got = read_isne_embeddings(fresh)
    assert sorted(got_ids) == sorted(ids) and not got.any()


def test_the_training_bar_counts_the_time_budget_and_ends_saying_how_training_ended():
    """The bar said "epoch 1/50 ... ETA 0:07:07" while a 6 s budget stopped training, and its last frame
    stayed so; an early stop left it part-way with nothing said."""
    import io
    import time

    from rich.console import Console

    from hades_gpu.isne.progress import TrainingProgress

    out = io.StringIO()
    bar = TrainingProgress("on", console=Console(file=out, force_terminal=True, width=120), budget_s=5.0)
    bar._started = time.monotonic() - 10.0  # 10 batches in 10 s with a 5 s budget: no more batches to come
    bar.update(1, 10, 20, 50)
    task = bar._bar.tasks[0]
    assert task.total == 10 and task.completed == 10  # not 1000 batches and minutes of ETA
    bar.stop("time budget reached")
    assert "epoch 1/50, batch 10/20: time budget reached" in out.getvalue()
