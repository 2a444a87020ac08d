"""Timing headers behind the engine process mean what they mean with an engine in the worker.

``x-inference-time`` is the engine's compute for the batch (reported in the engine process's reply frame), and
``x-queue-time`` everything before it: the worker's queue, the hop to the engine process and its queue there.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from service.batching.batcher import run_batch_timed
from service.engine.fake import FakeEngine, fake_output
from service.engine.remote import RemotePool
from tests.service.engine.support import TIMEOUT_S, gated, hold_first, hosting, remotes, sample
from tests.service.support import from_npy, npy, serving

pytestmark = pytest.mark.timeout(60)
NPY_HEADERS = {"content-type": "application/x-npy"}
COMPUTE_S = 0.05  # the fake engine's time per batch
HELD_S = 0.4  # how long another worker's batch holds the engine process


def test_run_timed_reports_the_engine_process_compute_not_the_round_trip() -> None:
    engine, gate = gated(delay_s=COMPUTE_S)
    with hosting(engine) as host, remotes(host.path, count=2) as (busy, remote), ThreadPoolExecutor(2) as pool:
        held = hold_first(pool, engine, busy, sample(1))
        started = time.perf_counter()
        mine = pool.submit(remote.run_timed, sample(2))  # waits in the engine process behind the held batch
        time.sleep(HELD_S)
        gate.open()
        out, compute_s = mine.result(TIMEOUT_S)
        round_trip = time.perf_counter() - started
        held.result(TIMEOUT_S)
    np.testing.assert_allclose(out, fake_output(sample(2)), rtol=1e-6)
    assert COMPUTE_S <= compute_s < HELD_S <= round_trip  # its own compute, not the wait behind the other batch


def test_a_pool_and_a_batch_in_pieces_report_compute_too() -> None:
    with hosting(FakeEngine(delay_s=COMPUTE_S)) as host:
        pool = RemotePool(host.path)
        try:
            out, compute_s = pool.run_timed(sample(3))
        finally:
            pool.close()
        np.testing.assert_allclose(out, fake_output(sample(3)), rtol=1e-6)
        assert COMPUTE_S <= compute_s < 1.0
        with remotes(host.path, max_arena_bytes=8192) as (small,):
            x = sample(4, batch=10, seq=16)  # does not fit one region: several calls, their compute summed
            out, compute_s = small.run_timed(x)
        np.testing.assert_allclose(out, fake_output(x), rtol=1e-6)
        assert compute_s >= 2 * COMPUTE_S


def test_run_batch_timed_splits_an_engine_process_call_into_compute_and_the_rest() -> None:
    class Remote(FakeEngine):
        def run_timed(self, x: np.ndarray) -> tuple[np.ndarray, float]:
            time.sleep(0.1)  # the hop and the engine process's queue
            return self.run(x), 0.02

    out, compute_s, away_s = run_batch_timed(Remote(), [sample(5)], padded=1)
    np.testing.assert_allclose(out, fake_output(sample(5)), rtol=1e-6)
    assert compute_s == 0.02 and away_s >= 0.1 - 0.02
    _, local_s, local_away_s = run_batch_timed(FakeEngine(delay_s=COMPUTE_S), [sample(5)], padded=1)
    assert local_s >= COMPUTE_S and local_away_s == 0.0  # an engine in the worker: all of it is compute


def test_the_worker_reports_engine_compute_as_inference_time_and_the_rest_as_queue_time() -> None:
    engine, gate = gated(delay_s=COMPUTE_S)
    with hosting(engine) as host, remotes(host.path, count=2) as (busy, remote), ThreadPoolExecutor(1) as pool:

        async def scenario() -> None:
            async with serving(remote, engine_socket=host.path, max_delay_ms=0) as (client, _):
                held = hold_first(pool, engine, busy, sample(6))  # another worker's batch holds the engine
                x = sample(7, batch=2)
                request = asyncio.ensure_future(client.post("/encode", content=npy(x), headers=NPY_HEADERS))
                await asyncio.sleep(HELD_S)
                gate.open()
                response = await request
                await asyncio.wrap_future(held)
            assert response.status_code == 200, response.text
            np.testing.assert_allclose(from_npy(response.content), fake_output(x), rtol=1e-6)
            inference_s = float(response.headers["x-inference-time"])
            queue_s = float(response.headers["x-queue-time"])
            assert COMPUTE_S <= inference_s < HELD_S / 2, response.headers  # the engine's compute only
            assert queue_s >= HELD_S / 2, response.headers  # it waited in the engine process: queue time

        asyncio.run(asyncio.wait_for(scenario(), TIMEOUT_S))
