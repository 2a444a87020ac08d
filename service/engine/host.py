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
from dataclasses import dataclass
from typing import Any

import numpy as np

from service.batching.batcher import pad_size, run_batch
from service.batching.observer import BatcherObserver, BatchStats, NullObserver, SafeObserver
from service.engine import ipc
from service.engine.base import Engine, EngineUnrecoverable

log = logging.getLogger(__name__)
Answer = tuple[int, str, float, float]  # status, message, engine seconds, seconds queued here
HANDSHAKE_TIMEOUT_S = 10.0


@dataclass
class _Job:
    """One worker batch: its rows in that worker's arena, which the answer overwrites."""

    worker: _Worker
    sequence: int
    rows: np.ndarray
    arrived: float


class _Worker(asyncio.Protocol):
    """One attached worker's connection: request frames in, answer frames out, all on the event loop.

    A protocol, not a stream reader per worker: each request is parsed in ``data_received`` and queued without a
    coroutine, future or task of its own: a round trip took 49 instead of 73 us and 40 instead of 56 us of this
    process's CPU (no-op engine, one core, 2-core x86-64 CPU).
    """

    def __init__(self, host: EngineHost, arena: ipc.Arena, hello: dict[str, Any]) -> None:
        self.host, self.arena, self.hello = host, arena, hello
        self.transport: asyncio.Transport | None = None
        self._buffer = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        size = ipc.REQUEST.size
        while len(self._buffer) >= size:
            frame = ipc.REQUEST.unpack_from(self._buffer)
            del self._buffer[:size]
            self.host.request(self, *frame)

    def reply(self, sequence: int, answer: Answer) -> None:
        if self.transport is None or self.transport.is_closing():
            return  # the worker left: nobody waits for this answer
        status, message, compute_s, wait_s = answer
        text = message.encode()
        self.transport.write(ipc.REPLY.pack(sequence, status, len(text), compute_s, wait_s) + text)

    def connection_lost(self, exc: Exception | None) -> None:
        self.host.detach(self)


def run_parts(engine: Engine, parts: Sequence[np.ndarray]) -> tuple[int, float]:
    """Compute ``parts`` as one batch, each answer written over its input; (batch size run, seconds)."""
    started = time.perf_counter()
    run_into = getattr(engine, "run_into", None)
    if run_into is not None:  # the ONNX engine copies each part straight to and from the device
        padded = int(run_into(parts, parts))
    else:
        samples = sum(int(part.shape[0]) for part in parts)
        padded = pad_size(samples, engine.buckets if engine.fixed_shapes else None)
        out, _ = run_batch(engine, list(parts), padded)
        offset = 0
        for part in parts:
            np.copyto(part, out[offset : offset + part.shape[0]])
            offset += part.shape[0]
    return padded, time.perf_counter() - started


class EngineHost:
    """Serves ``engine`` to workers on a Unix socket; see the module docstring."""

    def __init__(
        self, engine: Engine, max_batch_size: int, observer: BatcherObserver | None = None, device: str = "cpu"
    ) -> None:
        self.engine = engine
        self.device = device
        self.max_batch_size = max_batch_size
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
                if worker.transport is not None:
                    worker.transport.abort()
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
        worker = _Worker(self, arena, hello)
        self._workers.add(worker)
        transport, _ = await asyncio.get_running_loop().connect_accepted_socket(lambda: worker, sock=conn)
        # The handshake's last message goes out only now that this loop reads the connection: a worker whose
        # constructor returned is one whose next frame joins the next batch, never a later one.
        transport.write(ipc.hello_frame({"registered": hello["registered"]}))
        log.info(
            "worker %s attached (arena %s MiB, page-locked: %s)",
            hello.get("pid"),
            arena.size >> 20,
            hello["registered"],
        )

    def detach(self, worker: _Worker) -> None:
        """A worker left: forget its queued batches, unpin and unmap its arena."""
        if worker not in self._workers:
            return
        self._workers.discard(worker)
        self._jobs = deque(job for job in self._jobs if job.worker is not worker)
        unregister = getattr(self.engine, "unregister_host", None)
        if worker.hello["registered"] and unregister is not None:
            unregister(worker.arena.address)  # batches run on this loop: none is reading the arena now
        worker.arena.close()
        log.info("worker %s detached", worker.hello.get("pid"))

    def request(self, worker: _Worker, sequence: int, batch: int, seq: int, offset: int) -> None:
        """One request frame: refused at once when invalid, else queued for the next run."""
        if self.failure is not None:
            worker.reply(sequence, (ipc.GONE, self.failure, 0.0, 0.0))
            return
        if batch < 1 or not 1 <= seq <= self.engine.max_seq_len:
            worker.reply(sequence, (ipc.FAILED, f"invalid batch shape ({batch}, {seq})", 0.0, 0.0))
            return
        try:
            rows = worker.arena.view(offset, (batch, seq, self.engine.dim), self.engine.dtype)
        except ValueError as exc:
            worker.reply(sequence, (ipc.FAILED, str(exc), 0.0, 0.0))
            return
        self._jobs.append(_Job(worker, sequence, rows, time.monotonic()))
        self._run_soon()

    def _run_soon(self) -> None:
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._run_next)

    def _take(self) -> list[_Job]:
        """FIFO jobs of the first job's sequence length, up to ``max_batch_size`` samples (at least one job)."""
        seq = self._jobs[0].rows.shape[1]
        taken: list[_Job] = []
        kept: list[_Job] = []
        samples = 0
        for job in self._jobs:
            size = job.rows.shape[0]
            if job.rows.shape[1] == seq and (not taken or samples + size <= self.max_batch_size):
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
        samples, seq = sum(j.rows.shape[0] for j in batch), batch[0].rows.shape[1]
        try:
            padded, compute_s = run_parts(self.engine, [job.rows for job in batch])
        except Exception as exc:
            message = f"inference failed: {type(exc).__name__}: {exc}"
            log.warning("batch of %s samples (seq %s) failed: %s", samples, seq, exc, exc_info=True)
            self._observer.on_batch(BatchStats(samples, samples, seq, time.monotonic() - started, (), True))
            if isinstance(exc, EngineUnrecoverable):
                self._break(batch, message, exc)
                return
            for job in batch:
                job.worker.reply(job.sequence, (ipc.FAILED, message, 0.0, 0.0))
        else:
            # No queue waits here: the workers record their requests' waits, each request once.
            self._observer.on_batch(BatchStats(samples, padded, seq, compute_s, ()))
            for job, wait in zip(batch, waits, strict=True):
                job.worker.reply(job.sequence, (ipc.OK, "", compute_s, wait))
        if self._jobs:
            self._run_soon()

    def _break(self, batch: list[_Job], message: str, exc: EngineUnrecoverable) -> None:
        """The engine is broken for good: this batch gets BROKEN, everything queued GONE, and serve() raises."""
        self.failure = message
        self._observer.on_alive(False)
        for job in batch:
            job.worker.reply(job.sequence, (ipc.BROKEN, message, 0.0, 0.0))
        for job in self._jobs:
            job.worker.reply(job.sequence, (ipc.GONE, message, 0.0, 0.0))
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
    host = EngineHost(engine, min(settings.max_batch_size, max(engine.buckets)), observer, args.device)
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
