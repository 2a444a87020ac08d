"""Graceful shutdown: on SIGTERM readiness turns 503, every accepted request is answered, the exit is 0."""

from __future__ import annotations

import asyncio
import concurrent.futures
import signal
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.reliability.support import (
    NPY_HEADERS,
    assert_answer,
    fake_server,
    metric,
    metrics_of,
    npy,
    sample,
    wait_until,
)

pytestmark = pytest.mark.slow
ACCEPTED = 12
BATCH = 4
ENGINE_S = 1.0  # per batch: the 12 accepted requests need 3 s of engine time after SIGTERM
EXIT_BOUND_S = 30.0


async def post_all(url: str, xs: list[np.ndarray]) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        return await asyncio.gather(*(client.post("/encode", content=npy(x), headers=NPY_HEADERS) for x in xs))


def all_accepted(url: str) -> bool:
    # One batch computing and the rest queued: every request is inside the service.
    return metric(metrics_of(url), "encoder_queue_depth") >= ACCEPTED - BATCH


@pytest.mark.parametrize("drain_s", [0.0, 1.5])
def test_sigterm_finishes_every_accepted_request_then_exits_0(tmp_path: Path, drain_s: float) -> None:
    xs = [sample(i) for i in range(ACCEPTED)]
    flags = ("--max-batch-size", str(BATCH), "--max-delay-ms", "0", "--fake-delay-ms", str(ENGINE_S * 1000))
    log = tmp_path / "server.log"
    with (
        fake_server(log, *flags, "--drain-s", str(drain_s)) as (url, process),
        concurrent.futures.ThreadPoolExecutor(1) as pool,
    ):
        accepted = pool.submit(asyncio.run, post_all(url, xs))
        wait_until(lambda: all_accepted(url), "every request to be accepted")
        signalled = time.monotonic()
        process.send_signal(signal.SIGTERM)
        if drain_s:
            # The drain window: readiness says 503 while a request that still arrives is served.
            ready = httpx.get(f"{url}/readyz", timeout=10)
            assert ready.status_code == 503 and "shutting down" in ready.json()["error"]["message"]
            late = httpx.post(f"{url}/encode", content=npy(sample(99)), headers=NPY_HEADERS, timeout=60)
            assert late.status_code == 200
            assert_answer(sample(99), late.content)
        responses = accepted.result(timeout=EXIT_BOUND_S)
        code = process.wait(timeout=EXIT_BOUND_S)
        took = time.monotonic() - signalled
    assert [r.status_code for r in responses] == [200] * ACCEPTED
    for x, response in zip(xs, responses, strict=True):
        assert_answer(x, response.content)
    assert code == 0, log.read_text()[-3000:]
    assert took < EXIT_BOUND_S
    text = log.read_text()
    assert "Application shutdown complete" in text and "Cancel" not in text
    with pytest.raises(httpx.ConnectError):  # the listener is closed
        httpx.get(f"{url}/readyz", timeout=5)
