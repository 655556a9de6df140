"""The ISNE checkpoint: θ, the node (chunk) id of each row, and the config it was trained with, in one
safetensors file.

Node ids are stored as UTF-8 bytes + offsets (uint8 / int64 tensors): a JSON list in the header
would not scale to millions of ids. The file is written through `store.atomic` (fsync'd, renamed).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

from hades_gpu.records import error_line
from hades_gpu.store.atomic import atomic_write_with
from hades_gpu.store.reader import DamagedOutputError

CHECKPOINT_FORMAT = "hades-isne/1"


class DamagedCheckpointError(DamagedOutputError, ValueError):
    """The file is no ISNE checkpoint or cannot be read whole (one line naming it)."""


@dataclass
class IsneCheckpoint:
    """θ (N, d) float32 on the CPU, the node id of each row, and the config it was trained with."""

    theta: Tensor
    node_ids: list[str]
    config: dict[str, Any]


def _encode_ids(ids: Sequence[str]) -> tuple[Tensor, Tensor]:
    raw = [s.encode("utf-8") for s in ids]
    lengths = np.fromiter((len(b) for b in raw), dtype=np.int64, count=len(raw))
    offsets = np.zeros(len(raw) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    data = np.frombuffer(b"".join(raw), dtype=np.uint8).copy()
    return torch.from_numpy(data), torch.from_numpy(offsets)


def _decode_ids(data: Tensor, offsets: Tensor) -> list[str]:
    buf = data.numpy().tobytes()
    off = offsets.tolist()
    return [buf[off[i]:off[i + 1]].decode("utf-8") for i in range(len(off) - 1)]


def save_checkpoint(path: str | Path, theta: Tensor, node_ids: Sequence[str], config: dict[str, Any]) -> Path:
    """Write θ, the node ids (UTF-8 bytes + offsets, as uint8/int64 tensors: a header-sized JSON list
    would not scale to millions of ids) and the config (JSON in the safetensors metadata)."""
    from safetensors.torch import save_file

    if theta.dim() != 2 or theta.shape[0] != len(node_ids):
        raise ValueError(f"theta must be (len(node_ids), d) = ({len(node_ids)}, d) (got {tuple(theta.shape)})")
    path = Path(path)
    data, offsets = _encode_ids(node_ids)
    tensors = {"theta": theta.detach().float().cpu().contiguous(), "node_ids_bytes": data, "node_ids_offsets": offsets}
    metadata = {"format": CHECKPOINT_FORMAT, "config": json.dumps(config, default=str)}
    atomic_write_with(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
    return path


def load_checkpoint(path: str | Path) -> IsneCheckpoint:
    from safetensors import safe_open

    """Read a checkpoint. Raises `DamagedCheckpointError` (one line) when the file is no ISNE
    checkpoint or is damaged (truncated, bad header, tensors missing or not matching)."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != CHECKPOINT_FORMAT:
                raise DamagedCheckpointError(f"{path} is not an ISNE checkpoint (format {meta.get('format')!r}, "
                                             f"expected {CHECKPOINT_FORMAT!r})")
            theta = f.get_tensor("theta")
            ids = _decode_ids(f.get_tensor("node_ids_bytes"), f.get_tensor("node_ids_offsets"))
            config = json.loads(meta.get("config", "{}"))
        if theta.dim() != 2 or theta.shape[0] != len(ids):
            raise DamagedCheckpointError(f"{path}: θ has shape {tuple(theta.shape)} for {len(ids)} node ids")
    except DamagedCheckpointError:
        raise
    except FileNotFoundError:
        raise
    except Exception as err:  # noqa: BLE001 - safetensors' errors have no common base: any is damage
        raise DamagedCheckpointError(f"{path}: damaged ISNE model ({type(err).__name__}: {error_line(err, 300)})") from err
    return IsneCheckpoint(theta=theta, node_ids=ids, config=config)
