"""Client shared-memory regions for engine tests: an anonymous object mapped here, as a worker's registry maps one."""

from __future__ import annotations

import contextlib
import mmap
import os
import socket
import weakref
from collections.abc import Sequence
from typing import Any

import numpy as np

from converter.finite import finite_rows
from service.engine import ipc
from service.engine.direct import DirectJob, Span
from service.engine.fake import FakeEngine
from tests.service.engine.support import RawWorker

F32 = np.dtype(np.float32)


class Region:
    """A :class:`service.engine.direct.HostRegion`: ``byte_size`` bytes at ``offset`` of a memfd object."""

    __slots__ = ("__weakref__", "byte_size", "fd", "mapping", "offset")

    def __init__(self, byte_size: int, offset: int = 0) -> None:
        self.fd = os.memfd_create("test-region", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, offset + byte_size)
        self.offset, self.byte_size = offset, byte_size
        self.mapping = mmap.mmap(self.fd, offset + byte_size)
        weakref.finalize(self, os.close, self.fd)

    def array(self, at: int, shape: tuple[int, ...], dtype: np.dtype[Any] = F32) -> np.ndarray:
        count = int(np.prod(shape))
        return np.frombuffer(self.mapping, dtype, count, offset=self.offset + at).reshape(shape)

    def span(self, at: int, shape: tuple[int, ...]) -> Span:
        return Span(self.array(at, shape), self, at)


def job(source: Region, at: int, x: np.ndarray, target: Region, out_at: int) -> DirectJob:
    """``x`` written into ``source`` at ``at``, its answer to go to ``target`` at ``out_at``."""
    span = source.span(at, x.shape)
    span.array[...] = x
    return DirectJob(span, target.span(out_at, x.shape))


def register(raw: RawWorker, sequence: int, region_id: int, region: Region, kind: int = ipc.KIND_SYSTEM) -> tuple:
    """A REGISTER frame by hand, with the region's descriptor; the reply (sequence, status, message)."""
    frame = ipc.register_frame(sequence, region_id, kind, region.offset, region.byte_size)
    socket.send_fds(raw.sock, [frame], [region.fd])
    return raw.receive()


def batch(raw: RawWorker, sequence: int, seq: int, parts: list[ipc.Part]) -> tuple:
    raw.sock.sendall(ipc.batch_frame(sequence, seq, parts))
    return raw.receive()


MEMFD = "memfd:test-region"  # how /proc names the objects of :class:`Region`


def mappings(pid: int | str = "self") -> int:
    """Mappings of test regions in the process: the engine's and the test's own (the engine runs in the test
    process here, so a count of every mapping would also see threads' stacks and libraries loaded meanwhile)."""
    with open(f"/proc/{pid}/maps") as maps:
        return sum(1 for line in maps if MEMFD in line)


def descriptors(pid: int | str = "self") -> int:
    """Open descriptors of test regions in the process (see :func:`mappings`)."""
    fds = f"/proc/{pid}/fd"
    count = 0
    for name in os.listdir(fds):
        with contextlib.suppress(OSError):  # closed between the listing and the readlink
            count += MEMFD in os.readlink(f"{fds}/{name}")
    return count


class PinningEngine(FakeEngine):
    """A fake engine with the ONNX engine's ``run_into`` and page-locking calls, which it records."""

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.pinned: dict[int, int] = {}
        self.unpinned: list[int] = []

    def run_into(
        self, parts: Sequence[np.ndarray], outs: Sequence[np.ndarray], finite: np.ndarray | None = None
    ) -> int:
        x = np.concatenate(parts)
        if finite is not None:
            finite[:] = finite_rows(x)
        answer = self.run(x)
        offset = 0
        for out in outs:
            out[...] = answer[offset : offset + out.shape[0]]
            offset += out.shape[0]
        return offset

    def register_host(self, ptr: int, nbytes: int) -> bool:
        assert ptr not in self.pinned
        self.pinned[ptr] = nbytes
        return True

    def unregister_host(self, ptr: int) -> None:
        del self.pinned[ptr]
        self.unpinned.append(ptr)
