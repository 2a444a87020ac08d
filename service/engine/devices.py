"""``--devices``: which devices serve, and how each engine process is pinned to its own.

``all`` (the default) is every GPU the driver shows, or the CPU when there is none. ``0,1`` names GPUs by their
ordinal among the visible ones (so under ``CUDA_VISIBLE_DEVICES=2,3`` device ``0`` is physical GPU 2).
``cpu`` is one CPU engine; ``cpu:N`` is N CPU engine processes (``cpu0`` ... ``cpuN-1``), useful to run and
test several engine processes on a machine without a GPU. Each engine process sees exactly one GPU through
``CUDA_VISIBLE_DEVICES``, so its CUDA context, pinned arenas and CUDA graphs are its device's alone.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from service.settings import Settings

log = logging.getLogger(__name__)
SYNTAX = re.compile(r"^(all|cpu|cpu:[1-9][0-9]*|[0-9]+(,[0-9]+)*)$")
MAX_CPU_ENGINES = 64  # a bound on the ``device`` metric label's values
GPU_PROVIDER_NAMES = ("CUDAExecutionProvider", "TensorrtExecutionProvider")


@dataclass(frozen=True)
class Device:
    """One engine's device. ``label`` is what metrics, /readyz and /v1/models call it."""

    label: str
    cuda_visible: str | None  # CUDA_VISIBLE_DEVICES of its engine process; None: a CPU engine

    @property
    def on_gpu(self) -> bool:
        return self.cuda_visible is not None

    def environment(self) -> dict[str, str]:
        """What its engine process's environment must say on top of the service's."""
        if self.cuda_visible is not None:
            return {"CUDA_VISIBLE_DEVICES": self.cuda_visible}
        # A CPU engine on a GPU host must not grab a GPU (provider auto would pick one).
        return {"CUDA_VISIBLE_DEVICES": "", "ENCODER_PROVIDER": "cpu"}


@dataclass(frozen=True)
class DeviceStatus:
    """What /readyz, /v1/models and the OIP metadata say about one device's engine."""

    device: str
    up: bool
    restarts: int = 0


def check_syntax(value: str) -> str:
    """The Settings validator: a clear error for a malformed ``--devices`` before anything starts."""
    value = value.strip().replace(" ", "")
    if not SYNTAX.match(value):
        raise ValueError(f"devices must be 'all', 'cpu', 'cpu:N' or GPU ordinals like '0,1', got {value!r}")
    if value.startswith("cpu:") and int(value[4:]) > MAX_CPU_ENGINES:
        raise ValueError(f"at most {MAX_CPU_ENGINES} CPU engines, got {value!r}")
    ordinals = value.split(",")
    if value[0].isdigit() and len(set(ordinals)) != len(ordinals):
        raise ValueError(f"devices names a GPU twice: {value!r}")
    return value


def gpu(ordinal: int, visible: str | None) -> Device:
    """GPU ``ordinal`` among the visible ones, as its engine process must see it."""
    entries = [v.strip() for v in visible.split(",") if v.strip()] if visible else []
    if entries and ordinal >= len(entries):
        raise ValueError(f"GPU {ordinal} is not among CUDA_VISIBLE_DEVICES={visible}")
    return Device(str(ordinal), entries[ordinal] if entries else str(ordinal))


def resolve(settings: Settings, gpu_count: int | None = None) -> tuple[Device, ...]:
    """The devices ``settings`` serve on; ``gpu_count`` defaults to what the CUDA driver reports. Raises
    ValueError (before anything starts) for devices that do not exist or that the other settings cannot serve."""
    devices = _resolve(settings, gpu_count)
    check_serving(settings, devices)
    return devices


def _resolve(settings: Settings, gpu_count: int | None) -> tuple[Device, ...]:
    value = settings.devices
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if value == "cpu":
        return (Device("cpu", None),)
    if value.startswith("cpu:"):
        return tuple(Device(f"cpu{i}", None) for i in range(int(value[4:])))
    if gpu_count is None:
        gpu_count = 0 if settings.provider == "cpu" else _cuda_device_count()
    if value == "all":
        if settings.provider == "cpu" or gpu_count == 0:
            return (Device("cpu", None),)
        count = gpu_count if settings.shared_engine != "off" else 1  # engines inside workers use one device
        if count < gpu_count:
            log.info("--shared-engine off: every worker's engine runs on GPU 0 (--devices all needs engine processes)")
        return tuple(gpu(i, visible) for i in range(count))
    ordinals = [int(part) for part in value.split(",")]
    if settings.engine != "fake":  # the test-only fake engine runs anywhere: CPU tests use GPU ordinals too
        if settings.provider == "cpu":
            raise ValueError(f"--provider cpu cannot serve on GPUs {value}: use --devices cpu or cpu:N")
        missing = [o for o in ordinals if o >= gpu_count]
        if missing:
            raise ValueError(f"GPU {missing[0]} does not exist: the driver shows {gpu_count} GPU(s)")
    return tuple(gpu(o, visible) for o in ordinals)


def _cuda_device_count() -> int:
    from converter.devices import cuda_device_count  # ctypes only: no onnxruntime in the supervisor

    return cuda_device_count()


def check_serving(settings: Settings, devices: tuple[Device, ...]) -> None:
    """Refuse (before anything starts) device lists the other settings cannot serve."""
    if len(devices) > 1 and settings.shared_engine == "off":
        raise ValueError(
            f"--shared-engine off puts an engine in each worker, on one device; --devices names {len(devices)}: "
            "use --shared-engine auto or on"
        )


def uses_engine_processes(settings: Settings, devices: tuple[Device, ...], shared_on_gpu: bool) -> bool:
    """Engine processes (supervised, one per device) instead of an engine inside each worker?

    ``shared_on_gpu`` is the ``--shared-engine`` decision for several workers on one device.
    """
    if len(devices) > 1:
        return True
    if settings.workers > 1:
        return shared_on_gpu
    # One worker: in-process on the first visible device (no hop); any other single GPU gets its own process.
    return devices[0].on_gpu and devices[0].label != "0"


def local_label(settings: Settings, provider: str) -> str:
    """The ``device`` label of an engine inside this process."""
    if provider not in GPU_PROVIDER_NAMES:
        return "cpu"
    return settings.devices if settings.devices.isdigit() else "0"
