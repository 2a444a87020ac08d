"""The Open Inference Protocol (KServe v2) over REST, on the service's HTTP port: thin routes over the OIP data plane.

Inference goes through the same admission, deadlines, batcher, engine and request metrics as ``/encode``; errors
come in the protocol's ``{"error": "..."}`` form with the status codes ``/encode`` uses. ``POST
/v2/models/<name>/infer`` reaches :func:`infer` straight from :class:`service.app.EncoderApp` (see
:func:`infer_target`); the FastAPI route below is there for the OpenAPI schema and any other URL form.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import orjson
from fastapi import APIRouter, Request, Response
from starlette.types import Receive, Scope, Send

from service.api.deps import State
from service.api.errors import INTERNAL, RETRY_AFTER_S, spec_for
from service.api.serving import counted, read_body_until, until_disconnected
from service.dataplane import admitted, off_loop_if_large, timeout_s
from service.errors import describe
from service.oip import dataplane as oip
from service.oip import rest_codec as codec
from service.oip import rest_schemas as schemas
from service.state import ServiceState

log = logging.getLogger(__name__)

_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": schemas.OIPError} for code in (400, 404, 408, 413, 415, 422, 429, 500, 503, 504)
}
_INFER_HEADERS = [
    {
        "name": codec.HEADER_LENGTH,
        "in": "header",
        "required": False,
        "description": "binary tensor extension: the length of the JSON part; the inputs' bytes follow it",
        "schema": {"type": "integer", "minimum": 1},
    },
    {
        "name": "X-Request-Timeout-Ms",
        "in": "header",
        "required": False,
        "description": "this request's deadline (the earlier of it and the timeout parameter wins)",
        "schema": {"type": "number", "exclusiveMinimum": 0},
    },
]
_INFER_BODY = {
    "required": True,
    "content": {
        codec.JSON: {"schema": schemas.InferRequestBody.model_json_schema()},
        codec.BINARY: {"schema": {"type": "string", "format": "binary"}},
    },
}
_MODEL_PREFIX = "/v2/models/"
_INFER_SUFFIX = "/infer"
_SMALL_ANSWER = 16 << 10  # below this a binary answer is joined into one write; above, its memory is sent as is

router = APIRouter(prefix="/v2", tags=["Open Inference Protocol"], responses=_ERRORS)


def infer_target(path: str) -> tuple[str, str | None] | None:
    """(model, version) for ``/v2/models/<model>[/versions/<version>]/infer``, else None."""
    if not (path.startswith(_MODEL_PREFIX) and path.endswith(_INFER_SUFFIX)):
        return None
    parts = path[len(_MODEL_PREFIX) : -len(_INFER_SUFFIX)].split("/")
    if len(parts) == 1 and parts[0]:
        return parts[0], None
    if len(parts) == 3 and parts[0] and parts[1] == "versions" and parts[2]:
        return parts[0], parts[2]
    return None


async def infer(request: Request, state: ServiceState, model: str, version: str | None) -> Response:
    """Answer one inference request; counted exactly once in the request metrics, by outcome (as /encode)."""
    return await counted(state, _infer(request, state, model, version, time.monotonic()), error_response)


async def _infer(request: Request, state: ServiceState, model: str, version: str | None, arrived: float) -> Response:
    oip.check_model(state.settings, model, version)  # 404 costs nothing to find out: before admission
    with admitted(state):  # 429 or 503 before the body is read
        settings = state.settings
        headers = request.headers
        deadline = arrived + timeout_s(headers.get("x-request-timeout-ms"), settings.request_timeout_ms)
        body = await read_body_until(request, settings.max_body_bytes, deadline)
        body = codec.decompress(body, headers.get("content-encoding"), settings.max_body_bytes)
        header_length = headers.get(codec.HEADER_LENGTH)
        decoded = await off_loop_if_large(len(body), codec.decode_request, body, header_length, model, version)
        work = oip.infer(state, decoded, state.shared_memory, deadline, arrived)
        answer = await until_disconnected(request.receive, work)
        size = sum(o.data.nbytes for o in answer.outputs if o.data is not None and not o.binary)
        encoded = await off_loop_if_large(size, codec.encode_response, answer)
    return PartsResponse(encoded)


class PartsResponse(Response):
    """An answer sent as its parts (JSON header, then each binary output's own memory), without joining them."""

    def __init__(self, encoded: codec.Encoded) -> None:
        parts = encoded.parts
        size = codec.total_size(parts)
        if len(parts) > 1 and size <= _SMALL_ANSWER:
            parts = [b"".join(parts)]
        self.parts = parts
        headers = {**encoded.headers, "content-length": str(size)}
        super().__init__(None, media_type=encoded.media_type, headers=headers)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        last = len(self.parts) - 1
        for index, part in enumerate(self.parts):
            await send({"type": "http.response.body", "body": part, "more_body": index < last})


def error_response(exc: BaseException) -> Response:
    """The protocol's error answer, with the status, Retry-After and Connection of /encode's for the same error."""
    spec = spec_for(exc)
    if spec is INTERNAL:  # an error nobody foresaw: never silent (as /encode's answer logs it)
        log.error("unexpected error", exc_info=exc)
    body = codec.error_body(describe(exc))
    return Response(body, status_code=spec.status, media_type=codec.JSON, headers=spec.headers())


def _json(answer: Callable[[], Any]) -> Response:
    try:
        return Response(orjson.dumps(answer()), media_type=codec.JSON)
    except Exception as exc:
        return error_response(exc)


def _health(key: str, reason: str | None) -> Response:
    """200 ``{key: true}``, or 503 with why (as /readyz; the protocol asks for a non-200 answer)."""
    if reason is None:
        return Response(orjson.dumps({key: True}), media_type=codec.JSON)
    body = orjson.dumps({key: False, "error": reason})
    return Response(body, status_code=503, media_type=codec.JSON, headers={"Retry-After": RETRY_AFTER_S})


@router.get("", response_model=schemas.ServerMetadata)
async def server_metadata(state: State) -> Response:
    """Server metadata: name, version and the protocol extensions it implements."""
    return _json(lambda: oip.server_metadata(state.settings))


@router.get("/health/live", response_model=schemas.Live)
async def server_live(state: State) -> Response:
    """Live unless the process can never serve again (a model that failed to load, a dead batching loop)."""
    return _health("live", oip.server_live(state))


@router.get("/health/ready", response_model=schemas.Ready)
async def server_ready(state: State) -> Response:
    """Ready once the model is loaded and warm and the batcher runs; not while draining (as /readyz)."""
    return _health("ready", oip.server_ready(state))


@router.get("/models/stats", response_model=schemas.StatsBody)
async def all_model_stats(state: State) -> Response:
    """The statistics extension for every model (this server has one), counted in the worker that answers."""
    return _json(lambda: oip.model_stats(state, None, None))


@router.get("/models/{name}", response_model=schemas.ModelMetadata)
@router.get("/models/{name}/versions/{version}", response_model=schemas.ModelMetadata)
async def model_metadata(name: str, state: State, version: str | None = None) -> Response:
    """The model's name, versions, platform and tensors (the input's last dimension is the model's width)."""
    return _json(lambda: oip.model_metadata(state, name, version))


@router.get("/models/{name}/ready", response_model=schemas.Ready)
@router.get("/models/{name}/versions/{version}/ready", response_model=schemas.Ready)
async def model_ready(name: str, state: State, version: str | None = None) -> Response:
    try:
        reason = oip.model_ready(state, name, version)
    except Exception as exc:
        return error_response(exc)
    return _health("ready", reason)


@router.get("/models/{name}/config")
@router.get("/models/{name}/versions/{version}/config")
async def model_config(name: str, state: State, version: str | None = None) -> Response:
    """Triton's model configuration (max_batch_size, dims per sample, dynamic batching), for Triton's tools."""
    return _json(lambda: oip.model_config(state, name, version))


@router.get("/models/{name}/stats", response_model=schemas.StatsBody)
@router.get("/models/{name}/versions/{version}/stats", response_model=schemas.StatsBody)
async def model_stats(name: str, state: State, version: str | None = None) -> Response:
    """The statistics extension, in Triton's shape; counted in the worker that answers."""
    return _json(lambda: oip.model_stats(state, name, version))


@router.post(
    "/models/{name}/infer",
    response_class=Response,
    responses={200: {"model": schemas.InferResponseBody}},
    openapi_extra={"requestBody": _INFER_BODY, "parameters": _INFER_HEADERS},
)
@router.post(
    "/models/{name}/versions/{version}/infer",
    response_class=Response,
    responses={200: {"model": schemas.InferResponseBody}},
    openapi_extra={"requestBody": _INFER_BODY, "parameters": _INFER_HEADERS},
)
async def model_infer(name: str, request: Request, state: State, version: str | None = None) -> Response:
    """Inference: JSON tensors or the binary tensor extension; answers in the input's datatype."""
    return await infer(request, state, name, version)
