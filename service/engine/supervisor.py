"""The engine supervisor: one engine process per device, restarted when it dies, the service stopped when they
keep dying.

It lives in the process that starts the workers (``python -m service``). Every engine process is started and
warm before the workers start. A watcher thread per device waits on its process; when it ends without being
asked to (killed, out of memory, or it exited after an unrecoverable engine error such as a sticky CUDA error),
its board slot turns down (workers stop sending to it, /readyz names it), and after a backoff that doubles
with each recent death (bounded) the process is started again on the same socket path and device. Once it
listens, the slot turns up with a new generation and the workers reconnect. An engine that dies more than
``limit`` times within ``window_s`` is not restarted: the supervisor stops the service (SIGTERM to itself)
and it exits 1, so the orchestrator replaces the pod instead of it limping on a crashing GPU.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

from service.engine.board import EngineBoard, Slot
from service.engine.devices import Device
from service.engine.process import EngineProcess, socket_directory
from service.metrics import forget_process
from service.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RestartPolicy:
    limit: int = 5
    window_s: float = 300.0
    backoff_s: float = 1.0
    backoff_max_s: float = 30.0

    @classmethod
    def from_settings(cls, settings: Settings) -> RestartPolicy:
        return cls(
            settings.engine_restart_limit,
            settings.engine_restart_window_s,
            settings.engine_restart_backoff_s,
            settings.engine_restart_backoff_max_s,
        )

    def delay(self, recent_deaths: int) -> float:
        """Seconds to wait before the restart that follows ``recent_deaths`` deaths within the window."""
        return float(min(self.backoff_max_s, self.backoff_s * 2 ** max(0, recent_deaths - 1)))


class EngineSupervisor:
    """``start()`` brings every engine up (or raises), ``stop()`` stops them; see the module docstring.

    ``gave_up`` says why the service must exit non-zero, if it must.
    """

    def __init__(self, devices: tuple[Device, ...], policy: RestartPolicy | None = None) -> None:
        self.directory = socket_directory()
        self.policy = policy or RestartPolicy()
        self.board = EngineBoard.create(self.directory, [d.label for d in devices])
        self.engines = [EngineProcess(path, d) for path, d in zip(self.board.sockets, devices, strict=True)]
        self.gave_up: str | None = None
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._deaths = [collections.deque[float]() for _ in devices]
        self._watchers: list[threading.Thread] = []

    def start(self) -> None:
        """Start every engine process, wait until all listen (warm-up may take minutes), then watch them."""
        try:
            for engine in self.engines:
                engine.start()
            for index, engine in enumerate(self.engines):
                engine.wait_ready()
                self.board.write(index, Slot(True, 1, 0))
        except BaseException:
            self.stop()
            raise
        for index in range(len(self.engines)):
            watcher = threading.Thread(target=self._watch, args=(index,), name=f"engine-watch-{index}", daemon=True)
            watcher.start()
            self._watchers.append(watcher)
        labels = ", ".join(e.device.label for e in self.engines)
        log.info("%s engine process(es) ready, on device(s) %s", len(self.engines), labels)

    def _watch(self, index: int) -> None:
        engine = self.engines[index]
        while True:
            code = engine.wait()
            if self._stopping.is_set():
                return
            if engine.pid is not None:
                forget_process(engine.pid)  # its live gauges (e.g. encoder_batcher_alive) leave the aggregate
            slot = self.board.read(index)
            self.board.write(index, Slot(False, slot.generation, slot.restarts))
            log.error("the engine process of device %s exited with status %s", engine.device.label, code)
            if not self._restart(index, slot):
                return

    def _restart(self, index: int, slot: Slot) -> bool:
        """Start device ``index``'s engine again after its backoff (again if it dies before it is ready);
        False when the service stops or gives up instead."""
        engine = self.engines[index]
        deaths = self._deaths[index]
        restarts = slot.restarts
        while True:
            now = time.monotonic()
            deaths.append(now)
            while deaths and deaths[0] < now - self.policy.window_s:
                deaths.popleft()
            if len(deaths) > self.policy.limit:
                self._give_up(engine.device, len(deaths))
                return False
            delay = self.policy.delay(len(deaths))
            log.warning("restarting the engine process of device %s in %.1f s", engine.device.label, delay)
            if self._stopping.wait(delay):
                return False
            restarts += 1
            self.board.write(index, Slot(False, slot.generation, restarts))  # counted when it is started
            with self._lock:  # stop() must not miss a process started while it runs
                if self._stopping.is_set():
                    return False
                engine.start()
            try:
                if not engine.wait_ready(self._stopping):
                    return False
            except RuntimeError as exc:
                log.error("%s", exc)
                if engine.pid is not None:
                    forget_process(engine.pid)
                continue
            self.board.write(index, Slot(True, slot.generation + 1, restarts))
            log.info("the engine process of device %s is back (restart %s)", engine.device.label, restarts)
            return True

    def _give_up(self, device: Device, deaths: int) -> None:
        self.gave_up = (
            f"the engine process of device {device.label} died {deaths} times within "
            f"{self.policy.window_s:.0f} s (limit {self.policy.limit} restarts)"
        )
        log.error("%s: stopping the service", self.gave_up)
        os.kill(os.getpid(), signal.SIGTERM)  # uvicorn stops the workers; serve() then exits 1

    def stop(self) -> None:
        """Stop every engine process (after the workers: they drain through them) and remove the directory."""
        with self._lock:
            if self._stopping.is_set():
                return
            self._stopping.set()
        for engine in self.engines:
            engine.stop()
        for watcher in self._watchers:
            watcher.join(timeout=5)
        self.board.close()
        shutil.rmtree(self.directory, ignore_errors=True)


@contextlib.contextmanager
def supervised(devices: tuple[Device, ...], policy: RestartPolicy) -> Iterator[EngineSupervisor]:
    """Started, ready and watched engine processes, stopped on exit."""
    supervisor = EngineSupervisor(devices, policy)
    supervisor.start()
    try:
        yield supervisor
    finally:
        supervisor.stop()
