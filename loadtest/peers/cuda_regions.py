"""A client's CUDA allocations for the CUDA shared-memory extension: tritonclient's utilities on a GPU, or the
service's fake device layer (``--cuda-memory fake``) for a CPU self-test of the same client code.

:func:`allocate` gives a :class:`ClientRegion`: its name, its raw handle (base64, as
``tritonclient.utils.cuda_shared_memory.get_raw_handle`` gives it, the form both tritonclient clients take),
and copies in and out. Answer checks read only what they compare: whole answers now and then, three sequence
positions of every sample otherwise (one strided copy each, ``cudaMemcpy2D``), and NaN goes into those
positions before each request so an answer never written cannot pass as an old one.
"""

from __future__ import annotations

import base64
import contextlib
from collections.abc import Iterator
from typing import Any, Protocol

import numpy as np


class ClientRegion(Protocol):
    name: str
    device: int
    size: int

    @property
    def raw_handle(self) -> bytes:
        """The IPC handle in base64 (``get_raw_handle``'s form)."""
        ...

    def write(self, values: np.ndarray, offset: int = 0) -> None: ...

    def read(self, dtype: Any, shape: tuple[int, ...], offset: int = 0) -> np.ndarray: ...

    def read_rows(self, dtype: Any, shape: tuple[int, ...], rows: list[int], offset: int = 0) -> np.ndarray:
        """``(B, len(rows), D)``: the given sequence positions of every sample of a ``(B, S, D)`` tensor."""
        ...

    def poison_rows(self, dtype: Any, shape: tuple[int, ...], rows: list[int], offset: int = 0) -> None: ...

    def free(self) -> None: ...


class CudaClientRegion:
    """Device memory from ``tritonclient.utils.cuda_shared_memory`` (needs cuda-python)."""

    def __init__(self, name: str, size: int, device: int) -> None:
        import tritonclient.utils.cuda_shared_memory as cudashm
        from cuda.bindings import runtime

        self._cudashm, self._rt = cudashm, runtime
        self.name, self.size, self.device = name, size, device
        self.handle = cudashm.create_shared_memory_region(name, size, device)
        self.base = int(self.handle._base_addr)  # the device pointer tritonclient allocated

    @property
    def raw_handle(self) -> bytes:
        return bytes(self._cudashm.get_raw_handle(self.handle))

    def _call(self, result: Any) -> Any:
        err = result[0]
        if err != self._rt.cudaError_t.cudaSuccess:
            raise RuntimeError(f"CUDA call failed: {self._rt.cudaGetErrorString(err)[1]!r}")
        return result[1:] if len(result) > 1 else None

    def write(self, values: np.ndarray, offset: int = 0) -> None:
        values = np.ascontiguousarray(values)
        kind = self._rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        self._call(self._rt.cudaMemcpy(self.base + offset, values.ctypes.data, values.nbytes, kind))

    def read(self, dtype: Any, shape: tuple[int, ...], offset: int = 0) -> np.ndarray:
        out = np.empty(shape, dtype)
        kind = self._rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        self._call(self._rt.cudaMemcpy(out.ctypes.data, self.base + offset, out.nbytes, kind))
        return out

    def read_rows(self, dtype: Any, shape: tuple[int, ...], rows: list[int], offset: int = 0) -> np.ndarray:
        batch, seq, dim = shape
        item = np.dtype(dtype).itemsize
        out = np.empty((len(rows), batch, dim), dtype)
        kind = self._rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        for i, row in enumerate(rows):  # row ``row`` of every sample: one strided copy
            src = self.base + offset + row * dim * item
            dst = out[i].ctypes.data
            self._call(self._rt.cudaMemcpy2D(dst, dim * item, src, seq * dim * item, dim * item, batch, kind))
        return out.transpose(1, 0, 2)

    def poison_rows(self, dtype: Any, shape: tuple[int, ...], rows: list[int], offset: int = 0) -> None:
        batch, seq, dim = shape
        item = np.dtype(dtype).itemsize
        for row in rows:  # all-ones bits: NaN in FP16 and FP32
            dst = self.base + offset + row * dim * item
            self._call(self._rt.cudaMemset2D(dst, seq * dim * item, 0xFF, dim * item, batch))

    def free(self) -> None:
        self._cudashm.destroy_shared_memory_region(self.handle)


class FakeClientRegion:
    """The service's test-only fake device layer's allocation (host shared memory posing as device memory)."""

    def __init__(self, name: str, size: int, device: int) -> None:
        from service.cudashm.fake import FakeCudaRegion

        self.name, self.size, self.device = name, size, device
        self._region = FakeCudaRegion(size, device)

    @property
    def raw_handle(self) -> bytes:
        return base64.b64encode(self._region.handle)

    def write(self, values: np.ndarray, offset: int = 0) -> None:
        self._region.write(np.ascontiguousarray(values), offset)

    def read(self, dtype: Any, shape: tuple[int, ...], offset: int = 0) -> np.ndarray:
        return self._region.array(dtype, shape, offset).copy()

    def read_rows(self, dtype: Any, shape: tuple[int, ...], rows: list[int], offset: int = 0) -> np.ndarray:
        return self._region.array(dtype, shape, offset)[:, rows, :].copy()

    def poison_rows(self, dtype: Any, shape: tuple[int, ...], rows: list[int], offset: int = 0) -> None:
        self._region.array(dtype, shape, offset)[:, rows, :] = np.nan

    def free(self) -> None:
        self._region.free()


def allocate(name: str, size: int, device: int, fake: bool = False) -> ClientRegion:
    return FakeClientRegion(name, size, device) if fake else CudaClientRegion(name, size, device)


@contextlib.contextmanager
def registered(client: Any, region: ClientRegion) -> Iterator[ClientRegion]:
    """``region`` registered through ``client`` (tritonclient.http or .grpc, sync) while the block runs."""
    client.register_cuda_shared_memory(region.name, region.raw_handle, region.device, region.size)
    try:
        yield region
    finally:
        with contextlib.suppress(Exception):  # the server may be gone already
            client.unregister_cuda_shared_memory(region.name)
