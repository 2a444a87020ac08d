"""Reading a batch frame into a job (service.engine.jobs.read_job): where the values of CUDA-region parts are checked
for NaN/Inf. With an engine whose batches flag device rows (the graph's flags output) they are flagged with the
batch, no check of their own; without it each part is checked as the frame is read, and only its part refused."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from converter.device_rows import DeviceRows
from service.engine import ipc
from service.engine.cuda_regions import CudaRegion
from service.engine.jobs import Job, read_job, refused_parts

DIM, SEQ = 8, 4
F32 = np.dtype(np.float32)


class Engine:
    dim, max_seq_len, dtype = DIM, 16, F32

    def __init__(self, flags_device_rows: bool) -> None:
        self.flags_device_rows = flags_device_rows


class Worker:
    """A connection with two CUDA regions registered (ids 1 and 2), on the device (not host-visible)."""

    def __init__(self) -> None:
        self.regions: dict[int, Any] = {
            1: CudaRegion(b"i" * 64, 1 << 20, 1 << 16),
            2: CudaRegion(b"o" * 64, 2 << 20, 1 << 16),
        }

    def view(self, region: int, offset: int, shape: tuple[int, int, int], dtype: np.dtype[Any]) -> Any:
        return self.regions[region].view(offset, shape, dtype)


def frame(rows: list[int]) -> bytes:
    row_bytes = SEQ * DIM * F32.itemsize
    parts = [(n, 1, k * 4 * row_bytes, 2, k * 4 * row_bytes) for k, n in enumerate(rows)]
    return ipc.batch_frame(7, SEQ, parts)[ipc.HEADER.size :]


def read(flags: bool, bad: set[int]) -> tuple[Job, list[int]]:
    seen: list[int] = []

    def check(part: Any) -> bool:
        assert isinstance(part, DeviceRows)
        seen.append(part.pointer)
        return len(seen) - 1 not in bad

    return read_job(Worker(), 7, frame([1, 2, 1]), Engine(flags), check), seen  # type: ignore[arg-type]


def test_an_engine_flagging_device_rows_checks_them_with_the_batch() -> None:
    job, seen = read(flags=True, bad={1})
    assert seen == [] and job.refused == [] and job.checked == [True, True, True]
    finite = np.array([True, True, False, True])  # the batch's flags: a row of part 1 holds a NaN
    assert refused_parts([job], finite) == [[1]]


def test_without_flags_each_device_part_is_checked_as_read_and_refused_alone() -> None:
    job, seen = read(flags=False, bad={1})
    assert len(seen) == 3 and job.refused == [1] and job.checked == [False, False, False]
    assert not job.all_refused
    assert refused_parts([job], None) == [[1]]
    every, _ = read(flags=False, bad={0, 1, 2})
    assert every.all_refused  # answered at once, nothing computed


@pytest.mark.parametrize("flags", [False, True])
def test_parts_are_views_of_their_regions(flags: bool) -> None:
    job, _ = read(flags, set())
    assert [int(p.shape[0]) for p in job.parts] == [1, 2, 1] and job.samples == 4
    assert all(isinstance(p, DeviceRows) for p in (*job.parts, *job.outs))
