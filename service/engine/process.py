"""The supervisor's side of the shared engine process: start it, wait until it listens, watch it, stop it."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator

log = logging.getLogger(__name__)


_MAX_SOCKET_PATH = 100  # sun_path holds 108 bytes on Linux, 104 on macOS


def _socket_directory() -> str:
    """A private (0700) directory for the socket: under $TMPDIR, or /tmp when that path is too long for one."""
    directory = tempfile.mkdtemp(prefix="encoder-engine-")
    if len(os.path.join(directory, "engine.sock")) <= _MAX_SOCKET_PATH:
        return directory
    os.rmdir(directory)
    return tempfile.mkdtemp(prefix="encoder-engine-", dir="/tmp")


class EngineProcess:
    """``python -m service.engine.host`` as a child, listening on a socket in a private directory.

    It reads the service's settings from the ``ENCODER_*`` environment, like the workers do.
    """

    def __init__(self) -> None:
        self.directory = _socket_directory()
        self.path = os.path.join(self.directory, "engine.sock")
        self._proc: subprocess.Popen[bytes] | None = None
        self._stopping = False
        self.died_with: int | None = None  # the exit status, when it ended without being asked to

    def start(self) -> None:
        # Its own session: a Ctrl-C in the terminal (SIGINT to the whole group) must reach only the supervisor,
        # which stops the engine after the workers finished what they accepted.
        command = [sys.executable, "-m", "service.engine.host", "--socket", self.path]
        self._proc = subprocess.Popen(command, start_new_session=True)

    def wait_ready(self, poll_s: float = 0.05) -> None:
        """Block until the socket exists (after warm-up, which may take minutes); raise if the process ended."""
        assert self._proc is not None
        while not os.path.exists(self.path):
            code = self._proc.poll()
            if code is not None:
                raise RuntimeError(f"the engine process exited with status {code} before it was ready (see its log)")
            time.sleep(poll_s)

    def watch(self) -> None:
        """If the engine process ends on its own, stop the whole service (SIGTERM to ourselves): its workers
        cannot compute any more, and a restart by the orchestrator is the only cure."""
        assert self._proc is not None
        proc = self._proc

        def wait() -> None:
            code = proc.wait()
            if not self._stopping:
                self.died_with = code
                log.error("the engine process exited with status %s: stopping the service", code)
                os.kill(os.getpid(), signal.SIGTERM)

        threading.Thread(target=wait, name="engine-process-watch", daemon=True).start()

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stopping = True
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("the engine process ignored SIGTERM for %.0f s: killing it", timeout_s)
                self._proc.kill()
                self._proc.wait()
        shutil.rmtree(self.directory, ignore_errors=True)


@contextlib.contextmanager
def engine_process() -> Iterator[EngineProcess]:
    """A started, ready and watched engine process, stopped on exit."""
    process = EngineProcess()
    try:
        process.start()
        process.wait_ready()
        process.watch()
        yield process
    finally:
        process.stop()
