"""The router's routing decisions with fake engine connections (no processes): light batches pack onto the first
device, runs grown long let the next one in, direct shared-memory batches spread, a reserved buffer holds its
device."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from service.engine import attachments  # where the router opens its pools (RemotePool)
from service.engine.board import EngineBoard, Slot
from service.engine.direct import DirectJob, Span
from service.engine.router import RouterEngine
from service.engine.routing import SPREAD_RATIO
from tests.service.engine.support import wait_until

DIM = 4
QUICK_S = 0.001  # a fake engine run of a few samples


class FakePool:
    """One device's engine connections: answers ``2x`` and says its run took ``run_s(samples)``."""

    run_s = staticmethod(lambda samples: QUICK_S)
    quickest_s = math.inf  # what the engine process says its quickest run was

    def __init__(self, path: str, connections: int) -> None:
        self.path, self.concurrency = path, connections
        self.name, self.dim, self.dtype, self.max_seq_len = "fake", DIM, np.dtype("float32"), 16
        self.buckets, self.provider, self.checks_finite = (1, 2, 4, 8), "fake", True
        self.batches: list[int] = []  # samples of every batch it was given
        self.closed = False

    def describe(self) -> dict[str, Any]:
        return {"provider": "fake", "engine_process": {"socket": self.path}}

    def input_buffer(self, batch: int, seq: int) -> np.ndarray:
        return np.zeros((batch, seq, DIM), np.float32)

    def run_timed(self, x: np.ndarray) -> tuple[np.ndarray, float]:
        self.batches.append(int(x.shape[0]))
        return 2 * x, self.run_s(int(x.shape[0]))

    def run_placed(self, parts: list[Any]) -> tuple[list[np.ndarray | Exception], float]:
        samples = sum(int(p.shape[0]) for p in parts)
        self.batches.append(samples)
        return [np.zeros(p.shape, np.float32) for p in parts], self.run_s(samples)

    def close(self) -> None:
        self.closed = True


class Region:
    fd, offset, byte_size = -1, 0, 1 << 20


@pytest.fixture
def router(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[RouterEngine]:
    board = EngineBoard.create(str(tmp_path), ["gpu0", "gpu1"])
    for index in range(2):
        board.write(index, Slot(True, 1, 0))
    monkeypatch.setattr(attachments, "RemotePool", FakePool)
    engine = RouterEngine(str(tmp_path), workers=16)
    try:
        yield engine
    finally:
        engine.close()
        board.close()


def given(router: RouterEngine) -> list[list[int]]:
    """Per device, the batches its pool was given (none for a device without a pool)."""
    return [d.pool.batches if isinstance(d.pool, FakePool) else [] for d in router._devices]


def x(batch: int) -> np.ndarray:
    return np.ones((batch, 3, DIM), np.float32) * batch


def test_light_batches_all_go_to_the_first_device(router: RouterEngine) -> None:
    for batch in (1, 3, 2, 1, 4, 1, 2, 1):
        np.testing.assert_array_equal(router.run(x(batch)), 2 * x(batch))
    assert given(router) == [[1, 3, 2, 1, 4, 1, 2, 1], []]
    assert router.spilling() == {"gpu0": False, "gpu1": False}


def test_a_buffer_handed_out_runs_on_the_first_device_too(router: RouterEngine) -> None:
    for _ in range(3):
        buffer = router.input_buffer(2, 3)
        buffer[...] = 1
        router.run(buffer)
    assert given(router) == [[2, 2, 2], []]


def test_runs_grown_long_let_the_second_device_take_batches_until_they_shrink_again(router: RouterEngine) -> None:
    first = router._devices[0].pool
    assert isinstance(first, FakePool)
    router.run(x(1))  # the quickest run it knows
    first.run_s = lambda samples: SPREAD_RATIO * 2 * QUICK_S  # type: ignore[method-assign]
    for _ in range(12):
        router.run(x(8))
    assert router.spilling()["gpu0"]
    spread = given(router)
    assert len(spread[1]) >= 3 and len(spread[0]) >= 4, spread  # both take batches now
    first.run_s = lambda samples: QUICK_S  # type: ignore[method-assign]
    for _ in range(30):
        router.run(x(1))
    assert not router.spilling()["gpu0"]
    after = len(given(router)[1])
    for _ in range(8):
        router.run(x(1))
    assert len(given(router)[1]) == after  # packed again: the second device idles


def test_a_worker_that_only_saw_long_runs_spreads_by_the_quickest_run_the_engine_reports(
    router: RouterEngine,
) -> None:
    first = router._devices[0].pool
    assert isinstance(first, FakePool)
    first.run_s = lambda samples: SPREAD_RATIO * 2 * QUICK_S  # type: ignore[method-assign]
    for _ in range(8):
        router.run(x(8))
    assert given(router)[1] == []  # all its runs equally long: nothing says they are long
    first.quickest_s = QUICK_S  # other workers' runs were short
    for _ in range(8):
        router.run(x(8))
    assert router.spilling()["gpu0"] and len(given(router)[1]) >= 3


def test_direct_shared_memory_batches_spread_over_both_devices(router: RouterEngine) -> None:
    region = Region()
    for _ in range(6):
        source, target = np.zeros((2, 3, DIM), np.float32), np.zeros((2, 3, DIM), np.float32)
        job = DirectJob(Span(source, region, 0), Span(target, region, 4096))
        router.run_placed([job])
    assert given(router) == [[2, 2, 2], [2, 2, 2]]


def test_a_device_that_is_down_is_skipped_and_the_next_packs(router: RouterEngine) -> None:
    EngineBoard(router.board.directory, writable=True).write(0, Slot(False, 1, 0))  # as while it restarts
    wait_until(lambda: not router.load()["gpu0"][0], "the router to see the first device down")
    for batch in (1, 2, 1):
        router.run(x(batch))
    assert [len(batches) for batches in given(router)[1:]] == [3]


def test_spread_ratio_zero_spreads_every_batch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    board = EngineBoard.create(str(tmp_path), ["gpu0", "gpu1"])
    for index in range(2):
        board.write(index, Slot(True, 1, 0))
    monkeypatch.setattr(attachments, "RemotePool", FakePool)
    engine = RouterEngine(str(tmp_path), spread_ratio=0.0)
    try:
        for batch in (1, 2, 1, 2):
            engine.run(x(batch))
        assert given(engine) == [[1, 1], [2, 2]]
    finally:
        engine.close()
        board.close()
