"""metrics.json's carried ingest totals: a resume that finds nothing new keeps the embedding timing,
a damaged previous file costs only the history, by-hand shard files are summed."""

from __future__ import annotations

import json
import logging

import pytest

from hades_gpu.config import IsneConfig
from hades_gpu.isne.stage import training_budget_s
from hades_gpu.store.metrics_file import ingest_seconds_per_chunk, ingest_totals, read_metrics, write_metrics


def test_totals_add_runs_that_wrote_chunks_and_carry_over_the_rest(tmp_path) -> None:
    path = tmp_path / "metrics.json"
    first = write_metrics(path, {"wall_s": 30.0, "chunks": 600})
    assert first["ingest_totals"] == {"runs": 1, "wall_s": 30.0, "chunks": 600}
    write_metrics(path, {"wall_s": 0.5, "chunks": 0})  # a resume with nothing new
    on_disk = json.loads(path.read_text())
    assert on_disk["chunks"] == 0 and on_disk["wall_s"] == 0.5  # the file is the latest run's
    assert on_disk["ingest_totals"] == {"runs": 1, "wall_s": 30.0, "chunks": 600}
    write_metrics(path, {"wall_s": 10.0, "chunks": 100})  # a resume with new documents
    assert json.loads(path.read_text())["ingest_totals"] == {"runs": 2, "wall_s": 40.0, "chunks": 700}
    assert training_budget_s(IsneConfig(), tmp_path, 700) == pytest.approx(40.0)
    again = write_metrics(path, {"wall_s": 10.0, "chunks": 100})  # 3rd run
    write_metrics(path, {**again, "isne": {"mode": "trained"}})  # the same run, rewritten
    assert json.loads(path.read_text())["ingest_totals"] == {"runs": 3, "wall_s": 50.0, "chunks": 800}


def test_a_file_from_before_totals_seeds_them() -> None:
    assert ingest_totals({"wall_s": 12.0, "chunks": 40}, 0.3, 0) == {"runs": 1, "wall_s": 12.0, "chunks": 40}
    assert ingest_totals({"wall_s": 1.0, "chunks": 0}, 0.3, 0) == {"runs": 0, "wall_s": 0.0, "chunks": 0}
    assert ingest_totals({"ingest_totals": {"runs": "x"}}, 2.0, 5) == {"runs": 1, "wall_s": 2.0, "chunks": 5}
    assert ingest_totals(None, 2.0, 5) == {"runs": 1, "wall_s": 2.0, "chunks": 5}


@pytest.mark.parametrize("damage", [b"{not json", b"[1, 2]", b"\xff\xfe\x00"])
def test_a_damaged_previous_file_is_one_warning_and_the_run_still_writes(tmp_path, caplog, damage) -> None:
    path = tmp_path / "metrics.json"
    path.write_bytes(damage)
    with caplog.at_level(logging.WARNING, logger="hades_gpu.store.metrics_file"):
        assert read_metrics(path) is None
        write_metrics(path, {"wall_s": 3.0, "chunks": 9})
    assert len([r for r in caplog.records if "ingest totals start again" in r.getMessage()]) == 2
    assert json.loads(path.read_text())["ingest_totals"] == {"runs": 1, "wall_s": 3.0, "chunks": 9}


def test_by_hand_shards_without_a_metrics_json_are_summed(tmp_path) -> None:
    write_metrics(tmp_path / "metrics-s0of2.json", {"wall_s": 20.0, "chunks": 100})
    write_metrics(tmp_path / "metrics-s1of2.json", {"wall_s": 10.0, "chunks": 200})
    per_chunk, source = ingest_seconds_per_chunk(tmp_path)
    assert per_chunk == pytest.approx(0.1) and "2 shard metrics file(s)" in source
    assert training_budget_s(IsneConfig(), tmp_path, 300) == pytest.approx(30.0)
    # metrics.json, when there is one, wins (a cluster run writes it over all shards)
    write_metrics(tmp_path / "metrics.json", {"wall_s": 6.0, "chunks": 300})
    assert ingest_seconds_per_chunk(tmp_path)[0] == pytest.approx(0.02)
    assert ingest_seconds_per_chunk(tmp_path / "nothing-here") is None
