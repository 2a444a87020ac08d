"""Deadlines and disconnects: expired requests are never computed; clients that leave are dropped and counted."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from urllib.parse import urlparse

import httpx
import pytest

from tests.reliability.support import (
    NPY_HEADERS,
    assert_answer,
    engine_calls,
    fake_server,
    metric,
    metrics_of,
    npy,
    sample,
    wait_metric,
)
from tests.service.server_support import send_raw_request

pytestmark = pytest.mark.slow
# One request at a time, each engine call 1 s: whatever queues behind the first one waits about a second.
SLOW = ("--max-batch-size", "1", "--max-delay-ms", "0", "--fake-delay-ms", "1000")
# Time for the first request to reach the engine (milliseconds in practice): the rest then queue behind it.
GET_GOING_S = 0.4


async def busy_then_expiring(url: str, count: int) -> tuple[httpx.Response, list[httpx.Response]]:
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        busy = asyncio.ensure_future(client.post("/encode", content=npy(sample(0)), headers=NPY_HEADERS))
        await asyncio.sleep(GET_GOING_S)
        headers = NPY_HEADERS | {"x-request-timeout-ms": "200"}
        posts = (client.post("/encode", content=npy(sample(i)), headers=headers) for i in range(1, count + 1))
        expiring = await asyncio.gather(*posts)
        return await busy, list(expiring)


def test_requests_past_their_deadline_are_never_computed(tmp_path: Path) -> None:
    with fake_server(tmp_path / "server.log", *SLOW) as (url, _):
        busy, expiring = asyncio.run(busy_then_expiring(url, 6))
        text = metrics_of(url)
    assert busy.status_code == 200
    assert_answer(sample(0), busy.content)
    assert [r.status_code for r in expiring] == [504] * 6
    assert all(r.json()["error"]["type"] == "deadline_exceeded" for r in expiring)
    assert engine_calls(text) == 1  # only the busy request reached the engine
    assert metric(text, "encoder_samples_processed_total") == 1
    assert metric(text, "encoder_dropped_requests_total", reason="timeout") == 6
    assert metric(text, "encoder_requests_total", outcome="timeout") == 6


def test_clients_that_leave_are_dropped_before_compute_and_counted(tmp_path: Path) -> None:
    with fake_server(tmp_path / "server.log", *SLOW) as (url, _):
        port = urlparse(url).port
        assert port is not None
        busy = send_raw_request(port, npy(sample(0)), "application/x-npy")
        time.sleep(GET_GOING_S)
        leaving = [send_raw_request(port, npy(sample(i)), "application/x-npy") for i in range(1, 5)]
        wait_metric(url, "encoder_queue_depth", 4)
        for sock in leaving:
            sock.close()
        wait_metric(url, "encoder_requests_total", 4, outcome="cancelled")
        assert busy.recv(12) == b"HTTP/1.1 200"
        busy.close()
        wait_metric(url, "encoder_requests_total", 1, outcome="ok")
        after = httpx.post(f"{url}/encode", content=npy(sample(9)), headers=NPY_HEADERS, timeout=30)
        text = metrics_of(url)
    assert after.status_code == 200
    assert_answer(sample(9), after.content)
    assert metric(text, "encoder_dropped_requests_total", reason="cancelled") == 4
    assert engine_calls(text) == 2  # the busy request and the one after: none of the four that left
    assert metric(text, "encoder_queue_depth") == 0
