"""The /encode logic behind the thin route: read, decode, validate, batch, encode, count."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

import numpy as np
from fastapi import Request, Response
from starlette.types import Receive

from service.api import codecs
from service.api.deps import ServiceState
from service.api.errors import (
    BodyTimeout,
    ClientDisconnected,
    InvalidInput,
    PayloadTooLarge,
    error_response,
    spec_for,
)
from service.batching.batcher import Batcher
from service.batching.errors import Overloaded
from service.engine.base import Engine

log = logging.getLogger(__name__)
T = TypeVar("T")
LARGE_BODY_BYTES = 1 << 20


async def encode(request: Request, state: ServiceState) -> Response:
    """Answer one /encode request; every request is counted exactly once, by outcome."""
    started = time.perf_counter()
    outcome = "error"
    try:
        response = await _encode(request, state, time.monotonic())
        outcome = "ok"
        return response
    except asyncio.CancelledError:
        outcome = "cancelled"  # the server cancelled the handler (client gone, shutdown)
        raise
    except Exception as exc:
        outcome = spec_for(exc).outcome
        return error_response(exc)
    finally:
        state.metrics.observe_request(outcome, time.perf_counter() - started)


async def _encode(request: Request, state: ServiceState, arrived: float) -> Response:
    engine, batcher = state.ready_parts()
    with admitted(state, batcher):
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
    batch = await off_loop_if_large(decoded.array.nbytes, model_input, decoded.array, engine)
    result = await until_disconnected(request.receive, batcher.submit(batch, deadline))
    output = result.output if decoded.array.ndim == 3 else result.output[0]
    wire = output.astype(decoded.wire_dtype, copy=False)
    encoded = await off_loop_if_large(wire.nbytes, codecs.encode, fmt_out, wire, engine.name)
    timing = {"x-queue-time": f"{result.queue_s:.6f}", "x-inference-time": f"{result.compute_s:.6f}"}
    return Response(encoded.content, media_type=encoded.media_type, headers={**encoded.headers, **timing})


@contextlib.contextmanager
def admitted(state: ServiceState, batcher: Batcher) -> Iterator[None]:
    """Refuse (429) before reading the body once ``max_queue + max_batch_size`` requests are in flight.

    The queue limit alone bounds only decoded requests: every overflowing client would still have its whole
    body read and parsed before hearing 429. Counting admitted requests bounds the memory held by /encode to
    about that many bodies, however large the burst.
    """
    limit = batcher.config.max_queue + batcher.config.max_batch_size
    if state.in_flight >= limit:
        raise Overloaded(f"{state.in_flight} requests are already in flight (limit {limit})")
    state.in_flight += 1
    try:
        yield
    finally:
        state.in_flight -= 1


async def off_loop_if_large(size: int, fn: Callable[..., T], *args: Any) -> T:
    """Big bodies are decoded/encoded on a worker thread, so one 50 MB JSON body does not stall every
    other request's parsing, /metrics and /healthz for the whole parse."""
    if size < LARGE_BODY_BYTES:
        return fn(*args)
    return await asyncio.to_thread(fn, *args)


def timeout_s(header: str | None, default_ms: float) -> float:
    if header is None:
        return default_ms / 1000.0
    try:
        value = float(header)
    except ValueError as exc:
        raise InvalidInput(f"X-Request-Timeout-Ms must be a number of milliseconds, got {header!r}") from exc
    if not 0 < value < 1e12:  # also refuses NaN and infinity (asyncio timers cannot take them)
        raise InvalidInput(f"X-Request-Timeout-Ms must be a positive finite number, got {header!r}")
    return value / 1000.0


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


def model_input(array: np.ndarray, engine: Engine) -> np.ndarray:
    """The engine's (B, S, D) input in its dtype. Non-finite values are refused: NaN/Inf in, NaN out, and
    JSON cannot even carry the answer; a value too large for an fp16 model becomes Inf in the cast."""
    batch = as_batch(array, engine)
    if batch.dtype != engine.dtype:  # no cast, no overflow: np.errstate costs ~2 us, so only where it can matter
        with np.errstate(over="ignore", invalid="ignore"):  # overflow is reported below, as a 422
            batch = batch.astype(engine.dtype)
    if not all_finite(batch):
        raise InvalidInput(f"inputs must be finite numbers within the model's dtype ({engine.dtype.name})")
    return batch


def all_finite(x: np.ndarray) -> bool:
    """``np.isfinite(x).all()``, but for float16 on the bits: numpy's half-precision isfinite is scalar code,
    7x slower than this mask test (an exponent of all ones is Inf or NaN), and it runs on every request."""
    if x.dtype == np.float16:
        if x.size == 0:
            return True
        # The masked exponent's max is 0x7C00 exactly when some value is Inf/NaN: one temporary and a SIMD
        # max (10 us for 196x768) instead of two temporaries and np.any (15 us).
        return int((x.view(np.uint16) & 0x7C00).max()) != 0x7C00
    return bool(np.isfinite(x).all())


def as_batch(array: np.ndarray, engine: Engine) -> np.ndarray:
    """(S, D) or (B, S, D) -> (B, S, D), checked against the model: rank, width, sequence length."""
    if array.ndim not in (2, 3):
        raise InvalidInput(f"expected shape (S, D) or (B, S, D), got {list(array.shape)}")
    batch = array if array.ndim == 3 else array[np.newaxis]
    samples, seq_len, dim = batch.shape
    if dim != engine.dim:
        raise InvalidInput(f"the last dimension must be {engine.dim} (the model's width), got {dim}")
    if samples == 0 or seq_len == 0:
        raise InvalidInput(f"the input is empty: shape {list(array.shape)}")
    if seq_len > engine.max_seq_len:
        raise InvalidInput(f"sequence length {seq_len} is over the model's maximum {engine.max_seq_len}")
    return batch


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
