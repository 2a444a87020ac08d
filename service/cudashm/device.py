"""The device layer of CUDA shared memory: open a client's CUDA IPC handle, copy between it and the host.

One interface (:class:`DeviceMemory`), two implementations: :class:`CudaDeviceMemory` calls the CUDA runtime
through ctypes (the ``libcudart`` onnxruntime's CUDA EP loads, found as :mod:`converter.pinned` finds it), and
:class:`service.cudashm.fake.FakeDeviceMemory` stands in on machines without a GPU (the CPU tests). Which one
serves is the ``--cuda-memory`` setting, never a fallback: a GPU host that cannot load the runtime refuses
CUDA shared memory with an error instead of quietly serving something else.

Device numbers are this process's CUDA ordinals; the registry maps the service's device ids onto them.
"""

from __future__ import annotations

import ctypes
import threading
from typing import Any, Protocol

import numpy as np

from service.errors import InvalidInput

HANDLE_BYTES = 64  # sizeof(cudaIpcMemHandle_t): CUDA_IPC_HANDLE_SIZE
_LAZY_PEER_ACCESS = 1  # cudaIpcMemLazyEnablePeerAccess
_H2D, _D2H, _D2D = 1, 2, 3  # cudaMemcpyKind
_DEVICE_MEMORY = 2  # cudaMemoryTypeDevice
_ATTRIBUTES_BYTES = 256  # cudaPointerAttributes is 24 bytes (CUDA 12) plus reserved words (13): room for either


class HandleError(InvalidInput):
    """The handle cannot be opened (stale: its memory was freed or its process exited; or not a handle)."""


class WrongDevice(InvalidInput):
    """The handle's memory lies on another device (this process's ordinal ``actual``) than the one asked for."""

    def __init__(self, actual: int) -> None:
        super().__init__(f"the CUDA IPC handle's memory lies on device {actual}")
        self.actual = actual


class DeviceMemory(Protocol):
    """What CUDA shared memory needs of a device: open/close IPC handles and synchronous copies."""

    name: str

    def device_count(self) -> int:
        """The CUDA devices this process sees."""
        ...

    def open(self, handle: bytes, device: int) -> tuple[int, int]:
        """Map the client's allocation named by ``handle`` (:data:`HANDLE_BYTES` bytes) on ``device``: its
        device pointer here and the allocation's size from there. HandleError when it cannot be opened;
        WrongDevice when the memory lies on another device than ``device``."""
        ...

    def close(self, pointer: int, device: int) -> None:
        """Unmap what :meth:`open` mapped (once per open)."""
        ...

    def to_host(self, dst: np.ndarray, src: int, device: int) -> None:
        """Copy ``dst.nbytes`` bytes at device address ``src`` into the contiguous host array ``dst``."""
        ...

    def from_host(self, dst: int, src: np.ndarray, device: int) -> None:
        """Copy the contiguous host array ``src`` to device address ``dst``; done (visible to the client's
        streams) when it returns."""
        ...

    def copy(self, dst: int, src: int, nbytes: int, device: int) -> None:
        """Device to device, done when it returns."""
        ...


class CudaDeviceMemory:
    """:class:`DeviceMemory` on the CUDA runtime (``libcudart``) through ctypes.

    The current device is per thread in the runtime, so every call selects its device first. Copies are the
    synchronous ``cudaMemcpy`` on the legacy default stream, followed by a synchronisation of that stream for
    host-to-device copies (from pageable memory ``cudaMemcpy`` may return before the DMA is done).
    """

    name = "cuda"

    def __init__(self, lib: ctypes.CDLL | None = None) -> None:
        if lib is None:
            from converter.pinned import _candidates

            lib = _load(_candidates())
        self._lib = lib
        vp, sz, c_int = ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int
        lib.cudaGetDeviceCount.argtypes = [ctypes.POINTER(c_int)]
        lib.cudaSetDevice.argtypes = [c_int]
        lib.cudaIpcOpenMemHandle.argtypes = [ctypes.POINTER(vp), _IpcHandle, ctypes.c_uint]
        lib.cudaIpcCloseMemHandle.argtypes = [vp]
        lib.cudaMemcpy.argtypes = [vp, vp, sz, c_int]
        lib.cudaStreamSynchronize.argtypes = [vp]
        lib.cudaPointerGetAttributes.argtypes = [ctypes.c_char_p, vp]
        lib.cudaGetErrorString.restype = ctypes.c_char_p
        lib.cudaGetErrorString.argtypes = [c_int]
        self._lock = threading.Lock()  # opens and closes (rare) one at a time; copies run in parallel
        self._driver: ctypes.CDLL | None = None  # libcuda, for the one driver call the runtime lacks

    def _error(self, code: int) -> str:
        self._lib.cudaGetLastError()  # runtime errors of these calls are not sticky: clear the last-error slot
        return f"{self._lib.cudaGetErrorString(code).decode()} ({code})"

    def _check(self, code: int, what: str) -> None:
        if code != 0:
            raise RuntimeError(f"{what} failed: {self._error(code)}")

    def _use(self, device: int) -> None:
        self._check(self._lib.cudaSetDevice(device), f"cudaSetDevice({device})")

    def device_count(self) -> int:
        count = ctypes.c_int(0)
        code = self._lib.cudaGetDeviceCount(ctypes.byref(count))
        if code != 0:
            self._error(code)
            return 0  # no driver or no device: none seen (the caller refuses to serve CUDA regions then)
        return count.value

    def open(self, handle: bytes, device: int) -> tuple[int, int]:
        if len(handle) != HANDLE_BYTES:
            raise InvalidInput(f"a CUDA IPC handle has {HANDLE_BYTES} bytes, got {len(handle)}")
        pointer = ctypes.c_void_p()
        with self._lock:
            self._use(device)
            code = self._lib.cudaIpcOpenMemHandle(ctypes.byref(pointer), _IpcHandle.of(handle), _LAZY_PEER_ACCESS)
            if code != 0:
                raise HandleError(
                    f"the CUDA IPC handle cannot be opened on device {device}: {self._error(code)}; it is stale (its "
                    "memory was freed or its process exited) or not a handle from cudaIpcGetMemHandle"
                )
            address = int(pointer.value or 0)
            try:
                self._check_device(address, device)
                size = self._allocation_bytes(address)
            except BaseException:
                self._lib.cudaIpcCloseMemHandle(address)
                raise
        return address, size

    def _allocation_bytes(self, address: int) -> int:
        """Bytes from ``address`` to the end of its allocation (the driver API's ``cuMemGetAddressRange``)."""
        if self._driver is None:
            self._driver = ctypes.CDLL("libcuda.so.1")
            self._driver.cuMemGetAddressRange_v2.argtypes = [
                ctypes.POINTER(ctypes.c_uint64),
                ctypes.POINTER(ctypes.c_size_t),
                ctypes.c_uint64,
            ]
        base, size = ctypes.c_uint64(0), ctypes.c_size_t(0)
        code = self._driver.cuMemGetAddressRange_v2(ctypes.byref(base), ctypes.byref(size), address)
        if code != 0:
            raise RuntimeError(f"cuMemGetAddressRange failed ({code})")
        return int(base.value) + int(size.value) - address

    def _check_device(self, address: int, device: int) -> None:
        attributes = ctypes.create_string_buffer(_ATTRIBUTES_BYTES)
        self._check(self._lib.cudaPointerGetAttributes(attributes, address), "cudaPointerGetAttributes")
        kind, actual = np.frombuffer(attributes.raw, np.int32, count=2)
        if int(kind) != _DEVICE_MEMORY:
            raise HandleError(f"the CUDA IPC handle does not name device memory (memory type {int(kind)})")
        if int(actual) != device:
            raise WrongDevice(int(actual))

    def close(self, pointer: int, device: int) -> None:
        with self._lock:
            self._use(device)
            self._check(self._lib.cudaIpcCloseMemHandle(pointer), "cudaIpcCloseMemHandle")

    def to_host(self, dst: np.ndarray, src: int, device: int) -> None:
        self._use(device)
        self._check(self._lib.cudaMemcpy(_address(dst), src, dst.nbytes, _D2H), "cudaMemcpy (device to host)")

    def from_host(self, dst: int, src: np.ndarray, device: int) -> None:
        self._use(device)
        self._check(self._lib.cudaMemcpy(dst, _address(src), src.nbytes, _H2D), "cudaMemcpy (host to device)")
        self._check(self._lib.cudaStreamSynchronize(None), "cudaStreamSynchronize")

    def copy(self, dst: int, src: int, nbytes: int, device: int) -> None:
        self._use(device)
        self._check(self._lib.cudaMemcpy(dst, src, nbytes, _D2D), "cudaMemcpy (device to device)")
        self._check(self._lib.cudaStreamSynchronize(None), "cudaStreamSynchronize")


class _IpcHandle(ctypes.Structure):
    """``cudaIpcMemHandle_t``: 64 opaque bytes, passed by value."""

    _fields_ = [("reserved", ctypes.c_char * HANDLE_BYTES)]

    @classmethod
    def of(cls, raw: bytes) -> _IpcHandle:
        handle = cls()
        ctypes.memmove(ctypes.addressof(handle), raw, HANDLE_BYTES)
        return handle


def _address(array: np.ndarray) -> int:
    if not array.flags.c_contiguous:
        raise ValueError("device copies need a contiguous host array")
    return int(array.ctypes.data)


def _load(names: list[str]) -> ctypes.CDLL:
    errors: list[str] = []
    for name in names:
        try:
            lib = ctypes.CDLL(name)
            lib.cudaIpcOpenMemHandle  # noqa: B018  # a libcudart, not some other library of that name
            return lib
        except (OSError, AttributeError) as exc:
            errors.append(f"{name}: {exc}")
    tried = "; ".join(errors[:3])
    raise RuntimeError(f"CUDA shared memory needs the CUDA runtime (libcudart), none could be loaded: {tried}")


def device_memory(kind: str, **options: Any) -> DeviceMemory:
    """The device layer ``--cuda-memory`` names."""
    if kind == "fake":
        from service.cudashm.fake import FakeDeviceMemory

        return FakeDeviceMemory(**options)
    if kind == "cuda":
        return CudaDeviceMemory()
    raise ValueError(f"unknown CUDA memory layer {kind!r}")
