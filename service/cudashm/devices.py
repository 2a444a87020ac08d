"""Which device ids CUDA shared memory accepts, and this process's CUDA ordinal for each.

Clients name devices as the service numbers its GPUs (``--devices``: ordinals among ``CUDA_VISIBLE_DEVICES``).
A worker sees the GPUs the service sees, so the ordinals are the same; except with ``--shared-engine off`` and
several workers, where every worker sees only the one GPU it serves (its ordinal 0).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from service.cudashm.device import DeviceMemory, device_memory
from service.cudashm.registry import CudaSharedMemory
from service.settings import Settings

SUBDIRECTORY = "cuda"  # inside the shared-memory registry directory: one directory per kind


def device_map(settings: Settings, device: DeviceMemory) -> dict[int, int]:
    """Served device id -> this process's CUDA ordinal. ValueError when nothing can be served."""
    count = device.device_count()
    value = settings.devices
    if value[0].isdigit():
        served = [int(part) for part in value.split(",")]
    elif value == "all" and settings.provider != "cpu":
        served = list(range(count))
    elif device.name == "fake":
        served = [0]  # CPU engines with the test-only layer: its device 0 stands in
    else:
        raise ValueError(f"--shared-memory cuda needs GPUs to serve on; --devices {value} serves the CPU")
    if not served or count == 0:
        raise ValueError("--shared-memory cuda needs a GPU: the CUDA runtime shows none")
    if len(served) == 1 and count == 1:
        return {served[0]: 0}
    missing = [d for d in served if d >= count]
    if missing:
        raise ValueError(f"--shared-memory cuda: GPU {missing[0]} is not among the {count} this process sees")
    return {d: d for d in served}


def open_cuda_shared_memory(settings: Settings, other_kind: Callable[[str], bool]) -> CudaSharedMemory | None:
    """The registry when ``--shared-memory`` enables CUDA: in the workers' shared directory (a private one with
    a single worker), on the device layer ``--cuda-memory`` names."""
    if "cuda" not in settings.shared_memory_kinds:
        return None
    device = device_memory(settings.cuda_memory)
    directory = None if settings.shared_memory_dir is None else Path(settings.shared_memory_dir) / SUBDIRECTORY
    return CudaSharedMemory(
        device,
        device_map(settings, device),
        directory,
        settings.max_shared_memory_regions,
        settings.max_shared_memory_bytes,
        other_kind,
    )
