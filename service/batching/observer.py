"""How the batcher reports what happens, without knowing about Prometheus.

Every call goes through :class:`SafeObserver`, so a broken metrics backend is logged, never raised into
the batching loop.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Protocol

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchStats:
    """One engine call: real samples, the shape it ran at (padded or not), and timings."""

    samples: int
    padded: int
    seq_len: int
    compute_s: float
    queue_waits_s: tuple[float, ...]
    failed: bool = False


class BatcherObserver(Protocol):
    """Receives batching events; implementations must be cheap (they run on the event loop)."""

    def on_batch(self, stats: BatchStats) -> None: ...

    def on_dropped(self, reason: str, count: int) -> None: ...

    def on_queue_depth(self, depth: int) -> None: ...

    def on_alive(self, alive: bool) -> None: ...


class NullObserver:
    """Ignores every event."""

    def on_batch(self, stats: BatchStats) -> None:
        pass

    def on_dropped(self, reason: str, count: int) -> None:
        pass

    def on_queue_depth(self, depth: int) -> None:
        pass

    def on_alive(self, alive: bool) -> None:
        pass


class SafeObserver:
    """Forwards to another observer and swallows (logs) its exceptions: metrics must not break inference."""

    def __init__(self, inner: BatcherObserver) -> None:
        self._inner = inner

    def _call(self, name: str, *args: object) -> None:
        try:
            getattr(self._inner, name)(*args)
        except Exception:
            log.warning("batcher observer %s failed", name, exc_info=True)

    def on_batch(self, stats: BatchStats) -> None:
        self._call("on_batch", stats)

    def on_dropped(self, reason: str, count: int) -> None:
        self._call("on_dropped", reason, count)

    def on_queue_depth(self, depth: int) -> None:
        self._call("on_queue_depth", depth)

    def on_alive(self, alive: bool) -> None:
        self._call("on_alive", alive)
