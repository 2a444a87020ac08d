"""The engine process facing workers that leave, send nonsense or fail their handshake."""

from __future__ import annotations

import os
import socket
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest

from service.engine import ipc
from service.engine.fake import FakeEngine, fake_output
from service.engine.remote import RemoteEngine
from tests.service.engine.support import (
    TIMEOUT_S,
    RawWorker,
    gated,
    hold_first,
    hosting,
    remotes,
    sample,
    wait_until,
)

pytestmark = pytest.mark.timeout(60)


# --- workers that misbehave ------------------------------------------------------------------------------------


def test_a_worker_that_disconnects_does_not_disturb_the_others() -> None:
    engine = FakeEngine()
    with hosting(engine) as host, remotes(host.path) as (staying,):
        leaving = RemoteEngine(host.path)
        leaving.run(sample(1))
        leaving.close()
        for i in range(3):
            np.testing.assert_allclose(staying.run(sample(i)), fake_output(sample(i)), rtol=1e-6)
        with remotes(host.path) as (newcomer,):
            np.testing.assert_allclose(newcomer.run(sample(9)), fake_output(sample(9)), rtol=1e-6)


def test_a_worker_that_leaves_while_its_batch_waits_does_not_disturb_the_others() -> None:
    engine, gate = gated()
    with hosting(engine) as host, remotes(host.path, 1) as (staying,), ThreadPoolExecutor(2) as pool:
        leaving = RawWorker(host.path)
        first = hold_first(pool, engine, staying, sample(1))
        leaving.put(sample(2))
        leaving.send(1, 1, 4)
        leaving.close()  # gone before its answer: the host must not fail on writing it
        gate.open()
        np.testing.assert_allclose(first.result(TIMEOUT_S), fake_output(sample(1)), rtol=1e-6)
        for i in range(3):
            np.testing.assert_allclose(staying.run(sample(i)), fake_output(sample(i)), rtol=1e-6)
        assert host.alive


def test_malformed_requests_get_a_failed_reply_and_the_connection_goes_on() -> None:
    engine = FakeEngine()
    with hosting(engine) as host:
        raw = RawWorker(host.path, arena_bytes=4096)
        try:
            assert raw.info["dim"] == 8 and raw.registered is False
            beyond = raw.request(7, 2, 4, raw.arena.size)  # offset past the end of the arena
            straddling = raw.request(8, 2, 4, raw.arena.size - 64)  # starts inside, runs past the end
            huge = raw.request(9, 1 << 30, 64, 0)
            empty = raw.request(10, 0, 4, 0)
            too_long = raw.request(11, 1, engine.max_seq_len + 1, 0)
            zero_seq = raw.request(12, 1, 0, 0)
            for sequence, reply in zip(
                range(7, 13), (beyond, straddling, huge, empty, too_long, zero_seq), strict=True
            ):
                assert reply[:2] == (sequence, ipc.FAILED), reply
            assert "do not fit" in beyond[2] and "do not fit" in huge[2]
            assert "invalid batch shape" in empty[2] and "invalid batch shape" in too_long[2]
            x = sample(5, batch=2)
            raw.put(x, offset=1024)
            assert raw.request(13, 2, 4, 1024) == (13, ipc.OK, "")
            np.testing.assert_allclose(raw.get(x.shape, offset=1024), fake_output(x), rtol=1e-6)
        finally:
            raw.close()
        assert engine.batch_sizes == [2]  # nothing malformed reached the engine
        assert host.alive


@pytest.mark.parametrize("hello", [{"pid": 1}, {"pid": 1, "arena_bytes": 1 << 30}, {"arena_bytes": "many"}])
@pytest.mark.parametrize("with_fd", [True, False])
def test_a_worker_with_a_bad_handshake_is_dropped_and_others_are_served(hello: dict[str, Any], with_fd: bool) -> None:
    engine = FakeEngine()
    arena = ipc.Arena.create(4096)
    with hosting(engine) as host, remotes(host.path) as (good,):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(TIMEOUT_S)
            sock.connect(host.path)
            ipc.recv_hello(sock)
            ipc.send_hello(sock, hello, (arena.fd,) if with_fd else ())
            assert sock.recv(1) == b""  # the host hung up
        np.testing.assert_allclose(good.run(sample(3)), fake_output(sample(3)), rtol=1e-6)
        assert host.alive
    arena.close()


def open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize("hello", [{"pid": 1}, {"pid": 1, "arena_bytes": 1 << 30}, {"arena_bytes": "many"}])
def test_a_bad_handshake_leaks_no_descriptor(hello: dict[str, Any]) -> None:
    engine = FakeEngine()
    with hosting(engine) as host:
        before = open_descriptors()
        arena = ipc.Arena.create(4096)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(TIMEOUT_S)
            sock.connect(host.path)
            ipc.recv_hello(sock)
            ipc.send_hello(sock, hello, (arena.fd,))
            assert sock.recv(1) == b""
        arena.close()
        wait_until(lambda: open_descriptors() <= before, "the host to close the descriptor it received", 0.5)


def test_a_worker_that_leaves_leaves_no_descriptor_behind() -> None:
    engine = FakeEngine()
    with hosting(engine) as host, remotes(host.path) as (staying,):
        before = open_descriptors()
        for i in range(3):
            raw = RawWorker(host.path)
            raw.put(sample(i))
            assert raw.request(1, 1, 4)[1] == ipc.OK
            raw.close()

        def released() -> bool:
            # The last batch's views may keep a departed worker's mapping until the next batch replaces them.
            staying.run(sample(9))
            return open_descriptors() <= before

        wait_until(released, "the host to close the sockets and arenas of the workers that left")
