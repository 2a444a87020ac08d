"""Several workers: two registries over one directory behave as one registry (what uvicorn workers share)."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from service.errors import Conflict, LimitExceeded, NotFound
from service.oip.types import SharedMemoryRef
from service.shm import SystemSharedMemory
from service.shm import registry as registry_module
from tests.service.shm.conftest import MakeShm

F32 = np.dtype("<f4")
REF = SharedMemoryRef("r", 0, 16)


@pytest.fixture
def other(registry_dir: Path) -> Iterator[SystemSharedMemory]:
    """A second worker's registry on the same directory."""
    shm = SystemSharedMemory(registry_dir, max_regions=8, max_bytes=1 << 20)
    yield shm
    shm.close()


def test_a_region_registered_in_one_worker_serves_another_and_status_lists_it_once(
    registry: SystemSharedMemory, other: SystemSharedMemory, make_shm: MakeShm
) -> None:
    obj = make_shm(4096)
    obj.write(np.array([1, 2, 3, 4], F32))
    registry.register("r", obj.key, 0, 4096)
    assert other.status() == registry.status() == [{"name": "r", "key": obj.key, "offset": 0, "byte_size": 4096}]
    assert other.mapped == 0  # mapped lazily, at its first use there
    np.testing.assert_array_equal(other.input_array(REF, F32, (4,)), [1, 2, 3, 4])
    other.output_array(SharedMemoryRef("r", 16, 8), F32, (2,))[...] = [7, 8]
    np.testing.assert_array_equal(registry.input_array(SharedMemoryRef("r", 16, 8), F32, (2,)), [7, 8])


def test_unregister_in_one_worker_is_seen_by_the_other(
    registry: SystemSharedMemory, other: SystemSharedMemory, make_shm: MakeShm
) -> None:
    obj = make_shm(4096)
    registry.register("r", obj.key, 0, 4096)
    other.input_array(REF, F32, (4,))
    registry.unregister("r")
    with pytest.raises(NotFound):
        other.input_array(REF, F32, (4,))
    assert other.mapped == 0  # its mapping went on that first use
    other.register("r", obj.key, 0, 64)  # the name is free in every worker
    assert registry.status("r")[0]["byte_size"] == 64


def test_a_worker_drops_mappings_of_regions_unregistered_elsewhere_without_using_them(
    registry: SystemSharedMemory, other: SystemSharedMemory, make_shm: MakeShm, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(registry_module, "SWEEP_S", 0.0)  # sweep on every request (normally once a second)
    monkeypatch.setattr(other, "_next_sweep", 0.0)
    obj_a, obj_b = make_shm(4096), make_shm(4096)
    registry.register("a", obj_a.key, 0, 64)
    registry.register("b", obj_b.key, 0, 64)
    other.input_array(SharedMemoryRef("a", 0, 16), F32, (4,))
    other.input_array(SharedMemoryRef("b", 0, 16), F32, (4,))
    registry.unregister("a")
    other.input_array(SharedMemoryRef("b", 0, 16), F32, (4,))  # a request for b sweeps away a
    assert other.mapped == 1


def test_registering_the_same_name_again_is_a_new_registration_everywhere(
    registry: SystemSharedMemory, other: SystemSharedMemory, make_shm: MakeShm
) -> None:
    first, second = make_shm(4096), make_shm(4096)
    first.write(np.full(4, 1.0, F32))
    second.write(np.full(4, 2.0, F32))
    registry.register("r", first.key, 0, 64)
    assert other.input_array(REF, F32, (4,))[0] == 1.0
    registry.unregister("r")
    registry.register("r", second.key, 0, 64)  # in the same instant: told apart by the record's token
    assert other.input_array(REF, F32, (4,))[0] == 2.0


def test_a_duplicate_through_another_worker_is_a_conflict(
    registry: SystemSharedMemory, other: SystemSharedMemory, make_shm: MakeShm
) -> None:
    obj = make_shm(64)
    registry.register("r", obj.key, 0, 64)
    with pytest.raises(Conflict, match="already registered"):
        other.register("r", obj.key, 0, 64)


def test_limits_hold_across_workers(registry: SystemSharedMemory, other: SystemSharedMemory, make_shm: MakeShm) -> None:
    obj = make_shm(1 << 20)
    registry.register("half", obj.key, 0, 1 << 19)
    other.register("other-half", obj.key, 0, 1 << 19)
    with pytest.raises(LimitExceeded):
        registry.register("one-more", obj.key, 0, 1)


def test_racing_registrations_of_one_name_admit_exactly_one(registry_dir: Path, make_shm: MakeShm) -> None:
    obj = make_shm(4096)
    workers = [SystemSharedMemory(registry_dir, max_regions=100, max_bytes=1 << 30) for _ in range(4)]
    outcomes: list[str] = []
    start = threading.Barrier(len(workers) * 5)

    def attempt(shm: SystemSharedMemory, i: int) -> None:
        start.wait()
        try:
            shm.register("contested", obj.key, 0, 64)
            outcomes.append("ok")
        except Conflict:
            outcomes.append("conflict")
        shm.register(f"own-{id(shm)}-{i}", obj.key, 0, 64)

    threads = [threading.Thread(target=attempt, args=(w, i)) for w in workers for i in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == ["conflict"] * 19 + ["ok"]
    assert len(workers[0].status()) == 21
    for w in workers:
        w.close()


def test_an_object_replaced_under_its_key_is_refused_by_workers_that_had_not_mapped_it(
    registry: SystemSharedMemory, other: SystemSharedMemory, make_shm: MakeShm
) -> None:
    obj = make_shm(4096)
    registry.register("r", obj.key, 0, 64)
    os.unlink(obj.path)  # the client destroys it and makes a new object under the same key
    make_shm(4096, key=obj.name)
    with pytest.raises(Conflict, match="was replaced after region 'r' was registered"):
        other.input_array(REF, F32, (4,))


def test_an_object_removed_after_registration_is_not_found_in_workers_that_had_not_mapped_it(
    registry: SystemSharedMemory, other: SystemSharedMemory, make_shm: MakeShm
) -> None:
    obj = make_shm(4096)
    registry.register("r", obj.key, 0, 64)
    os.unlink(obj.path)
    registry.input_array(REF, F32, (4,))  # mapped here: the memory lives while the region is registered
    with pytest.raises(NotFound, match="no longer exists"):
        other.input_array(REF, F32, (4,))


def test_the_registry_directory_removed_under_a_worker_is_recreated(
    registry: SystemSharedMemory, make_shm: MakeShm
) -> None:
    obj = make_shm(64)
    for entry in registry.records.path.iterdir():
        entry.unlink()
    registry.records.path.rmdir()
    assert registry.status() == []
    registry.register("r", obj.key, 0, 64)
    assert len(registry.status()) == 1
