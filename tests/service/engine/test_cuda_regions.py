"""The engine process's table of client CUDA regions (fake device layer): opened once per handle, bounds-checked
device rows, refused handles and limits, closed with the last reference."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest

from service.cudashm.fake import FakeCudaRegion, FakeDeviceMemory
from service.engine.cuda_regions import CudaRegionTable
from service.engine.regions import RegionRefused

F32 = np.dtype(np.float32)


@pytest.fixture
def allocation() -> Iterator[FakeCudaRegion]:
    region = FakeCudaRegion(4096)
    yield region
    region.free()


def test_a_handle_is_opened_once_and_closed_with_its_last_reference(allocation: FakeCudaRegion) -> None:
    device = FakeDeviceMemory()
    table = CudaRegionTable(device)
    first = table.open(allocation.handle, 4096)
    second = table.open(allocation.handle, 4096)  # another connection registers the same region
    assert first is second and device.opened == 1 and len(table) == 1 and table.total_bytes == 4096
    rows = first.rows(1024, (2, 4, 8), F32)
    assert rows.pointer == first.pointer + 1024 and rows.nbytes == 256 and rows.shape == (2, 4, 8)
    table.retain(first)  # a batch uses it
    table.release(first)
    table.release(second)
    assert device.opened == 1  # the batch still holds it
    table.release(first)
    assert device.opened == 0 and len(table) == 0


def test_rows_past_the_region_are_refused(allocation: FakeCudaRegion) -> None:
    region = CudaRegionTable(FakeDeviceMemory()).open(allocation.handle, 1024)
    with pytest.raises(ValueError, match="go past a CUDA region of 1024 bytes"):
        region.rows(1000, (1, 4, 8), F32)
    with pytest.raises(ValueError, match="go past"):
        region.rows(-4, (1, 1, 1), F32)


def test_refusals_leave_nothing_open(allocation: FakeCudaRegion) -> None:
    device = FakeDeviceMemory()
    table = CudaRegionTable(device, max_regions=1, max_bytes=1 << 20)
    with pytest.raises(RegionRefused, match="more than the allocation"):
        table.open(allocation.handle, 8192)
    with pytest.raises(RegionRefused, match="64-byte handle"):
        table.open(allocation.handle[:60], 64)
    with pytest.raises(RegionRefused, match="not a handle"):
        table.open(b"\1" * 64, 64)
    on_one = FakeCudaRegion(64, device=1)
    try:
        with pytest.raises(RegionRefused, match="device 1"):
            table.open(on_one.handle, 64)  # the engine process's GPU is its ordinal 0
    finally:
        on_one.free()
    table.open(allocation.handle, 4096)
    with pytest.raises(RegionRefused, match="limits"):
        table.open(allocation.handle, 64)  # another region: past max_regions
    stale = FakeCudaRegion(64)
    stale.free()
    table.max_regions, table.max_bytes = 8, 4096
    with pytest.raises(RegionRefused, match="limits"):
        table.open(stale.handle, 64)  # past max_bytes (4096 open already)
    table.max_bytes = 1 << 20
    with pytest.raises(RegionRefused, match="stale"):
        table.open(stale.handle, 64)
    assert device.opened == 1 and len(table) == 1
