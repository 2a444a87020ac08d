"""The HTTP routes. Thin: each one hands over to serving, the state, or the metrics."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from service.api import codecs, serving
from service.api.deps import State
from service.api.errors import error_body
from service.api.schemas import EncodeJSONRequest, EncodeJSONResponse, ErrorBody, ModelCard, ModelList, Status
from service.metrics import CONTENT_TYPE

router = APIRouter()
_ERROR_CODES = (408, 413, 415, 422, 429, 500, 503, 504)
_ERRORS: dict[int | str, dict[str, Any]] = {code: {"model": ErrorBody} for code in _ERROR_CODES}
_ENCODE_HEADERS = [
    {
        "name": "X-Shape",
        "in": "header",
        "required": False,
        "description": "raw bodies: the shape, e.g. 4,196,768",
        "schema": {"type": "string", "pattern": "^[0-9]+(,[0-9]+){1,2}$"},
    },
    {
        "name": "X-Dtype",
        "in": "header",
        "required": False,
        "description": "raw bodies: the element type",
        "schema": {"type": "string", "enum": list(codecs.WIRE_DTYPES)},
    },
    {
        "name": "X-Request-Timeout-Ms",
        "in": "header",
        "required": False,
        "description": "this request's deadline",
        "schema": {"type": "number", "exclusiveMinimum": 0},
    },
    {
        "name": "Accept",
        "in": "header",
        "required": False,
        "description": "the answer's format",
        "schema": {"type": "string", "enum": list(codecs.FORMATS)},
    },
]
_ENCODE_BODY = {
    "required": True,
    "content": {
        codecs.JSON: {"schema": EncodeJSONRequest.model_json_schema()},
        codecs.NPY: {"schema": {"type": "string", "format": "binary"}},
        codecs.RAW: {"schema": {"type": "string", "format": "binary"}},
    },
}


@router.post(
    "/encode",
    response_class=Response,
    responses={200: {"model": EncodeJSONResponse}, **_ERRORS},
    openapi_extra={"requestBody": _ENCODE_BODY, "parameters": _ENCODE_HEADERS},
)
async def encode(request: Request, state: State) -> Response:
    """Encode (S, D) or (B, S, D) inputs sent as JSON, .npy or raw bytes (X-Shape, X-Dtype)."""
    return await serving.encode(request, state)


@router.get("/healthz", response_model=Status)
async def healthz(state: State) -> Any:
    """The process is alive and can serve once ready: a model that failed to load or a dead batching loop
    turn it 503, so an orchestrator restarts the process instead of keeping it unready forever."""
    fatal = state.fatal_error()
    if fatal is not None:
        return JSONResponse(error_body("unhealthy", fatal), status_code=503)
    return Status(status="ok")


@router.get("/readyz", response_model=Status, responses={503: {"model": ErrorBody}})
async def readyz(state: State) -> Any:
    """Ready once the engine is built, every batch bucket warmed up, the batcher runs, and (with engine
    processes) at least one of them serves."""
    reason = state.not_ready_reason()
    if reason is not None:
        return JSONResponse(error_body("not_ready", reason), status_code=503, headers={"Retry-After": "1"})
    # Ready while one engine serves; the body names those being restarted.
    devices = {device.device: "up" if device.up else "down" for device in state.device_status()}
    return Status(status="ready", devices=devices)


@router.get("/metrics", response_class=Response)
async def metrics(state: State) -> Response:
    """Prometheus text format (aggregated over worker processes when there are several)."""
    return Response(state.metrics.render(), media_type=CONTENT_TYPE)


@router.get("/v1/models", response_model=ModelList, responses={503: {"model": ErrorBody}})
async def models(state: State) -> ModelList:
    """The loaded model: dims, dtype, provider, batch buckets."""
    engine, batcher = state.ready_parts()
    card = ModelCard(
        name=engine.name,
        dim=engine.dim,
        dtype=engine.dtype.name,
        max_seq_len=engine.max_seq_len,
        provider=engine.provider,
        buckets=list(engine.buckets),
        max_batch_size=batcher.config.max_batch_size,
        fixed_shapes=engine.fixed_shapes,
        devices=[device.device for device in state.device_status() if device.up],
        details=engine.describe(),
    )
    return ModelList(models=[card])
