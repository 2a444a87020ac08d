"""The shared engine process (``--workers N``) dying: the service must stop visibly, never hang or limp on."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest

from service.engine.fake import FATAL
from tests.reliability.support import NPY_HEADERS, assert_answer, fake_args, npy, sample
from tests.service.server_support import REPO, clean_env, free_port, wait_ready

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]
FLAGS = ("--workers", "2", "--shared-engine", "on", "--max-batch-size", "8", "--max-delay-ms", "5")
EXIT_WITHIN_S = 30.0
Outcome = int | str  # an HTTP status, or the name of the transport error once nothing listens


@contextlib.contextmanager
def service(log: Path, *flags: str) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """A real fake-engine service that may die on its own: nothing about its exit is asserted here, and
    whatever of it is still running afterwards (supervisor, workers, engine process) is killed."""
    port = free_port()
    command = [sys.executable, *fake_args(*flags), "--port", str(port)]
    with log.open("wb") as out:
        process = subprocess.Popen(command, cwd=REPO, env=clean_env(), stdout=out, stderr=subprocess.STDOUT)
    family: list[psutil.Process] = []
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, process, log, 60)
        family = psutil.Process(process.pid).children(recursive=True)
        yield url, process
    finally:
        for member in (psutil.Process(process.pid), *family) if process.poll() is None else family:
            with contextlib.suppress(psutil.Error):
                member.resume()
                member.kill()
        process.wait(30)


def engine_process(server: subprocess.Popen[bytes]) -> psutil.Process:
    children = psutil.Process(server.pid).children(recursive=True)
    (engine,) = [child for child in children if "service.engine.host" in " ".join(child.cmdline())]
    return engine


def post(url: str, x: np.ndarray) -> httpx.Response:
    # A new connection each time: a kept-alive one would stick to one worker.
    return httpx.post(f"{url}/encode", content=npy(x), headers=NPY_HEADERS | {"connection": "close"}, timeout=10)


def outcomes_until_exit(url: str, server: subprocess.Popen[bytes]) -> tuple[list[Outcome], int]:
    """Keep sending requests until the service has exited; each must be answered or refused (never hang)."""
    seen: list[Outcome] = []
    end = time.monotonic() + EXIT_WITHIN_S
    while server.poll() is None and time.monotonic() < end:
        try:
            seen.append(post(url, sample(len(seen))).status_code)
        except (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError) as exc:
            seen.append(type(exc).__name__)  # the workers closed their listening socket: shutting down
            time.sleep(0.05)
    try:
        code = server.wait(5)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"the service still runs {EXIT_WITHIN_S} s after its engine process died") from None
    return seen, code


def all_gone(members: list[psutil.Process]) -> bool:
    return not any(m.is_running() and m.status() != psutil.STATUS_ZOMBIE for m in members)


def test_a_killed_engine_process_stops_the_whole_service(tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    with service(log, *FLAGS) as (url, server):
        assert post(url, sample(1)).status_code == 200
        family = psutil.Process(server.pid).children(recursive=True)
        engine_process(server).kill()
        seen, code = outcomes_until_exit(url, server)
    assert code != 0, log.read_text()[-3000:]
    # No hang and no unexplained error: a worker answers 503 once it knows, or nothing listens any more. A 500
    # can only be a batch that was sent to the engine process as it died (see the test below).
    assert set(seen) <= {500, 503, "ConnectError", "RemoteProtocolError", "ReadError"}, seen
    assert seen.count(500) <= 2, seen  # at most the first batch of each of the two workers
    deadline = time.monotonic() + 10
    while not all_gone(family) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert all_gone(family), [m for m in family if m.is_running()]  # workers stopped too: nothing orphaned
    text = log.read_text()
    assert f"the engine process exited with status {-signal.SIGKILL}" in text


def test_workers_answer_503_once_the_engine_process_is_gone(tmp_path: Path) -> None:
    with service(tmp_path / "server.log", *FLAGS) as (url, server):
        assert post(url, sample(1)).status_code == 200
        supervisor = psutil.Process(server.pid)
        supervisor.suspend()  # it would stop the workers at once: hold it, to see what workers answer meanwhile
        try:
            engine_process(server).kill()
            statuses = [post(url, sample(10 + i)).status_code for i in range(6)]
        finally:
            supervisor.resume()
        _, code = outcomes_until_exit(url, server)
    assert code != 0
    assert statuses == [503] * 6, statuses


def test_a_fatal_engine_error_ends_the_engine_process_and_the_service(tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    with service(log, *FLAGS) as (url, server):
        before = post(url, sample(1))
        engine = engine_process(server)
        x = sample(2)
        x[0, 0, 0] = FATAL
        fatal = post(url, x)
        engine.wait(EXIT_WITHIN_S)  # not our child: its status is in the supervisor's log
        seen, code = outcomes_until_exit(url, server)
    assert before.status_code == 200
    assert_answer(sample(1), before.content)
    assert fatal.status_code == 500 and fatal.json()["error"]["type"] == "inference_failed"
    assert code != 0
    # The other worker's first batch after the exit can still get a 500 (test_workers_answer_503_... above).
    assert set(seen) <= {500, 503, "ConnectError", "RemoteProtocolError", "ReadError"}, seen
    assert seen.count(500) <= 1, seen  # at most once, in the worker that was not told BROKEN
    text = log.read_text()
    # It reports the broken engine and exits with status 1; it does not linger half-alive.
    assert "broken for good" in text and "the engine process exited with status 1" in text


def test_sigterm_answers_every_accepted_request_before_the_engine_process_stops(tmp_path: Path) -> None:
    """The workers drain through the engine process, so it must outlive them: stopped last, not first."""
    log = tmp_path / "server.log"
    xs = [sample(100 + i) for i in range(6)]
    with service(log, *FLAGS, "--fake-delay-ms", "300") as (url, server):
        family = psutil.Process(server.pid).children(recursive=True)
        with ThreadPoolExecutor(len(xs)) as pool:
            answers = [pool.submit(post, url, x) for x in xs]
            time.sleep(0.15)  # accepted and queued or computing: the slow engine holds them
            server.send_signal(signal.SIGTERM)
            responses = [answer.result() for answer in answers]
        code = server.wait(EXIT_WITHIN_S)
    for x, response in zip(xs, responses, strict=True):
        assert response.status_code == 200, response.text
        assert_answer(x, response.content)
    assert code in (0, -signal.SIGTERM), log.read_text()[-3000:]
    deadline = time.monotonic() + 10
    while not all_gone(family) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert all_gone(family), [m for m in family if m.is_running()]
    assert "the engine process exited with status" not in log.read_text()  # stopped on purpose, not died
