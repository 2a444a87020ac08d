"""The CUDA shared-memory registry on the fake device layer: register, status, unregister, every refusal, leases."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from service.cudashm import CudaSharedMemory
from service.cudashm.device import HandleError
from service.cudashm.fake import FakeDeviceMemory, fake_handle
from service.errors import Conflict, InvalidInput, LimitExceeded, NotFound
from service.oip.types import SharedMemoryRef
from tests.service.cudashm.conftest import MakeRegion

F32 = np.dtype(np.float32)


def test_register_status_copy_in_and_out_and_unregister(
    registry: CudaSharedMemory, make_region: MakeRegion, device: FakeDeviceMemory
) -> None:
    region = make_region(4096)
    values = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    region.write(values, offset=64)
    registry.register("r", region.handle, 0, 4096)
    assert registry.status() == [{"name": "r", "device_id": 0, "byte_size": 4096}]
    assert registry.status("r") == registry.status()
    assert device.opened == 1  # opened once, at registration

    lease = registry.lease(SharedMemoryRef("r", 64, values.nbytes), F32, (2, 3, 4))
    assert lease is not None
    np.testing.assert_array_equal(lease.read(F32, (2, 3, 4)), values)
    lease.write(values * 2)
    np.testing.assert_array_equal(region.array(F32, (2, 3, 4), offset=64), values * 2)
    lease.release()
    lease.release()  # idempotent

    registry.unregister("r")
    assert registry.status() == [] and device.opened == 0
    with pytest.raises(NotFound, match="no CUDA shared-memory region 'r'"):
        registry.status("r")


def test_a_name_that_is_no_cuda_region_is_left_to_system_shared_memory(registry: CudaSharedMemory) -> None:
    assert registry.lease(SharedMemoryRef("nothing", 0, 16), F32, (4,)) is None


def test_the_handle_is_bytes_or_base64_of_64_bytes(registry: CudaSharedMemory, make_region: MakeRegion) -> None:
    region = make_region(256)
    registry.register("b64", base64.b64encode(region.handle).decode(), 0, 256)
    assert [r["name"] for r in registry.status()] == ["b64"]
    with pytest.raises(InvalidInput, match="64 bytes"):
        registry.register("short", region.handle[:63], 0, 256)
    with pytest.raises(InvalidInput, match="64 bytes"):
        registry.register("long", region.handle + b"\0", 0, 256)
    with pytest.raises(InvalidInput, match="not base64"):
        registry.register("text", "not base64!", 0, 256)
    with pytest.raises(InvalidInput, match="the handle's bytes"):
        registry.register("number", 12, 0, 256)
    with pytest.raises(HandleError, match="not a handle"):
        registry.register("garbage", b"\x01" * 64, 0, 256)
    assert [r["name"] for r in registry.status()] == ["b64"]


def test_a_stale_handle_is_refused_at_registration(registry: CudaSharedMemory, make_region: MakeRegion) -> None:
    region = make_region(256)
    region.free()  # as the client's cudaFree, or its process exiting
    with pytest.raises(HandleError, match="stale"):
        registry.register("gone", region.handle, 0, 256)
    assert registry.status() == []


@pytest.mark.parametrize(
    ("device_id", "message"),
    [(2, "not a device this service serves"), (-1, "at least 0"), (True, "at least 0"), ("0", "at least 0")],
)
def test_device_ids_the_service_does_not_serve(
    registry: CudaSharedMemory, make_region: MakeRegion, device_id: Any, message: str
) -> None:
    with pytest.raises(InvalidInput, match=message):
        registry.register("r", make_region(256).handle, device_id, 256)


def test_a_handle_for_another_device_is_refused(
    registry: CudaSharedMemory, make_region: MakeRegion, device: FakeDeviceMemory
) -> None:
    on_one = make_region(256, device=1)
    with pytest.raises(InvalidInput, match="is for device 1, not device_id 0"):
        registry.register("r", on_one.handle, 0, 256)
    assert device.opened == 0
    registry.register("r", on_one.handle, 1, 256)
    assert registry.status() == [{"name": "r", "device_id": 1, "byte_size": 256}]


@pytest.mark.parametrize(
    ("byte_size", "error", "message"),
    [
        (0, InvalidInput, "at least 1"),
        (-4, InvalidInput, "at least 1"),
        (1.5, InvalidInput, "at least 1"),
        (257, InvalidInput, "larger than the CUDA allocation"),
        (2 << 20, LimitExceeded, "over the limit"),
    ],
)
def test_byte_sizes(
    registry: CudaSharedMemory,
    make_region: MakeRegion,
    device: FakeDeviceMemory,
    byte_size: Any,
    error: type,
    message: str,
) -> None:
    with pytest.raises(error, match=message):
        registry.register("r", make_region(256).handle, 0, byte_size)
    assert registry.status() == [] and device.opened == 0


def test_duplicate_names_and_the_other_kinds_names_are_conflicts(
    registry_dir: Path, device: FakeDeviceMemory, make_region: MakeRegion
) -> None:
    system_names = {"sys"}
    cuda = CudaSharedMemory(device, {0: 0}, registry_dir, other_kind=system_names.__contains__)
    try:
        region = make_region(256)
        cuda.register("r", region.handle, 0, 256)
        with pytest.raises(Conflict, match="already registered"):
            cuda.register("r", region.handle, 0, 128)
        with pytest.raises(Conflict, match="already registered"):
            cuda.register("sys", region.handle, 0, 128)
        assert cuda.status() == [{"name": "r", "device_id": 0, "byte_size": 256}]
        assert device.opened == 1  # the refused registrations closed what they opened
    finally:
        cuda.close()


def test_the_count_and_byte_limits_count_cuda_regions(
    registry_dir: Path, device: FakeDeviceMemory, make_region: MakeRegion
) -> None:
    cuda = CudaSharedMemory(device, {0: 0}, registry_dir, max_regions=2, max_bytes=1000)
    try:
        region = make_region(1024)
        cuda.register("a", region.handle, 0, 600)
        with pytest.raises(LimitExceeded, match="600 bytes of CUDA shared memory are registered"):
            cuda.register("b", region.handle, 0, 401)
        cuda.register("b", region.handle, 0, 400)
        with pytest.raises(LimitExceeded, match="2 CUDA shared-memory regions are registered"):
            cuda.register("c", region.handle, 0, 1)
        cuda.unregister("a")
        cuda.register("c", region.handle, 0, 1)
        assert [r["name"] for r in cuda.status()] == ["b", "c"]
    finally:
        cuda.close()


def test_unregister_one_all_and_unknown(registry: CudaSharedMemory, make_region: MakeRegion) -> None:
    region = make_region(256)
    for name in ("a", "b", "c"):
        registry.register(name, region.handle, 0, 64)
    registry.unregister("nothing")  # not an error, as in Triton
    registry.unregister("b")
    assert [r["name"] for r in registry.status()] == ["a", "c"]
    registry.unregister()
    assert registry.status() == [] and registry.opened == 0


@pytest.mark.parametrize(
    ("ref", "shape", "message"),
    [
        (SharedMemoryRef("r", 200, 64), (16,), "go past the end of CUDA shared-memory region 'r' \\(256 bytes\\)"),
        (SharedMemoryRef("r", 0, 60), (16,), "does not match shape \\[16\\]"),
        (SharedMemoryRef("r", -1, 64), (16,), "shared_memory_offset"),
    ],
)
def test_references_are_bounds_checked(
    registry: CudaSharedMemory,
    make_region: MakeRegion,
    device: FakeDeviceMemory,
    ref: SharedMemoryRef,
    shape: tuple[int, ...],
    message: str,
) -> None:
    registry.register("r", make_region(256).handle, 0, 256)
    with pytest.raises(InvalidInput, match=message):
        registry.lease(ref, F32, shape)
    registry.unregister("r")
    assert device.opened == 0  # a refused lease holds nothing


def test_unregistering_while_leased_closes_when_the_lease_ends(
    registry: CudaSharedMemory, make_region: MakeRegion, device: FakeDeviceMemory
) -> None:
    region = make_region(256)
    registry.register("r", region.handle, 0, 256)
    lease = registry.lease(SharedMemoryRef("r", 0, 64), F32, (16,))
    assert lease is not None
    registry.unregister("r")
    assert device.opened == 1 and registry.status() == []
    lease.write(np.full(16, 7, np.float32))  # still mapped: the request finishes with it
    np.testing.assert_array_equal(region.array(F32, (16,)), np.full(16, 7, np.float32))
    lease.release()
    assert device.opened == 0


def test_another_worker_opens_a_region_at_its_first_copy_and_closes_it_after_unregister(
    registry: CudaSharedMemory, registry_dir: Path, make_region: MakeRegion, monkeypatch: pytest.MonkeyPatch
) -> None:
    other_device = FakeDeviceMemory()
    other = CudaSharedMemory(other_device, {0: 0, 1: 1}, registry_dir)
    try:
        region = make_region(256)
        region.write(np.arange(16, dtype=np.float32))
        registry.register("r", region.handle, 0, 256)
        assert other.status() == registry.status()  # listed once, by every worker
        assert other_device.opened == 0
        lease = other.lease(SharedMemoryRef("r", 0, 64), F32, (16,))
        assert lease is not None and other_device.opened == 0  # held, not opened: the engine process may serve it
        np.testing.assert_array_equal(lease.read(F32, (16,)), np.arange(16, dtype=np.float32))
        assert other_device.opened == 1  # the copy opened it
        lease.release()
        registry.unregister("r")
        assert other.lease(SharedMemoryRef("r", 0, 64), F32, (16,)) is None
        monkeypatch.setattr("service.cudashm.registry.SWEEP_S", 0.0)
        other.status()  # sweeps: the handle of the unregistered region is closed
        assert other_device.opened == 0

        registry.register("r", region.handle, 0, 128)  # the same name again: the other worker opens it again
        lease = other.lease(SharedMemoryRef("r", 64, 64), F32, (16,))
        assert lease is not None and lease.region.record.byte_size == 128
        lease.release()
    finally:
        other.close()


def test_a_region_freed_after_registration_fails_in_a_worker_that_had_not_opened_it(
    registry: CudaSharedMemory, registry_dir: Path, make_region: MakeRegion
) -> None:
    other = CudaSharedMemory(FakeDeviceMemory(), {0: 0}, registry_dir)
    try:
        region = make_region(256)
        registry.register("r", region.handle, 0, 256)
        region.free()
        lease = other.lease(SharedMemoryRef("r", 0, 64), F32, (16,))
        assert lease is not None
        with pytest.raises(HandleError, match="stale"):
            lease.read(F32, (16,))  # the first copy opens it
        lease.release()
    finally:
        other.close()


def test_fake_handles_name_their_device() -> None:
    assert len(fake_handle("x", 3)) == 64 and fake_handle("x", 3)[8] == 3


@pytest.mark.anyio
async def test_an_idle_worker_closes_handles_of_regions_unregistered_elsewhere(
    registry: CudaSharedMemory, registry_dir: Path, make_region: MakeRegion, monkeypatch: pytest.MonkeyPatch
) -> None:
    import asyncio

    monkeypatch.setattr("service.cudashm.registry.SWEEP_S", 0.01)
    other_device = FakeDeviceMemory()
    other = CudaSharedMemory(other_device, {0: 0}, registry_dir)
    sweeping = asyncio.create_task(other.sweep_forever())
    try:
        registry.register("r", make_region(256).handle, 0, 256)
        lease = other.lease(SharedMemoryRef("r", 0, 64), F32, (16,))
        assert lease is not None
        lease.read(F32, (16,))
        lease.release()
        assert other_device.opened == 1
        registry.unregister("r")
        for _ in range(200):  # no request reaches the other worker: its sweeper closes the handle
            if other_device.opened == 0 and other.opened == 0:
                break
            await asyncio.sleep(0.01)
        assert other_device.opened == 0 and other.opened == 0
    finally:
        sweeping.cancel()
        other.close()
