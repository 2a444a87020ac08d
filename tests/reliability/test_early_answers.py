"""Answers given before the body was read (413, 408, 429, 415) are read by keep-alive async clients.

Against real uvicorn processes with both HTTP implementations (httptools, the default, and h11): the client is
still sending when the answer goes out, and must get the status and the JSON error, not a connection reset.
After each, a normal request on a new connection is answered.
"""

from __future__ import annotations

import asyncio
import io
import socket
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import urlparse

import aiohttp
import httpx
import pytest

from tests.reliability.support import NPY_HEADERS, assert_answer, fake_args, metric, metrics_of, npy, sample
from tests.service.server_support import clean_env, running

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]
MIB = 1 << 20
BIG = 70 * MIB  # above the default --max-body-bytes of 64 MiB, as in the report
RAW = {"content-type": "application/octet-stream", "x-shape": "1,1,8", "x-dtype": "float32"}
# A 1 s engine and room for two requests in flight (queue 1 + batch 1): two slow requests make the third a 429.
FLAGS = ("--max-batch-size", "1", "--max-queue", "1", "--max-delay-ms", "0", "--fake-delay-ms", "1000")


@pytest.fixture(scope="module", params=["httptools", "h11"])
def url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    log = tmp_path_factory.mktemp(request.param) / "server.log"
    if request.param == "httptools":  # what `python -m service` runs
        with running(fake_args(*FLAGS), log) as base:
            yield base
        return
    # The same app under uvicorn's h11 implementation: the factory reads its settings from ENCODER_* variables.
    env = clean_env(ENCODER_ENGINE="fake", ENCODER_MAX_BATCH_SIZE="1", ENCODER_MAX_QUEUE="1")
    env |= {"ENCODER_MAX_DELAY_MS": "0", "ENCODER_FAKE_DELAY_MS": "1000"}
    args = ["-m", "uvicorn", "service.app:app_from_env", "--factory", "--http", "h11", "--host", "127.0.0.1"]
    with running(args, log, env=env) as base:
        yield base


def assert_error(response: httpx.Response, status: int, error_type: str) -> None:
    assert response.status_code == status, response.text[:300]
    assert response.json()["error"]["type"] == error_type
    assert response.headers["connection"] == "close"


async def then_a_normal_request_works(url: str) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=30) as fresh:  # a new connection
        x = sample(11)
        response = await fresh.post("/encode", content=npy(x), headers=NPY_HEADERS)
    assert response.status_code == 200, response.text
    assert_answer(x, response.content)


async def paced(total: int, chunk: int, pause_s: float) -> AsyncIterator[bytes]:
    """A body that keeps coming, a chunk at a time: the client is still sending when the answer goes out."""
    for _ in range(total // chunk):
        yield b"\0" * chunk
        await asyncio.sleep(pause_s)


def test_413_from_content_length_is_read_by_httpx_and_aiohttp(url: str) -> None:
    async def scenario() -> None:
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:  # keep-alive
            for _ in range(2):
                assert_error(await client.post("/encode", content=b"\0" * BIG, headers=RAW), 413, "payload_too_large")
        async with (
            aiohttp.ClientSession() as session,
            session.post(f"{url}/encode", data=io.BytesIO(b"\0" * BIG), headers=RAW) as response,
        ):
            assert response.status == 413 and (await response.json())["error"]["type"] == "payload_too_large"
        await then_a_normal_request_works(url)

    asyncio.run(scenario())


def test_413_while_streaming_a_chunked_body_is_read(url: str) -> None:
    async def scenario() -> None:
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            response = await client.post("/encode", content=paced(BIG, MIB, 0.0), headers=RAW)  # no Content-Length
            assert_error(response, 413, "payload_too_large")
        await then_a_normal_request_works(url)

    asyncio.run(scenario())


def test_408_for_a_body_still_arriving_at_its_deadline_is_read(url: str) -> None:
    async def scenario() -> None:
        body = paced(4 * MIB, 64 << 10, 0.01)  # about 0.7 s of sending; the deadline is 0.2 s
        headers = RAW | {"x-shape": f"1,{4 * MIB // 32},8", "x-request-timeout-ms": "200"}
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            assert_error(await client.post("/encode", content=body, headers=headers), 408, "request_timeout")
        await then_a_normal_request_works(url)

    asyncio.run(scenario())


def test_429_from_admission_before_the_body_is_read(url: str) -> None:
    async def scenario() -> None:
        async with httpx.AsyncClient(base_url=url, timeout=60) as busy, httpx.AsyncClient(base_url=url) as client:
            # Two slow requests fill what admission lets in (one computing, one queued).
            fillers = [asyncio.ensure_future(busy.post("/encode", content=npy(sample(0)), headers=NPY_HEADERS))]
            await asyncio.sleep(0.3)
            fillers.append(asyncio.ensure_future(busy.post("/encode", content=npy(sample(2)), headers=NPY_HEADERS)))
            await asyncio.sleep(0.3)
            refused = await client.post("/encode", content=b"\0" * (16 * MIB), headers=RAW, timeout=60)
            assert_error(refused, 429, "overloaded")
            assert refused.headers["retry-after"] == "1"
            for filler, i in zip(await asyncio.gather(*fillers), (0, 2), strict=True):
                assert filler.status_code == 200
                assert_answer(sample(i), filler.content)
        await then_a_normal_request_works(url)

    asyncio.run(scenario())


def test_415_decided_from_the_headers_is_read(url: str) -> None:
    async def scenario() -> None:
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            response = await client.post("/encode", content=b"\0" * (16 * MIB), headers={"content-type": "text/csv"})
            assert_error(response, 415, "unsupported_media_type")
        await then_a_normal_request_works(url)

    asyncio.run(scenario())


def test_every_early_answer_was_drained_not_cut_off(url: str) -> None:
    # Runs after the others (same module server): what became of each unread body.
    text = metrics_of(url)
    assert metric(text, "encoder_unread_bodies_total", result="drained") >= 5
    assert metric(text, "encoder_unread_bodies_total", result="limit") == 0


def read_response(sock: socket.socket) -> bytes:
    """One whole HTTP response with a Content-Length (its head and body may arrive in separate segments)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed after {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    fields = dict(line.split(b":", 1) for line in head.split(b"\r\n")[1:])
    length = int({k.strip().lower(): v for k, v in fields.items()}[b"content-length"])
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed after {len(body)} of {length} body bytes"
        body += chunk
    return head + b"\r\n\r\n" + body


def test_an_idle_keep_alive_connection_is_reused_after_uvicorns_old_5_s(tmp_path: Path) -> None:
    # uvicorn's own default closed idle connections after 5 s: a client (or proxy) reusing one just then got a
    # reset. The service's default (--keep-alive-s 90) keeps it open; a bare socket shows it (httpx would
    # quietly reconnect).
    with running(fake_args(), tmp_path / "server.log") as base:
        port = urlparse(base).port
        assert port is not None
        request = f"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode()
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            sock.sendall(request)
            assert read_response(sock).startswith(b"HTTP/1.1 200")
            time.sleep(6.0)
            sock.sendall(request)
            assert read_response(sock).startswith(b"HTTP/1.1 200")
