"""SIGTERM with ``--workers 2``: every worker drains on one clock, then answers every accepted request, exit 0.

Which worker serves a connection is the kernel's choice, so the test keeps kept-alive connections whose
server end it found in each worker's socket table: every worker is checked, not just whichever accepts.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import http.client
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest

from tests.reliability.support import NPY_HEADERS, assert_answer, fake_args, npy, sample
from tests.service.server_support import REPO, clean_env, free_port, wait_ready

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]
WORKERS = 2
DRAIN_S = 2.5
ENGINE_S = 1.0  # per batch of BATCH: the accepted requests outlast the drain window
BATCH = 2
ACCEPTED = 12
EXIT_BOUND_S = 30.0
FLAGS = ("--workers", str(WORKERS), "--max-batch-size", str(BATCH), "--max-delay-ms", "0")


@contextlib.contextmanager
def service(log: Path, *flags: str, new_session: bool = False) -> Iterator[tuple[int, subprocess.Popen[bytes]]]:
    """The fake-engine service with several workers; whatever is left of it afterwards is killed."""
    port = free_port()
    command = [sys.executable, *fake_args(*FLAGS, *flags), "--port", str(port)]
    with log.open("wb") as out:
        process = subprocess.Popen(
            command, cwd=REPO, env=clean_env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=new_session
        )
    family: list[psutil.Process] = []
    try:
        wait_ready(f"http://127.0.0.1:{port}", process, log, 60)
        family = psutil.Process(process.pid).children(recursive=True)
        yield port, process
    finally:
        for member in [psutil.Process(process.pid), *family] if process.poll() is None else family:
            with contextlib.suppress(psutil.Error):
                member.kill()
        process.wait(30)


def workers_of(server: subprocess.Popen[bytes]) -> list[psutil.Process]:
    children = psutil.Process(server.pid).children()
    # Not the engine process, nor multiprocessing's resource tracker.
    workers = [child for child in children if "spawn_main" in " ".join(child.cmdline())]
    assert len(workers) == WORKERS, children
    return workers


def owner(worker_pids: list[int], local_port: int) -> int | None:
    """The worker holding the server end of our connection from ``local_port``, once it accepted it."""
    for pid in worker_pids:
        for conn in psutil.Process(pid).net_connections("tcp"):
            if conn.raddr and conn.raddr.port == local_port:
                return pid
    return None


def connections_per_worker(port: int, worker_pids: list[int], each: int) -> dict[int, list[http.client.HTTPConnection]]:
    """``each`` kept-alive connections served by every worker (connect until the kernel spread them so)."""
    found: dict[int, list[http.client.HTTPConnection]] = {pid: [] for pid in worker_pids}
    spare: list[http.client.HTTPConnection] = []
    for _ in range(200):
        if all(len(conns) >= each for conns in found.values()):
            break
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        conn.connect()
        assert conn.sock is not None
        local_port = conn.sock.getsockname()[1]
        pid = None
        for _ in range(100):
            pid = owner(worker_pids, local_port)
            if pid is not None:
                break
            time.sleep(0.01)
        if pid is not None and len(found[pid]) < each:
            found[pid].append(conn)
        else:
            spare.append(conn)
    for conn in spare:
        conn.close()
    assert all(len(conns) >= each for conns in found.values()), {pid: len(c) for pid, c in found.items()}
    return found


def get(conn: http.client.HTTPConnection, path: str) -> tuple[int, bytes]:
    conn.request("GET", path)
    response = conn.getresponse()
    return response.status, response.read()


def post(conn: http.client.HTTPConnection, x: np.ndarray) -> tuple[int, bytes, float]:
    """POST /encode; the status, the body and when the answer had arrived."""
    conn.request("POST", "/encode", body=npy(x), headers=NPY_HEADERS)
    response = conn.getresponse()
    return response.status, response.read(), time.monotonic()


def post_fresh(port: int, x: np.ndarray) -> tuple[int, bytes, float]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        return post(conn, x)
    finally:
        conn.close()


def refused(port: int) -> bool:
    """Nothing accepts new connections any more. A reset counts too: a connection that reached the kernel's
    queue (or a worker that was closing) just before the last listener closed is reset, not answered."""
    try:
        httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5)
    except (httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError):
        return True
    return False


def all_gone(members: list[psutil.Process]) -> bool:
    return not any(m.is_running() and m.status() != psutil.STATUS_ZOMBIE for m in members)


@pytest.mark.parametrize("shared_engine", ["off", "on"])
def test_sigterm_drains_every_worker_then_answers_every_accepted_request(tmp_path: Path, shared_engine: str) -> None:
    log = tmp_path / "server.log"
    flags = ("--drain-s", str(DRAIN_S), "--fake-delay-ms", str(ENGINE_S * 1000), "--shared-engine", shared_engine)
    xs = [sample(i) for i in range(ACCEPTED)]
    with service(log, *flags) as (port, server), concurrent.futures.ThreadPoolExecutor(ACCEPTED + 2 * WORKERS) as pool:
        family = psutil.Process(server.pid).children(recursive=True)
        pids = [worker.pid for worker in workers_of(server)]
        conns = connections_per_worker(port, pids, each=2)  # per worker: one for readiness, one for /encode
        for probe, _ in conns.values():
            assert get(probe, "/readyz")[0] == 200
        accepted = [pool.submit(post_fresh, port, x) for x in xs]
        time.sleep(0.5)  # they reach the workers: one batch computing in each, the rest queued
        signalled = time.monotonic()
        server.send_signal(signal.SIGTERM)
        time.sleep(0.3)  # a tick of the supervisor and of each worker
        # The drain window, in every worker: readiness 503, while requests that still arrive are served.
        for probe, _ in conns.values():
            status, body = get(probe, "/readyz")
            assert status == 503 and b"shutting down" in body, body
        late_xs = [sample(100 + i) for i in range(WORKERS)]
        late = [pool.submit(post, work, x) for (_, work), x in zip(conns.values(), late_xs, strict=True)]
        late.append(pool.submit(post_fresh, port, sample(200)))  # a new connection is still accepted
        late_xs.append(sample(200))
        time.sleep(max(0.0, signalled + DRAIN_S - 0.5 - time.monotonic()))
        for probe, _ in conns.values():  # still draining, still listening, near the end of the window
            assert get(probe, "/readyz")[0] == 503
        while not refused(port):  # then the listener closes...
            assert time.monotonic() - signalled < EXIT_BOUND_S
            time.sleep(0.05)
        closed = time.monotonic()
        answers = [future.result(timeout=EXIT_BOUND_S) for future in accepted + late]
        code = server.wait(timeout=EXIT_BOUND_S)
        exited = time.monotonic()
    for x, (status, body, _) in zip(xs + late_xs, answers, strict=True):
        assert status == 200, body
        assert_answer(x, body)
    assert code == 0, log.read_text()[-3000:]
    assert closed - signalled >= DRAIN_S - 0.2, closed - signalled  # not before the window ended
    # ...while accepted requests are still being answered: the engine time outlasts the window.
    assert max(done for _, _, done in answers) > closed
    assert exited - signalled < EXIT_BOUND_S
    deadline = time.monotonic() + 10
    while not all_gone(family) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert all_gone(family), [m for m in family if m.is_running()]  # workers and the engine process
    text = log.read_text()
    assert text.count("Application shutdown complete") == WORKERS and "Cancel" not in text
    assert "the engine process exited with status" not in text  # stopped last, on purpose


def test_a_second_sigterm_ends_the_drain_window_at_once(tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    with service(log, "--drain-s", "60") as (port, server):
        server.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        assert httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=10).status_code == 503
        again = time.monotonic()
        server.send_signal(signal.SIGTERM)
        code = server.wait(timeout=EXIT_BOUND_S)
        took = time.monotonic() - again
    assert code == 0, log.read_text()[-3000:]
    assert took < 15, took  # not the 60 s window


def test_ctrl_c_to_the_process_group_drains_once_for_the_whole_window(tmp_path: Path) -> None:
    """SIGINT reaches the supervisor and every worker at once: the workers must not take the supervisor's
    message for a second signal (which would end their window)."""
    log = tmp_path / "server.log"
    with service(log, "--drain-s", str(DRAIN_S), new_session=True) as (port, server):
        pids = [worker.pid for worker in workers_of(server)]
        conns = connections_per_worker(port, pids, each=1)
        signalled = time.monotonic()
        os.killpg(server.pid, signal.SIGINT)
        time.sleep(max(0.0, signalled + DRAIN_S - 0.6 - time.monotonic()))
        for (probe,) in conns.values():
            assert get(probe, "/readyz")[0] == 503
            status, body, _ = post(probe, sample(7))
            assert status == 200
            assert_answer(sample(7), body)
        code = server.wait(timeout=EXIT_BOUND_S)
        took = time.monotonic() - signalled
    assert code == 0, log.read_text()[-3000:]
    assert took >= DRAIN_S - 0.2, took
