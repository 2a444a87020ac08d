"""Pinned (page-locked) host memory and async copies through the CUDA runtime, for the session's host path.

onnxruntime's Python API copies host arrays with a synchronous pageable ``cudaMemcpy`` and hands outputs back
in freshly allocated (page-faulting) numpy arrays; at batch 512 that is most of a host-to-host call. This
module loads the CUDA runtime that onnxruntime's CUDA EP already uses (same primary context, so the device
pointers of its OrtValues are valid here) and gives the session:

* ``CudaRuntime``: ``cudaHostAlloc``, async copies on our own streams, events.
* ``PinnedPool``: numpy arrays in pinned memory that the caller owns. A block goes back to the pool only when
  the last array (or view) over it is garbage, so handing one out never aliases a later result.

Nothing here is needed on the CPU: ``load_cudart`` returns None when no CUDA runtime can be found.
"""

from __future__ import annotations

import bisect
import contextlib
import ctypes
import glob
import logging
import os
import sys
import threading
from collections import defaultdict

import numpy as np

log = logging.getLogger(__name__)
H2D, D2H = 1, 2  # cudaMemcpyKind
_D2D = 3  # cudaMemcpyDeviceToDevice: never waits for the host
_NON_BLOCKING = 1  # cudaStreamNonBlocking: our copy streams never wait on the legacy default stream
_DISABLE_TIMING = 2  # cudaEventDisableTiming: cheapest event, we only synchronise on it
_NAMES = ("libcudart.so.13", "libcudart.so.12", "libcudart.so")


class CudaError(RuntimeError):
    pass


class _PinnedRanges:
    """Host ranges page-locked through this runtime (allocated or registered): copies from/to them only enqueue."""

    def __init__(self) -> None:
        self._starts: list[int] = []
        self._ends: dict[int, int] = {}
        self._lock = threading.Lock()

    def add(self, ptr: int, nbytes: int) -> None:
        with self._lock:
            if ptr not in self._ends:
                bisect.insort(self._starts, ptr)
            self._ends[ptr] = ptr + nbytes

    def remove(self, ptr: int) -> None:
        with self._lock:
            if self._ends.pop(ptr, None) is not None:
                self._starts.remove(ptr)

    def holds(self, ptr: int, nbytes: int) -> bool:
        with self._lock:
            i = bisect.bisect_right(self._starts, ptr) - 1
            return i >= 0 and ptr + nbytes <= self._ends[self._starts[i]]


class CudaRuntime:
    """The handful of CUDA runtime calls the host path needs, through ctypes.

    Two handles on the same library. ``lib`` (``ctypes.CDLL``) releases the GIL around each call: every call that
    can block (synchronisations, allocation, page-locking, copies from/to pageable memory) goes through it, so
    the process's other threads run meanwhile. ``enqueue`` (``ctypes.PyDLL`` of the same library) keeps the GIL:
    the calls that only put work on a stream (``cudaMemcpyAsync`` between page-locked host memory, or device
    memory, and the device; ``cudaEventRecord``) take microseconds, and releasing the GIL for them hands it to
    any other thread that wants it (the engine process's event loop, beside its compute thread), which then
    keeps it until it waits or its switch interval (5 ms) ends: a batch of ten such calls can wait ten times
    (the GIL convoy; ``loadtest/bench_gil.py`` shows it on a CPU). Without ``enqueue`` every call releases.
    """

    def __init__(self, lib: ctypes.CDLL, enqueue: ctypes.CDLL | None = None) -> None:
        self._lib = lib
        self._enqueue = lib if enqueue is None else enqueue
        self._pinned = _PinnedRanges()
        vp, sz = ctypes.c_void_p, ctypes.c_size_t
        lib.cudaHostAlloc.argtypes = [ctypes.POINTER(vp), sz, ctypes.c_uint]
        lib.cudaFreeHost.argtypes = [vp]
        lib.cudaHostRegister.argtypes = [vp, sz, ctypes.c_uint]
        lib.cudaHostUnregister.argtypes = [vp]
        lib.cudaMemcpyAsync.argtypes = [vp, vp, sz, ctypes.c_int, vp]
        lib.cudaStreamCreateWithFlags.argtypes = [ctypes.POINTER(vp), ctypes.c_uint]
        lib.cudaStreamSynchronize.argtypes = [vp]
        lib.cudaEventCreateWithFlags.argtypes = [ctypes.POINTER(vp), ctypes.c_uint]
        lib.cudaEventRecord.argtypes = [vp, vp]
        lib.cudaEventSynchronize.argtypes = [vp]
        lib.cudaGetErrorString.restype = ctypes.c_char_p
        self._enqueue.cudaMemcpyAsync.argtypes = [vp, vp, sz, ctypes.c_int, vp]
        self._enqueue.cudaEventRecord.argtypes = [vp, vp]

    def _check(self, code: int, what: str) -> None:
        if code != 0:
            raise CudaError(f"{what} failed: {self._lib.cudaGetErrorString(code).decode()} ({code})")

    def host_alloc(self, nbytes: int) -> int:
        ptr = ctypes.c_void_p()
        self._check(self._lib.cudaHostAlloc(ctypes.byref(ptr), nbytes, 0), "cudaHostAlloc")
        self._pinned.add(int(ptr.value or 0), nbytes)
        return int(ptr.value or 0)

    def free_host(self, ptr: int) -> None:
        self._pinned.remove(ptr)
        self._lib.cudaFreeHost(ptr)

    def host_register(self, ptr: int, nbytes: int) -> None:
        """Page-lock existing host memory (e.g. a shared-memory mapping) so copies from/to it are real DMA."""
        self._check(self._lib.cudaHostRegister(ptr, nbytes, 0), "cudaHostRegister")
        self._pinned.add(ptr, nbytes)

    def host_unregister(self, ptr: int) -> None:
        self._pinned.remove(ptr)
        self._check(self._lib.cudaHostUnregister(ptr), "cudaHostUnregister")

    def stream(self) -> int:
        handle = ctypes.c_void_p()
        self._check(self._lib.cudaStreamCreateWithFlags(ctypes.byref(handle), _NON_BLOCKING), "cudaStreamCreate")
        return int(handle.value or 0)

    def event(self) -> int:
        handle = ctypes.c_void_p()
        self._check(self._lib.cudaEventCreateWithFlags(ctypes.byref(handle), _DISABLE_TIMING), "cudaEventCreate")
        return int(handle.value or 0)

    def copy(self, dst: int, src: int, nbytes: int, kind: int, stream: int) -> None:
        """Async when the host side is pinned; from pageable memory the driver stages and returns when read.

        Keeps the GIL only where it merely enqueues: device to device, or the host side page-locked through this
        runtime. To or from pageable memory the call waits (for the stream, for staging) and releases it.
        """
        host = src if kind == H2D else dst if kind == D2H else None
        enqueues = kind == _D2D or (host is not None and self._pinned.holds(host, nbytes))
        lib = self._enqueue if enqueues else self._lib
        self._check(lib.cudaMemcpyAsync(dst, src, nbytes, kind, stream), "cudaMemcpyAsync")

    def sync(self, stream: int) -> None:
        self._check(self._lib.cudaStreamSynchronize(stream), "cudaStreamSynchronize")

    def record(self, event: int, stream: int) -> None:
        self._check(self._enqueue.cudaEventRecord(event, stream), "cudaEventRecord")

    def wait(self, event: int) -> None:
        self._check(self._lib.cudaEventSynchronize(event), "cudaEventSynchronize")


def _candidates() -> list[str]:
    """Sonames first (already loaded by onnxruntime.preload_dlls or the CUDA EP), then pip's nvidia wheels."""
    paths = list(_NAMES)
    for root in sys.path:
        paths += sorted(glob.glob(os.path.join(root, "nvidia", "*", "lib", "libcudart.so*")), reverse=True)
    return paths


def load_cudart() -> CudaRuntime | None:
    for name in _candidates():
        try:
            return CudaRuntime(ctypes.CDLL(name), ctypes.PyDLL(name))  # one library, two GIL policies
        except (OSError, AttributeError):
            continue
    log.warning("no CUDA runtime library found: host copies use onnxruntime's pageable path")
    return None


class _Block:
    """Owns one pinned allocation; returns it to the pool when the last array over it dies."""

    __slots__ = ("nbytes", "pool", "ptr")

    def __init__(self, pool: PinnedPool, ptr: int, nbytes: int) -> None:
        self.pool, self.ptr, self.nbytes = pool, ptr, nbytes

    def __del__(self) -> None:
        # At interpreter shutdown the runtime may be gone: the driver frees pinned memory with the process.
        with contextlib.suppress(Exception):
            self.pool._release(self.ptr, self.nbytes)


class PinnedPool:
    """Caller-owned pinned numpy arrays, recycled by size once the caller drops them."""

    def __init__(self, cuda: CudaRuntime, keep_free: int = 4) -> None:
        self.cuda = cuda
        self.keep_free = keep_free  # free blocks kept per size; more are given back to the driver
        self._free: dict[int, list[int]] = defaultdict(list)
        self._lock = threading.Lock()
        self._live: dict[int, int] = {}  # ptr -> nbytes of blocks handed out and still referenced
        self.allocated = 0

    def empty(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        with self._lock:
            free = self._free[nbytes]
            ptr = free.pop() if free else 0
        if not ptr:
            ptr = self.cuda.host_alloc(nbytes)
            self.allocated += 1
        with self._lock:
            self._live[ptr] = nbytes
        raw = (ctypes.c_uint8 * nbytes).from_address(ptr)
        raw._owner = _Block(self, ptr, nbytes)  # type: ignore[attr-defined]  # ties the block to the buffer
        return np.frombuffer(raw, dtype=dtype).reshape(shape)  # type: ignore[call-overload]

    def owns(self, array: np.ndarray) -> bool:
        """True when ``array`` lies inside a live pinned block of this pool (then it can be DMA'd directly)."""
        start = data_ptr(array)
        end = start + array.nbytes
        with self._lock:
            return any(ptr <= start and end <= ptr + size for ptr, size in self._live.items())

    def _release(self, ptr: int, nbytes: int) -> None:
        with self._lock:
            self._live.pop(ptr, None)
            free = self._free[nbytes]
            if len(free) < self.keep_free:
                free.append(ptr)
                return
        self.cuda.free_host(ptr)


def data_ptr(array: np.ndarray) -> int:
    return int(array.__array_interface__["data"][0])
