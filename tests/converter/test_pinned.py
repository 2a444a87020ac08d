from __future__ import annotations

import ctypes
import gc

import numpy as np

from converter.pinned import PinnedPool, data_ptr


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
