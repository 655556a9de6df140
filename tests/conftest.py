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
