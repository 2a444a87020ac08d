"""Client CUDA shared-memory regions in the engine process: the device-to-device path's table (issue #13).

The engine process for a GPU opens a client's CUDA IPC handle once (through :mod:`service.cudashm.device`, the
same device layer the workers use) and keeps it open while any connection has it registered or any batch uses
it; a batch part that names it becomes :class:`converter.device_rows.DeviceRows` (a bounds-checked device address),
which :meth:`converter.session.EncoderSession.run_device_into` copies device to device into the captured slot and
the answer back out: no host copy. The table mirrors :class:`service.engine.regions.RegionTable` (system regions,
mapped from a descriptor) so the engine host can serve both kinds; a REGISTER frame of kind :data:`KIND_CUDA`
carries the 64-byte handle after its head instead of a descriptor.
"""

from __future__ import annotations

import ctypes
import logging
from typing import Any, Protocol

import numpy as np

from converter.device_rows import DeviceRows, Placed
from service.cudashm.device import HANDLE_BYTES, DeviceMemory
from service.engine.regions import RegionRefused
from service.errors import InvalidInput

log = logging.getLogger(__name__)
KIND_CUDA = 1  # ipc.REGISTER's kind for a CUDA region (ipc.KIND_SYSTEM is 0)


class DeviceRegion(Protocol):
    """A client CUDA region as a worker holds it: what the engine process needs to open the same memory.

    Implementations must be weak-referenceable: an engine connection unregisters the region when it is garbage."""

    @property
    def handle(self) -> bytes:
        """The 64-byte CUDA IPC handle."""
        ...

    @property
    def byte_size(self) -> int: ...


class CudaRegion:
    """A client's allocation opened in this process; ``byte_size`` bytes of it are the region."""

    def __init__(self, handle: bytes, pointer: int, byte_size: int, host_visible: bool = False) -> None:
        self.handle, self.pointer, self.byte_size = handle, pointer, byte_size
        self.host_visible = host_visible  # the test-only fake layer: its "device" addresses are host memory
        self.refs = 0

    def view(self, offset: int, shape: tuple[int, int, int], dtype: np.dtype[Any]) -> Placed:
        """What a batch part of this region is to the engine: device rows (the fake layer: a host array there)."""
        rows = self.rows(offset, shape, dtype)
        if not self.host_visible:
            return rows
        raw = (ctypes.c_uint8 * rows.nbytes).from_address(rows.pointer)
        return np.frombuffer(memoryview(raw).cast("B"), dtype).reshape(shape)

    def rows(self, offset: int, shape: tuple[int, int, int], dtype: np.dtype[Any]) -> DeviceRows:
        """``shape`` x ``dtype`` at byte ``offset`` of the region; ValueError past its end."""
        nbytes = int(np.prod(shape)) * dtype.itemsize
        if offset < 0 or offset + nbytes > self.byte_size:
            raise ValueError(f"{nbytes} bytes at offset {offset} go past a CUDA region of {self.byte_size} bytes")
        return DeviceRows(self.pointer + offset, shape, dtype)


class CudaRegionTable:
    """Every CUDA region this engine process has open, by handle, within the registry's limits."""

    def __init__(self, device: DeviceMemory, ordinal: int = 0, max_regions: int = 256, max_bytes: int = 4 << 30):
        self.device, self.ordinal = device, ordinal  # the engine process sees its one GPU as ordinal 0
        self.max_regions, self.max_bytes = max_regions, max_bytes
        self._regions: dict[tuple[bytes, int], CudaRegion] = {}

    def __len__(self) -> int:
        return len(self._regions)

    @property
    def total_bytes(self) -> int:
        return sum(region.byte_size for region in self._regions.values())

    def open(self, handle: bytes, byte_size: int) -> CudaRegion:
        """The region of ``handle``'s first ``byte_size`` bytes, retained for the caller: opened here once (a
        stale handle, another device's memory or a size past the allocation is RegionRefused)."""
        if len(handle) != HANDLE_BYTES or byte_size < 1:
            raise RegionRefused(f"a CUDA region needs a {HANDLE_BYTES}-byte handle and a size, got {len(handle)}")
        key = (handle, byte_size)
        region = self._regions.get(key)
        if region is None:
            if len(self._regions) >= self.max_regions or self.total_bytes + byte_size > self.max_bytes:
                raise RegionRefused(f"the engine process has {len(self._regions)} CUDA regions open (its limits)")
            try:
                pointer, allocated = self.device.open(handle, self.ordinal)
            except InvalidInput as exc:  # stale, not a handle, another device
                raise RegionRefused(str(exc)) from None
            if allocated < byte_size:
                self.device.close(pointer, self.ordinal)
                raise RegionRefused(f"{byte_size} bytes are more than the allocation ({allocated})")
            host_visible = self.device.name == "fake"
            region = self._regions[key] = CudaRegion(handle, pointer, byte_size, host_visible)
        region.refs += 1
        return region

    def retain(self, region: CudaRegion) -> None:
        region.refs += 1

    def release(self, region: CudaRegion) -> None:
        """One reference fewer; the handle is closed with the last one."""
        region.refs -= 1
        if region.refs > 0:
            return
        key = (region.handle, region.byte_size)
        if self._regions.get(key) is region:
            del self._regions[key]
        try:
            self.device.close(region.pointer, self.ordinal)
        except Exception:  # never worth the engine process: the region is gone from the table either way
            log.warning("closing a CUDA IPC handle failed", exc_info=True)
