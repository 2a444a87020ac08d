"""Shared helpers for service tests: an in-process app with a fake engine (also behind gRPC), and reading
/metrics."""

from __future__ import annotations

import asyncio
import contextlib
import io
import time
from collections.abc import AsyncIterator, Awaitable
from typing import Any, NamedTuple

import httpx
import numpy as np
import pytest
import tritonclient.grpc.aio as tca
from fastapi import FastAPI
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.utils import InferenceServerException

from service.app import create_app
from service.engine.base import Engine
from service.engine.fake import FakeEngine
from service.settings import Settings
from tests.service.server_support import free_port


def settings(**overrides: Any) -> Settings:
    # gRPC off unless a test asks for it: parallel test apps must not compete for its default port.
    values: dict[str, Any] = {"max_batch_size": 8, "max_delay_ms": 20, "provider": "cpu", "grpc_port": 0} | overrides
    return Settings(**values)


async def wait_ready(client: httpx.AsyncClient, timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while (await client.get("/readyz")).status_code != 200:
        if time.monotonic() > end:
            raise AssertionError("the app did not get ready")
        await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def serving(
    engine: Engine | None = None, ready: bool = True, **overrides: Any
) -> AsyncIterator[tuple[httpx.AsyncClient, FastAPI]]:
    """The app with its lifespan running, and an httpx client talking to it in-process."""
    app = create_app(settings(**overrides), engine=engine if engine is not None else FakeEngine())
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as client:
            if ready:
                await wait_ready(client)
            yield client, app


class GrpcServing(NamedTuple):
    client: tca.InferenceServerClient  # tritonclient's asyncio client
    address: str  # host:port of the gRPC listener, for other channels
    http: httpx.AsyncClient
    app: FastAPI


@contextlib.asynccontextmanager
async def grpc_serving(
    engine: Engine | None = None, ready: bool = True, **overrides: Any
) -> AsyncIterator[GrpcServing]:
    """:func:`serving` with gRPC on a free port, and tritonclient's asyncio client to it (closed afterwards)."""
    port = free_port()
    async with serving(engine, ready=ready, grpc_port=port, host="127.0.0.1", **overrides) as (http, app):
        client = tca.InferenceServerClient(f"127.0.0.1:{port}")
        try:
            yield GrpcServing(client, f"127.0.0.1:{port}", http, app)
        finally:
            await client.close()


async def grpc_error(call: Awaitable[Any]) -> str:
    """The status tritonclient reports for a call that must fail (``StatusCode.NOT_FOUND``...)."""
    with pytest.raises(InferenceServerException) as info:
        await call
    return str(info.value.status())


async def encode_json(client: httpx.AsyncClient, x: np.ndarray) -> np.ndarray:
    """/encode's answer for ``x`` (JSON both ways), the reference an OIP answer is compared with."""
    response = await client.post("/encode", json={"inputs": x.tolist()})
    assert response.status_code == 200, response.text
    return np.asarray(response.json()["outputs"], np.float32)


def metric_samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a /metrics page, keyed by (name, sorted labels)."""
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def metric(text: str, name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` whose labels include ``labels`` (0 when none): e.g. a batch metric
    summed over its ``device`` label, or one device's value with ``device="0"``."""
    wanted = set(labels.items())
    found = metric_samples(text).items()
    return sum(value for (sample, got), value in found if sample == name and wanted <= set(got))


def npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def from_npy(body: bytes) -> np.ndarray:
    return np.load(io.BytesIO(body), allow_pickle=False)
