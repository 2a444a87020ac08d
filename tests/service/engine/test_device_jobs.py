"""Device-to-device jobs (CUDA shared memory, service.engine.device_jobs) through a worker's batcher and a real
engine host with the fake CUDA layer: they are batched like every other request (merged frames, deadlines), one
request's NaN refuses only that request, and a region the engine process refuses comes back as RegionRefused."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import threading
import time
import weakref
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from service.batching import Batcher, BatcherConfig, DeadlineExceeded
from service.cudashm.fake import FakeCudaRegion, FakeDeviceMemory
from service.engine import ipc
from service.engine.cuda_regions import CudaRegionTable
from service.engine.device_jobs import DeviceJob, device_job
from service.engine.fake import FakeEngine, fake_output
from service.engine.regions import RegionRefused
from service.engine.remote import RemotePool
from service.errors import InvalidInput
from tests.service.engine.support import DIM, TIMEOUT_S, HostThread, hosting, sample, wait_until

pytestmark = pytest.mark.timeout(60)
SEQ = 4
F32 = np.dtype(np.float32)
ROW = SEQ * DIM * F32.itemsize  # bytes of one sample


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
    host's event loop with it) until :meth:`open`."""

    def __init__(self) -> None:
        self._closed, self._open = threading.Event(), threading.Event()
        self.held = threading.Event()

    def __call__(self, x: np.ndarray) -> bool:
        if self._closed.is_set():
            self.held.set()
            if not self._open.wait(TIMEOUT_S):
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


@contextlib.contextmanager
def pool_on(host: HostThread, cuda: bool = True) -> Iterator[RemotePool]:
    host.host.cuda_regions = CudaRegionTable(FakeDeviceMemory()) if cuda else None
    with contextlib.closing(RemotePool(host.path, 2)) as pool:
        yield pool


def job(source: Held, target: Held, first: int, rows: int) -> DeviceJob:
    return DeviceJob("0", (source, first * ROW), (target, first * ROW), (rows, SEQ, DIM), F32)


def test_a_job_is_cut_into_chunks_at_their_offsets_and_answers_through_a_stand_in() -> None:
    source, target = object(), object()
    whole = DeviceJob("1", (source, 64), (target, 0), (5, SEQ, DIM), F32)  # type: ignore[arg-type]
    chunk = whole[2:4]
    assert chunk.shape == (2, SEQ, DIM) and chunk.device == "1"
    assert chunk.source == (source, 64 + 2 * ROW) and chunk.target == (target, 2 * ROW)
    assert whole.output.shape == (5, SEQ, DIM) and whole.output.strides == (0, 0, 0)
    assert not whole.output.flags.writeable


def test_the_device_path_applies_only_to_an_engine_serving_that_gpu_in_its_dtype() -> None:
    class Serving:
        dtype = F32

        def serves_device(self, device: str) -> bool:
            return device == "0"

    at = (object(), 0)
    assert device_job(Serving(), "0", at, at, (1, SEQ, DIM), F32) is not None  # type: ignore[arg-type]
    assert device_job(Serving(), "1", at, at, (1, SEQ, DIM), F32) is None  # type: ignore[arg-type]
    assert device_job(Serving(), "0", at, at, (1, SEQ, DIM), np.dtype(np.float16)) is None  # type: ignore[arg-type]
    assert device_job(FakeEngine(), "0", at, at, (1, SEQ, DIM), F32) is None  # type: ignore[arg-type]


async def held_then_run(gate: Gate, batcher: Batcher, jobs: list[DeviceJob], deadline: float | None) -> list[Any]:
    """The first job alone, held in the engine; the others submitted meanwhile (they wait in the batcher); each
    job's result or exception once the gate opens."""
    gate.close()
    first = asyncio.ensure_future(batcher.submit(jobs[0]))
    await asyncio.to_thread(gate.held.wait, TIMEOUT_S)
    rest = [asyncio.ensure_future(batcher.submit(j, deadline)) for j in jobs[1:]]
    await asyncio.sleep(0.05)
    gate.open()
    return await asyncio.gather(first, *rest, return_exceptions=True)


def run_batched(pool: RemotePool, gate: Gate, jobs: list[DeviceJob], deadline_s: float | None = None) -> list[Any]:
    async def main() -> list[Any]:
        batcher = Batcher(pool, BatcherConfig(max_batch_size=8, max_delay_s=0.0, max_in_flight=1))
        batcher.start()
        try:
            deadline = None if deadline_s is None else time.monotonic() + deadline_s
            return await held_then_run(gate, batcher, jobs, deadline)
        finally:
            await batcher.stop()

    return asyncio.run(main())


def test_device_requests_wait_in_the_batcher_and_share_a_frame(
    regions: tuple[FakeCudaRegion, FakeCudaRegion], frames: list[int]
) -> None:
    inputs, outputs = regions
    x = sample(3, batch=8, seq=SEQ)
    inputs.write(x)
    gate = Gate()
    with hosting(FakeEngine(fail_if=gate), max_batch_size=8) as host, pool_on(host) as pool:
        source, target = Held(inputs), Held(outputs)
        answers = run_batched(pool, gate, [job(source, target, row, 1) for row in range(8)])
    assert not [a for a in answers if isinstance(a, BaseException)], answers
    assert frames == [1, 7]  # the first alone, the seven that waited meanwhile in one frame
    np.testing.assert_allclose(outputs.array(np.float32, x.shape), fake_output(x), rtol=1e-6)


def test_one_requests_bad_input_refuses_only_that_request(
    regions: tuple[FakeCudaRegion, FakeCudaRegion], frames: list[int]
) -> None:
    inputs, outputs = regions
    x = sample(4, batch=8, seq=SEQ)
    x[5, 1, 2] = np.nan
    inputs.write(x)
    gate = Gate()
    with hosting(FakeEngine(fail_if=gate), max_batch_size=8) as host, pool_on(host) as pool:
        source, target = Held(inputs), Held(outputs)
        answers = run_batched(pool, gate, [job(source, target, row, 1) for row in range(8)])
    assert isinstance(answers[5], InvalidInput) and "finite" in str(answers[5])
    good = [i for i in range(8) if i != 5]
    assert not [answers[i] for i in good if isinstance(answers[i], BaseException)], answers
    assert frames == [1, 7]  # the refused request was batched with others, which were answered all the same
    np.testing.assert_allclose(outputs.array(np.float32, x.shape)[good], fake_output(x[good]), rtol=1e-6)


def test_a_device_request_past_its_deadline_in_the_queue_is_dropped(
    regions: tuple[FakeCudaRegion, FakeCudaRegion], frames: list[int]
) -> None:
    inputs, outputs = regions
    inputs.write(sample(5, batch=2, seq=SEQ))
    gate = Gate()
    with hosting(FakeEngine(fail_if=gate), max_batch_size=8) as host, pool_on(host) as pool:
        source, target = Held(inputs), Held(outputs)
        answers = run_batched(pool, gate, [job(source, target, 0, 1), job(source, target, 1, 1)], deadline_s=0.01)
    assert not isinstance(answers[0], BaseException) and isinstance(answers[1], DeadlineExceeded)
    assert frames == [1]  # the late one never reached the engine


def test_a_region_the_engine_process_refuses_comes_back_refused_and_arrays_beside_it_are_answered(
    regions: tuple[FakeCudaRegion, FakeCudaRegion],
) -> None:
    inputs, outputs = regions
    inputs.write(sample(6, batch=2, seq=SEQ))
    x = sample(7, batch=2, seq=SEQ)
    with hosting(FakeEngine()) as host, pool_on(host, cuda=False) as pool:
        answers, _ = pool.run_placed([job(Held(inputs), Held(outputs), 0, 2), x.copy()])
    assert isinstance(answers[0], RegionRefused)
    np.testing.assert_allclose(answers[1], fake_output(x), rtol=1e-6)  # type: ignore[arg-type]


def test_device_jobs_and_arrays_share_one_frame(
    regions: tuple[FakeCudaRegion, FakeCudaRegion], frames: list[int]
) -> None:
    inputs, outputs = regions
    x, y = sample(8, batch=3, seq=SEQ), sample(9, batch=2, seq=SEQ)
    inputs.write(x)
    with hosting(FakeEngine()) as host, pool_on(host) as pool:
        answers, _ = pool.run_placed([job(Held(inputs), Held(outputs), 0, 3), y.copy()])
        assert answers[0].shape == (3, SEQ, DIM)  # type: ignore[union-attr]
        np.testing.assert_allclose(answers[1], fake_output(y), rtol=1e-6)  # type: ignore[arg-type]
    assert frames == [2]
    np.testing.assert_allclose(outputs.array(np.float32, x.shape), fake_output(x), rtol=1e-6)


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
            answers, _ = pool.run_placed([job(source, target, 0, 1)])
            assert isinstance(answers[0], InvalidInput)
            del source, target, answers
            assert alive() is None
        finally:
            gc.enable()
        wait_until(lambda: host.host.cuda_regions is not None and len(host.host.cuda_regions) == 0, "unregistered")
