"""Helpers for engine-process tests: an :class:`EngineHost` serving on a background event loop, raw clients."""

from __future__ import annotations

import array
import asyncio
import contextlib
import fcntl
import os
import shutil
import socket
import tempfile
import termios
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np

from service.batching.observer import BatcherObserver
from service.engine import ipc
from service.engine.base import Engine
from service.engine.fake import FakeEngine
from service.engine.host import EngineHost
from service.engine.remote import RemoteEngine

DIM = 8  # the fake engine's default width
TIMEOUT_S = 30.0  # generous: a slow CI box must not flake, a hang must still end


def sample(seed: int, batch: int = 1, seq: int = 4, dim: int = DIM) -> np.ndarray:
    """A distinct input per seed: an answer that went to the wrong worker cannot pass the check."""
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((batch, seq, dim)) + seed).astype(np.float32)


def wait_until(condition: Callable[[], bool], what: str, timeout: float = TIMEOUT_S) -> None:
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


class HostThread:
    """``EngineHost(engine, max_batch_size, observer).serve(path)`` on an event loop of its own thread.

    ``stop()`` cancels the serve task from outside (``call_soon_threadsafe``) and joins the thread; ``error``
    is what ``serve`` raised (None after a cancellation).
    """

    def __init__(
        self, engine: Engine, max_batch_size: int, observer: BatcherObserver | None = None, threaded: bool = True
    ) -> None:
        self.host = EngineHost(engine, max_batch_size, observer, threaded=threaded)
        # Unix socket paths are limited to ~107 bytes: a short private directory, not pytest's long tmp_path.
        self.directory = tempfile.mkdtemp(prefix="eh-")
        self.path = os.path.join(self.directory, "s")
        self.error: BaseException | None = None
        self.cancelled = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._thread = threading.Thread(target=self._run, name="engine-host", daemon=True)

    def _run(self) -> None:
        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._task = asyncio.current_task()
            await self.host.serve(self.path)

        try:
            asyncio.run(main())
        except asyncio.CancelledError:
            self.cancelled = True
        except BaseException as exc:
            self.error = exc

    def start(self) -> HostThread:
        self._thread.start()
        wait_until(lambda: os.path.exists(self.path) or not self._thread.is_alive(), "the engine host to listen")
        if not os.path.exists(self.path):
            raise AssertionError(f"the engine host ended before it listened: {self.error!r}")
        _SERVING.add(self)
        return self

    def drain(self) -> None:
        """Until the host has read and queued every frame its workers sent (none left in a socket)."""

        def unread() -> int:
            sockets = [worker.sock for worker in list(self.host._workers) if not worker.closed]
            with contextlib.suppress(OSError, ValueError):  # closed meanwhile: nothing to read there
                return sum(_pending(sock) for sock in sockets)
            return 0

        # Without the compute thread (--no-engine-thread) a held batch holds the loop: the frames wait in the sockets
        # and are all read once the gate opens, before the next batch.
        if self._thread.is_alive() and self._loop is not None and self.host._threaded:
            wait_until(lambda: unread() == 0, "the host to read every frame sent")
            read = threading.Event()  # ... and to be done with the last one: one round trip through its loop
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                self._loop.call_soon_threadsafe(read.set)
                read.wait(TIMEOUT_S)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def join(self, timeout: float = TIMEOUT_S) -> None:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "the engine host did not end"

    def stop(self) -> None:
        _SERVING.discard(self)
        if self._thread.is_alive():
            wait_until(lambda: self._task is not None, "the serve task")
            assert self._loop is not None and self._task is not None
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: serve ended on its own
                self._loop.call_soon_threadsafe(self._task.cancel)
            self.join()
        shutil.rmtree(self.directory, ignore_errors=True)


@contextlib.contextmanager
def hosting(
    engine: Engine, max_batch_size: int = 8, observer: BatcherObserver | None = None, threaded: bool = True
) -> Iterator[HostThread]:
    """A serving :class:`HostThread`, stopped (and its socket directory removed) afterwards."""
    host = HostThread(engine, max_batch_size, observer, threaded).start()
    try:
        yield host
    finally:
        host.stop()


@contextlib.contextmanager
def remotes(path: str, count: int = 1, **kwargs: Any) -> Iterator[list[RemoteEngine]]:
    """``count`` attached workers, closed afterwards."""
    engines: list[RemoteEngine] = []
    try:
        for _ in range(count):
            engines.append(RemoteEngine(path, **kwargs))
        yield engines
    finally:
        for engine in engines:
            engine.close()


_SERVING: set[HostThread] = set()


def _pending(sock: socket.socket) -> int:
    """Bytes waiting in ``sock`` to be read."""
    count = array.array("i", [0])
    fcntl.ioctl(sock.fileno(), termios.FIONREAD, count)
    return count[0]


class Gate:
    """A FakeEngine ``fail_if`` that holds every batch inside the engine until :meth:`open` (never fails one).

    The host computes one batch at a time on its compute thread, so while a batch is held no other starts: request
    frames sent meanwhile are read and queued in the order they arrive, and :meth:`open` waits until every serving
    host has read them, so the next batch is formed from all of them. Which batches the host merges is then
    certain, not a matter of timing. Workers must attach before.
    """

    def __init__(self) -> None:
        self._open = threading.Event()

    def __call__(self, x: np.ndarray) -> bool:
        if not self._open.wait(TIMEOUT_S):
            raise AssertionError("the gate was never opened")
        return False

    def open(self) -> None:
        for host in list(_SERVING):
            host.drain()
        self._open.set()


class _SendSpy:
    """A socket that counts its ``sendall`` calls (a RemoteEngine sends each request frame with one)."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self.sent = threading.Semaphore(0)

    def sendall(self, data: bytes) -> None:
        self._sock.sendall(data)
        self.sent.release()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


def spy_on_sends(remote: RemoteEngine) -> threading.Semaphore:
    """Released each time ``remote`` has handed a request frame to the kernel."""
    spy = _SendSpy(remote._sock)
    remote._sock = spy  # type: ignore[assignment]
    return spy.sent


class RawWorker:
    """A worker speaking the protocol by hand: handshake, then any frame a test wants to send."""

    def __init__(self, path: str, arena_bytes: int = 1 << 16) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(TIMEOUT_S)
        self.sock.connect(path)
        self.info, _ = ipc.recv_hello(self.sock)
        self.arena = ipc.Arena.create(arena_bytes)
        ipc.send_hello(self.sock, {"pid": os.getpid(), "arena_bytes": self.arena.size}, (self.arena.fd,))
        self.registered = ipc.recv_hello(self.sock)[0]["registered"]

    def put(self, x: np.ndarray, offset: int = 0) -> None:
        self.arena.view(offset, x.shape, x.dtype)[...] = x

    def get(self, shape: tuple[int, ...], offset: int = 0) -> np.ndarray:
        return self.arena.view(offset, shape, np.dtype(np.float32)).copy()

    def send(self, sequence: int, batch: int, seq: int, offset: int = 0) -> None:
        self.sock.sendall(ipc.batch_frame(sequence, seq, [(batch, ipc.ARENA, offset, ipc.ARENA, offset)]))

    def receive(self) -> tuple[int, int, str]:
        """(sequence, status, message) of the next reply."""
        answered, status, length, _, _ = ipc.REPLY.unpack(ipc.recv_exactly(self.sock, ipc.REPLY.size))
        message = ipc.recv_exactly(self.sock, length).decode() if length else ""
        return answered, status, message

    def request(self, sequence: int, batch: int, seq: int, offset: int = 0) -> tuple[int, int, str]:
        self.send(sequence, batch, seq, offset)
        return self.receive()

    def close(self) -> None:
        self.sock.close()
        self.arena.close()


def gated(**kwargs: Any) -> tuple[FakeEngine, Gate]:
    gate = Gate()
    return FakeEngine(fail_if=gate, **kwargs), gate


def hold_first(pool: ThreadPoolExecutor, engine: FakeEngine, remote: RemoteEngine, x: np.ndarray) -> Future[Any]:
    """Start ``x`` and wait until the engine holds it (behind its gate): what comes next queues up."""
    future = pool.submit(remote.run, x)
    wait_until(lambda: len(engine.batches) == 1, "the first batch to reach the engine")
    return future
