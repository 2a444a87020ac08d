"""One table from domain errors to gRPC status codes, and the outcome each one counts as in the metrics.

The gRPC twin of ``service.api.errors``: each error kind keeps its own code (bad input is never INTERNAL, and
INTERNAL is only a failed engine batch or an error nobody foresaw, which is logged).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import grpc

from service.batching.errors import BatcherStopped, DeadlineExceeded, EngineFailed, Overloaded
from service.errors import (
    BadRequest,
    BodyTimeout,
    ClientDisconnected,
    Conflict,
    Forbidden,
    InvalidInput,
    LimitExceeded,
    NotFound,
    NotReady,
    PayloadTooLarge,
    UnsupportedMediaType,
    nearest,
)

log = logging.getLogger(__name__)
Code = grpc.StatusCode


class NotEnabled(Exception):
    """The call belongs to a protocol extension this server does not offer, or that is switched off."""


@dataclass(frozen=True)
class StatusSpec:
    code: grpc.StatusCode
    outcome: str  # the encoder_requests_total label, as the HTTP adapters count the same error


STATUSES: dict[type[Exception], StatusSpec] = {
    InvalidInput: StatusSpec(Code.INVALID_ARGUMENT, "invalid"),
    UnsupportedMediaType: StatusSpec(Code.INVALID_ARGUMENT, "invalid"),
    BadRequest: StatusSpec(Code.INVALID_ARGUMENT, "invalid"),
    NotFound: StatusSpec(Code.NOT_FOUND, "invalid"),
    NotEnabled: StatusSpec(Code.FAILED_PRECONDITION, "invalid"),
    Forbidden: StatusSpec(Code.PERMISSION_DENIED, "invalid"),
    Conflict: StatusSpec(Code.ALREADY_EXISTS, "invalid"),
    LimitExceeded: StatusSpec(Code.RESOURCE_EXHAUSTED, "invalid"),
    # grpc's own answer to a message over the receive limit is RESOURCE_EXHAUSTED too.
    PayloadTooLarge: StatusSpec(Code.RESOURCE_EXHAUSTED, "invalid"),
    Overloaded: StatusSpec(Code.RESOURCE_EXHAUSTED, "overloaded"),
    BodyTimeout: StatusSpec(Code.DEADLINE_EXCEEDED, "timeout"),
    DeadlineExceeded: StatusSpec(Code.DEADLINE_EXCEEDED, "timeout"),
    NotReady: StatusSpec(Code.UNAVAILABLE, "unavailable"),
    BatcherStopped: StatusSpec(Code.UNAVAILABLE, "unavailable"),
    EngineFailed: StatusSpec(Code.INTERNAL, "error"),
    ClientDisconnected: StatusSpec(Code.CANCELLED, "cancelled"),
}
INTERNAL = StatusSpec(Code.INTERNAL, "error")


def status_for(exc: BaseException) -> StatusSpec:
    """The spec of the nearest known class in ``exc``'s MRO; INTERNAL (logged with its traceback) otherwise."""
    spec = nearest(STATUSES, exc)
    if spec is None:
        log.error("unexpected error in a gRPC call", exc_info=exc)
        return INTERNAL
    return spec
