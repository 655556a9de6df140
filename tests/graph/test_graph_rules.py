"""The graph's rules spelled out case by case: reference resolution, the same-document offsets, the
edge cases of the readers (empty outputs, missing columns, variable-length and sliced embedding
columns) and of `load_graph`. Each expectation is written from the documented rule, not from the
code's output, so a one-character change to a rule fails here."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from hades_gpu.config import GraphConfig
from hades_gpu.graph import EDGE_TYPES, build_graph, load_graph, symmetrize
from hades_gpu.graph.build import build_chunk_graph, make_data, reference_edges, same_document_edges
from hades_gpu.graph.io import ChunkTable, load_chunk_table
from hades_gpu.graph.references import ReferenceResolver, is_python

from tests.graph.test_build import CORPUS, write_output

# ------------------------------------------------------------------------------ reference resolution
PATHS = ["src/pkg/a.py", "src/pkg/sub/__init__.py", "vendor/json.py", "tests/test_a.py", "docs/x/index.md",
         "notes.rst", "stubs/typed.pyi", "docs/guide.md", "docs/space name.md", "README.md", "docs/y/README.md",
         "top.py", "__init__.py", "docs/sub/deep.md", "vendor/helpers.py", "src/pkg/__init__.py"]
IDX = {p: i for i, p in enumerate(PATHS)}

LINK_CASES = [  # (target, linking document, expected rel_path or None)
    ("x/", "docs/guide.md", "docs/x/index.md"),
    ("x", "docs/guide.md", "docs/x/index.md"),
    ("y", "docs/guide.md", "docs/y/README.md"),
    ("../notes", "docs/guide.md", "notes.rst"),
    ("<../notes.rst>", "docs/guide.md", "notes.rst"),  # angle-bracket link destination
    ("< ../notes.rst >", "docs/guide.md", "notes.rst"),
    ("<../notes.rst", "docs/guide.md", None),  # not a bracketed destination: the "<" is part of the name
    ("../notes.rst>", "docs/guide.md", None),
    ("guide.md \"a title\"", "docs/guide.md", "docs/guide.md"),
    ("space%20name.md", "docs/guide.md", "docs/space name.md"),
    ("sub/deep.md#part", "docs/guide.md", "docs/sub/deep.md"),
    ("sub/deep.md?x=1", "docs/guide.md", "docs/sub/deep.md"),
    ("sub/deep.md?x=1#a?b", "docs/guide.md", "docs/sub/deep.md"),
    ("sub/deep.md#a#b", "docs/guide.md", "docs/sub/deep.md"),
    ("sub/deep.md?a?b", "docs/guide.md", "docs/sub/deep.md"),
    ("/README.md", "docs/sub/deep.md", "README.md"),  # rooted at the corpus
    ("//README.md", "docs/guide.md", None),  # scheme-relative URL
    ("/notes", "docs/sub/deep.md", "notes.rst"),
    ("/docs/x/", "README.md", "docs/x/index.md"),
    ("../..", "docs/sub/deep.md", "README.md"),  # the corpus root folder through its README
    (".", "README.md", "README.md"),
    ("./", "docs/guide.md", None),  # docs/ has no README or index
    ("../../..", "docs/sub/deep.md", None),  # outside the corpus
    ("../../../README.md", "docs/sub/deep.md", None),
    ("#local", "docs/guide.md", None),
    ("https://example.com/README.md", "docs/guide.md", None),
    ("mailto:me@x.org", "docs/guide.md", None),
    ("  ", "docs/guide.md", None),
    ("<>", "docs/guide.md", None),
    ("?q", "docs/guide.md", None),
    ("missing.md", "docs/guide.md", None),
]


@pytest.mark.parametrize("target,linker,want", LINK_CASES)
def test_link_resolution_rules(target: str, linker: str, want: str | None) -> None:
    r = ReferenceResolver(PATHS)
    assert r.resolve_link(target, linker) == ([IDX[want]] if want else [])


MODULE_CASES = [  # (name, importing document, expected rel_paths)
    ("pkg.a", "src/pkg/sub/__init__.py", ["src/pkg/a.py"]),
    ("pkg.sub", "tests/test_a.py", ["src/pkg/sub/__init__.py"]),
    ("json", "src/pkg/a.py", []),  # bare name whose prefix is not an ancestor
    # a standard-library name: Python 3 imports the standard library's (`from types import X` in a
    # package holding types.py linked every chunk to it)
    ("json", "vendor/json.py", []),
    ("json", "vendor/deeper/x.py", []),
    ("json.decoder", "vendor/deeper/x.py", []),
    ("helpers", "vendor/json.py", ["vendor/helpers.py"]),  # a name of the project's own: beside it
    ("helpers", "vendor/deeper/x.py", ["vendor/helpers.py"]),
    ("helpers", "vendorx/x.py", []),  # "vendor" is not a folder prefix of "vendorx"
    ("pkg", "tests/test_a.py", ["src/pkg/__init__.py"]),  # a src/ layout's package by its bare name
    ("pkg.thing", "tests/test_a.py", ["src/pkg/__init__.py"]),  # from pkg import thing
    ("helpers", "tests/test_a.py", []),  # a plain module elsewhere is not it
    ("pkg.a.func", "tests/test_a.py", ["src/pkg/a.py"]),
    ("typed", "stubs/x.py", ["stubs/typed.pyi"]),
    ("top", "anywhere/x.py", ["top.py"]),  # exact module path wins
    ("top.name", "anywhere/x.py", ["top.py"]),
    ("..a", "src/pkg/sub/__init__.py", ["src/pkg/a.py"]),
    ("..sub", "src/pkg/a.py", []),  # two dots from src/pkg: src/sub does not exist
    (".sub", "src/pkg/a.py", ["src/pkg/sub/__init__.py"]),
    (".a.thing", "src/pkg/sub/__init__.py", []),  # src/pkg/sub/a does not exist
    ("..a.thing", "src/pkg/sub/__init__.py", ["src/pkg/a.py"]),  # from ..a import thing
    (".", "src/pkg/sub/x.py", ["src/pkg/sub/__init__.py"]),  # from . import x: the package itself
    ("...", "src/pkg/sub/x.py", []),  # src has no __init__
    ("....", "src/pkg/sub/x.py", ["__init__.py"]),  # three levels up: the corpus root package
    (".....", "src/pkg/sub/x.py", []),  # more dots than folders
    (".", "x.py", ["__init__.py"]),
    ("", "x.py", []),
    ("  pkg.a  ", "tests/test_a.py", ["src/pkg/a.py"]),
]


@pytest.mark.parametrize("name,importer,want", MODULE_CASES)
def test_module_resolution_rules(name: str, importer: str, want: list[str]) -> None:
    r = ReferenceResolver(PATHS)
    assert r.resolve_module(name, importer) == sorted(IDX[p] for p in want)


def test_resolution_picks_python_by_language_or_suffix_and_excludes_self() -> None:
    r = ReferenceResolver(["a/mod.py", "a/notes.md", "a/script", "a\\win.md"])
    assert r.rel_paths[3] == "a/win.md"  # Windows separators are normalised
    assert r.resolve_link("win.md", "a/notes.md") == [3]
    assert is_python("a/script", "Python") and is_python("a/x.pyi", "") and not is_python("a/notes.md", "markdown")
    assert r.resolve("a.mod", 2, "python") == [0]  # no .py suffix, but the language says python
    assert r.resolve("mod.py", 1, "markdown") == [0]  # a link from markdown: a path beside it
    assert r.resolve("a.mod", 1, "markdown") == []  # ... not a module name
    assert r.resolve("a.mod", 0, "python") == []  # itself


def test_several_equally_good_candidates_are_all_kept() -> None:
    r = ReferenceResolver(["lib1/pkg/util.py", "lib2/pkg/util.py", "lib1/pkg/main.py", "x/pkg/util.py"])
    assert r.resolve_module("pkg.util", "app/run.py") == [0, 1, 3]  # >= 2 components, no ancestor
    assert r.resolve_module("pkg.util", "lib1/pkg/main.py") == [0]  # the ancestor prefix wins
    assert r.resolve_module("util", "lib2/pkg/main.py") == [1]
    assert r.resolve_module("util", "elsewhere/main.py") == []


# ------------------------------------------------------------------------------ same-document offsets
def _chunks(sizes: list[int], rng: np.random.Generator) -> ChunkTable:
    """Documents of the given sizes, their chunks shuffled together (node order is not doc order)."""
    doc, ordinal = [], []
    for d, n in enumerate(sizes):
        doc += [f"doc{d:02d}"] * n
        ordinal += list(range(n))
    perm = rng.permutation(len(doc))
    ids = np.array([f"c{i:04d}" for i in range(len(doc))], dtype=object)
    return ChunkTable(ids, np.array(doc, dtype=object)[perm], np.array(ordinal, np.int64)[perm])


def _expected_same_document(chunks: ChunkTable, fanout: int) -> set[tuple[int, int]]:
    """The docstring's rule, written out: chunk k of an n-chunk document -> k + 1 + floor(j (n-1) /
    fanout) (mod n) for j < fanout, or every other chunk when n - 1 <= fanout."""
    node = {(d, int(o)): i for i, (d, o) in enumerate(zip(chunks.doc_ids, chunks.ordinal))}
    sizes: dict[str, int] = {}
    for d in chunks.doc_ids:
        sizes[d] = sizes.get(d, 0) + 1
    want = set()
    for d, n in sizes.items():
        for k in range(n):
            offsets = range(1, n) if n - 1 <= fanout else [1 + (j * (n - 1)) // fanout for j in range(fanout)]
            want |= {(node[(d, k)], node[(d, (k + off) % n)]) for off in offsets}
    return want


@pytest.mark.parametrize("fanout", [1, 2, 3, 4, 7])
def test_same_document_offsets_follow_the_rule(fanout: int) -> None:
    chunks = _chunks([1, 2, 3, 4, 5, 8, 9, 13], np.random.default_rng(fanout))
    src, dst = same_document_edges(chunks, fanout)
    assert src.dtype == np.int64 and dst.dtype == np.int64
    assert set(zip(src.tolist(), dst.tolist())) == _expected_same_document(chunks, fanout)
    assert (src != dst).all()


def test_same_document_edges_nothing_to_link() -> None:
    chunks = _chunks([3, 4], np.random.default_rng(0))
    for src, dst in (same_document_edges(chunks, 0), same_document_edges(_chunks([], np.random.default_rng(0)), 2),
                     same_document_edges(_chunks([1, 1, 1], np.random.default_rng(0)), 3)):
        assert src.shape == (0,) and dst.shape == (0,) and src.dtype == np.int64 and dst.dtype == np.int64
    one = _chunks([2], np.random.default_rng(0))
    assert sorted(zip(*same_document_edges(one, 1))) == [(0, 1), (1, 0)]


def test_sequence_follows_ordinal_within_each_document(tmp_path: Path) -> None:
    docs = [{"rel_path": f"d{i}.md", "language": "markdown", "modality": "prose", "n_chunks": n, "references": []}
            for i, n in enumerate([1, 4, 2, 3])]
    ids = write_output(tmp_path, docs, shard_split=1)
    g = build_chunk_graph(tmp_path, GraphConfig(knn=False, same_document=False, references=False))
    got = {(g.chunk_ids[s], g.chunk_ids[d]) for s, d in zip(g.src, g.dst)}
    assert got == {(v[k], v[k + 1]) for v in ids.values() for k in range(len(v) - 1)}
    assert g.counts_by_type() == {"sequence": 6, "same_document": 0, "reference": 0, "knn": 0}


# ------------------------------------------------------------------------------ references from an output
def test_reference_edges_and_their_counts(tmp_path: Path) -> None:
    docs = [dict(d) for d in CORPUS] + [
        # a document without chunks, linking and linked: no edges from or to it, nothing else lost
        {"rel_path": "docs/empty.md", "language": "markdown", "modality": "prose", "n_chunks": 0,
         "references": ["../README.md"]},
        {"rel_path": "docs/zz.md", "language": "markdown", "modality": "prose", "n_chunks": 2,
         "references": ["empty.md", "install.md"]},
    ]
    ids = write_output(tmp_path, docs, shard_split=1)
    chunks = load_chunk_table(tmp_path, with_embeddings=False)
    src, dst, stats = reference_edges(chunks, tmp_path)
    # references written: 3 + 3 + 5 + 1 + 1 + 2; resolved: core->util, main->core/util/pkg, guide->README/install,
    # README->guide, empty->README, zz->empty/install
    assert stats == {"references": 15, "resolved": 10, "doc_pairs": 10}
    got = {(chunks.chunk_ids[s], chunks.chunk_ids[d]) for s, d in zip(src, dst)}
    assert {(c, ids["docs/install.md"][0]) for c in ids["docs/zz.md"]} <= got
    assert ids["docs/empty.md"] == []
    assert len(got) == len(src) == 3 + 2 * 3 + 6 * 2 + 2 + 2  # every chunk of A -> first chunk of B


def test_outputs_without_references_or_chunks(tmp_path: Path) -> None:
    docs = [{"rel_path": f"d{i}.md", "language": "markdown", "modality": "prose", "n_chunks": 2,
             "references": ["nowhere.md"]} for i in range(2)]
    write_output(tmp_path / "a", docs)
    g = build_chunk_graph(tmp_path / "a", GraphConfig(knn=False, sequence=False, same_document=False))
    assert g.num_edges == 0 and g.num_nodes == 4
    src, dst, stats = reference_edges(load_chunk_table(tmp_path / "a", False), tmp_path / "a")
    assert src.shape == dst.shape == (0,) and stats == {"references": 2, "resolved": 0, "doc_pairs": 0}
    empty = tmp_path / "empty"
    empty.mkdir()
    g = build_graph(empty, GraphConfig())
    assert g.num_nodes == 0 and g.num_edges == 0
    assert pq.read_table(empty / "edges.parquet").num_rows == 0
    src, dst, stats = reference_edges(load_chunk_table(empty, False), empty)
    assert src.shape == dst.shape == (0,) and src.dtype == np.int64 and stats["references"] == 0
    data = load_graph(empty)
    assert data.num_nodes == 0 and tuple(data.edge_index.shape) == (2, 0) and data.edge_index.dtype == torch.long


# ------------------------------------------------------------------------------ readers
# ------------------------------------------------------------------------------ load_graph and make_data
def test_load_graph_drops_stale_ends_and_keeps_weights_as_float32(tmp_path: Path) -> None:
    ids = write_output(tmp_path, CORPUS)
    order = sorted(c for v in ids.values() for c in v)
    rows = [(order[0], order[1], "sequence", 0.25), ("gone", order[2], "knn", 0.5), (order[3], "gone", "knn", 0.5),
            (order[4], order[0], "reference", 0.125), (order[5], order[6], "same_document", 1.5)]
    pq.write_table(pa.table({"src_chunk_id": [r[0] for r in rows], "dst_chunk_id": [r[1] for r in rows],
                             "type": [r[2] for r in rows], "weight": pa.array([r[3] for r in rows], pa.float64())}),
                   tmp_path / "edges.parquet")
    g = load_graph(tmp_path, undirected=False)
    assert g.edge_index.tolist() == [[0, 4, 5], [1, 0, 6]]
    assert g.edge_attr.dtype == torch.float32 and g.edge_attr.tolist() == [0.25, 0.125, 1.5]
    assert g.edge_type.tolist() == [EDGE_TYPES.index("sequence"), EDGE_TYPES.index("reference"),
                                    EDGE_TYPES.index("same_document")]
    assert g.num_nodes == len(order) and g.chunk_ids == order
    und = load_graph(tmp_path)
    assert sorted(map(tuple, und.edge_index.T.tolist())) == [(0, 1), (0, 4), (1, 0), (4, 0), (5, 6), (6, 5)]
    pq.write_table(pa.table({"src_chunk_id": [order[0]] * 3, "dst_chunk_id": [order[1]] * 3,
                             "type": ["sequence", "bogus", "wormhole"], "weight": pa.array([1.0] * 3, pa.float32())}),
                   tmp_path / "edges.parquet")
    with pytest.raises(ValueError, match=r"got \['bogus', 'wormhole'\]"):
        load_graph(tmp_path)


def test_make_data_dtypes_and_node_count_without_edges() -> None:
    ids = np.array(["a", "b", "c"], dtype=object)
    d = make_data(ids, [0, 1], [1, 2], [0, 3], [0.5, 0.75])
    assert d.edge_index.dtype == torch.long and d.edge_type.dtype == torch.long and d.edge_attr.dtype == torch.float32
    assert sorted(map(tuple, d.edge_index.T.tolist())) == [(0, 1), (1, 0), (1, 2), (2, 1)]  # undirected by default
    directed = make_data(ids, np.array([0, 1], np.int32), np.array([1, 2], np.int32), [0, 3], np.array([0.5, 0.75]))
    assert directed.edge_index.dtype == torch.long and directed.edge_attr.dtype == torch.float32
    empty = make_data(ids, [], [], [], [])
    assert empty.num_nodes == 3 and tuple(empty.edge_index.shape) == (2, 0) and empty.edge_index.dtype == torch.long
    loops = make_data(ids, [1], [1], [0], [1.0])  # a self loop only: undirected drops it
    assert tuple(loops.edge_index.shape) == (2, 0) and loops.num_nodes == 3


def test_symmetrize_breaks_ties_by_weight_then_type_and_sorts() -> None:
    # one pair joined by four edges: two share the top weight; the lower type code must win
    s = torch.tensor([2, 0, 2, 0, 1])
    d = torch.tensor([0, 2, 0, 2, 1])
    t = torch.tensor([3, 1, 2, 0, 0])
    w = torch.tensor([0.5, 0.9, 0.9, 0.1, 1.0])
    s2, d2, t2, w2 = symmetrize(s, d, t, w, 3)
    assert list(zip(s2.tolist(), d2.tolist(), t2.tolist(), w2.tolist())) == [(0, 2, 1, pytest.approx(0.9)),
                                                                             (2, 0, 1, pytest.approx(0.9))]
    # one edge only: both directions, and order by (src, dst) over many nodes
    s2, d2, _, _ = symmetrize(torch.tensor([5, 1]), torch.tensor([3, 4]), torch.tensor([0, 0]),
                              torch.tensor([1.0, 1.0]), 6)
    assert list(zip(s2.tolist(), d2.tolist())) == [(1, 4), (3, 5), (4, 1), (5, 3)]
    one = symmetrize(torch.tensor([0]), torch.tensor([1]), torch.tensor([2]), torch.tensor([0.5]), 2)
    assert [x.tolist() for x in one] == [[0, 1], [1, 0], [2, 2], [0.5, 0.5]]


def test_absolute_self_imports_resolve_when_the_corpus_folder_is_the_package(tmp_path: Path) -> None:
    """corpus=.../h11 (the package folder itself): `import h11._connection` in its __init__.py found
    nothing (rel_path `_connection.py`), while the same files under corpus=... linked; relative imports
    already resolved. The corpus folder's name, when it holds __init__.py, now stands for its root."""
    r = ReferenceResolver(["__init__.py", "_connection.py", "sub/__init__.py", "sub/x.py"], package_roots={"h11"})
    assert r.resolve_module("h11._connection.Connection", "__init__.py") == [1]
    assert r.resolve_module("h11.sub.x", "_connection.py") == [3]
    assert r.resolve_module("h11.Request", "sub/x.py") == [0]  # `from h11 import Request`: the package itself
    assert r.resolve_module("other._connection", "__init__.py") == []
    assert ReferenceResolver(["__init__.py", "_connection.py"]).resolve_module("h11._connection", "__init__.py") == []
    # from an output: documents under /corpus/, a package (its __init__.py at the root)
    docs = [{"rel_path": "__init__.py", "language": "python", "modality": "code", "n_chunks": 1,
             "references": ["corpus.core.run", "corpus.util"]},
            {"rel_path": "core.py", "language": "python", "modality": "code", "n_chunks": 2, "references": ["corpus.util"]},
            {"rel_path": "util.py", "language": "python", "modality": "code", "n_chunks": 1, "references": []}]
    write_output(tmp_path, docs, shard_split=1)
    _, _, stats = reference_edges(load_chunk_table(tmp_path, with_embeddings=False), tmp_path)
    assert stats == {"references": 3, "resolved": 3, "doc_pairs": 3}


def test_a_package_corpus_given_through_a_link_is_imported_by_its_real_name(tmp_path: Path) -> None:
    """corpus=linkpkg (a link to mypkg/): the code says `import mypkg.util`, and the root name was the
    link's: 0 of its self-imports resolved."""
    import os

    from hades_gpu.graph.build import package_root_names
    from hades_gpu.graph.io import DocumentTable

    (tmp_path / "mypkg").mkdir()
    os.symlink(tmp_path / "mypkg", tmp_path / "linkpkg")
    docs = DocumentTable(["a", "b"], ["__init__.py", "util.py"], ["python"] * 2, [[], []],
                         corpus_roots=[str(tmp_path / "linkpkg")] * 2)
    assert package_root_names(docs) == {"linkpkg", "mypkg"}
    assert package_root_names(DocumentTable(["b"], ["util.py"], ["python"], [[]], corpus_roots=[str(tmp_path)])) == set()
