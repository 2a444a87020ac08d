from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
import pytest

from service.batching import (
    Batcher,
    BatcherConfig,
    BatcherStopped,
    DeadlineExceeded,
    EngineFailed,
    Overloaded,
)
from service.batching.batcher import pad_size
from service.engine.fake import POISON, FakeEngine, fake_output
from tests.service.batching.support import BrokenObserver, RecordingObserver, eventually

DIM = 4


def sample(seed: int, batch: int = 1, seq: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, seq, DIM)).astype(np.float32)


def poisoned(batch: int = 1, seq: int = 3) -> np.ndarray:
    x = sample(999, batch, seq)
    x[0, 0, 0] = POISON
    return x


def run_with(
    engine: FakeEngine,
    body: Callable[[Batcher], Awaitable[Any]],
    observer: Any = None,
    **config: Any,
) -> Any:
    async def main() -> Any:
        batcher = Batcher(engine, BatcherConfig(**config), observer=observer)
        batcher.start()
        try:
            return await asyncio.wait_for(body(batcher), timeout=60)
        finally:
            await batcher.stop()

    return asyncio.run(main())


def test_concurrent_requests_are_batched_and_each_gets_its_own_answer() -> None:
    engine = FakeEngine(dim=DIM, delay_s=0.02)
    observer = RecordingObserver()
    inputs = [sample(i, batch=1 + i % 2, seq=3) for i in range(24)]

    async def body(batcher: Batcher) -> list[Any]:
        return await asyncio.gather(*(batcher.submit(x) for x in inputs))

    results = run_with(engine, body, observer, max_batch_size=8, max_delay_s=0.05)
    for x, result in zip(inputs, results, strict=True):
        np.testing.assert_allclose(result.output, fake_output(x), rtol=1e-6)
        assert result.queue_s >= 0 and result.compute_s >= 0
    assert max(engine.batch_sizes) > 1
    assert all(size <= 8 for size in engine.batch_sizes)
    assert sum(engine.batch_sizes) == sum(x.shape[0] for x in inputs)
    assert sum(stats.samples for stats in observer.batches) == sum(x.shape[0] for x in inputs)
    assert observer.depths[-1] == 0


def test_a_full_batch_does_not_wait_for_the_delay() -> None:
    engine = FakeEngine(dim=DIM)

    async def body(batcher: Batcher) -> float:
        start = time.monotonic()
        await asyncio.gather(*(batcher.submit(sample(i)) for i in range(4)))
        return time.monotonic() - start

    elapsed = run_with(engine, body, max_batch_size=4, max_delay_s=30.0)
    assert elapsed < 20.0  # would be >= 30 s if a full group still waited for its delay
    assert engine.batch_sizes == [4]


def test_sequence_lengths_are_never_mixed() -> None:
    engine = FakeEngine(dim=DIM)
    inputs = [sample(i, seq=3 + i % 3) for i in range(12)]

    async def body(batcher: Batcher) -> list[Any]:
        return await asyncio.gather(*(batcher.submit(x) for x in inputs))

    results = run_with(engine, body, max_batch_size=16, max_delay_s=0.05)
    for x, result in zip(inputs, results, strict=True):
        np.testing.assert_allclose(result.output, fake_output(x), rtol=1e-6)
    assert sorted(seq for _, seq in engine.batches) == [3, 4, 5]
    assert sorted(engine.batch_sizes) == [4, 4, 4]


def test_a_large_client_batch_is_split_and_reassembled_in_order() -> None:
    engine = FakeEngine(dim=DIM)
    x = sample(7, batch=10)

    async def body(batcher: Batcher) -> Any:
        return await batcher.submit(x)

    result = run_with(engine, body, max_batch_size=4, max_delay_s=0.01)
    np.testing.assert_allclose(result.output, fake_output(x), rtol=1e-6)
    assert engine.batch_sizes == [4, 4, 2]
    np.testing.assert_array_equal(np.concatenate(engine.inputs), x)


def test_pads_to_the_bucket_only_when_the_engine_wants_fixed_shapes() -> None:
    x = sample(3, batch=3)

    async def body(batcher: Batcher) -> Any:
        return await batcher.submit(x)

    fixed = FakeEngine(dim=DIM, fixed_shapes=True)
    result = run_with(fixed, body, max_batch_size=8, max_delay_s=0.0, pad_buckets=fixed.buckets)
    assert fixed.batch_sizes == [4]
    assert result.output.shape == x.shape
    np.testing.assert_allclose(result.output, fake_output(x), rtol=1e-6)
    np.testing.assert_array_equal(fixed.inputs[0][3], 0)

    free = FakeEngine(dim=DIM)
    run_with(free, body, max_batch_size=8, max_delay_s=0.0)
    assert free.batch_sizes == [3]


def test_a_failing_batch_fails_only_its_own_requests() -> None:
    engine = FakeEngine(dim=DIM, delay_s=0.01)
    observer = RecordingObserver()
    inputs = [poisoned() if i == 2 else sample(i) for i in range(12)]

    async def body(batcher: Batcher) -> tuple[list[Any], Any]:
        results = await asyncio.gather(*(batcher.submit(x) for x in inputs), return_exceptions=True)
        after = await batcher.submit(sample(100))
        return results, after

    results, after = run_with(engine, body, observer, max_batch_size=4, max_delay_s=0.02)
    failing = next(batch for batch in engine.inputs if np.any(batch[:, 0, 0] == POISON))
    for x, result in zip(inputs, results, strict=True):
        in_failing_batch = any(np.array_equal(x[0], row) for row in failing)
        if in_failing_batch:
            assert isinstance(result, EngineFailed), result
            assert "poisoned" in str(result)
        else:
            np.testing.assert_allclose(result.output, fake_output(x), rtol=1e-6)
    assert isinstance(results[2], EngineFailed)
    assert sum(isinstance(r, EngineFailed) for r in results) < len(inputs)
    np.testing.assert_allclose(after.output, fake_output(sample(100)), rtol=1e-6)
    assert [stats.failed for stats in observer.batches].count(True) == 1


def test_a_cancelled_request_is_skipped_and_counted() -> None:
    engine = FakeEngine(dim=DIM, delay_s=0.3)
    observer = RecordingObserver()
    gone = sample(2)

    async def body(batcher: Batcher) -> Any:
        first = asyncio.ensure_future(batcher.submit(sample(1)))
        await eventually(lambda: len(engine.batches) == 1)  # the engine is busy with the first request
        second = asyncio.ensure_future(batcher.submit(gone))
        await eventually(lambda: batcher.queue_depth == 1)
        second.cancel()
        await asyncio.gather(second, return_exceptions=True)
        assert batcher.queue_depth == 0
        return await first

    result = run_with(engine, body, observer, max_batch_size=4, max_delay_s=0.0)
    np.testing.assert_allclose(result.output, fake_output(sample(1)), rtol=1e-6)
    assert not any(np.array_equal(batch[0], gone[0]) for batch in engine.inputs)
    assert observer.dropped == {"cancelled": 1}
    assert engine.batch_sizes == [1]


def test_a_request_past_its_deadline_is_never_computed() -> None:
    engine = FakeEngine(dim=DIM, delay_s=0.5)
    observer = RecordingObserver()
    late = sample(5, batch=6)  # split in two chunks: both must be withdrawn

    async def body(batcher: Batcher) -> tuple[Any, Any, Any]:
        first = asyncio.ensure_future(batcher.submit(sample(1)))
        await eventually(lambda: len(engine.batches) == 1)
        waited = await asyncio.gather(batcher.submit(late, deadline=time.monotonic() + 0.05), return_exceptions=True)
        expired = await asyncio.gather(batcher.submit(sample(6), deadline=time.monotonic() - 1), return_exceptions=True)
        return waited[0], expired[0], await first

    waited, expired, first = run_with(engine, body, observer, max_batch_size=4, max_delay_s=0.0)
    assert isinstance(waited, DeadlineExceeded) and isinstance(expired, DeadlineExceeded)
    assert engine.batch_sizes == [1]
    assert observer.dropped == {"timeout": 2}
    np.testing.assert_allclose(first.output, fake_output(sample(1)), rtol=1e-6)


def test_a_full_queue_answers_overloaded_at_once() -> None:
    engine = FakeEngine(dim=DIM, delay_s=0.3)

    async def body(batcher: Batcher) -> list[Any]:
        computing = asyncio.ensure_future(batcher.submit(sample(0)))
        await eventually(lambda: len(engine.batches) == 1)
        waiting = [asyncio.ensure_future(batcher.submit(sample(i))) for i in (1, 2)]
        await eventually(lambda: batcher.queue_depth == 2)
        start = time.monotonic()
        with pytest.raises(Overloaded):
            await batcher.submit(sample(3))
        assert time.monotonic() - start < 0.2  # at once, not after the engine frees up (0.3 s per batch)
        return await asyncio.gather(computing, *waiting)

    results = run_with(engine, body, max_batch_size=4, max_delay_s=0.0, max_queue=2)
    for i, result in enumerate(results):
        np.testing.assert_allclose(result.output, fake_output(sample(i)), rtol=1e-6)
    assert sum(engine.batch_sizes) == 3


def test_a_dead_loop_is_reported_and_fails_its_requests(caplog: pytest.LogCaptureFixture) -> None:
    engine = FakeEngine(dim=DIM)
    observer = RecordingObserver()

    async def body(batcher: Batcher) -> None:
        def broken(*args: object) -> Any:
            raise RuntimeError("bug in the queue")

        batcher._queue.ready = broken  # type: ignore[method-assign]
        assert batcher.alive
        with pytest.raises(BatcherStopped, match="died"):
            await batcher.submit(sample(1))
        assert not batcher.alive and batcher.failure == "RuntimeError: bug in the queue"
        with pytest.raises(BatcherStopped):
            await batcher.submit(sample(2))

    with caplog.at_level(logging.ERROR):
        run_with(engine, body, observer, max_batch_size=4, max_delay_s=0.0)
    assert observer.alive[:2] == [True, False]
    assert "batching loop died" in caplog.text
    assert engine.batches == []


def test_observer_errors_never_break_inference(caplog: pytest.LogCaptureFixture) -> None:
    engine = FakeEngine(dim=DIM)

    async def body(batcher: Batcher) -> list[Any]:
        return await asyncio.gather(*(batcher.submit(sample(i)) for i in range(3)))

    with caplog.at_level(logging.WARNING):
        results = run_with(engine, body, BrokenObserver(), max_batch_size=4, max_delay_s=0.01)
    for i, result in enumerate(results):
        np.testing.assert_allclose(result.output, fake_output(sample(i)), rtol=1e-6)
    assert "observer" in caplog.text


def test_stop_fails_what_is_still_waiting_or_computing() -> None:
    engine = FakeEngine(dim=DIM, delay_s=0.3)

    async def main() -> list[Any]:
        batcher = Batcher(engine, BatcherConfig(max_batch_size=1, max_delay_s=0.0))
        batcher.start()
        tasks = [asyncio.ensure_future(batcher.submit(sample(i))) for i in range(3)]
        await eventually(lambda: len(engine.batches) == 1)
        await batcher.stop()
        assert not batcher.alive
        with pytest.raises(BatcherStopped):
            await batcher.submit(sample(9))
        return await asyncio.gather(*tasks, return_exceptions=True)

    results = asyncio.run(main())
    assert all(isinstance(result, BatcherStopped) for result in results)


def test_submit_before_start_is_refused() -> None:
    async def main() -> None:
        batcher = Batcher(FakeEngine(dim=DIM), BatcherConfig())
        with pytest.raises(BatcherStopped):
            await batcher.submit(sample(0))
        await batcher.stop()

    asyncio.run(main())


def test_config_and_padding_rules() -> None:
    assert pad_size(3, (1, 2, 4, 8)) == 4
    assert pad_size(8, (1, 2, 4, 8)) == 8
    assert pad_size(3, None) == 3
    with pytest.raises(ValueError):
        BatcherConfig(max_batch_size=16, pad_buckets=(1, 2, 4, 8))
    with pytest.raises(ValueError):
        BatcherConfig(max_queue=0)


def test_run_batch_fills_the_engines_own_buffer_and_pads_with_zeros() -> None:
    """Several requests go into the array the engine hands out (pinned memory on the GPU): one copy each."""
    from service.batching.batcher import run_batch

    class BufferEngine(FakeEngine):
        def __init__(self) -> None:
            super().__init__(dim=4, poison=False)
            self.handed_out: list[np.ndarray] = []
            self.seen: list[np.ndarray] = []

        def input_buffer(self, batch: int, seq: int) -> np.ndarray:
            buffer = np.full((batch, seq, self.dim), np.nan, self.dtype)  # garbage, as np.empty could be
            self.handed_out.append(buffer)
            return buffer

        def run(self, x: np.ndarray) -> np.ndarray:
            self.seen.append(x)
            return super().run(x)

    engine = BufferEngine()
    parts = [np.random.default_rng(i).standard_normal((n, 3, 4)).astype(np.float32) for i, n in enumerate((1, 2))]
    out, _ = run_batch(engine, parts, padded=4)
    assert engine.seen[0] is engine.handed_out[0]
    np.testing.assert_array_equal(engine.seen[0][3], 0)  # padding rows are zeros, not leftovers
    np.testing.assert_allclose(out, fake_output(np.concatenate(parts)), rtol=1e-6)
    run_batch(engine, parts[:1], padded=1)  # a lone, unpadded request is passed through as is
    assert len(engine.handed_out) == 1 and engine.seen[1] is parts[0]
