"""ISNE on the chunk graph of a real corpus: cost per epoch, and what the edge weights change.

The corpus is the standard library's packages (`benchmarks.corpus.build_package_corpus`), so each
chunk has a label no edge was built from directly: its package (the first folder of its path). It is
ingested with the real model (untimed here; the ingest's own wall time is reported), the chunk graph
built (sequence, same_document, reference and kNN edges, `graph.*_weight`), and ISNE trained twice
with the same seed, epochs and walks: with the edge weights (`isne.edge_weights=true`: weighted walks
and neighbour means) and without. Quality is the paper's protocol on the labelled chunks: 15 nearest
neighbours by dot product, majority vote, 5-fold cross-validation; the MiniLM text vectors of the
same chunks are the reference. Early stopping and the time budget are off, so both runs get the same
number of epochs.

New documents (`inductive`): the whole chunks of every seventh document (by sorted document id) are
left out of training, as documents added after it, and get their vectors by inference
(`hades_gpu.isne.inference`) with no rounds through new neighbours (the paper's) and with
`isne.infer_rounds`; they are classified against the training chunks' vectors by the same 15-NN vote.
"""

from __future__ import annotations

import dataclasses
import resource
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hades_gpu.config import PipelineConfig


def _labels(out: Path, corpus: Path, chunk_ids: np.ndarray, min_per_class: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(row indices of labelled chunks, their class ids, class names): package = first path folder;
    files at the top level and packages with fewer than `min_per_class` chunks stay unlabelled."""
    import pyarrow.parquet as pq

    from hades_gpu.store.reader import committed_part_files

    files = committed_part_files(out, "chunks")
    t = pq.ParquetDataset(files).read(columns=["chunk_id", "path"])
    root = str(Path(corpus).resolve()) + "/"
    rel = [p[len(root):] if p.startswith(root) else p for p in t.column("path").to_pylist()]
    pkg_of = {c: (p.split("/")[0] if "/" in p else None) for c, p in zip(t.column("chunk_id").to_pylist(), rel)}
    pkgs = np.array([pkg_of.get(c) for c in chunk_ids.tolist()], dtype=object)
    names, counts = np.unique(pkgs[pkgs != None], return_counts=True)  # noqa: E711 (numpy comparison)
    keep = [str(n) for n, c in zip(names, counts) if c >= min_per_class]
    code = {n: i for i, n in enumerate(keep)}
    rows = np.array([i for i, p in enumerate(pkgs) if p in code], dtype=np.int64)
    return rows, np.array([code[pkgs[i]] for i in rows], dtype=np.int64), keep


def run(cfg: PipelineConfig, work: Path, megabytes: float = 2.0, epochs: int = 10, k: int = 15,
        folds: int = 5, min_per_class: int = 20, embedder: Any = None) -> dict[str, Any]:
    """Build the corpus under `work`, ingest it (with `embedder`, default: built from `cfg`), then
    train and score ISNE with and without weights."""
    from hades_gpu.benchmarks.corpus import build_package_corpus
    from hades_gpu.pipelines.ingest import TextParallelPipeline

    work = Path(work)
    sizes = build_package_corpus(work / "corpus", megabytes)
    out = work / "dataset"
    if out.exists():
        shutil.rmtree(out)  # a fresh ingest: a resumed one would time nothing
    ingest_cfg = dataclasses.replace(cfg, isne=dataclasses.replace(cfg.isne, enabled=False))
    ingested = TextParallelPipeline(ingest_cfg, embedder=embedder).process_batch([work / "corpus"], output=out)

    result = score_output(cfg, out, work / "corpus", epochs, k, folds, min_per_class)
    result["corpus"] = {"packages": len(sizes), "bytes": sum(sizes.values()),
                        "documents": ingested.documents_ingested + ingested.documents_unchanged}
    result["ingest_wall_s"] = float(ingested.metrics.get("wall_s", 0.0))
    return result


def score_output(cfg: PipelineConfig, out: Path, corpus: Path, epochs: int = 10, k: int = 15, folds: int = 5,
                 min_per_class: int = 20) -> dict[str, Any]:
    """On an ingest output of `corpus`: the chunk graph, then ISNE with and without edge weights
    (same seed and epochs): s/epoch, pairs/s, peak RSS, and 15-NN accuracy on the first-folder labels
    (None when fewer than two folders have `min_per_class` chunks)."""
    from hades_gpu.graph.build import build_graph
    from hades_gpu.graph.io import load_chunk_table
    from hades_gpu.isne.evaluation import knn_cv_accuracy
    from hades_gpu.isne.inference import neighbor_mean
    from hades_gpu.isne.sampling import CSRGraph
    from hades_gpu.isne.trainer import train_isne

    from hades_gpu.isne.stage import stage_devices

    t = time.perf_counter()
    graph = build_graph(out, dataclasses.replace(cfg.graph, device=str(stage_devices(cfg)[0])))  # as the stage does
    graph_s = time.perf_counter() - t
    data = graph.to_data(undirected=True)
    n = graph.num_nodes
    rows, y, classes = _labels(out, corpus, graph.chunk_ids, min_per_class)
    labelled = len(classes) >= 2

    def accuracy(x: torch.Tensor) -> Any:
        return knn_cv_accuracy(x[rows], torch.as_tensor(y), k, folds, cfg.seed) if labelled else None

    text = torch.as_tensor(load_chunk_table(out).embedding)  # same order as the graph (chunk id)
    result: dict[str, Any] = {
        "nodes": n, "edges": int(data.edge_index.shape[1] // 2), "edges_by_type": graph.counts_by_type(),
        "labelled_chunks": int(rows.size), "classes": classes, "graph_seconds": graph_s,
        "text_accuracy": accuracy(text),
        "runs": {},
    }
    if labelled:
        result["inductive"] = _new_documents(cfg, out, data, n, rows, y, epochs, k)
    for weighted in (True, False):
        icfg = dataclasses.replace(cfg.isne, edge_weights=weighted, early_stop="off", time_budget_s=None,
                                   time_budget_vs_embedding=0.0, val_fraction=0.0, device="cpu")
        t = time.perf_counter()
        res = train_isne(data.edge_index, n, icfg, epochs=epochs, edge_weight=data.edge_attr)
        seconds = time.perf_counter() - t
        full = CSRGraph.from_edge_index(data.edge_index, n, edge_weight=data.edge_attr if weighted else None)
        x = neighbor_mean(res.model.theta.weight.detach(), full)
        result["runs"]["weighted" if weighted else "unweighted"] = {
            "accuracy": accuracy(x),
            "epochs": res.epochs_run, "seconds": seconds, "vector_sum": float(x.double().abs().sum()),
            "epoch_seconds": res.train_seconds / max(res.epochs_run, 1), "pairs_per_s": res.pairs_per_s,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        }
    return result


def _new_documents(cfg: PipelineConfig, out: Path, data: Any, n: int, rows: np.ndarray, y: np.ndarray, epochs: int,
                   k: int) -> dict[str, Any]:
    """Train (weighted) without every seventh document's chunks, infer them with 0 and with
    `isne.infer_rounds` rounds, and classify the labelled ones against the training chunks."""
    from hades_gpu.graph.io import load_chunk_table
    from hades_gpu.isne.evaluation import knn_cv_accuracy, knn_predict
    from hades_gpu.isne.inference import neighbor_mean
    from hades_gpu.isne.sampling import CSRGraph
    from hades_gpu.isne.trainer import train_isne

    docs = load_chunk_table(out, with_embeddings=False).doc_ids  # graph order (chunk id)
    ordered = sorted(set(docs.tolist()))
    held_docs = set(ordered[::7])
    held = torch.as_tensor(np.fromiter((d in held_docs for d in docs.tolist()), dtype=bool, count=n))
    icfg = dataclasses.replace(cfg.isne, edge_weights=True, early_stop="off", time_budget_s=None,
                               time_budget_vs_embedding=0.0, val_fraction=0.0, device="cpu")
    kept = ~(held[data.edge_index[0]] | held[data.edge_index[1]])  # edges with neither end held out
    res = train_isne(data.edge_index[:, kept], n, icfg, epochs=epochs, edge_weight=data.edge_attr[kept])
    theta = res.model.theta.weight.detach()
    full = CSRGraph.from_edge_index(data.edge_index, n, edge_weight=data.edge_attr)
    known = torch.where(held, -1, torch.arange(n))
    labels = torch.full((n,), -1, dtype=torch.long)
    labels[torch.as_tensor(rows)] = torch.as_tensor(y)
    train = ((~held) & (labels >= 0)).nonzero().squeeze(1)
    test = (held & (labels >= 0)).nonzero().squeeze(1)
    report: dict[str, Any] = {"held_out_documents": len(held_docs), "held_out_chunks": int(held.sum()),
                              "labelled_held_out": int(test.numel())}
    x_train = None
    for rounds in sorted({0, int(cfg.isne.infer_rounds)}):
        x = neighbor_mean(theta, full, known=known, rounds=rounds)
        if x_train is None:  # training chunks' vectors do not depend on the rounds
            x_train = x[train]
            report["train_accuracy"] = knn_cv_accuracy(x_train, labels[train], k, 5, cfg.seed)
        pred = knn_predict(x_train, labels[train], x[test], k, int(labels.max()) + 1)
        acc = float((pred == labels[test]).float().mean())
        report[f"rounds_{rounds}"] = {"accuracy": acc, "ratio": acc / report["train_accuracy"],
                                      "zero_vectors": int((x[held].abs().sum(1) == 0).sum())}
    return report


def _acc(a: Any) -> str:
    return "-" if a is None else f"{a:.3f}"


def table(r: dict[str, Any]) -> str:
    head = ("vectors", "15-NN package accuracy (5-fold)", "s/epoch", "pairs/s", "peak RSS MB")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head),
             f"| MiniLM text vectors (reference) | {_acc(r['text_accuracy'])} | - | - | - |"]
    for name, run_ in r["runs"].items():
        lines.append(f"| ISNE, {name} edges | {_acc(run_['accuracy'])} | {run_['epoch_seconds']:.2f} | "
                     f"{run_['pairs_per_s']:,.0f} | {run_['peak_rss_mb']:.0f} |")
    for key, got in sorted((r.get("inductive") or {}).items()):
        if key.startswith("rounds_"):
            lines.append(f"| ISNE, new documents inferred, infer_rounds={key[7:]} | {_acc(got['accuracy'])} "
                         f"(/ training {got['ratio']:.3f}; {got['zero_vectors']} zero vectors) | - | - | - |")
    source = (f"{r['corpus']['documents']} stdlib files in {r['corpus']['packages']} packages"
              if "corpus" in r else "the corpus")
    lines.append(f"\nchunk graph of {source}: {r['nodes']:,} chunks, {r['edges']:,} edges {r['edges_by_type']}, "
                 f"{r['labelled_chunks']:,} labelled in {len(r['classes'])} packages")
    return "\n".join(lines)
