"""The system shared-memory RPCs of ``inference.GRPCInferenceService``, over the same registry as REST.

Plain functions from the request message to the response message, for the servicer to call; errors are the
registry's domain errors (the servicer maps them to status codes: a missing key NOT_FOUND, an object of another
user PERMISSION_DENIED, a duplicate name ALREADY_EXISTS, a passed limit RESOURCE_EXHAUSTED, a bad range
INVALID_ARGUMENT). An empty name means every region, as in Triton.
"""

from __future__ import annotations

from tritonclient.grpc import service_pb2 as pb

from service.errors import BadRequest
from service.oip.types import SharedMemory
from service.shm import SystemSharedMemory


def registry(shm: SharedMemory | None) -> SystemSharedMemory:
    if not isinstance(shm, SystemSharedMemory):
        raise BadRequest("system shared memory is not enabled on this server (start it with --shared-memory system)")
    return shm


def status(
    shm: SharedMemory | None, request: pb.SystemSharedMemoryStatusRequest
) -> pb.SystemSharedMemoryStatusResponse:
    response = pb.SystemSharedMemoryStatusResponse()
    for entry in registry(shm).status(request.name or None):
        response.regions[entry["name"]].CopyFrom(pb.SystemSharedMemoryStatusResponse.RegionStatus(**entry))
    return response


def register(
    shm: SharedMemory | None, request: pb.SystemSharedMemoryRegisterRequest
) -> pb.SystemSharedMemoryRegisterResponse:
    registry(shm).register(request.name, request.key, request.offset, request.byte_size)
    return pb.SystemSharedMemoryRegisterResponse()


def unregister(
    shm: SharedMemory | None, request: pb.SystemSharedMemoryUnregisterRequest
) -> pb.SystemSharedMemoryUnregisterResponse:
    registry(shm).unregister(request.name or None)
    return pb.SystemSharedMemoryUnregisterResponse()
