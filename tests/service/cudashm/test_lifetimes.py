"""Repeated register/unregister cycles leave nothing behind: no open handle, descriptor or mapping."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from service.cudashm import CudaSharedMemory
from service.cudashm.fake import FakeDeviceMemory
from service.errors import InvalidInput
from service.oip.types import SharedMemoryRef
from tests.service.cudashm.conftest import MakeRegion
from tests.service.shm.support import fds_to, mapped_lines

F32 = np.dtype(np.float32)


def cycle(registry: CudaSharedMemory, other: CudaSharedMemory, handle: bytes, i: int) -> None:
    name = f"cycle-{i % 7}"
    registry.register(name, handle, 0, 4096)
    for cuda in (registry, other):  # the registering worker and another one, which opens it at first use
        lease = cuda.lease(SharedMemoryRef(name, 0, 64), F32, (16,))
        assert lease is not None
        lease.write(np.full(16, i, np.float32))
        assert lease.read(F32, (16,))[0] == i
        lease.release()
        with pytest.raises(InvalidInput):
            cuda.lease(SharedMemoryRef(name, 4090, 64), F32, (16,))  # past the region: refused, nothing held
    held = other.lease(SharedMemoryRef(name, 64, 64), F32, (16,))
    assert held is not None
    registry.unregister() if i % 2 else registry.unregister(name)
    held.release()  # released after the unregistration: closed now


def test_200_register_unregister_cycles_leak_no_handle_descriptor_or_mapping(
    registry: CudaSharedMemory, registry_dir: Path, make_region: MakeRegion, device: FakeDeviceMemory
) -> None:
    other_device = FakeDeviceMemory()
    other = CudaSharedMemory(other_device, {0: 0}, registry_dir)
    region = make_region(4096)
    cycle(registry, other, region.handle, 0)
    other.status()
    # Descriptors on shared memory (the fake device layer maps the client's allocation) and on the registry's
    # files: the ones a cycle could leak. All of the process's once counted others, closed meanwhile (18 vs 24).
    places = ("/dev/shm", str(registry_dir))
    fds, maps = fds_to(*places), mapped_lines(region.path)
    for i in range(1, 201):
        cycle(registry, other, region.handle, i)
    other._sweep()  # the other worker's periodic sweep, now
    assert registry.status() == [] and device.opened == 0 and other_device.opened == 0
    assert registry.opened == 0 and other.opened == 0
    assert fds_to(*places) == fds
    assert mapped_lines(region.path) == maps == 1  # the client's own mapping only
    other.close()
