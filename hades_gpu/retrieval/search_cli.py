"""`hades-search <output> "query" [-k 10] [--embedder local|triton] [--expand graph|isne] [--json]`.

argparse, like `hades-serve`: a query is one short command, not a Hydra job (no run folder). Any
other setting comes from conf/ as `key=value` overrides after the query (``search.graph_weight=0.5``,
``embedder.url=127.0.0.1:18001``), read by `load_pipeline_config` as every command does.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Optional

import pyarrow as pa

from hades_gpu.config import ConfigError, SearchExpand
from hades_gpu.records import error_line, printable, user_path


class _OneLineParser(argparse.ArgumentParser):
    """argparse with its usage errors as one line (`hades-search: error: ...`, exit 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        if message.startswith("the following arguments are required"):  # argparse also named the optional overrides
            message = ("give an ingest output folder and a query (a query that starts with '-' goes after '--': "
                       f"{self.prog} OUT -k 5 -- \"-x flag\"; '-' reads the query from standard input)")
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def format_hits(result) -> str:
    """The human form: one header line per hit (rank, score, path:lines) and its snippet."""
    query = result.query if len(result.query) <= 200 else result.query[:199] + "…"  # a long query once, not in full
    out = [f"{len(result.hits)} hits for {query!r} ({result.candidates}, expand={result.expand}, "
           f"embedder {result.embedder})"]
    for h in result.hits:
        lines = f"{h.line_start}-{h.line_end}" if h.line_start is not None else "?"
        extra = f"  cosine {h.cosine:.4f}" if h.score != h.cosine else ""
        # a hit past the --expand isne pool is ranked below it whatever its score: said, as --json does
        via = {"graph": "  via graph", "text_past_pool": "  past the re-ranked pool"}.get(h.via, "")
        out.append(f"{h.rank:>3}. {h.score:.4f}{extra}{via}  {printable(h.path)}:{lines}  [{h.chunk_id}]")
        if h.snippet:
            out.append(f"     {printable(h.snippet)}")  # a chunk's escape sequences recoloured the terminal
    out.append(f"latency: {result.total_ms:.1f} ms per query (embed {result.embed_ms:.1f} ms, "
               f"rank {result.rank_ms:.1f} ms, lines+snippets {result.locate_ms:.1f} ms)")
    return "\n".join(out)


def search_cli(argv: Optional[list[str]] = None) -> int:
    """Exit 0 with the hits; 2 with one line on bad arguments, a bad config or an output that cannot
    answer (not an output, no graph for --expand graph); 1 with one line when the embedder fails."""
    parser = _OneLineParser(prog="hades-search", description="Top-k chunks of an ingest output for a query.")
    parser.add_argument("output", help="an ingest output folder (or output=<folder>)")
    parser.add_argument("query", help="the question, as text ('-': read it from standard input)")
    parser.add_argument("overrides", nargs="*", help="conf/ overrides, key=value (e.g. search.graph_weight=0.5)")
    parser.add_argument("-k", type=int, default=None, help="hits to return (default: search.k, 10)")
    parser.add_argument("--embedder", choices=("local", "triton"), default=None,
                        help="embed the query in-process or on a Triton server (minilm_text; embedder.url=...)")
    parser.add_argument("--expand", choices=tuple(SearchExpand.values()), default=None,
                        help="re-rank through the chunk graph or the ISNE vectors, or none (default: search.expand)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument("--debug", action="store_true",
                        help="a traceback with the one-line errors too (as HADES_DEBUG=1)")
    argv = list(sys.argv[1:] if argv is None else argv)
    given = [i for i, a in enumerate(argv) if a.startswith("output=")]
    if len(given) > 1:
        parser.error("output= given more than once")
    if given and given[0] != 0:  # `hades-search "query" output=o`: the output, wherever it stands
        argv.insert(0, argv.pop(given[0]))
    if given and argv[0] == "output=":
        parser.error("output= is empty: give the ingest output folder")
    args = parser.parse_intermixed_args(argv)  # overrides may come before or after the flags
    debug = args.debug or os.environ.get("HADES_DEBUG", "").strip().lower() in ("1", "true", "yes", "on")

    from hades_gpu.config import load_pipeline_config
    from hades_gpu.embedding.base import EmbedderError
    from hades_gpu.optional import MissingDependencyError
    from hades_gpu.retrieval.search import SearchError, Searcher
    from hades_gpu.store.manifest import ManifestError
    from hades_gpu.store.reader import DamagedOutputError
    from hades_gpu.store.layout import output_argument

    overrides = list(args.overrides)
    if args.embedder:
        overrides.insert(0, f"embedder={args.embedder}")
    bad = [o for o in overrides if "=" not in o]
    if given and bad and args.query and Path(args.query).is_dir():
        # `hades-search out1 "q" output=out2`: out1 became the query, and the query an "override"
        parser.error(f"the output is given twice ({args.query} and {args.output}): give one")
    if bad:
        parser.error(f"overrides must be key=value (got {bad[0]!r})"
                     + (": options go before '--'" if bad[0].startswith("-") else ""))
    query = args.query
    if query == "-":  # a long query, or one from another program
        query = sys.stdin.buffer.read().decode("utf-8", "surrogateescape").rstrip("\n")  # not UTF-8: one line below
    if not query.strip():
        parser.error("the query is empty")
    try:
        cfg = load_pipeline_config(overrides=overrides)
        args.output = output_argument(args.output)  # `output=o`, as hades-isne and hades-verify take it
        with Searcher(args.output, cfg) as searcher:
            searcher.refresh_advice = "run the search again to search the new one"
            result = searcher.search(query, args.k, args.expand)
    except (ConfigError, SearchError, DamagedOutputError, ManifestError, FileNotFoundError, pa.ArrowException,
            EmbedderError, MissingDependencyError) as err:
        if debug:
            raise
        if isinstance(err, pa.ArrowException):  # a damaged output: a part, edges.parquet, ... that is no Parquet
            line = (f"damaged output file: {error_line(err, 400)} (`hades-verify {printable(str(user_path(args.output)))}` "
                    "names every damaged file; `hades-ingest` re-ingests damaged parts, `hades-isne` rewrites the "
                    "graph and ISNE files)")
        else:  # parts missing, ISNE vectors or the manifest unreadable: error_line names the file
            line = error_line(err) if isinstance(err, (DamagedOutputError, ManifestError)) else str(err)
        print(f"hades-search: error: {line}", file=sys.stderr)
        # 1: damage (DamagedOutputError is a FileNotFoundError: tested first) or the embedder failed;
        # 2: the arguments, the config or no output there
        failed = (DamagedOutputError, ManifestError, pa.ArrowException, EmbedderError, MissingDependencyError)
        return 1 if isinstance(err, failed) else 2
    print(json.dumps(result.to_dict(), ensure_ascii=False, indent=1) if args.json else format_hits(result))
    return 0
