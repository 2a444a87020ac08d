"""The dynamic batcher: ``submit`` from any request handler; one asyncio task forms and runs batches.

A batch is sent when ``max_batch_size`` samples of one sequence length wait, or ``max_delay_s`` after the
oldest of them arrived. The engine runs on a dedicated single thread, so the event loop keeps parsing and
queueing requests while a batch computes, and the next batch is formed from everything that arrived
meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import traceback
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from service.batching.errors import BatcherStopped, DeadlineExceeded, EngineFailed, Overloaded
from service.batching.observer import BatcherObserver, BatchStats, NullObserver, SafeObserver
from service.batching.queue import Done, Item, PendingQueue, Placed, Ticket
from service.batching.running import (
    BatchEngine,
    pad_size,
    run_batch,
    run_batch_timed,
    run_placed_timed,
    run_split_timed,
)
from service.engine.base import EngineGone, EngineLost, EngineUnrecoverable

__all__ = ["BatchEngine", "BatchResult", "Batcher", "BatcherConfig", "pad_size", "run_batch", "run_batch_timed"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatcherConfig:
    """Plain values from the settings. ``pad_buckets`` set means: pad every batch up to one of these sizes."""

    max_batch_size: int = 32
    max_delay_s: float = 0.005
    max_queue: int = 1024
    pad_buckets: tuple[int, ...] | None = None
    # Batches computing at once. 1 for an in-process engine (one GPU stream); more for an engine that lives
    # elsewhere, so the next batch is on its way while the previous one's answer travels back.
    max_in_flight: int = 1

    def __post_init__(self) -> None:
        if self.max_batch_size < 1 or self.max_queue < 1 or self.max_delay_s < 0 or self.max_in_flight < 1:
            raise ValueError(f"invalid batcher config {self}")
        if self.pad_buckets is not None and max(self.pad_buckets) < self.max_batch_size:
            raise ValueError(f"pad buckets {self.pad_buckets} cannot hold max_batch_size {self.max_batch_size}")


@dataclass(frozen=True)
class BatchResult:
    """A request's output in input order, with the longest queue wait and the summed compute of its chunks."""

    output: np.ndarray
    queue_s: float
    compute_s: float


class Batcher:
    """Owns the request queue and the engine thread. ``start()``/``stop()`` are explicit; the constructor is cheap."""

    def __init__(self, engine: BatchEngine, config: BatcherConfig, observer: BatcherObserver | None = None) -> None:
        self._engine = engine
        self.config = config
        self._observer = SafeObserver(observer or NullObserver())
        self._queue = PendingQueue()
        self._waiting = 0  # requests with at least one chunk still queued
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        # One thread for every engine call: warm-up (e.g. CUDA-graph capture) and batches run on the same one.
        self._executor = ThreadPoolExecutor(max_workers=config.max_in_flight, thread_name_prefix="encoder-engine")
        self._slots = asyncio.Semaphore(config.max_in_flight)
        self._in_flight: set[asyncio.Task[None]] = set()  # batches computing now
        self._broken: BaseException | None = None  # what a batch task died of: the loop dies of it too
        self._stopping = False
        self._closing = False  # stop() was called: no new work, whatever is queued may still finish
        self._computing = 0  # batches on the engine now
        self.failure: str | None = None  # why the loop died, if it did

    @property
    def alive(self) -> bool:
        """True while the batching loop runs; False before start, after stop, or when the loop died."""
        return self._task is not None and not self._task.done() and not self._stopping

    @property
    def queue_depth(self) -> int:
        return self._waiting

    async def warm_up(self) -> None:
        """Run the engine's warm-up on the engine thread (call before ``start``; it may take long)."""
        await asyncio.get_running_loop().run_in_executor(self._executor, self._engine.warmup)

    def start(self) -> None:
        if self._task is not None:
            raise RuntimeError("batcher already started")
        self._task = asyncio.get_running_loop().create_task(self._run(), name="encoder-batcher")
        self._observer.on_alive(True)

    async def stop(self, drain_s: float = 0.0) -> None:
        """Stop the loop; whatever still waits fails with :class:`BatcherStopped`.

        With ``drain_s``, new submits are refused at once but queued and computing work gets up to ``drain_s``
        to finish first, so a graceful shutdown never throws away work it already accepted.
        """
        self._closing = True
        if drain_s > 0 and self.alive:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(drain_s):  # not wait_for: see _next_ready_group
                    await self._until_idle()
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for task in list(self._in_flight):
            task.cancel()
        await asyncio.gather(*self._in_flight, return_exceptions=True)
        self._fail_queued(BatcherStopped, "the service is shutting down")
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._observer.on_alive(False)

    async def _until_idle(self) -> None:
        # Polling, not an event: it runs once per process lifetime, and a 10 ms tick keeps the loop code simple.
        while (self._queue or self._computing) and self.alive:
            await asyncio.sleep(0.01)

    async def submit(self, x: np.ndarray | Placed, deadline: float | None = None) -> BatchResult:
        """Compute ``x`` (B, S, D), split into chunks of at most ``max_batch_size`` samples. A :class:`Placed` ``x``
        is answered in its ``output`` (the engine must have ``run_placed``).

        ``deadline`` is a ``time.monotonic()`` instant: if it passes before a chunk is computed, the request
        ends with :class:`DeadlineExceeded` and its other queued chunks are withdrawn.
        """
        if not self.alive or self._closing:
            # Say why when the loop died: a request racing the loop's death gets the same answer as one after it.
            reason = f"the batching loop died: {self.failure}" if self.failure else "the batcher is not running"
            raise BatcherStopped(reason)
        if self._waiting >= self.config.max_queue:
            raise Overloaded(f"{self._waiting} requests are already waiting (max_queue={self.config.max_queue})")
        items = self._enqueue(x, deadline)
        failure: Exception | None = None
        try:
            done = await self._wait(items, deadline)
        except asyncio.CancelledError:
            if self._withdraw(items):
                self._drop(items[0].ticket, "cancelled")
            raise
        except Exception as exc:
            failure = exc
        finally:
            self._cancel_unfinished(items)
        if failure is not None:
            # Raised with no cycle through its traceback: _wait's frame and this one hold the futures, which hold
            # the error; ``items`` (maybe a client's shared-memory region, unmapped only once it is garbage) would
            # then live until a garbage collection, perhaps never in an idle worker.
            traceback.clear_frames(failure.__traceback__)
            del items
            try:
                raise failure
            finally:
                del failure
        if not isinstance(x, np.ndarray):
            output = x.output  # its chunks' answers lie there already, in order
        else:
            output = done[0].output if len(done) == 1 else np.concatenate([d.output for d in done], axis=0)
        return BatchResult(output, max(d.queue_s for d in done), sum(d.compute_s for d in done))

    def _enqueue(self, x: np.ndarray | Placed, deadline: float | None) -> list[Item]:
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        step = self.config.max_batch_size
        chunks = [x[i : i + step] for i in range(0, x.shape[0], step)]
        ticket = Ticket(waiting=len(chunks))
        items = [Item(chunk, loop.create_future(), ticket, now, deadline) for chunk in chunks]
        for item in items:
            self._queue.add(item)
        self._waiting += 1
        self._observer.on_queue_depth(self._waiting)
        self._wakeup.set()
        return items

    async def _wait(self, items: list[Item], deadline: float | None) -> list[Done]:
        futures = [item.future for item in items]
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        while True:
            done, pending = await asyncio.wait(futures, timeout=timeout, return_when=asyncio.FIRST_EXCEPTION)
            # Read every finished future's exception, so none is logged as "never retrieved".
            errors = [f.exception() for f in done if not f.cancelled()]
            error = next((e for e in errors if e is not None), None)
            if error is not None:
                self._withdraw(items)
                raise error
            if not pending:
                return [f.result() for f in futures]
            if self._withdraw(items):
                self._drop(items[0].ticket, "timeout")
                raise DeadlineExceeded("the request's deadline passed while it waited in the queue")
            timeout = None  # every chunk left is computing now: its result is worth waiting for

    def _withdraw(self, items: list[Item]) -> int:
        """Take a request's still-queued chunks out of the queue; returns how many there were."""
        removed = 0
        for item in items:
            if self._queue.discard(item):
                removed += 1
                item.future.cancel()
                self._left_queue(item)
        return removed

    @staticmethod
    def _cancel_unfinished(items: list[Item]) -> None:
        """The caller is done with these chunks: results or errors arriving later go nowhere."""
        for item in items:
            item.future.cancel()

    def _left_queue(self, item: Item) -> None:
        item.ticket.waiting -= 1
        if item.ticket.waiting == 0:
            self._waiting -= 1
            self._observer.on_queue_depth(self._waiting)

    def _drop(self, ticket: Ticket, reason: str) -> None:
        """Count a request that was never computed, once however many chunks it had."""
        if not ticket.dropped:
            ticket.dropped = True
            self._observer.on_dropped(reason, 1)

    async def _run(self) -> None:
        try:
            while True:
                await self._slots.acquire()
                try:
                    seq_len = await self._next_ready_group()
                    batch = self._take(seq_len)
                except BaseException:
                    self._slots.release()
                    raise
                if not batch:
                    self._slots.release()
                    continue
                # A task per batch, whatever max_in_flight: with one slot the loop simply waits for it here.
                task = asyncio.get_running_loop().create_task(self._compute_in_flight(batch))
                self._in_flight.add(task)
                task.add_done_callback(self._in_flight.discard)
                # Not held here until the next batch: an input may hold a shared-memory region that is unmapped
                # only when its last request is done (and the task holds the batch while it computes).
                del batch, task
        except asyncio.CancelledError:
            if self._broken is None:
                raise
            self._die(self._broken)
        except Exception as exc:
            self._die(exc)

    async def _compute_in_flight(self, batch: list[Item]) -> None:
        try:
            await self._compute(batch)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # only EngineUnrecoverable gets here: the engine is broken for good, so the loop dies
            if self._broken is None and self._task is not None:
                self._broken = exc
                self._task.cancel()
        finally:
            self._slots.release()

    def _die(self, exc: BaseException) -> None:
        # A bug here must not leave a green /readyz over a queue nobody serves.
        log.error("batching loop died; the service is not ready any more", exc_info=exc)
        self.failure = f"{type(exc).__name__}: {exc}"
        self._observer.on_alive(False)
        self._fail_queued(BatcherStopped, f"the batching loop died: {exc}")

    async def _next_ready_group(self) -> int:
        while True:
            now = time.monotonic()
            seq_len, due = self._queue.ready(now, self.config.max_batch_size, self.config.max_delay_s)
            if seq_len is not None:
                return seq_len
            self._wakeup.clear()
            timeout = None if due is None else max(0.0, due - now)
            # asyncio.timeout, not wait_for: Python 3.11's wait_for swallows a cancellation that lands in the same
            # tick as the wake-up, so stop() could hang and a dying batch task could fail to end the loop.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._wakeup.wait()

    def _take(self, seq_len: int) -> list[Item]:
        now = time.monotonic()

        def accept(item: Item) -> bool:
            if item.future.done():  # the caller went away (or already failed) while it waited
                self._drop(item.ticket, "cancelled")
                return False
            if item.deadline is not None and now >= item.deadline:
                item.future.set_exception(DeadlineExceeded("the request's deadline passed before compute"))
                self._drop(item.ticket, "timeout")
                return False
            return True

        taken, rejected = self._queue.take(seq_len, self.config.max_batch_size, accept)
        for item in (*taken, *rejected):
            self._left_queue(item)
        return taken

    async def _compute(self, batch: list[Item]) -> None:
        samples = sum(item.samples for item in batch)
        started = time.monotonic()
        waits = tuple(started - item.enqueued for item in batch)
        loop = asyncio.get_running_loop()
        inputs = [item.x for item in batch]
        padded = samples
        call: asyncio.Future[tuple[Sequence[np.ndarray | Exception], float, float]]
        if all(isinstance(x, np.ndarray) for x in inputs):
            padded = pad_size(samples, self.config.pad_buckets)
            call = loop.run_in_executor(self._executor, run_split_timed, self._engine, inputs, padded)
        else:
            call = loop.run_in_executor(self._executor, run_placed_timed, self._engine, inputs)
        self._computing += 1
        try:
            out, compute_s, away_s = await call
        except asyncio.CancelledError:
            self._fail(batch, BatcherStopped, "the service shut down while this request was computing")
            raise
        except Exception as exc:
            log.warning("batch of %s samples (seq %s) failed: %s", samples, batch[0].seq_len, exc, exc_info=True)
            if isinstance(exc, (EngineGone, EngineLost)):  # never computed or never came back: retry later
                self._fail(batch, BatcherStopped, f"the engine is gone: {exc}")
            else:
                self._fail(batch, EngineFailed, f"inference failed: {type(exc).__name__}: {exc}")
            stats = BatchStats(samples, padded, batch[0].seq_len, time.monotonic() - started, waits, failed=True)
            self._observer.on_batch(stats)
            if isinstance(exc, EngineUnrecoverable):
                raise  # the engine says it is broken for good: the loop dies, readiness and health report it
            return
        finally:
            self._computing -= 1
        self._observer.on_batch(BatchStats(samples, padded, batch[0].seq_len, compute_s, waits))
        for item, wait, answer in zip(batch, waits, out, strict=True):
            if item.future.done():
                continue
            if isinstance(answer, Exception):  # the engine refused this input alone (e.g. NaN/Inf where it lies)
                item.future.set_exception(answer)
            else:
                item.future.set_result(Done(answer, wait + away_s, compute_s))

    @staticmethod
    def _fail(items: list[Item], error: type[Exception], message: str) -> None:
        # One exception object per future: a shared one would collect every waiter's traceback.
        for item in items:
            if not item.future.done():
                item.future.set_exception(error(message))

    def _fail_queued(self, error: type[Exception], message: str) -> None:
        queued = list(self._queue)
        for item in queued:
            self._queue.discard(item)
            self._left_queue(item)
        self._fail(queued, error, message)
