"""A worker's engine when engine processes serve it: one connection pool per device, batches packed, then spread.

:class:`RouterEngine` is an :class:`~service.engine.base.Engine`. Each batch goes whole to one device, chosen by
:func:`service.engine.routing.choose`: devices fill in order (so light loads merge into the runs of the first),
the next joins once runs grow long with their size, and among those in use the batch goes to the one with the
fewest of this worker's samples in flight; direct shared-memory batches spread over all of them.

Which devices can take a batch (attaching to the engine processes, following the engine board, reattaching after a
restart) is :class:`~service.engine.attachments.EngineAttachments`, which it extends; this module only routes.

When an engine process dies, only what it held fails: a batch whose request frame could not even be sent
goes to another device untouched; a batch it was computing gets :class:`~service.engine.base.EngineLost`
(503: the answer is written over the input, so a half-finished batch cannot be resent); a batch that broke it
(an unrecoverable engine error) fails with 500. The batching loop goes on either way.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import numpy as np

from service.engine.attachments import ATTACH_WAIT_S, CONNECTIONS, EngineAttachments
from service.engine.base import EngineGone, EngineLost, EngineUnreached, EngineUnrecoverable
from service.engine.device_jobs import DeviceJob
from service.engine.direct import DirectJob
from service.engine.regions import RegionRefused
from service.engine.remote import Placeable, RemotePool
from service.engine.routing import SPREAD_RATIO, Candidate, choose

T = TypeVar("T")


def default_in_flight(connections: int, devices: int, workers: int) -> int:
    """A worker's batches in flight: ``connections``, or more when there are few workers for many devices, so
    that all workers together keep ``connections`` batches per device going (one computing, one travelling).

    Not ``connections`` per device for every worker: with ``--max-delay-ms 0`` a worker sends what it has queued
    whenever a slot is free, so more slots cut the same requests into more, smaller batches, each one an IPC
    round trip. With ``--devices cpu:2``, two workers and 24 clients: 2.7-3.3 samples per worker batch, against
    3.9-4.0 with two in flight (as with one device).
    """
    return max(connections, -(-connections * devices // workers))


def _packs(parts: Sequence[Placeable]) -> bool:
    """Whether a batch is packed onto the first devices: not when it holds direct jobs (see ``routing``)."""
    return not any(isinstance(part, DirectJob) for part in parts)


class RouterEngine(EngineAttachments):
    """Attaches at construction to every engine process that is up; waits (up to ``wait_s``) for one to be.

    A worker can start while no engine process serves: it replaces one that died while the engine restarts,
    or an engine died during the service's own start. It then waits for an engine process to accept it, saying
    so every few seconds, instead of failing its start-up (which the worker supervisor would take for a
    broken service): a restart normally takes the backoff plus a warm-up. ``cancelled`` (checked while
    waiting) ends the wait early when the process is asked to stop. ``in_flight``: this worker's batches in
    flight at once (read by the batcher); by default :func:`default_in_flight` for ``workers`` workers.
    """

    def __init__(
        self,
        directory: str,
        connections: int = CONNECTIONS,
        wait_s: float = ATTACH_WAIT_S,
        cancelled: Callable[[], bool] | None = None,
        in_flight: int | None = None,
        workers: int = 1,
        spread_ratio: float = SPREAD_RATIO,
    ) -> None:
        super().__init__(directory, connections, spread_ratio)
        self.spread_ratio = spread_ratio  # 0: every batch to the least-loaded device (see routing)
        self._local = threading.local()  # the device this thread's last input_buffer() reserved
        try:
            first = self._attach_first(wait_s, cancelled or (lambda: False))
        except BaseException:
            self.close()
            raise
        self.name, self.dim, self.dtype = first.name, first.dim, first.dtype
        self.max_seq_len, self.buckets, self.provider = first.max_seq_len, first.buckets, first.provider
        self.fixed_shapes = False  # each engine process pads its merged batches itself
        # Every engine process runs this same code: the first one's answer holds for the others (and restarts).
        self.checks_finite = first.checks_finite
        self.concurrency = in_flight or default_in_flight(connections, len(self._devices), workers)
        self._described = first.describe()
        self._start_following()

    def spilling(self) -> dict[str, bool]:
        """Per device: its runs are long enough that the next device takes batches too (see ``routing``)."""
        now = time.monotonic()
        with self._lock:
            return {d.label: d.pace.full(now) for d in self._devices}

    def load(self) -> dict[str, tuple[bool, int, int]]:
        """Per device, as this worker sees it: (usable, samples in flight, batches given so far)."""
        with self._lock:
            return {d.label: (d.usable, d.in_flight, d.batches) for d in self._devices}

    # --- routing ----------------------------------------------------------------------------------------------

    def _pick(self, samples: int, avoid: frozenset[int] | set[int] = frozenset(), pack: bool = True) -> int | None:
        """The usable device for the next batch (call with the lock held; see :func:`~service.engine.routing.choose`);
        it counts ``samples`` as in flight."""
        candidates = [
            Candidate(i, d.in_flight, d.batches, d.pace)
            for i, d in enumerate(self._devices)
            if d.usable and i not in avoid
        ]
        if not candidates:
            return None
        index = choose(candidates, time.monotonic(), pack and self.spread_ratio > 0)
        device = self._devices[index]
        device.in_flight += samples
        device.batches += 1
        return index

    def input_buffer(self, batch: int, seq: int) -> np.ndarray:
        """A region of the chosen device's arena (the batch then runs there); the choice is held for this
        thread's next :meth:`run`."""
        self._release_reservation()
        with self._lock:
            index = self._pick(batch)
            pool = None if index is None else self._devices[index].pool
        if index is None or pool is None:
            return np.empty((batch, seq, self.dim), self.dtype)
        self._local.reserved = (index, batch)
        return pool.input_buffer(batch, seq)

    def _release_reservation(self) -> tuple[int, int] | None:
        reserved: tuple[int, int] | None = getattr(self._local, "reserved", None)
        if reserved is not None:
            self._local.reserved = None
            with self._lock:
                self._devices[reserved[0]].in_flight -= reserved[1]
        return reserved

    def run(self, x: np.ndarray) -> np.ndarray:
        return self.run_timed(x)[0]

    def run_timed(self, x: np.ndarray) -> tuple[np.ndarray, float]:
        """The answer and the engine process's compute seconds (see :meth:`RemoteEngine.run_timed`)."""
        return self._routed(int(x.shape[0]) if x.ndim else 0, lambda pool: pool.run_timed(x), pack=True)

    def run_placed(self, parts: Sequence[Placeable]) -> tuple[list[np.ndarray | Exception], float]:
        """Answers and compute seconds of a batch holding shared-memory jobs (see :meth:`RemoteEngine.run_placed`);
        the chosen device's engine process maps each region at its first use.

        A device job (CUDA shared memory) can only be computed by the engine process of its GPU: the batch goes
        there, and the rare batch holding device jobs of several GPUs is sent to each in turn (the other parts
        with the first). A device job of a GPU no engine process serves gets RegionRefused (the caller copies).
        A batch holding direct jobs (system shared memory) spreads over every device (see ``routing``)."""
        if not any(isinstance(part, DeviceJob) for part in parts):
            return self._routed(sum(int(p.shape[0]) for p in parts), lambda pool: pool.run_placed(parts), _packs(parts))
        answers: list[np.ndarray | Exception | None] = [None] * len(parts)
        groups: dict[int, list[int]] = {}
        loose: list[int] = []
        for k, part in enumerate(parts):
            if not isinstance(part, DeviceJob):
                loose.append(k)
            elif (index := self._index_of(part.device)) is None:
                answers[k] = RegionRefused(f"no engine process serves device {part.device}")
            else:
                groups.setdefault(index, []).append(k)
        compute_s = 0.0
        if groups:  # the other parts ride with the first GPU's device jobs: one frame
            next(iter(groups.values())).extend(loose)
        elif loose:  # every device job was refused: the rest is a batch like any other
            rest = [parts[k] for k in loose]
            samples = sum(int(p.shape[0]) for p in rest)
            outs, compute_s = self._routed(samples, lambda pool: pool.run_placed(rest), _packs(rest))
            for k, out in zip(loose, outs, strict=True):
                answers[k] = out
        for index, members in groups.items():
            outs, seconds = self._on_device(index, [parts[k] for k in members])
            compute_s += seconds
            for k, out in zip(members, outs, strict=True):
                answers[k] = out
        return [a for a in answers if a is not None], compute_s

    def serves_device(self, device: str) -> bool:
        """Whether an engine process of this service computes on GPU ``device`` (as clients number them)."""
        return self._index_of(device) is not None

    def _routed(self, samples: int, call: Callable[[RemotePool], tuple[T, float]], pack: bool) -> tuple[T, float]:
        """``call`` on the chosen device's pool (its result ends with the engine's compute seconds); another device
        when the batch never reached this one."""
        reserved = self._release_reservation()
        tried: set[int] = set()
        while True:
            with self._lock:
                index = None
                if reserved is not None and self._devices[reserved[0]].usable:
                    index = reserved[0]
                    self._devices[index].in_flight += samples
                else:
                    index = self._pick(samples, tried, pack)
                reserved = None
                if index is None:
                    down = [d.label for d in self._devices if not d.usable]
                    raise EngineLost(f"no engine process serves now (device(s) {', '.join(down)} restarting)")
                device = self._devices[index]
                pool = device.pool
                assert pool is not None
                device.running += 1
            compute_s = 0.0
            try:
                result = call(pool)
                compute_s = result[1]
                return result
            except EngineUnreached as exc:  # it never saw the batch: the input is intact, another device can
                self._mark_down(index, pool, exc)
                tried.add(index)
            except EngineGone as exc:
                self._mark_down(index, pool, exc)
                raise EngineLost(f"the engine process of device {device.label} died computing this batch") from exc
            except EngineUnrecoverable as exc:  # this batch broke it (BROKEN): a failed batch, and it restarts
                self._mark_down(index, pool, exc)
                raise RuntimeError(f"device {device.label}: {exc}") from exc
            finally:
                self._finished(index, samples, compute_s)

    def _on_device(self, index: int, parts: Sequence[Placeable]) -> tuple[list[np.ndarray | Exception], float]:
        """:meth:`RemoteEngine.run_placed` on device ``index``, the only one that can read its device jobs' memory:
        EngineLost (503) when its engine process is not serving now, whether or not it saw the batch."""
        self._release_reservation()
        samples = sum(int(p.shape[0]) for p in parts)
        with self._lock:
            entry = self._devices[index]
            pool = entry.pool
            if entry.down or pool is None:
                raise EngineLost(f"the engine process of device {entry.label} is not serving now (restarting)")
            entry.in_flight += samples
            entry.batches += 1
            entry.running += 1
        compute_s = 0.0
        try:
            outs, compute_s = pool.run_placed(parts)
            return outs, compute_s
        except EngineGone as exc:  # EngineUnreached included: the client memory is on that device only
            self._mark_down(index, pool, exc)
            raise EngineLost(f"the engine process of device {entry.label} is gone") from exc
        except EngineUnrecoverable as exc:
            self._mark_down(index, pool, exc)
            raise RuntimeError(f"device {entry.label}: {exc}") from exc
        finally:
            self._finished(index, samples, compute_s)

    def _index_of(self, device: str) -> int | None:
        """The engine of the GPU a client names (``--devices`` ordinal); with CPU engines (the test-only fake device
        layer, whose device 0 stands in for a GPU, see :func:`service.cudashm.devices.device_map`) device 0 is the
        first engine."""
        labels = [d.label for d in self._devices]
        if device in labels:
            return labels.index(device)
        if device == "0" and not any(label.isdigit() for label in labels):
            return 0
        return None

    def _finished(self, index: int, samples: int, compute_s: float = 0.0) -> None:
        with self._lock:
            device = self._devices[index]
            quickest = device.pool.quickest_s if device.pool is not None else math.inf
            device.pace.observe(compute_s, time.monotonic(), quickest)
            device.in_flight -= samples
            device.running -= 1
            closing = self._detach_if_idle(device)
        for pool in closing:
            pool.close()

    # --- the rest of the Engine interface --------------------------------------------------------------------

    def warmup(self) -> None:
        """Nothing to do: every engine process warmed up before it accepted workers."""

    def describe(self) -> dict[str, Any]:
        described = {k: v for k, v in self._described.items() if k != "engine_process"}
        shared = dict(self._described.get("engine_process", {}))
        shared.pop("socket", None)
        shared["directory"] = self.board.directory
        status = self.device_status()
        described["devices"] = [{"device": s.device, "up": s.up, "restarts": s.restarts} for s in status]
        return {**described, "engine_process": shared}
