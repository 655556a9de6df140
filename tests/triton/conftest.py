"""A real Triton server for the whole test session (the nvidia-pytriton wheel's binary on a CPU box).

The tests here are skipped only where that server cannot run at all (no wheel, no stub for this
Python, not Linux, numpy >= 2); the reason is printed in the session header and in each skip.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from hades_gpu.embedding.triton_server import TritonServer, find_server
from requirements import skip_or_fail  # tests/support (pytest `pythonpath`)
from triton_helpers import UNAVAILABLE  # tests/support (pytest `pythonpath`)

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def pytest_report_header(config):  # noqa: ARG001 - pytest hook signature
    return f"tritonserver: {'unavailable: ' + UNAVAILABLE if UNAVAILABLE else find_server().executable}"


def pytest_collection_modifyitems(config, items):  # noqa: ARG001
    here = Path(__file__).parent
    for item in items:
        if Path(str(item.fspath)).parent == here:
            item.add_marker(pytest.mark.triton)


@pytest.fixture(scope="session")
def triton_server(tmp_path_factory):
    """`TritonServer` serving minilm_python and the minilm_text ensemble (minilm_tokenizer, then that
    same minilm_python) on free 127.0.0.1 ports, stopped at session end."""
    if UNAVAILABLE:
        skip_or_fail(f"tritonserver cannot run here: {UNAVAILABLE}")
    log_file = tmp_path_factory.mktemp("triton") / "tritonserver.log"
    server = TritonServer(models=["minilm_python", "minilm_text"], log_file=log_file)
    server.start()
    yield server
    server.stop()
