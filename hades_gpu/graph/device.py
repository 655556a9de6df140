"""Turn a device string from the config (`auto | cpu | cuda | cuda:N`) into a `torch.device`."""

from __future__ import annotations

import torch


def resolve_device(spec: str = "auto") -> torch.device:
    """`auto` picks CUDA when torch sees a device, else the CPU; an explicit CUDA request without a
    device is an error (never a silent fall back to a 100x slower path)."""
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(spec)
    except RuntimeError as err:
        raise ValueError(f"device must be one of auto|cpu|cuda|cuda:N (got {spec!r})") from err
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {spec!r} requested but torch.cuda.is_available() is False "
                         "(use device=auto or device=cpu)")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be one of auto|cpu|cuda|cuda:N (got {spec!r})")
    return dev
