"""The engine process: one engine (one model copy, one CUDA context) computing for every HTTP worker.

``python -m service --workers N`` starts it before the workers (see :mod:`service.engine.process`). Each
worker's batcher sends it whole batches through shared memory (:mod:`service.engine.ipc`); whenever the engine
is free, :class:`EngineHost` merges what every worker sent (FIFO, one sequence length, up to the largest batch
bucket) into one run and writes each answer back over its input. Eight workers with an engine each meant
eight CUDA contexts time-slicing one GPU on batches of one to three; here they share one queue.

With several GPUs there is one engine process per device (``--device`` names it in metrics; its GPU is the
only one it sees), and the workers spread their batches over them (:mod:`service.engine.router`).

A batch that fails fails the worker batches in it; an :class:`EngineUnrecoverable` (e.g. a sticky CUDA
error) answers BROKEN to the batches it broke and GONE to every other waiting one (GONE requests get 503, not
500) and ends the process with status 1: the supervisor restarts it (:mod:`service.engine.supervisor`).
"""

from __future__ import annotations

import argparse
import array
import asyncio
import contextlib
import logging
import os
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from converter.device_rows import DeviceRows, Placed
from converter.finite import finite_rows
from service.batching.batcher import pad_size, run_batch
from service.batching.observer import BatcherObserver, BatchStats, NullObserver, SafeObserver
from service.engine import ipc
from service.engine.base import Engine, EngineUnrecoverable
from service.engine.cuda_regions import INVALID, KIND_CUDA, CudaRegion, CudaRegionTable
from service.engine.regions import ClientRegion, RegionRefused, RegionTable
from service.errors import non_finite

log = logging.getLogger(__name__)
Answer = tuple[int, str, float, float]  # status, message, engine seconds, seconds queued here
HANDSHAKE_TIMEOUT_S = 10.0
READ_BYTES = 1 << 16
MAX_QUEUED_FDS = 8  # descriptors received ahead of their REGISTER frames; more is a protocol error
_FD_SPACE = socket.CMSG_SPACE(MAX_QUEUED_FDS * array.array("i").itemsize)


@dataclass(eq=False)
class _Job:
    """One worker batch: its parts (in the worker's arena or in client regions) and where each answer goes."""

    worker: _Worker
    sequence: int
    parts: list[Placed]
    outs: list[Placed]
    samples: int
    seq: int
    arrived: float
    held: list[ClientRegion | CudaRegion] = field(default_factory=list)  # client regions it uses, until done
    # Per part: read from a system client region (the direct path), so no worker checked its values: this process
    # does, on the batch (CUDA regions' inputs are checked when the frame is read, see _check_finite).
    checked: list[bool] = field(default_factory=list)


class _Worker:
    """One attached worker's connection: frames in, answer frames out, all on the event loop.

    No stream reader or coroutine per worker: each request is parsed as it is read and queued without a future or
    task of its own (a round trip took 49 instead of 73 us of this process's CPU than with streams). The socket is
    read with ``recvmsg`` rather than through an asyncio transport because REGISTER frames carry descriptors.
    """

    def __init__(self, host: EngineHost, sock: socket.socket, arena: ipc.Arena, hello: dict[str, Any]) -> None:
        self.host, self.sock, self.arena, self.hello = host, sock, arena, hello
        self.regions: dict[int, ClientRegion | CudaRegion] = {}  # this connection's region ids
        self.closed = False
        self._loop = asyncio.get_running_loop()
        self._in = bytearray()
        self._out = bytearray()
        self._fds: deque[int] = deque()
        self._holding = False  # a REGISTER is being answered: later frames wait in the socket

    def start(self) -> None:
        self._loop.add_reader(self.sock.fileno(), self._readable)

    def _readable(self) -> None:
        try:
            data, ancillary, flags, _ = self.sock.recvmsg(READ_BYTES, _FD_SPACE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self.close(f"read failed: {exc}")
            return
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds = array.array("i")
                fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
                self._fds.extend(fds)
        if flags & socket.MSG_CTRUNC or len(self._fds) > MAX_QUEUED_FDS:
            self.close("protocol error: descriptors without their frames")
            return
        if not data:
            self.close(None)
            return
        self._in += data
        self._parse()

    def _parse(self) -> None:
        while not self._holding and not self.closed and len(self._in) >= ipc.HEADER.size:
            kind, sequence, length = ipc.HEADER.unpack_from(self._in)
            end = ipc.HEADER.size + length
            if length > ipc.MAX_BODY:
                self.close(f"protocol error: a frame of {length} bytes")
                return
            if len(self._in) < end:
                return
            body = bytes(self._in[ipc.HEADER.size : end])
            del self._in[:end]
            if kind == ipc.BATCH:
                self.host.request(self, sequence, body)
            elif kind == ipc.REGISTER:
                self._register(sequence, body)
            elif kind == ipc.UNREGISTER and len(body) == ipc.UNREGISTER_BODY.size:
                region = self.regions.pop(ipc.UNREGISTER_BODY.unpack(body)[0], None)
                if region is not None:  # an unknown id is no error: unregistering is idempotent
                    self.host.release(region)
            else:
                self.close(f"protocol error: frame kind {kind} of {length} bytes")

    def view(self, region: int, offset: int, shape: tuple[int, int, int], dtype: np.dtype[Any]) -> Placed:
        """A checked view of ``region`` (0: the arena); ValueError for an unknown region or a range past it."""
        if region == ipc.ARENA:
            return self.arena.view(offset, shape, dtype)
        found = self.regions.get(region)
        if found is None:
            raise ValueError(f"unknown shared-memory region id {region}")
        return found.view(offset, shape, dtype)

    # --- client regions --------------------------------------------------------------------------------------

    def _register(self, sequence: int, body: bytes) -> None:
        """Map a client region (see :mod:`service.engine.regions`); the reply says whether it may be used."""
        if len(body) >= ipc.REGISTER_HEAD.size and body[4] == KIND_CUDA:  # the kind byte: no descriptor comes
            self._register_cuda(sequence, body)
            return
        fd = self._fds.popleft() if self._fds else -1
        table = self.host.regions
        try:
            if len(body) < ipc.REGISTER_HEAD.size:
                raise RegionRefused(f"a register frame of {len(body)} bytes is too short")
            region_id, kind, offset, byte_size = ipc.REGISTER_HEAD.unpack_from(body)
            if kind != ipc.KIND_SYSTEM:
                raise RegionRefused(f"shared-memory region kind {kind} is not supported")
            if fd < 0:
                raise RegionRefused("a system shared-memory region comes with its descriptor")
            if region_id == ipc.ARENA or region_id in self.regions:
                raise RegionRefused(f"region id {region_id} is already in use on this connection")
            key = table.identify(fd, offset, byte_size)
            found = table.find(key)
            if found is None:
                table.check_room(byte_size)
        except (RegionRefused, OSError) as exc:
            self._close_fd(fd)
            self.reply(sequence, (ipc.FAILED, str(exc), 0.0, 0.0))
            return
        if found is not None:
            self._close_fd(fd)
            self._registered(sequence, region_id, found)
            return
        # Mapping and page-locking a large region is slow: on a thread, this connection paused meanwhile.
        self._holding = True
        self._loop.remove_reader(self.sock.fileno())
        opening = asyncio.ensure_future(asyncio.to_thread(table.open, key, fd, offset, byte_size))
        opening.add_done_callback(lambda done: self._opened(sequence, region_id, fd, done))

    def _opened(self, sequence: int, region_id: int, fd: int, opening: asyncio.Future[ClientRegion]) -> None:
        self._close_fd(fd)
        if opening.cancelled():
            return  # the loop is ending
        self._holding = False
        exc = opening.exception()
        if exc is not None:
            if not isinstance(exc, RegionRefused):
                log.warning("mapping a shared-memory region failed", exc_info=exc)
            self.reply(sequence, (ipc.FAILED, str(exc), 0.0, 0.0))
        else:
            region = self.host.regions.install(opening.result())
            if self.closed:
                self.host.regions.release(region)
                return
            self._registered(sequence, region_id, region)
        if not self.closed:
            self.start()
            self._parse()

    def _register_cuda(self, sequence: int, body: bytes) -> None:
        """Open a client's CUDA region from the IPC handle after the frame's head (see
        :mod:`service.engine.cuda_regions`); quick enough for the event loop (one driver call, once per region)."""
        region_id, _, _, byte_size = ipc.REGISTER_HEAD.unpack_from(body)
        table = self.host.cuda_regions
        try:
            if table is None:
                raise RegionRefused("this engine process does not serve CUDA shared memory")
            if region_id == ipc.ARENA or region_id in self.regions:
                raise RegionRefused(f"region id {region_id} is already in use on this connection")
            region = table.open(body[ipc.REGISTER_HEAD.size :], byte_size)
        except RegionRefused as exc:
            self.reply(sequence, (ipc.FAILED, str(exc), 0.0, 0.0))
            return
        self.regions[region_id] = region
        self.reply(sequence, (ipc.OK, "device", 0.0, 0.0))

    def _registered(self, sequence: int, region_id: int, region: ClientRegion) -> None:
        self.regions[region_id] = region
        self.reply(sequence, (ipc.OK, "page-locked" if region.pinned else "", 0.0, 0.0))

    @staticmethod
    def _close_fd(fd: int) -> None:
        if fd >= 0:
            os.close(fd)

    # --- answers and the end ---------------------------------------------------------------------------------

    def reply(self, sequence: int, answer: Answer) -> None:
        if self.closed:
            return  # the worker left: nobody waits for this answer
        status, message, compute_s, wait_s = answer
        text = message.encode()
        self._write(ipc.REPLY.pack(sequence, status, len(text), compute_s, wait_s) + text)

    def _write(self, data: bytes) -> None:
        if self._out:
            self._out += data
            return
        try:
            sent = self.sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as exc:
            self.close(f"write failed: {exc}")
            return
        if sent < len(data):
            self._out += data[sent:]
            self._loop.add_writer(self.sock.fileno(), self._writable)

    def _writable(self) -> None:
        try:
            sent = self.sock.send(self._out)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self.close(f"write failed: {exc}")
            return
        del self._out[:sent]
        if not self._out:
            self._loop.remove_writer(self.sock.fileno())

    def close(self, reason: str | None) -> None:
        """The connection ends (the worker left, a protocol error, or the host stops): forget everything of it."""
        if self.closed:
            return
        self.closed = True
        if reason is not None:  # a protocol error is a bug somewhere; a peer that vanished is a worker that died
            level = logging.WARNING if reason.startswith("protocol error") else logging.INFO
            log.log(level, "closing the connection of worker %s: %s", self.hello.get("pid"), reason)
        with contextlib.suppress(ValueError, OSError):  # already closed
            self._loop.remove_reader(self.sock.fileno())
            self._loop.remove_writer(self.sock.fileno())
        self.sock.close()
        while self._fds:
            self._close_fd(self._fds.popleft())
        self.host.detach(self)


def run_parts(
    engine: Engine,
    parts: Sequence[Placed],
    outs: Sequence[Placed] | None = None,
    finite: np.ndarray | None = None,
) -> tuple[int, float]:
    """Compute ``parts`` as one batch, each answer written into its ``out`` (default: over the part itself);
    (batch size run, seconds). ``finite`` (one flag per row of the parts) is filled with each row's finiteness:
    by the engine's ``run_into`` (on the device, where it has one), else on the host before the answers land."""
    started = time.perf_counter()
    outs = parts if outs is None else outs
    if any(isinstance(item, DeviceRows) for item in (*parts, *outs)):  # client CUDA regions: device to device
        run_device_into = getattr(engine, "run_device_into", None)
        if run_device_into is None:
            raise RuntimeError("this engine cannot read device memory (CUDA shared memory needs the CUDA engine)")
        if finite is not None:  # a rare mix: the host parts checked here, the device ones were when read
            row = 0
            for part in parts:
                if isinstance(part, np.ndarray):
                    finite[row : row + part.shape[0]] = finite_rows(part)
                row += int(part.shape[0])
        return int(run_device_into(parts, outs)), time.perf_counter() - started
    arrays = [p for p in parts if isinstance(p, np.ndarray)]
    targets = [o for o in outs if isinstance(o, np.ndarray)]
    run_into = getattr(engine, "run_into", None)
    if run_into is not None:  # the ONNX engine copies each part straight to and from the device
        padded = int(run_into(arrays, targets) if finite is None else run_into(arrays, targets, finite=finite))
    else:
        if finite is not None:
            finite[:] = np.concatenate([finite_rows(part) for part in arrays])
        samples = sum(int(part.shape[0]) for part in arrays)
        padded = pad_size(samples, engine.buckets if engine.fixed_shapes else None)
        answer, _ = run_batch(engine, arrays, padded)
        offset = 0
        for out in targets:
            np.copyto(out, answer[offset : offset + out.shape[0]])
            offset += out.shape[0]
    return padded, time.perf_counter() - started


class EngineHost:
    """Serves ``engine`` to workers on a Unix socket; see the module docstring."""

    def __init__(
        self,
        engine: Engine,
        max_batch_size: int,
        observer: BatcherObserver | None = None,
        device: str = "cpu",
        max_regions: int = 256,
        max_region_bytes: int = 4 << 30,
        cuda_regions: CudaRegionTable | None = None,
    ) -> None:
        self.engine = engine
        self.device = device
        self.max_batch_size = max_batch_size
        register, unregister = getattr(engine, "register_host", None), getattr(engine, "unregister_host", None)
        self.regions = RegionTable(max_regions, max_region_bytes, register, unregister)
        self.cuda_regions = cuda_regions  # client CUDA regions, with --shared-memory cuda
        self._finite: Any = None  # converter.finite.FiniteCheck on this GPU, made at the first CUDA part
        self._observer = SafeObserver(observer or NullObserver())
        self._jobs: deque[_Job] = deque()
        self._workers: set[_Worker] = set()
        self._scheduled = False
        self._dead: asyncio.Future[None] | None = None  # fails with what broke the engine
        self.failure: str | None = None

    def info(self) -> dict[str, Any]:
        e = self.engine
        return {
            "name": e.name,
            "dim": e.dim,
            "dtype": e.dtype.name,
            "max_seq_len": e.max_seq_len,
            "buckets": [b for b in e.buckets if b <= self.max_batch_size] or [self.max_batch_size],
            "provider": e.provider,
            "device": self.device,
            "describe": e.describe(),
            # Inputs read from client regions are checked here (NaN/Inf: an INVALID reply), so workers need not.
            "checks_finite": True,
        }

    async def serve(self, path: str) -> None:
        """Accept workers on ``path`` until cancelled; raises :class:`EngineUnrecoverable` when the engine broke."""
        loop = asyncio.get_running_loop()
        self._dead = loop.create_future()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        staging = f"{path}.{os.getpid()}"
        listener.bind(staging)
        listener.listen(128)
        listener.setblocking(False)
        os.rename(staging, path)  # the path appears only once it accepts: the supervisor waits for it
        self._observer.on_alive(True)  # encoder_batcher_alive is a min over processes: this one batches too
        attaching: set[asyncio.Task[None]] = set()
        try:
            while True:
                accept = asyncio.ensure_future(loop.sock_accept(listener))
                either: set[asyncio.Future[Any]] = {accept, self._dead}
                await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
                if self._dead.done():
                    accept.cancel()
                    self._dead.result()  # raises what broke the engine
                    return
                conn, _ = accept.result()
                task = asyncio.create_task(self._attach_worker(conn))
                attaching.add(task)
                task.add_done_callback(attaching.discard)
        finally:
            for task in attaching:
                task.cancel()
            await asyncio.gather(*attaching, return_exceptions=True)
            for worker in list(self._workers):
                worker.close(None)
            listener.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

    def _handshake(self, conn: socket.socket) -> tuple[ipc.Arena, dict[str, Any]]:
        """Handshake (blocking, on a thread): send the engine's facts, receive and map the worker's arena."""
        ipc.send_hello(conn, self.info())
        hello, fds = ipc.recv_hello(conn, max_fds=1)
        if len(fds) != 1:
            for fd in fds:
                os.close(fd)
            raise ipc.ProtocolError(f"expected one arena descriptor, got {len(fds)}")
        try:
            arena = ipc.Arena(fds[0], int(hello["arena_bytes"]))
        except Exception:
            os.close(fds[0])
            raise
        registered = False
        register = getattr(self.engine, "register_host", None)
        if register is not None:
            try:
                registered = bool(register(arena.address, arena.size))
            except Exception as exc:  # still correct, only slower: copies from pageable memory
                log.warning("cannot page-lock the arena of worker %s: %s", hello.get("pid"), exc)
        return arena, {**hello, "registered": registered}

    async def _attach_worker(self, conn: socket.socket) -> None:
        # A bounded handshake: a peer that connects and stays silent must not hold a thread forever.
        conn.settimeout(HANDSHAKE_TIMEOUT_S)
        try:
            arena, hello = await asyncio.to_thread(self._handshake, conn)
        except (OSError, ValueError, KeyError) as exc:
            log.warning("a worker failed to attach: %s", exc)
            conn.close()
            return
        conn.setblocking(False)
        worker = _Worker(self, conn, arena, hello)
        self._workers.add(worker)
        worker.start()
        # The handshake's last message goes out only now that this loop reads the connection: a worker whose
        # constructor returned is one whose next frame joins the next batch, never a later one.
        worker._write(ipc.hello_frame({"registered": hello["registered"]}))
        log.info(
            "worker %s attached (arena %s MiB, page-locked: %s)",
            hello.get("pid"),
            arena.size >> 20,
            hello["registered"],
        )

    def detach(self, worker: _Worker) -> None:
        """A worker left: forget its queued batches and its regions, unpin and unmap its arena."""
        if worker not in self._workers:
            return
        self._workers.discard(worker)
        kept: deque[_Job] = deque()
        for job in self._jobs:
            if job.worker is worker:
                self._finish(job)
            else:
                kept.append(job)
        self._jobs = kept
        for region in worker.regions.values():
            self.release(region)  # still mapped while a batch computing now uses it
        worker.regions.clear()
        unregister = getattr(self.engine, "unregister_host", None)
        if worker.hello["registered"] and unregister is not None:
            unregister(worker.arena.address)  # batches run on this loop: none is reading the arena now
        worker.arena.close()
        log.info("worker %s detached", worker.hello.get("pid"))

    def request(self, worker: _Worker, sequence: int, body: bytes) -> None:
        """One batch frame: refused at once when invalid (that job only), else queued for the next run."""
        if self.failure is not None:
            worker.reply(sequence, (ipc.GONE, self.failure, 0.0, 0.0))
            return
        try:
            job = self._job(worker, sequence, body)
        except ValueError as exc:
            worker.reply(sequence, (ipc.FAILED, str(exc), 0.0, 0.0))
            return
        self._jobs.append(job)
        self._run_soon()

    def _job(self, worker: _Worker, sequence: int, body: bytes) -> _Job:
        """The frame's parts as checked views (never trusting the worker: every range against its region)."""
        seq, specs = ipc.parse_batch(body)
        e = self.engine
        parts: list[Placed] = []
        outs: list[Placed] = []
        held: dict[int, ClientRegion | CudaRegion] = {}
        checked: list[bool] = []
        for samples, source, source_offset, target, target_offset in specs:
            if samples < 1 or not 1 <= seq <= e.max_seq_len:
                raise ValueError(f"invalid batch shape ({samples}, {seq})")
            shape = (samples, seq, e.dim)
            parts.append(worker.view(source, source_offset, shape, e.dtype))
            if isinstance(worker.regions.get(source), CudaRegion):
                self._check_finite(parts[-1])  # no worker has seen these values: checked where they are
            outs.append(worker.view(target, target_offset, shape, e.dtype))
            checked.append(isinstance(worker.regions.get(source), ClientRegion))
            for region_id in (source, target):
                if region_id != ipc.ARENA:
                    held[region_id] = worker.regions[region_id]
        for region in held.values():
            self.retain(region)
        samples = sum(int(part.shape[0]) for part in parts)
        return _Job(worker, sequence, parts, outs, samples, seq, time.monotonic(), list(held.values()), checked)

    def _check_finite(self, part: Placed) -> None:
        """ValueError (the client's input, answered 422) when a sample holds a NaN or an infinity."""
        if isinstance(part, np.ndarray):  # the test-only fake layer: host memory
            finite = bool(np.isfinite(part).all())
        else:
            if self._finite is None:
                from converter.finite import FiniteCheck

                self._finite = FiniteCheck(self.engine.dtype, "CUDAExecutionProvider", 0)
            finite = bool(self._finite.device(part.pointer, part.shape).all())
        if not finite:
            raise ValueError(f"{INVALID} inputs must be finite numbers within the model's dtype ({part.dtype})")

    def retain(self, region: ClientRegion | CudaRegion) -> None:
        if isinstance(region, CudaRegion):
            assert self.cuda_regions is not None
            self.cuda_regions.retain(region)
        else:
            self.regions.retain(region)

    def release(self, region: ClientRegion | CudaRegion) -> None:
        """One reference fewer on a client region of either kind (its table unmaps or closes it with the last)."""
        if isinstance(region, CudaRegion):
            assert self.cuda_regions is not None
            self.cuda_regions.release(region)
        else:
            self.regions.release(region)

    def _finish(self, job: _Job) -> None:
        """The job is answered or dropped: its views go, then its hold on client regions."""
        job.parts, job.outs = [], []
        for region in job.held:
            self.release(region)
        job.held = []

    def _run_soon(self) -> None:
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._run_next)

    def _take(self) -> list[_Job]:
        """FIFO jobs of the first job's sequence length, up to ``max_batch_size`` samples (at least one job)."""
        seq = self._jobs[0].seq
        taken: list[_Job] = []
        kept: list[_Job] = []
        samples = 0
        for job in self._jobs:
            size = job.samples
            if job.seq == seq and (not taken or samples + size <= self.max_batch_size):
                taken.append(job)
                samples += size
            else:
                kept.append(job)
        self._jobs = deque(kept)
        return taken

    def _run_next(self) -> None:
        """One batch, on the event loop itself: frames that arrive meanwhile wait in the socket buffers and join
        the next batch, and no thread hand-off is paid per batch. The next batch is a later callback, so the
        answers go out and new frames come in first."""
        self._scheduled = False
        if not self._jobs or self.failure is not None:
            return
        batch = self._take()
        started = time.monotonic()
        waits = tuple(started - job.arrived for job in batch)
        samples, seq = sum(j.samples for j in batch), batch[0].seq
        parts = [part for job in batch for part in job.parts]
        outs = [out for job in batch for out in job.outs]
        failure: Exception | None = None
        finite = np.ones(samples, bool) if any(any(job.checked) for job in batch) else None
        try:
            padded, compute_s = run_parts(self.engine, parts, outs, finite)
        except Exception as exc:
            log.warning("batch of %s samples (seq %s) failed: %s", samples, seq, exc, exc_info=True)
            failure = exc
            exc.__traceback__ = None  # its frames hold views of client regions, which go before the regions can
        del parts, outs  # ... be unmapped (see _finish)
        if failure is not None:
            message = f"inference failed: {type(failure).__name__}: {failure}"
            self._observer.on_batch(BatchStats(samples, samples, seq, time.monotonic() - started, (), True))
            if isinstance(failure, EngineUnrecoverable):
                self._break(batch, message, failure)
                return
            for job in batch:
                job.worker.reply(job.sequence, (ipc.FAILED, message, 0.0, 0.0))
                self._finish(job)
        else:
            # No queue waits here: the workers record their requests' waits, each request once.
            self._observer.on_batch(BatchStats(samples, padded, seq, compute_s, ()))
            refused = self._non_finite(batch, finite)
            for job, wait, bad in zip(batch, waits, refused, strict=True):
                if bad:
                    text = str(non_finite(self.engine.dtype.name))
                    job.worker.reply(job.sequence, (ipc.INVALID, ipc.invalid_message(bad, text), compute_s, wait))
                else:
                    job.worker.reply(job.sequence, (ipc.OK, "", compute_s, wait))
                self._finish(job)
        if self._jobs:
            self._run_soon()

    @staticmethod
    def _non_finite(batch: list[_Job], finite: np.ndarray | None) -> list[list[int]]:
        """Per job, the indices of its checked parts holding a non-finite row (``finite``: the batch's row flags)."""
        refused: list[list[int]] = []
        row = 0
        for job in batch:
            bad = []
            for index, (part, checked) in enumerate(zip(job.parts, job.checked, strict=True)):
                rows = int(part.shape[0])
                if finite is not None and checked and not finite[row : row + rows].all():
                    bad.append(index)
                row += rows
            refused.append(bad)
        return refused

    def _break(self, batch: list[_Job], message: str, exc: EngineUnrecoverable) -> None:
        """The engine is broken for good: this batch gets BROKEN, everything queued GONE, and serve() raises."""
        self.failure = message
        self._observer.on_alive(False)
        for job in batch:
            job.worker.reply(job.sequence, (ipc.BROKEN, message, 0.0, 0.0))
            self._finish(job)
        for job in self._jobs:
            job.worker.reply(job.sequence, (ipc.GONE, message, 0.0, 0.0))
            self._finish(job)
        self._jobs.clear()
        if self._dead is not None and not self._dead.done():
            self._dead.set_exception(exc)


def _exit_with_parent() -> None:
    """The supervisor owns this process: if it dies (even by SIGKILL), so do we, instead of holding the GPU."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        log.error("the supervisor is gone: the engine process exits")
        os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def main(argv: Sequence[str] | None = None) -> int:
    from service.engine.factory import build_engine
    from service.metrics import Metrics
    from service.settings import Settings

    parser = argparse.ArgumentParser(prog="python -m service.engine.host", description=__doc__)
    parser.add_argument("--socket", required=True, help="Unix socket path to listen on")
    parser.add_argument("--device", default="cpu", help="the device's label in metrics (its GPU is the one visible)")
    args = parser.parse_args(argv)
    settings = Settings().model_copy(update={"engine_dir": None})  # the service's ENCODER_* environment
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    _exit_with_parent()
    engine = build_engine(settings)
    engine.warmup()
    metrics = Metrics()  # with several workers: the same multiprocess directory, so /metrics shows our batches
    observer = metrics.observer(engine.buckets, device=args.device)
    limits = (settings.max_shared_memory_regions, settings.max_shared_memory_bytes)  # the registry's
    cuda_regions = None
    if "cuda" in settings.shared_memory_kinds:
        # The fake layer's "device" memory is host memory any engine reads; real device memory needs the CUDA path.
        if settings.cuda_memory == "fake" or getattr(engine, "reads_device_memory", False):
            from service.cudashm.device import device_memory

            cuda_regions = CudaRegionTable(device_memory(settings.cuda_memory), 0, *limits)  # its GPU: ordinal 0
        else:
            log.warning("CUDA shared memory is served by copying: this engine cannot read device memory")
    batch = min(settings.max_batch_size, max(engine.buckets))
    host = EngineHost(engine, batch, observer, args.device, *limits, cuda_regions=cuda_regions)
    log.info(
        "engine process ready: %s on %s (device %s), batches up to %s",
        engine.name,
        engine.provider,
        args.device,
        host.max_batch_size,
    )
    try:
        asyncio.run(host.serve(args.socket))
    except EngineUnrecoverable as exc:
        log.error("the engine is broken for good, exiting: %s", exc)
        return 1
    finally:
        metrics.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
