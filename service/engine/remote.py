"""The engine as HTTP workers see it when one engine process serves them all (``--workers N``).

:class:`RemoteEngine` is an :class:`~service.engine.base.Engine`: the worker's own batcher forms batches from
its requests as usual and ``run`` sends each one to the engine process (see :mod:`service.engine.ipc`), which
merges the batches of every worker into one GPU run. So the GPU has one CUDA context and one model copy, and
a batch on it holds the requests of all workers instead of the one to three that each worker had alone.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from converter.finite import finite_rows
from service.engine import ipc
from service.engine.base import EngineGone, EngineUnreached, EngineUnrecoverable
from service.engine.cuda_regions import KIND_CUDA, DeviceRegion
from service.engine.device_jobs import DeviceJob
from service.engine.direct import DirectJob, HostRegion, SharedRegions
from service.engine.regions import RegionRefused
from service.errors import InvalidInput, non_finite

log = logging.getLogger(__name__)
MAX_ARENA_BYTES = 256 << 20
REGIONS = 4  # one batch computing while the answers of up to three earlier ones are still being sent
REGION_WAIT_S = 5.0  # longest wait for a free region (answers not yet sent hold theirs)
REFUSED_RETRY_S = 1.0  # a client region the engine process refused is not offered again for this long
Placeable = np.ndarray | DirectJob | DeviceJob  # what a batch of run_placed holds


class NonFinite(Exception):
    """The engine process computed a frame but refused some of its parts (NaN/Inf in a client region)."""

    def __init__(self, parts: list[int], message: str, compute_s: float) -> None:
        super().__init__(message)
        self.parts, self.message, self.compute_s = parts, message, compute_s


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
        """(status, message, engine seconds) of the reply to the frame just sent."""
        try:
            sequence, status, length, compute_s, _ = ipc.REPLY.unpack(ipc.recv_exactly(self._sock, ipc.REPLY.size))
            message = ipc.recv_exactly(self._sock, length).decode(errors="replace") if length else ""
        except OSError as exc:
            raise EngineGone(f"the engine process is gone: {exc}") from exc
        if sequence != self._sequence:
            raise EngineUnrecoverable(f"engine process answered request {sequence}, expected {self._sequence}")
        return status, message, float(compute_s)

    # --- client regions (the direct shared-memory path) -------------------------------------------------------

    def _share(self, region: HostRegion) -> int | None:
        """This connection's id of ``region``, registered with the engine process at its first use; None when the
        engine process refused it (then it is offered again only after REFUSED_RETRY_S)."""

        def send(region_id: int) -> None:
            frame = ipc.register_frame(self._sequence, region_id, ipc.KIND_SYSTEM, region.offset, region.byte_size)
            sent = socket.send_fds(self._sock, [frame], [region.fd])  # type: ignore[arg-type]
            if sent < len(frame):
                self._sock.sendall(frame[sent:])

        return self._register(region, send, "a shared-memory region")

    def _device_spec(self, job: DeviceJob) -> ipc.Part | None:
        """The frame part of a device job (its regions registered on this connection at their first use), or None
        when the engine process refused a region (it cannot read device memory, or its limits)."""
        source, target = self._share_device(job.source[0]), self._share_device(job.target[0])
        if source is None or target is None:
            return None
        return (job.shape[0], source, job.source[1], target, job.target[1])

    def _share_device(self, region: DeviceRegion) -> int | None:
        """:meth:`_share` for a CUDA region: the frame carries its IPC handle, no descriptor."""

        def send(region_id: int) -> None:
            frame = ipc.register_frame(self._sequence, region_id, KIND_CUDA, 0, region.byte_size, region.handle)
            self._sock.sendall(frame)

        return self._register(region, send, "a CUDA region")

    def _register(self, region: HostRegion | DeviceRegion, send: Callable[[int], None], what: str) -> int | None:
        """:meth:`_share`'s work for either kind of region; ``send(region_id)`` sends its REGISTER frame."""
        region_id = self._shared.get(region)  # type: ignore[arg-type]  # any weak-referenceable region works
        if region_id is not None:
            return region_id
        if time.monotonic() < self._refused.get(id(region), 0.0):
            return None
        region_id = self._shared.reserve()
        self._sequence = (self._sequence + 1) & 0xFFFFFFFF
        try:
            send(region_id)
        except OSError as exc:
            raise EngineUnreached(f"the engine process is gone: {exc}") from exc
        status, message, _ = self._reply()
        if status != ipc.OK:
            log.warning("the engine process serves %s by copying: %s", what, message)
            self._refused = {k: t for k, t in self._refused.items() if t > time.monotonic()}
            self._refused[id(region)] = time.monotonic() + REFUSED_RETRY_S
            return None
        self._shared.add(region, region_id, self._forget)  # type: ignore[arg-type]
        return region_id

    def _forget(self, region_id: int) -> None:
        """``region_id``'s region is garbage (any thread): unregister it now if the connection is free."""
        self._shared.forget(region_id)
        self._flush_if_free()

    def _flush_if_free(self) -> None:
        if self._shared.pending and self._lock.acquire(blocking=False):
            try:
                self._flush_gone()
            finally:
                self._lock.release()

    def _flush_gone(self) -> None:
        """Send the queued UNREGISTER frames (lock held); a connection that broke drops them all anyway."""
        gone = self._shared.take_gone()
        if gone:
            with contextlib.suppress(OSError):
                self._sock.sendall(b"".join(ipc.unregister_frame(region_id) for region_id in gone))

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """The connection, for one exchange; regions that became garbage meanwhile are unregistered first."""
        with self._lock:
            self._flush_gone()
            try:
                yield
            finally:
                self._flush_gone()
        self._flush_if_free()

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
