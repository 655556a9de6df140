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
