"""The small version of scripts/eval_isne.py: ISNE >= Node2Vec, held-out accuracy >= 0.9x training."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))

import eval_isne  # noqa: E402


def test_small_eval(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "eval.json"
    assert eval_isne.main(["--small", "--device", "cpu", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    printed = capsys.readouterr().out
    assert "held-out / training accuracy" in printed
    assert report["nodes"] == 4000 and report["isne_epochs"] == report["node2vec_epochs"] == 10
    assert report["isne_acc"] > 0.5  # 10 communities: chance is 0.1
    assert report["isne_acc"] >= report["node2vec_acc"]
    assert report["inductive_ratio"] >= 0.9
