"""RemotePool: several connections to the engine process, so a worker has two batches in flight."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from service.batching import Batcher, BatcherConfig
from service.engine import remote as remote_module
from service.engine.base import Engine, EngineGone
from service.engine.fake import FakeEngine, fake_output
from service.engine.remote import RemotePool
from tests.service.engine.support import (
    TIMEOUT_S,
    Gate,
    HostThread,
    hosting,
    remotes,
    sample,
    spy_on_sends,
    wait_until,
)

pytestmark = pytest.mark.timeout(60)


# --- a pool of connections: two batches in flight per worker ---------------------------------------------------


@contextlib.contextmanager
def pool_of(path: str, connections: int = 2) -> Iterator[RemotePool]:
    pool = RemotePool(path, connections)
    try:
        yield pool
    finally:
        pool.close()


def test_a_pool_reports_the_host_engine_its_connections_and_concurrency() -> None:
    engine = FakeEngine(max_batch_size=8, fixed_shapes=True)
    with hosting(engine, max_batch_size=8) as host, pool_of(host.path) as pool:
        assert isinstance(pool, Engine)
        assert (pool.name, pool.dim, pool.dtype, pool.max_seq_len) == ("fake", 8, np.float32, 64)
        assert pool.buckets == (1, 2, 4, 8) and pool.provider == "fake" and pool.fixed_shapes is False
        assert pool.concurrency == 2 and len(pool.channels) == 2
        assert pool.channels[0].arena is not pool.channels[1].arena  # an arena per connection
        pool.warmup()
        described = pool.describe()
        assert described["fixed_shapes"] is True  # the host engine's own facts
        assert described["engine_process"]["connections"] == 2
        assert described["engine_process"]["socket"] == host.path
        assert pool.describe()["engine_process"]["connections"] == 2  # describing twice is stable
    with hosting(FakeEngine()) as host, pool_of(host.path, connections=3) as pool:
        assert pool.concurrency == 3 and pool.describe()["engine_process"]["connections"] == 3


def test_threads_sharing_a_pool_get_their_own_answers() -> None:
    engine = FakeEngine(delay_s=0.002)
    with hosting(engine) as host, pool_of(host.path) as pool:

        def work(seed: int) -> None:
            for i in range(10):
                x = sample(seed * 100 + i, batch=1 + i % 3, seq=(4, 6)[i % 2])
                source = pool.input_buffer(*x.shape[:2]) if i % 2 else x  # arena-built and foreign inputs
                source[...] = x
                np.testing.assert_allclose(pool.run(source), fake_output(x), rtol=1e-6)

        with ThreadPoolExecutor(4) as threads:
            for job in [threads.submit(work, seed) for seed in range(4)]:
                job.result(TIMEOUT_S)
    assert sum(engine.batch_sizes) == 4 * sum(1 + i % 3 for i in range(10))


def test_two_concurrent_runs_go_out_on_two_connections_and_are_merged_by_the_host() -> None:
    gate = Gate()
    engine = FakeEngine(fail_if=gate)
    x1, x2 = sample(11), sample(12)
    with (
        hosting(engine, max_batch_size=8) as host,
        remotes(host.path) as (blocker,),
        pool_of(host.path) as pool,
        ThreadPoolExecutor(3) as threads,
    ):
        # Another worker's batch holds the host's engine: the pool's frames then wait, side by side, to be merged.
        held = threads.submit(blocker.run, sample(10))
        wait_until(lambda: len(engine.batches) == 1, "the blocking batch to reach the engine")
        first, second = (spy_on_sends(channel) for channel in pool.channels)
        assert pool.channels[0].regions.locate(pool.input_buffer(1, 4)) is not None  # both idle: the first
        one = threads.submit(pool.run, x1)  # foreign input: the first idle connection
        assert first.acquire(timeout=TIMEOUT_S), "the first frame was never sent"
        assert pool.channels[0].busy and not pool.channels[1].busy
        buffer = pool.input_buffer(1, 4)  # an idle connection's arena: the second one's
        assert pool.channels[1].regions.locate(buffer) is not None
        buffer[...] = x2
        two = threads.submit(pool.run, buffer)
        assert second.acquire(timeout=TIMEOUT_S), "the second frame was never sent"
        assert all(channel.busy for channel in pool.channels)  # two batches of one worker in flight at once
        gate.open()
        held.result(TIMEOUT_S)
        np.testing.assert_allclose(one.result(TIMEOUT_S), fake_output(x1), rtol=1e-6)
        np.testing.assert_allclose(two.result(TIMEOUT_S), fake_output(x2), rtol=1e-6)
        assert not first.acquire(blocking=False) and not second.acquire(blocking=False)  # one frame each
    assert engine.batches == [(1, 4), (2, 4)]  # the pool's two batches ran as one
    np.testing.assert_array_equal(engine.inputs[1], np.concatenate([x1, x2]))


def test_a_batcher_over_a_pool_keeps_two_batches_with_the_engine_process() -> None:
    gate = Gate()
    engine = FakeEngine(fail_if=gate)
    inputs = [sample(20 + i, batch=1 + i % 2) for i in range(8)]

    async def scenario(pool: RemotePool) -> None:
        config = BatcherConfig(max_batch_size=1, max_delay_s=0.0, max_in_flight=pool.concurrency)
        batcher = Batcher(pool, config)
        batcher.start()

        async def request(x: np.ndarray) -> None:
            # Checked and dropped at once, as a handler sends its answer: an answer is a view of an arena region.
            result = await batcher.submit(x)
            np.testing.assert_allclose(result.output, fake_output(x), rtol=1e-6)

        try:
            first = asyncio.ensure_future(request(inputs[0]))
            await asyncio.to_thread(wait_until, lambda: len(engine.batches) == 1, "the first batch")
            rest = [asyncio.ensure_future(request(x)) for x in inputs[1:]]
            await asyncio.to_thread(wait_until, lambda: all(c.busy for c in pool.channels), "a second batch")
            gate.open()
            await asyncio.gather(first, *rest)
        finally:
            gate.open()
            await batcher.stop()

    with hosting(engine, max_batch_size=8) as host, pool_of(host.path) as pool:
        asyncio.run(asyncio.wait_for(scenario(pool), TIMEOUT_S))
    assert sum(engine.batch_sizes) == sum(x.shape[0] for x in inputs)


def test_closing_a_pool_closes_every_connection() -> None:
    with hosting(FakeEngine()) as host:
        pool = RemotePool(host.path)
        np.testing.assert_allclose(pool.run(sample(30)), fake_output(sample(30)), rtol=1e-6)
        pool.close()
        for channel in pool.channels:
            assert channel._sock.fileno() == -1
            assert channel.arena.fd == -1


def test_a_pool_whose_host_is_gone_raises_engine_gone() -> None:
    host = HostThread(FakeEngine(), 8).start()
    try:
        with pool_of(host.path) as pool:
            np.testing.assert_allclose(pool.run(sample(40)), fake_output(sample(40)), rtol=1e-6)
            host.stop()
            for _ in range(2):  # and it stays so
                with pytest.raises(EngineGone, match="gone"):
                    pool.run(sample(41))
            buffer = pool.input_buffer(1, 4)  # an arena-built batch too
            buffer[...] = sample(42)
            with pytest.raises(EngineGone):
                pool.run(buffer)
            for channel in pool.channels:  # whichever connection a batch takes
                with pytest.raises(EngineGone):
                    channel.run(sample(43))
    finally:
        host.stop()


def test_a_pool_uses_the_other_connections_memory_when_one_has_none_free(monkeypatch: pytest.MonkeyPatch) -> None:
    # Answers are views of their connection's arena regions and stay held while a slow client is sent its raw
    # answer (codecs.encode sends the array's own memory). Sequential batches all go to the first idle
    # connection, so its regions run out while the second connection's are all free: the next batch then
    # waits REGION_WAIT_S and fails (a 500), although the pool has room for it.
    monkeypatch.setattr(remote_module, "REGION_WAIT_S", 0.2)
    with hosting(FakeEngine()) as host, pool_of(host.path) as pool:
        held = [pool.run(sample(50 + i)) for i in range(remote_module.REGIONS)]  # all on the first connection
        assert all(pool.channels[0].regions.locate(answer) is not None for answer in held)
        x = sample(60)
        np.testing.assert_allclose(pool.run(x), fake_output(x), rtol=1e-6)
