"""A worker's router over real engine processes (the fake engine, one per made-up device): least-loaded
routing, and an engine process that dies costing only the batches it held."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import psutil
import pytest

from service.engine.base import EngineLost
from service.engine.board import EngineBoard, Slot
from service.engine.devices import Device
from service.engine.factory import build_engine
from service.engine.fake import FATAL, fake_output
from service.engine.router import RouterEngine, default_in_flight
from service.engine.supervisor import EngineSupervisor, RestartPolicy, supervised
from service.settings import Settings
from tests.service.engine.processes import use_env
from tests.service.engine.support import sample, wait_until

pytestmark = [pytest.mark.timeout(90), pytest.mark.usefixtures("no_engine_left")]
DEVICES = (Device("cpu0", None), Device("cpu1", None))
POLICY = RestartPolicy(limit=3, window_s=60.0, backoff_s=0.3, backoff_max_s=0.3)


@pytest.fixture
def slow_fake_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each engine batch takes 300 ms: long enough to kill a process while it computes one."""
    use_env(monkeypatch, ENCODER_ENGINE="fake", ENCODER_FAKE_DELAY_MS="300", ENCODER_LOG_LEVEL="warning")


@contextlib.contextmanager
def routed(devices: tuple[Device, ...] = DEVICES) -> Iterator[tuple[EngineSupervisor, RouterEngine]]:
    with supervised(devices, POLICY) as supervisor:
        router = RouterEngine(supervisor.directory)
        try:
            yield supervisor, router
        finally:
            router.close()


def process_of(supervisor: EngineSupervisor, label: str) -> psutil.Process:
    engine = next(e for e in supervisor.engines if e.device.label == label)
    assert engine.pid is not None
    return psutil.Process(engine.pid)


def check(x: np.ndarray, out: np.ndarray) -> None:
    np.testing.assert_allclose(out, fake_output(x), rtol=1e-6)


def busy_device(router: RouterEngine) -> str:
    wait_until(lambda: any(flight for _, flight, _ in router.load().values()), "a batch to be in flight")
    return next(label for label, (_, flight, _) in router.load().items() if flight)


@pytest.fixture
def sized_fake_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Engine runs like a GPU's: 30 ms each plus 30 ms per sample, so a merged run of 8 takes 270 ms, 4.5 times
    one of a single sample: long enough for the next device to join."""
    use_env(
        monkeypatch,
        ENCODER_ENGINE="fake",
        ENCODER_FAKE_DELAY_MS="30",
        ENCODER_FAKE_SAMPLE_DELAY_MS="30",
        ENCODER_MAX_BATCH_SIZE="8",
        ENCODER_LOG_LEVEL="warning",
    )


@pytest.mark.usefixtures("sized_fake_env")
def test_light_batches_pack_onto_the_first_device_and_long_runs_spread_over_both() -> None:
    with routed() as (_, router), ThreadPoolExecutor(4) as pool:
        assert router.devices == ["cpu0", "cpu1"] and router.concurrency == 4
        for i in range(4):  # one at a time: short runs, all merged on the first device
            x = sample(i)
            check(x, router.run(x))
        assert {label: batches for label, (_, _, batches) in router.load().items()} == {"cpu0": 4, "cpu1": 0}
        buffer = router.input_buffer(2, 4)  # a region of the chosen device's arena: it runs where it lies
        buffer[...] = sample(5)[:1].repeat(2, axis=0)
        check(sample(5)[:1].repeat(2, axis=0), router.run(buffer))
        assert router.load()["cpu1"][2] == 0
        xs = [sample(10 + i, batch=8) for i in range(16)]  # four threads of full batches: long runs
        for x, out in zip(xs, pool.map(router.run, xs), strict=True):
            check(x, out)
        given = {label: batches for label, (_, _, batches) in router.load().items()}
        assert given["cpu1"] >= 3 and given["cpu0"] >= 3 + 5, given  # both compute now


@pytest.mark.usefixtures("slow_fake_env")
def test_a_killed_engine_fails_only_its_in_flight_batch_then_serves_again_when_restarted() -> None:
    with routed() as (supervisor, router), ThreadPoolExecutor(2) as pool:
        x = sample(1, batch=2)
        held = pool.submit(router.run, x)
        victim = busy_device(router)
        index = router.devices.index(victim)
        process_of(supervisor, victim).kill()
        with pytest.raises(EngineLost, match=f"device {victim} died computing this batch"):
            held.result()
        wait_until(lambda: not router.load()[victim][0], "the router to route around the dead engine")
        for i in range(4):  # meanwhile everything goes to the other device, without an error
            y = sample(10 + i)
            check(y, router.run(y))
        wait_until(lambda: supervisor.board.read(index) == Slot(True, 2, 1), "the restart")
        wait_until(lambda: router.load()[victim][0], "the router to attach to the restarted engine")
        before = router.load()[victim][2]
        outs = list(pool.map(router.run, [sample(20 + i) for i in range(4)]))
        for i, out in enumerate(outs):
            check(sample(20 + i), out)
        assert router.load()[victim][2] > before  # the restarted engine computes again
        assert router.device_status()[index].restarts == 1


@pytest.mark.usefixtures("fake_env")
def test_a_batch_the_dead_engine_never_saw_goes_to_another_device() -> None:
    with routed() as (supervisor, router):
        router._stop.set()  # no board monitor: the router can only learn of the death by sending
        router._monitor.join()
        victim = process_of(supervisor, "cpu0")
        victim.kill()
        victim.wait(10)
        for i in range(6):  # some of these are sent to cpu0 first: its socket refuses, they go to cpu1
            x = sample(i, batch=2)
            check(x, router.run(x))
        assert router.load()["cpu0"][0] is False


@pytest.mark.usefixtures("fake_env")
def test_a_batch_that_breaks_its_engine_fails_and_the_engine_is_restarted() -> None:
    with routed() as (supervisor, router):
        bad = sample(1, batch=2)
        bad[0, 0, 0] = FATAL
        with pytest.raises(RuntimeError, match="broken for good") as failure:
            router.run(bad)
        assert not isinstance(failure.value, EngineLost)  # it ran and failed: 500, not a 503 to retry
        broken = next(label for label, (usable, _, _) in router.load().items() if not usable)
        index = router.devices.index(broken)
        wait_until(lambda: supervisor.board.read(index) == Slot(True, 2, 1), "the restart")
        wait_until(lambda: router.load()[broken][0], "the router to attach again")
        for i in range(4):
            check(sample(i), router.run(sample(i)))


@pytest.mark.usefixtures("fake_env")
def test_without_any_engine_serving_a_batch_gets_engine_lost() -> None:
    with routed(DEVICES[:1]) as (supervisor, router):
        process_of(supervisor, "cpu0").kill()
        wait_until(lambda: not router.load()["cpu0"][0], "the router to see the engine down")
        with pytest.raises(EngineLost, match="no engine process serves now"):
            router.run(sample(1))
        wait_until(lambda: router.load()["cpu0"][0], "the restarted engine")
        check(sample(2), router.run(sample(2)))


@pytest.mark.usefixtures("fake_env")
def test_describe_lists_the_devices() -> None:
    with routed() as (supervisor, router):
        described = router.describe()
        assert described["devices"] == [
            {"device": "cpu0", "up": True, "restarts": 0},
            {"device": "cpu1", "up": True, "restarts": 0},
        ]
        assert described["engine_process"]["directory"] == supervisor.directory
        assert described["engine_process"]["connections"] == 2


@pytest.mark.usefixtures("fake_env")
def test_a_router_made_while_no_engine_serves_waits_for_one_then_serves() -> None:
    """A worker that starts while the engine restarts (it replaces one that died meanwhile) waits for it."""
    with supervised(DEVICES[:1], POLICY) as supervisor, ThreadPoolExecutor(1) as pool:
        up = supervisor.board.read(0)
        supervisor.board.write(0, Slot(False, up.generation, up.restarts))  # as while it restarts
        made = pool.submit(RouterEngine, supervisor.directory)
        time.sleep(1.0)
        assert not made.done()  # waiting, not failed
        supervisor.board.write(0, Slot(True, up.generation + 1, up.restarts))
        router = made.result(timeout=30)
        try:
            check(sample(1), router.run(sample(1)))
            assert router.device_status()[0].up
        finally:
            router.close()


def test_a_router_waits_for_an_engine_at_most_its_bound_and_stops_waiting_when_told(tmp_path: Path) -> None:
    EngineBoard.create(str(tmp_path), ["cpu0"]).close()  # a board with its one device down, nothing listening
    started = time.monotonic()
    with pytest.raises(ConnectionError, match=r"no engine process \(device\(s\) cpu0\) accepted this worker"):
        RouterEngine(str(tmp_path), wait_s=0.5)
    assert 0.5 <= time.monotonic() - started < 10
    told = threading.Event()
    threading.Timer(0.3, told.set).start()
    started = time.monotonic()
    with pytest.raises(ConnectionError, match="asked to stop"):
        RouterEngine(str(tmp_path), cancelled=told.is_set)  # the default bound is minutes: it ends at the request
    assert time.monotonic() - started < 10


def test_a_worker_keeps_two_batches_in_flight_unless_too_few_workers_keep_two_per_device_busy() -> None:
    assert [default_in_flight(2, 1, workers) for workers in (1, 2, 16)] == [2, 2, 2]
    assert [default_in_flight(2, 2, workers) for workers in (1, 2, 3, 16)] == [4, 2, 2, 2]
    assert [default_in_flight(2, 8, workers) for workers in (1, 3, 8, 16)] == [16, 6, 2, 2]


@pytest.mark.usefixtures("fake_env")
def test_batches_in_flight_follow_the_worker_count_or_the_flag() -> None:
    with routed() as (supervisor, router):
        assert router.concurrency == 4  # one worker, two devices: two connections each busy
        fewer = build_engine(Settings(engine_dir=supervisor.directory, in_flight_batches=3))  # --in-flight-batches
        try:
            assert isinstance(fewer, RouterEngine) and fewer.concurrency == 3
            check(sample(1), fewer.run(sample(1)))
        finally:
            fewer.close()
        many = build_engine(Settings(engine_dir=supervisor.directory, workers=16))
        try:
            assert isinstance(many, RouterEngine) and many.concurrency == 2
        finally:
            many.close()
