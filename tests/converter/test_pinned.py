from __future__ import annotations

import ctypes
import gc

import numpy as np
import pytest

import converter.pinned as pinned_module
from converter.pinned import D2H, H2D, CudaError, CudaRuntime, PinnedPool, data_ptr


class FakeCuda:
    """Host malloc in place of cudaHostAlloc: the pool's ownership rules need no GPU."""

    def __init__(self) -> None:
        self.libc = ctypes.CDLL(None)
        self.libc.malloc.restype = ctypes.c_void_p
        self.libc.malloc.argtypes = [ctypes.c_size_t]
        self.libc.free.argtypes = [ctypes.c_void_p]
        self.freed: list[int] = []

    def host_alloc(self, nbytes: int) -> int:
        return int(self.libc.malloc(nbytes))

    def free_host(self, ptr: int) -> None:
        self.freed.append(ptr)
        self.libc.free(ptr)


def test_blocks_are_reused_only_after_the_caller_drops_them() -> None:
    pool = PinnedPool(FakeCuda(), keep_free=1)  # type: ignore[arg-type]
    a = pool.empty((2, 3, 4), np.float16)
    a[...] = 1
    view = a[:1]
    assert pool.owns(a) and pool.owns(view)
    first = data_ptr(a)
    del a
    gc.collect()
    b = pool.empty((2, 3, 4), np.float16)  # the view still holds the first block
    assert data_ptr(b) != first and np.all(view == 1)
    del view, b
    gc.collect()
    pool.empty((2, 3, 4), np.float16)
    assert pool.allocated == 2  # the third array reused a released block


def test_foreign_arrays_are_not_owned() -> None:
    pool = PinnedPool(FakeCuda())  # type: ignore[arg-type]
    assert not pool.owns(np.zeros((4, 4), np.float16))


def test_extra_free_blocks_go_back_to_the_driver() -> None:
    cuda = FakeCuda()
    pool = PinnedPool(cuda, keep_free=1)  # type: ignore[arg-type]
    arrays = [pool.empty((8,), np.float32) for _ in range(3)]
    del arrays
    gc.collect()
    assert len(cuda.freed) == 2 and len(pool._free[32]) == 1


class _Fn:
    """One fake CUDA entry point: logs (handle, name) and returns cudaSuccess; ``argtypes`` is settable."""

    def __init__(self, lib: FakeLib, name: str) -> None:
        self.lib, self.name, self.argtypes, self.restype = lib, name, None, None

    def __call__(self, *args: object) -> object:
        self.lib.calls.append((self.lib.label, self.name))
        if self.name == "cudaGetErrorString":
            return b"fake error"
        for arg in args:  # out-parameters (cudaHostAlloc, cudaStreamCreate...): a made-up handle
            if type(arg).__name__ == "CArgObject":
                arg._obj.value = 0x1000  # type: ignore[attr-defined]
        return 0


class FakeLib:
    """A CUDA runtime library handle that records which handle each call went through."""

    def __init__(self, label: str, calls: list[tuple[str, str]]) -> None:
        self.label, self.calls = label, calls
        self._fns: dict[str, _Fn] = {}

    def __getattr__(self, name: str) -> _Fn:
        if name.startswith("_"):
            raise AttributeError(name)
        return self._fns.setdefault(name, _Fn(self, name))


def _runtime() -> tuple[CudaRuntime, list[tuple[str, str]]]:
    calls: list[tuple[str, str]] = []
    cuda = CudaRuntime(FakeLib("releases", calls), FakeLib("keeps", calls))  # type: ignore[arg-type]
    return cuda, calls


def test_enqueue_calls_keep_the_gil_and_blocking_ones_release_it() -> None:
    cuda, calls = _runtime()
    pinned = cuda.host_alloc(4096)  # 0x1000 .. 0x2000
    cuda.host_register(0x10000, 256)
    calls.clear()
    cuda.copy(0xD000, pinned + 64, 1024, H2D, 7)  # from pinned memory: only enqueues
    cuda.copy(0x10000, 0xD000, 256, D2H, 7)  # into registered memory
    cuda.copy(0xD000, 0xE000, 4096, 3, 7)  # device to device
    cuda.record(5, 7)
    assert calls == [("keeps", "cudaMemcpyAsync")] * 3 + [("keeps", "cudaEventRecord")]
    calls.clear()
    cuda.copy(0xD000, 0x50000, 64, H2D, 7)  # pageable: the driver stages it, the call waits
    cuda.copy(0x50000, 0xD000, 64, D2H, 7)  # into pageable: returns when the copy is done
    cuda.copy(0xD000, pinned + 4000, 200, H2D, 7)  # runs past the pinned block
    cuda.sync(7)
    cuda.wait(5)
    cuda.stream()
    cuda.event()
    cuda.host_alloc(64)
    cuda.host_unregister(0x10000)
    cuda.free_host(pinned)
    assert all(label == "releases" for label, _ in calls) and len(calls) == 10
    calls.clear()
    cuda.copy(0x10000, 0xD000, 256, D2H, 7)  # no longer page-locked: released
    cuda.copy(0xD000, pinned, 64, H2D, 7)  # freed
    assert calls == [("releases", "cudaMemcpyAsync")] * 2


def test_failing_enqueue_calls_raise() -> None:
    cuda, _ = _runtime()
    cuda._enqueue.cudaEventRecord = lambda *args: 700  # type: ignore[method-assign]
    with pytest.raises(CudaError, match=r"cudaEventRecord failed: fake error \(700\)"):
        cuda.record(5, 7)


def test_load_cudart_opens_a_gil_keeping_handle_beside_the_releasing_one(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[object, object]] = []
    monkeypatch.setattr(pinned_module, "_candidates", lambda: ["libc.so.6"])
    monkeypatch.setattr(pinned_module, "CudaRuntime", lambda lib, enqueue: seen.append((lib, enqueue)) or "rt")
    assert pinned_module.load_cudart() == "rt"
    ((lib, enqueue),) = seen
    keeps_gil = ctypes._FUNCFLAG_PYTHONAPI  # type: ignore[attr-defined]  # what PyDLL adds: no GIL release
    assert type(lib) is ctypes.CDLL and not lib._func_flags_ & keeps_gil  # type: ignore[attr-defined]
    assert enqueue._func_flags_ & keeps_gil  # type: ignore[attr-defined]
    assert lib._name == enqueue._name == "libc.so.6"  # type: ignore[attr-defined]
