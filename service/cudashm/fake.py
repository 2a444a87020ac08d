"""Test-only device layer (``--cuda-memory fake``): CUDA shared memory without a GPU.

A fake "IPC handle" is 64 bytes like a real one: a magic prefix, the device it claims to be on, and the name of a
POSIX shared-memory object (``/dev/shm``) that plays the client's device allocation. Opening it maps that object
in the opening process, wherever it runs (a worker, another worker), so the whole extension (register, infer
reading the input from the region and writing the answer into it, unregister, a stale handle) runs in CI with
the same registry, bounds checks and data plane as on a GPU. :class:`FakeCudaRegion` is the client's side.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import secrets
import threading
from pathlib import Path
from typing import Any

import numpy as np

from service.cudashm.device import HANDLE_BYTES, HandleError, WrongDevice
from service.errors import InvalidInput

MAGIC = b"FAKECUDA"
DEV_SHM = Path("/dev/shm")
_NAME_BYTES = HANDLE_BYTES - len(MAGIC) - 1


def fake_handle(name: str, device: int) -> bytes:
    """The 64-byte handle of the shared-memory object ``name`` posing as memory on ``device``."""
    raw = name.encode()
    if len(raw) > _NAME_BYTES or not 0 <= device < 256:
        raise ValueError("a fake handle holds a name of at most 55 bytes and a device below 256")
    return MAGIC + bytes([device]) + raw.ljust(_NAME_BYTES, b"\0")


class FakeDeviceMemory:
    """:class:`service.cudashm.device.DeviceMemory` over host shared memory; ``devices``: how many it shows."""

    name = "fake"

    def __init__(self, devices: int = 2, root: Path = DEV_SHM) -> None:
        self.devices, self.root = devices, root
        self._open: dict[int, tuple[mmap.mmap, ctypes.Array[ctypes.c_char]]] = {}
        self._lock = threading.Lock()

    def device_count(self) -> int:
        return self.devices

    def open(self, handle: bytes, device: int) -> tuple[int, int]:
        if len(handle) != HANDLE_BYTES:
            raise InvalidInput(f"a CUDA IPC handle has {HANDLE_BYTES} bytes, got {len(handle)}")
        if not handle.startswith(MAGIC):
            raise HandleError("the CUDA IPC handle cannot be opened: not a handle (fake device layer)")
        actual = handle[len(MAGIC)]
        name = handle[len(MAGIC) + 1 :].rstrip(b"\0").decode(errors="replace")
        try:
            fd = os.open(self.root / name, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:
            raise HandleError(f"the CUDA IPC handle cannot be opened: it is stale ({exc.strerror})") from None
        try:
            size = os.fstat(fd).st_size
            if size == 0:
                raise HandleError("the CUDA IPC handle cannot be opened: an empty allocation")
            mapping = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        if actual != device:
            mapping.close()
            raise WrongDevice(actual)
        buffer = (ctypes.c_char * size).from_buffer(mapping)
        address = ctypes.addressof(buffer)
        with self._lock:
            self._open[address] = (mapping, buffer)
        return address, size

    def close(self, pointer: int, device: int) -> None:
        with self._lock:
            mapping, buffer = self._open.pop(pointer)
        del buffer  # the export that pins the mapping
        mapping.close()

    def _check(self, address: int, nbytes: int) -> None:
        """A real device would fault on a bad address; the fake one refuses it, so a bounds bug fails a test."""
        with self._lock:
            inside = any(a <= address and address + nbytes <= a + len(m) for a, (m, _) in self._open.items())
        if not inside:
            raise AssertionError(f"a copy of {nbytes} bytes at {address:#x} is outside every open allocation")

    def to_host(self, dst: np.ndarray, src: int, device: int) -> None:
        self._check(src, dst.nbytes)
        ctypes.memmove(dst.ctypes.data, src, dst.nbytes)

    def from_host(self, dst: int, src: np.ndarray, device: int) -> None:
        self._check(dst, src.nbytes)
        ctypes.memmove(dst, np.ascontiguousarray(src).ctypes.data, src.nbytes)

    def copy(self, dst: int, src: int, nbytes: int, device: int) -> None:
        self._check(src, nbytes)
        self._check(dst, nbytes)
        ctypes.memmove(dst, src, nbytes)

    @property
    def opened(self) -> int:
        """Allocations open now (for leak tests)."""
        return len(self._open)


class FakeCudaRegion:
    """The client's side of a fake CUDA allocation: ``size`` bytes "on" ``device``, its handle and views."""

    def __init__(self, size: int, device: int = 0, root: Path = DEV_SHM) -> None:
        self.name = f"encoder-fakecuda-{secrets.token_hex(6)}"
        self.path, self.size, self.device = root / self.name, size, device
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, size)
            self.mapping = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        self.handle = fake_handle(self.name, device)

    def array(self, dtype: Any, shape: tuple[int, ...], offset: int = 0) -> np.ndarray:
        return np.ndarray(shape, np.dtype(dtype), buffer=self.mapping, offset=offset)

    def write(self, values: np.ndarray, offset: int = 0) -> None:
        self.array(values.dtype, values.shape, offset)[...] = values

    def free(self) -> None:
        """As cudaFree: the handle is stale from now on (mappings already made stay valid, as with CUDA)."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        with contextlib.suppress(BufferError):
            self.mapping.close()
