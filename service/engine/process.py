"""One engine process as its supervisor sees it: start it on its device, wait until it listens, stop it."""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time

from service.engine.devices import Device

log = logging.getLogger(__name__)


_MAX_SOCKET_PATH = 100  # sun_path holds 108 bytes on Linux, 104 on macOS


def socket_directory() -> str:
    """A private (0700) directory for the socket: under $TMPDIR, or /tmp when that path is too long for one."""
    directory = tempfile.mkdtemp(prefix="encoder-engine-")
    if len(os.path.join(directory, "engine-64.sock")) <= _MAX_SOCKET_PATH:
        return directory
    os.rmdir(directory)
    return tempfile.mkdtemp(prefix="encoder-engine-", dir="/tmp")


class EngineProcess:
    """``python -m service.engine.host`` as a child for one device, listening on ``path``.

    It reads the service's settings from the ``ENCODER_*`` environment, like the workers do, plus its device's
    (``CUDA_VISIBLE_DEVICES``). Started again after a death by :class:`~service.engine.supervisor.EngineSupervisor`.
    """

    def __init__(self, path: str, device: Device) -> None:
        self.path = path
        self.device = device
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    def start(self) -> None:
        # A socket left by a killed predecessor would look ready (the path is the readiness signal).
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        command = [sys.executable, "-m", "service.engine.host", "--socket", self.path, "--device", self.device.label]
        # Its own session: a Ctrl-C in the terminal (SIGINT to the whole group) must reach only the supervisor,
        # which stops the engine after the workers finished what they accepted.
        env = {**os.environ, **self.device.environment()}
        self._proc = subprocess.Popen(command, start_new_session=True, env=env)

    def wait_ready(self, stop: threading.Event | None = None, poll_s: float = 0.05) -> bool:
        """Block until the socket exists (after warm-up, which may take minutes): True; False if ``stop`` was
        set meanwhile; raise if the process ended first."""
        assert self._proc is not None
        while not os.path.exists(self.path):
            code = self._proc.poll()
            if code is not None:
                raise RuntimeError(
                    f"the engine process of device {self.device.label} exited with status {code} before it was "
                    "ready (see its log)"
                )
            if stop is not None and stop.wait(poll_s):
                return False
            if stop is None:
                time.sleep(poll_s)
        return True

    def wait(self) -> int:
        """Its exit status, once it ended."""
        assert self._proc is not None
        return self._proc.wait()

    def stop(self, timeout_s: float = 10.0) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                log.warning(
                    "the engine process of device %s ignored SIGTERM for %.0f s: killing it",
                    self.device.label,
                    timeout_s,
                )
                self._proc.kill()
                self._proc.wait()
