"""Chunk graph: sequence, same-document, reference and kNN edges over an ingest output's chunks."""

from hades_gpu.graph.build import (EDGE_TYPES, ChunkGraph, build_chunk_graph, build_graph, load_graph,
                                   make_data, symmetrize, write_edges)
from hades_gpu.graph.knn import knn_blocked

__all__ = ["EDGE_TYPES", "ChunkGraph", "build_chunk_graph", "build_graph", "load_graph", "make_data",
           "symmetrize", "write_edges", "knn_blocked"]
