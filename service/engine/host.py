"""The engine process: one engine (one model copy, one CUDA context) computing for every HTTP worker.

``python -m service --workers N`` starts it before the workers (see :mod:`service.engine.process`). Each
worker's batcher sends it whole batches through shared memory (:mod:`service.engine.ipc`); whenever the engine
is free, :class:`EngineHost` merges what every worker sent (FIFO, one sequence length, up to the largest batch
bucket) into one run and writes each answer back over its input. Eight workers with an engine each meant
eight CUDA contexts time-slicing one GPU on batches of one to three; here they share one queue.

The event loop reads frames (:mod:`service.engine.connection`), registers regions
(:mod:`service.engine.registrar`), queues jobs and writes answers; the batch itself runs on the compute thread
(:mod:`service.engine.compute`), so the loop goes on while the GPU computes. Nothing a computing batch reads is
unpinned or unmapped under it: its jobs hold their client regions, and the arena of a worker that leaves
meanwhile is closed when the batch ends.

With several GPUs there is one engine process per device (``--device`` names it in metrics; its GPU is the
only one it sees), and the workers spread their batches over them (:mod:`service.engine.router`).

A batch that fails fails the worker batches in it; an :class:`EngineUnrecoverable` (e.g. a sticky CUDA
error) answers BROKEN to the batches it broke and GONE to every other waiting one (GONE requests get 503, not
500) and ends the process with status 1: the supervisor restarts it (:mod:`service.engine.supervisor`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import socket
import sys
import time
from collections import deque
from typing import Any

import numpy as np

from service.batching.observer import BatcherObserver, BatchStats, NullObserver, SafeObserver
from service.engine import ipc
from service.engine.base import Engine, EngineUnrecoverable
from service.engine.compute import Computed, ComputeThread, InlineCompute
from service.engine.connection import WorkerConnection
from service.engine.cuda_regions import CudaRegion, CudaRegionTable
from service.engine.jobs import DeviceFinite, Job, read_job, refused_parts, take
from service.engine.regions import ClientRegion, RegionTable
from service.errors import non_finite

log = logging.getLogger(__name__)
HANDSHAKE_TIMEOUT_S = 10.0


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
        threaded: bool = True,
        compute: ComputeThread | None = None,
    ) -> None:
        self.engine = engine
        self.device = device
        self.max_batch_size = max_batch_size
        register, unregister = getattr(engine, "register_host", None), getattr(engine, "unregister_host", None)
        self.regions = RegionTable(max_regions, max_region_bytes, register, unregister)
        self.cuda_regions = cuda_regions  # client CUDA regions, with --shared-memory cuda
        self._device_finite = DeviceFinite(engine.dtype)  # inputs in client CUDA regions
        self._observer = SafeObserver(observer or NullObserver())
        self._jobs: deque[Job] = deque()
        self._workers: set[WorkerConnection] = set()
        self._scheduled = False
        self._threaded = threaded or compute is not None  # batches on a compute thread (else on the loop)
        self._thread = compute  # the one the engine warmed up on, if made before (see ComputeThread)
        self._compute: ComputeThread | InlineCompute | None = None  # while serving
        self._computing: list[Job] | None = None  # the batch on the compute thread
        self._idle: asyncio.Event | None = None  # set while no batch computes
        self._stopping = False
        self._leaving: list[WorkerConnection] = []  # detached while the batch computing now reads their arenas
        self._dead: asyncio.Future[None] | None = None  # fails with what broke the engine
        self.failure: str | None = None
        self.quickest_s = 0.0  # the quickest run so far (0: none yet), in every reply for the workers' routing

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
        self._idle = asyncio.Event()
        self._idle.set()
        if self._threaded:
            self._thread = self._thread or ComputeThread(self.engine)
            self._thread.bind(loop)
            self._compute = self._thread
        else:
            self._compute = InlineCompute(self.engine, loop)
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
            self._stopping = True  # no batch starts now
            await self._idle.wait()  # the batch computing now reads the workers' memory: it ends first
            self._compute.stop()
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
        worker = WorkerConnection(self, conn, arena, hello)
        self._workers.add(worker)
        worker.start()
        # The handshake's last message goes out only now that this loop reads the connection: a worker whose
        # constructor returned is one whose next frame joins the next batch, never a later one.
        worker.write(ipc.hello_frame({"registered": hello["registered"]}))
        log.info(
            "worker %s attached (arena %s MiB, page-locked: %s)",
            hello.get("pid"),
            arena.size >> 20,
            hello["registered"],
        )

    def detach(self, worker: WorkerConnection) -> None:
        """A worker left: forget its queued batches and its regions, unpin and unmap its arena."""
        if worker not in self._workers:
            return
        self._workers.discard(worker)
        kept: deque[Job] = deque()
        for job in self._jobs:
            if job.worker is worker:
                self._finish(job)
            else:
                kept.append(job)
        self._jobs = kept
        for region in worker.regions.values():
            self.release(region)  # still mapped while a batch computing now uses it
        worker.regions.clear()
        if self._computing is not None and any(job.worker is worker for job in self._computing):
            self._leaving.append(worker)  # the batch computing now copies from and to its arena: closed after
        else:
            self._close_arena(worker)
        log.info("worker %s detached", worker.hello.get("pid"))

    def _close_arena(self, worker: WorkerConnection) -> None:
        """Unpin and unmap a detached worker's arena (no batch reads it: none of its jobs computes)."""
        unregister = getattr(self.engine, "unregister_host", None)
        if worker.hello["registered"] and unregister is not None:
            unregister(worker.arena.address)
        worker.arena.close()

    def request(self, worker: WorkerConnection, sequence: int, body: bytes) -> None:
        """One batch frame: refused at once when invalid (that job only), else queued for the next run."""
        if self.failure is not None:
            worker.reply(sequence, (ipc.GONE, self.failure, 0.0, 0.0))
            return
        try:
            job = read_job(worker, sequence, body, self.engine, self._device_finite)
        except ValueError as exc:
            worker.reply(sequence, (ipc.FAILED, str(exc), 0.0, 0.0))
            return
        if job.all_refused:  # NaN/Inf in every part (CUDA regions, checked as read): nothing to compute
            text = str(non_finite(self.engine.dtype.name))
            worker.reply(sequence, (ipc.INVALID, ipc.invalid_message(job.refused, text), 0.0, 0.0))
            return
        for region in job.held:
            self.retain(region)
        self._jobs.append(job)
        self._run_soon()

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

    def _finish(self, job: Job) -> None:
        """The job is answered or dropped: its views go, then its hold on client regions."""
        job.parts, job.outs = [], []
        for region in job.held:
            self.release(region)
        job.held = []

    def _run_soon(self) -> None:
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._run_next)

    def _run_next(self) -> None:
        """Hand the next batch to the compute thread, unless one computes: frames that arrive meanwhile are read and
        queued, and join the batch formed when it ends (:meth:`_computed`)."""
        self._scheduled = False
        if self._computing is not None or not self._jobs or self.failure is not None or self._stopping:
            return
        assert self._compute is not None and self._idle is not None
        batch, self._jobs = take(self._jobs, self.max_batch_size)
        started = time.monotonic()
        parts = [part for job in batch for part in job.parts]
        outs = [out for job in batch for out in job.outs]
        samples = sum(j.samples for j in batch)
        finite = np.ones(samples, bool) if any(any(job.checked) for job in batch) else None
        self._computing = batch
        self._idle.clear()
        done = functools.partial(self._computed, batch, started, finite)
        self._compute.submit(parts, outs, finite, done)

    def _computed(self, batch: list[Job], started: float, finite: np.ndarray | None, result: Computed) -> None:
        """A batch ended (on the loop): the next one starts before this one's answers are written."""
        assert self._idle is not None
        self._computing = None
        self._idle.set()
        for worker in self._leaving:
            self._close_arena(worker)
        self._leaving.clear()
        samples, seq = sum(j.samples for j in batch), batch[0].seq
        failure = result.failure
        if isinstance(failure, EngineUnrecoverable):
            message = f"inference failed: {type(failure).__name__}: {failure}"
            self._observer.on_batch(BatchStats(samples, samples, seq, time.monotonic() - started, (), True))
            self._break(batch, message, failure)
            return
        if self._threaded:
            self._run_next()
        elif self._jobs:
            self._run_soon()  # on the loop: answers go out and frames come in first
        if failure is not None:
            message = f"inference failed: {type(failure).__name__}: {failure}"
            self._observer.on_batch(BatchStats(samples, samples, seq, time.monotonic() - started, (), True))
            for job in batch:
                job.worker.reply(job.sequence, (ipc.FAILED, message, 0.0, 0.0))
                self._finish(job)
            return
        # No queue waits here: the workers record their requests' waits, each request once.
        self._observer.on_batch(BatchStats(samples, result.padded, seq, result.seconds, ()))
        self.quickest_s = min(self.quickest_s or result.seconds, result.seconds)
        quickest = self.quickest_s
        refused = refused_parts(batch, finite)
        for job, bad in zip(batch, refused, strict=True):
            if bad:
                text = str(non_finite(self.engine.dtype.name))
                job.worker.reply(job.sequence, (ipc.INVALID, ipc.invalid_message(bad, text), result.seconds, quickest))
            else:
                job.worker.reply(job.sequence, (ipc.OK, "", result.seconds, quickest))
            self._finish(job)

    def _break(self, batch: list[Job], message: str, exc: EngineUnrecoverable) -> None:
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


if __name__ == "__main__":
    # The start-up (settings -> engine, compute thread, CUDA regions, metrics) lives in host_main; the command stays
    # ``python -m service.engine.host``, which the supervisor runs and tools and tests find engine processes by.
    from service.engine.host_main import main

    sys.exit(main())
