from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from service.shm import SystemSharedMemory
from tests.service.shm.support import ShmObject

MakeShm = Callable[..., ShmObject]


@pytest.fixture
def make_shm() -> Iterator[MakeShm]:
    """Makes client shared-memory objects (``make_shm(size)``), every one removed after the test."""
    made: list[ShmObject] = []

    def make(size: int, key: str | None = None) -> ShmObject:
        made.append(ShmObject(size, key))
        return made[-1]

    yield make
    for obj in made:
        obj.destroy()


@pytest.fixture
def registry_dir(tmp_path: Path) -> Path:
    path = tmp_path / "registry"
    path.mkdir(mode=0o700)
    return path


@pytest.fixture
def registry(registry_dir: Path) -> Iterator[SystemSharedMemory]:
    shm = SystemSharedMemory(registry_dir, max_regions=8, max_bytes=1 << 20)
    yield shm
    shm.close()
