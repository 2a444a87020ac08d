from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from service.cudashm import CudaSharedMemory
from service.cudashm.fake import FakeCudaRegion, FakeDeviceMemory

# System shared-memory objects too, for requests that mix both kinds.
from tests.service.shm.conftest import make_shm

__all__ = ["make_shm"]

MakeRegion = Callable[..., FakeCudaRegion]


@pytest.fixture
def make_region() -> Iterator[MakeRegion]:
    """Fake client CUDA allocations (``make_region(size, device=0)``), every one freed after the test."""
    made: list[FakeCudaRegion] = []

    def make(size: int, device: int = 0) -> FakeCudaRegion:
        made.append(FakeCudaRegion(size, device))
        return made[-1]

    yield make
    for region in made:
        region.free()


@pytest.fixture
def device() -> FakeDeviceMemory:
    return FakeDeviceMemory(devices=2)


@pytest.fixture
def registry_dir(tmp_path: Path) -> Path:
    path = tmp_path / "cuda"
    path.mkdir(mode=0o700)
    return path


@pytest.fixture
def registry(registry_dir: Path, device: FakeDeviceMemory) -> Iterator[CudaSharedMemory]:
    cuda = CudaSharedMemory(device, {0: 0, 1: 1}, registry_dir, max_regions=8, max_bytes=1 << 20)
    yield cuda
    cuda.close()
