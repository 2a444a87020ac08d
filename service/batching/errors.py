"""Domain errors raised by :meth:`Batcher.submit`; the API maps each to one HTTP status."""

from __future__ import annotations


class BatchingError(Exception):
    """Base class for errors a submitted request can end with."""


class Overloaded(BatchingError):
    """The queue already holds ``max_queue`` waiting requests; raised at once, nothing is queued."""


class DeadlineExceeded(BatchingError):
    """The request's deadline passed before its batch was computed; it was never run."""


class EngineFailed(BatchingError):
    """The engine raised while computing the batch this request was part of."""


class BatcherStopped(BatchingError):
    """The batcher is not running: not started yet, shutting down, or its loop died."""
