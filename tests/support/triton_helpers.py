"""Whether a real tritonserver can run here (shared by tests/triton; importable under importlib mode)."""

from __future__ import annotations

from hades_gpu.embedding.triton_server import TritonServerError, find_server


def _unavailable() -> str:
    try:
        find_server()
    except TritonServerError as err:
        return str(err)
    return ""


UNAVAILABLE = _unavailable()
