"""The Python API as users call it from threads, notebooks and their own code (probe round 10):
values set on a config after loading, empty paths, threads composing configs, the environment."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading

import numpy as np
import pytest

from hades_gpu.config import ConfigError, load_pipeline_config
from hades_gpu.pipelines import ISNETrainingPipeline, TextParallelPipeline

from corpus_helpers import REPO


@pytest.mark.parametrize("key,value,message", [
    ("isne.epochs", "3", "isne.epochs must be an integer (got '3')"),
    ("isne.epochs", True, "isne.epochs must be an integer (got True)"),
    ("isne.lr", "fast", "isne.lr must be a number (or null) (got 'fast')"),
    ("chunking.chunk_tokens", "100", "chunking.chunk_tokens must be an integer (got '100')"),
    ("isne.epochs", 0, "isne.epochs must be >= 1 (got 0)"),
    # a string in a list field was read one character at a time: include "*.txt" took every file
    ("documents.include", "*.txt", "documents.include must be a list of strings (a list: ['*.txt']) (got '*.txt')"),
    ("documents.exclude", None, "documents.exclude must be a list of strings (got None)"),
    ("documents.fallback_encodings", ["utf-16", 8], "documents.fallback_encodings must be a list of strings (got 8 in it)"),
])
def test_a_value_set_after_loading_is_one_config_error_naming_the_key(tmp_path, key, value, message):
    """Set in Python after `load_pipeline_config`, such values skipped the schema: a string failed as a
    TypeError deep in a comparison, and isne.epochs = 0 trained nothing and saved that over the model."""
    config = load_pipeline_config("low_memory", ["monitoring.progress=off"])
    section, name = key.split(".")
    setattr(getattr(config, section), name, value)
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.md").write_text("text")
    with pytest.raises(ConfigError, match="^" + re.escape(message) + "$"):
        TextParallelPipeline(config).process_batch([tmp_path / "corpus"], output=tmp_path / "out")
    pipeline = ISNETrainingPipeline(load_pipeline_config("low_memory"))
    setattr(getattr(pipeline.config, section), name, value)  # after the pipeline was made
    with pytest.raises(ConfigError, match="^" + re.escape(message) + "$"):
        pipeline.train(corpus_path=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_section_replaced_by_a_value_is_one_config_error(tmp_path):
    """`config.profile = "low_memory"` was an AttributeError from deep in validate."""
    config = load_pipeline_config("low_memory")
    config.profile = "low_memory"
    with pytest.raises(ConfigError, match=r"^profile is a config section and must stay a ProfileConfig "):
        TextParallelPipeline(config).process_batch([tmp_path], output=tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("section, name, hint", [
    ("isne", "enable", "did you mean 'enabled'?"),
    ("profile", "num_worker", "did you mean 'num_workers'?"),
    (None, "outptu", "did you mean 'output'?"),
    ("graph", "zzz", "its fields: "),
])
def test_a_misspelled_field_set_after_loading_is_one_config_error(section, name, hint):
    """`config.isne.enable = False` was stored beside the fields and ignored: ISNE ran anyway."""
    cfg = load_pipeline_config("low_memory")
    target = getattr(cfg, section) if section else cfg
    with pytest.raises(ConfigError, match=rf"has no field '{name}' \({hint}" if "mean" in hint else hint):
        setattr(target, name, False)
    assert not hasattr(target, name)
    target._private = 1  # internal state stays settable


def test_an_unknown_override_key_suggests_the_field_not_a_plus():
    with pytest.raises(ConfigError, match=r"unknown key 'profile.num_worker' \(did you mean 'profile.num_workers'\?\)") as caught:
        load_pipeline_config(overrides=["profile.num_worker=2"])
    assert "+profile" not in str(caught.value)


@pytest.mark.parametrize("pipeline", [TextParallelPipeline, ISNETrainingPipeline])
def test_a_config_that_is_no_config_is_one_type_error_and_a_dict_of_fields_is_one(pipeline):
    with pytest.raises(TypeError, match=r"must be a PipelineConfig .*not str 'balanced' \(a profile name goes to "
                                        r"load_pipeline_config\(profile=\.\.\.\)\)"):
        pipeline("balanced")
    with pytest.raises(TypeError, match=r"not int 3$"):
        pipeline(3)
    made = pipeline({"profile": {"num_workers": 1}, "isne": {"epochs": 2}})
    assert (made.config.profile.num_workers, made.config.isne.epochs) == (1, 2)
    with pytest.raises(ConfigError, match="num_workers"):
        pipeline({"profile": {"num_workers": 0}})


@pytest.mark.parametrize("overrides, needle", [
    (["graph.sequence_weight=0"], r"graph.sequence_weight must be > 0 while isne.edge_weights is on"),
    (["graph.knn_weight_scale=0"], r"graph.knn_weight_scale must be > 0"),
    (["isne.early_stop=link_auc", "isne.val_fraction=0"], r"isne.early_stop must be walk_loss or off while"),
    (["graph.knn_recall_sample=0"], r"graph.knn_recall_sample must be >= 1"),
    # kNN edges of negative cosine weighed < 0: a 55-line traceback once the graph was written
    (["graph.knn_threshold=-0.5"], r"graph.knn_threshold must be >= 0 while isne.edge_weights is on"),
])
def test_settings_that_failed_after_the_graph_or_said_nothing_are_refused_at_once(overrides, needle):
    """A 0 weight was a traceback after the graph was built; link_auc without held-out edges turned
    early stopping off silently; a recall sample of 0 reported a recall of 1.0 never measured."""
    with pytest.raises(ConfigError, match=needle):
        load_pipeline_config(overrides=overrides)
    load_pipeline_config(overrides=[*overrides, "isne.edge_weights=false", "isne.early_stop=off",
                                    "graph.knn_recall_sample=10"])  # each has its way out


@pytest.mark.parametrize("override, needle", [
    ("graph.knn_nprobe=0", r"graph.knn_nprobe must be >= 1"),
    ("graph.knn_nlist=-1", r"graph.knn_nlist must be >= 0"),
    ("graph.knn_train_per_list=0", r"graph.knn_train_per_list must be >= 1"),
    ("graph.knn_max_nprobe=0", r"graph.knn_max_nprobe must be >= graph.knn_nprobe \(8\)"),
    ("graph.knn_refine_factor=0", r"graph.knn_refine_factor must be >= 1"),
    ("graph.knn_train_iterations=0", r"graph.knn_train_iterations must be >= 1"),
])
def test_faiss_settings_out_of_range_are_refused(override, needle):
    """They ran without a word (FAISS took nprobe 0 as 1; a user's probe)."""
    with pytest.raises(ConfigError, match=needle):
        load_pipeline_config(overrides=[override])


def test_numpy_integers_are_integers(tmp_path):
    config = load_pipeline_config("low_memory")
    config.isne.epochs = np.int64(2)
    from hades_gpu.config import validate

    validate(config)
    from hades_gpu.isne.stage import NotAnIngestOutputError

    with pytest.raises(NotAnIngestOutputError):  # the arguments passed; the folder is no output
        ISNETrainingPipeline(config).train(corpus_path=tmp_path, epochs=np.int64(1), batch_size=np.int32(8))


@pytest.mark.parametrize("paths", ["", [""], ["ok.md", ""]])
def test_an_empty_source_path_is_refused_not_read_as_the_working_directory(tmp_path, monkeypatch, paths):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "private.txt").write_text("not for the dataset")
    (tmp_path / "ok.md").write_text("text")
    config = load_pipeline_config("low_memory", ["isne.enabled=false", "monitoring.progress=off"])
    with pytest.raises(ConfigError, match=r"^an empty path is not a source"):
        TextParallelPipeline(config).process_batch(paths, output=tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("paths", [None, 5, [3]])
def test_paths_that_are_no_paths_are_one_type_error(tmp_path, paths):
    config = load_pipeline_config("low_memory", ["isne.enabled=false"])
    with pytest.raises(TypeError, match=r"^paths must be"):
        TextParallelPipeline(config).process_batch(paths, output=tmp_path / "out")


def test_threads_may_load_configs_at_once():
    """Hydra's GlobalHydra is one per process: a second thread composing raised "GlobalHydra is
    already initialized"."""
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def load() -> None:
        barrier.wait()
        try:
            for _ in range(3):
                load_pipeline_config("low_memory", ["isne.epochs=2"])
        except BaseException as err:  # noqa: BLE001 - handed to the test's thread
            errors.append(err)

    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_using_the_library_leaves_the_callers_environment_alone(tmp_path):
    """HF_HUB_OFFLINE=1 set at import made a user's own `hf_hub_download` in the same process fail."""
    script = (
        "import os\n"
        "from hades_gpu.config import load_pipeline_config\n"
        "from hades_gpu.pipelines import TextParallelPipeline\n"
        "from hades_gpu.embedding.export import load_torch_model\n"
        "load_torch_model()\n"
        "cfg = load_pipeline_config('low_memory', ['isne.enabled=false', 'monitoring.progress=off'])\n"
        f"TextParallelPipeline(cfg).process_batch([{str(REPO / 'examples' / 'sample_corpus')!r}], "
        f"output={str(tmp_path / 'out')!r})\n"
        "print('HF_HUB_OFFLINE=' + repr(os.environ.get('HF_HUB_OFFLINE')))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "HF_HUB_OFFLINE=None" in proc.stdout


def test_the_result_names_the_output_absolutely(tmp_path, monkeypatch, embedder):
    """A relative output given before an os.chdir no longer pointed at the output afterwards."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.md").write_text("Some text to ingest.\n")
    config = load_pipeline_config("low_memory", ["isne.enabled=false", "monitoring.progress=off"])
    result = TextParallelPipeline(config, embedder=embedder).process_batch(["corpus"], output="out")
    assert result.output_dir == tmp_path / "out" and result.output_dir.is_absolute()


def test_an_output_path_that_is_not_utf8_is_refused_before_anything_is_written(tmp_path):
    """pyarrow takes text paths only: the whole run was done, then a UnicodeEncodeError traceback, and
    a lock, a manifest and claims were left in a half-made output."""
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "a.md").write_text("hello\n")
    out = os.fsdecode(os.fsencode(str(tmp_path)) + b"/o\xffut")
    cfg = load_pipeline_config("low_memory", ["monitoring.progress=off", "isne.enabled=false"])
    with pytest.raises(ConfigError, match=r"output folder .*o\\xffut is not valid UTF-8"):
        TextParallelPipeline(cfg).process_batch([tmp_path / "c"], output=out)
    assert sorted(os.listdir(tmp_path)) == ["c"]


def test_a_path_holding_an_interpolation_says_why_it_cannot_be_an_override():
    """`corpus=d${x}` said only "Interpolation key 'x' not found" (no way to quote it helps)."""
    with pytest.raises(ConfigError, match=r"Interpolation key 'x' not found.*a path that holds '\$\{' cannot be given"):
        load_pipeline_config(overrides=["corpus=/data/d${x}"])


def test_no_more_workers_than_documents_and_a_warning_past_the_cores(caplog):
    """num_workers=16 for 7 documents started 16 workers (2.4x the time, 2.2x the memory of one), and
    high_throughput's 4 workers on 2 cores said nothing."""
    import logging

    from hades_gpu.pipelines.ingest import _worker_count

    cores = len(os.sched_getaffinity(0))
    with caplog.at_level(logging.WARNING, logger="hades_gpu.pipelines.ingest"):
        assert _worker_count(16, 7) == 7 and _worker_count(2, 1) == 1 and _worker_count(1, 100) == 1
        caplog.clear()
        assert _worker_count(cores + 2, 1000) == cores + 2
    assert [r.getMessage() for r in caplog.records if "usable core(s)" in r.getMessage()] == [
        f"profile.num_workers={cores + 2} on {cores} usable core(s): the workers share the cores (more memory, no "
        "more speed) and the embedder needs one too; a profile with fewer workers fits this box"]


@pytest.mark.parametrize("key, value, needle", [("dim", 512, "embedder.dim must be 384"),
                                                ("model_dir", "/nonexistent/model", "embedder.model_dir must name")])
def test_an_embedder_setting_the_run_refuses_leaves_no_output_behind(tmp_path, key, value, needle):
    """`embedder.dim = 512` or a missing `embedder.model_dir` was one clear error, raised after the
    output was made: its lock, manifest, claims and empty folders stayed behind."""
    config = load_pipeline_config("low_memory")
    setattr(config.embedder, key, value)
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.md").write_text("text")
    with pytest.raises(Exception, match=re.escape(needle)):
        TextParallelPipeline(config).process_batch([tmp_path / "corpus"], output=tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("call", ["train", "output"])
@pytest.mark.parametrize("value", [3, 2.5, ["a"]])
def test_an_output_or_corpus_path_that_is_no_path_is_one_type_error_naming_the_argument(tmp_path, call, value):
    """`train(corpus_path=5)` and `process_batch(..., output=3)` raised pathlib's bare "expected str,
    bytes or os.PathLike object, not int"."""
    config = load_pipeline_config("low_memory", ["monitoring.progress=off"])
    (tmp_path / "a.md").write_text("text")
    name = "corpus_path" if call == "train" else "output"
    with pytest.raises(TypeError, match=f"^{name} must be a path .*got {type(value).__name__}"):
        if call == "train":
            ISNETrainingPipeline(config).train(corpus_path=value)
        else:
            TextParallelPipeline(config).process_batch([tmp_path / "a.md"], output=value)


def test_a_bytes_output_path_is_taken_as_bytes_sources_are(tmp_path, embedder):
    """Sources given as bytes were ingested, while `train(corpus_path=b"out")` failed in pathlib."""
    config = load_pipeline_config("low_memory", ["monitoring.progress=off", "isne.enabled=false"])
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.md").write_text("# A\n\nA note about circles and their areas, for the graph.\n")
    out = os.fsencode(tmp_path / "out")
    result = TextParallelPipeline(config, embedder=embedder).process_batch([os.fsencode(tmp_path / "corpus")], output=out)
    assert result.chunks_written >= 1 and (tmp_path / "out" / "chunks").is_dir()
    trained = ISNETrainingPipeline(config).train(corpus_path=out, epochs=1)
    assert trained.output_dir == tmp_path / "out"


def test_a_profile_argument_and_a_profile_override_that_differ_are_refused():
    """`load_pipeline_config(profile="balanced", overrides=["profile=low_memory"])` gave low_memory,
    silently; the same profile twice, or the override alone, is fine."""
    with pytest.raises(ConfigError, match="name two profiles"):
        load_pipeline_config(profile="balanced", overrides=["profile=low_memory"])
    assert load_pipeline_config(overrides=["profile=low_memory"]).profile.name == "low_memory"
    assert load_pipeline_config("low_memory", ["profile=low_memory"]).profile.name == "low_memory"
    assert load_pipeline_config().profile.name == "balanced"
    assert load_pipeline_config("low_memory", ["profile='low_memory'"]).profile.name == "low_memory"  # quoted: the same
    with pytest.raises(ConfigError, match="'profile=balanced'"):  # the override that differs is named
        load_pipeline_config("low_memory", ["profile=balanced", "profile=low_memory"])


def test_a_blank_output_path_object_is_refused_as_a_blank_string_is(tmp_path, monkeypatch):
    """`output="   "` was refused, `output=Path("   ")` made a folder named three spaces in the
    working directory."""
    from pathlib import Path

    monkeypatch.chdir(tmp_path)
    (tmp_path / "a.md").write_text("text")
    config = load_pipeline_config("low_memory", ["monitoring.progress=off", "isne.enabled=false"])
    for blank in ("   ", Path("   "), b"  "):
        with pytest.raises(ConfigError, match="an output folder is required"):
            TextParallelPipeline(config).process_batch([tmp_path / "a.md"], output=blank)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.md"]
