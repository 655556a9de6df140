"""An ingest job must not reach the network on its own: `import openvino` started OpenVINO's usage
telemetry (a usage count in ~/intel/stats and events sent to Google Analytics from a forked process,
whose traceback a SIGTERM to the run printed). `hades_gpu.optional.import_openvino` imports it
without, and the package's own code imports OpenVINO only through it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from corpus_helpers import REPO

_PROBE = """
import sys
from hades_gpu.config import load_pipeline_config
from hades_gpu.embedding.factory import build_embedder
cfg = load_pipeline_config(overrides=["embedder.cache_dir=" + sys.argv[1]])
emb = build_embedder(cfg)
print(emb.description, "openvino_telemetry" in sys.modules)
emb.close()
"""


def test_the_local_embedder_starts_openvino_without_its_telemetry(tmp_path):
    from hades_gpu.embedding.export import model_cache_dir

    home = tmp_path / "home"
    home.mkdir()
    cache = model_cache_dir("").parent  # the built IR is reused; only HOME is new
    env = {**os.environ, "HOME": str(home)}
    env.pop("CI", None)  # OpenVINO's converter turns its telemetry off in CI: this test must see it
    done = subprocess.run([sys.executable, "-c", _PROBE, str(cache)], env=env, capture_output=True, text=True,
                          timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().endswith("False"), done.stdout
    assert not (home / "intel").exists(), sorted(p.name for p in (home / "intel").iterdir())


def test_the_package_imports_openvino_only_through_import_openvino():
    direct = re.compile(r"^\s*(import openvino\b|from openvino\b)", re.M)
    offenders = [str(p.relative_to(REPO)) for p in sorted((REPO / "hades_gpu").rglob("*.py"))
                 if p.name != "optional.py" and direct.search(p.read_text())]
    assert offenders == []
