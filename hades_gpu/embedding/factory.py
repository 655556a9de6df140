"""Pick the embedder a config asks for: in-process (CPU runtimes or CUDA) or a Triton server."""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

from hades_gpu.config import EmbedderName, PipelineConfig
from hades_gpu.embedding.base import Embedder
from hades_gpu.exit_guard import interrupts_held
from hades_gpu.gpu.device import following, select_device


def device_spec(cfg: PipelineConfig) -> str:
    """The device the local embedder runs on: ``embedder.device``, or ``gpu.device`` when that is auto."""
    return following(cfg.embedder.device, cfg.gpu.device)


def build_embedder(cfg: PipelineConfig, governor: Optional[Any] = None) -> Embedder:
    """The embedder for `cfg.embedder`: ``local`` -> `LocalEmbedder` on the CPU or `CudaEmbedder` on
    CUDA; ``triton`` -> `TritonEmbedder`. Heavy modules are imported only for the one chosen.

    Args:
        cfg (PipelineConfig): the whole job's config (CudaEmbedder also reads ``gpu`` and ``profile``).
        governor (MemoryGovernor, optional): handed to CudaEmbedder on CUDA; ignored otherwise.

    Raises:
        DeviceError: the device asked for (``embedder.device``, else ``gpu.device``) is not visible.
        MissingDependencyError: a package the chosen embedder needs is not installed (one line).
    """
    from hades_gpu.documents.tokenizer import use_model_dir

    ecfg = cfg.embedder
    use_model_dir(ecfg.model_dir)
    if ecfg.name == EmbedderName.TRITON:
        with interrupts_held():  # a native import cut by Ctrl-C stays broken in the process
            from hades_gpu.embedding.triton import TritonEmbedder

        return TritonEmbedder(ecfg)  # its connection waits: Ctrl-C acts at once
    if ecfg.name != "local":
        raise ValueError(f"embedder.name must be one of local|triton (got {ecfg.name!r})")
    device = str(select_device(device_spec(cfg)))
    # the runtime's import and the model's load (seconds): Ctrl-C meanwhile acts when they are done
    with interrupts_held():
        if device.startswith("cuda"):
            from hades_gpu.embedding.cuda_embedder import CudaEmbedder

            return CudaEmbedder(dataclasses.replace(cfg, embedder=dataclasses.replace(ecfg, device=device)), governor)
        from hades_gpu.embedding.local import LocalEmbedder

        return LocalEmbedder(dataclasses.replace(ecfg, device="cpu"))
