"""Every section a user tunes has a config group in conf/ (graph, gpu, chunking, documents,
monitoring, plus profile, embedder, isne), composed by the CLI and `load_pipeline_config` alike."""

from __future__ import annotations

import dataclasses

import pytest

from hades_gpu.config import (ChunkingConfig, ConfigError, DocumentsConfig, GpuConfig, GraphConfig, MonitoringConfig,
                              SearchConfig, conf_dir, load_pipeline_config)

SECTIONS = {"graph": GraphConfig, "gpu": GpuConfig, "chunking": ChunkingConfig, "documents": DocumentsConfig,
            "monitoring": MonitoringConfig, "search": SearchConfig}


@pytest.mark.parametrize("section", sorted(SECTIONS))
def test_each_section_has_a_group_whose_defaults_are_the_schemas(section):
    assert (conf_dir() / section / "default.yaml").is_file()
    assert "  - " + section + ": default" in (conf_dir() / "config.yaml").read_text()
    got = getattr(load_pipeline_config(), section)
    assert dataclasses.asdict(got) == dataclasses.asdict(SECTIONS[section]())


@pytest.mark.parametrize("section", sorted([*SECTIONS, "isne"]))
def test_each_group_file_names_every_key_of_its_section(section):
    """conf/isne/default.yaml lacked device, seed and retrain, which hades-verify's own advice uses
    (`isne.retrain=true`): the values agreed only because the dataclass filled them in."""
    import yaml

    from hades_gpu.config import IsneConfig

    schema = {**SECTIONS, "isne": IsneConfig}[section]
    keys = set(yaml.safe_load((conf_dir() / section / "default.yaml").read_text())) - {"defaults"}
    assert keys == {f.name for f in dataclasses.fields(schema)}


def test_group_values_are_overridable_and_validated():
    cfg = load_pipeline_config("balanced", ["graph.knn_k=3", "gpu.mem_high=0.8", "chunking.overlap_tokens=16",
                                            "monitoring.progress=off", "documents.decode_errors=replace"])
    assert (cfg.graph.knn_k, cfg.gpu.mem_high, cfg.chunking.overlap_tokens) == (3, 0.8, 16)
    assert (cfg.monitoring.progress, cfg.documents.decode_errors) == ("off", "replace")
    with pytest.raises(ConfigError, match=r"gpu.mem_low/mem_high must be 0 < low < high <= 1 \(got mem_low=0.75, mem_high=0.7\)"):
        load_pipeline_config("balanced", ["gpu.mem_high=0.7"])
    with pytest.raises(ConfigError, match=r"monitoring.progress must be one of auto\|on\|off"):
        load_pipeline_config("balanced", ["monitoring.progress=sometimes"])
    with pytest.raises(ConfigError, match="graph"):
        load_pipeline_config("balanced", ["graph.no_such_key=1"])


def test_the_python_api_names_the_choices_of_an_unknown_group_and_takes_one_override_as_a_string():
    """`load_pipeline_config(profile="nosuch")` ended in "Available options in 'profile':" and no
    list (the list is on Hydra's next lines); a single override passed as a string was parsed
    character by character ("Error parsing override 'i' missing EQUAL")."""
    from hades_gpu.config import ConfigError, load_pipeline_config

    with pytest.raises(ConfigError, match=r"profile/nosuch' \(choose profile= one of: balanced, high_throughput, low_memory\)$"):
        load_pipeline_config(profile="nosuch")
    with pytest.raises(ConfigError, match=r"choose embedder= one of: local, triton"):
        load_pipeline_config(overrides=["embedder=nosuch"])
    assert load_pipeline_config(overrides="isne.enabled=false").isne.enabled is False


@pytest.mark.parametrize("override, needle", [
    ("documents.fallback_encodings=[utf-16,nope-enc]", "documents.fallback_encodings"),
    ("monitoring.prometheus_port=70000", "monitoring.prometheus_port"),
    ("monitoring.log_interval_s=0", "monitoring.log_interval_s"),
    ("graph.knn_target_recall=1.5", "graph.knn_target_recall"),
    ("graph.sequence_weight=-1", "graph.sequence_weight"),
    ("graph.knn_threads=-3", "graph.knn_threads"),
    ("graph.knn_exact_max_nodes=-5", "graph.knn_exact_max_nodes"),
    ("embedder.threads=-2", "embedder.threads"),
    ("embedder.streams=-1", "embedder.streams"),
    ("embedder.device=tpu", "embedder.device"),
    ("gpu.device=bogus", "gpu.device"),
])
def test_values_that_failed_only_at_run_time_are_refused_at_load_naming_the_key(override, needle):
    """Each loaded without a word and then failed in the run (every file a decode_error, a port
    traceback) or was silently ignored (a recall target of 1.5, progress lines turned off)."""
    with pytest.raises(ConfigError, match=needle):
        load_pipeline_config("balanced", [override])


def test_the_python_api_takes_none_for_defaults_and_refuses_other_types_in_one_error():
    assert load_pipeline_config(None, None).profile.name == "balanced"
    for profile, overrides, needle in ((3, [], "profile must be a profile name"),
                                       ("balanced", [None], "overrides must be strings"),
                                       ("balanced", [3], "overrides must be strings"),
                                       ("balanced", ["=3"], "bad config override"),
                                       ("balanced", ["profile.num_workers=abc"], "could not be converted")):
        with pytest.raises(ConfigError, match=needle):
            load_pipeline_config(profile, overrides)
