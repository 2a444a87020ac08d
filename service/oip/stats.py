"""The statistics extension: per-model counters in Triton's ``/v2/models/{name}/stats`` shape.

Kept per worker process (like Triton's per-server counters, each worker is one server here): with ``--workers
N`` a stats request shows the counters of the worker that answered it. The Prometheus metrics on ``/metrics`` are
the aggregate over all workers. Counting is a few integer additions on the event loop, no locks.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from service.batching.observer import BatcherObserver, BatchStats


@dataclass
class Duration:
    """Triton's ``{"count": N, "ns": total}`` pair."""

    count: int = 0
    ns: int = 0

    def add(self, seconds: float, count: int = 1) -> None:
        self.count += count
        self.ns += int(seconds * 1e9)

    def as_json(self) -> dict[str, int]:
        return {"count": self.count, "ns": self.ns}


@dataclass
class BatchDurations:
    """One engine batch size's executions (Triton's ``batch_stats`` entry)."""

    compute_infer: Duration = field(default_factory=Duration)


@dataclass
class ModelStats:
    """Counters of one model. Requests are counted by the OIP data plane (every transport); executions by the
    batcher's observer, so they include the batches ``/encode`` requests share with OIP ones."""

    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    inference_count: int = 0  # samples answered through the OIP (Triton counts batch rows)
    execution_count: int = 0  # engine batches run
    last_inference_ms: int = 0
    batches: dict[int, BatchDurations] = field(default_factory=dict)

    def record_success(self, seconds: float, queue_s: float, compute_s: float, samples: int) -> None:
        self.success.add(seconds)
        self.queue.add(queue_s)
        self.compute_infer.add(compute_s)
        self.inference_count += samples
        self.last_inference_ms = int(time.time() * 1000)

    def record_failure(self, seconds: float) -> None:
        self.fail.add(seconds)

    def on_batch(self, stats: BatchStats) -> None:
        """A batch the engine ran (for any protocol): Triton's execution count and per-batch-size timings."""
        if stats.failed:
            return
        self.execution_count += 1
        self.batches.setdefault(stats.samples, BatchDurations()).compute_infer.add(stats.compute_s)

    def as_json(self, name: str, version: str) -> dict[str, Any]:
        """One entry of ``model_stats``, as Triton writes it (input/output copies are part of compute_infer)."""
        zero = Duration().as_json()
        return {
            "name": name,
            "version": version,
            "last_inference": self.last_inference_ms,
            "inference_count": self.inference_count,
            "execution_count": self.execution_count,
            "inference_stats": {
                "success": self.success.as_json(),
                "fail": self.fail.as_json(),
                "queue": self.queue.as_json(),
                "compute_input": zero,
                "compute_infer": self.compute_infer.as_json(),
                "compute_output": zero,
                "cache_hit": zero,
                "cache_miss": zero,
            },
            "response_stats": {},
            "batch_stats": [
                {
                    "batch_size": size,
                    "compute_input": zero,
                    "compute_infer": durations.compute_infer.as_json(),
                    "compute_output": zero,
                }
                for size, durations in sorted(self.batches.items())
            ],
            "memory_usage": [],
        }


class StatsObserver:
    """A batcher observer that also counts executions into :class:`ModelStats`, then forwards to ``inner``."""

    def __init__(self, inner: BatcherObserver, stats: ModelStats) -> None:
        self._inner = inner
        self._stats = stats

    def on_batch(self, stats: BatchStats) -> None:
        self._stats.on_batch(stats)
        self._inner.on_batch(stats)

    def on_dropped(self, reason: str, count: int) -> None:
        self._inner.on_dropped(reason, count)

    def on_queue_depth(self, depth: int) -> None:
        self._inner.on_queue_depth(depth)

    def on_alive(self, alive: bool) -> None:
        self._inner.on_alive(alive)
