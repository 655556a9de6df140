"""Shared fixtures: a real embedder built once per session, real corpora on disk."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

from corpus_helpers import SAMPLE_CORPUS  # noqa: E402


@pytest.fixture(scope="session")
def embedder():
    """The default local embedder (OpenVINO on this CPU), shared by tests to avoid recompiling."""
    from hades_gpu.config import load_pipeline_config
    from hades_gpu.embedding.factory import build_embedder

    emb = build_embedder(load_pipeline_config())
    yield emb
    emb.close()


@pytest.fixture(scope="session")
def sentence_transformer():
    from sentence_transformers import SentenceTransformer

    from hades_gpu.documents.tokenizer import model_dir

    return SentenceTransformer(str(model_dir()), device="cpu")


@pytest.fixture
def sample_corpus(tmp_path: Path) -> Path:
    """A private copy of the shipped sample corpus (tests may add bad files to it)."""
    dest = tmp_path / "corpus"
    shutil.copytree(SAMPLE_CORPUS, dest)
    return dest


# The stdlib modules of the search tests: 68 documented functions in ~70 KB (~90 chunks, ~20 s to
# ingest on 2 cores), enough for 50 docstring queries. One ingest per session (tests/retrieval and
# tests/triton share it), with the chunk graph and ISNE vectors.
SEARCH_MODULES = ("calendar.py", "base64.py", "textwrap.py", "bisect.py")


@pytest.fixture(scope="session")
def search_output(tmp_path_factory, embedder):
    """(output folder, corpus folder) of an ingest of SEARCH_MODULES, graph and ISNE included."""
    from corpus_helpers import STDLIB, copy_files

    from hades_gpu.config import load_pipeline_config
    from hades_gpu.pipelines import TextParallelPipeline

    base = tmp_path_factory.mktemp("search")
    corpus = copy_files([STDLIB / name for name in SEARCH_MODULES], base / "corpus")
    cfg = load_pipeline_config("balanced", ["monitoring.progress=off", "isne.epochs=3"])
    TextParallelPipeline(cfg, embedder=embedder).process_batch([corpus], output=base / "out")
    return base / "out", corpus
