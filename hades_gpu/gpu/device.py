"""Device selection: `auto | cpu | cuda | cuda:N` -> a `torch.device`, with errors that say why.

`auto` takes CUDA device 0 when torch sees one and the CPU otherwise; an explicit `cuda` / `cuda:N`
never falls back silently: asking for a GPU that is not there is a configuration error.
"""

from __future__ import annotations

import re

import torch

_SPEC = re.compile(r"^(auto|cpu|cuda)(?::(\d+))?$")


class DeviceError(ValueError):
    """A device spec is malformed or names a device that is not visible."""


def cuda_device_count() -> int:
    """CUDA devices torch can see (0 on a CPU build or without a driver)."""
    try:
        return int(torch.cuda.device_count()) if torch.cuda.is_available() else 0
    except Exception:  # a broken driver reads as "no GPU", the caller's error says what was asked
        return 0


def _no_cuda_detail() -> str:
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build"
    return f"torch {torch.__version__} (CUDA {torch.version.cuda}) finds no usable driver/device"


def following(spec: str, job_device: str) -> str:
    """A stage's device setting (`isne.device`, `graph.device`) with ``auto`` meaning the job's
    ``gpu.device``, as the embedder's does: with ``gpu.device=cuda:1`` (or ``cpu``) the kNN and ISNE
    ran on cuda:0 while the embedder ran on cuda:1."""
    return job_device if isinstance(spec, str) and spec.strip().lower() == "auto" else spec


def select_device(spec: str = "auto") -> torch.device:
    """Turn a config spec into a device.

    Args:
        spec (str): ``auto`` (CUDA device 0 if visible, else CPU), ``cpu``, ``cuda`` (device 0) or
            ``cuda:N``. Case and surrounding spaces are ignored.

    Raises:
        DeviceError: the spec is not one of the forms above, or names a CUDA device that is not
            visible (the message says how many are).
    """
    if not isinstance(spec, str):
        raise DeviceError(f"device must be a string auto|cpu|cuda|cuda:N (got {type(spec).__name__} {spec!r})")
    text = spec.strip().lower()
    match = _SPEC.match(text)
    if match is None or (match.group(1) != "cuda" and match.group(2) is not None):
        raise DeviceError(f"device must be one of auto|cpu|cuda|cuda:N (got {spec!r})")
    kind, index = match.group(1), match.group(2)
    count = cuda_device_count()
    if kind == "auto":
        return torch.device("cuda", 0) if count > 0 else torch.device("cpu")
    if kind == "cpu":
        return torch.device("cpu")
    idx = int(index) if index is not None else 0
    if count == 0:
        raise DeviceError(f"{text} requested but no CUDA device is visible ({_no_cuda_detail()})")
    if idx >= count:
        raise DeviceError(f"{text} requested but only {count} CUDA device(s) visible")
    return torch.device("cuda", idx)


def device_name(device: torch.device) -> str:
    """Human-readable name: the GPU's product name, or "cpu"."""
    if device.type == "cuda":
        return str(torch.cuda.get_device_name(device))
    return "cpu"
