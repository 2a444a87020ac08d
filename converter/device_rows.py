"""Tensors that already live in the engine's GPU memory, e.g. a client's CUDA shared-memory region that the engine
process opened from its IPC handle: where they are, so the session copies them device to device.

:meth:`converter.session.EncoderSession.run_device_into` takes these next to host arrays: a part in device memory
goes into its rows of a captured slot with one device-to-device copy, and its answer out the same way; host
arrays as in ``run_into``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from converter.pinned import D2H, H2D, data_ptr

D2D = 3  # cudaMemcpyDeviceToDevice


@dataclass(frozen=True)
class DeviceRows:
    """A C-contiguous ``(b, S, D)`` tensor of ``dtype`` at device address ``pointer`` (the session's GPU)."""

    pointer: int
    shape: tuple[int, int, int]
    dtype: np.dtype[Any]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * self.dtype.itemsize

    @property
    def ndim(self) -> int:
        return len(self.shape)


Placed = np.ndarray | DeviceRows


def source(part: Placed) -> tuple[int, int]:
    """(address, cudaMemcpyKind) of a copy from ``part`` into device memory."""
    if isinstance(part, DeviceRows):
        return part.pointer, D2D
    return data_ptr(part), H2D


def target(out: Placed) -> tuple[int, int]:
    """(address, cudaMemcpyKind) of a copy from device memory into ``out``."""
    if isinstance(out, DeviceRows):
        return out.pointer, D2D
    return data_ptr(out), D2H


def contiguous(item: Placed, dtype: np.dtype[Any]) -> bool:
    """Can ``item`` be copied as one block of ``dtype``? (Device rows are contiguous by construction.)"""
    if isinstance(item, DeviceRows):
        return item.dtype == dtype
    return item.dtype == dtype and bool(item.flags.c_contiguous)
