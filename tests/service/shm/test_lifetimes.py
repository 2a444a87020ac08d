"""Mappings and descriptors: unregistering under a request in flight is safe, and nothing leaks."""

from __future__ import annotations

import gc
from pathlib import Path

import numpy as np

from service.oip.types import SharedMemoryRef
from service.shm import SystemSharedMemory
from tests.service.shm.conftest import MakeShm
from tests.service.shm.support import mapped_lines, open_fds

F32 = np.dtype("<f4")


def test_unregistering_while_a_request_holds_views_keeps_them_valid_until_they_go(
    registry: SystemSharedMemory, make_shm: MakeShm
) -> None:
    obj = make_shm(8192)
    obj.write(np.arange(4, dtype=F32))
    registry.register("r", obj.key, 0, 8192)
    inputs = registry.input_array(SharedMemoryRef("r", 0, 16), F32, (4,))
    outputs = registry.output_array(SharedMemoryRef("r", 4096, 16), F32, (4,))
    assert mapped_lines(obj.path) == 2  # ours and the client's (the test's own mapping)

    registry.unregister("r")  # a request is still computing with the views
    assert registry.mapped == 0
    np.testing.assert_array_equal(inputs, np.arange(4))
    outputs[...] = inputs * 2  # the answer still lands in the client's memory
    np.testing.assert_array_equal(obj.array(F32, (4,), offset=4096), [0, 2, 4, 6])
    assert mapped_lines(obj.path) == 2

    del inputs, outputs  # the request is done: the mapping goes with its last view
    gc.collect()
    assert mapped_lines(obj.path) == 1  # only the client's own


def test_closing_the_registry_under_views_keeps_them_valid(make_shm: MakeShm) -> None:
    shm = SystemSharedMemory()
    obj = make_shm(4096)
    obj.write(np.ones(4, F32))
    shm.register("r", obj.key, 0, 4096)
    view = shm.input_array(SharedMemoryRef("r", 0, 16), F32, (4,))
    shm.close()
    np.testing.assert_array_equal(view, np.ones(4))


def cycle(registry: SystemSharedMemory, other: SystemSharedMemory, obj_key: str, i: int) -> None:
    """One client session: register through one worker, use and fail through both, unregister through one."""
    name = f"r{i % 3}"
    registry.register(name, obj_key, 4096 * (i % 2), 4096)
    for shm in (registry, other):
        shm.input_array(SharedMemoryRef(name, 0, 64), F32, (16,)).sum()
        shm.output_array(SharedMemoryRef(name, 64, 64), F32, (16,))[...] = i
        try:
            shm.input_array(SharedMemoryRef(name, 4090, 64), F32, (16,))  # past the region: refused
        except Exception as exc:
            assert "past the end" in str(exc)
    (other if i % 2 else registry).unregister(name)
    if i % 7 == 0:
        registry.register("left-over", obj_key, 0, 64)
        other.unregister()  # unregister everything


def test_repeated_cycles_leak_no_mapping_and_no_descriptor(
    registry: SystemSharedMemory, registry_dir: Path, make_shm: MakeShm
) -> None:
    other = SystemSharedMemory(registry_dir, max_regions=8, max_bytes=1 << 20)
    obj = make_shm(8192)
    for i in range(20):  # warm up: lazily created caches, the lock file
        cycle(registry, other, obj.key, i)
    registry.unregister()
    registry.status(), other.status()  # both sweep what is no longer registered
    gc.collect()
    maps, fds = mapped_lines(obj.path), open_fds()
    assert maps == 1  # the client's own mapping only

    for i in range(500):
        cycle(registry, other, obj.key, i)
    registry.unregister()
    registry.status(), other.status()
    gc.collect()
    assert mapped_lines(obj.path) == maps
    assert open_fds() == fds
    other.close()


def test_failed_registrations_leak_nothing(registry: SystemSharedMemory, make_shm: MakeShm) -> None:
    obj = make_shm(4096)
    registry.register("taken", obj.key, 0, 64)
    gc.collect()
    maps, fds = mapped_lines(obj.path), open_fds()
    for _ in range(200):
        for name, offset, size in (("taken", 0, 64), ("past", 0, 8192), ("big", 0, 1 << 21)):
            try:
                registry.register(name, obj.key, offset, size)
            except Exception as exc:
                assert type(exc).__name__ in ("Conflict", "InvalidInput", "LimitExceeded")
    gc.collect()
    assert (mapped_lines(obj.path), open_fds()) == (maps, fds)
