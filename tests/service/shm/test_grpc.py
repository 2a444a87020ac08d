"""The system shared-memory RPCs' messages over the registry (the gRPC servicer calls these functions)."""

from __future__ import annotations

import pytest
from tritonclient.grpc import service_pb2 as pb

from service.errors import BadRequest, Conflict, InvalidInput, NotFound
from service.oip import shm_grpc
from service.shm import SystemSharedMemory
from tests.service.shm.conftest import MakeShm


def test_register_status_unregister_messages(registry: SystemSharedMemory, make_shm: MakeShm) -> None:
    obj = make_shm(8192)
    shm_grpc.register(registry, pb.SystemSharedMemoryRegisterRequest(name="a", key=obj.key, byte_size=4096))
    shm_grpc.register(registry, pb.SystemSharedMemoryRegisterRequest(name="b", key=obj.key, offset=4096, byte_size=8))
    everything = shm_grpc.status(registry, pb.SystemSharedMemoryStatusRequest())
    assert {name: (r.name, r.key, r.offset, r.byte_size) for name, r in everything.regions.items()} == {
        "a": ("a", obj.key, 0, 4096),
        "b": ("b", obj.key, 4096, 8),
    }
    assert list(shm_grpc.status(registry, pb.SystemSharedMemoryStatusRequest(name="b")).regions) == ["b"]
    with pytest.raises(Conflict):
        shm_grpc.register(registry, pb.SystemSharedMemoryRegisterRequest(name="a", key=obj.key, byte_size=8))
    shm_grpc.unregister(registry, pb.SystemSharedMemoryUnregisterRequest(name="a"))
    assert list(shm_grpc.status(registry, pb.SystemSharedMemoryStatusRequest()).regions) == ["b"]
    shm_grpc.unregister(registry, pb.SystemSharedMemoryUnregisterRequest())  # empty name: every region
    with pytest.raises(NotFound):
        shm_grpc.status(registry, pb.SystemSharedMemoryStatusRequest(name="b"))


def test_a_register_request_without_a_size_is_refused(registry: SystemSharedMemory, make_shm: MakeShm) -> None:
    obj = make_shm(64)
    with pytest.raises(InvalidInput, match="byte_size must be an integer of at least 1"):
        shm_grpc.register(registry, pb.SystemSharedMemoryRegisterRequest(name="a", key=obj.key))


def test_without_the_extension_every_rpc_is_a_bad_request() -> None:
    with pytest.raises(BadRequest, match="--shared-memory system"):
        shm_grpc.status(None, pb.SystemSharedMemoryStatusRequest())
