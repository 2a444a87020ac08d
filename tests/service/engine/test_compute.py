"""The engine process computes on a thread of its own: its event loop reads, answers and tidies up meanwhile,
and nothing a batch computing now reads (a worker's arena, a client region) is unpinned or unmapped under it."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from service.engine import ipc
from service.engine.compute import ComputeThread, compute
from service.engine.fake import POISON, FakeEngine, fake_output
from tests.service.engine.regions_support import PinningEngine, Region, register
from tests.service.engine.support import (
    TIMEOUT_S,
    Gate,
    HostThread,
    RawWorker,
    gated,
    hold_first,
    hosting,
    remotes,
    sample,
    spy_on_sends,
    wait_until,
)

pytestmark = pytest.mark.timeout(60)
ROW = 4 * 8 * 4  # one sample of (4, 8) float32


def test_frames_are_read_and_answered_while_a_batch_computes() -> None:
    engine, gate = gated()
    with hosting(engine) as host, remotes(host.path) as (first,), ThreadPoolExecutor(1) as pool:
        raw = RawWorker(host.path)
        try:
            held = hold_first(pool, engine, first, sample(1))
            raw.put(sample(2, batch=2))
            raw.send(7, 2, 4)  # queued on the loop, for the next batch
            wait_until(lambda: len(host.host._jobs) == 1, "the frame to be read while the batch computes")
            assert raw.request(8, 1, 0)[:2] == (8, ipc.FAILED)  # a bad frame is answered at once, mid-batch
            assert engine.batch_sizes == [1]
            gate.open()
            np.testing.assert_allclose(held.result(TIMEOUT_S), fake_output(sample(1)), rtol=1e-6)
            assert raw.receive()[:2] == (7, ipc.OK)
            np.testing.assert_allclose(raw.get((2, 4, 8)), fake_output(sample(2, batch=2)), rtol=1e-6)
            assert engine.batch_sizes == [1, 2]
        finally:
            raw.close()


def test_a_worker_that_leaves_mid_batch_keeps_its_arena_pinned_until_the_batch_ends() -> None:
    gate = Gate()
    engine = PinningEngine(fail_if=gate)
    with hosting(engine) as host, remotes(host.path) as (staying,), ThreadPoolExecutor(1) as pool:
        leaving = RawWorker(host.path)
        leaving.put(sample(3))
        leaving.send(1, 1, 4)
        wait_until(lambda: len(engine.batches) == 1, "the leaving worker's batch to compute")
        leaving.close()  # gone while its own batch reads its arena
        wait_until(lambda: len(host.host._workers) == 1, "the leaving worker to be detached")
        assert len(engine.pinned) == 2, "an arena was unpinned while a batch copies from it"
        gate.open()
        wait_until(lambda: len(engine.pinned) == 1, "the arena to be unpinned once its batch ended")
        np.testing.assert_allclose(staying.run(sample(4)), fake_output(sample(4)), rtol=1e-6)

        engine.fail_if = gate = Gate()  # a worker whose frame only waits in the queue: unpinned at once
        held = pool.submit(staying.run, sample(5))
        wait_until(lambda: len(engine.batches) == 3, "the staying worker's batch to compute")
        queued = RawWorker(host.path)
        queued.put(sample(6))
        queued.send(1, 1, 4)
        wait_until(lambda: len(host.host._jobs) == 1, "the frame to be queued")
        queued.close()
        wait_until(lambda: len(engine.pinned) == 1 and not host.host._jobs, "the queued worker's arena to go")
        gate.open()
        np.testing.assert_allclose(held.result(TIMEOUT_S), fake_output(sample(5)), rtol=1e-6)


def test_a_region_unregistered_while_its_batch_computes_stays_mapped_until_it_ends() -> None:
    engine, gate = gated()
    region = Region(2 * ROW)
    region.array(0, (1, 4, 8))[...] = sample(5)
    with hosting(engine) as host:
        raw = RawWorker(host.path)
        try:
            assert register(raw, 1, 1, region)[1] == ipc.OK
            raw.sock.sendall(ipc.batch_frame(2, 4, [(1, 1, 0, 1, ROW)]))
            wait_until(lambda: len(engine.batches) == 1, "the region's batch to compute")
            raw.sock.sendall(ipc.unregister_frame(1))
            (conn,) = host.host._workers
            wait_until(lambda: not conn.regions, "the unregister frame to be read mid-batch")
            assert len(host.host.regions) == 1  # still mapped: the computing batch holds it
            gate.open()
            assert raw.receive()[:2] == (2, ipc.OK)
            np.testing.assert_allclose(region.array(ROW, (1, 4, 8)), fake_output(sample(5)), rtol=1e-6)
            wait_until(lambda: len(host.host.regions) == 0, "the region to be unmapped after its batch")
        finally:
            raw.close()


def test_stopping_mid_batch_waits_for_the_batch_before_unpinning_arenas() -> None:
    gate = Gate()
    engine = PinningEngine(fail_if=gate)
    host = HostThread(engine, 8).start()
    with remotes(host.path) as (worker,), ThreadPoolExecutor(2) as pool:
        held = hold_first(pool, engine, worker, sample(6))
        stopping = pool.submit(host.stop)
        wait_until(lambda: host.host._stopping, "serve to be cancelled")
        assert len(engine.pinned) == 1 and host.alive  # waiting for the batch, the arena still pinned
        gate.open()
        stopping.result(TIMEOUT_S)
        assert not engine.pinned and not host.alive
        np.testing.assert_allclose(held.result(TIMEOUT_S), fake_output(sample(6)), rtol=1e-6)  # answered first


def test_a_failed_run_comes_back_as_a_value_without_tracebacks() -> None:
    """A traceback's frames hold the batch's views of client memory: none may outlive the run."""
    engine = FakeEngine()

    def broken(x: np.ndarray) -> np.ndarray:
        try:
            raise OSError("the cause")
        except OSError as exc:
            raise RuntimeError("the failure") from exc

    engine.run = broken  # type: ignore[method-assign]
    parts = [sample(1)]
    result = compute(engine, parts, parts, None)
    assert isinstance(result.failure, RuntimeError) and str(result.failure) == "the failure"
    assert result.failure.__traceback__ is None and result.failure.__cause__ is not None
    assert result.failure.__cause__.__traceback__ is None
    ok = compute(FakeEngine(), parts, [np.empty_like(parts[0])], None)
    assert ok.failure is None and ok.padded == 1


def test_without_the_thread_batches_compute_on_the_loop_and_answer_the_same() -> None:
    """``--no-engine-thread`` (the comparison mode): merged batches, a failed one, answers, all as with the thread."""
    engine, gate = gated()
    xs = [sample(20 + i, batch=2) for i in range(3)]
    with hosting(engine, threaded=False) as host, remotes(host.path, 3) as rs, ThreadPoolExecutor(3) as pool:
        held = hold_first(pool, engine, rs[0], xs[0])  # the loop itself waits: the next frames stay in the sockets
        rest = []
        for remote, x in zip(rs[1:], xs[1:], strict=True):
            sent = spy_on_sends(remote)
            rest.append(pool.submit(remote.run, x))
            assert sent.acquire(timeout=TIMEOUT_S)
        assert not host.host._jobs
        gate.open()
        for x, future in zip(xs, (held, *rest), strict=True):
            np.testing.assert_allclose(future.result(TIMEOUT_S), fake_output(x), rtol=1e-6)
        assert engine.batch_sizes == [2, 4]
        poisoned = sample(30)
        poisoned[0, 0, 0] = POISON
        with pytest.raises(RuntimeError, match="poisoned"):
            rs[0].run(poisoned)
        np.testing.assert_allclose(rs[1].run(sample(31)), fake_output(sample(31)), rtol=1e-6)


class ThreadNoting(FakeEngine):
    """Notes the thread of its warm-up and of each run (onnxruntime's CUDA graphs are per thread)."""

    def __init__(self) -> None:
        super().__init__()
        self.threads: list[tuple[str, int]] = []

    def warmup(self) -> None:
        self.threads.append(("warmup", threading.get_ident()))

    def run(self, x: np.ndarray) -> np.ndarray:
        self.threads.append(("run", threading.get_ident()))
        return super().run(x)


def test_the_warm_up_runs_on_the_thread_that_computes_the_batches() -> None:
    engine = ThreadNoting()
    compute = ComputeThread(engine)
    compute.call(engine.warmup)
    with pytest.raises(ZeroDivisionError):
        compute.call(lambda: 1 // 0)  # raised to the caller, the thread goes on
    host = HostThread(engine, 8, threaded=True)
    host.host._thread = compute
    host.start()
    try:
        with remotes(host.path) as (worker,):
            np.testing.assert_allclose(worker.run(sample(40)), fake_output(sample(40)), rtol=1e-6)
    finally:
        host.stop()
    (warmed,) = {ident for what, ident in engine.threads if what == "warmup"}
    assert {ident for what, ident in engine.threads if what == "run"} == {warmed} != {threading.get_ident()}
