"""Real corpora for tests (imported by test modules; the tests folder is on sys.path via conftest)."""

from __future__ import annotations

import shutil
import sysconfig
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SAMPLE_CORPUS = REPO / "examples" / "sample_corpus"
STDLIB = Path(sysconfig.get_paths()["stdlib"])


def stdlib_sources(n: int, min_bytes: int = 2_000, max_bytes: int = 40_000) -> list[Path]:
    """`n` real Python files of moderate size from the standard library, in a stable order."""
    files = [p for p in sorted(STDLIB.glob("*.py")) if min_bytes <= p.stat().st_size <= max_bytes]
    return files[:n]


def copy_files(files: list[Path], dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    for f in files:
        shutil.copy(f, dest / f.name)
    return dest


def crash_on_marker(ref, documents_cfg, chunking_cfg):
    """Worker function that really kills its worker process on files named *CRASH*.

    Top-level in an importable module so spawned worker processes can unpickle it.
    """
    import os

    from hades_gpu.documents.chunking import process_document

    if "CRASH" in Path(ref.path).name:
        os._exit(3)
    return process_document(ref, documents_cfg, chunking_cfg)


def environment_probe(ref):
    """Worker function that reads no file: the document's content hash is the worker's
    OPENBLAS_NUM_THREADS (or "unset"), so a test sees the environment workers run in."""
    import os

    from hades_gpu.records import ChunkedDocument

    return ChunkedDocument(ref=ref, content_hash=os.environ.get("OPENBLAS_NUM_THREADS", "unset"))
