"""Engine faults in a real process: a failing batch fails only its requests; a dead loop is reported."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import numpy as np
import pytest

from service.engine.fake import FATAL, POISON
from tests.reliability.support import NPY_HEADERS, assert_answer, fake_server, metric, metrics_of, npy, sample

pytestmark = pytest.mark.slow
# Batches gather requests for 50 ms; sequence lengths are never mixed in a batch, so a poisoned request at
# seq 5 cannot share its batch with the healthy ones at seq 4.
FLAGS = ("--max-batch-size", "8", "--max-delay-ms", "50")


def marked(value: float, seq: int = 5) -> np.ndarray:
    x = sample(99, seq=seq)
    x[0, 0, 0] = value
    return x


async def post_all(url: str, xs: list[np.ndarray]) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        return await asyncio.gather(*(client.post("/encode", content=npy(x), headers=NPY_HEADERS) for x in xs))


def test_a_failing_batch_fails_only_its_requests_and_the_next_batch_succeeds(tmp_path: Path) -> None:
    healthy = [sample(i) for i in range(12)]
    with fake_server(tmp_path / "server.log", *FLAGS) as (url, _):
        poisoned, *answers = asyncio.run(post_all(url, [marked(POISON), *healthy]))
        (after,) = asyncio.run(post_all(url, [sample(50)]))
        text = metrics_of(url)
        ready = httpx.get(f"{url}/readyz").status_code
    assert poisoned.status_code == 500 and poisoned.json()["error"]["type"] == "inference_failed"
    for x, response in zip(healthy, answers, strict=True):
        assert response.status_code == 200
        assert_answer(x, response.content)
    assert after.status_code == 200
    assert_answer(sample(50), after.content)
    assert metric(text, "encoder_batch_failures_total") == 1
    assert metric(text, "encoder_requests_total", outcome="error") == 1
    assert metric(text, "encoder_batcher_alive") == 1 and ready == 200


def test_an_unrecoverable_engine_error_stops_the_loop_visibly(tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    with fake_server(log, *FLAGS) as (url, _):
        (before,) = asyncio.run(post_all(url, [sample(1)]))
        (fatal,) = asyncio.run(post_all(url, [marked(FATAL)]))
        ready = httpx.get(f"{url}/readyz")
        health = httpx.get(f"{url}/healthz")
        (refused,) = asyncio.run(post_all(url, [sample(2)]))
        text = metrics_of(url)
    assert before.status_code == 200
    assert fatal.status_code == 500 and fatal.json()["error"]["type"] == "inference_failed"
    assert ready.status_code == 503 and "batching loop died" in ready.json()["error"]["message"]
    assert health.status_code == 503  # only a restart helps: the orchestrator's liveness probe sees it
    assert refused.status_code == 503 and refused.headers["retry-after"] == "1"  # not a 500: retry elsewhere
    assert metric(text, "encoder_batcher_alive") == 0
    assert metric(text, "encoder_batch_failures_total") == 1
    assert "batching loop died" in log.read_text() and "EngineUnrecoverable" in log.read_text()
