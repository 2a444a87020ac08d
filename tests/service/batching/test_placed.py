"""Placed inputs (e.g. in a client's shared memory): batched like arrays, handed to the engine as they are."""

from __future__ import annotations

import asyncio
import gc
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pytest

from service.batching import Batcher, BatcherConfig, EngineFailed
from service.batching.queue import Placed
from service.engine.fake import FakeEngine, fake_output
from tests.service.batching.support import RecordingObserver

pytestmark = pytest.mark.timeout(60)


@dataclass(eq=False)
class Job:
    """A placed input: its rows and where its answer goes (views of one buffer each, as a region's would be)."""

    source: np.ndarray
    target: np.ndarray

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.source.shape)

    @property
    def output(self) -> np.ndarray:
        return self.target

    def __getitem__(self, rows: slice) -> Job:
        return Job(self.source[rows], self.target[rows])


class PlacingEngine(FakeEngine):
    """Computes placed inputs into their targets and arrays into new arrays; records what each batch held."""

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.placed_batches: list[list[tuple[str, int]]] = []

    def run_placed(self, parts: Sequence[np.ndarray | Placed]) -> tuple[list[np.ndarray], float]:
        self.placed_batches.append([("array" if isinstance(p, np.ndarray) else "job", p.shape[0]) for p in parts])
        answers = []
        for part in parts:
            if isinstance(part, Job):
                part.target[...] = self.run(part.source)
                answers.append(part.target)
            else:
                assert isinstance(part, np.ndarray)
                answers.append(self.run(part))
        return answers, 0.001


def sample(seed: int, batch: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, 4, 8)).astype(np.float32)


def job(seed: int, batch: int = 1) -> Job:
    x = sample(seed, batch)
    return Job(x, np.zeros_like(x))


def run(engine: FakeEngine, body, max_batch_size: int = 8, observer: RecordingObserver | None = None):  # type: ignore[no-untyped-def]
    async def main():  # type: ignore[no-untyped-def]
        batcher = Batcher(engine, BatcherConfig(max_batch_size=max_batch_size, max_delay_s=0.01), observer)
        batcher.start()
        try:
            return await asyncio.wait_for(body(batcher), timeout=30)
        finally:
            await batcher.stop()

    return asyncio.run(main())


def test_placed_and_array_requests_share_a_batch_and_each_gets_its_answer() -> None:
    engine = PlacingEngine()
    jobs = [job(1, 2), job(2, 1)]
    arrays = [sample(3, 3)]
    observer = RecordingObserver()

    async def body(batcher: Batcher) -> list[object]:
        return await asyncio.gather(*(batcher.submit(x) for x in (*jobs, *arrays)))

    results = run(engine, body, observer=observer)
    assert engine.placed_batches == [[("job", 2), ("job", 1), ("array", 3)]]
    for placed, result in zip(jobs, results, strict=False):
        assert result.output is placed.output  # answered where it was placed: no copy
        np.testing.assert_allclose(placed.target, fake_output(placed.source), rtol=1e-6)
    np.testing.assert_allclose(results[2].output, fake_output(arrays[0]), rtol=1e-6)
    assert [(b.samples, b.padded) for b in observer.batches] == [(6, 6)]


def test_a_placed_request_larger_than_a_batch_is_cut_into_chunks_answered_in_its_output() -> None:
    engine = PlacingEngine()
    big = job(4, 11)

    async def body(batcher: Batcher) -> object:
        return await batcher.submit(big)

    result = run(engine, body, max_batch_size=4)
    assert engine.placed_batches == [[("job", 4)], [("job", 4)], [("job", 3)]]
    assert result.output is big.output
    np.testing.assert_allclose(big.target, fake_output(big.source), rtol=1e-6)


def test_arrays_alone_still_take_the_stacking_path() -> None:
    engine = PlacingEngine()

    async def body(batcher: Batcher) -> list[object]:
        return await asyncio.gather(batcher.submit(sample(5)), batcher.submit(sample(6, 2)))

    results = run(engine, body)
    assert engine.placed_batches == [] and engine.batch_sizes == [3]
    np.testing.assert_allclose(results[1].output, fake_output(sample(6, 2)), rtol=1e-6)


def test_a_failing_placed_batch_fails_its_requests_only() -> None:
    engine = PlacingEngine(fail_if=lambda x: bool(x[0, 0, 0] == 99.0))
    bad = job(7)
    bad.source[0, 0, 0] = 99.0

    async def body(batcher: Batcher) -> tuple[object, object]:
        with pytest.raises(EngineFailed):
            await batcher.submit(bad)
        return await batcher.submit(job(8)), None

    good, _ = run(engine, body)
    np.testing.assert_allclose(good.output, fake_output(sample(8)), rtol=1e-6)


def test_an_engine_without_run_placed_fails_the_batch_clearly() -> None:
    engine = FakeEngine()

    async def body(batcher: Batcher) -> None:
        with pytest.raises(EngineFailed, match="cannot compute inputs placed"):
            await batcher.submit(job(9))

    run(engine, body)


class RefusingEngine(PlacingEngine):
    """Refuses every placed input on its own (as an engine does a NaN found where the input lies)."""

    def run_placed(self, parts: Sequence[np.ndarray | Placed]) -> tuple[list[np.ndarray], float]:
        return [ValueError("refused") for _ in parts], 0.001  # type: ignore[misc]


def test_a_refused_placed_input_is_garbage_once_its_request_has_failed() -> None:
    # A placed input may hold a client's shared-memory region, which is unmapped only once it is garbage: the
    # error raised to the request must not keep it alive in a reference cycle until a garbage collection.
    placed = job(10, 2)
    alive = weakref.ref(placed)

    async def body(batcher: Batcher) -> None:
        nonlocal placed
        request = batcher.submit(placed)
        del placed
        with pytest.raises(ValueError, match="refused"):
            await request

    gc.disable()
    try:
        run(RefusingEngine(), body)
        assert alive() is None
    finally:
        gc.enable()
