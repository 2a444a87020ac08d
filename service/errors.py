"""Domain errors shared by every protocol adapter (``/encode``, OIP REST, gRPC).

Each adapter maps them to its own wire: ``service.api.errors`` to HTTP statuses, the gRPC adapter to status
codes. Nothing here knows about HTTP or gRPC.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

T = TypeVar("T")


class InvalidInput(Exception):
    """The request body or its headers do not describe a valid input for the loaded model."""


def non_finite(dtype: str) -> InvalidInput:
    """The answer to an input holding a NaN or an Inf (or a value the cast to an fp16 model made one), wherever
    it was found: in the worker, or on the device by the engine process."""
    return InvalidInput(f"inputs must be finite numbers within the model's dtype ({dtype})")


class UnsupportedMediaType(Exception):
    """The Content-Type is none of the supported formats."""


class PayloadTooLarge(Exception):
    """The body is larger than ``max_body_bytes``."""


class BodyTimeout(Exception):
    """The request's deadline passed while its body was still arriving (a slow or stalled client)."""


class NotReady(Exception):
    """The engine is still loading or warming up, failed to load, or the service is draining."""


class ClientDisconnected(Exception):
    """The client closed the connection before its answer was ready."""


class NotFound(Exception):
    """The request names something the server does not have (a model, a version, a shared-memory region)."""


class Forbidden(InvalidInput):
    """The request names something the service may not use (a shared-memory object of another user, a symbolic
    link, a device). A subclass of InvalidInput so an adapter without its own entry still answers 4xx."""


class Conflict(InvalidInput):
    """The request conflicts with the server's state: a shared-memory region name already registered."""


class LimitExceeded(Conflict):
    """Granting the request would pass a configured limit (regions registered, bytes mapped); freeing some first
    (unregistering) resolves it, as with any conflict."""


class BadRequest(InvalidInput):
    """The request is malformed for its protocol (an Open Inference Protocol body that does not follow the
    protocol, a feature this server does not offer): 400, where values the model cannot take are 422. A subclass
    of InvalidInput so an adapter without its own entry still answers 4xx (gRPC: INVALID_ARGUMENT)."""


def nearest(table: Mapping[Any, T], exc: BaseException) -> T | None:
    """The entry of the nearest class in ``exc``'s MRO that ``table`` (error class -> a transport's answer) knows,
    so a subclass without its own entry is answered as its parent; None when no class in the MRO is known."""
    for cls in type(exc).__mro__:
        entry = table.get(cls)
        if entry is not None:
            return entry
    return None


def describe(exc: BaseException) -> str:
    """The message an error answer carries, on every transport: the error's text, or its class name without one."""
    return str(exc) or type(exc).__name__
