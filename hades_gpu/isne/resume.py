"""ISNE's training state between epochs, so a killed or interrupted training goes on where it stopped.

On a large graph ISNE trains for as long as the ingest took (`isne.time_budget_vs_embedding`): hours
on a big corpus. Without this, a `hades-isne` killed in its last epoch started again from epoch 1.
Now the trainer writes `<output>/isne/training-state.pt` at epoch ends (at most every
`isne.checkpoint_interval_s`): θ, the optimizer's state, the random generator's state, early
stopping's best θ and counters, the history and the seconds already trained (the time budget counts
them). The next training of the same graph with the same settings loads it and runs the remaining
epochs: as the random streams are restored too, the result is the one an uninterrupted run gives.

The state is keyed (`training_key`) by what decides the training's course: the graph (node count,
edge list, edge weights), the ISNE settings that shape a step, the device type (a CUDA generator's
stream is not a CPU one) and the batch size. Keys that may change between the two runs without
changing the course: `epochs` (train longer), the budgets, `patience`, `device` as long as its type
is the same. A state of another graph or other settings is not used (one log line) and is replaced
at the next save; a damaged one likewise. The stage removes the state once the model is written.

`torch.save` / `torch.load(weights_only=True)`: the state is tensors, numbers, strings, lists and
dicts, which the restricted unpickler loads; nothing else in the file is trusted.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor

from hades_gpu.config import IsneConfig
from hades_gpu.records import error_line
from hades_gpu.store.atomic import atomic_write_with

log = logging.getLogger(__name__)

TRAINING_STATE_FORMAT = "hades-isne-training-state/1"

# IsneConfig keys a resumed training may change: they end it sooner or later, never change a step
RESUMABLE_CHANGES = frozenset({
    "enabled", "epochs", "time_budget_s", "time_budget_vs_embedding", "patience", "keep_freed_memory",
    "device", "retrain", "infer_rounds", "checkpoint_interval_s", "resume",
})


@dataclass
class TrainingState:
    """Everything the trainer needs to run epoch `epoch + 1` as if it had never stopped."""

    key: str
    epoch: int  # epochs completed
    theta: Tensor  # (N, d), CPU
    optimizer: dict[str, Any]  # torch.optim.Optimizer.state_dict()
    generator: Tensor  # the training generator's state (torch.Generator.get_state())
    train_seconds: float  # optimisation seconds already spent (the time budget counts them)
    pos_pairs: int
    best_epoch: int
    stopper: dict[str, Any]  # EarlyStopper: best, bad
    best_theta: Optional[Tensor] = None  # early stopping's best θ when it is not the last epoch's
    history: list[dict[str, Any]] = field(default_factory=list)


def _digest_tensor(digest: "hashlib._Hash", tensor: Optional[Tensor]) -> None:
    if tensor is None:
        digest.update(b"none")
        return
    array = np.ascontiguousarray(tensor.detach().cpu().numpy())
    digest.update(f"{array.dtype}{array.shape}".encode())
    digest.update(memoryview(array).cast("B"))


def training_key(edge_index: Tensor, num_nodes: int, edge_weight: Optional[Tensor], cfg: IsneConfig, *,
                 aggregate: bool, device_type: str, batch_size: int, max_batches_per_epoch: Optional[int]) -> str:
    """A digest of what decides the training's course (module docstring); equal keys, equal course."""
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in RESUMABLE_CHANGES}
    settings.update(num_nodes=int(num_nodes), aggregate=bool(aggregate), device_type=device_type,
                    batch_size=int(batch_size), max_batches_per_epoch=max_batches_per_epoch)
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    _digest_tensor(digest, edge_index)
    _digest_tensor(digest, edge_weight)
    return digest.hexdigest()


def save_training_state(path: Path, state: TrainingState) -> None:
    """Write `state` atomically (a kill while saving leaves the previous state, never a torn one)."""
    payload = dataclasses.asdict(state)
    payload["format"] = TRAINING_STATE_FORMAT
    atomic_write_with(Path(path), lambda tmp: _save_to_file(payload, tmp))


def _save_to_file(payload: dict, tmp: Path) -> None:
    # through a Python file object: a write that fails is then an OSError (the context of torch's
    # RuntimeError, "unexpected pos"), which `atomic_write_with` raises as the one line it is
    with open(tmp, "wb") as fh:
        torch.save(payload, fh)


def _damage(err: Exception) -> str:
    """Why torch could not read a state file, short: its own message for garbage was 500 characters
    advising `weights_only=False` (unsafe, and no help for a damaged file); a truncated file read as
    a bare "[Errno 22] Invalid argument"."""
    text = error_line(err)
    detail = "" if "weights_only" in text else f": {text[:80]}"
    return f"damaged: torch cannot read it ({type(err).__name__}{detail})"


def load_training_state(path: Path, key: str) -> Optional[TrainingState]:
    """The saved state for `key`, or None: no file, another graph or other settings, or a damaged
    file (each but the first said in one log line; the file is replaced at the next save)."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        payload = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - random bytes raise any of a dozen types: damage, start afresh
        log.warning("isne: ignoring the training state %s (%s); training from the start", path, _damage(err))
        return None
    try:
        if not isinstance(payload, dict) or payload.pop("format", None) != TRAINING_STATE_FORMAT:
            raise ValueError("not an ISNE training state")
        state = TrainingState(**payload)
    except (TypeError, ValueError) as err:
        log.warning("isne: ignoring the training state %s (%s); training from the start", path, error_line(err))
        return None
    if state.key != key:
        log.info("isne: the training state %s is for another graph or other settings; training from the start",
                 path)
        return None
    return state


def discard_training_state(path: Path) -> None:
    """Remove the state once the trained model is written (it would only resume a finished run)."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


__all__ = ["TrainingState", "training_key", "save_training_state", "load_training_state",
           "discard_training_state", "RESUMABLE_CHANGES", "TRAINING_STATE_FORMAT"]
