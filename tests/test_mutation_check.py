"""scripts/mutation_check.py's own logic: survivor classification and the score it reports."""

from __future__ import annotations

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "mutation_check.py"
spec = importlib.util.spec_from_file_location("mutation_check", SCRIPT)
mc = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mc)


def test_message_text_log_calls_and_known_equivalents_are_classified_and_the_rest_is_not():
    assert mc.classify(['-    raise ValueError(f"bad {x} value")', '+    raise ValueError(f"XXbad {x} valueXX")']) \
        .startswith("equivalent")
    assert mc.classify(['-    log.info("resume: removed %d", n)', '+    log.info(None, n)']).startswith("equivalent")
    assert mc.classify(['-    total += 1', '+    total = 1']) == "unexplained"
    assert mc.classify(['-    key = "shard"', '+    key = "XXshardXX"']) == "unexplained"  # a key, no space: not text
    assert mc.classify(['-  a', '+  b'], "pkg.mod.xǁNvmlProbeǁread__mutmut_1").startswith("equivalent here")
    assert mc.module_of("hades_gpu.store.writer.xǁDatasetWriterǁclose__mutmut_3") == "hades_gpu/store/writer.py"


def test_score_leaves_equivalent_survivors_and_unchecked_mutants_out():
    mutants = [(f"hades_gpu.store.m.x_f__mutmut_{i}", s) for i, s in enumerate(
        ["killed"] * 7 + ["timeout"] + ["survived"] * 2 + ["no tests"] + ["not checked"] * 5)]
    survivors = [{"name": mutants[8][0], "diff": [], "reason": "equivalent (by pattern): log text"},
                 {"name": mutants[9][0], "diff": [], "reason": "unexplained"}]
    g = mc.summarise([{"group": "store", "rc": 0, "seconds": 60.0, "mutants": mutants, "survivors": survivors,
                       "tests": ["tests/store"]}])["groups"][0]
    assert (g["total"], g["not_checked"], g["equivalent"]) == (11, 5, 1)
    assert g["kill_rate"] == round(8 / 11, 3) and g["score"] == 0.8 and g["met"] is True  # 8 / (11 - 1)


def test_reclassify_recomputes_the_score_from_stored_survivors():
    summary = {"groups": [{"group": "graph", "total": 10, "killed": 6, "timeout": 1, "target": 0.7}],
               "survivors": {"graph": [
                   {"name": "hades_gpu.graph.x_f__mutmut_1", "diff": ['-    log.info("a b %d", n)', '+    log.info(None, n)'],
                    "reason": "unexplained"},
                   {"name": "hades_gpu.graph.x_f__mutmut_2", "diff": ['-    x += 1', '+    x = 1'], "reason": "old"}]}}
    g = mc.reclassify(summary)["groups"][0]
    reasons = [sv["reason"] for sv in summary["survivors"]["graph"]]
    assert reasons[0].startswith("equivalent") and reasons[1] == "unexplained"
    assert (g["equivalent"], g["score"], g["met"]) == (1, round(7 / 9, 3), True)


def test_every_group_has_a_default_time_and_all_fit_in_an_hour():
    assert set(mc.DEFAULT_MINUTES) == set(mc.GROUPS) and sum(mc.DEFAULT_MINUTES.values()) < 60
