"""Is there a CUDA GPU? Asked of the driver through ctypes, so the service never needs torch for it."""

from __future__ import annotations

import ctypes
import logging

log = logging.getLogger(__name__)
_CUDA_LIBS = ("libcuda.so.1", "libcuda.so", "nvcuda.dll")


def cuda_device_count() -> int:
    """GPUs the CUDA driver sees; 0 without a driver."""
    for name in _CUDA_LIBS:
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        count = ctypes.c_int(0)
        if lib.cuInit(0) != 0 or lib.cuDeviceGetCount(ctypes.byref(count)) != 0:
            return 0
        return int(count.value)
    return 0


def resolve_provider(requested: str) -> str:
    """``auto`` on a machine without a CUDA device means the CPU: onnxruntime-gpu would otherwise try (and
    loudly fail) to load the TensorRT and CUDA providers first. Explicit choices pass through unchanged."""
    if requested == "auto" and cuda_device_count() == 0:
        log.info("no CUDA device visible: provider auto -> cpu")
        return "cpu"
    return requested
