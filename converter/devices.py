"""Is there a CUDA GPU? Asked of the driver through ctypes: no torch, no onnxruntime (the service imports it)."""

from __future__ import annotations

import ctypes

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
