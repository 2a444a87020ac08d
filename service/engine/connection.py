"""One worker's connection to the engine process: frames in, answer frames out, all on the event loop.

BATCH frames go to the host's queue (:meth:`service.engine.host.EngineHost.request`), REGISTER and UNREGISTER
frames to the connection's :class:`service.engine.registrar.Registrar`; answers are REPLY frames written back.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import logging
import os
import socket
from collections import deque
from typing import TYPE_CHECKING, Any

import numpy as np

from converter.device_rows import Placed
from service.engine import ipc
from service.engine.cuda_regions import CudaRegion
from service.engine.regions import ClientRegion
from service.engine.registrar import Registrar

if TYPE_CHECKING:
    from service.engine.host import EngineHost

log = logging.getLogger(__name__)
Answer = tuple[int, str, float, float]  # status, message, engine seconds, the engine's quickest run (see ipc.REPLY)
READ_BYTES = 1 << 16
MAX_QUEUED_FDS = 8  # descriptors received ahead of their REGISTER frames; more is a protocol error
_FD_SPACE = socket.CMSG_SPACE(MAX_QUEUED_FDS * array.array("i").itemsize)


class WorkerConnection:
    """One attached worker's connection.

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
        self._registrar = Registrar(self, host)

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
                self._registrar.register(sequence, body)
            elif kind == ipc.UNREGISTER and len(body) == ipc.UNREGISTER_BODY.size:
                self._registrar.unregister(ipc.UNREGISTER_BODY.unpack(body)[0])
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

    # --- what the registrar needs: descriptors, and pausing the reading ------------------------------------------

    def take_fd(self) -> int:
        """The oldest descriptor received ahead of its REGISTER frame, or -1 when none came."""
        return self._fds.popleft() if self._fds else -1

    def pause(self) -> None:
        """Read no more frames until :meth:`resume` (a region is being mapped on a thread)."""
        self._holding = True
        self._loop.remove_reader(self.sock.fileno())

    def resume(self) -> None:
        self._holding = False
        if not self.closed:
            self.start()
            self._parse()

    # --- answers and the end ---------------------------------------------------------------------------------

    def reply(self, sequence: int, answer: Answer) -> None:
        if self.closed:
            return  # the worker left: nobody waits for this answer
        status, message, compute_s, quickest_s = answer
        text = message.encode()
        self.write(ipc.REPLY.pack(sequence, status, len(text), compute_s, quickest_s) + text)

    def write(self, data: bytes) -> None:
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
            os.close(self._fds.popleft())
        self.host.detach(self)
