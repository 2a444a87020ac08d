"""One table from domain errors to HTTP: status, error type, and the outcome label counted in metrics.

Every error answer has the same body: ``{"error": {"type": ..., "message": ...}}``. The errors themselves live
in :mod:`service.errors` (transport-neutral) and are re-exported here for the HTTP adapters.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from service.batching.errors import BatcherStopped, DeadlineExceeded, EngineFailed, Overloaded
from service.errors import (
    BadRequest,
    BodyTimeout,
    ClientDisconnected,
    Conflict,
    Forbidden,
    InvalidInput,
    NotFound,
    NotReady,
    PayloadTooLarge,
    UnsupportedMediaType,
    describe,
    nearest,
)

log = logging.getLogger(__name__)
RETRY_AFTER_S = "1"


@dataclass(frozen=True)
class ErrorSpec:
    status: int
    type: str
    outcome: str
    retry_after: bool = False
    # Connection: close, for errors that come before the body was read. service.api.early adds it to every such
    # answer (and reads off the rest of the body first); stated here too for adapters that answer on their own.
    close: bool = False

    def headers(self) -> dict[str, str]:
        """The headers this error's answer carries, whatever its body's form (``/encode``'s or the OIP's)."""
        headers = {"Retry-After": RETRY_AFTER_S} if self.retry_after else {}
        if self.close:
            headers["Connection"] = "close"
        return headers


ERRORS: dict[type[Exception], ErrorSpec] = {
    InvalidInput: ErrorSpec(422, "invalid_input", "invalid"),
    BadRequest: ErrorSpec(400, "bad_request", "invalid"),
    NotFound: ErrorSpec(404, "not_found", "invalid"),
    Forbidden: ErrorSpec(403, "forbidden", "invalid"),
    Conflict: ErrorSpec(409, "conflict", "invalid"),
    UnsupportedMediaType: ErrorSpec(415, "unsupported_media_type", "invalid"),
    PayloadTooLarge: ErrorSpec(413, "payload_too_large", "invalid", close=True),
    BodyTimeout: ErrorSpec(408, "request_timeout", "timeout", close=True),
    Overloaded: ErrorSpec(429, "overloaded", "overloaded", retry_after=True),
    DeadlineExceeded: ErrorSpec(504, "deadline_exceeded", "timeout"),
    EngineFailed: ErrorSpec(500, "inference_failed", "error"),
    NotReady: ErrorSpec(503, "not_ready", "unavailable", retry_after=True),
    BatcherStopped: ErrorSpec(503, "not_ready", "unavailable", retry_after=True),
    # 499 (nginx's "client closed request"): nobody reads it, but logs and metrics show what happened.
    ClientDisconnected: ErrorSpec(499, "client_disconnected", "cancelled"),
    ClientDisconnect: ErrorSpec(499, "client_disconnected", "cancelled"),
}
INTERNAL = ErrorSpec(500, "internal_error", "error")


def spec_for(exc: BaseException) -> ErrorSpec:
    return nearest(ERRORS, exc) or INTERNAL


def error_body(error_type: str, message: str) -> dict[str, dict[str, str]]:
    return {"error": {"type": error_type, "message": message}}


def error_response(exc: BaseException) -> JSONResponse:
    spec = spec_for(exc)
    if spec is INTERNAL:
        log.error("unexpected error", exc_info=exc)
    return JSONResponse(error_body(spec.type, describe(exc)), status_code=spec.status, headers=spec.headers())


async def _domain_error(_: Request, exc: Exception) -> JSONResponse:
    return error_response(exc)


async def _http_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    body = error_body("http_error", str(exc.detail))
    return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)


async def _validation_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return JSONResponse(error_body("invalid_input", str(exc.errors())), status_code=422)


def install_error_handlers(app: FastAPI) -> None:
    """Same body shape for every error, including FastAPI's own 404/405/validation answers."""
    for cls in ERRORS:
        app.add_exception_handler(cls, _domain_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
