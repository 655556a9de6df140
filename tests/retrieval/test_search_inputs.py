"""What users hand the search: queries the model cannot read, config forms, command-line shapes, the
saved index's API, and chunks without an ISNE vector. Each was a traceback, a silent answer or a
wrong ranking (a user-probe, 2026-12-07); each is one clear line or a fair ranking now."""

from __future__ import annotations

import io
import logging
import sys

import numpy as np
import pytest

import hades_gpu
from search_helpers import Borrowed, search_cfg
from hades_gpu.config import ConfigError, load_pipeline_config
from hades_gpu.retrieval.search import SearchError, Searcher
from hades_gpu.retrieval.search_cli import format_hits, search_cli


_cfg = search_cfg  # the searcher fixture: tests/retrieval/conftest.py


def test_queries_the_model_cannot_read_are_one_search_error(searcher, caplog):
    """Bytes that are not UTF-8 on a command line arrive as lone surrogates: the tokenizer raised
    UnicodeEncodeError. Zero-width spaces, a BOM or a NUL tokenize to nothing and were answered with
    the embedding of an empty string. A query past the model's length was cut without a word."""
    for bad in ("caf\udce9 volcano", "a\ud83d"):
        with pytest.raises(SearchError, match="query 0 is not valid Unicode text"):
            searcher.search(bad, 2)
    for nothing in ("\u200b", "\ufeff", "\x00", "\u200b\ufeff "):
        with pytest.raises(SearchError, match="holds no token the model reads"):
            searcher.search(nothing, 2)
    with pytest.raises(SearchError, match="query 1 is empty"):
        searcher.search_many(["calendar", "  "], 2)
    with pytest.raises(SearchError, match="pass several queries to search_many"):
        searcher.search(["calendar", "month"], 2)
    with caplog.at_level(logging.WARNING, logger="hades_gpu.retrieval.search"):
        assert len(searcher.search("the " * 300 + "calendar month", 2).hits) == 2
        assert len(searcher.search("calendar month", 2).hits) == 2
    warned = [r.getMessage() for r in caplog.records if "tokens long" in r.getMessage()]
    assert len(warned) == 1 and "reads its first 254" in warned[0], warned
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="hades_gpu.retrieval.search"):
        for unknown in ("\U0001F950\U0001F950", "\U0001F427"):  # both read as [UNK]: one and the same query
            assert searcher.search(unknown, 2).hits
    warned = [r.getMessage() for r in caplog.records if "does not know" in r.getMessage()]
    assert len(warned) == 2 and all("reads it as [UNK]" in w for w in warned), warned


def test_the_search_api_takes_the_config_forms_the_pipelines_take_and_checks_them(search_output, embedder):
    """A dict of fields raised AttributeError; a value set after loading (search.candidates=-5) was
    used unchecked, though the same override is refused; `expand` was keyword-only in `search` and
    positional in `Searcher.search`; a bogus embedder name was a bare ValueError."""
    out = search_output[0]
    with Searcher(out, {"search": {"k": 2}}, embedder=embedder) as s:
        assert len(s.search("calendar month").hits) == 2
    with pytest.raises(TypeError, match="load_pipeline_config"):
        Searcher(out, "low_memory", embedder=embedder)
    cfg = _cfg()
    cfg.search.candidates = -5
    with pytest.raises(ConfigError, match="search.candidates"):
        Searcher(out, cfg, embedder=embedder)
    with pytest.raises(ConfigError, match="embedder.name"):
        hades_gpu.search(out, "calendar", 2, embedder="bogus")


def test_search_positional_expand(search_output, embedder, monkeypatch):
    import hades_gpu.embedding.factory as factory

    monkeypatch.setattr(factory, "build_embedder", lambda cfg, governor=None: Borrowed(embedder))
    result = hades_gpu.search(search_output[0], "split a string using shell-like syntax", 2, "graph")
    assert result.expand == "graph" and len(result.hits) == 2



def test_the_command_line_shapes_a_user_types(search_output, embedder, monkeypatch, capsys):
    """A missing query said "the following arguments are required: ..., overrides" (overrides are
    optional) and never suggested '--' for a query starting with '-'; '-' searched the text "-";
    --debug was refused; a non-UTF-8 query was a traceback; a query past '--' followed by options
    said only "overrides must be key=value"."""
    import hades_gpu.embedding.factory as factory

    monkeypatch.setattr(factory, "build_embedder", lambda cfg, governor=None: Borrowed(embedder))
    out = str(search_output[0])
    for argv in ([out], []):
        with pytest.raises(SystemExit) as info:
            search_cli(argv)
        err = capsys.readouterr().err
        assert info.value.code == 2 and "give an ingest output folder and a query" in err and "'--'" in err
        assert "overrides" not in err and len(err.strip().splitlines()) == 1
    with pytest.raises(SystemExit):
        search_cli([out, "--", "-foo", "-k", "2"])
    assert "options go before '--'" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # the output twice: it said "overrides must be key=value (got 'penguins')"
        search_cli([out, "penguins", f"output={out}", "-k", "1"])
    assert f"the output is given twice ({out} and output={out})" in capsys.readouterr().err

    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"Return true if the year is a leap year\n")))
    assert search_cli([out, "-", "-k", "1", "--json"]) == 0
    import json

    printed = json.loads(capsys.readouterr().out)
    assert printed["query"] == "Return true if the year is a leap year"
    assert printed["hits"][0]["path"].endswith("calendar.py")

    assert search_cli([out, "caf\udce9 volcano"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hades-search: error: query 0 is not valid Unicode text") and len(err.splitlines()) == 1
    with pytest.raises(SearchError):
        search_cli([out, "caf\udce9 volcano", "--debug"])
    monkeypatch.setenv("HADES_DEBUG", "1")
    with pytest.raises(SearchError):
        search_cli([out, "\u200b"])


def test_snippets_and_long_queries_print_as_one_line_each():
    """A chunk holding an escape sequence recoloured the terminal; a 5,000-word query was echoed whole."""
    from hades_gpu.retrieval.search import Hit, SearchResult

    hit = Hit(rank=1, score=0.5, cosine=0.5, chunk_id="c1", doc_id="d1", path="/data/a.md", char_start=0,
              char_end=4, line_start=1, line_end=1, snippet="red \x1b[31mtext\x1b[0m here")
    text = format_hits(SearchResult(query="word " * 5000, k=1, expand="none", embedder="e", candidates="exact",
                                    hits=[hit]))
    assert "\x1b" not in text and "red \\x1b[31mtext" in text
    assert len(text.splitlines()[0]) < 400


def test_load_index_on_a_folder_without_an_index_is_index_unusable(tmp_path, search_output):
    """A folder that is no output (or has no chunks) crashed in the fingerprint with a TypeError
    about a memoryview, after reading every chunk."""
    from hades_gpu.graph.ann import IndexUnusable, load_index

    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("hello\n")
    for folder in (tmp_path / "notes", tmp_path / "nonexistent", search_output[0]):
        with pytest.raises(IndexUnusable, match="no kNN index"):
            load_index(folder)


def test_the_saved_index_checks_k_and_the_query_dimension(tmp_path):
    """k=-1 raised numpy's "negative dimensions", a wrong width a bare AssertionError, and k past the
    indexed rows padded the answer with None ids."""
    from hades_gpu.config import GraphConfig
    from hades_gpu.graph.ann import open_or_build

    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 32)).astype(np.float32)
    ids = np.asarray([f"c{i:04d}" for i in range(300)], dtype=object)
    cfg = GraphConfig(knn_exact_max_nodes=10, knn_nlist=4, knn_train_per_list=40, knn_recall_sample=50)
    idx = open_or_build(ids, x, 5, cfg, tmp_path)
    for k in (-1, 0, 1.5, True):
        with pytest.raises(ValueError, match="k must be an integer >= 1"):
            idx.search_chunk_ids(x[:2], k)
    with pytest.raises(ValueError, match=r"queries must be \(q, 32\) vectors"):
        idx.search_chunk_ids(np.ones((2, 31), np.float32), 3)
    idx.nprobe = 4  # every list: all rows reachable
    found, sims = idx.search_chunk_ids(x[:2], 1000)
    assert found.shape == (2, 300) and found[0, 0] == "c0000"


def test_chunks_without_an_isne_vector_are_not_sunk_by_the_others_structure(searcher):
    """The best text match without an ISNE vector scored its cosine alone, while every other chunk
    got (1-w)·cosine + w·structural with structural cosines near 1 around the seeds: weaker text
    matches pushed it out of the top k. Its structural term is the candidates' median now."""
    query = "Return true if the year is a leap year"
    plain = searcher.search(query, 5).hits
    best = searcher.row_of[plain[0].chunk_id]
    isne = searcher._load_isne()
    saved = (searcher._isne, searcher._has_isne)
    try:
        fake = np.zeros_like(isne)
        fake[:, 0] = 1.0  # every chunk at one place: structural cosine 1 for all that have a vector
        has = np.ones(len(fake), dtype=bool)
        fake[best], has[best] = 0.0, False
        searcher._isne, searcher._has_isne = fake, has
        hits = searcher.search(query, 5, "isne").hits
    finally:
        searcher._isne, searcher._has_isne = saved
    assert hits[0].chunk_id == plain[0].chunk_id
    w = searcher.cfg.isne_weight
    assert hits[0].score == pytest.approx((1 - w) * hits[0].cosine + w * 1.0)


def test_no_snippet_when_snippet_chars_is_0():
    from hades_gpu.retrieval.search import snippet_of

    assert snippet_of("some text here", 0) == "" and snippet_of("some text here", 5) == "some…"


def test_hades_verify_names_a_damaged_knn_index(search_output, tmp_path, capsys):
    """Search fell back to exact search over a garbage index/knn.faiss with a warning; hades-verify
    said "ok ... 0 problem(s)"."""
    import shutil

    from hades_gpu.config import GraphConfig
    from hades_gpu.graph.ann import open_or_build
    from hades_gpu.store.verify import main as verify_main

    out = tmp_path / "out"
    shutil.copytree(search_output[0], out)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 16)).astype(np.float32)
    ids = np.asarray([f"c{i:04d}" for i in range(300)], dtype=object)
    open_or_build(ids, x, 5, GraphConfig(knn_exact_max_nodes=10, knn_nlist=4, knn_train_per_list=40,
                                         knn_recall_sample=50), out)
    assert verify_main([str(out), "--quick"]) == 0
    capsys.readouterr()
    (out / "index" / "knn.faiss").write_bytes(b"garbage")
    assert verify_main([str(out), "--quick"]) == 1
    printed = capsys.readouterr().out
    assert "knn.faiss: damaged (its checksum does not match knn.json)" in printed, printed


def test_k_changes_how_many_graph_expanded_hits_print_not_their_order(searcher):
    """The seeds were the top k and the bonus was divided by k: -k 3 and -k 10 ordered the top hits
    differently (11 of 15 queries) and one chunk scored 1.034 at k=1, 0.605 at k=50."""
    for query in ("hash maps", "split a string using shell-like syntax", "calendar month names",
                  "Return true if the year is a leap year"):
        few = searcher.search(query, 3, "graph").hits
        many = searcher.search(query, 12, "graph").hits
        assert [(h.chunk_id, h.score) for h in few] == [(h.chunk_id, h.score) for h in many[:3]], query


def test_refresh_says_when_the_output_is_gone_or_the_searcher_closed(search_output, embedder, tmp_path):
    """refresh() after the folder was deleted said it "holds no committed chunks yet (an ingest into it
    may still be running...)"; refresh() on a closed Searcher succeeded silently."""
    import shutil

    out = tmp_path / "out"
    shutil.copytree(search_output[0], out)
    with Searcher(out, _cfg(), embedder=embedder) as s:
        shutil.rmtree(out)
        with pytest.raises(SearchError, match="does not exist any more"):
            s.refresh()
    with pytest.raises(SearchError, match="Searcher is closed"):
        s.refresh()


def test_an_isolated_best_match_stays_on_top_under_isne_expansion(search_output, embedder):
    """The best text match without an ISNE vector (an isolated chunk) was dropped from the seeds and got
    the candidates' median structural term; chunks near the other seeds with far weaker text beat it
    (ring.h at cosine 0.61 fell to 4th behind cosine 0.20). A top text hit is a seed the centre
    stands for: it gets the top structural term."""
    query = "Return true if the year is a leap year"
    with Searcher(search_output[0], _cfg("search.isne_weight=0.5", "search.candidates=30"), embedder=embedder) as s:
        plain = s.search(query, 30).hits
        rows = [s.row_of[h.chunk_id] for h in plain]
        isne = s._load_isne()
        fake = np.zeros_like(isne)
        fake[:, 1] = 1.0  # structurally far from the seeds ...
        for r in (rows[1], rows[2], rows[-1]):  # ... but the other seeds and the weakest text match
            fake[r] = 0.0
            fake[r, 0] = 1.0
        has = np.ones(len(fake), dtype=bool)
        fake[rows[0]], has[rows[0]] = 0.0, False  # the best match: no vector
        s._isne, s._has_isne = fake, has
        hits = s.search(query, 5, "isne").hits
    assert hits[0].chunk_id == plain[0].chunk_id
    assert hits[0].score == pytest.approx(0.5 * plain[0].cosine + 0.5)


def test_graph_expansion_counts_each_linked_pair_once(searcher):
    """A pair joined by sequence, same_document and kNN edges (each way) was summed up to four times;
    ISNE's graph keeps one edge per pair with its largest weight, and so does the re-rank now."""
    import pyarrow.parquet as pq

    indptr, nbrs, weights = searcher._load_graph()
    for row in range(len(indptr) - 1):
        mine = nbrs[indptr[row]:indptr[row + 1]]
        assert len(set(mine.tolist())) == len(mine), row
    edges = pq.read_table(searcher.output + "/edges.parquet").to_pandas()
    assert weights.max() <= edges.weight.max() + 1e-9
