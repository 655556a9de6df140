"""End to end on CUDA: the shipped pipeline (worker processes, pinned ring, CUDA embedder with side
streams and graphs) against sentence-transformers fp32 on the same chunks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from corpus_helpers import copy_files, stdlib_sources
from hades_gpu.config import load_pipeline_config
from hades_gpu.pipelines import TextParallelPipeline
from hades_gpu.store.reader import read_chunks


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_ingest_on_cuda_with_the_pinned_ring_matches_sentence_transformers(tmp_path, sample_corpus):
    from sentence_transformers import SentenceTransformer

    from hades_gpu.documents.tokenizer import model_dir

    corpus = copy_files(stdlib_sources(40), sample_corpus / "stdlib")
    out = tmp_path / "out"
    cfg = load_pipeline_config("high_throughput", ["isne.enabled=false", "embedder.device=cuda",
                                                   "monitoring.progress=off"])
    result = TextParallelPipeline(cfg).process_batch([corpus.parent], output=out)
    assert result.chunks_written > 100
    assert [s["reason"] for s in result.skipped] == ["binary"], result.skipped  # the sample's diagram.png
    em = result.metrics["embedder_metrics"]
    producer = em["producer"]
    assert "cuda" in em["description"] and producer["side_streams"] is True
    assert producer["batches"] > 0 and producer["staged_inputs"] == 0  # inputs came straight from the pinned ring
    assert producer["unpinned_batches"] == 0

    chunks = read_chunks(out).to_pandas()
    assert len(chunks) == result.chunks_written and chunks.chunk_id.is_unique
    st = SentenceTransformer(str(model_dir()), device="cuda")  # fp32 reference
    st.max_seq_length = cfg.embedder.max_seq_len
    ref = st.encode(list(chunks.text), batch_size=64, normalize_embeddings=True, convert_to_numpy=True)
    ours = np.stack(chunks.embedding.to_numpy())
    cosine = (ours * ref).sum(axis=1)
    assert cosine.min() >= 0.999, cosine.min()
