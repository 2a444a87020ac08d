"""The direct shared-memory path through the engine process: client regions registered once, computed in place."""

from __future__ import annotations

import gc
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from service.engine import ipc
from service.engine.fake import FakeEngine, fake_output
from service.engine.remote import RemoteEngine
from tests.service.engine.regions_support import (
    PinningEngine,
    Region,
    batch,
    descriptors,
    job,
    mappings,
    register,
)
from tests.service.engine.support import TIMEOUT_S, RawWorker, gated, hold_first, hosting, remotes, sample, wait_until

pytestmark = pytest.mark.timeout(60)
ROW = 4 * 8 * 4  # one sample of (4, 8) float32


def test_direct_answers_equal_unbatched_ones_bit_for_bit_and_land_in_the_output_region() -> None:
    engine = PinningEngine()
    inputs, outputs = Region(16 * ROW), Region(16 * ROW, offset=4096 + 12)
    xs = [sample(i, batch=b) for i, b in enumerate((3, 1, 2))]
    with hosting(engine) as host, remotes(host.path) as (remote,):
        jobs = [job(inputs, 4 * i * ROW, x, outputs, 4 * i * ROW) for i, x in enumerate(xs)]
        answers, _ = remote.run_placed(jobs)
        alone = [remote.run(x).copy() for x in xs]
        assert [a.shape for a in answers] == [x.shape for x in xs]
        for x, answer, single, placed in zip(xs, answers, alone, jobs, strict=True):
            assert answer is placed.output and not placed.served.copied
            np.testing.assert_array_equal(answer, single)
            np.testing.assert_allclose(answer, fake_output(x), rtol=1e-6)
        assert engine.batches[0] == (6, 4)  # the three jobs ran as one batch
        assert len(host.host.regions) == 2 and len(engine.pinned) == 3  # two regions and the arena page-locked


def test_arrays_and_direct_jobs_mix_in_one_engine_batch() -> None:
    engine = FakeEngine()
    region = Region(8 * ROW)
    x, y = sample(1, batch=2), sample(2, batch=3)
    with hosting(engine) as host, remotes(host.path) as (remote,):
        placed = job(region, 0, y, region, 3 * ROW)  # input and output in one region
        (first, second), _ = remote.run_placed([x, placed])
        np.testing.assert_allclose(first, fake_output(x), rtol=1e-6)
        np.testing.assert_allclose(second, fake_output(y), rtol=1e-6)
        np.testing.assert_allclose(region.array(3 * ROW, y.shape), fake_output(y), rtol=1e-6)
    assert engine.batch_sizes == [5]


def test_a_region_registered_on_two_connections_is_mapped_once() -> None:
    engine = PinningEngine()
    region = Region(4 * ROW)
    with hosting(engine) as host, remotes(host.path, 2) as (a, b):
        for remote in (a, b):
            remote.run_placed([job(region, 0, sample(3), region, ROW)])
        assert len(host.host.regions) == 1 and len(engine.pinned) == 3  # two arenas and one region
        a.close()
        b.run_placed([job(region, 0, sample(4), region, ROW)])  # still mapped for b
        np.testing.assert_allclose(region.array(ROW, (1, 4, 8)), fake_output(sample(4)), rtol=1e-6)


def test_a_region_over_the_limits_is_served_by_copying() -> None:
    engine = FakeEngine()
    first, second = Region(2 * ROW), Region(2 * ROW)
    with hosting(engine) as host, remotes(host.path) as (remote,):
        host.host.regions.max_regions = 1
        kept = job(first, 0, sample(5), first, ROW)
        remote.run_placed([kept])
        refused = job(second, 0, sample(6), second, ROW)
        (answer,), _ = remote.run_placed([refused])
        assert refused.served.copied and not kept.served.copied
        assert answer is refused.output
        np.testing.assert_allclose(second.array(ROW, (1, 4, 8)), fake_output(sample(6)), rtol=1e-6)
        assert len(host.host.regions) == 1


def test_bad_frames_fail_only_their_job() -> None:
    engine = FakeEngine()
    region = Region(2 * ROW)
    with hosting(engine) as host, remotes(host.path) as (good,):
        raw = RawWorker(host.path)
        try:
            assert register(raw, 1, 5, region)[:2] == (1, ipc.OK)
            refusals = {
                "past the region": batch(raw, 2, 4, [(1, 5, ROW + 4, 5, 0)]),
                "output past it": batch(raw, 3, 4, [(2, 5, 0, 5, 1)]),
                "unknown region": batch(raw, 4, 4, [(1, 6, 0, 5, 0)]),
                "huge batch": batch(raw, 5, 4, [(1 << 31, 5, 0, 5, 0)]),
                "past the end": batch(raw, 6, 4, [(1, 5, 1 << 62, 5, 0)]),
                "id taken": register(raw, 7, 5, region),
                "the arena's id": register(raw, 8, ipc.ARENA, region),
                "unknown kind": register(raw, 9, 9, region, kind=7),
            }
            for what, (_, status, message) in refusals.items():
                assert status == ipc.FAILED and message, what
            assert "unknown shared-memory region id 6" in refusals["unknown region"][2]
            assert "kind 7" in refusals["unknown kind"][2]
            region.array(0, (1, 4, 8))[...] = sample(7)
            assert batch(raw, 10, 4, [(1, 5, 0, 5, ROW)])[:2] == (10, ipc.OK)
            np.testing.assert_allclose(region.array(ROW, (1, 4, 8)), fake_output(sample(7)), rtol=1e-6)
            np.testing.assert_allclose(good.run(sample(8)), fake_output(sample(8)), rtol=1e-6)
        finally:
            raw.close()
        assert engine.batch_sizes == [1, 1] and host.alive


def test_a_truncated_object_fails_the_job_instead_of_the_process() -> None:
    engine = FakeEngine()
    region = Region(2 * ROW)
    with hosting(engine) as host:
        raw = RawWorker(host.path)
        try:
            assert register(raw, 1, 1, region)[1] == ipc.OK
            os.ftruncate(region.fd, ROW)
            _, status, message = batch(raw, 2, 4, [(1, 1, 0, 1, ROW)])
            assert status == ipc.FAILED and "shrank" in message
        finally:
            raw.close()
        assert host.alive and engine.batch_sizes == []


def test_unregister_while_a_batch_uses_the_region_is_safe() -> None:
    engine, gate = gated()
    region = Region(2 * ROW)
    region.array(0, (1, 4, 8))[...] = sample(2)
    with hosting(engine) as host, remotes(host.path) as (first,), ThreadPoolExecutor(1) as pool:
        raw = RawWorker(host.path)
        try:
            held = hold_first(pool, engine, first, sample(1))  # the loop is busy: the next frames queue up
            raw.sock.sendall(ipc.batch_frame(2, 4, [(1, 1, 0, 1, ROW)]))  # region 1 is not registered yet
            gate.open()
            held.result(TIMEOUT_S)
            assert raw.receive()[1] == ipc.FAILED
            assert register(raw, 3, 1, region)[1] == ipc.OK
            engine.fail_if = gate = type(gate)()
            held = hold_first(pool, engine, first, sample(1))
            raw.sock.sendall(ipc.batch_frame(4, 4, [(1, 1, 0, 1, ROW)]) + ipc.unregister_frame(1))
            gate.open()
            held.result(TIMEOUT_S)
            assert raw.receive()[:2] == (4, ipc.OK)  # queued before the unregister: computed
            np.testing.assert_allclose(region.array(ROW, (1, 4, 8)), fake_output(sample(2)), rtol=1e-6)
            wait_until(lambda: len(host.host.regions) == 0, "the region to be unmapped after its batch")
            assert batch(raw, 5, 4, [(1, 1, 0, 1, ROW)])[1] == ipc.FAILED  # gone now
        finally:
            raw.close()


def test_a_worker_that_dies_holding_regions_leaves_no_mapping_or_descriptor() -> None:
    engine = PinningEngine()
    with hosting(engine) as host, remotes(host.path) as (staying,):
        staying.run(sample(0))
        before = (mappings(), descriptors())
        for i in range(5):
            raw = RawWorker(host.path)
            regions = [Region(2 * ROW) for _ in range(3)]
            for j, region in enumerate(regions):
                assert register(raw, j + 1, j + 1, region)[1] == ipc.OK
            region.array(0, (1, 4, 8))[...] = sample(i)
            raw.sock.sendall(ipc.batch_frame(9, 4, [(1, 3, 0, 3, ROW)]))  # dies before reading the answer
            raw.close()
            del regions, region
        wait_until(lambda: len(host.host.regions) == 0, "the regions of the dead workers to be unmapped")
        staying.run(sample(1))
        gc.collect()  # the test's own Region objects close their descriptors when collected
        wait_until(lambda: mappings() <= before[0] and descriptors() <= before[1], "no mapping or descriptor left", 5)
        assert len(engine.pinned) == 1  # the staying worker's arena


def test_two_hundred_register_use_unregister_cycles_leak_nothing() -> None:
    engine = PinningEngine()
    with hosting(engine) as host, remotes(host.path) as (remote,):
        remote.run_placed([job(Region(2 * ROW), 0, sample(0), Region(ROW), 0)])
        wait_until(lambda: len(host.host.regions) == 0, "the warm-up regions to go")
        before = (mappings(), descriptors())
        for i in range(200):
            source, target = Region(2 * ROW), Region(ROW)
            x = sample(i)
            (answer,), _ = remote.run_placed([job(source, ROW, x, target, 0)])
            np.testing.assert_allclose(answer, fake_output(x), rtol=1e-6)
            del source, target, answer  # garbage: the connection unregisters them
        wait_until(lambda: len(host.host.regions) == 0, "every region to be unmapped")
        gc.collect()  # the test's own Region objects close their descriptors when collected
        wait_until(lambda: mappings() <= before[0] and descriptors() <= before[1], "no mapping or descriptor left", 5)
        assert len(engine.pinned) == 1  # the arena
        assert len(engine.unpinned) == 402


def test_closing_a_connection_sends_nothing_for_its_regions_later() -> None:
    engine = FakeEngine()
    region = Region(2 * ROW)
    with hosting(engine) as host:
        remote = RemoteEngine(host.path)
        remote.run_placed([job(region, 0, sample(1), region, ROW)])
        remote.close()
        del region  # its finalizer must not touch the closed connection
        wait_until(lambda: len(host.host.regions) == 0, "the closed connection's regions to go")
        assert host.alive
