"""The shipped embed stage, timed on chunked documents held in memory (the "model-only" figures).

`embed_documents` runs `orchestration.pipeline.StreamingPipeline` itself — its batcher, ring, queues
and embed threads — over `ChunkedDocuments`, so a benchmark measures the stage users run, not a copy
of its loop. The CPU side (reading, chunking, tokenizing) is left out by handing it documents that
are already tokenized; that is the only difference from an ingest.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import numpy as np
import pyarrow as pa

from hades_gpu.config import PipelineConfig
from hades_gpu.orchestration.monitoring import RunMetrics
from hades_gpu.orchestration.pipeline import ChunkedDocuments, StreamingPipeline
from hades_gpu.records import PROSE, Chunk, ChunkedDocument, DocumentRef, DocumentResult, stable_id


class ShapeRecorder:
    """Wraps an embedder and records the (rows, length) of every call (for FLOP counts)."""

    def __init__(self, embedder: Any) -> None:
        self.inner = embedder
        self.concurrency = int(getattr(embedder, "concurrency", 1))
        self.dim = getattr(embedder, "dim", None)
        self.shapes: list[tuple[int, int]] = []
        self._lock = threading.Lock()

    def embed(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        out = self.inner.embed(input_ids, attention_mask)
        with self._lock:
            self.shapes.append((int(input_ids.shape[0]), int(input_ids.shape[1])))
        return out


class VectorSink:
    """Keeps every chunk's vector, by chunk id (the stage's sink in a benchmark)."""

    def __init__(self) -> None:
        self.vectors: dict[str, np.ndarray] = {}
        self._lock = threading.Lock()

    def begin_document(self, key: int, ref: DocumentRef, result: DocumentResult) -> None:
        pass

    def abandon(self, key: int) -> None:
        pass

    def add_rows(self, rows: pa.RecordBatch) -> None:
        ids = rows.column("chunk_id").to_pylist()
        dim = rows.schema.field("embedding").type.list_size
        vectors = rows.column("embedding").values.to_numpy(zero_copy_only=False).reshape(-1, dim)
        with self._lock:
            self.vectors.update(zip(ids, vectors))


@dataclass
class StageRun:
    seconds: float
    metrics: dict[str, Any]  # the stage's RunMetrics snapshot
    embeddings: np.ndarray  # (N, dim) in the order of the documents' chunks
    shapes: list[tuple[int, int]] = field(default_factory=list)  # (rows, length) per embed call

    @property
    def real_tokens(self) -> int:
        return int(self.metrics["real_tokens"])

    @property
    def padded_tokens(self) -> int:
        return int(self.metrics["padded_tokens"])

    @property
    def batches(self) -> int:
        return int(self.metrics["batches"])


def embed_documents(cfg: PipelineConfig, docs: Sequence[ChunkedDocument], embedder: Any, *,
                    ring: Any = None, governor: Any = None, budget_fn: Optional[Callable[[int], int]] = None,
                    sync: Callable[[], None] = lambda: None) -> StageRun:
    """Run the shipped stage over `docs` with `embedder`; time it from start to the last vector."""
    recorder = ShapeRecorder(embedder)
    sink = VectorSink()
    metrics = RunMetrics()
    stage = StreamingPipeline(cfg.profile, ChunkedDocuments(docs), recorder, sink, metrics,
                              max_seq_len=cfg.embedder.max_seq_len, governor=governor, ring=ring, budget_fn=budget_fn)
    sync()
    t0 = time.perf_counter()
    stage.run()
    sync()
    seconds = time.perf_counter() - t0
    metrics.finish()
    order = [c.chunk_id for d in docs for c in d.chunks]
    dim = next(iter(sink.vectors.values())).shape[0] if sink.vectors else 0
    embeddings = np.stack([sink.vectors[c] for c in order]) if order else np.zeros((0, dim), np.float32)
    return StageRun(seconds, metrics.snapshot(), embeddings, recorder.shapes)


def documents_from_texts(texts: Sequence[str], chunk_tokens: int) -> list[ChunkedDocument]:
    """One single-chunk document per text, tokenized with the model's tokenizer (at most
    `chunk_tokens` content tokens each): the chunks of an ingest output, ready for the stage."""
    from hades_gpu.documents.tokenizer import load_tokenizer

    encoded = load_tokenizer().encode_batch(list(texts), add_special_tokens=False)
    docs = []
    for i, (text, enc) in enumerate(zip(texts, encoded)):
        rel = f"text-{i:07d}"
        ref = DocumentRef(path=rel, rel_path=rel, size=len(text), modality=PROSE, language="text")
        chunk = Chunk(doc_id=ref.doc_id, chunk_id=stable_id(ref.doc_id, "0"), path=rel, modality=PROSE, ordinal=0,
                      char_start=0, char_end=len(text), text=text,
                      token_ids=np.asarray(enc.ids[:chunk_tokens], dtype=np.int32))
        docs.append(ChunkedDocument(ref=ref, content_hash=stable_id(text), chunks=[chunk]))
    return docs


def documents_from_chunks(chunk_lists: Sequence[Sequence[Chunk]]) -> list[ChunkedDocument]:
    """Documents for chunk lists that were cut elsewhere (one list per source file)."""
    docs = []
    for chunks in chunk_lists:
        if not chunks:
            continue
        first = chunks[0]
        ref = DocumentRef(path=first.path, rel_path=first.path, size=sum(len(c.text) for c in chunks),
                          modality=first.modality, language="")
        docs.append(ChunkedDocument(ref=ref, content_hash=first.doc_id, chunks=list(chunks)))
    return docs
