"""SIGTERM with ``--workers N``: the same drain as with one worker, on one clock for every worker.

1. At once every worker's /readyz answers 503, so load balancers stop routing here, while requests that still
   arrive are served (their balancer has not noticed yet), for ``drain_s``.
2. Then every worker closes the listener and waits (up to ``graceful_timeout_s``) for its accepted requests;
   its lifespan shutdown lets the batcher finish what is queued.
3. The supervisor returns once every worker has ended; the caller stops the shared engine process after that
   (it must outlive the requests it computes), and the service exits 0.

Why a supervisor of our own (a subclass of uvicorn's ``Multiprocess``): uvicorn's sends every worker SIGTERM and
nothing else, so each worker would time a drain window of its own, and a signal that arrives twice (a Ctrl-C,
or an init that signals the whole process group, reaches the workers directly and again through the
supervisor) would cut it short, since a second signal ends a drain window. Here the supervisor alone decides,
and writes one number that every worker reads: the drain deadline (``time.monotonic()``, a system-wide clock
on Linux and macOS), infinite while serving. It lives in shared memory created before the workers are spawned
(so a worker started late reads it too), without a lock: the supervisor writes it from its signal handler,
where taking a lock could deadlock, and a worker killed while reading it cannot leave a lock held for the
others. Workers read it on uvicorn's 0.1 s tick and end their window at the deadline themselves, so a
supervisor busy with a slow worker health check (up to ``timeout_worker_healthcheck``) cannot stretch it.

A signal sent to one worker alone drains that worker on its own clock, as with one worker (DrainingServer);
the supervisor replaces it afterwards, as uvicorn's would. Further signals to the supervisor: a second one ends
the drain window at once; one during the shutdown is passed to the workers as SIGTERM, which forces their exit
(DrainingServer's escalation).
"""

from __future__ import annotations

import ctypes
import logging
import math
import multiprocessing
import os
import signal
import socket
import time
from collections.abc import Callable
from types import FrameType
from typing import TYPE_CHECKING, Any

import uvicorn
from uvicorn.config import STARTUP_FAILURE
from uvicorn.supervisors.multiprocess import SIGNALS, Multiprocess, Process

from service.server import DrainingServer

if TYPE_CHECKING:  # a spawned worker imports this module before it answers health checks: keep that light
    from fastapi import FastAPI

    from service.settings import Settings

log = logging.getLogger(__name__)
worker_log = logging.getLogger("uvicorn.error")  # configured in the workers (the root logger is not)
_SPAWN = multiprocessing.get_context("spawn")  # uvicorn spawns its workers: shared memory must come from spawn
_SUPERVISE_EVERY_S = 0.5  # uvicorn's period for worker health checks
_DRAIN_POLL_S = 0.1  # while draining: how soon a second signal or the deadline is acted on
_STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM} | ({signal.SIGBREAK} if hasattr(signal, "SIGBREAK") else set())
_SERVING = math.inf
_RESPAWN_BACKOFF_S = 1.0  # before starting again a replacement worker that failed to start; doubles each time
_RESPAWN_BACKOFF_MAX_S = 30.0


def _shared_double(value: float) -> Any:
    return _SPAWN.RawValue(ctypes.c_double, value)


# --- in each worker process --------------------------------------------------------------------------------

_drain_listeners: list[Callable[[], None]] = []
_drain_begun = False
_this_worker: WorkerServer | None = None  # this worker's server (set in the worker process before the app exists)


def _begin_drain_here() -> None:
    """This worker drains: its app's /readyz turns 503 (also an app built after this moment)."""
    global _drain_begun
    _drain_begun = True
    for listener in _drain_listeners:
        listener()


def worker_app() -> FastAPI:
    """uvicorn's factory in every worker: the app from the ``ENCODER_*`` environment, tied to this worker's drain."""
    from service.app import app_from_env

    app = app_from_env()
    state = app.state.service
    _drain_listeners.append(state.start_draining)
    if _this_worker is not None:  # the supervisor's deadline is read on ticks, which begin after the start-up
        state.told_to_stop = _this_worker.told_to_stop
    if _drain_begun:  # the drain began while the app was being built
        state.start_draining()
    return app


class WorkerServer(DrainingServer):
    """A worker's server: its own signals drain it as with one worker; the shared deadline drains and stops it."""

    def __init__(self, config: uvicorn.Config, drain_s: float, deadline: Any, retire: Any, up: Any) -> None:
        super().__init__(config, on_drain=_begin_drain_here, drain_s=drain_s)
        self._shared_deadline = deadline  # c_double: the supervisor's drain deadline, inf while serving
        self._retire = retire  # c_bool: stop this worker alone, without a drain window
        self._up = up  # c_bool: set once this worker's start-up completed (it accepts connections)

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if self.started:
            self._up.value = True

    def told_to_stop(self) -> bool:
        """The supervisor wants this worker gone (a drain deadline, or retired): readable before it serves."""
        return bool(self._retire.value) or float(self._shared_deadline.value) != _SERVING

    async def on_tick(self, counter: int) -> bool:
        deadline = float(self._shared_deadline.value)
        if self._retire.value:
            self.should_exit = True  # retired alone (SIGTTOU, SIGHUP): the other workers serve on
        elif deadline != _SERVING and (self._drain_until is None or deadline < self._drain_until):
            if self._drain_until is None:
                self._on_drain()
                worker_log.info("Worker [%d] draining until the supervisor's deadline", os.getpid())
            self._drain_until = deadline  # DrainingServer.on_tick ends the window there
        return await super().on_tick(counter)


class WorkerProcess(Process):
    """uvicorn's worker process, running a :class:`WorkerServer` (it is pickled to the child at spawn)."""

    def __init__(
        self,
        config: uvicorn.Config,
        sockets: list[socket.socket],
        drain_s: float,
        deadline: Any,
        first_start: bool = False,
        failed_starts: int = 0,
    ) -> None:
        self.drain_s = drain_s
        self.deadline = deadline
        self.retire_flag = _SPAWN.RawValue(ctypes.c_bool, False)
        self.up_flag = _SPAWN.RawValue(ctypes.c_bool, False)  # its start-up completed (see failed_to_start)
        self.first_start = first_start  # one of the workers the service started with (not a replacement)
        self.failed_starts = failed_starts  # start-ups failed in a row in this worker's slot before it
        self.respawn_at: float | None = None  # it failed to start: its replacement is due then (the supervisor's)
        super().__init__(config, sockets)

    @property
    def server(self) -> uvicorn.Server:
        global _this_worker
        if self._server is None:  # in the worker process
            self._server = _this_worker = WorkerServer(
                self.config, self.drain_s, self.deadline, self.retire_flag, self.up_flag
            )
        return self._server

    def failed_to_start(self) -> bool:
        """It ended without ever serving, by its own failure: uvicorn's start-up failure status, or an error
        (status > 0) before its start-up completed, such as an import error while the app is loaded. Not a
        signal: a worker killed while starting is replaced like one killed while serving."""
        code = self.process.exitcode
        return code == STARTUP_FAILURE or (code is not None and code > 0 and not self.up_flag.value)

    def retire(self) -> None:
        """Stop this worker alone, without a drain window (a SIGTERM would start one: see WorkerServer)."""
        self.retire_flag.value = True
        self.join()
        self.parent_conn.close()
        self.child_conn.close()


# --- in the supervisor -------------------------------------------------------------------------------------


class DrainingSupervisor(Multiprocess):
    """uvicorn's worker supervisor with the drain of the module docstring; everything else as uvicorn's."""

    def __init__(self, config: uvicorn.Config, sockets: list[socket.socket], drain_s: float) -> None:
        super().__init__(config, sockets)
        self.drain_s = drain_s
        self.deadline = _shared_double(_SERVING)
        self.startup_failed = False
        self._stopping = False
        self._signals: list[str] = []  # stop signals seen, logged from the loop (not from the handler)
        self._forces = 0  # stop signals during the shutdown, not yet passed on
        for sig in SIGNALS:
            signal.signal(sig, self._on_signal)

    def _on_signal(self, sig: int, frame: FrameType | None) -> None:
        """Runs in the main thread between two bytecodes, maybe inside a health check: stores only, no locks."""
        if sig not in _STOP_SIGNALS:
            self.signal_queue.append(sig)  # uvicorn's handle_<name>, from the loop
            return
        self._signals.append(signal.Signals(sig).name)
        now = time.monotonic()
        if self._stopping:
            self._forces += 1
        elif self.deadline.value == _SERVING:
            self.deadline.value = now + self.drain_s  # every worker's /readyz turns 503 within a tick
        else:
            self.deadline.value = min(self.deadline.value, now)  # a second signal: the window ends now

    @property
    def draining(self) -> bool:
        return bool(self.deadline.value != _SERVING)

    def _spawn(self, first_start: bool = False, failed_starts: int = 0) -> WorkerProcess:
        process = WorkerProcess(self.config, self.sockets, self.drain_s, self.deadline, first_start, failed_starts)
        process.start()
        return process

    def init_processes(self) -> None:
        self.processes = [self._spawn(first_start=True) for _ in range(self.processes_num)]

    def run(self) -> None:
        log.info("Started parent process [%d]", os.getpid())
        self.init_processes()
        while not self.should_exit.is_set():
            self._log_signals()
            if self.draining:
                left = self.deadline.value - time.monotonic()
                if left <= 0:
                    break
                time.sleep(min(left, _DRAIN_POLL_S))
                continue
            self.handle_signals()
            self.keep_subprocess_alive()
            time.sleep(_SUPERVISE_EVERY_S)
        self._stop_workers()
        log.info("Stopping parent process [%d]", os.getpid())

    def _log_signals(self) -> None:
        while self._signals:
            name = self._signals.pop(0)
            left = max(0.0, self.deadline.value - time.monotonic())
            log.info("%s: draining for %.1f s more, then finishing accepted requests", name, left)

    # SIGHUP/SIGTTIN/SIGTTOU keep uvicorn's meaning (uvicorn dispatches by name), with our workers.

    def handle_ttin(self) -> None:
        self.processes_num += 1
        self.processes.append(self._spawn())

    def handle_ttou(self) -> None:
        if self.processes_num > 1:
            self.processes_num -= 1
            _ours(self.processes.pop()).retire()

    def restart_all(self) -> None:
        """uvicorn's rolling restart of the workers (SIGHUP): each replacement is ready before its old one stops."""
        for idx, old in enumerate(self.processes):
            if self.should_exit.is_set() or self.draining:
                return
            new = self._spawn()
            if not new.wait_until_ready(self.config.timeout_worker_healthcheck, self.should_exit):
                new.kill()
                new.join()
                log.error("worker [%s] was not ready in time; keeping [%s], restart aborted", new.pid, old.pid)
                return
            _ours(old).retire()
            self.processes[idx] = new

    def keep_subprocess_alive(self) -> None:
        """Replace a worker that died or hangs, as uvicorn does (not while draining: see ``run``).

        uvicorn stops the service when any worker fails its start-up (exit status STARTUP_FAILURE): it would
        fail the same way on every restart. An error that ends a worker before its start-up completed counts
        the same (a module missing when the app is imported exits with status 1, which was taken for a death
        and restarted at once, hundreds of times a minute, on a GPU host).
        That holds for the workers the service starts with (the model, the
        app, the socket are broken), and stays fatal here. A replacement is different: it starts while the
        others serve, and can fail for a passing reason (it waits for an engine process that restarts, see
        RouterEngine, but not forever). Stopping a serving service for that turned one engine restart into an
        outage, so a replacement that failed to start is started again after a backoff (doubling, bounded),
        with an error logged each time; the other workers serve meanwhile.
        """
        for idx, process in enumerate(self.processes):
            if self.draining:
                return
            worker = _ours(process)
            if worker.respawn_at is not None:
                if time.monotonic() >= worker.respawn_at:
                    self.processes[idx] = self._spawn(failed_starts=worker.failed_starts + 1)
                continue
            if process.is_alive(timeout=self.config.timeout_worker_healthcheck):
                continue
            process.kill()  # hung, or gone already
            process.join()
            if not worker.failed_to_start():
                log.info("worker [%s] died: starting another", process.pid)
                self.processes[idx] = self._spawn()
            elif worker.first_start:
                log.error("worker [%s] failed to start: stopping the service", process.pid)
                self.startup_failed = True
                self.should_exit.set()
                return
            else:
                delay = min(_RESPAWN_BACKOFF_MAX_S, _RESPAWN_BACKOFF_S * 2**worker.failed_starts)
                log.error("replacement worker [%s] failed to start: starting another in %.1f s", process.pid, delay)
                worker.respawn_at = time.monotonic() + delay

    def _stop_workers(self) -> None:
        """Every worker stops at the deadline (now, if nothing drained); wait for them. No SIGTERM: one arriving
        after a worker's own window ended would force its exit."""
        self._stopping = True
        self.deadline.value = min(self.deadline.value, time.monotonic())
        for sock in self.sockets:
            # No worker is started any more. Once the workers close theirs nothing listens: a connection is refused
            # (a balancer retries it elsewhere) instead of waiting in a queue no one accepts from.
            sock.close()
        while any(process.process.is_alive() for process in self.processes):
            time.sleep(_DRAIN_POLL_S)
            self._log_signals()
            if self._forces:
                self._forces = 0
                self._force_workers()
        for process in self.processes:
            process.join()
            process.parent_conn.close()
            process.child_conn.close()

    def _force_workers(self) -> None:
        log.warning("signal during the shutdown: forcing the workers to exit")
        for process in self.processes:
            if process.process.is_alive() and process.pid is not None:
                os.kill(process.pid, signal.SIGTERM)  # their second signal: DrainingServer forces the exit


def _ours(process: Process) -> WorkerProcess:
    assert isinstance(process, WorkerProcess)  # every worker comes from DrainingSupervisor._spawn
    return process


def run_workers(settings: Settings, options: dict[str, Any]) -> None:
    """Serve ``settings.workers`` uvicorn workers under a :class:`DrainingSupervisor` until a signal stops them."""
    config = uvicorn.Config("service.drain:worker_app", factory=True, workers=settings.workers, **options)
    sock = config.bind_socket()
    supervisor = DrainingSupervisor(config, [sock], drain_s=settings.drain_s)
    try:
        supervisor.run()
    finally:
        sock.close()
    if supervisor.startup_failed:
        raise SystemExit(STARTUP_FAILURE)
