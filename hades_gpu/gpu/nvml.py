"""The one way the package reads GPU memory: NVML for a CUDA device found by its UUID, or
``cudaMemGetInfo`` where NVML cannot name the device (a MIG slice, no pynvml).

Why by UUID, never by index: NVML numbers devices physically, CUDA after ``CUDA_VISIBLE_DEVICES``
(which may also name MIG slices), so index k of one is not index k of the other. The governor
(`gpu.nvml_governor`), the Prometheus probe (`orchestration.prometheus`) and the benchmarks all read
through `memory_reader` / `device_probes`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

Reader = Callable[[], "tuple[int, int]"]


def torch_device_uuid(device_index: int) -> Optional[str]:
    """The CUDA device's UUID as torch reports it (``xxxxxxxx-xxxx-...``, no prefix), or None."""
    import torch

    uuid = getattr(torch.cuda.get_device_properties(device_index), "uuid", None)
    return str(uuid) if uuid is not None else None


def nvml_uuid_candidates(uuid: str) -> list[str]:
    """NVML spellings of a CUDA UUID: NVML prefixes ``GPU-`` (a whole GPU) or ``MIG-`` (a MIG slice)."""
    text = uuid.strip()
    if text.startswith(("GPU-", "MIG-")):
        return [text]
    return [f"GPU-{text}", f"MIG-{text}"]


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def find_nvml_handle(pynvml: Any, uuid: str) -> "tuple[Optional[Any], str]":
    """NVML handle of the device whose UUID is `uuid`, or (None, why not).

    NVML numbers devices physically and CUDA numbers them after ``CUDA_VISIBLE_DEVICES`` (which may
    also name MIG slices), so an index is never trusted: only the UUID identifies the device. A whole
    GPU in MIG mode is refused, because its memory counters cover every slice, not the one CUDA uses.
    """
    for candidate in nvml_uuid_candidates(uuid):
        try:
            handle = pynvml.nvmlDeviceGetHandleByUUID(candidate.encode())
        except pynvml.NVMLError:
            continue
        got = _text(pynvml.nvmlDeviceGetUUID(handle))
        if got != candidate:  # pragma: no cover - a driver that answers for another device
            continue
        if candidate.startswith("GPU-"):
            try:
                current, _pending = pynvml.nvmlDeviceGetMigMode(handle)
            except pynvml.NVMLError:  # not supported (no MIG on this GPU)
                current = 0
            if current:
                return None, f"{candidate} is in MIG mode: its NVML counters cover every slice"
        return handle, candidate
    return None, f"no NVML device has UUID {uuid}"


def nvml_handle(device_index: int) -> "tuple[Any, Optional[Any], str]":
    """(pynvml, the NVML handle of CUDA device `device_index` found by its UUID, detail); the handle
    is None when NVML cannot name the device, and the detail then says why."""
    uuid = torch_device_uuid(device_index)
    try:
        import pynvml
    except ImportError:
        return None, None, "pynvml missing (pip install nvidia-ml-py)"
    if uuid is None:
        return pynvml, None, "torch reports no device UUID"
    try:
        pynvml.nvmlInit()
        handle, detail = find_nvml_handle(pynvml, uuid)
    except pynvml.NVMLError as err:
        return pynvml, None, f"NVML unavailable ({type(err).__name__}: {err})"
    return pynvml, handle, detail


def memory_reader(device_index: int, found: "Optional[tuple[Any, Optional[Any], str]]" = None
                  ) -> "tuple[Optional[Reader], str]":
    """A reader of CUDA device `device_index`'s used/total memory, and where it reads from.

    NVML by UUID when the device is found there; else ``cudaMemGetInfo`` (torch.cuda.mem_get_info),
    which always describes the device (or MIG slice) this process runs on. (None, why) without a GPU.
    `found`: an earlier `nvml_handle(device_index)`, so a caller that needs the handle too looks once.
    """
    try:
        import torch

        if not torch.cuda.is_available():
            return None, f"no CUDA device visible (torch {torch.__version__})"
        if device_index >= torch.cuda.device_count():
            return None, f"CUDA device {device_index} not visible ({torch.cuda.device_count()} device(s))"
    except ImportError as err:  # pragma: no cover - torch is a hard dependency
        return None, f"torch not importable: {err}"

    def read_cuda() -> "tuple[int, int]":
        free, total = torch.cuda.mem_get_info(device_index)
        return int(total - free), int(total)

    pynvml, handle, why = found if found is not None else nvml_handle(device_index)
    if handle is not None:
        try:
            pynvml.nvmlDeviceGetMemoryInfo(handle)  # probe once: a broken driver shows here

            def read_nvml() -> "tuple[int, int]":
                info = pynvml.nvmlDeviceGetMemoryInfo(handle)
                return int(info.used), int(info.total)

            return read_nvml, f"nvml {why}"
        except pynvml.NVMLError as err:
            why = f"NVML unavailable ({type(err).__name__}: {err})"
    try:
        read_cuda()
    except Exception as err:  # pragma: no cover - a device torch lists but cannot query
        return None, f"{why}; cudaMemGetInfo failed too ({type(err).__name__}: {err})"
    return read_cuda, f"cudaMemGetInfo on cuda:{device_index} ({why})"


@dataclass
class DeviceProbe:
    """Memory (and, through NVML, utilisation) of one CUDA device this process can use."""

    index: int  # the CUDA device index (after CUDA_VISIBLE_DEVICES)
    read_memory: Reader
    source: str
    read_utilization: Optional[Callable[[], float]] = None  # 0..1, NVML only


def device_probes() -> "tuple[list[DeviceProbe], str]":
    """A probe per visible CUDA device, and a one-line description (why none, or how many)."""
    try:
        import torch
    except ImportError as err:  # pragma: no cover - torch is a hard dependency
        return [], f"torch not importable: {err}"
    if not torch.cuda.is_available():
        return [], f"no CUDA device visible (torch {torch.__version__})"
    probes = []
    for index in range(torch.cuda.device_count()):
        found = nvml_handle(index)
        reader, source = memory_reader(index, found)
        if reader is None:
            continue
        pynvml, handle, _ = found
        util = (lambda h=handle: pynvml.nvmlDeviceGetUtilizationRates(h).gpu / 100.0) if handle is not None else None
        probes.append(DeviceProbe(index, reader, source, util))
    return probes, f"{len(probes)} GPU(s)"
