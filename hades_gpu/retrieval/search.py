"""Ask an ingest output a question: the query's vector, the chunks nearest it, their place in the files.

`Searcher` opens an output once (chunk table and vectors in memory, the graph and ISNE vectors on
first use) and answers many queries; `search(output, query, k)` is the one-call form
(`hades_gpu.search`). The query is embedded with the configured embedder (`embed_texts`: ingest's
tokenizer rules, locally or through the `minilm_text` Triton ensemble), so query and chunk vectors
come from the same model and rows.

Ranking:
  * first stage: the `search.candidates` (at least k) chunks nearest the query by cosine, from a
    `CandidateSource` (exact scan today; an approximate index plugs in there for large outputs);
  * ``expand=none``: those, best first;
  * ``expand=graph``: the neighbours of the seeds in the chunk graph (`edges.parquet`, either
    direction) join the candidates, and each candidate scores
    ``cosine + graph_weight * sum(edge weight * seed cosine over its edges to the seeds) / graph_seeds``, the
    seeds being the top `graph_seeds` text hits (a fixed number: with k, -k changed the order) — a
    chunk linked to several strong hits (the next chunk of the same function, a module it imports)
    moves up, and one the text alone missed can enter;
  * ``expand=isne``: each candidate scores ``(1 - isne_weight) * cosine + isne_weight *
    cosine(its ISNE vector, the mean ISNE vector of the top isne_seeds text hits)``: the graph
    position of the best text hits pulls up chunks structurally close to them.

Each hit carries its path, 1-based line range (from the chunk's character offsets in the source as
ingested, `store.reader.chunk_source`; None when the file is gone or changed) and a snippet.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from hades_gpu.config import PipelineConfig, SearchConfig, SearchExpand
from hades_gpu.embedding.texts import embed_texts, model_probe, text_token_ids
from hades_gpu.records import printable, user_path
from hades_gpu.retrieval.candidates import CandidateSource, candidate_source
from hades_gpu.store.layout import (DRIVER_LOCK_NAME, ISNE_LOCK_NAME, edges_path, isne_embeddings_files,
                                    no_manifest_detail)
from hades_gpu.store.lock import held_elsewhere
from hades_gpu.store.manifest import MODEL_PROBE_MIN_COSINE, probe_cosine, recorded_model_probes
from hades_gpu.store.reader import (DamagedOutputError, SourceChangedError, check_chunk_vectors, chunk_source,
                                    embeddings_to_numpy, is_ingest_output, read_chunks, read_isne_embeddings)

log = logging.getLogger(__name__)

# `via` of an `--expand isne` hit past the re-ranked pool (k above search.candidates): ranked below every
# pool hit; its score compares with other such hits only
PAST_POOL = "text_past_pool"

CHUNK_COLUMNS = ("doc_id", "chunk_id", "path", "char_start", "char_end", "text", "embedding")


class SearchError(ValueError):
    """The output cannot answer this search (not an output, no chunks, no graph or ISNE vectors)."""


@dataclass
class Hit:
    """One ranked chunk: where it is and why it ranked (score = final; cosine = text alone)."""

    rank: int
    score: float
    cosine: float
    chunk_id: str
    doc_id: str
    path: str
    char_start: int
    char_end: int
    line_start: Optional[int]
    line_end: Optional[int]
    snippet: str
    via: str = "text"  # text: a first-stage hit; graph: joined as a neighbour of a seed


@dataclass
class SearchResult:
    query: str
    k: int
    expand: str
    embedder: str
    candidates: str  # the first stage's description
    hits: list[Hit] = field(default_factory=list)
    embed_ms: float = 0.0
    rank_ms: float = 0.0  # candidates + re-ranking
    locate_ms: float = 0.0  # line ranges and snippets
    total_ms: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def output_state(output: str | os.PathLike) -> tuple:
    """(name, size, mtime) of the files whose change means new committed chunks, graph or ISNE
    vectors: the manifests (and their write-ahead logs), `edges.parquet`, the ISNE files."""
    root = Path(output)
    files = [*root.glob("manifest*"), edges_path(root), *isne_embeddings_files(root)]
    state = []
    for f in sorted(files):
        try:
            st = f.stat()
        except OSError:
            continue
        state.append((f.name, st.st_size, st.st_mtime_ns))
    return tuple(state)


def _line_breaks(source: str, end: int) -> int:
    """Line breaks in ``source[:end]``: ``\n``, ``\r\n`` and a lone ``\r``, as universal newlines
    read them (a file of ``\r`` line ends was one line: every hit said ``:1-1``)."""
    n = source.count("\n", 0, end) + source.count("\r", 0, end) - source.count("\r\n", 0, end)
    if 0 < end < len(source) and source[end - 1] == "\r" and source[end] == "\n":
        n -= 1  # the \r of a \r\n cut at `end`: the break is counted where its \n is
    return n


def line_range(source: str, char_start: int, char_end: int) -> tuple[int, int]:
    """1-based first and last line of ``source[char_start:char_end]`` (a trailing newline ends the
    last line, it does not start another)."""
    first = _line_breaks(source, char_start) + 1
    last_char = max(char_start, char_end - 1)
    return first, _line_breaks(source, last_char) + 1


def snippet_of(text: str, limit: int) -> str:
    """The chunk's text on one line (whitespace runs collapsed), cut to `limit` characters."""
    if limit <= 0:  # search.snippet_chars=0: no snippet (it printed "…")
        return ""
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def _unknown_token_id() -> Optional[int]:
    """The tokenizer's [UNK] id (None if it has none)."""
    from hades_gpu.documents.tokenizer import load_tokenizer

    return load_tokenizer().token_to_id("[UNK]")


class Searcher:
    """An output opened for queries. Thread-safe for `search` once built (read-only state; the
    embedder's `embed_texts` is thread-safe); the graph/ISNE tables load on first use.

    Args:
        output: an ingest output folder.
        cfg: the job config (``search`` and ``embedder`` sections); default: conf/ defaults.
        embedder: an embedder to reuse (the caller keeps owning it); default: built from ``cfg``.
        candidates: a first stage to use instead of `candidate_source` (an ANN index).
    """

    def __init__(self, output: str | os.PathLike, cfg: Optional[PipelineConfig] = None, embedder: Any = None,
                 candidates: Optional[CandidateSource] = None):
        from hades_gpu.config import load_pipeline_config, to_pipeline_config

        # as the pipelines take it: a PipelineConfig (checked again: a field set after loading was used
        # unchecked), a Hydra DictConfig or a dict of its fields; else one TypeError naming the forms
        cfg = load_pipeline_config() if cfg is None else to_pipeline_config(cfg)
        self.output = str(user_path(output))
        self.cfg: SearchConfig = cfg.search
        self.max_seq_len = int(cfg.embedder.max_seq_len)
        if not is_ingest_output(self.output):
            if not os.path.exists(self.output):
                raise SearchError(f"{self.output} does not exist")
            raise SearchError(f"{self.output} is not an ingest output {no_manifest_detail(self.output)}: run hades-ingest "
                              "first")
        self._given_candidates = candidates
        self._graph_cfg = cfg.graph
        # what the "output changed" warning tells to do (hades-search, one query, says "run it again")
        self.refresh_advice = "call refresh() (or open a new Searcher) to search the new one"
        self._load()
        self._own_embedder = embedder is None
        if embedder is None:
            from hades_gpu.embedding.factory import build_embedder

            embedder = build_embedder(cfg)
        self.embedder = embedder
        self.embedder_name = getattr(embedder, "description", type(embedder).__name__)
        # what embeds the queries (a Triton server's text model first): the header named minilm_python only
        self.query_embedder_name = getattr(embedder, "query_description", None) or self.embedder_name
        try:
            self._check_model()
        except BaseException:
            self.close()
            raise

    def _check_model(self) -> None:
        """Queries must be embedded by the model that embedded the chunks: a server running another
        model answered every query with nonsense ranks, silently (`Manifest.check_model_probe`)."""
        recorded = recorded_model_probes(Path(self.output))
        if not recorded:
            return
        answer = model_probe(self.embedder, self.max_seq_len)
        for shard, vector, made_by in recorded:
            cosine = probe_cosine(vector, answer)
            if cosine < MODEL_PROBE_MIN_COSINE:
                raise SearchError(f"{self.output} was embedded by another model than this embedder's "
                                  f"({self.embedder_name}; {made_by} made shard {shard}: cosine {cosine:.3f} on a "
                                  f"probe text): search it with the model that ingested it")

    def _load(self) -> None:
        """Read the committed chunks and their vectors (the graph and ISNE vectors on first use)."""
        self._state = self._warned_state = output_state(self.output)
        writers = held_elsewhere(self.output)
        if writers:  # results are of what is committed so far
            shard, holder = writers[0]
            what = {ISNE_LOCK_NAME: "its graph and ISNE stage", DRIVER_LOCK_NAME: "a cluster driver"}.get(
                shard, f"shard {shard}")
            log.warning("%s is being written now (%s, PID %s on %s): results cover the chunks committed so far",
                        self.output, what, holder.get("pid"), holder.get("host"))
        try:
            table = read_chunks(self.output, CHUNK_COLUMNS)
        except DamagedOutputError:  # a committed part is missing or unreadable: not "no chunks yet"
            raise
        except FileNotFoundError:  # a manifest, no committed part yet
            table = None
        if table is None or table.num_rows == 0:
            skipped = " (see its metrics.json)" if (Path(self.output) / "metrics.json").is_file() else ""
            raise SearchError(f"{self.output} holds no committed chunks yet: an ingest into it may still be running "
                              f"before its first commit, was stopped before it (re-run it to resume), or skipped every "
                              f"document it was given{skipped}")
        self.chunk_ids: list[str] = table.column("chunk_id").to_pylist()
        self.doc_ids: list[str] = table.column("doc_id").to_pylist()
        self.paths: list[str] = table.column("path").to_pylist()
        self.starts = table.column("char_start").to_numpy()
        self.ends = table.column("char_end").to_numpy()
        self.texts: list[str] = table.column("text").to_pylist()
        self.vectors = embeddings_to_numpy(table.column("embedding"))
        check_chunk_vectors(self.vectors, self.output, self.chunk_ids)
        self.row_of = {cid: i for i, cid in enumerate(self.chunk_ids)}
        self.candidates = self._given_candidates if self._given_candidates is not None else candidate_source(
            self.output, self.vectors, self.chunk_ids, self._graph_cfg.knn_exact_max_nodes)
        self._graph: Optional[tuple[np.ndarray, np.ndarray, np.ndarray]] = None  # CSR: indptr, nbr rows, weights
        self._isne: Optional[np.ndarray] = None  # (N, d) L2-normalised, 0 rows for chunks without one
        self._has_isne: np.ndarray = np.zeros(0, dtype=bool)  # (N,) which rows of _isne are vectors
        self._sources: dict[str, Optional[str]] = {}
        self._source_problems: dict[str, str] = {}  # doc_id -> why its file could not be read as ingested

    # ------------------------------------------------------------------------------ public
    def search(self, query: str, k: Optional[int] = None, expand: Optional[str] = None) -> SearchResult:
        """The top-k chunks for `query` (k and expand default to the ``search`` config)."""
        return self.search_many([query], k, expand)[0]

    def search_many(self, queries: Sequence[str], k: Optional[int] = None,
                    expand: Optional[str] = None) -> list[SearchResult]:
        """`search` for several queries, embedded in one call (each result's embed_ms is its share)."""
        if self.embedder is None:
            raise SearchError("this Searcher is closed: make a new one (or use it in a `with` block)")
        state = output_state(self.output)
        if state != self._state and state != self._warned_state:
            # an ingest or hades-isne committed since: a kept Searcher answered from the old chunks
            # (removed ones included), silently. Not reloaded under a running search (other threads
            # may be ranking with this state): the caller decides when (`refresh`).
            self._warned_state = state
            log.warning("%s changed since this Searcher read it: results are of the earlier state; %s",
                        self.output, self.refresh_advice)
        k = self.cfg.k if k is None else k
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise SearchError(f"k must be an integer >= 1 (got {k!r})")
        k = int(k)
        expand = self.cfg.expand if expand is None else expand
        if expand not in SearchExpand.values():
            raise SearchError(f"expand must be one of {'|'.join(SearchExpand.values())} (got {expand!r})")
        queries = [queries] if isinstance(queries, str) else list(queries)  # one string is one query
        self._check_queries(queries)
        t0 = time.perf_counter()
        qv = embed_texts(self.embedder, queries, self.max_seq_len)
        embed_ms = (time.perf_counter() - t0) * 1000 / max(1, len(queries))
        results = []
        for query, vec in zip(queries, qv):
            t1 = time.perf_counter()
            ranked = self._rank(vec, k, expand)
            t2 = time.perf_counter()
            hits = [self._hit(r, row, score, cos, via) for r, (row, score, cos, via) in enumerate(ranked, 1)]
            stale = [h for h in hits if h.doc_id in self._source_problems]
            if stale:  # the hit printed "path:?" and said nothing of why
                log.warning("%d hit(s) come from files changed or gone since they were ingested (e.g. %s: %s): their "
                            "lines are not shown and their text is the ingested one; re-run hades-ingest to update "
                            "the output", len(stale), printable(stale[0].path), self._source_problems[stale[0].doc_id])
            t3 = time.perf_counter()
            results.append(SearchResult(
                query=query, k=k, expand=expand, embedder=self.query_embedder_name, candidates=self.candidates.description,
                hits=hits, embed_ms=embed_ms, rank_ms=(t2 - t1) * 1000, locate_ms=(t3 - t2) * 1000,
                total_ms=embed_ms + (t3 - t1) * 1000))
        return results

    def _check_queries(self, queries: list) -> None:
        """Refuse what the model would embed as nothing, and say when it reads only a query's start."""
        for i, q in enumerate(queries):
            if not isinstance(q, str):
                hint = ": pass several queries to search_many" if isinstance(q, (list, tuple)) else ""
                raise SearchError(f"query {i} is not text (got {type(q).__name__} {printable(repr(q))[:80]}){hint}")
            if not q.strip():  # the model embeds "" as well, and its nearest chunks look like an answer to nothing
                raise SearchError(f"query {i} is empty (got {q!r})")
            try:
                q.encode("utf-8")
            except UnicodeEncodeError as err:  # lone surrogates: bytes that were not UTF-8 on a command line
                raise SearchError(f"query {i} is not valid Unicode text ({err.reason} at character {err.start}: "
                                  "on a command line, bytes that are not UTF-8)") from None
        limit = self.max_seq_len - 2
        unknown = _unknown_token_id()
        for i, (q, ids) in enumerate(zip(queries, text_token_ids(queries))):
            if ids.size == 0:  # only characters the tokenizer drops (zero-width, BOM, controls)
                raise SearchError(f"query {i} holds no token the model reads (got {printable(q)[:80]!r}): "
                                  "only characters the tokenizer drops")
            if ids.size > limit:
                log.warning("query %d is %d tokens long: the model reads its first %d (embedder.max_seq_len=%d), "
                            "the rest is ignored", i, ids.size, limit, self.max_seq_len)
            if unknown is not None and bool((ids == unknown).all()):
                # "🥐", "🐧" and "[UNK]" were one and the same query, answered as if it meant something
                log.warning("query %d is only characters the model does not know (%s): it reads it as [UNK], the "
                            "same for every such query, so the hits are not about it", i, printable(q)[:40])

    def refresh(self) -> None:
        """Read the output again (chunks, then the graph and ISNE vectors on first use): after an
        ingest or `hades-isne` committed into it. Not while other threads search with this one."""
        if self.embedder is None:
            raise SearchError("this Searcher is closed: make a new one (or use it in a `with` block)")
        if not is_ingest_output(self.output):  # deleted since: it said "holds no committed chunks yet"
            raise SearchError(f"{self.output} does not exist any more" if not os.path.exists(self.output) else
                              f"{self.output} is no ingest output any more (no manifest in it)")
        self._load()

    def close(self) -> None:
        if self._own_embedder and self.embedder is not None:
            self.embedder.close()
        self.embedder = None

    def __enter__(self) -> "Searcher":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------------------ ranking
    def _rank(self, qvec: np.ndarray, k: int, expand: str) -> list[tuple[int, float, float, str]]:
        """(row, score, cosine, via) best first, at most k."""
        n = max(k, self.cfg.candidates, self.cfg.graph_seeds if expand == SearchExpand.GRAPH else 0) \
            if expand != SearchExpand.NONE else k
        rows, cos = self.candidates.nearest(qvec[None, :], n)
        rows, cos = rows[0], cos[0].astype(np.float64)
        if expand == SearchExpand.GRAPH:
            return self._graph_rerank(qvec, rows, cos, k)
        if expand == SearchExpand.ISNE:
            return self._isne_rerank(rows, cos, k)
        return [(int(r), float(c), float(c), "text") for r, c in zip(rows, cos)]

    def _graph_rerank(self, qvec: np.ndarray, rows: np.ndarray, cos: np.ndarray, k: int):
        indptr, nbrs, weights = self._load_graph()
        n_seeds = self.cfg.graph_seeds  # fixed, not k: -k changed the top hits' order and scores
        seeds, seed_cos = rows[:n_seeds], cos[:n_seeds]
        support: dict[int, float] = {}
        for s, sc in zip(seeds, seed_cos):
            lo, hi = indptr[s], indptr[s + 1]
            for nb, w in zip(nbrs[lo:hi], weights[lo:hi]):
                support[int(nb)] = support.get(int(nb), 0.0) + float(w) * float(sc)
        pool = dict.fromkeys(int(r) for r in rows)  # first stage, in order
        joined = [nb for nb in support if nb not in pool]
        cosine = {int(r): float(c) for r, c in zip(rows, cos)}
        if joined:  # a neighbour the first stage missed: its exact cosine (vectors are in memory)
            extra = self.vectors[joined] @ (qvec / max(float(np.linalg.norm(qvec)), 1e-12))
            norms = np.linalg.norm(self.vectors[joined], axis=1)
            cosine.update({nb: float(c / n) if n > 0 else 0.0 for nb, c, n in zip(joined, extra, norms)})
        scored = [(r, cosine[r] + self.cfg.graph_weight * support.get(r, 0.0) / n_seeds, cosine[r],
                   "text" if r in pool else "graph") for r in [*pool, *joined]]
        scored.sort(key=lambda t: (-t[1], t[0]))
        return scored[:k]

    def _isne_rerank(self, rows: np.ndarray, cos: np.ndarray, k: int):
        """The fixed pool of the first `search.candidates` text hits re-ranked, then (only for a larger
        k) the text hits past it, scored alike and ranked among themselves: a pool that grew with k let
        weak text matches with a high structural term into the top hits (-k 5 and -k 200 differed)."""
        pool = max(self.cfg.candidates, self.cfg.isne_seeds)
        isne = self._load_isne()
        has = self._has_isne
        seeds = [r for r in rows[: self.cfg.isne_seeds] if has[r]]
        centre = isne[seeds].mean(axis=0) if seeds else np.zeros(isne.shape[1], dtype=isne.dtype)
        norm = float(np.linalg.norm(centre))
        unit = centre / norm if norm > 0 else None
        # A chunk without an ISNE vector (ingested after the last ISNE stage, or without an
        # edge) gets a neutral structural term, the median of the pool's chunks that have one: with 0 it
        # sank below far weaker text matches, and with its cosine alone (no structural term) it still
        # did, because the structural cosines near the seeds run far above text cosines.
        # One of the top isne_seeds text hits without a vector is a seed the centre stands for: it gets
        # the top structural term (an isolated best match, ring.h at cosine 0.61, fell to 4th behind
        # cosine 0.20 chunks near the other seeds).
        ranked, neutral, top = self._isne_scored(rows[:pool], cos[:pool], isne, unit, has, None)
        if k > pool and len(rows) > pool:
            # ranked below the pool whatever their blend: `via` says so (a score above the pool's, unmarked,
            # read as a ranking error to anyone who merged or re-sorted hits by score)
            past = self._isne_scored(rows[pool:], cos[pool:], isne, unit, has, (neutral, top))[0]
            ranked = ranked + [(r, score, c, PAST_POOL) for r, score, c, _ in past]
        return ranked[:k]

    def _isne_scored(self, rows: np.ndarray, cos: np.ndarray, isne: np.ndarray, unit: Optional[np.ndarray],
                     has: np.ndarray, terms: Optional[tuple[float, float]]):
        """(scored rows best first, neutral term, top term); `terms` given: the pool's (rows past it)."""
        structural = isne[rows] @ unit if unit is not None else np.zeros(len(rows))
        with_vector = np.fromiter((has[r] for r in rows), dtype=bool, count=len(rows))
        if terms is None:
            neutral = float(np.median(structural[with_vector])) if with_vector.any() else 0.0
            top = float(structural[with_vector].max()) if with_vector.any() else 0.0
            n_seeds = self.cfg.isne_seeds
        else:
            (neutral, top), n_seeds = terms, 0  # past the pool: no seed among them
        w = self.cfg.isne_weight
        scored = [(int(r), (1 - w) * float(c) + w * (float(s) if h else (top if i < n_seeds else neutral)),
                   float(c), "text")
                  for i, (r, c, s, h) in enumerate(zip(rows, cos, structural, with_vector))]
        scored.sort(key=lambda t: (-t[1], t[0]))
        return scored, neutral, top

    def _load_graph(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self._graph is None:
            path = edges_path(self.output)
            if not path.is_file():
                raise SearchError(f"{self.output} has no chunk graph ({path.name}): run hades-isne output={self.output} "
                                  f"first, or search without --expand graph")
            t = pq.read_table(path, columns=["src_chunk_id", "dst_chunk_id", "weight"])
            src = np.array([self.row_of.get(c, -1) for c in t.column("src_chunk_id").to_pylist()], dtype=np.int64)
            dst = np.array([self.row_of.get(c, -1) for c in t.column("dst_chunk_id").to_pylist()], dtype=np.int64)
            w = t.column("weight").to_numpy(zero_copy_only=False).astype(np.float64)
            ok = (src >= 0) & (dst >= 0) & (src != dst)  # edges to chunks no longer committed are skipped
            dangling = int(((src < 0) | (dst < 0)).sum())
            if dangling:  # the graph of an earlier state (an ingest with isne.enabled=false since)
                covered = np.zeros(len(self.chunk_ids), dtype=bool)
                covered[src[src >= 0]] = True
                covered[dst[dst >= 0]] = True
                log.warning("%s is older than the chunks: %d edge(s) lead to chunks no longer in the output and %d "
                            "chunk(s) are in no edge; `hades-isne output=%s` builds it again", path.name, dangling,
                            int((~covered).sum()), self.output)
            else:
                self._warn_chunks_newer_than_the_graph(path)
            # both directions: a seed's predecessor is as much its neighbour as its successor; one edge
            # per pair, its largest weight, as ISNE's graph has it (a pair joined by sequence,
            # same_document and a kNN edge each way counted four times, up to 3.46)
            n = len(self.chunk_ids)
            a = np.concatenate([src[ok], dst[ok]])
            b = np.concatenate([dst[ok], src[ok]])
            ww = np.concatenate([w[ok], w[ok]])
            order = np.argsort(a * n + b, kind="stable")
            a, b, ww = a[order], b[order], ww[order]
            first = np.flatnonzero(np.r_[True, (a[1:] != a[:-1]) | (b[1:] != b[:-1])]) if a.size else a
            if a.size:
                ww = np.maximum.reduceat(ww, first)
                a, b = a[first], b[first]
            indptr = np.zeros(n + 1, dtype=np.int64)
            np.cumsum(np.bincount(a, minlength=n), out=indptr[1:])
            self._graph = (indptr, b, ww)
        return self._graph

    def _warn_chunks_newer_than_the_graph(self, path: Path) -> None:
        """Chunks committed after the last graph and ISNE stage (an ingest with isne.enabled=false) are
        in no edge: said as edges to removed chunks are. The ISNE vectors files hold every chunk the
        stage saw (0 for one without edges), so a committed chunk they lack came later."""
        files = isne_embeddings_files(self.output)
        if not files:
            return
        try:
            seen = {c for f in files for c in pq.read_table(f, columns=["chunk_id"]).column("chunk_id").to_pylist()}
        except (pa.ArrowException, OSError, KeyError):
            return  # a damaged vectors file is named by --expand isne and hades-verify
        newer = sum(1 for c in self.chunk_ids if c not in seen)
        if newer:
            log.warning("%s is older than the chunks: %d chunk(s) were committed after it was built (an ingest with "
                        "isne.enabled=false) and are in no edge; `hades-isne output=%s` builds it again", path.name,
                        newer, self.output)

    def _load_isne(self) -> np.ndarray:
        if self._isne is None:
            ids, vecs = read_isne_embeddings(self.output)
            if not ids:
                raise SearchError(f"{self.output} has no ISNE vectors (isne/embeddings-*.parquet): run "
                                  f"hades-isne output={self.output} first, or search without --expand isne")
            out = np.zeros((len(self.chunk_ids), vecs.shape[1]), dtype=np.float32)
            for cid, v in zip(ids, vecs):  # later files win, as read_isne_embeddings orders them
                row = self.row_of.get(cid)
                if row is not None:
                    out[row] = v
            norms = np.linalg.norm(out, axis=1, keepdims=True)
            self._isne = out / np.where(norms > 0, norms, 1.0)
            self._has_isne = norms[:, 0] > 0
            missing = int((~self._has_isne).sum())
            if missing:
                log.warning("%d of %d chunk(s) have no ISNE vector (ingested after the last ISNE stage or with "
                            "isne.enabled=false, without any edge in the chunk graph, or added with no trained chunk "
                            "near them): a top text hit among them counts as a seed, any other gets the candidates' "
                            "median structural term, so their text decides; `hades-isne output=%s` gives one to "
                            "each that has graph neighbours",
                            missing, len(self.chunk_ids), self.output)
        return self._isne

    # ------------------------------------------------------------------------------ hits
    def _source(self, doc_id: str) -> Optional[str]:
        if doc_id not in self._sources:
            try:
                self._sources[doc_id] = chunk_source(self.output, doc_id)
            except DamagedOutputError:
                raise  # the output's own documents part is missing or unreadable: not "the source changed"
            except (OSError, KeyError, SourceChangedError) as err:
                self._sources[doc_id] = None  # the hit keeps its offsets; its lines are unknown
                self._source_problems[doc_id] = ("changed" if isinstance(err, SourceChangedError) else
                                                 "gone" if isinstance(err, FileNotFoundError) else "unreadable")
        return self._sources[doc_id]

    def _hit(self, rank: int, row: int, score: float, cosine: float, via: str) -> Hit:
        start, end = int(self.starts[row]), int(self.ends[row])
        source = self._source(self.doc_ids[row])
        lines = line_range(source, start, end) if source is not None else (None, None)
        return Hit(rank=rank, score=score, cosine=cosine, chunk_id=self.chunk_ids[row], doc_id=self.doc_ids[row],
                   path=self.paths[row], char_start=start, char_end=end, line_start=lines[0], line_end=lines[1],
                   snippet=snippet_of(self.texts[row], self.cfg.snippet_chars), via=via)


def search(output: str | os.PathLike, query: str, k: Optional[int] = None, expand: Optional[str] = None, *,
           embedder: str = "", cfg: Optional[PipelineConfig] = None) -> SearchResult:
    """One query against an output: `Searcher(output).search(query, k)`, embedder built and closed here.

    Args:
        embedder: ``local`` or ``triton`` (default: the config's ``embedder.name``).
        cfg: the config (default: conf/ defaults).
    """
    import dataclasses

    from hades_gpu.config import load_pipeline_config, to_pipeline_config

    cfg = load_pipeline_config() if cfg is None else to_pipeline_config(cfg)
    if embedder:
        cfg = to_pipeline_config(dataclasses.replace(cfg, embedder=dataclasses.replace(cfg.embedder, name=embedder)))
    with Searcher(output, cfg) as searcher:
        return searcher.search(query, k, expand)


__all__ = ["Hit", "SearchError", "SearchResult", "Searcher", "line_range", "search", "snippet_of"]
