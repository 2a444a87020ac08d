"""The multi-worker drain's logic without processes: the worker's tick, the supervisor's signal handler.

Real processes (several workers, signals, the listener) are in tests/reliability/test_drain_workers.py.
"""

from __future__ import annotations

import ctypes
import math
import signal
import time
from collections.abc import Iterator
from typing import Any

import pytest
import uvicorn
from uvicorn.config import STARTUP_FAILURE

from service import drain


@pytest.fixture
def drained(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Records this process's drain (as the worker's app would see it), isolated from other tests."""
    seen: list[str] = []
    monkeypatch.setattr(drain, "_drain_listeners", [lambda: seen.append("drain")])
    monkeypatch.setattr(drain, "_drain_begun", False)
    return seen


def worker(
    deadline: float = math.inf, drain_s: float = 10.0
) -> tuple[drain.WorkerServer, ctypes.c_double, ctypes.c_bool]:
    shared, retire = ctypes.c_double(deadline), ctypes.c_bool(False)
    server = drain.WorkerServer(uvicorn.Config(app=None), drain_s, shared, retire, ctypes.c_bool(False))
    return server, shared, retire


async def tick(server: drain.WorkerServer) -> bool:
    return await server.on_tick(1)  # an odd counter: uvicorn's once-a-second header refresh needs a loaded config


@pytest.mark.anyio
async def test_a_worker_serves_until_the_supervisor_sets_a_deadline_then_stops_there(drained: list[str]) -> None:
    server, shared, _ = worker()
    assert not await tick(server) and drained == []
    shared.value = time.monotonic() + 0.2
    assert not await tick(server) and not await tick(server)
    assert drained == ["drain"]  # once, however many ticks
    time.sleep(0.25)
    assert await tick(server)


@pytest.mark.anyio
async def test_the_supervisor_can_end_a_window_the_worker_began_on_its_own_signal(drained: list[str]) -> None:
    server, shared, _ = worker(drain_s=60.0)
    server.handle_exit(signal.SIGINT, None)  # a Ctrl-C reaches every process of the group
    assert drained == ["drain"] and not await tick(server)
    shared.value = time.monotonic()  # the supervisor's deadline is earlier: it wins
    assert await tick(server)
    assert drained == ["drain"]
    assert not server.force_exit


@pytest.mark.anyio
async def test_a_later_deadline_does_not_stretch_the_workers_own_window(drained: list[str]) -> None:
    server, shared, _ = worker(drain_s=0.1)
    server.handle_exit(signal.SIGTERM, None)
    shared.value = time.monotonic() + 60
    time.sleep(0.15)
    assert await tick(server)


@pytest.mark.anyio
async def test_a_retired_worker_stops_without_draining(drained: list[str]) -> None:
    server, _, retire = worker()
    retire.value = True
    assert await tick(server)
    assert drained == []


@pytest.mark.anyio
async def test_a_signal_after_the_supervisor_stopped_a_worker_forces_its_exit(drained: list[str]) -> None:
    server, shared, _ = worker()
    shared.value = time.monotonic()
    assert await tick(server)
    server.handle_exit(signal.SIGTERM, None)
    assert server.force_exit


def test_the_app_of_a_worker_follows_its_drain(drained: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ENCODER_ENGINE", "fake")
    app = drain.worker_app()
    assert not app.state.service.draining
    drain._begin_drain_here()
    assert app.state.service.draining
    late = drain.worker_app()  # built after the signal: draining from the start
    assert late.state.service.draining


def test_a_worker_that_is_starting_sees_the_supervisors_deadline_and_retirement(
    drained: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before it serves a worker has no ticks, yet a start-up that waits (for an engine process) must end."""
    monkeypatch.setenv("ENCODER_ENGINE", "fake")
    server, shared, retire = worker()
    monkeypatch.setattr(drain, "_this_worker", server)
    state = drain.worker_app().state.service
    assert not state.stopping()
    shared.value = time.monotonic() + 30
    assert state.stopping() and not state.draining  # the app is told; its own drain begins on the first tick
    shared.value = math.inf
    retire.value = True
    assert state.stopping()


@pytest.fixture
def supervisor() -> Iterator[drain.DrainingSupervisor]:
    handlers = {sig: signal.getsignal(sig) for sig in drain.SIGNALS}
    try:
        yield drain.DrainingSupervisor(uvicorn.Config(app="x:y", workers=2), [], drain_s=5.0)
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


def test_the_supervisor_starts_draining_in_its_signal_handler_and_a_second_signal_ends_it(
    supervisor: drain.DrainingSupervisor,
) -> None:
    assert not supervisor.draining
    before = time.monotonic()
    supervisor._on_signal(signal.SIGTERM, None)
    assert supervisor.draining
    assert before + 5.0 <= supervisor.deadline.value <= time.monotonic() + 5.0
    supervisor._on_signal(signal.SIGINT, None)
    assert supervisor.deadline.value <= time.monotonic()
    supervisor._stopping = True
    supervisor._on_signal(signal.SIGTERM, None)
    assert supervisor._forces == 1


def test_other_signals_keep_uvicorns_queue(supervisor: drain.DrainingSupervisor) -> None:
    supervisor._on_signal(signal.SIGHUP, None)
    assert supervisor.signal_queue == [signal.SIGHUP] and not supervisor.draining


class Ended:
    """The multiprocessing process of a worker that has ended with ``exitcode``."""

    def __init__(self, exitcode: int) -> None:
        self.exitcode, self.pid = exitcode, 4242

    def is_alive(self) -> bool:
        return False

    def kill(self) -> None:
        pass

    def join(self, timeout: float | None = None) -> None:
        pass


def ended(supervisor: drain.DrainingSupervisor, exitcode: int, up: bool = False, **kwargs: Any) -> drain.WorkerProcess:
    """A worker that ended with ``exitcode``, after its start-up completed if ``up``."""
    worker = drain.WorkerProcess(supervisor.config, [], supervisor.drain_s, supervisor.deadline, **kwargs)
    worker.process = Ended(exitcode)  # type: ignore[assignment]
    worker.up_flag.value = up
    return worker


@pytest.fixture
def spawned(supervisor: drain.DrainingSupervisor, monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """The workers the supervisor starts (not started: recorded), each as the keyword arguments it got."""
    calls: list[dict[str, Any]] = []

    def spawn(first_start: bool = False, failed_starts: int = 0) -> drain.WorkerProcess:
        calls.append({"first_start": first_start, "failed_starts": failed_starts})
        return ended(supervisor, 0, first_start=first_start, failed_starts=failed_starts)

    monkeypatch.setattr(supervisor, "_spawn", spawn)
    return calls


def test_a_worker_of_the_first_start_that_fails_to_start_stops_the_service(
    supervisor: drain.DrainingSupervisor, spawned: list[dict[str, Any]]
) -> None:
    supervisor.processes = [ended(supervisor, STARTUP_FAILURE, first_start=True)]
    supervisor.keep_subprocess_alive()
    assert supervisor.startup_failed and supervisor.should_exit.is_set()
    assert spawned == []


def test_a_replacement_that_fails_to_start_is_started_again_after_a_doubling_backoff(
    supervisor: drain.DrainingSupervisor, spawned: list[dict[str, Any]]
) -> None:
    """The service serves on with its other workers: one engine restart must not become an outage."""
    supervisor.processes = [ended(supervisor, STARTUP_FAILURE)]
    delays = []
    for failed in range(8):
        before = time.monotonic()
        supervisor.keep_subprocess_alive()  # it failed: its replacement is due after a backoff, not now
        assert not supervisor.should_exit.is_set() and len(spawned) == failed
        worker = drain._ours(supervisor.processes[0])
        assert worker.respawn_at is not None
        delays.append(round(worker.respawn_at - before))
        supervisor.keep_subprocess_alive()
        assert len(spawned) == failed  # still waiting
        worker.respawn_at = time.monotonic()  # the backoff is over
        supervisor.keep_subprocess_alive()
        assert spawned[-1] == {"first_start": False, "failed_starts": failed + 1}
        supervisor.processes[0].process = Ended(STARTUP_FAILURE)  # and it fails to start too
    assert delays == [1, 2, 4, 8, 16, 30, 30, 30]
    assert not supervisor.startup_failed


def test_a_worker_of_the_first_start_that_errs_before_serving_stops_the_service(
    supervisor: drain.DrainingSupervisor, spawned: list[dict[str, Any]]
) -> None:
    """A missing module while the app is imported ends a worker with status 1, not uvicorn's start-up failure
    status: it would fail the same way on every restart (it was restarted hundreds of times a minute)."""
    supervisor.processes = [ended(supervisor, 1, first_start=True)]
    supervisor.keep_subprocess_alive()
    assert supervisor.startup_failed and supervisor.should_exit.is_set()
    assert spawned == []


def test_a_replacement_that_errs_before_serving_is_started_again_after_a_backoff(
    supervisor: drain.DrainingSupervisor, spawned: list[dict[str, Any]]
) -> None:
    supervisor.processes = [ended(supervisor, 1)]
    supervisor.keep_subprocess_alive()
    assert spawned == [] and drain._ours(supervisor.processes[0]).respawn_at is not None
    assert not supervisor.should_exit.is_set()


def test_a_worker_that_erred_after_serving_or_was_killed_while_starting_is_replaced_at_once(
    supervisor: drain.DrainingSupervisor, spawned: list[dict[str, Any]]
) -> None:
    supervisor.processes = [ended(supervisor, 1, up=True, first_start=True), ended(supervisor, -9, first_start=True)]
    supervisor.keep_subprocess_alive()
    assert spawned == [{"first_start": False, "failed_starts": 0}] * 2
    assert not supervisor.should_exit.is_set()


def test_a_worker_that_died_serving_is_replaced_at_once(
    supervisor: drain.DrainingSupervisor, spawned: list[dict[str, Any]]
) -> None:
    supervisor.processes = [ended(supervisor, -9, first_start=True, failed_starts=3)]
    supervisor.keep_subprocess_alive()
    assert spawned == [{"first_start": False, "failed_starts": 0}]
    assert not supervisor.should_exit.is_set()
