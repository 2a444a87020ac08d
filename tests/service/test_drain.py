"""The multi-worker drain's logic without processes: the worker's tick, the supervisor's signal handler.

Real processes (several workers, signals, the listener) are in tests/reliability/test_drain_workers.py.
"""

from __future__ import annotations

import ctypes
import math
import signal
import time
from collections.abc import Iterator

import pytest
import uvicorn

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
    return drain.WorkerServer(uvicorn.Config(app=None), drain_s, shared, retire), shared, retire


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
