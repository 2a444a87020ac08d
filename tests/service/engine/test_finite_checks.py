"""NaN/Inf in inputs the engine process reads from client regions: found there, refused per job, never by workers."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from service.engine import ipc
from service.engine.fake import FakeEngine, fake_output
from service.errors import InvalidInput
from tests.service.engine.regions_support import Region, batch, job, register
from tests.service.engine.support import TIMEOUT_S, RawWorker, hosting, remotes, sample, spy_on_sends, wait_until

pytestmark = pytest.mark.timeout(60)
ROW = 4 * 8 * 4  # one sample of (4, 8) float32
MESSAGE = "inputs must be finite numbers within the model's dtype (float32)"


def spoiled(seed: int, rows: int, bad: float, row: int) -> np.ndarray:
    x = sample(seed, batch=rows)
    x[row, 3, 5] = bad
    return x


def test_the_engine_process_says_it_checks_what_it_reads_from_client_regions() -> None:
    with hosting(FakeEngine()) as host, remotes(host.path) as (remote,):
        assert host.host.info()["checks_finite"] is True
        assert remote.checks_finite


def test_direct_jobs_holding_a_nan_or_an_inf_are_refused_and_the_rest_of_the_frame_is_answered() -> None:
    engine = FakeEngine()
    region = Region(16 * ROW)
    x = sample(1, batch=2)  # through the arena
    nan, good, inf = spoiled(2, 2, np.nan, 1), sample(3, batch=3), spoiled(4, 1, -np.inf, 0)
    with hosting(engine) as host, remotes(host.path) as (remote,):
        jobs = [job(region, 0, nan, region, 8 * ROW), job(region, 2 * ROW, good, region, 10 * ROW)]
        jobs.append(job(region, 5 * ROW, inf, region, 13 * ROW))
        answers, _ = remote.run_placed([x, *jobs])
    assert engine.batch_sizes == [8]  # one frame, one batch: the bad samples computed too
    np.testing.assert_allclose(answers[0], fake_output(x), rtol=1e-6)
    np.testing.assert_allclose(answers[2], fake_output(good), rtol=1e-6)
    assert answers[2] is jobs[1].output
    for refused in (answers[1], answers[3]):
        assert isinstance(refused, InvalidInput) and str(refused) == MESSAGE


def test_only_the_job_with_a_non_finite_sample_fails_when_workers_share_a_batch() -> None:
    running = threading.Event()
    running.set()
    engine = FakeEngine(fail_if=lambda x: not running.wait(TIMEOUT_S))  # holds batches while cleared
    region = Region(16 * ROW)
    first = sample(9)
    bad, good = spoiled(10, 3, np.inf, 2), sample(11, batch=2)
    with hosting(engine, max_batch_size=8) as host, remotes(host.path, 3) as rs, ThreadPoolExecutor(3) as pool:
        for remote in rs[1:]:  # the region registered on each connection first: a REGISTER waits for its reply
            remote.run_placed([job(region, 0, sample(8), region, ROW)])
        running.clear()
        held = pool.submit(rs[0].run, first)
        wait_until(lambda: len(engine.batches) == 3, "the first batch to reach the engine")
        futures = []
        for remote, placed in (
            (rs[1], job(region, 0, bad, region, 8 * ROW)),
            (rs[2], job(region, 3 * ROW, good, region, 11 * ROW)),
        ):
            sent = spy_on_sends(remote)
            futures.append(pool.submit(remote.run_placed, [placed]))
            assert sent.acquire(timeout=TIMEOUT_S), "the request frame was never sent"
        running.set()  # both frames wait in their sockets: the host reads them together, as one batch
        np.testing.assert_allclose(held.result(TIMEOUT_S), fake_output(first), rtol=1e-6)
        (error,), _ = futures[0].result(TIMEOUT_S)
        (answer,), _ = futures[1].result(TIMEOUT_S)
    assert engine.batches[2:] == [(1, 4), (5, 4)]  # the two frames ran as one engine batch
    assert isinstance(error, InvalidInput) and str(error) == MESSAGE
    np.testing.assert_allclose(answer, fake_output(good), rtol=1e-6)
    np.testing.assert_allclose(region.array(11 * ROW, good.shape), fake_output(good), rtol=1e-6)


def test_an_invalid_reply_names_the_refused_parts_of_the_frame() -> None:
    region = Region(4 * ROW)
    with hosting(FakeEngine()) as host:
        raw = RawWorker(host.path)
        try:
            assert register(raw, 1, 5, region)[:2] == (1, ipc.OK)
            region.array(0, (2, 4, 8))[...] = spoiled(12, 2, np.nan, 0)
            region.array(2 * ROW, (1, 4, 8))[...] = sample(13)
            # Part 0 is finite, part 1 holds the NaN: only part 1 is named.
            sequence, status, message = batch(raw, 2, 4, [(1, 5, 2 * ROW, 5, 3 * ROW), (2, 5, 0, 5, 0)])
            assert (sequence, status) == (2, ipc.INVALID)
            assert ipc.parse_invalid(message) == ([1], MESSAGE)
            np.testing.assert_allclose(region.array(3 * ROW, (1, 4, 8)), fake_output(sample(13)), rtol=1e-6)
            # The arena's values are the worker's to check (it copied them there): never refused here.
            raw.put(spoiled(14, 1, np.nan, 0))
            assert raw.request(3, 1, 4)[:2] == (3, ipc.OK)
        finally:
            raw.close()


def test_a_direct_job_served_by_copying_is_checked_by_the_worker() -> None:
    engine = FakeEngine()
    first, second = Region(2 * ROW), Region(4 * ROW)
    with hosting(engine) as host, remotes(host.path) as (remote,):
        host.host.regions.max_regions = 1
        remote.run_placed([job(first, 0, sample(15), first, ROW)])
        refused = job(second, 0, spoiled(16, 2, np.nan, 1), second, 2 * ROW)
        kept = job(first, 0, sample(17), first, ROW)
        (error, answer), _ = remote.run_placed([refused, kept])
    assert refused.served.copied and isinstance(error, InvalidInput) and str(error) == MESSAGE
    np.testing.assert_allclose(answer, fake_output(sample(17)), rtol=1e-6)
    assert engine.batch_sizes == [1, 1]  # the refused job never reached the engine


def test_invalid_messages_round_trip() -> None:
    assert ipc.parse_invalid(ipc.invalid_message([0, 3], "a: b")) == ([0, 3], "a: b")
