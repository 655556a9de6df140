"""graph/io.py: an output shaped for the graph (documents with missing columns, chunk ids, id lookup)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from hades_gpu.graph.io import index_of, load_chunk_ids, load_document_table

from tests.graph.test_build import CORPUS, write_output


def _documents_part(root: Path, columns: dict[str, pa.Array], name: str = "part-s0-00000") -> None:
    (root / "documents").mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), root / "documents" / f"{name}.parquet")
    (root / "manifest.json").write_text(json.dumps({"version": 1, "parts": [name]}))  # committed


def test_document_table_fills_missing_columns_and_nulls(tmp_path: Path) -> None:
    assert load_document_table(tmp_path) == load_document_table(tmp_path)  # no documents folder
    t = load_document_table(tmp_path)
    assert (t.doc_ids, t.rel_paths, t.languages, t.references) == ([], [], [], [])
    bare = tmp_path / "bare"
    _documents_part(bare, {"doc_id": pa.array(["a", "b"]), "rel_path": pa.array(["x.md", "y.py"])})
    t = load_document_table(bare)
    assert (t.doc_ids, t.rel_paths, t.languages, t.references) == (["a", "b"], ["x.md", "y.py"], ["", ""], [[], []])
    full = tmp_path / "full"
    _documents_part(full, {"doc_id": pa.array(["a", "b", "c"]), "rel_path": pa.array(["x.md", "y.py", "z"]),
                           "language": pa.array(["markdown", None, "python"]),
                           "references": pa.array([["y"], None, []], pa.list_(pa.string()))})
    t = load_document_table(full)
    assert t.languages == ["markdown", "", "python"] and t.references == [["y"], [], []]


def test_chunk_ids_and_index_of(tmp_path: Path) -> None:
    none = load_chunk_ids(tmp_path)
    assert none.dtype == object and none.shape == (0,)
    ids = write_output(tmp_path / "o", CORPUS)
    got = load_chunk_ids(tmp_path / "o")
    assert got.dtype == object and got.tolist() == sorted(c for v in ids.values() for c in v)
    nodes = np.array(["b", "a", "c"], dtype=object)
    pos = index_of(pa.array(["a", "zz", "c", "b", None]), nodes)
    assert pos.dtype == np.int64 and pos.tolist() == [1, -1, 2, 0, -1]
    assert index_of(pa.chunked_array([pa.array(["a"]), pa.array(["c"])]), nodes).tolist() == [1, 2]
    assert index_of(pa.array(["a"], pa.string()), np.array([], dtype=object)).tolist() == [-1]
