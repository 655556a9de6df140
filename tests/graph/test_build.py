"""Chunk graph from a small synthetic ingest output (written here following docs/CONTRACTS.md)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from hades_gpu.config import GraphConfig
from hades_gpu.graph import EDGE_TYPES, build_graph, load_graph, symmetrize
from hades_gpu.graph.references import ReferenceResolver
from hades_gpu.records import stable_id

DIM = 384


def write_output(root: Path, docs: list[dict], shard_split: int = 2, rng_seed: int = 0) -> dict[str, list[str]]:
    """Write chunks/documents part files (split over `shard_split` parts) + manifest.

    `docs`: dicts with rel_path, language, modality, n_chunks, references, and optional
    `emb` (n_chunks, DIM) array. Returns {rel_path: [chunk ids in ordinal order]}.
    """
    rng = np.random.default_rng(rng_seed)
    (root / "chunks").mkdir(parents=True)
    (root / "documents").mkdir(parents=True)
    ids: dict[str, list[str]] = {}
    parts = []
    manifest_docs = {}
    groups = [docs[i::shard_split] for i in range(shard_split)]
    for p, group in enumerate(groups):
        if not group:
            continue
        name = f"part-s0-{p:05d}"
        crow: dict[str, list] = {k: [] for k in ("doc_id", "chunk_id", "path", "modality", "ordinal",
                                                 "char_start", "char_end", "n_tokens", "text", "embedding")}
        drow: dict[str, list] = {k: [] for k in ("doc_id", "path", "rel_path", "modality", "language",
                                                 "content_hash", "n_chunks", "references")}
        for d in group:
            doc_id = stable_id(d["rel_path"])
            chash = stable_id("content", d["rel_path"])
            emb = d.get("emb")
            if emb is None:
                emb = rng.normal(size=(d["n_chunks"], DIM)).astype(np.float32)
                emb /= np.linalg.norm(emb, axis=1, keepdims=True)
            ids[d["rel_path"]] = []
            for k in range(d["n_chunks"]):
                cid = stable_id(doc_id, chash, str(k))
                ids[d["rel_path"]].append(cid)
                crow["doc_id"].append(doc_id)
                crow["chunk_id"].append(cid)
                crow["path"].append(f"/corpus/{d['rel_path']}")
                crow["modality"].append(d["modality"])
                crow["ordinal"].append(k)
                crow["char_start"].append(k * 100)
                crow["char_end"].append(k * 100 + 100)
                crow["n_tokens"].append(20)
                crow["text"].append(f"chunk {k} of {d['rel_path']}")
                crow["embedding"].append(emb[k].tolist())
            drow["doc_id"].append(doc_id)
            drow["path"].append(f"/corpus/{d['rel_path']}")
            drow["rel_path"].append(d["rel_path"])
            drow["modality"].append(d["modality"])
            drow["language"].append(d["language"])
            drow["content_hash"].append(chash)
            drow["n_chunks"].append(d["n_chunks"])
            drow["references"].append(d.get("references", []))
            manifest_docs[d["rel_path"]] = {"doc_id": doc_id, "content_hash": chash,
                                            "n_chunks": d["n_chunks"], "part": name}
        ctable = pa.table({
            **{k: crow[k] for k in ("doc_id", "chunk_id", "path", "modality")},
            "ordinal": pa.array(crow["ordinal"], pa.int32()),
            "char_start": pa.array(crow["char_start"], pa.int64()),
            "char_end": pa.array(crow["char_end"], pa.int64()),
            "n_tokens": pa.array(crow["n_tokens"], pa.int32()),
            "text": crow["text"],
            "embedding": pa.array(crow["embedding"], pa.list_(pa.float32(), DIM)),
        })
        dtable = pa.table({
            **{k: drow[k] for k in ("doc_id", "path", "rel_path", "modality", "language", "content_hash")},
            "n_chunks": pa.array(drow["n_chunks"], pa.int32()),
            "references": pa.array(drow["references"], pa.list_(pa.string())),
        })
        pq.write_table(ctable, root / "chunks" / f"{name}.parquet")
        pq.write_table(dtable, root / "documents" / f"{name}.parquet")
        parts.append(name)
    (root / "manifest.json").write_text(json.dumps({"version": 1, "shard": "s0", "parts": parts,
                                                    "documents": manifest_docs}))
    return ids


CORPUS = [
    {"rel_path": "pkg/__init__.py", "language": "python", "modality": "code", "n_chunks": 1, "references": []},
    {"rel_path": "pkg/core.py", "language": "python", "modality": "code", "n_chunks": 3,
     "references": ["pkg.util", "os", "numpy"]},
    {"rel_path": "pkg/util.py", "language": "python", "modality": "code", "n_chunks": 2, "references": []},
    {"rel_path": "app/main.py", "language": "python", "modality": "code", "n_chunks": 2,
     "references": ["pkg.core", "pkg.util.helper", "pkg"]},
    {"rel_path": "docs/guide.md", "language": "markdown", "modality": "prose", "n_chunks": 6,
     "references": ["../README.md#intro", "install", "https://example.com/x.md", "#local", "missing.md"]},
    {"rel_path": "docs/install.md", "language": "markdown", "modality": "prose", "n_chunks": 1, "references": []},
    {"rel_path": "README.md", "language": "markdown", "modality": "prose", "n_chunks": 2,
     "references": ["docs/guide.md"]},
]


def _edges(out: Path) -> pa.Table:
    return pq.read_table(out / "edges.parquet")


def _pairs(t: pa.Table, kind: str) -> set[tuple[str, str]]:
    rows = t.filter(pa.compute.equal(t.column("type"), kind))
    return set(zip(rows.column("src_chunk_id").to_pylist(), rows.column("dst_chunk_id").to_pylist()))


def test_graph_from_synthetic_output_has_expected_edges(tmp_path: Path) -> None:
    ids = write_output(tmp_path, CORPUS)
    cfg = GraphConfig(knn_k=2, knn_threshold=-1.0, same_document_fanout=2, knn_block_size=4)
    g = build_graph(tmp_path, cfg)
    t = _edges(tmp_path)
    assert t.schema.names == ["src_chunk_id", "dst_chunk_id", "type", "weight"]
    assert set(t.column("type").to_pylist()) == set(EDGE_TYPES)
    n = sum(d["n_chunks"] for d in CORPUS)
    assert g.num_nodes == n

    seq = _pairs(t, "sequence")
    guide = ids["docs/guide.md"]
    assert seq >= {(guide[k], guide[k + 1]) for k in range(5)}
    assert len(seq) == sum(d["n_chunks"] - 1 for d in CORPUS)

    same = _pairs(t, "same_document")
    # 6-chunk doc, fanout 2: each chunk links to exactly 2 others of its document, spread out
    for k, c in enumerate(guide):
        outs = {d for s, d in same if s == c}
        assert len(outs) == 2 and outs <= set(guide) - {c}
    assert all(not (s in ids["docs/install.md"]) for s, _ in same)  # 1-chunk doc: nothing

    ref = _pairs(t, "reference")
    core, util, init, main = ids["pkg/core.py"], ids["pkg/util.py"], ids["pkg/__init__.py"], ids["app/main.py"]
    expected = {(c, util[0]) for c in core}  # import pkg.util
    expected |= {(c, core[0]) for c in main} | {(c, util[0]) for c in main} | {(c, init[0]) for c in main}
    expected |= {(c, ids["README.md"][0]) for c in guide} | {(c, ids["docs/install.md"][0]) for c in guide}
    expected |= {(c, guide[0]) for c in ids["README.md"]}
    assert ref == expected  # os/numpy/URLs/anchors/missing files resolve to nothing

    knn = t.filter(pa.compute.equal(t.column("type"), "knn"))
    assert knn.num_rows == 2 * n  # threshold -1: exactly k per chunk
    assert all(s != d for s, d in _pairs(t, "knn"))

    data = load_graph(tmp_path)
    assert data.num_nodes == n and data.chunk_ids == sorted(data.chunk_ids)
    ei = data.edge_index
    assert ei.shape[0] == 2 and data.edge_attr.shape == (ei.shape[1],) and data.edge_type.shape == (ei.shape[1],)
    # undirected, deduplicated, no self loops
    pairs = set(map(tuple, ei.T.tolist()))
    assert len(pairs) == ei.shape[1]
    assert all((d, s) in pairs for s, d in pairs)
    assert all(s != d for s, d in pairs)
    # sequence edge kept (weight 1.0) where same_document duplicates it (weight 0.5)
    pos = {c: i for i, c in enumerate(data.chunk_ids)}
    a, b = pos[guide[0]], pos[guide[1]]
    j = [k for k, (s, d) in enumerate(ei.T.tolist()) if (s, d) == (a, b)][0]
    assert data.edge_type[j].item() == EDGE_TYPES.index("sequence") and data.edge_attr[j].item() == 1.0


def test_graph_disabled_types_and_uncommitted_parts(tmp_path: Path) -> None:
    ids = write_output(tmp_path, CORPUS)
    # an interrupted write: a part file the manifest does not name is ignored
    stray = pq.read_table(next((tmp_path / "chunks").glob("*.parquet")))
    stray = stray.set_column(1, "chunk_id", pa.array(["x" + c for c in stray.column("chunk_id").to_pylist()]))
    pq.write_table(stray, tmp_path / "chunks" / "part-s0-00099.parquet")
    cfg = GraphConfig(knn=False, references=False, same_document=False)
    g = build_graph(tmp_path, cfg)
    assert g.num_nodes == sum(len(v) for v in ids.values())
    assert set(g.counts_by_type()) == set(EDGE_TYPES)
    assert g.counts_by_type()["sequence"] == g.num_edges


def test_reference_resolver_rules() -> None:
    r = ReferenceResolver(["src/pkg/a.py", "src/pkg/sub/__init__.py", "vendor/json.py", "tests/test_a.py",
                           "docs/x/index.md", "notes.rst"])
    assert r.resolve_module("pkg.a", "src/pkg/sub/__init__.py") == [0]
    assert r.resolve_module("pkg.sub", "tests/test_a.py") == [1]  # >= 2 components: suffix match kept
    assert r.resolve_module("json", "src/pkg/a.py") == []  # bare name, not under an ancestor prefix
    assert r.resolve_module("pkg.a.func", "tests/test_a.py") == [0]  # from pkg.a import func
    assert r.resolve(".a", 1, "python") == []  # pkg/sub/a does not exist; the package itself is self
    assert r.resolve_module("..a", "src/pkg/sub/__init__.py") == [0]
    assert r.resolve_link("x/", "docs/guide.md") == [4]
    assert r.resolve_link("../notes", "docs/guide.md") == [5]
    assert r.resolve_link("mailto:me@x.org", "docs/guide.md") == []


def test_symmetrize_keeps_heaviest_edge() -> None:
    s, d, t, w = symmetrize(torch.tensor([0, 1, 2]), torch.tensor([1, 0, 2]), torch.tensor([3, 0, 0]),
                            torch.tensor([0.9, 1.0, 1.0]), 3)
    assert s.tolist() == [0, 1] and d.tolist() == [1, 0]
    assert t.tolist() == [0, 0] and w.tolist() == [1.0, 1.0]


def test_knn_edge_weights_follow_their_formula(tmp_path: Path) -> None:
    """weight = graph.knn_weight_scale * cosine(stored embeddings), recomputed here in float64, and
    the neighbours are each chunk's top-k cosine >= threshold (self excluded)."""
    rng = np.random.default_rng(4)
    docs = []
    for i, d in enumerate(CORPUS):
        base = rng.normal(size=DIM)
        emb = base + 0.8 * rng.normal(size=(d["n_chunks"], DIM))  # related within a document
        docs.append({**d, "emb": (emb * rng.uniform(0.5, 3.0, (d["n_chunks"], 1))).astype(np.float32)})  # not unit norm
    write_output(tmp_path, docs)
    cfg = GraphConfig(knn_k=3, knn_threshold=0.2, knn_weight_scale=0.7, knn_block_size=5, sequence=False,
                      same_document=False, references=False)
    build_graph(tmp_path, cfg)
    chunks = pq.read_table(tmp_path / "chunks").to_pandas()
    emb = {c: np.asarray(e, np.float64) for c, e in zip(chunks.chunk_id, chunks.embedding)}
    t = _edges(tmp_path).to_pandas()
    assert set(t.type) == {"knn"}
    cos = lambda a, b: float(emb[a] @ emb[b] / np.linalg.norm(emb[a]) / np.linalg.norm(emb[b]))  # noqa: E731
    for row in t.itertuples():
        assert row.weight == pytest.approx(0.7 * cos(row.src_chunk_id, row.dst_chunk_id), abs=1e-5)
    for src in chunks.chunk_id:
        others = sorted(((cos(src, o), o) for o in chunks.chunk_id if o != src), reverse=True)
        want = {o for c, o in others[:3] if c >= 0.2}
        assert set(t.dst_chunk_id[t.src_chunk_id == src]) == want
    assert len(t) > 10 and (t.weight < 0.7).all()


def test_identical_chunks_weigh_at_most_the_scale_and_a_one_chunk_log_says_why_no_knn(tmp_path: Path, caplog) -> None:
    """Identical chunks' kNN edges weighed 1.0000002 (a float32 cosine above 1), and a one-chunk
    output's graph log said "kNN off" with kNN on."""
    import logging

    rng = np.random.default_rng(2)  # a unit vector whose float32 cosine with itself is 1.0000001
    same = rng.normal(size=DIM).astype(np.float32)
    same /= np.linalg.norm(same)
    docs = [{**d, "n_chunks": 1, "emb": same[None, :].copy()} for d in CORPUS[:5]]
    write_output(tmp_path / "same", docs)
    build_graph(tmp_path / "same", GraphConfig(knn_k=4, sequence=False, same_document=False, references=False))
    weights = _edges(tmp_path / "same").column("weight").to_numpy()
    assert len(weights) == 20 and (weights <= 1.0).all() and (weights > 0.999).all(), weights.max()
    write_output(tmp_path / "one", [{**CORPUS[0], "n_chunks": 1}])
    with caplog.at_level(logging.INFO, logger="hades_gpu.graph.build"):
        build_graph(tmp_path / "one", GraphConfig())
    assert "kNN none (1 chunk(s)" in caplog.text and "kNN off" not in caplog.text


def test_each_edge_type_carries_its_configured_weight(tmp_path: Path) -> None:
    """Distinct weights per type, none the default: a swapped or ignored weight setting shows."""
    write_output(tmp_path, CORPUS)
    cfg = GraphConfig(sequence_weight=0.31, same_document_weight=0.17, reference_weight=0.73, knn=False,
                      same_document_fanout=2)
    build_graph(tmp_path, cfg)
    t = _edges(tmp_path).to_pandas()
    got = {kind: sorted({round(float(w), 6) for w in group.weight}) for kind, group in t.groupby("type")}
    assert got == {"sequence": [0.31], "same_document": [0.17], "reference": [0.73]}


def test_load_graph_is_edges_parquet_exactly_directed_and_undirected(tmp_path: Path) -> None:
    """Every row of edges.parquet comes back with its weight and type (directed); undirected adds the
    reverses, keeps the heaviest edge per pair; stale rows and unknown types are handled."""
    ids = write_output(tmp_path, CORPUS)
    build_graph(tmp_path, GraphConfig(knn_k=2, knn_threshold=-1.0, same_document_fanout=2, sequence_weight=0.9,
                                      same_document_weight=0.4, reference_weight=0.7))
    t = _edges(tmp_path).to_pandas()
    directed = load_graph(tmp_path, undirected=False)
    order = directed.chunk_ids
    assert order == sorted(c for v in ids.values() for c in v) and directed.num_nodes == len(order)
    got = sorted(zip((order[i] for i in directed.edge_index[0].tolist()), (order[i] for i in directed.edge_index[1].tolist()),
                     (EDGE_TYPES[i] for i in directed.edge_type.tolist()), np.round(directed.edge_attr.numpy(), 5)))
    want = sorted(zip(t.src_chunk_id, t.dst_chunk_id, t.type, np.round(t.weight.to_numpy(np.float32), 5)))
    assert got == want
    assert directed.edge_index.dtype == torch.long and directed.edge_attr.dtype == torch.float32
    und = load_graph(tmp_path)
    best: dict[tuple[int, int], float] = {}
    for (s, d), w in zip(directed.edge_index.T.tolist(), directed.edge_attr.tolist()):
        for key in ((s, d), (d, s)):
            if s != d:
                best[key] = max(best.get(key, -1.0), w)
    assert {(s, d): w for (s, d), w in zip(und.edge_index.T.tolist(), und.edge_attr.tolist())} == pytest.approx(best)
    # a stale row (a chunk no longer committed) is dropped; an unknown type is an error naming it
    stale = pa.table({"src_chunk_id": [order[0], "gone"], "dst_chunk_id": [order[1], order[0]],
                      "type": ["sequence", "sequence"], "weight": pa.array([0.5, 0.5], pa.float32())})
    pq.write_table(stale, tmp_path / "edges.parquet")
    g = load_graph(tmp_path, undirected=False)
    assert g.edge_index.tolist() == [[0], [1]] and g.edge_attr.tolist() == [0.5]
    pq.write_table(stale.set_column(2, "type", pa.array(["sequence", "telepathy"])), tmp_path / "edges.parquet")
    with pytest.raises(ValueError, match="telepathy"):
        load_graph(tmp_path)
    (tmp_path / "edges.parquet").unlink()
    with pytest.raises(FileNotFoundError, match="no chunk graph"):
        load_graph(tmp_path)
