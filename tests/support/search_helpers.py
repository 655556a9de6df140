"""Shared by the search tests: the config they search with and the session's embedder lent to a
command run (whose close() must not close it)."""

from __future__ import annotations

from hades_gpu.config import load_pipeline_config


def search_cfg(*overrides: str):
    return load_pipeline_config("balanced", list(overrides))


class Borrowed:
    """The session's real embedder, lent to one command or call: its close() must not close it."""

    def __init__(self, inner):
        self.inner, self.dim, self.description = inner, inner.dim, inner.description

    def embed_texts(self, texts):
        return self.inner.embed_texts(texts)

    def embed(self, ids, mask):
        return self.inner.embed(ids, mask)

    def close(self):
        pass
