"""Helpers for batcher tests: a recording observer and polling with generous timeouts."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable

from service.batching.observer import BatchStats


class RecordingObserver:
    def __init__(self) -> None:
        self.batches: list[BatchStats] = []
        self.dropped: Counter[str] = Counter()
        self.depths: list[int] = []
        self.alive: list[bool] = []

    def on_batch(self, stats: BatchStats) -> None:
        self.batches.append(stats)

    def on_dropped(self, reason: str, count: int) -> None:
        self.dropped[reason] += count

    def on_queue_depth(self, depth: int) -> None:
        self.depths.append(depth)

    def on_alive(self, alive: bool) -> None:
        self.alive.append(alive)


class BrokenObserver:
    def __getattr__(self, name: str) -> Callable[..., None]:
        def boom(*args: object) -> None:
            raise RuntimeError(f"metrics backend down ({name})")

        return boom


async def eventually(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    """Poll until ``condition()``; generous timeout so a slow CI box does not flake."""
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.005)
