"""Dynamic batching: one asyncio task owns the queue; the engine runs on a dedicated thread.

Nothing here imports FastAPI, onnxruntime or prometheus_client: results and measurements leave through
return values and the :class:`~service.batching.observer.BatcherObserver` interface.
"""

from __future__ import annotations

from service.batching.batcher import Batcher, BatcherConfig, BatchResult
from service.batching.errors import BatcherStopped, BatchingError, DeadlineExceeded, EngineFailed, Overloaded
from service.batching.observer import BatcherObserver, BatchStats, NullObserver

__all__ = [
    "BatchResult",
    "BatchStats",
    "Batcher",
    "BatcherConfig",
    "BatcherObserver",
    "BatcherStopped",
    "BatchingError",
    "DeadlineExceeded",
    "EngineFailed",
    "NullObserver",
    "Overloaded",
]
