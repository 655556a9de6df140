"""Shared by test_verify_and_lock.py and test_atomic_replace.py: a small real corpus, real ingest runs
with a stand-in embedder (the model is not the point), and the exactly-once comparison."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

from corpus_helpers import REPO

FAST = ["isne.enabled=false", "monitoring.progress=off", "profile.num_workers=1"]


def write_corpus(folder: Path, n_docs: int = 8) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n_docs):
        (folder / f"doc{i:02d}.md").write_text("\n\n".join(
            f"# Section {j} of doc {i}\n\n" + " ".join(f"w{i}_{j}_{k}" for k in range(120)) for j in range(3)))
    return folder


def config(rows_per_part: int = 24, writer: str = "thread"):
    """The fault tests' config; `writer` explicit (profile.writer "auto" would pick by the machine's cores)."""
    from hades_gpu.config import load_pipeline_config

    return load_pipeline_config("balanced", [*FAST, f"profile.writer_rows_per_part={rows_per_part}",
                                             f"profile.writer={writer}"])


def ingest(corpus: Path, out: Path, rows_per_part: int = 24, writer: str = "thread"):
    from hades_gpu.benchmarks.feed_bench import ZeroCostEmbedder
    from hades_gpu.pipelines import TextParallelPipeline

    cfg = config(rows_per_part, writer)
    return TextParallelPipeline(cfg, embedder=ZeroCostEmbedder(dim=cfg.embedder.dim)).ingest([corpus], out)


INGEST_SCRIPT = """
import sys
from pathlib import Path
sys.path.insert(0, {support!r})
from store_faults import ingest
ingest(Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]))
"""


def ingest_subprocess(corpus: Path, out: Path, rows_per_part: int = 24, env: dict | None = None,
                      timeout: float = 120, prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """`ingest` in a fresh interpreter; `prefix` runs it under another command (setpriv, say)."""
    script = INGEST_SCRIPT.format(support=str(Path(__file__).resolve().parent))
    return subprocess.run([*prefix, sys.executable, "-c", script, str(corpus), str(out), str(rows_per_part)], cwd=REPO,
                          env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=timeout)


def chunk_rows(out: Path) -> Counter:
    """(path, ordinal, text) of every committed chunk, with how often each occurs."""
    from hades_gpu.store.reader import read_chunks

    t = read_chunks(out, ["path", "ordinal", "text"])
    return Counter(zip(t.column("path").to_pylist(), t.column("ordinal").to_pylist(), t.column("text").to_pylist()))


def assert_same_chunks_exactly_once(out: Path, reference: Counter) -> None:
    rows = chunk_rows(out)
    twice = [k for k, n in rows.items() if n > 1]
    assert not twice, f"{len(twice)} chunk(s) written twice, e.g. {twice[0]}"
    assert set(rows) == set(reference), (f"missing {len(set(reference) - set(rows))}, "
                                         f"extra {len(set(rows) - set(reference))}")
    from hades_gpu.store.reader import committed_parts, read_documents

    docs = read_documents(out, ["rel_path"]).column("rel_path").to_pylist()
    assert len(docs) == len(set(docs))
    committed = set(committed_parts(out))
    for table in ("chunks", "documents"):  # nothing on disk the manifest does not name
        assert {p.stem for p in (out / table).glob("part-*.parquet")} == committed


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder` -> sha256 of its bytes (to show a check changed nothing)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}
