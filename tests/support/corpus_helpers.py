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


def record_warm_up(folder: str) -> None:
    """Worker warm-up that leaves a file named after its process id in `folder` (picklable: a
    top-level function, bound with functools.partial)."""
    import os

    Path(folder, str(os.getpid())).write_text("warm", encoding="utf-8")


def failing_warm_up() -> None:
    """Worker warm-up that fails: the worker must go on regardless."""
    raise RuntimeError("warm-up failed on purpose")


def ingest_in_a_child(corpus: str, output: str) -> int:
    """`process_batch` as a job of a process pool (joblib/loky, multiprocessing): its error must
    reach the parent as itself (picklable), not as a broken pool."""
    from hades_gpu.config import load_pipeline_config
    from hades_gpu.pipelines import TextParallelPipeline

    cfg = load_pipeline_config(overrides=["isne.enabled=false", "monitoring.progress=off"])
    return TextParallelPipeline(cfg).process_batch([corpus], output=output).chunks_written


def exit_at_start() -> None:
    """Worker warm-up that ends its process at once, as a worker that cannot start would."""
    import os

    os._exit(3)
