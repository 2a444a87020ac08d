"""The /encode logic behind the thin route: read, decode, validate, batch, encode, count."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from fastapi import Request, Response
from starlette.types import Receive

from service.api import codecs
from service.api.errors import error_response, spec_for
from service.batching.batcher import Batcher
from service.dataplane import admitted, infer, off_loop_if_large, timeout_s
from service.engine.base import Engine
from service.errors import BodyTimeout, ClientDisconnected, InvalidInput, PayloadTooLarge
from service.state import ServiceState

log = logging.getLogger(__name__)
T = TypeVar("T")


async def encode(request: Request, state: ServiceState) -> Response:
    """Answer one /encode request; every request is counted exactly once, by outcome."""
    return await counted(state, _encode(request, state, time.monotonic()), error_response)


async def counted(
    state: ServiceState, work: Awaitable[Response], on_error: Callable[[BaseException], Response]
) -> Response:
    """Await an inference answer, turning domain errors into ``on_error``'s answer (each protocol has its own
    error body); every request is counted exactly once in the request metrics, by outcome."""
    started = time.perf_counter()
    outcome = "error"
    try:
        response = await work
        outcome = "ok"
        return response
    except asyncio.CancelledError:
        outcome = "cancelled"  # the server cancelled the handler (client gone, shutdown)
        raise
    except Exception as exc:
        outcome = spec_for(exc).outcome
        return on_error(exc)
    finally:
        state.metrics.observe_request(outcome, time.perf_counter() - started)


async def _encode(request: Request, state: ServiceState, arrived: float) -> Response:
    with admitted(state) as (engine, batcher):
        return await _admitted_encode(request, state, engine, batcher, arrived)


async def _admitted_encode(
    request: Request, state: ServiceState, engine: Engine, batcher: Batcher, arrived: float
) -> Response:
    settings = state.settings
    headers = request.headers
    fmt_in = codecs.request_format(headers.get("content-type"))
    fmt_out = codecs.response_format(headers.get("accept"), fmt_in)
    deadline = arrived + timeout_s(headers.get("x-request-timeout-ms"), settings.request_timeout_ms)
    body = await read_body_until(request, settings.max_body_bytes, deadline)
    decoded = await off_loop_if_large(len(body), codecs.decode, fmt_in, body, headers)
    result = await until_disconnected(request.receive, infer(engine, batcher, decoded.array, deadline))
    output = result.output if decoded.array.ndim == 3 else result.output[0]
    wire = output.astype(decoded.wire_dtype, copy=False)
    encoded = await off_loop_if_large(wire.nbytes, codecs.encode, fmt_out, wire, engine.name)
    timing = {"x-queue-time": f"{result.queue_s:.6f}", "x-inference-time": f"{result.compute_s:.6f}"}
    return Response(encoded.content, media_type=encoded.media_type, headers={**encoded.headers, **timing})


async def read_body_until(request: Request, limit: int, deadline: float) -> bytes:
    """:func:`read_body`, bounded by the request's deadline: a client that stalls mid-body (slow loris) gets
    408 and its connection closed, instead of holding a connection and its buffer forever."""
    try:
        async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
            return await read_body(request, limit)
    except TimeoutError as exc:
        raise BodyTimeout("the request body did not arrive before the request's deadline") from exc


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 from Content-Length before reading, or as soon as a stream passes ``limit``."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError as exc:
            raise InvalidInput(f"bad Content-Length {declared!r}") from exc
        if size > limit:
            raise PayloadTooLarge(f"the body is {size} bytes; the limit is {limit}")
    # Chunks joined once at the end: growing a bytearray and copying it into bytes copied the body twice.
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"the body is over the limit of {limit} bytes")
        chunks.append(chunk)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def _disconnected(receive: Receive) -> None:
    # Once the body is read, the server's next message is http.disconnect: when the client leaves (uvicorn,
    # httpx) or once the response is complete. Either way the work it races is no longer wanted.
    while True:
        message: dict[str, Any] = dict(await receive())
        if message.get("type") == "http.disconnect":
            return


async def until_disconnected(receive: Receive, work: Awaitable[T]) -> T:
    """Await ``work``, cancelling it (so the batcher drops the request) if the client disconnects first.

    ``work`` runs in the caller's own task and only the watcher gets a task of its own: wrapping ``work`` in
    a second task and racing both with ``asyncio.wait`` cost two tasks and a waiter per request.
    """
    handler = asyncio.current_task()
    assert handler is not None
    gone = False

    async def watch() -> None:
        nonlocal gone
        await _disconnected(receive)
        gone = True
        handler.cancel()  # the batcher sees CancelledError in submit and withdraws the request

    watcher = asyncio.ensure_future(watch())
    try:
        return await work
    except asyncio.CancelledError:
        # Only our own cancel becomes a 499; the server's (shutdown) or another one stays a cancellation.
        if gone and handler.uncancel() == 0:
            log.info("client disconnected before its answer was ready")
            raise ClientDisconnected("the client disconnected before its answer was ready") from None
        raise
    finally:
        watcher.cancel()
