from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest

from service.batching.observer import BatchStats
from service.engine.base import EngineUnrecoverable
from service.engine.fake import FATAL, POISON, FakeEngine, fake_output
from service.engine.host import EngineHost
from service.engine.jobs import run_parts
from service.engine.remote import RemoteEngine
from service.metrics import Metrics
from tests.service.batching.support import RecordingObserver
from tests.service.engine.support import (
    TIMEOUT_S,
    HostThread,
    gated,
    hold_first,
    hosting,
    remotes,
    sample,
    spy_on_sends,
)
from tests.service.support import metric

pytestmark = pytest.mark.timeout(60)


def marked(value: float, seed: int = 99, batch: int = 1, seq: int = 4) -> np.ndarray:
    x = sample(seed, batch, seq)
    x[0, 0, 0] = value
    return x


def queue_in_order(pool: ThreadPoolExecutor, calls: Sequence[tuple[RemoteEngine, np.ndarray]]) -> list[Future[Any]]:
    """Submit each call once the previous one's request frame is sent, so the host reads them in this order."""
    futures = []
    for remote, x in calls:
        sent = spy_on_sends(remote)
        futures.append(pool.submit(remote.run, x))
        assert sent.acquire(timeout=TIMEOUT_S), "the request frame was never sent"
    return futures


# --- merging ---------------------------------------------------------------------------------------------------


def test_batches_of_several_workers_are_merged_up_to_the_max_batch_size() -> None:
    engine, gate = gated()
    xs = [sample(i, batch=3) for i in range(4)]
    with hosting(engine, max_batch_size=8) as host, remotes(host.path, 4) as rs, ThreadPoolExecutor(4) as pool:
        first = hold_first(pool, engine, rs[0], xs[0])
        rest = queue_in_order(pool, list(zip(rs[1:], xs[1:], strict=True)))
        gate.open()
        for x, future in zip(xs, (first, *rest), strict=True):  # checked while attached: answers are arena views
            np.testing.assert_allclose(future.result(TIMEOUT_S), fake_output(x), rtol=1e-6)
    # 3 alone (it was computing), then 3 + 3 (a third 3 would make 9 > 8), then the last 3.
    assert engine.batches == [(3, 4), (6, 4), (3, 4)]
    for batch, expected in zip(engine.inputs[1:], (np.concatenate(xs[1:3]), xs[3]), strict=True):
        np.testing.assert_array_equal(batch, expected)  # FIFO: worker batches in the order they arrived


def test_a_later_small_batch_fills_the_room_a_big_one_leaves() -> None:
    engine, gate = gated()
    sizes = (5, 2, 10, 1)
    xs = [sample(10 + i, batch=b) for i, b in enumerate(sizes)]
    with hosting(engine, max_batch_size=8) as host, remotes(host.path, 5) as rs, ThreadPoolExecutor(5) as pool:
        first = hold_first(pool, engine, rs[0], sample(1))
        rest = queue_in_order(pool, list(zip(rs[1:], xs, strict=True)))
        gate.open()
        first.result(TIMEOUT_S)
        for x, future in zip(xs, rest, strict=True):
            np.testing.assert_allclose(future.result(TIMEOUT_S), fake_output(x), rtol=1e-6)
    # 5 + 2 + 1 = 8 (the 10 does not fit beside them); the 10 runs alone: bigger than the max, but one job.
    assert engine.batch_sizes == [1, 8, 10]
    assert all(size <= 8 for size in engine.batch_sizes[:-1])


def test_sequence_lengths_are_never_merged() -> None:
    engine, gate = gated()
    xs = [sample(20, batch=2, seq=5), sample(21, batch=2, seq=4), sample(22, batch=1, seq=5)]
    with hosting(engine, max_batch_size=8) as host, remotes(host.path, 4) as rs, ThreadPoolExecutor(4) as pool:
        first = hold_first(pool, engine, rs[0], sample(23, batch=2, seq=4))
        rest = queue_in_order(pool, list(zip(rs[1:], xs, strict=True)))
        gate.open()
        first.result(TIMEOUT_S)
        for x, future in zip(xs, rest, strict=True):
            np.testing.assert_allclose(future.result(TIMEOUT_S), fake_output(x), rtol=1e-6)
    # The oldest waiting job picks the sequence length; the seq-4 job waits for the next run.
    assert engine.batches == [(2, 4), (3, 5), (2, 4)]


def test_concurrent_workers_all_get_their_own_answers() -> None:
    engine = FakeEngine(delay_s=0.005)
    rounds = 15

    def work(remote: RemoteEngine, worker: int) -> None:
        for i in range(rounds):
            x = sample(100 * worker + i, batch=1 + (worker + i) % 3, seq=(4, 6)[i % 2])
            buffer = remote.input_buffer(*x.shape[:2]) if i % 3 else x  # arena-built and foreign inputs
            buffer[...] = x
            np.testing.assert_allclose(remote.run(buffer), fake_output(x), rtol=1e-6)

    with hosting(engine, max_batch_size=8) as host, remotes(host.path, 4) as rs, ThreadPoolExecutor(4) as pool:
        for job in [pool.submit(work, r, w) for w, r in enumerate(rs)]:
            job.result(TIMEOUT_S)
    assert max(engine.batch_sizes) <= 8
    assert sum(engine.batch_sizes) == sum(1 + (w + i) % 3 for w in range(4) for i in range(rounds))


# --- failures --------------------------------------------------------------------------------------------------


def test_a_poisoned_batch_fails_the_workers_in_that_run_and_the_host_keeps_serving() -> None:
    engine, gate = gated()
    healthy_first, poisoned, companion, other_seq = sample(30), marked(POISON), sample(31), sample(32, seq=6)
    with hosting(engine, max_batch_size=8) as host, remotes(host.path, 4) as rs, ThreadPoolExecutor(4) as pool:
        first = hold_first(pool, engine, rs[0], healthy_first)
        calls = [(rs[1], poisoned), (rs[2], companion), (rs[3], other_seq)]
        bad, merged, apart = queue_in_order(pool, calls)
        gate.open()
        np.testing.assert_allclose(first.result(TIMEOUT_S), fake_output(healthy_first), rtol=1e-6)
        for future in (bad, merged):  # the companion shared the poisoned run: it fails too, as in one worker
            with pytest.raises(RuntimeError, match="poisoned") as info:
                future.result(TIMEOUT_S)
            assert not isinstance(info.value, EngineUnrecoverable)
        np.testing.assert_allclose(apart.result(TIMEOUT_S), fake_output(other_seq), rtol=1e-6)
        for i, remote in enumerate(rs):  # every worker, the failed ones included, is served afterwards
            x = sample(40 + i)
            np.testing.assert_allclose(remote.run(x), fake_output(x), rtol=1e-6)
        assert host.alive
    assert engine.batch_sizes == [1, 2, 1, 1, 1, 1, 1]


def test_an_unrecoverable_engine_breaks_every_worker_and_ends_serve() -> None:
    engine, gate = gated()
    fatal, companion, waiting = marked(FATAL), sample(51), sample(52, seq=6)
    host = HostThread(engine, max_batch_size=8).start()
    try:
        with remotes(host.path, 5) as rs, ThreadPoolExecutor(4) as pool:
            first = hold_first(pool, engine, rs[0], sample(50))
            calls = [(rs[1], fatal), (rs[2], companion), (rs[3], waiting)]
            futures = queue_in_order(pool, calls)
            gate.open()
            np.testing.assert_allclose(first.result(TIMEOUT_S), fake_output(sample(50)), rtol=1e-6)
            for future in futures:  # in the fatal run or still waiting: all are told the engine is broken
                with pytest.raises(EngineUnrecoverable, match="broken for good"):
                    future.result(TIMEOUT_S)
            host.join()
            assert isinstance(host.error, EngineUnrecoverable)
            for remote in (rs[0], rs[4]):  # later calls, and a worker that never sent anything
                with pytest.raises(EngineUnrecoverable):
                    remote.run(sample(53))
        assert not os.path.exists(host.path)
        with pytest.raises(ConnectionError):
            RemoteEngine(host.path)
    finally:
        host.stop()
    assert engine.batch_sizes == [1, 2]  # the waiting seq-6 batch never ran


# --- run_parts -------------------------------------------------------------------------------------------------


def test_run_parts_pads_to_the_bucket_and_writes_answers_over_the_inputs() -> None:
    engine = FakeEngine(fixed_shapes=True, max_batch_size=8)
    xs = [sample(60, batch=3), sample(61, batch=2)]
    parts = [x.copy() for x in xs]
    padded, seconds = run_parts(engine, parts)
    assert padded == 8 and seconds >= 0
    assert engine.batches == [(8, 4)]
    np.testing.assert_array_equal(engine.inputs[0][:5], np.concatenate(xs))
    np.testing.assert_array_equal(engine.inputs[0][5:], 0)
    for x, part in zip(xs, parts, strict=True):
        np.testing.assert_allclose(part, fake_output(x), rtol=1e-6)


def test_run_parts_without_fixed_shapes_runs_the_samples_as_they_are() -> None:
    engine = FakeEngine(max_batch_size=8)
    parts = [sample(62, batch=3), sample(63, batch=2)]
    expected = [fake_output(p) for p in parts]
    assert run_parts(engine, parts)[0] == 5
    assert engine.batches == [(5, 4)]
    for part, out in zip(parts, expected, strict=True):
        np.testing.assert_allclose(part, out, rtol=1e-6)


def test_run_parts_prefers_the_engines_run_into() -> None:
    class IntoEngine(FakeEngine):
        def __init__(self) -> None:
            super().__init__(fixed_shapes=True)
            self.calls: list[tuple[list[np.ndarray], list[np.ndarray]]] = []

        def run_into(self, parts: Sequence[np.ndarray], outs: Sequence[np.ndarray]) -> int:
            self.calls.append((list(parts), list(outs)))
            for part, out in zip(parts, outs, strict=True):
                out[...] = fake_output(part)
            return 16

    engine = IntoEngine()
    parts = [sample(64, batch=2), sample(65, batch=1)]
    expected = [fake_output(p) for p in parts]
    assert run_parts(engine, parts)[0] == 16
    ((got_parts, got_outs),) = engine.calls
    assert all(a is b for a, b in zip(got_parts, got_outs, strict=True))  # answers replace the inputs in place
    assert engine.batches == []  # run() was not used
    for part, out in zip(parts, expected, strict=True):
        np.testing.assert_allclose(part, out, rtol=1e-6)


def test_a_job_bigger_than_every_bucket_does_not_hang_the_host() -> None:
    # Regression: run_parts raised StopIteration (pad_size finds no bucket) on the engine thread, which cannot
    # be set on an asyncio future: the scheduler waited forever and every worker hung.
    engine = FakeEngine(fixed_shapes=True, max_batch_size=8)
    x = sample(66, batch=10)  # RemoteEngine.run sends it in one piece: a region holds 64 rows at seq 4
    pool = ThreadPoolExecutor(1)  # not waited for on the way out: stopping the host frees a hung call
    try:
        with hosting(engine, max_batch_size=8) as host, remotes(host.path) as (remote,):
            big = pool.submit(remote.run, x)
            try:
                out = big.result(5.0)
            except RuntimeError:  # refusing it is fine too; hanging is not
                pass
            except TimeoutError:
                pytest.fail("the engine host never answered a batch of 10 with buckets up to 8")
            else:
                np.testing.assert_allclose(out, fake_output(x), rtol=1e-6)
            np.testing.assert_allclose(remote.run(sample(67)), fake_output(sample(67)), rtol=1e-6)
    finally:
        pool.shutdown(wait=False)


# --- observer and metrics --------------------------------------------------------------------------------------


def test_the_observer_sees_each_run_once_with_its_merged_size() -> None:
    engine, gate = gated()
    observer = RecordingObserver()
    with hosting(engine, 8, observer) as host, remotes(host.path, 3) as rs, ThreadPoolExecutor(3) as pool:
        first = hold_first(pool, engine, rs[0], sample(70))
        rest = queue_in_order(pool, [(rs[1], sample(71, batch=2)), (rs[2], marked(POISON, batch=1))])
        gate.open()
        first.result(TIMEOUT_S)
        for future in rest:
            with pytest.raises(RuntimeError):
                future.result(TIMEOUT_S)
    assert [(s.samples, s.padded, s.seq_len, s.failed) for s in observer.batches] == [
        (1, 1, 4, False),
        (3, 3, 4, True),
    ]
    assert all(s.queue_waits_s == () for s in observer.batches)  # workers record their requests' waits


def test_the_observer_is_told_the_host_is_alive_until_the_engine_breaks() -> None:
    observer = RecordingObserver()
    host = HostThread(FakeEngine(), 8, observer).start()
    try:
        with remotes(host.path) as (remote,):
            remote.run(sample(1))
            assert observer.alive == [True]  # encoder_batcher_alive: a min over processes, the host's included
            with pytest.raises(EngineUnrecoverable):
                remote.run(marked(FATAL))
        host.join()
    finally:
        host.stop()
    assert observer.alive == [True, False]


def test_host_metrics_count_samples_and_batches() -> None:
    engine = FakeEngine(fixed_shapes=True, max_batch_size=8)
    metrics = Metrics(multiprocess_mode=False)
    with hosting(engine, 8, metrics.observer(engine.buckets)) as host, remotes(host.path) as (remote,):
        remote.run(sample(80, batch=3))
        remote.run(sample(81, batch=1))
        with pytest.raises(RuntimeError):
            remote.run(marked(POISON, batch=2))
    text = metrics.render().decode()
    assert metric(text, "encoder_samples_processed_total") == 4
    assert metric(text, "encoder_padding_samples_total") == 1  # 3 ran as 4
    assert metric(text, "encoder_batch_size_count") == 3
    assert metric(text, "encoder_batch_failures_total") == 1
    assert metric(text, "encoder_inference_duration_seconds_count", batch_size="4") == 1
    assert metric(text, "encoder_queue_wait_seconds_count") == 0


def test_a_batches_false_observer_records_queue_waits_only() -> None:
    metrics = Metrics(multiprocess_mode=False)
    observer = metrics.observer((1, 2, 4), batches=False)
    observer.on_batch(BatchStats(3, 4, 16, 0.01, (0.001, 0.002)))
    observer.on_batch(BatchStats(1, 1, 16, 0.01, (0.003,), failed=True))
    text = metrics.render().decode()
    assert metric(text, "encoder_queue_wait_seconds_count") == 3
    assert metric(text, "encoder_batch_size_count") == 0
    assert metric(text, "encoder_samples_processed_total") == 0
    assert metric(text, "encoder_padding_samples_total") == 0
    assert metric(text, "encoder_batch_failures_total") == 0
    assert metric(text, "encoder_inference_duration_seconds_count", batch_size="4") == 0
    full = Metrics(multiprocess_mode=False)
    full.observer((1, 2, 4)).on_batch(BatchStats(3, 4, 16, 0.01, (0.001,)))
    text = full.render().decode()
    assert metric(text, "encoder_samples_processed_total") == 3 and metric(text, "encoder_batch_size_count") == 1


def test_info_offers_only_buckets_up_to_the_hosts_max_batch_size() -> None:
    host = EngineHost(FakeEngine(max_batch_size=8), max_batch_size=6)
    info = host.info()
    assert info["buckets"] == [1, 2, 4]
    assert (info["name"], info["dim"], info["dtype"], info["max_seq_len"]) == ("fake", 8, "float32", 64)
    assert EngineHost(FakeEngine(max_batch_size=8), max_batch_size=8).info()["buckets"] == [1, 2, 4, 8]


def test_replies_tell_workers_the_quickest_run_so_far() -> None:
    """Each worker's routing compares its runs with the engine's quickest (service/engine/routing.py), also a
    worker whose own runs were all long."""
    engine = FakeEngine(delay_s=0.01, sample_delay_s=0.01)
    with hosting(engine, max_batch_size=8) as host, remotes(host.path, 2) as (short, long):
        assert long.quickest_s == float("inf")  # nothing heard yet
        long.run(sample(1, batch=6))
        slow = long.quickest_s
        assert slow >= 0.07
        short.run(sample(2, batch=1))
        assert 0.02 <= short.quickest_s < slow
        long.run(sample(3, batch=6))
        assert long.quickest_s == short.quickest_s  # the other worker's short run
