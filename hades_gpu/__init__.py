"""hades-gpu: GPU-first document ingestion — chunk, embed (local or Triton), graph, ISNE."""

__version__ = "0.1.0"


def search(output, query: str, k=None, expand=None, **options):
    """Top-k chunks of an ingest output for `query` (`hades_gpu.retrieval.search.search`; options:
    expand=none|graph|isne, embedder=local|triton, cfg=PipelineConfig). For many queries open a
    `hades_gpu.retrieval.search.Searcher` once instead."""
    from hades_gpu.retrieval.search import search as _search  # the package's public face: imported on call

    return _search(output, query, k, expand, **options)
