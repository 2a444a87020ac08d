"""Answers given before the request body was read reach the client: 413, 408, 429, 503, 415, 404 and the like.

An early answer (refused from ``Content-Length``, past its deadline while the body arrives, refused by admission
before reading, not ready, an unknown content type or route) leaves the rest of the body on the wire. Closing a
socket with unread bytes makes the kernel send a reset instead of a FIN, and a client that is still sending and
reads its answer only afterwards (httpx, requests over HTTP/1.1 with keep-alive, most async clients) gets a
connection error instead of the status and the JSON error.

What uvicorn 0.54 does with an unread body after the response, in both its implementations (httptools and h11),
and why the fix lives here:

* once the response is complete, ``receive()`` answers ``http.disconnect`` at once: an app cannot read the rest
  after its answer went out, so the reading must happen before the last ``http.response.body`` message;
* with ``Connection: close`` (our 413/408 said so) the transport is closed right after that message, unread bytes
  and all: the reset above;
* with keep-alive the parser goes on reading and discarding the rest itself, but without any bound: incoming
  data cancels the keep-alive timer, so a client could keep one connection busy for as long as it sends.

So, whatever the route (``/encode``'s fast path, FastAPI routes, OIP), an answer that starts while the body is
unread gets ``Connection: close``; its head and body go out at once (clients that read while they send, like
aiohttp or curl, see them immediately); then the rest of the body is read and thrown away, one chunk at a time
(never held), up to ``discard_body_bytes`` and ``discard_body_s``; only then the final, empty body message lets
uvicorn close a connection with nothing unread: a FIN, and the client reads its answer. nginx's lingering close
does the same with a half-close. A client that sends more than the bounds allow is cut off (its connection may
then be reset, as with nginx after ``lingering_time``); ``encoder_unread_bodies_total{result}`` counts each case.

Only ASGI messages are used, so this works on any server that keeps delivering body chunks until the response
completes, which both uvicorn implementations do. The connection is always closed after an early answer, even
when the rest arrived in time: keep-alive had to be promised or refused in the head, before it was known
whether the rest would come; error answers are rare enough that a new connection costs nothing that matters.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from starlette.types import Message, Receive, Send

from service.metrics import UNREAD_BODY_RESULTS as RESULTS  # what became of an unread body

__all__ = ["RESULTS", "BodyGuard", "DiscardLimits", "has_body"]
_CLOSE = (b"connection", b"close")
_LAST: Message = {"type": "http.response.body", "body": b"", "more_body": False}


def _ignore(result: str) -> None:
    pass


@dataclass(frozen=True)
class DiscardLimits:
    """How much of an unread body is read and thrown away after an early answer, at most; ``on_result`` is told
    what became of each one (one of :data:`RESULTS`)."""

    max_bytes: int
    max_s: float
    on_result: Callable[[str], None] = _ignore


def has_body(headers: Iterable[tuple[bytes, bytes]]) -> bool:
    """Whether the request announces a body (``Content-Length`` above 0, or any ``Transfer-Encoding``)."""
    for name, value in headers:
        if name == b"transfer-encoding":
            return True
        if name == b"content-length":
            try:
                return int(value) != 0
            except ValueError:
                return True  # the server refuses a malformed length before the app sees it; counted as a body
    return False


class BodyGuard:
    """Wraps one request's ``receive``/``send``: notes when the body has been read, and when an answer starts
    before that, sends it with ``Connection: close`` and reads the rest before the answer's last message.
    """

    __slots__ = ("_early", "_limits", "_receive", "_send", "body_done")

    def __init__(self, receive: Receive, send: Send, limits: DiscardLimits) -> None:
        self._receive, self._send, self._limits = receive, send, limits
        self._early = False
        self.body_done = False  # the last body chunk was received (or the client left)

    async def receive(self) -> Message:
        message = await self._receive()
        if message["type"] != "http.request" or not message.get("more_body", False):
            self.body_done = True
        return message

    async def send(self, message: Message) -> None:
        if self.body_done:  # every answer given after the body was read (the common case): untouched
            await self._send(message)
            return
        kind = message["type"]
        if kind == "http.response.start":
            self._early = True
            headers = [h for h in message.get("headers", ()) if h[0].lower() != b"connection"]
            message = {**message, "headers": [*headers, _CLOSE]}
        elif kind == "http.response.body" and self._early and not message.get("more_body", False):
            await self._send({**message, "more_body": True})  # the whole answer goes out now
            self._limits.on_result(await self._discard_rest())
            message = _LAST
        await self._send(message)

    async def _discard_rest(self) -> str:
        """Read and drop body chunks until the last one, the client leaving, or a limit: which of them."""
        left = self._limits.max_bytes
        try:
            async with asyncio.timeout(self._limits.max_s):
                while True:
                    message = await self._receive()
                    if message["type"] != "http.request":
                        self.body_done = True
                        return "disconnected"
                    if not message.get("more_body", False):
                        self.body_done = True
                        return "drained"
                    left -= len(message.get("body", b""))
                    if left < 0:
                        return "limit"
        except TimeoutError:
            return "limit"
