"""The engine as HTTP workers see it when one engine process serves them all (``--workers N``).

:class:`RemoteEngine` is an :class:`~service.engine.base.Engine`: the worker's own batcher forms batches from
its requests as usual and ``run`` sends each one to the engine process (see :mod:`service.engine.ipc`), which
merges the batches of every worker into one GPU run. So the GPU has one CUDA context and one model copy, and
a batch on it holds the requests of all workers instead of the one to three that each worker had alone.
"""

from __future__ import annotations

import ctypes
import logging
import os
import socket
import threading
from typing import Any

import numpy as np

from service.engine import ipc
from service.engine.base import EngineGone, EngineUnreached, EngineUnrecoverable

log = logging.getLogger(__name__)
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


class RemoteEngine:
    """Connects at construction (fast: the engine process is warm before workers start)."""

    def __init__(self, path: str, max_arena_bytes: int = MAX_ARENA_BYTES) -> None:
        self.path = path
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._sock.connect(path)
            info, _ = ipc.recv_hello(self._sock)
            self.name: str = info["name"]
            self.dim: int = int(info["dim"])
            self.dtype: np.dtype[Any] = np.dtype(info["dtype"])
            self.max_seq_len: int = int(info["max_seq_len"])
            self.buckets: tuple[int, ...] = tuple(int(b) for b in info["buckets"])
            self.provider: str = info["provider"]
            self._described: dict[str, Any] = info["describe"]
            # The worker never pads: the engine process pads the merged batch to its own buckets.
            self.fixed_shapes = False
            row_bytes = self.max_seq_len * self.dim * self.dtype.itemsize
            # At least one full-length row per region, whatever the cap: smaller pieces cannot exist.
            arena_bytes = max(min(REGIONS * max(self.buckets) * row_bytes, max_arena_bytes), REGIONS * row_bytes)
            self.arena = ipc.Arena.create(arena_bytes)
            self.regions = Regions(self.arena, REGIONS)
            ipc.send_hello(self._sock, {"pid": os.getpid(), "arena_bytes": self.arena.size}, (self.arena.fd,))
            self.registered = bool(ipc.recv_hello(self._sock)[0]["registered"])
        except (OSError, KeyError, ValueError) as exc:
            self._sock.close()
            raise ConnectionError(f"cannot attach to the engine process at {path}: {exc}") from exc
        self._lock = threading.Lock()
        self._sequence = 0
        log.info(
            "attached to the engine process (%s on %s), arena %s MiB", self.name, self.provider, self.arena.size >> 20
        )

    def input_buffer(self, batch: int, seq: int) -> np.ndarray:
        """A free arena region when the batch fits: the batcher then assembles it where the engine reads it."""
        shape = (batch, seq, self.dim)
        if batch * seq * self.dim * self.dtype.itemsize <= self.regions.size:
            index = self.regions.acquire(0.0)
            if index is not None:
                return self.regions.array(index, shape, self.dtype)
        return np.empty(shape, self.dtype)

    def run(self, x: np.ndarray) -> np.ndarray:
        """The answer to ``x``; for an ``x`` in the arena (from :meth:`input_buffer`) it replaces ``x`` in place."""
        return self.run_timed(x)[0]

    def run_timed(self, x: np.ndarray) -> tuple[np.ndarray, float]:
        """:meth:`run`, with the seconds the engine process computed: the rest of the call was the hop and its
        queue, which the batcher reports as queue time, so ``x-inference-time`` means the same in every layout."""
        if x.ndim != 3 or x.shape[2] != self.dim or x.dtype != self.dtype:
            raise ValueError(f"expected (batch, seq, {self.dim}) {self.dtype}, got {x.shape} {x.dtype}")
        with self._lock:
            offset = self.regions.locate(x)
            if offset is not None:
                return x.view(), self._call(offset, x.shape[0], x.shape[1])
            if x.nbytes <= self.regions.size:
                staged = self._region_for(x)
                np.copyto(staged, x)
                return staged, self._call(self.regions.locate(staged) or 0, x.shape[0], x.shape[1])
            return self._run_in_pieces(x)

    def _region_for(self, x: np.ndarray) -> np.ndarray:
        index = self.regions.acquire(REGION_WAIT_S)
        if index is None:
            raise RuntimeError(f"no free shared-memory region for {REGION_WAIT_S} s (answers not being sent?)")
        return self.regions.array(index, x.shape, self.dtype)

    def _run_in_pieces(self, x: np.ndarray) -> tuple[np.ndarray, float]:
        """A batch larger than a region: region-sized pieces, each answer copied out before the next."""
        out = np.empty_like(x)
        rows = max(1, self.regions.size // (x.shape[1] * self.dim * self.dtype.itemsize))
        compute_s = 0.0
        for start in range(0, x.shape[0], rows):
            piece = x[start : start + rows]
            staged = self._region_for(piece)
            np.copyto(staged, piece)
            compute_s += self._call(self.regions.locate(staged) or 0, piece.shape[0], piece.shape[1])
            np.copyto(out[start : start + rows], staged)
            del staged  # the region goes back now, not at the end of the loop
        return out, compute_s

    def _call(self, offset: int, batch: int, seq: int) -> float:
        """One batch through the engine process; the seconds the engine computed it (from the reply frame)."""
        self._sequence = (self._sequence + 1) & 0xFFFFFFFF
        try:
            self._sock.sendall(ipc.REQUEST.pack(self._sequence, batch, seq, offset))
        except OSError as exc:  # a 20-byte frame is sent whole or not at all: the engine never saw this batch
            raise EngineUnreached(f"the engine process is gone: {exc}") from exc
        try:
            sequence, status, length, compute_s, _ = ipc.REPLY.unpack(ipc.recv_exactly(self._sock, ipc.REPLY.size))
            message = ipc.recv_exactly(self._sock, length).decode(errors="replace") if length else ""
        except OSError as exc:
            raise EngineGone(f"the engine process is gone: {exc}") from exc
        if sequence != self._sequence:
            raise EngineUnrecoverable(f"engine process answered request {sequence}, expected {self._sequence}")
        if status == ipc.BROKEN:
            raise EngineUnrecoverable(f"engine process: {message}")
        if status == ipc.GONE:
            raise EngineGone(f"engine process: {message}")
        if status != ipc.OK:
            raise RuntimeError(f"engine process: {message}")
        return float(compute_s)

    @property
    def busy(self) -> bool:
        """A batch of this connection is with the engine process now."""
        return self._lock.locked()

    def warmup(self) -> None:
        """Nothing to do: the engine process warmed up before it accepted workers."""

    def describe(self) -> dict[str, Any]:
        shared = {"socket": self.path, "arena_bytes": self.arena.size, "arena_pinned": self.registered}
        return {**self._described, "engine_process": shared}

    def close(self) -> None:
        self._sock.close()
        self.arena.close()


class RemotePool:
    """Several connections to the engine process, so a worker can have more than one batch in flight.

    With one connection the worker's next batch waits until the previous answer is back (a round trip through
    two processes); with two, it goes out at once and the engine process merges it into whatever it runs next.
    Each connection has its own arena; a batch runs on the connection whose arena holds it.
    """

    def __init__(self, path: str, connections: int = 2, max_arena_bytes: int = MAX_ARENA_BYTES) -> None:
        if connections < 1:
            raise ValueError(f"a pool needs at least one connection, got {connections}")
        self.channels: list[RemoteEngine] = []
        try:
            for _ in range(connections):
                self.channels.append(RemoteEngine(path, max_arena_bytes))
        except Exception:
            self.close()
            raise
        first = self.channels[0]
        self.path, self.name, self.dim, self.dtype = path, first.name, first.dim, first.dtype
        self.max_seq_len, self.buckets, self.provider = first.max_seq_len, first.buckets, first.provider
        self.fixed_shapes = False
        self.concurrency = connections  # read by the batcher: batches in flight at once

    def input_buffer(self, batch: int, seq: int) -> np.ndarray:
        # An idle connection's arena first: the batch runs on the connection that holds it.
        for channel in sorted(self.channels, key=lambda c: c.busy):
            buffer = channel.input_buffer(batch, seq)
            if channel.regions.locate(buffer) is not None:
                return buffer
        return np.empty((batch, seq, self.dim), self.dtype)

    def run(self, x: np.ndarray) -> np.ndarray:
        return self.run_timed(x)[0]

    def run_timed(self, x: np.ndarray) -> tuple[np.ndarray, float]:
        """See :meth:`RemoteEngine.run_timed`."""
        for channel in self.channels:
            if channel.regions.locate(x) is not None:
                return channel.run_timed(x)
        if x.ndim == 3 and x.shape[2] == self.dim and x.dtype == self.dtype:  # else run() says what is wrong
            # Staged into whichever connection has a free region (an idle one first), not just the first idle
            # connection: answers hold their regions while they are sent, so one arena can be full.
            staged = self.input_buffer(x.shape[0], x.shape[1])
            for channel in self.channels:
                if channel.regions.locate(staged) is not None:
                    np.copyto(staged, x)
                    return channel.run_timed(staged)
        idle = next((c for c in self.channels if not c.busy), self.channels[0])
        return idle.run_timed(x)

    def warmup(self) -> None:
        """Nothing to do: the engine process warmed up before it accepted workers."""

    def describe(self) -> dict[str, Any]:
        described = self.channels[0].describe()
        described["engine_process"]["connections"] = len(self.channels)
        return described

    def close(self) -> None:
        for channel in self.channels:
            channel.close()
