"""The system shared-memory extension over REST, in Triton's shapes: register, unregister, status.

``POST /v2/systemsharedmemory/region/{name}/register`` with ``{"key", "offset", "byte_size"}``;
``POST /v2/systemsharedmemory[/region/{name}]/unregister``; ``GET /v2/systemsharedmemory[/region/{name}]/status``
answers ``[{"name", "key", "offset", "byte_size"}, ...]``. Success is 200 with an empty body, as Triton answers;
errors are the protocol's ``{"error": "..."}`` with the status of their domain error (a missing key 404, an object
of another user 403, a duplicate name or a passed limit 409, a bad range 422). Region names may hold any text,
``/`` included (tritonclient does not escape it), hence the ``path`` converters.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, Protocol

import orjson
from fastapi import APIRouter, Request, Response

from service.api.deps import State
from service.errors import BadRequest
from service.oip.dataplane import register_system_region
from service.oip.rest import error_response
from service.shm import SystemSharedMemory
from service.state import ServiceState

MAX_BODY_BYTES = 64 << 10  # a register body is a key and two numbers
JSON = "application/json"
router = APIRouter(prefix="/v2/systemsharedmemory", tags=["Open Inference Protocol: system shared memory"])


def registry(state: ServiceState) -> SystemSharedMemory:
    shm = state.shared_memory
    if not isinstance(shm, SystemSharedMemory):
        raise BadRequest("system shared memory is not enabled on this server (start it with --shared-memory system)")
    return shm


class Regions(Protocol):
    """What the status and unregister routes need of a region registry (system or CUDA)."""

    def status(self, name: str | None = None) -> list[dict[str, Any]]: ...

    def unregister(self, name: str | None = None) -> None: ...


def add_region_routes(router: APIRouter, registry: Callable[[ServiceState], Regions], off_loop: bool) -> None:
    """The status and unregister routes, the same for both kinds of region but for their registry.

    ``off_loop`` unregisters on a worker thread, for registries whose unregister may block (closing CUDA handles).
    """

    @router.get("/status")
    @router.get("/region/{name:path}/status")
    async def status(state: State, name: str | None = None) -> Response:
        """Every registered region, or the one named (404 when it is not registered)."""
        try:
            return Response(orjson.dumps(registry(state).status(name)), media_type=JSON)
        except Exception as exc:
            return error_response(exc)

    @router.post("/unregister")
    @router.post("/region/{name:path}/unregister")
    async def unregister(state: State, name: str | None = None) -> Response:
        """Unregister the region named, or every region; an unknown name is not an error (as in Triton)."""
        try:
            if off_loop:
                await asyncio.to_thread(registry(state).unregister, name)
            else:
                registry(state).unregister(name)
        except Exception as exc:
            return error_response(exc)
        return Response(status_code=200)


add_region_routes(router, registry, off_loop=False)


@router.post("/region/{name:path}/register")
async def register(name: str, request: Request, state: State) -> Response:
    """Register ``byte_size`` bytes at ``offset`` of the POSIX shared-memory object ``key`` as region ``name``."""
    try:
        shm = registry(state)
        body = await register_body(request)
        register_system_region(state, shm, name, body["key"], body.get("offset", 0), body["byte_size"])
    except Exception as exc:
        return error_response(exc)
    return Response(status_code=200)


async def register_body(request: Request) -> dict[str, Any]:
    raw = await read_body(request)
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"the register body is not JSON: {exc}") from None
    if not isinstance(body, dict) or "key" not in body or "byte_size" not in body:
        raise BadRequest('the register body is a JSON object {"key": ..., "offset": ..., "byte_size": ...}')
    return body


async def read_body(request: Request) -> bytes:
    """A register body, at most :data:`MAX_BODY_BYTES`."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise BadRequest(f"a register body has at most {MAX_BODY_BYTES} bytes")
    raw = b""
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > MAX_BODY_BYTES:
            raise BadRequest(f"a register body has at most {MAX_BODY_BYTES} bytes")
    return raw
