"""Device-to-device requests of one worker merged into shared batch frames (service.engine.device_merge), through
a real engine host with the fake CUDA layer: requests waiting for a connection go out together, not one by one."""

from __future__ import annotations

import contextlib
import gc
import threading
import weakref
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest

from service.cudashm.fake import FakeCudaRegion, FakeDeviceMemory
from service.engine import ipc
from service.engine.cuda_regions import CudaRegionTable
from service.engine.device_merge import DeviceMerger, DevicePart
from service.engine.fake import FakeEngine, fake_output
from service.engine.remote import RemotePool
from service.errors import InvalidInput
from tests.service.engine.support import DIM, TIMEOUT_S, HostThread, hosting, remotes, sample, wait_until

pytestmark = pytest.mark.timeout(60)
SEQ = 4
ROW = SEQ * DIM * 4  # bytes of one float32 sample


@pytest.fixture
def regions() -> Iterator[tuple[FakeCudaRegion, FakeCudaRegion]]:
    inputs, outputs = FakeCudaRegion(16 * ROW), FakeCudaRegion(16 * ROW)
    yield inputs, outputs
    inputs.free()
    outputs.free()


@pytest.fixture
def frames(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Parts of every batch frame the workers send."""
    sent: list[int] = []
    original = ipc.batch_frame

    def counting(sequence: int, seq: int, parts: list[ipc.Part]) -> bytes:
        sent.append(len(parts))
        return original(sequence, seq, parts)

    monkeypatch.setattr(ipc, "batch_frame", counting)
    return sent


class Gate:
    """A FakeEngine ``fail_if`` that lets batches through until :meth:`close`, then holds the next one (and the
    host's event loop with it: frames sent meanwhile wait in the sockets) until :meth:`open`."""

    def __init__(self) -> None:
        self._closed, self._open = threading.Event(), threading.Event()

    def __call__(self, x: np.ndarray) -> bool:
        if self._closed.is_set() and not self._open.wait(TIMEOUT_S):
            raise AssertionError("the gate was never opened")
        return False

    def close(self) -> None:
        self._closed.set()

    def open(self) -> None:
        self._open.set()


class Held:
    """A client CUDA region as a worker holds it (a DeviceRegion): its handle and size."""

    def __init__(self, region: FakeCudaRegion) -> None:
        self.handle, self.byte_size = region.handle, region.size


def pool_on(host: HostThread) -> contextlib.closing[RemotePool]:
    host.host.cuda_regions = CudaRegionTable(FakeDeviceMemory())
    return contextlib.closing(RemotePool(host.path, 2))


def held_then_run(
    engine: FakeEngine, gate: Gate, host: HostThread, pool: RemotePool, rows: list[int], warm: Any, frames: list[int]
) -> tuple[list[Any], list[int]]:
    """Each row of ``rows`` as its own one-sample request of ``pool``, sent while another worker's batch holds
    the engine (``gate``); the answers (engine seconds, or the exception) once the gate opens, and the parts of
    each frame the pool sent for them."""
    with remotes(host.path) as (blocker,), ThreadPoolExecutor(len(rows) + 1) as threads:
        for channel in pool.channels:  # each connection registers the regions before the engine is held
            channel.run_device(*warm)
        gate.close()
        held = threads.submit(blocker.run, sample(10))
        wait_until(lambda: len(engine.batches) == 1 + len(pool.channels), "the blocking batch to reach the engine")
        merger = pool.device_merger
        start, mark = merger.parts, len(frames)
        futures = [threads.submit(pool.run_device, *part(warm, row)) for row in rows]
        wait_until(lambda: merger.parts == start + len(rows), "every request to wait for the engine")
        gate.open()
        held.result(timeout=30)
        return [f.exception(timeout=30) or f.result() for f in futures], frames[mark:]


def part(warm: Any, row: int) -> tuple[Any, ...]:
    (source, _), (target, _), _, seq = warm
    return (source, row * ROW), (target, row * ROW), 1, seq


def test_waiting_device_requests_of_a_worker_share_frames(
    regions: tuple[FakeCudaRegion, FakeCudaRegion], frames: list[int]
) -> None:
    inputs, outputs = regions
    x = sample(3, batch=8, seq=SEQ)
    inputs.write(x)
    gate = Gate()
    engine = FakeEngine(fail_if=gate)
    with hosting(engine, max_batch_size=8) as host, pool_on(host) as pool:
        warm = ((Held(inputs), 0), (Held(outputs), 0), 1, SEQ)
        answers, sent = held_then_run(engine, gate, host, pool, list(range(8)), warm, frames)
        assert all(isinstance(a, float) for a in answers), answers
        # Two frames went while the engine was held (one per connection); the other requests then went in one.
        assert len(sent) == 3 and sum(sent) == 8, sent
    np.testing.assert_allclose(outputs.array(np.float32, x.shape), fake_output(x), rtol=1e-6)


def test_one_requests_bad_input_refuses_only_that_request(
    regions: tuple[FakeCudaRegion, FakeCudaRegion], frames: list[int]
) -> None:
    inputs, outputs = regions
    x = sample(4, batch=8, seq=SEQ)
    x[5, 1, 2] = np.nan
    inputs.write(x)
    gate = Gate()
    engine = FakeEngine(fail_if=gate)
    with hosting(engine, max_batch_size=8) as host, pool_on(host) as pool:
        warm = ((Held(inputs), 0), (Held(outputs), 0), 1, SEQ)
        answers, sent = held_then_run(engine, gate, host, pool, list(range(8)), warm, frames)
    assert isinstance(answers[5], InvalidInput) and "finite" in str(answers[5])
    good = [i for i in range(8) if i != 5]
    assert all(isinstance(answers[i], float) for i in good), answers
    assert max(sent) > 1  # the refused request was merged with others, which were answered all the same
    np.testing.assert_allclose(outputs.array(np.float32, x.shape)[good], fake_output(x[good]), rtol=1e-6)


def test_a_frame_holds_one_sequence_length_and_at_most_the_largest_batch() -> None:
    sent: list[tuple[int, list[int]]] = []
    release = threading.Event()

    def send(seq: int, parts: Any) -> list[float | Exception]:
        sent.append((seq, [p.rows for p in parts]))
        release.wait(10)
        return [0.5] * len(parts)

    merger = DeviceMerger(send, slots=1, max_rows=4)
    with ThreadPoolExecutor(6) as threads:
        futures = [threads.submit(merger.run, DevicePart(None, None, 3), 8)]  # type: ignore[arg-type]
        wait_until(lambda: merger.frames == 1, "the first frame")
        for seq, rows in [(16, 1), (8, 3), (8, 2), (16, 2)]:  # all waiting while the first frame computes
            futures.append(threads.submit(merger.run, DevicePart(None, None, rows), seq))  # type: ignore[arg-type]
        wait_until(lambda: merger.parts == 5, "every request to wait")
        release.set()
        assert [f.result(timeout=10) for f in futures] == [0.5] * 5
    assert sent[0] == (8, [3])
    # Then (whichever waiting request takes the free slot first): the two of seq 16 in one frame; seq 8 has
    # 3 + 2 rows, more than 4: two frames.
    assert sorted((seq, sorted(rows)) for seq, rows in sent[1:]) == [(8, [2]), (8, [3]), (16, [1, 2])]


def test_an_error_of_the_connection_reaches_every_part_of_the_frame() -> None:
    def send(seq: int, parts: Any) -> list[float | Exception]:
        raise ConnectionError("gone")

    merger = DeviceMerger(send, slots=1, max_rows=4)
    with pytest.raises(ConnectionError):
        merger.run(DevicePart(None, None, 1), 8)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        DeviceMerger(send, slots=0, max_rows=4)


def test_a_refused_request_leaves_no_cycle_holding_its_regions(regions: tuple[FakeCudaRegion, FakeCudaRegion]) -> None:
    # The engine process unregisters a region once the worker's region object is garbage: a reference cycle
    # through the error's traceback would keep it open until a garbage collection, maybe never in an idle worker.
    inputs, outputs = regions
    x = sample(6, seq=SEQ)
    x[0, 1, 2] = np.inf
    inputs.write(x)
    with hosting(FakeEngine()) as host, pool_on(host) as pool:
        source, target = Held(inputs), Held(outputs)
        alive = weakref.ref(source)
        gc.disable()
        try:
            with pytest.raises(InvalidInput):
                pool.run_device((source, 0), (target, 0), 1, SEQ)
            del source, target
            assert alive() is None
        finally:
            gc.enable()
