from __future__ import annotations

import os
import socket
import threading
from collections.abc import Iterator

import numpy as np
import pytest

from service.engine import ipc

pytestmark = pytest.mark.timeout(30)
F32 = np.dtype(np.float32)


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    left.settimeout(10)
    right.settimeout(10)
    with left, right:
        yield left, right


@pytest.fixture
def arena() -> Iterator[ipc.Arena]:
    arena = ipc.Arena.create(4096)
    yield arena
    arena.close()


def test_structs_have_the_sizes_the_protocol_documents() -> None:
    assert (ipc.HEADER.size, ipc.BATCH_HEAD.size, ipc.PART.size, ipc.REGISTER_HEAD.size) == (9, 8, 28, 21)
    assert ipc.REPLY.size == 25


def test_a_batch_frame_round_trips_its_parts() -> None:
    parts = [(3, ipc.ARENA, 4096, ipc.ARENA, 4096), (1, 7, 1 << 40, 9, 12)]
    frame = ipc.batch_frame(5, 196, parts)
    kind, sequence, length = ipc.HEADER.unpack_from(frame)
    assert (kind, sequence, length) == (ipc.BATCH, 5, len(frame) - ipc.HEADER.size)
    assert ipc.parse_batch(frame[ipc.HEADER.size :]) == (196, parts)


@pytest.mark.parametrize("body", [b"", b"\x01" * 7, ipc.BATCH_HEAD.pack(4, 0), ipc.BATCH_HEAD.pack(4, 2) + b"\0" * 28])
def test_a_batch_body_that_does_not_hold_its_parts_is_refused(body: bytes) -> None:
    with pytest.raises(ValueError, match="batch frame"):
        ipc.parse_batch(body)


def test_register_and_unregister_frames_carry_their_fields() -> None:
    frame = ipc.register_frame(8, 3, ipc.KIND_SYSTEM, 4096, 1 << 33, b"extra")
    assert ipc.HEADER.unpack_from(frame) == (ipc.REGISTER, 8, ipc.REGISTER_HEAD.size + 5)
    assert ipc.REGISTER_HEAD.unpack_from(frame, ipc.HEADER.size) == (3, ipc.KIND_SYSTEM, 4096, 1 << 33)
    assert frame.endswith(b"extra")
    gone = ipc.unregister_frame(3)
    assert ipc.HEADER.unpack_from(gone) == (ipc.UNREGISTER, 0, 4)
    assert ipc.UNREGISTER_BODY.unpack_from(gone, ipc.HEADER.size) == (3,)


def test_hello_round_trip_without_descriptors(pair: tuple[socket.socket, socket.socket]) -> None:
    left, right = pair
    payload = {"name": "fake", "dim": 8, "buckets": [1, 2, 4], "describe": {"nested": [1.5, None]}}
    ipc.send_hello(left, payload)
    ipc.send_hello(left, {"second": True})  # framing: two messages back to back stay apart
    assert ipc.recv_hello(right) == (payload, [])
    assert ipc.recv_hello(right) == ({"second": True}, [])


def test_hello_without_descriptors_is_read_even_when_the_reader_accepts_some(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    left, right = pair
    ipc.send_hello(left, {"pid": 1})
    assert ipc.recv_hello(right, max_fds=1) == ({"pid": 1}, [])


def test_hello_passes_an_arena_descriptor_that_maps_the_same_memory(
    pair: tuple[socket.socket, socket.socket], arena: ipc.Arena
) -> None:
    left, right = pair
    ipc.send_hello(left, {"arena_bytes": arena.size}, (arena.fd,))
    hello, fds = ipc.recv_hello(right, max_fds=1)
    assert hello == {"arena_bytes": arena.size} and len(fds) == 1
    assert fds[0] != arena.fd  # a new descriptor of the same memfd
    other = ipc.Arena(fds[0], hello["arena_bytes"])
    try:
        assert other.address != arena.address  # a second mapping, not the same pointer
        written = arena.view(64, (2, 3, 4), F32)
        written[...] = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
        np.testing.assert_array_equal(other.view(64, (2, 3, 4), F32), written)
        other.view(64, (2, 3, 4), F32)[1] = -1.0  # and back the other way
        np.testing.assert_array_equal(written[1], -1.0)
        np.testing.assert_array_equal(written[0], np.arange(12, dtype=np.float32).reshape(3, 4))
    finally:
        other.close()


def test_a_long_hello_arrives_whole(pair: tuple[socket.socket, socket.socket], arena: ipc.Arena) -> None:
    left, right = pair
    payload = {"text": "x" * (ipc.MAX_HELLO - 100)}  # more than a socket buffer: the reader needs several reads
    sender = threading.Thread(target=ipc.send_hello, args=(left, payload, (arena.fd,)))
    sender.start()
    hello, fds = ipc.recv_hello(right, max_fds=1)
    sender.join(10)
    for fd in fds:
        os.close(fd)
    assert hello == payload and len(fds) == 1


def test_an_oversized_hello_is_refused_on_both_ends(pair: tuple[socket.socket, socket.socket]) -> None:
    left, right = pair
    with pytest.raises(ipc.ProtocolError, match="too large"):
        ipc.send_hello(left, {"text": "x" * ipc.MAX_HELLO})
    # A peer that announces more than MAX_HELLO bytes is refused before anything that large is read.
    left.sendall(ipc._LENGTH.pack(ipc.MAX_HELLO + 1) + b"{}")
    with pytest.raises(ipc.ProtocolError, match="too large"):
        ipc.recv_hello(right)


def test_a_malformed_hello_is_a_protocol_error(pair: tuple[socket.socket, socket.socket]) -> None:
    left, right = pair
    left.sendall(ipc._LENGTH.pack(5) + b"{nope")
    with pytest.raises(ipc.ProtocolError, match="malformed"):
        ipc.recv_hello(right)
    assert issubclass(ipc.ProtocolError, ConnectionError)  # callers catching OSError drop such a peer


def test_a_peer_that_goes_away_is_a_connection_error(pair: tuple[socket.socket, socket.socket]) -> None:
    left, right = pair
    left.sendall(ipc._LENGTH.pack(100) + b'{"cut":')  # then closes mid-message
    left.close()
    with pytest.raises(ConnectionError):
        ipc.recv_hello(right)
    with pytest.raises(ConnectionError):
        ipc.recv_exactly(right, 1)


def test_a_peer_that_closes_before_a_hello_with_descriptors_is_a_connection_error(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    left, right = pair
    left.close()
    with pytest.raises(ConnectionError):
        ipc.recv_hello(right, max_fds=1)


def test_arena_size_is_rounded_up_to_whole_pages() -> None:
    for wanted in (1, 4097):
        arena = ipc.Arena.create(wanted)
        try:
            assert arena.size >= wanted and arena.size % os.sysconf("SC_PAGE_SIZE") == 0
            assert os.fstat(arena.fd).st_size == arena.size
        finally:
            arena.close()


def test_arena_view_checks_its_bounds(arena: ipc.Arena) -> None:
    full = arena.view(0, (arena.size // 4,), F32)
    assert full.shape == (arena.size // 4,) and full.flags.c_contiguous
    last = arena.view(arena.size - 16, (4,), F32)  # exactly up to the end is fine
    assert arena.offset_of(last) == arena.size - 16
    with pytest.raises(ValueError, match="do not fit"):
        arena.view(arena.size - 12, (4,), F32)
    with pytest.raises(ValueError, match="do not fit"):
        arena.view(arena.size, (1,), F32)
    with pytest.raises(ValueError, match="do not fit"):
        arena.view(-4, (1,), F32)
    with pytest.raises(ValueError, match="do not fit"):
        arena.view(0, (2, arena.size), F32)


def test_offset_of_finds_views_that_lie_inside_the_arena(arena: ipc.Arena) -> None:
    view = arena.view(256, (2, 4, 8), F32)
    assert arena.offset_of(view) == 256
    assert arena.offset_of(view[1]) == 256 + 4 * 8 * 4  # a contiguous sub-view
    assert arena.offset_of(view[1:]) == 256 + 4 * 8 * 4


def test_offset_of_is_none_outside_the_arena_or_for_non_contiguous_views(arena: ipc.Arena) -> None:
    assert arena.offset_of(np.zeros((2, 4, 8), np.float32)) is None
    view = arena.view(0, (4, 4, 8), F32)
    assert arena.offset_of(view[:, :2]) is None  # strided: not one block
    assert arena.offset_of(view.transpose(1, 0, 2)) is None
    assert arena.offset_of(view[::2]) is None
    # An array that starts inside the arena but runs past its end is not inside it either.
    tail = np.lib.stride_tricks.as_strided(arena.base[arena.size - 8 :], shape=(16,), strides=(1,))
    assert tail.flags.c_contiguous and arena.offset_of(tail) is None


def test_a_closed_arena_leaves_live_views_usable() -> None:
    arena = ipc.Arena.create(4096)
    view = arena.view(0, (4,), F32)
    view[...] = 3.0
    arena.close()
    np.testing.assert_array_equal(view, 3.0)  # the mapping lives until its last view is garbage
    view[...] = 4.0
    np.testing.assert_array_equal(view, 4.0)
