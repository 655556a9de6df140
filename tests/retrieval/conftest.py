"""The search tests' shared fixture: one Searcher over the session's search output, per module."""

from __future__ import annotations

import pytest
from search_helpers import search_cfg

from hades_gpu.retrieval.search import Searcher


@pytest.fixture(scope="module")
def searcher(search_output, embedder):
    with Searcher(search_output[0], search_cfg(), embedder=embedder) as s:
        yield s
