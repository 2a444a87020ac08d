"""Client-side shared-memory objects for the registry tests (created in /dev/shm, removed afterwards), and the
OIP requests that use registered regions, system or CUDA."""

from __future__ import annotations

import contextlib
import mmap
import os
import secrets
from pathlib import Path
from typing import Any

import numpy as np
from tritonclient.grpc import InferInput, InferRequestedOutput

DEV_SHM = Path("/dev/shm")


class ShmObject:
    """A POSIX shared-memory object as a client makes one (``shm_open`` + ``ftruncate``), mapped on our side."""

    def __init__(self, size: int, key: str | None = None) -> None:
        self.name = key or f"encoder-test-{secrets.token_hex(6)}"
        self.key = "/" + self.name  # shm_open's spelling, as tritonclient passes it
        self.path = DEV_SHM / self.name
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, size)
            self.mapping = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        self.size = size

    def array(self, dtype: Any, shape: tuple[int, ...], offset: int = 0) -> np.ndarray:
        """A view of the object's bytes, as the client reads and writes them."""
        return np.ndarray(shape, np.dtype(dtype), buffer=self.mapping, offset=offset)

    def write(self, values: np.ndarray, offset: int = 0) -> None:
        self.array(values.dtype, values.shape, offset)[...] = values

    def destroy(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        with contextlib.suppress(BufferError):  # a test's view still alive: it goes with the view
            self.mapping.close()


def mapped_lines(path: Path) -> int:
    """How many of this process's mappings are of ``path`` (/proc/self/maps)."""
    text = Path("/proc/self/maps").read_text()
    return sum(1 for line in text.splitlines() if line.split(maxsplit=5)[-1].startswith(str(path)))


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def fds_to(*prefixes: str) -> int:
    """This process's descriptors open on a path under one of ``prefixes``: a leak check that other descriptors of
    the test process (sockets or files of earlier tests, closed by a garbage collection meanwhile) cannot upset."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # the listing's own descriptor is gone by now
            count += os.readlink(f"/proc/self/fd/{fd}").startswith(prefixes)
    return count


def shm_infer_body(
    x: np.ndarray,
    region: str,
    out_region: str | None = None,
    offset: int | None = None,
    out_offset: int | None = None,
    datatype: str = "FP32",
) -> dict[str, Any]:
    """An OIP REST infer request whose input ``x`` lies in the registered ``region`` (at ``offset``) and, with
    ``out_region``, whose answer (the input's size) is written into that one; an offset left None is not sent."""
    params: dict[str, Any] = {"shared_memory_region": region, "shared_memory_byte_size": x.nbytes}
    if offset is not None:
        params["shared_memory_offset"] = offset
    body: dict[str, Any] = {
        "inputs": [{"name": "input", "datatype": datatype, "shape": list(x.shape), "parameters": params}]
    }
    if out_region is not None:
        out: dict[str, Any] = {"shared_memory_region": out_region, "shared_memory_byte_size": x.nbytes}
        if out_offset is not None:
            out["shared_memory_offset"] = out_offset
        body["outputs"] = [{"name": "output", "parameters": out}]
    return body


def grpc_shm_tensors(
    x: np.ndarray, region: str, out_region: str, out_offset: int = 0
) -> tuple[list[InferInput], list[InferRequestedOutput]]:
    """tritonclient.grpc's inputs and outputs for ``client.infer`` with ``x`` in the registered ``region`` and the
    answer (the input's size) written into ``out_region`` at ``out_offset``: the gRPC twin of :func:`shm_infer_body`."""
    tensor = InferInput("input", list(x.shape), "FP32")
    tensor.set_shared_memory(region, x.nbytes)
    wanted = InferRequestedOutput("output")
    wanted.set_shared_memory(out_region, x.nbytes, offset=out_offset)
    return [tensor], [wanted]
