"""The engine process's compute thread: one batch at a time, off the event loop.

While the GPU computes a batch (``run_into`` waits on its streams), the event loop keeps reading worker frames,
queueing jobs and writing the previous batch's answers; onnxruntime and the CUDA runtime calls release the GIL
while they wait. One batch at a time: the session runs one batch at a time anyway (one set of captured slots
under one lock), so a second one handed over early could only wait, and would have been formed before the frames
that arrive meanwhile could join it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from converter.device_rows import Placed
from service.engine.base import Engine
from service.engine.jobs import run_parts

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class Computed:
    """What a batch's run gave: the batch size that ran and its seconds, or the exception it raised."""

    padded: int = 0
    seconds: float = 0.0
    failure: Exception | None = None


def compute(engine: Engine, parts: list[Placed], outs: list[Placed], finite: np.ndarray | None) -> Computed:
    """:func:`run_parts`, its exception returned rather than raised, with no traceback: the frames of one would
    hold views of client regions, which must be gone before the regions can be unmapped."""
    try:
        padded, seconds = run_parts(engine, parts, outs, finite)
    except Exception as exc:
        rows, seq = sum(int(part.shape[0]) for part in parts), int(parts[0].shape[1])
        log.warning("batch of %s samples (seq %s) failed: %s", rows, seq, exc, exc_info=True)
        _drop_tracebacks(exc)
        return Computed(failure=exc)
    return Computed(padded, seconds)


def _drop_tracebacks(exc: BaseException) -> None:
    seen: set[int] = set()
    found: BaseException | None = exc
    while found is not None and id(found) not in seen:
        seen.add(id(found))
        found.__traceback__ = None
        found = found.__cause__ or found.__context__


Done = Callable[[Computed], None]
_Work = tuple[list[Placed], list[Placed], np.ndarray | None, Done]


class ComputeThread:
    """Runs batches, one at a time, for the event loop it is bound to (:meth:`bind`); each result goes back to its
    ``done`` callback, called on the loop.

    onnxruntime keeps a session's captured CUDA graphs per thread (and captures on a thread's third run of a shape,
    in CUDA's global capture mode, which fails other threads' calls meanwhile): the engine's warm-up must run here
    too (:meth:`call`), so that the graphs it captures are the ones the batches replay.
    """

    threaded = True

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: queue.SimpleQueue[_Work | Callable[[], None] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name="engine-compute", daemon=True)
        self._thread.start()

    def call(self, fn: Callable[[], T]) -> T:
        """``fn()`` on this thread (e.g. the engine's warm-up), waited for; its exception is raised here."""
        future: Future[T] = Future()

        def run() -> None:
            try:
                future.set_result(fn())
            except BaseException as exc:  # handed to the caller, who raises it
                future.set_exception(exc)

        self._queue.put(run)
        return future.result()

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def submit(self, parts: Sequence[Placed], outs: Sequence[Placed], finite: np.ndarray | None, done: Done) -> None:
        self._queue.put((list(parts), list(outs), finite, done))

    def stop(self) -> None:
        """Ends the thread once the batch it may be computing is done (the caller waited for it)."""
        self._queue.put(None)
        self._thread.join()

    def _serve(self) -> None:
        while True:
            work = self._queue.get()
            if work is None:
                return
            if callable(work):
                work()
                continue
            parts, outs, finite, done = work
            del work
            result = compute(self._engine, parts, outs, finite)
            del parts, outs  # no view of a worker's memory outlives the batch on this thread
            assert self._loop is not None
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits for the answer
                self._loop.call_soon_threadsafe(done, result)


class InlineCompute:
    """:class:`ComputeThread`'s interface, computing on the event loop itself, which waits meanwhile: the engine
    process as it was before it had a compute thread, kept to compare the two (``--no-engine-thread``)."""

    threaded = False

    def __init__(self, engine: Engine, loop: asyncio.AbstractEventLoop) -> None:
        self._engine, self._loop = engine, loop

    def submit(self, parts: Sequence[Placed], outs: Sequence[Placed], finite: np.ndarray | None, done: Done) -> None:
        result = compute(self._engine, list(parts), list(outs), finite)
        self._loop.call_soon(done, result)  # later: the caller's views of the batch are gone by then

    def stop(self) -> None:
        pass
