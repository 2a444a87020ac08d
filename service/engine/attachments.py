"""A worker's connections to the engine processes, one pool per device, kept in step with the engine board.

:class:`EngineAttachments` is the half of :class:`~service.engine.router.RouterEngine` that knows which devices can
take a batch; the router itself (service/engine/router.py) decides which one does. It follows the engine board
(:mod:`service.engine.board`): a device marked down is not used, and when its engine process is back (a new
generation) a monitor thread attaches again (new socket, new arena, page-locked again by the new process). A pool
of a device gone down is closed once no batch runs on it any more.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from service.engine.board import EngineBoard
from service.engine.devices import DeviceStatus
from service.engine.remote import RemotePool
from service.engine.routing import Pace

log = logging.getLogger(__name__)
POLL_S = 0.05  # how often the monitor reads the board (one mmap read per device)
RETRY_S = 1.0  # after a failed attach, wait this long before the next attempt
CONNECTIONS = 2  # per device: one batch computing while the previous answer travels back
# A worker starting while no engine process serves waits this long for one: longer than an engine restart
# normally takes (the backoff, at most 30 s by default, plus its warm-up). Past it the start-up fails, and the
# worker supervisor starts another worker after a backoff (service/drain.py).
ATTACH_WAIT_S = 120.0
WAIT_LOG_EVERY_S = 5.0


@dataclass
class AttachedDevice:
    """One device as this worker sees it. Guarded by the attachments' lock."""

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


class EngineAttachments:
    """The devices of the board at ``directory`` and this worker's pools to their engine processes.

    Nothing is attached at construction: :meth:`_attach_first` attaches (waiting for an engine process if none
    serves), :meth:`_start_following` starts the monitor thread, :meth:`close` stops it and closes every pool.
    ``spread_ratio`` goes to each device's :class:`~service.engine.routing.Pace`.
    """

    def __init__(self, directory: str, connections: int, spread_ratio: float) -> None:
        self.board = EngineBoard(directory)
        self.connections = connections
        self._devices = [
            AttachedDevice(label, path, pace=Pace(spread_ratio=spread_ratio))
            for label, path in zip(self.board.devices, self.board.sockets, strict=True)
        ]
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._monitor: threading.Thread | None = None

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

    def _start_following(self) -> None:
        self._monitor = threading.Thread(target=self._watch_board, name="engine-router", daemon=True)
        self._monitor.start()

    def _mark_down(self, index: int, pool: RemotePool, exc: Exception) -> None:
        """A batch found device ``index``'s engine process gone: no more batches go there until it is back."""
        with self._lock:
            device = self._devices[index]
            if device.pool is not pool or device.down:
                return  # already known (another batch saw it first), or already reattached
            device.down = True
        log.warning("the engine process of device %s is gone (%s): routing around it", device.label, exc)

    def _detach_if_idle(self, device: AttachedDevice) -> list[RemotePool]:
        """A down device's pool, once no batch uses it (lock held): the caller closes it outside the lock."""
        if device.down and device.pool is not None and device.running == 0:
            device.closing.append(device.pool)
            device.pool = None
        closing, device.closing = device.closing, []
        return closing

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
