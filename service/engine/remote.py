"""The engine as HTTP workers see it when one engine process serves them all (``--workers N``).

:class:`RemoteEngine` is an :class:`~service.engine.base.Engine`: the worker's own batcher forms batches from
its requests as usual and ``run`` sends each one to the engine process (see :mod:`service.engine.ipc`), which
merges the batches of every worker into one GPU run. So the GPU has one CUDA context and one model copy, and
a batch on it holds the requests of all workers instead of the one to three that each worker had alone.
Batches are assembled in the connection's arena (:mod:`service.engine.arena_pool`) or name client regions passed
to the engine process once (:mod:`service.engine.region_sharing`): system shared memory, and CUDA regions computed
device to device (:mod:`service.engine.device_jobs`).
"""

from __future__ import annotations

import logging
import math
import os
import socket
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

from converter.finite import finite_rows
from service.engine import ipc
from service.engine.arena_pool import MAX_ARENA_BYTES, REGION_WAIT_S, REGIONS, Regions
from service.engine.base import EngineGone, EngineUnreached, EngineUnrecoverable
from service.engine.device_jobs import DeviceJob
from service.engine.direct import DirectJob, SharedRegions
from service.engine.region_sharing import RegionSharing
from service.engine.regions import RegionRefused
from service.errors import InvalidInput, non_finite

log = logging.getLogger(__name__)
Placeable = np.ndarray | DirectJob | DeviceJob  # what a batch of run_placed holds


class NonFinite(Exception):
    """The engine process computed a frame but refused some of its parts (NaN/Inf in a client region)."""

    def __init__(self, parts: list[int], message: str, compute_s: float) -> None:
        super().__init__(message)
        self.parts, self.message, self.compute_s = parts, message, compute_s


class RemoteEngine(RegionSharing):
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
            # It checks the values of inputs it reads from client regions: the worker skips its own host pass.
            self.checks_finite = bool(info.get("checks_finite", False))
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
        self._shared = SharedRegions()  # client regions passed to the engine process on this connection
        self._refused: dict[int, float] = {}  # id(region) -> until when it is not offered again
        self.quickest_s = math.inf  # the engine process's quickest run so far, as its last reply said
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
        with self._locked():
            offset = self.regions.locate(x)
            if offset is not None:
                return x.view(), self._call(offset, x.shape[0], x.shape[1])
            if x.nbytes <= self.regions.size:
                staged = self._region_for(x.shape)
                np.copyto(staged, x)
                return staged, self._call(self.regions.locate(staged) or 0, x.shape[0], x.shape[1])
            return self._run_in_pieces(x)

    def run_placed(self, parts: Sequence[Placeable]) -> tuple[list[np.ndarray | Exception], float]:
        """Compute ``parts`` as one job: arrays through the arena (their answers are arena views), direct jobs
        straight between their client regions (answers written into their targets), device jobs straight between
        their client CUDA regions on the engine process's GPU (answers written there); (answers, engine seconds).

        A direct job whose region the engine process refused (its limits) goes through the arena after all, its
        answer copied into its target, and says so (``served.copied``); a device job whose region it refused gets
        :class:`~service.engine.regions.RegionRefused` (the caller copies it through the host). A job holding a NaN
        or an Inf gets :class:`~service.errors.InvalidInput` instead of an answer (the others are answered): the
        engine process checks the values it reads from client regions (``checks_finite``), and this worker those
        it copies."""
        with self._locked():
            specs: list[ipc.Part] = []
            direct: list[int] = []  # the part of each region spec
            staged: list[int] = []  # parts that go through the arena
            refused: dict[int, Exception] = {}
            for index, part in enumerate(parts):
                if isinstance(part, DeviceJob):
                    spec = self._device_spec(part)
                    if spec is None:
                        refused[index] = RegionRefused("the engine process does not serve this CUDA region directly")
                    else:
                        specs.append(spec)
                        direct.append(index)
                    continue
                if isinstance(part, DirectJob):
                    source, target = self._share(part.source.region), self._share(part.target.region)
                    if source is not None and target is not None:
                        specs.append((part.shape[0], source, part.source.offset, target, part.target.offset))
                        direct.append(index)
                        continue
                    part.served.copied = True
                    if self.checks_finite and not finite_rows(part.source.array).all():  # nobody checked it yet
                        refused[index] = non_finite(self.dtype.name)
                        continue
                staged.append(index)
            answers, compute_s = self._stage(parts, staged, specs)
            if specs:
                try:
                    compute_s += self._exchange(int(parts[0].shape[1]), specs)
                except NonFinite as exc:  # only the parts holding NaN/Inf are refused; the others were computed
                    compute_s += exc.compute_s
                    refused.update((direct[k], InvalidInput(exc.message)) for k in exc.parts if k < len(direct))
            outputs: list[np.ndarray | Exception] = []
            for index, part in enumerate(parts):
                if index in refused:
                    outputs.append(refused[index])
                elif isinstance(part, DirectJob):
                    if index in answers:  # it went through the arena after all
                        np.copyto(part.output, answers[index])
                    outputs.append(part.output)
                elif isinstance(part, DeviceJob):
                    outputs.append(part.output)
                else:
                    outputs.append(answers[index])
            return outputs, compute_s

    def _stage(
        self, parts: Sequence[Placeable], staged: list[int], specs: list[ipc.Part]
    ) -> tuple[dict[int, np.ndarray], float]:
        """Copy the ``staged`` parts into one arena region and add it to ``specs``; their answers (arena views).
        More than a region holds (a rare mixed batch) are computed at once, each in arena-sized pieces."""
        arrays: dict[int, np.ndarray] = {}
        for index in staged:
            part = parts[index]
            assert not isinstance(part, DeviceJob), "device jobs never go through the arena"
            arrays[index] = part.source.array if isinstance(part, DirectJob) else part
        if not arrays:
            return {}, 0.0
        rows = sum(int(a.shape[0]) for a in arrays.values())
        seq = int(parts[0].shape[1])
        if rows * seq * self.dim * self.dtype.itemsize > self.regions.size:
            answers: dict[int, np.ndarray] = {}
            compute_s = 0.0
            for index, array in arrays.items():
                answers[index], seconds = self._run_in_pieces(array)
                compute_s += seconds
            return answers, compute_s
        buffer = self._region_for((rows, seq, self.dim))
        offset, answers = 0, {}
        for index, array in arrays.items():
            answers[index] = buffer[offset : offset + array.shape[0]]
            np.copyto(answers[index], array)
            offset += array.shape[0]
        at = self.regions.locate(buffer) or 0
        specs.append((rows, ipc.ARENA, at, ipc.ARENA, at))
        return answers, 0.0

    def _region_for(self, shape: tuple[int, ...]) -> np.ndarray:
        """A free arena region as an array of ``shape``."""
        index = self.regions.acquire(REGION_WAIT_S)
        if index is None:
            raise RuntimeError(f"no free shared-memory region for {REGION_WAIT_S} s (answers not being sent?)")
        return self.regions.array(index, shape, self.dtype)

    def _run_in_pieces(self, x: np.ndarray) -> tuple[np.ndarray, float]:
        """A batch larger than a region: region-sized pieces, each answer copied out before the next."""
        out = np.empty_like(x)
        rows = max(1, self.regions.size // (x.shape[1] * self.dim * self.dtype.itemsize))
        compute_s = 0.0
        for start in range(0, x.shape[0], rows):
            piece = x[start : start + rows]
            staged = self._region_for(piece.shape)
            np.copyto(staged, piece)
            compute_s += self._call(self.regions.locate(staged) or 0, piece.shape[0], piece.shape[1])
            np.copyto(out[start : start + rows], staged)
            del staged  # the region goes back now, not at the end of the loop
        return out, compute_s

    def _call(self, offset: int, batch: int, seq: int) -> float:
        """One batch in the arena through the engine process; the seconds the engine computed it."""
        return self._exchange(seq, [(batch, ipc.ARENA, offset, ipc.ARENA, offset)])

    def _exchange(self, seq: int, specs: list[ipc.Part]) -> float:
        """One batch frame and its reply; the seconds the engine computed it (from the reply frame)."""
        self._sequence = (self._sequence + 1) & 0xFFFFFFFF
        try:
            self._sock.sendall(ipc.batch_frame(self._sequence, seq, specs))
        except OSError as exc:  # a small frame is sent whole or not at all: the engine never saw this batch
            raise EngineUnreached(f"the engine process is gone: {exc}") from exc
        status, message, compute_s = self._reply()
        if status == ipc.BROKEN:
            raise EngineUnrecoverable(f"engine process: {message}")
        if status == ipc.GONE:
            raise EngineGone(f"engine process: {message}")
        if status == ipc.INVALID:
            refused, text = ipc.parse_invalid(message)
            raise NonFinite(refused, text, compute_s)
        if status != ipc.OK:
            raise RuntimeError(f"engine process: {message}")
        return compute_s

    def _reply(self) -> tuple[int, str, float]:
        """(status, message, engine seconds) of the reply to the frame just sent; keeps the engine's quickest run."""
        try:
            head = ipc.REPLY.unpack(ipc.recv_exactly(self._sock, ipc.REPLY.size))
            sequence, status, length, compute_s, quickest_s = head
            message = ipc.recv_exactly(self._sock, length).decode(errors="replace") if length else ""
        except OSError as exc:
            raise EngineGone(f"the engine process is gone: {exc}") from exc
        if sequence != self._sequence:
            raise EngineUnrecoverable(f"engine process answered request {sequence}, expected {self._sequence}")
        if quickest_s > 0:
            self.quickest_s = float(quickest_s)
        return status, message, float(compute_s)

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
        self._shared.close()
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
        self.checks_finite = first.checks_finite
        self.fixed_shapes = False
        self.concurrency = connections  # read by the batcher: batches in flight at once

    @property
    def quickest_s(self) -> float:
        """The engine process's quickest run so far, as the latest replies say (inf before any)."""
        return min(channel.quickest_s for channel in self.channels)

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

    def run_placed(self, parts: Sequence[Placeable]) -> tuple[list[np.ndarray | Exception], float]:
        """See :meth:`RemoteEngine.run_placed`: on an idle connection (each registers a region on its first use)."""
        idle = next((c for c in self.channels if not c.busy), self.channels[0])
        return idle.run_placed(parts)

    def warmup(self) -> None:
        """Nothing to do: the engine process warmed up before it accepted workers."""

    def describe(self) -> dict[str, Any]:
        described = self.channels[0].describe()
        described["engine_process"]["connections"] = len(self.channels)
        return described

    def close(self) -> None:
        for channel in self.channels:
            channel.close()
