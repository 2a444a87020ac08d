"""uvicorn's Server with a graceful drain: what SIGTERM does to a single-worker service (service/drain.py
builds the same for ``--workers N`` on it).

1. At once: /readyz answers 503, so load balancers stop sending new work; requests that still arrive meanwhile
   are served (their balancer has not noticed yet).
2. After ``drain_s``: uvicorn closes the listener and waits (up to ``graceful_timeout_s``) for every accepted
   request to be answered; then the lifespan shutdown lets the batcher finish what is queued and releases the
   engine.
3. The process exits 0: uvicorn would re-raise the signal after its graceful shutdown, and "killed by
   SIGTERM" is the wrong story when every accepted request was answered.

A later signal ends the drain window at once; one during the shutdown itself forces the exit.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from types import FrameType

import uvicorn

log = logging.getLogger(__name__)


class DrainingServer(uvicorn.Server):
    """See the module docstring. ``on_drain`` is called (in the main thread) when the first signal arrives."""

    def __init__(self, config: uvicorn.Config, on_drain: Callable[[], None], drain_s: float = 0.0) -> None:
        super().__init__(config)
        self._on_drain = on_drain
        self._drain_s = drain_s
        self._drain_until: float | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Deliberately not recorded in self._captured_signals (see the module docstring, point 3).
        if self._drain_until is None:
            self._drain_until = time.monotonic() + self._drain_s
            self._on_drain()
            log.info("signal %s: draining for %.1f s, then finishing accepted requests", sig, self._drain_s)
            self.should_exit = self._drain_s <= 0
        elif self.should_exit:
            self.force_exit = True
        else:
            self.should_exit = True

    async def on_tick(self, counter: int) -> bool:
        if self._drain_until is not None and time.monotonic() >= self._drain_until:
            self.should_exit = True
        return await super().on_tick(counter)
