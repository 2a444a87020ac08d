"""Overload: a burst far beyond capacity gets only 200s and 429s, every 200 is right, memory stays bounded."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

import httpx
import pytest

from tests.reliability.support import NPY_HEADERS, RssSampler, assert_answer, fake_server, metric, metrics_of, npy
from tests.reliability.support import sample as make_sample

pytestmark = pytest.mark.slow
MIB = 1 << 20


async def burst(url: str, bodies: list[bytes]) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=len(bodies), max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        return await asyncio.gather(*(client.post("/encode", content=b, headers=NPY_HEADERS) for b in bodies))


def test_a_burst_gets_only_200_or_429_and_every_200_is_its_own_answer(tmp_path: Path) -> None:
    flags = ("--max-queue", "4", "--max-batch-size", "4", "--max-delay-ms", "2", "--fake-delay-ms", "30")
    xs = [make_sample(i, batch=1 + i % 2) for i in range(300)]
    with fake_server(tmp_path / "server.log", *flags) as (url, _):
        responses = asyncio.run(burst(url, [npy(x) for x in xs]))
        text = metrics_of(url)
        ready = httpx.get(f"{url}/readyz").status_code
    statuses = Counter(r.status_code for r in responses)
    print(f"burst of {len(xs)}: {dict(statuses)}")
    assert set(statuses) <= {200, 429} and statuses[200] > 0 and statuses[429] > 0
    for x, response in zip(xs, responses, strict=True):
        if response.status_code == 200:
            assert_answer(x, response.content)
        else:
            assert response.headers["retry-after"] == "1"
            assert response.json()["error"]["type"] == "overloaded"
    assert metric(text, "encoder_requests_total", outcome="overloaded") == statuses[429]
    assert metric(text, "encoder_requests_total", outcome="ok") == statuses[200]
    assert ready == 200


def test_memory_stays_bounded_when_a_burst_of_large_bodies_overflows(tmp_path: Path) -> None:
    # 200 clients x 2 MiB: unbounded, the server would hold 400+ MiB of bodies (plus decoded copies). With
    # max_queue 2 and batches of 8 it admits 10 requests at a time and refuses the rest before reading them.
    x = make_sample(7, batch=1024, seq=64)
    body = npy(x)
    assert len(body) >= 2 * MIB
    flags = ("--max-queue", "2", "--max-batch-size", "8", "--max-delay-ms", "0")
    with fake_server(tmp_path / "server.log", *flags) as (url, process):
        asyncio.run(burst(url, [body] * 4))  # warm: first allocations, imports on first use
        baseline = process.memory_info().rss
        with RssSampler(process, period_s=0.05) as rss:
            responses = asyncio.run(burst(url, [body] * 200))
    statuses = Counter(r.status_code for r in responses)
    growth = (rss.peak - baseline) / MIB
    print(f"large-body burst: {dict(statuses)}; RSS baseline {baseline / MIB:.0f} MiB, peak growth {growth:.0f} MiB")
    assert set(statuses) <= {200, 429} and statuses[200] > 0 and statuses[429] > 0
    first_ok = next(r for r in responses if r.status_code == 200)
    assert_answer(x, first_ok.content)
    assert all(r.content == first_ok.content for r in responses if r.status_code == 200)
    assert growth < 250, f"RSS grew {growth:.0f} MiB during the burst"
