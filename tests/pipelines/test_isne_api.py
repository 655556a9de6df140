"""The seed's ISNE API and `hades-isne` over a real ingest output."""

from __future__ import annotations

import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from hades_gpu.config import load_pipeline_config
from hades_gpu.pipelines import ISNETrainingPipeline
from hades_gpu.isne.stage import NotAnIngestOutputError
from hades_gpu.store.reader import read_chunks

from corpus_helpers import REPO


def test_train_on_raw_corpus_ingests_into_output_first(sample_corpus, tmp_path):
    out = tmp_path / "out"
    cfg = load_pipeline_config("low_memory", [f"output={out}", "monitoring.progress=off", "isne.epochs=3"])
    result = ISNETrainingPipeline(cfg).train(corpus_path=sample_corpus, epochs=2, batch_size=8)
    chunk_ids = set(read_chunks(out, ["chunk_id"]).column("chunk_id").to_pylist())
    vectors = pq.read_table(result.embeddings_path).to_pandas()
    assert set(vectors.chunk_id) == chunk_ids  # every chunk has an ISNE vector, joinable on chunk_id
    assert len(vectors.isne_embedding.iloc[0]) == cfg.isne.dim
    assert (out / "edges.parquet").exists() and result.model_path.exists()

    # hades-isne retrains on the same output
    proc = subprocess.run([sys.executable, "-c", "from hades_gpu.cli import isne_main; isne_main()",
                           f"output={out}", "isne.epochs=2", "monitoring.progress=off"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_train_without_output_names_what_to_do(tmp_path):
    with pytest.raises(NotAnIngestOutputError, match="hades-ingest"):
        ISNETrainingPipeline(load_pipeline_config()).train(corpus_path=tmp_path)


def test_the_readmes_example_trains_isne_with_isne_disabled_for_the_ingest(sample_corpus, tmp_path, embedder):
    """README: `isne.enabled=false` for process_batch, then ISNETrainingPipeline(config).train(...) on
    the output. Disabling the stage in the job must not make the explicit training call a no-op."""
    from hades_gpu.pipelines import TextParallelPipeline
    from hades_gpu.store.reader import read_isne_embeddings

    out = tmp_path / "out"
    config = load_pipeline_config("balanced", ["isne.enabled=false", "monitoring.progress=off"])
    result = TextParallelPipeline(config, embedder=embedder).process_batch([sample_corpus], output=out)
    assert result.isne is None and not (out / "isne").exists()  # the job's switch: no ISNE in the job
    trained = ISNETrainingPipeline(config).train(corpus_path=out, epochs=2, batch_size=16)
    assert trained.metrics["mode"] == "trained" and trained.metrics["epochs_run"] == 2
    assert trained.model_path.is_file()
    ids, vecs = read_isne_embeddings(out)
    assert sorted(ids) == sorted(read_chunks(out, ["chunk_id"]).column("chunk_id").to_pylist())
    assert vecs.shape == (len(ids), config.isne.dim) and (abs(vecs).sum(1) > 0).mean() > 0.9


@pytest.mark.parametrize("kw", [dict(epochs=0), dict(epochs=-1), dict(batch_size=0), dict(epochs=2.5), dict(epochs=True)])
def test_epochs_and_batch_size_below_one_are_refused_before_anything_runs(tmp_path, kw):
    cfg = load_pipeline_config(overrides=[f"output={tmp_path / 'out'}"])
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.md").write_text("text")
    name = next(iter(kw))
    with pytest.raises(ValueError, match=rf"^{name} must be an integer >= 1 \(got {kw[name]!r}\)$"):
        ISNETrainingPipeline(cfg).train(corpus_path=tmp_path / "corpus", **kw)
    assert not (tmp_path / "out").exists()  # nothing ingested, no model written


def test_a_graph_without_edges_trains_no_model_and_says_so(tmp_path, embedder, caplog):
    """One chunk has no neighbour: ISNE has nothing to learn. It used to report "trained" and save
    an untrained θ, from which every later run inferred new chunks' vectors."""
    from hades_gpu.pipelines import TextParallelPipeline
    from hades_gpu.store.reader import read_isne_embeddings

    corpus, out = tmp_path / "corpus", tmp_path / "out"
    corpus.mkdir()
    (corpus / "only.md").write_text("A single short paragraph, one chunk.\n")
    config = load_pipeline_config("balanced", ["isne.enabled=false", "monitoring.progress=off"])
    TextParallelPipeline(config, embedder=embedder).process_batch([corpus], output=out)
    with caplog.at_level("WARNING", logger="hades_gpu.isne.stage"):
        result = ISNETrainingPipeline(config).train(corpus_path=out, epochs=2)
    assert result.metrics["mode"] == "no_edges" and result.metrics["n_nodes"] == 1
    assert result.model_path is None and not any((out / "isne").glob("*.pt"))
    assert result.metrics["model_path"] is None  # it named a file that does not exist
    assert "no edges" in caplog.text and "nothing to learn" in result.summary()
    ids, vecs = read_isne_embeddings(out)
    assert len(ids) == 1 and vecs.shape == (1, config.isne.dim) and not vecs.any()

    # a second document referencing nothing still leaves no edge; a chunk with a neighbour then trains
    (corpus / "second.md").write_text("A single short paragraph, one chunk.\n\nAnother one.\n" * 40)
    TextParallelPipeline(config, embedder=embedder).process_batch([corpus], output=out)
    again = ISNETrainingPipeline(config).train(corpus_path=out, epochs=1)
    assert again.metrics["mode"] == "trained" and again.model_path is not None and again.model_path.is_file()

    # the graph loses its edges again: the model of the earlier graph goes (later runs inferred from it)
    (corpus / "second.md").write_text("Bananas are yellow.\n")
    TextParallelPipeline(config, embedder=embedder).process_batch([corpus], output=out)
    third = ISNETrainingPipeline(config).train(corpus_path=out, epochs=1)
    assert third.metrics["mode"] == "no_edges", third.metrics
    assert third.model_path is None and third.metrics["model_path"] is None
    assert not again.model_path.exists()


def test_the_summary_says_when_the_budget_cut_the_last_epoch(tmp_path):
    from hades_gpu.pipelines.isne_training import ISNETrainingResult

    metrics = {"mode": "trained", "epochs_run": 2, "best_epoch": 2, "stopped_by_budget": True, "time_budget_s": 1.0,
               "last_epoch_partial": True, "history": [{"epoch": 1, "batches": 72, "of_batches": 72},
                                                       {"epoch": 2, "batches": 15, "of_batches": 72}]}
    line = ISNETrainingResult(tmp_path, None, tmp_path / "e.parquet", metrics).summary()
    assert "2 epoch(s) (epoch 2 cut at 15 of 72 batches), best 2" in line and "time budget of 1 s reached" in line
    whole = ISNETrainingResult(tmp_path, None, tmp_path / "e.parquet", {**metrics, "last_epoch_partial": False}).summary()
    assert "2 epoch(s), best 2" in whole


def test_hades_isne_after_a_by_hand_shard_leaves_one_isne_file_and_records_its_run(tmp_path, embedder):
    """A `shard=zz` ingest wrote isne/embeddings-zz.parquet; a later `hades-isne` (stage name s0)
    wrote embeddings-s0 beside it, and readers, where the later file name wins, used the old model's
    vectors. metrics.json kept describing the ingest's graph and model."""
    import json

    import numpy as np

    from hades_gpu.pipelines import TextParallelPipeline
    from hades_gpu.store.reader import read_chunks, read_isne_embeddings

    corpus, out = tmp_path / "corpus", tmp_path / "out"
    corpus.mkdir()
    for i in range(4):
        (corpus / f"d{i}.md").write_text("\n\n".join(f"Paragraph {j} of document {i} about topic {j % 3}. " * 12
                                                     for j in range(6)))
    fast = ["monitoring.progress=off", "isne.early_stop=off", "isne.time_budget_vs_embedding=0"]
    TextParallelPipeline(load_pipeline_config("balanced", ["shard=zz", "isne.epochs=1", *fast]),
                         embedder=embedder).process_batch([corpus], output=out)
    assert [p.name for p in (out / "isne").glob("embeddings-*.parquet")] == ["embeddings-zz.parquet"]
    (out / "metrics.json").write_text(json.dumps({"wall_s": 1.0, "chunks": 5, "isne": {"epochs_run": 99}}))
    result = ISNETrainingPipeline(load_pipeline_config("balanced", ["isne.epochs=2", *fast])).train(corpus_path=out)
    assert [p.name for p in (out / "isne").glob("embeddings-*.parquet")] == ["embeddings-s0.parquet"]
    ids, vecs = read_isne_embeddings(out)
    assert sorted(ids) == sorted(read_chunks(out, ["chunk_id"]).column("chunk_id").to_pylist())  # one row each
    fresh = dict(zip(*read_isne_embeddings(out)))
    written = pq.read_table(result.embeddings_path)
    for cid, v in zip(written.column("chunk_id").to_pylist(), written.column("isne_embedding").to_pylist()):
        np.testing.assert_allclose(fresh[cid], v)
    recorded = json.loads((out / "metrics.json").read_text())
    assert recorded["isne"]["epochs_run"] == result.metrics["epochs_run"] == 2
    assert recorded["ingest_totals"] == {"runs": 1, "wall_s": 1.0, "chunks": 5}  # the ingest's, counted once


def test_isne_and_knn_on_auto_follow_gpu_device(sample_corpus, tmp_path, embedder):
    """`isne.device=auto` and `graph.device=auto` meant CUDA device 0 whatever `gpu.device` said (the
    config calls it "gpu.device's choice"): with gpu.device=cuda:1 the embedder ran on cuda:1 and the
    kNN and ISNE on cuda:0, and with gpu.device=cpu they still took the GPU. Here (no GPU) a device
    that is not visible must be named, not replaced by the CPU silently."""
    from hades_gpu.gpu.device import DeviceError, following
    from hades_gpu.pipelines import TextParallelPipeline

    assert following("auto", "cuda:1") == "cuda:1" and following(" AUTO ", "cpu") == "cpu"
    assert following("cpu", "cuda:1") == "cpu" and following("cuda:2", "cpu") == "cuda:2"
    out = tmp_path / "out"
    config = load_pipeline_config("balanced", ["isne.enabled=false", "monitoring.progress=off"])
    TextParallelPipeline(config, embedder=embedder).process_batch([sample_corpus], output=out)
    on_gpu = load_pipeline_config("balanced", ["monitoring.progress=off", "gpu.device=cuda:1"])
    with pytest.raises(DeviceError, match="cuda:1"):
        ISNETrainingPipeline(on_gpu).train(corpus_path=out, epochs=1)
    on_cpu = load_pipeline_config("balanced", ["monitoring.progress=off", "gpu.device=cpu"])
    assert ISNETrainingPipeline(on_cpu).train(corpus_path=out, epochs=1).metrics["device"] == "cpu"
