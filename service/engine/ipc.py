"""The wire between HTTP workers and the engine process: a Unix socket for small frames, shared memory for tensors.

Each worker owns one *arena*: an anonymous shared-memory file (``memfd``) it maps, fills with a batch and
hands to the engine process once, as a file descriptor over the socket. After that a request is a small
frame (where the batch lies in the arena and its shape) and the answer a small frame; the engine process
reads the batch from the arena and writes the answer over it, so tensors never travel through the socket.
Client shared-memory regions travel the same way (a REGISTER frame with the region's descriptor), after which a
batch frame may name them instead of the arena (see :mod:`service.engine.regions`).
No file names exist, so nothing is left behind when a process dies, and a container's small ``/dev/shm``
does not limit the arena.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import socket
import struct
from typing import Any

import numpy as np

# worker -> engine: every frame is a header (kind, sequence number, length of the body that follows) and a body.
HEADER = struct.Struct("<BII")
BATCH, REGISTER, UNREGISTER = 1, 2, 3
# BATCH body: sequence length and number of parts, then per part where its input lies and where its answer goes:
# samples, input region, byte offset there, output region, byte offset there. Region 0 is the connection's arena
# (an input answered in place names the same place twice); others are client regions passed by REGISTER.
BATCH_HEAD = struct.Struct("<II")
PART = struct.Struct("<IIQIQ")
# REGISTER body (one file descriptor travels with it): region id, kind, byte offset in the object, byte size;
# a kind other than KIND_SYSTEM may append bytes of its own (e.g. a CUDA IPC handle instead of a descriptor).
REGISTER_HEAD = struct.Struct("<IBQQ")
UNREGISTER_BODY = struct.Struct("<I")  # region id; no reply
ARENA = 0
KIND_SYSTEM = 0
MAX_BODY = 1 << 20
MAX_PARTS = (MAX_BODY - BATCH_HEAD.size) // PART.size
Part = tuple[int, int, int, int, int]  # samples, input region, input offset, output region, output offset
# engine -> worker: sequence number, status, length of the message that follows, engine seconds of the run, and the
# engine's quickest run so far (seconds, 0 when not known: how long a run of a few samples takes there, which the
# workers' routing compares runs with, see service/engine/routing.py)
REPLY = struct.Struct("<IBIdd")
# BROKEN: this batch broke the engine for good; GONE: the engine broke on another batch, this one never ran.
# INVALID: computed, but parts read from client regions hold a NaN or an Inf (see invalid_message).
OK, FAILED, BROKEN, GONE, INVALID = 0, 1, 2, 3, 4
_LENGTH = struct.Struct("<I")
MAX_HELLO = 1 << 16


class ProtocolError(ConnectionError):
    pass


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    """Blocking read of exactly ``size`` bytes; ConnectionError when the peer went away first."""
    chunks = []
    while size:
        chunk = sock.recv(size)
        if not chunk:
            raise ConnectionError("the peer closed the connection")
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


def hello_frame(payload: dict[str, Any]) -> bytes:
    """A length-prefixed JSON message."""
    body = json.dumps(payload).encode()
    if len(body) > MAX_HELLO:
        raise ProtocolError(f"hello message of {len(body)} bytes is too large")
    return _LENGTH.pack(len(body)) + body


def send_hello(sock: socket.socket, payload: dict[str, Any], fds: tuple[int, ...] = ()) -> None:
    """A :func:`hello_frame`, optionally carrying file descriptors (blocking socket)."""
    frame = hello_frame(payload)
    if fds:
        sent = socket.send_fds(sock, [frame], list(fds))
        frame = frame[sent:]
    if frame:
        # Never an empty send: once the peer has read the whole frame it may refuse it and close, and a zero-byte
        # send to a closed peer fails with EPIPE although everything was delivered.
        sock.sendall(frame)


def recv_hello(sock: socket.socket, max_fds: int = 0) -> tuple[dict[str, Any], list[int]]:
    """Counterpart of :func:`send_hello` (blocking socket)."""
    fds: list[int] = []
    if max_fds:
        data, fds, _, _ = socket.recv_fds(sock, _LENGTH.size + MAX_HELLO, max_fds)
        if not data:
            raise ConnectionError("the peer closed the connection")
    else:
        data = recv_exactly(sock, _LENGTH.size)
    data += recv_exactly(sock, max(0, _LENGTH.size - len(data)))
    (length,) = _LENGTH.unpack_from(data)
    if length > MAX_HELLO:
        raise ProtocolError(f"hello message of {length} bytes is too large")
    body = data[_LENGTH.size :] + recv_exactly(sock, length + _LENGTH.size - len(data))
    try:
        return json.loads(body), fds
    except ValueError as exc:
        raise ProtocolError(f"malformed hello message: {exc}") from exc


def batch_frame(sequence: int, seq: int, parts: list[Part]) -> bytes:
    """A BATCH frame: ``parts`` computed as one job of sequence length ``seq``, answered by one reply."""
    body = BATCH_HEAD.pack(seq, len(parts)) + b"".join(PART.pack(*part) for part in parts)
    return HEADER.pack(BATCH, sequence, len(body)) + body


def parse_batch(body: bytes) -> tuple[int, list[Part]]:
    """(sequence length, parts) of a BATCH body; ValueError when it is not one."""
    if len(body) < BATCH_HEAD.size:
        raise ValueError(f"a batch frame of {len(body)} bytes is too short")
    seq, count = BATCH_HEAD.unpack_from(body)
    if count < 1 or len(body) != BATCH_HEAD.size + count * PART.size:
        raise ValueError(f"a batch frame of {len(body)} bytes cannot hold {count} parts")
    return seq, [PART.unpack_from(body, BATCH_HEAD.size + i * PART.size) for i in range(count)]


def invalid_message(parts: list[int], text: str) -> str:
    """An INVALID reply's message: which parts of the frame (indices) are refused, and why."""
    return ",".join(str(part) for part in parts) + ":" + text


def parse_invalid(message: str) -> tuple[list[int], str]:
    """Counterpart of :func:`invalid_message`; ValueError when ``message`` is not one."""
    head, _, text = message.partition(":")
    return [int(part) for part in head.split(",")], text


def register_frame(sequence: int, region: int, kind: int, offset: int, byte_size: int, extra: bytes = b"") -> bytes:
    """A REGISTER frame (the caller sends the region's descriptor with it); answered by one reply."""
    body = REGISTER_HEAD.pack(region, kind, offset, byte_size) + extra
    return HEADER.pack(REGISTER, sequence, len(body)) + body


def unregister_frame(region: int) -> bytes:
    """An UNREGISTER frame: the worker will not name ``region`` again (no reply)."""
    return HEADER.pack(UNREGISTER, 0, UNREGISTER_BODY.size) + UNREGISTER_BODY.pack(region)


class Arena:
    """A shared-memory mapping and numpy views into it."""

    def __init__(self, fd: int, size: int) -> None:
        self.fd = fd
        self.size = size
        self.mapping = mmap.mmap(fd, size)
        self.base = np.frombuffer(self.mapping, np.uint8)

    @classmethod
    def create(cls, size: int) -> Arena:
        size = max(mmap.PAGESIZE, -(-size // mmap.PAGESIZE) * mmap.PAGESIZE)
        fd = os.memfd_create("encoder-arena", os.MFD_CLOEXEC)
        os.ftruncate(fd, size)
        return cls(fd, size)

    @property
    def address(self) -> int:
        return int(self.base.__array_interface__["data"][0])

    def view(self, offset: int, shape: tuple[int, ...], dtype: np.dtype[Any]) -> np.ndarray:
        nbytes = int(np.prod(shape)) * dtype.itemsize
        if offset < 0 or offset + nbytes > self.size:
            raise ValueError(f"{nbytes} bytes at offset {offset} do not fit an arena of {self.size} bytes")
        return self.base[offset : offset + nbytes].view(dtype).reshape(shape)

    def offset_of(self, array: np.ndarray) -> int | None:
        """Where a C-contiguous ``array`` starts in this arena, or None if it does not lie inside it."""
        start = int(array.__array_interface__["data"][0]) - self.address
        if not array.flags.c_contiguous or start < 0 or start + array.nbytes > self.size:
            return None
        return start

    def close(self) -> None:
        """Close the descriptor and unmap; a view still alive keeps the mapping until it is garbage."""
        if self.fd < 0:
            return
        os.close(self.fd)
        self.fd = -1
        self.base = np.empty(0, np.uint8)
        with contextlib.suppress(BufferError):  # a caller still holds a view: the mapping goes with the last one
            self.mapping.close()
