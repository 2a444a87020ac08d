"""BodyGuard against a scripted server: what it sends, what it reads off, and when it leaves messages alone."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

from service.api.early import RESULTS, BodyGuard, DiscardLimits, has_body
from service.metrics import Metrics
from tests.service.support import metric, serving

pytestmark = pytest.mark.timeout(30)
CHUNK = b"x" * 1000
START = {"type": "http.response.start", "status": 413, "headers": [(b"content-length", b"2")]}
BODY = {"type": "http.response.body", "body": b"{}"}


class Wire:
    """The server side of one request: body chunks to hand out (then a disconnect, or a hang), messages sent."""

    def __init__(self, chunks: int, then: str = "end") -> None:
        self.chunks = chunks
        self.then = then  # after the chunks: "end" (last chunk), "disconnect", or "hang" (a stalled client)
        self.read = 0
        self.sent: list[dict[str, Any]] = []
        self.sent_when_read: list[int] = []  # how many chunks had been read when each message was sent

    async def receive(self) -> dict[str, Any]:
        if self.read < self.chunks:
            self.read += 1
            return {"type": "http.request", "body": CHUNK, "more_body": True}
        if self.then == "hang":
            await asyncio.sleep(3600)
        if self.then == "disconnect":
            return {"type": "http.disconnect"}
        self.read += 1
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(self, message: dict[str, Any]) -> None:
        self.sent.append(message)
        self.sent_when_read.append(self.read)


def guarded(wire: Wire, max_bytes: int = 1 << 20, max_s: float = 5.0) -> tuple[BodyGuard, list[str]]:
    results: list[str] = []
    return BodyGuard(wire.receive, wire.send, DiscardLimits(max_bytes, max_s, results.append)), results


def close_headers(message: dict[str, Any]) -> list[tuple[bytes, bytes]]:
    return [(n, v) for n, v in message["headers"] if n.lower() == b"connection"]


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ([], False),
        ([(b"content-length", b"0")], False),
        ([(b"host", b"x"), (b"content-length", b"12")], True),
        ([(b"transfer-encoding", b"chunked")], True),
        ([(b"content-length", b"twelve")], True),
    ],
)
def test_has_body(headers: list[tuple[bytes, bytes]], expected: bool) -> None:
    assert has_body(headers) is expected


def test_an_answer_after_the_body_was_read_is_left_alone() -> None:
    async def scenario() -> None:
        wire = Wire(chunks=2)
        guard, results = guarded(wire)
        while (await guard.receive())["more_body"]:
            pass
        await guard.send(START)
        await guard.send(BODY)
        assert wire.sent == [START, BODY] and results == []

    asyncio.run(scenario())


def test_an_early_answer_goes_out_whole_then_the_rest_is_read_then_it_closes() -> None:
    async def scenario() -> None:
        wire = Wire(chunks=50)
        guard, results = guarded(wire)
        await guard.receive()  # the app read one chunk, then refused
        await guard.send({**START, "headers": [*START["headers"], (b"Connection", b"keep-alive")]})
        await guard.send(BODY)
        start, body, last = wire.sent
        assert close_headers(start) == [(b"connection", b"close")]  # replaces whatever the app said
        assert body == {**BODY, "more_body": True} and wire.sent_when_read[1] == 1  # before reading the rest
        assert last == {"type": "http.response.body", "body": b"", "more_body": False}
        assert wire.sent_when_read[2] == 51 and results == ["drained"]  # all of it read, then the last message

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("wire", "limits", "result"),
    [
        (lambda: Wire(chunks=50), {"max_bytes": 10 * len(CHUNK)}, "limit"),
        (lambda: Wire(chunks=3, then="hang"), {"max_s": 0.2}, "limit"),
        (lambda: Wire(chunks=3, then="disconnect"), {}, "disconnected"),
    ],
)
def test_the_rest_is_read_within_bounds(wire: Callable[[], Wire], limits: dict[str, Any], result: str) -> None:
    async def scenario() -> None:
        w = wire()
        guard, results = guarded(w, **limits)
        await guard.send(START)
        await asyncio.wait_for(guard.send(BODY), 5)
        assert results == [result] and w.sent[-1]["more_body"] is False
        if result == "limit" and w.then == "end":
            assert w.read == 11  # stops at the first chunk past the byte bound: the rest stays unread

    asyncio.run(scenario())


def test_every_result_is_a_metric_label() -> None:
    metrics = Metrics(multiprocess_mode=False)
    for result in RESULTS:
        metrics.observe_unread_body(result)
    page = metrics.render().decode()
    assert all(metric(page, "encoder_unread_bodies_total", result=r) == 1 for r in RESULTS)


@pytest.mark.anyio
async def test_the_app_guards_every_route_with_a_body_and_no_route_without_one() -> None:
    async with serving(discard_body_bytes=1 << 20) as (client, app):
        big = b"\0" * 300_000  # several chunks through httpx's in-process transport
        encode = await client.post("/encode", content=big, headers={"content-type": "text/csv"})  # fast path: 415
        missing = await client.post("/no-such-route", content=big)  # a FastAPI route: 404
        ready = await client.get("/readyz")
        page = (await client.get("/metrics")).text
    assert encode.status_code == 415 and encode.json()["error"]["type"] == "unsupported_media_type"
    assert missing.status_code == 404
    assert encode.headers["connection"] == missing.headers["connection"] == "close"
    assert "connection" not in ready.headers  # no body, no guard: keep-alive as usual
    assert metric(page, "encoder_unread_bodies_total", result="drained") == 2
    assert app.discard_limits.max_bytes == 1 << 20
