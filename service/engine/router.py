"""A worker's engine when engine processes serve it: one connection pool per device, batches packed, then spread.

:class:`RouterEngine` is an :class:`~service.engine.base.Engine`. Each batch goes whole to one device, chosen by
:func:`service.engine.routing.choose`: devices fill in order (so light loads merge into the runs of the first),
the next joins once runs grow long with their size, and among those in use the batch goes to the one with the
fewest of this worker's samples in flight; direct shared-memory batches spread over all of them.

It follows the engine board (:mod:`service.engine.board`): a device marked down is not used, and when its engine
process is back (a new generation) a monitor thread attaches again (new socket, new arena, page-locked again by
the new process).

When an engine process dies, only what it held fails: a batch whose request frame could not even be sent
goes to another device untouched; a batch it was computing gets :class:`~service.engine.base.EngineLost`
(503: the answer is written over the input, so a half-finished batch cannot be resent); a batch that broke it
(an unrecoverable engine error) fails with 500. The batching loop goes on either way.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

from service.engine.base import EngineGone, EngineLost, EngineUnreached, EngineUnrecoverable
from service.engine.board import EngineBoard
from service.engine.device_jobs import DeviceJob
from service.engine.devices import DeviceStatus
from service.engine.direct import DirectJob
from service.engine.regions import RegionRefused
from service.engine.remote import Placeable, RemotePool
from service.engine.routing import SPREAD_RATIO, Candidate, Pace, choose

log = logging.getLogger(__name__)
POLL_S = 0.05  # how often the monitor reads the board (one mmap read per device)
RETRY_S = 1.0  # after a failed attach, wait this long before the next attempt
CONNECTIONS = 2  # per device: one batch computing while the previous answer travels back
# A worker starting while no engine process serves waits this long for one: longer than an engine restart
# normally takes (the backoff, at most 30 s by default, plus its warm-up). Past it the start-up fails, and the
# worker supervisor starts another worker after a backoff (service/drain.py).
ATTACH_WAIT_S = 120.0
WAIT_LOG_EVERY_S = 5.0
T = TypeVar("T")


@dataclass
class _Device:
    """One device as this worker sees it. Guarded by the router's lock."""

    label: str
    path: str
    pool: RemotePool | None = None
    generation: int = 0  # the board generation ``pool`` is attached to
    down: bool = True  # not to be used (the pool, if any, is closed once nothing runs on it)
    in_flight: int = 0  # samples of this worker's batches running there, plus reserved ones
    running: int = 0  # run() calls using the pool now
    batches: int = 0  # given so far (the tie-break)
    retry_at: float = 0.0
    closing: list[RemotePool] = field(default_factory=list)
    pace: Pace = field(default_factory=Pace)  # its engine's run times (kept over restarts: the same device)

    @property
    def usable(self) -> bool:
        return not self.down and self.pool is not None


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


class RouterEngine:
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
        self.board = EngineBoard(directory)
        self.connections = connections
        self.spread_ratio = spread_ratio  # 0: every batch to the least-loaded device (see routing)
        self._devices = [
            _Device(label, path, pace=Pace(spread_ratio=spread_ratio))
            for label, path in zip(self.board.devices, self.board.sockets, strict=True)
        ]
        self._lock = threading.Lock()
        self._local = threading.local()
        self._stop = threading.Event()
        self._monitor: threading.Thread | None = None
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
        self._monitor = threading.Thread(target=self._watch_board, name="engine-router", daemon=True)
        self._monitor.start()

    def _attach_first(self, wait_s: float, cancelled: Callable[[], bool]) -> RemotePool:
        """Attach to every engine process that is up, waiting for one if none is; the first pool attached."""
        started = time.monotonic()
        said = -math.inf
        while True:
            for index, device in enumerate(self._devices):
                if device.pool is None and time.monotonic() >= device.retry_at:
                    self._attach(index)
            first = next((d.pool for d in self._devices if d.pool is not None), None)
            if first is not None:
                if said > -math.inf:
                    waited = time.monotonic() - started
                    log.warning("worker [%d] waited %.1f s for an engine process", os.getpid(), waited)
                return first
            waited = time.monotonic() - started
            devices = ", ".join(self.board.devices)
            if cancelled():
                raise ConnectionError(f"stopped waiting for an engine process (device(s) {devices}): asked to stop")
            if waited >= wait_s:
                raise ConnectionError(f"no engine process (device(s) {devices}) accepted this worker in {wait_s:.0f} s")
            if waited - said >= WAIT_LOG_EVERY_S:
                said = waited
                log.warning(
                    "worker [%d] waiting for an engine process to accept it: device(s) %s restarting; "
                    "%.0f s so far, at most %.0f s",
                    os.getpid(),
                    devices,
                    waited,
                    wait_s,
                )
            time.sleep(POLL_S)

    @property
    def devices(self) -> list[str]:
        return [d.label for d in self._devices]

    def device_status(self) -> list[DeviceStatus]:
        """Per device: up (its engine process serves, as the supervisor says, and this worker is attached to
        it) and its restart count."""
        with self._lock:
            attached = [device.usable for device in self._devices]
        status = self.board.status()
        return [DeviceStatus(s.device, s.up and ok, s.restarts) for s, ok in zip(status, attached, strict=True)]

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

    def _mark_down(self, index: int, pool: RemotePool, exc: Exception) -> None:
        with self._lock:
            device = self._devices[index]
            if device.pool is not pool or device.down:
                return  # already known (another batch saw it first), or already reattached
            device.down = True
        log.warning("the engine process of device %s is gone (%s): routing around it", device.label, exc)

    def _detach_if_idle(self, device: _Device) -> list[RemotePool]:
        """A down device's pool, once no batch uses it (lock held): the caller closes it outside the lock."""
        if device.down and device.pool is not None and device.running == 0:
            device.closing.append(device.pool)
            device.pool = None
        closing, device.closing = device.closing, []
        return closing

    # --- following the board --------------------------------------------------------------------------------

    def _watch_board(self) -> None:
        while not self._stop.wait(POLL_S):
            for index in range(len(self._devices)):
                try:
                    self._follow(index)
                except Exception:  # the monitor must survive anything: a dead one would never reattach
                    log.exception("following the engine board failed for device %s", self._devices[index].label)

    def _follow(self, index: int) -> None:
        slot = self.board.read(index)
        with self._lock:
            device = self._devices[index]
            if device.pool is not None and (not slot.up or slot.generation != device.generation):
                if not device.down:
                    log.warning("the engine process of device %s is down: routing around it", device.label)
                device.down = True
            closing = self._detach_if_idle(device)
            attach = slot.up and device.pool is None and time.monotonic() >= device.retry_at
        for pool in closing:
            pool.close()
        if attach:
            self._attach(index)

    def _attach(self, index: int) -> None:
        """Connect to device ``index``'s engine process if the board says it is up (handshake: blocking)."""
        device = self._devices[index]
        slot = self.board.read(index)
        if not slot.up:
            return
        try:
            pool = RemotePool(device.path, self.connections)
        except (ConnectionError, OSError) as exc:
            log.warning("cannot attach to the engine process of device %s yet: %s", device.label, exc)
            with self._lock:
                device.retry_at = time.monotonic() + RETRY_S
            return
        with self._lock:
            device.pool, device.generation, device.down = pool, slot.generation, False
        log.info("attached to the engine process of device %s (generation %s)", device.label, slot.generation)

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

    def close(self) -> None:
        self._stop.set()
        if self._monitor is not None:
            self._monitor.join(timeout=5)
        with self._lock:
            pools = [d.pool for d in self._devices if d.pool is not None]
            for device in self._devices:
                device.pool, device.down = None, True
        for pool in pools:
            pool.close()
        self.board.close()
