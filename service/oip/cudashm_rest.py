"""The CUDA shared-memory extension over REST, in Triton's shapes: register, unregister, status.

``POST /v2/cudasharedmemory/region/{name}/register`` with ``{"raw_handle": {"b64": "<base64 of the 64-byte
cudaIpcMemHandle_t>"}, "device_id": N, "byte_size": N}`` (what tritonclient.http sends);
``POST /v2/cudasharedmemory[/region/{name}]/unregister``; ``GET /v2/cudasharedmemory[/region/{name}]/status``
answers ``[{"name", "device_id", "byte_size"}, ...]``. Success is 200 with an empty body; errors are the protocol's
``{"error": "..."}`` with their domain error's status (an unknown region 404, a duplicate name or a passed limit
409, a bad handle, device or size 422, a malformed body 400).
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from fastapi import APIRouter, Request, Response

from service.api.deps import State
from service.cudashm import CudaSharedMemory
from service.errors import BadRequest
from service.oip.rest import error_response
from service.oip.shm_rest import add_region_routes, read_body
from service.state import ServiceState

router = APIRouter(prefix="/v2/cudasharedmemory", tags=["Open Inference Protocol: CUDA shared memory"])


def registry(state: ServiceState) -> CudaSharedMemory:
    if state.cuda_shared_memory is None:
        raise BadRequest("CUDA shared memory is not enabled on this server (start it with --shared-memory cuda)")
    return state.cuda_shared_memory


# Unregistering closes CUDA IPC handles, which takes a while: off the event loop.
add_region_routes(router, registry, off_loop=True)


@router.post("/region/{name:path}/register")
async def register(name: str, request: Request, state: State) -> Response:
    """Open the client's CUDA IPC handle on ``device_id`` and register ``byte_size`` bytes of it as ``name``."""
    try:
        cuda = registry(state)
        body = register_body(await read_body(request))
        # Opening a handle (and, the first time, this worker's CUDA context) takes a while: off the event loop.
        await asyncio.to_thread(cuda.register, name, body["raw_handle"], body["device_id"], body["byte_size"])
    except Exception as exc:
        return error_response(exc)
    return Response(status_code=200)


def register_body(raw: bytes) -> dict[str, Any]:
    """``{"raw_handle": {"b64": text}, "device_id": N, "byte_size": N}``, with the handle as its base64 text."""
    usage = 'the register body is a JSON object {"raw_handle": {"b64": ...}, "device_id": ..., "byte_size": ...}'
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"the register body is not JSON: {exc}") from None
    if not isinstance(body, dict) or not {"raw_handle", "device_id", "byte_size"} <= body.keys():
        raise BadRequest(usage)
    handle = body["raw_handle"]
    if not isinstance(handle, dict) or not isinstance(handle.get("b64"), str):
        raise BadRequest('raw_handle must be {"b64": "<the handle\'s bytes in base64>"}')
    return {**body, "raw_handle": handle["b64"]}
