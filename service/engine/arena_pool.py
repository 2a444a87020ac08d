"""A worker's engine arena cut into regions: where the batcher assembles a batch for the engine process to read.

Each worker connection has its own arena (shared memory the engine process maps, see :mod:`service.engine.ipc`),
cut into :data:`REGIONS` equal regions. A batch is assembled in a free region and computed in place; its answer
is handed out as a view of that region, which is not reused until every request holding part of the answer has
sent it (the region returns with the last view, like the session's pinned pool).
"""

from __future__ import annotations

import ctypes
import threading
from typing import Any

import numpy as np

from service.engine import ipc

MAX_ARENA_BYTES = 256 << 20
REGIONS = 4  # one batch computing while the answers of up to three earlier ones are still being sent
REGION_WAIT_S = 5.0  # longest wait for a free region (answers not yet sent hold theirs)


class _Lease:
    """Holds one arena region; returns it when the last array over it is garbage (like the session's pinned pool)."""

    __slots__ = ("index", "regions")

    def __init__(self, regions: Regions, index: int) -> None:
        self.regions, self.index = regions, index

    def __del__(self) -> None:
        self.regions.release(self.index)


class Regions:
    """The arena cut into equal regions, handed out as numpy arrays that keep their region while alive.

    An answer is returned as a view of the region its batch was computed in: no copy out of shared memory,
    and the region is not reused until every request holding part of that answer has sent it.
    """

    def __init__(self, arena: ipc.Arena, count: int) -> None:
        self.arena = arena
        self.size = arena.size // count
        self._free = list(range(count))
        self._cond = threading.Condition()

    def acquire(self, timeout_s: float) -> int | None:
        with self._cond:
            if not self._cond.wait_for(lambda: bool(self._free), timeout_s):
                return None
            return self._free.pop()

    def release(self, index: int) -> None:
        with self._cond:
            self._free.append(index)
            self._cond.notify()

    def array(self, index: int, shape: tuple[int, ...], dtype: np.dtype[Any]) -> np.ndarray:
        """A view of region ``index`` that owns the lease (the caller must not release it itself)."""
        nbytes = int(np.prod(shape)) * dtype.itemsize
        if nbytes > self.size:
            raise ValueError(f"{nbytes} bytes do not fit a region of {self.size}")
        # from_buffer exports the mapping: it cannot be unmapped while any view of this region lives.
        raw = (ctypes.c_uint8 * nbytes).from_buffer(self.arena.mapping, index * self.size)
        raw._lease = _Lease(self, index)  # type: ignore[attr-defined]  # freed with the last view
        return np.frombuffer(raw, dtype=dtype).reshape(shape)  # type: ignore[call-overload]

    def locate(self, array: np.ndarray) -> int | None:
        """Byte offset of ``array`` in the arena when it lies inside one region, else None."""
        offset = self.arena.offset_of(array)
        if offset is None or (offset + max(array.nbytes, 1) - 1) // self.size != offset // self.size:
            return None
        return offset
