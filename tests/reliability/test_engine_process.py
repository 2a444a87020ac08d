"""Engine processes (one per device) dying under a real service: only what the dead one held fails, it is
restarted and serves again, and one that keeps dying stops the service with a non-zero status."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest

from service.engine.fake import FATAL
from tests.reliability.support import NPY_HEADERS, assert_answer, fake_args, metrics_of, npy, sample, wait_until
from tests.service.server_support import REPO, clean_env, free_port, wait_ready
from tests.service.support import metric

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]
FLAGS = ("--workers", "2", "--shared-engine", "on", "--max-batch-size", "8", "--max-delay-ms", "5")
TWO = (*FLAGS, "--devices", "cpu:2")
EXIT_WITHIN_S = 30.0


@contextlib.contextmanager
def service(log: Path, *flags: str) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """A real fake-engine service that may die on its own: nothing about its exit is asserted here, and
    whatever of it is still running afterwards (supervisor, workers, engine processes) is killed."""
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
        with contextlib.suppress(psutil.Error):  # restarted engine processes too, if the service still runs
            family += [p for p in psutil.Process(process.pid).children(recursive=True) if p not in family]
        for member in (psutil.Process(process.pid), *family) if process.poll() is None else family:
            with contextlib.suppress(psutil.Error):
                member.resume()
                member.kill()
        process.wait(30)


def engine_process(server: subprocess.Popen[bytes], device: str = "cpu") -> psutil.Process:
    children = psutil.Process(server.pid).children(recursive=True)
    (engine,) = [c for c in children if "service.engine.host" in " ".join(c.cmdline()) and device in c.cmdline()]
    return engine


def post(url: str, x: np.ndarray) -> httpx.Response:
    # A new connection each time: a kept-alive one would stick to one worker.
    return httpx.post(f"{url}/encode", content=npy(x), headers=NPY_HEADERS | {"connection": "close"}, timeout=10)


def engines(url: str, name: str, device: str) -> float:
    return metric(metrics_of(url), name, device=device)


@dataclass
class Load:
    """Client threads sending distinct samples in a loop; every outcome recorded with its start time."""

    url: str
    clients: int = 6
    results: list[tuple[float, int | str, bool]] = field(default_factory=list)  # (start, status, answer right)
    _stop: threading.Event = field(default_factory=threading.Event)

    def _client(self, seed: int) -> None:
        n = 0
        while not self._stop.is_set():
            x = sample(seed * 100_000 + n)
            n += 1
            started = time.monotonic()
            try:
                response = post(self.url, x)
            except httpx.HTTPError as exc:
                self.results.append((started, type(exc).__name__, False))
                continue
            right = response.status_code == 200
            if right:
                with contextlib.suppress(AssertionError):
                    assert_answer(x, response.content)
                    self.results.append((started, 200, True))
                    continue
                right = False
            self.results.append((started, response.status_code, right))

    @contextlib.contextmanager
    def running(self) -> Iterator[Load]:
        with ThreadPoolExecutor(self.clients) as pool:
            futures = [pool.submit(self._client, i) for i in range(self.clients)]
            try:
                yield self
            finally:
                self._stop.set()
                for future in futures:
                    future.result()


def test_kill_9_of_one_engine_under_load_fails_only_its_in_flight_requests(tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    flags = (*TWO, "--fake-delay-ms", "40", "--engine-restart-backoff-s", "1")
    with service(log, *flags) as (url, server), Load(url).running() as load:
        wait_until(lambda: len(load.results) >= 40, "load to run")
        victim = engine_process(server, "cpu0")  # the one computing: light loads all go to the first device
        victim.kill()
        victim.wait(10)
        dead_at = time.monotonic()
        ready = httpx.get(f"{url}/readyz", timeout=10)
        assert ready.status_code == 200, ready.text  # the other engine serves
        assert ready.json()["devices"] == {"cpu0": "down", "cpu1": "up"}
        wait_until(lambda: engines(url, "encoder_engine_restarts_total", "cpu0") == 1, "the restart", 60)
        wait_until(lambda: engines(url, "encoder_engine_up", "cpu0") == 1, "the restarted engine", 60)
        served = engines(url, "encoder_samples_processed_total", "cpu0")
        wait_until(lambda: engines(url, "encoder_samples_processed_total", "cpu0") > served, "cpu0 to serve again")
        both = {"cpu0": "up", "cpu1": "up"}
        wait_until(lambda: httpx.get(f"{url}/readyz", timeout=10).json()["devices"] == both, "readiness naming both")
    outcomes = [status for _, status, _ in load.results]
    assert set(outcomes) <= {200, 503}, sorted(set(map(str, outcomes)))  # no 500, no connection error
    assert all(right for _, status, right in load.results if status == 200)  # every answer its own
    failed = [started for started, status, _ in load.results if status == 503]
    # Only requests already sent when it died: at most one per client, each started before the death.
    assert len(failed) <= load.clients and all(started < dead_at for started in failed), (len(failed), dead_at)
    assert outcomes.count(200) > 40 and any(status == 200 and started > dead_at for started, status, _ in load.results)
    text = log.read_text()
    assert "the engine process of device cpu0 exited with status -9" in text


def test_an_engine_that_keeps_dying_stops_the_service_with_a_non_zero_status(tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    flags = (*TWO, "--engine-restart-limit", "1", "--engine-restart-window-s", "120")
    with service(log, *flags, "--engine-restart-backoff-s", "0.1") as (url, server):
        family = psutil.Process(server.pid).children(recursive=True)
        engine_process(server, "cpu0").kill()
        wait_until(lambda: engines(url, "encoder_engine_up", "cpu0") == 1, "the first restart", 60)
        assert engines(url, "encoder_engine_restarts_total", "cpu0") == 1
        engine_process(server, "cpu0").kill()  # a second death within the window: over the limit
        code = server.wait(EXIT_WITHIN_S)
    assert code == 1, log.read_text()[-3000:]
    wait_until(lambda: not any(m.is_running() and m.status() != psutil.STATUS_ZOMBIE for m in family), "cleanup")
    text = log.read_text()
    assert "the engine process of device cpu0 died 2 times within 120 s (limit 1 restarts)" in text


def test_with_no_engine_serving_requests_get_503_until_it_is_back(tmp_path: Path) -> None:
    with service(tmp_path / "server.log", *FLAGS) as (url, server):
        assert post(url, sample(1)).status_code == 200
        supervisor = psutil.Process(server.pid)
        supervisor.suspend()  # hold the restart, to see what the workers answer meanwhile
        try:
            engine_process(server).kill()
            statuses = [post(url, sample(10 + i)).status_code for i in range(6)]
            ready = httpx.get(f"{url}/readyz", timeout=10)
        finally:
            supervisor.resume()
        wait_until(lambda: httpx.get(f"{url}/readyz", timeout=10).status_code == 200, "the restarted engine", 60)
        x = sample(99)
        back = post(url, x)
    assert statuses == [503] * 6, statuses
    assert ready.status_code == 503 and "no engine process serves" in ready.text, ready.text
    assert back.status_code == 200
    assert_answer(x, back.content)


def test_a_fatal_engine_error_restarts_that_engine_and_the_service_serves_on(tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    with service(log, *TWO, "--engine-restart-backoff-s", "0.1") as (url, server):
        x = sample(2)
        x[0, 0, 0] = FATAL
        fatal = post(url, x)
        wait_until(lambda: metric(metrics_of(url), "encoder_engine_restarts_total") == 1, "the restart", 60)
        outcomes = [post(url, sample(10 + i)) for i in range(10)]
        wait_until(lambda: metric(metrics_of(url), "encoder_engine_up") == 2, "both engines up", 60)
        assert server.poll() is None
    assert fatal.status_code == 500 and fatal.json()["error"]["type"] == "inference_failed"
    for i, response in enumerate(outcomes):  # the other engine serves meanwhile: no error at all
        assert response.status_code == 200, response.text
        assert_answer(sample(10 + i), response.content)
    text = log.read_text()
    assert "broken for good" in text and "exited with status 1" in text


def test_sigterm_answers_every_accepted_request_before_the_engine_processes_stop(tmp_path: Path) -> None:
    """The workers drain through the engine processes, so they must outlive them: stopped last, not first."""
    log = tmp_path / "server.log"
    xs = [sample(100 + i) for i in range(6)]
    # A drain window of 1 s: the six requests may still be connecting when SIGTERM lands (the listeners close
    # within a tick of the window's end), and a request that arrives during the window is served, not refused.
    with service(log, *TWO, "--fake-delay-ms", "300", "--drain-s", "1") as (url, server):
        family = psutil.Process(server.pid).children(recursive=True)
        with ThreadPoolExecutor(len(xs)) as pool:
            answers = [pool.submit(post, url, x) for x in xs]
            time.sleep(0.15)  # sent; accepted and queued or computing: the slow engines hold them
            server.send_signal(signal.SIGTERM)
            responses = [answer.result() for answer in answers]
        code = server.wait(EXIT_WITHIN_S)
    for x, response in zip(xs, responses, strict=True):
        assert response.status_code == 200, response.text
        assert_answer(x, response.content)
    assert code in (0, -signal.SIGTERM), log.read_text()[-3000:]
    wait_until(lambda: not any(m.is_running() and m.status() != psutil.STATUS_ZOMBIE for m in family), "cleanup")
    assert "exited with status" not in log.read_text()  # stopped on purpose, not died


def workers_of(server: subprocess.Popen[bytes]) -> set[int]:
    """The uvicorn workers (spawned by multiprocessing), not the engine process nor the resource tracker."""
    pids = set()
    for child in psutil.Process(server.pid).children():
        with contextlib.suppress(psutil.Error):  # a killed one may linger as a zombie until it is reaped
            if "spawn_main" in " ".join(child.cmdline()):
                pids.add(child.pid)
    return pids


def running(server: subprocess.Popen[bytes], log: Path) -> bool:
    assert server.poll() is None, f"the service stopped ({server.returncode}):\n{log.read_text()[-3000:]}"
    return True


def test_a_worker_replaced_while_the_engine_restarts_waits_for_it_and_the_service_serves_on(tmp_path: Path) -> None:
    """The sequence that once stopped the whole service: a worker dies while no engine process serves (here: it
    is killed while the engine waits out its restart backoff); its replacement cannot attach yet. It must wait
    for the engine, not fail its start-up and take the service down."""
    log = tmp_path / "server.log"
    with service(log, *FLAGS, "--engine-restart-backoff-s", "15") as (url, server):
        assert post(url, sample(1)).status_code == 200
        # Both workers accept connections first: one still starting when the other is killed would leave none
        # to answer /readyz below (the test, not the service, would be wrong; seen on a loaded CI machine).
        wait_until(lambda: log.read_text().count("Application startup complete") == 2, "both workers' start")
        first = workers_of(server)
        assert len(first) == 2
        engine_process(server).kill()
        wait_until(lambda: "exited with status -9" in log.read_text(), "the engine's death to be noticed")
        victim = min(first)
        psutil.Process(victim).kill()
        wait_until(lambda: len(workers_of(server) - first) == 1, "the replacement worker")
        (replacement,) = workers_of(server) - first
        # It starts while the engine is still down (15 s backoff: a replacement slow to start under load must
        # still find it down), says that it waits, and does not fail.
        waiting = f"[{replacement}] waiting for an engine process"
        wait_until(lambda: running(server, log) and waiting in log.read_text(), "it to wait", 30)
        assert httpx.get(f"{url}/readyz", timeout=10).status_code == 503  # the engine is still down
        wait_until(lambda: httpx.get(f"{url}/readyz", timeout=10).status_code == 200, "the restarted engine", 90)
        started = f"Started server process [{replacement}]"
        wait_until(lambda: log.read_text().count("Application startup complete") == 3, "the replacement's start")
        assert server.poll() is None, log.read_text()[-3000:]
        assert workers_of(server) == first - {victim} | {replacement}
        xs = [sample(200 + i) for i in range(8)]
        answers = [post(url, x) for x in xs]
    for x, response in zip(xs, answers, strict=True):
        assert response.status_code == 200, response.text
        assert_answer(x, response.content)
    text = log.read_text()
    assert started in text and "failed to start" not in text, text[-3000:]


def test_sigterm_stops_a_worker_that_waits_for_the_engine_at_once(tmp_path: Path) -> None:
    """A worker waiting for an engine process (which waits out a long backoff) must not hold up the shutdown."""
    log = tmp_path / "server.log"
    with service(log, *FLAGS, "--engine-restart-backoff-s", "60") as (_, server):
        # Both workers started first: one still starting when the engine dies waits for it too, and its wait (not
        # the replacement's, which the test is about) would be the one found below.
        wait_until(lambda: log.read_text().count("Application startup complete") == 2, "both workers' start")
        first = workers_of(server)
        engine_process(server).kill()
        wait_until(lambda: "exited with status -9" in log.read_text(), "the engine's death to be noticed")
        psutil.Process(min(first)).kill()
        wait_until(lambda: running(server, log) and "waiting for an engine process" in log.read_text(), "a wait", 30)
        signalled = time.monotonic()
        server.send_signal(signal.SIGTERM)
        code = server.wait(EXIT_WITHIN_S)
        took = time.monotonic() - signalled
    assert code == 0, log.read_text()[-3000:]
    assert took < 15, took  # not the worker's wait (minutes) nor the engine's backoff
    assert "asked to stop" in log.read_text()
