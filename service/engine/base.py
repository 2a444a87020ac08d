"""The engine interface the service is written against."""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import numpy as np


class EngineUnrecoverable(RuntimeError):
    """Raised by ``Engine.run`` when the engine can never compute again (e.g. a CUDA context lost to an illegal
    memory access). An ordinary exception fails only its batch; this one also stops the batching loop, so
    /readyz and /healthz turn 503 and the orchestrator restarts the process."""


class EngineGone(EngineUnrecoverable):
    """The engine never computed this batch and never will (the shared engine process is gone or broke on
    another batch): its requests get 503 like those still queued, not the 500 of a batch that failed."""


class EngineUnreached(EngineGone):
    """The batch never reached the engine process (it was gone when the request was sent): its input is intact,
    so it can be sent to another engine."""


class EngineLost(RuntimeError):
    """The engine process computing this batch died (or broke) before answering, while other engines serve and
    it is being restarted: its requests get 503 (to be retried), but the batching loop goes on."""


@runtime_checkable
class Engine(Protocol):
    """Computes (B, S, D) -> (B, S, D) on host arrays. ``run`` is called from one thread at a time.

    ``fixed_shapes`` says the engine is fastest at exactly the ``buckets`` batch sizes (CUDA graphs), so the
    batcher pads to them. ``warmup`` builds/captures whatever makes every bucket fast; it may be slow.
    """

    name: str
    dim: int
    dtype: np.dtype[Any]
    max_seq_len: int
    buckets: tuple[int, ...]
    provider: str
    fixed_shapes: bool

    def run(self, x: np.ndarray) -> np.ndarray: ...

    def input_buffer(self, batch: int, seq: int) -> np.ndarray:
        """An uninitialised (batch, seq, dim) array of ``dtype`` for ``run``, in the memory it likes best."""
        ...

    def warmup(self) -> None: ...

    def describe(self) -> dict[str, Any]: ...


def batch_buckets(max_batch_size: int) -> tuple[int, ...]:
    """Powers of two below ``max_batch_size``, then ``max_batch_size`` itself: (1, 2, 4, ..., max)."""
    if max_batch_size < 1:
        raise ValueError(f"max batch size must be positive, got {max_batch_size}")
    buckets = []
    size = 1
    while size < max_batch_size:
        buckets.append(size)
        size *= 2
    buckets.append(max_batch_size)
    return tuple(buckets)
