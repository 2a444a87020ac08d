"""Start a server under test as a subprocess on a free port, wait until it is ready, stop it cleanly.

Shared by ``loadtest/bench_service.py`` and the load-test smoke tests, so both start servers the same way.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

log = logging.getLogger(__name__)
REPO_ROOT = Path(__file__).resolve().parents[2]


class ServerFailed(RuntimeError):
    """The server exited, or never became ready in time."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment plus the repo root on PYTHONPATH, keeping what is there (the GPU host's packages)."""
    env = dict(os.environ)
    parts = [str(REPO_ROOT), *(p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p)]
    env["PYTHONPATH"] = os.pathsep.join(parts)
    env.update(extra or {})
    return env


def http_status(url: str, timeout: float = 2.0) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except (OSError, ValueError):
        return None


class ServerProcess:
    """One server subprocess; its output goes to ``log_path`` so a failure can be explained."""

    def __init__(
        self,
        command: Sequence[str],
        port: int,
        ready_path: str = "/readyz",
        log_path: Path | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.command = list(command)
        self.port = port
        self.ready_path = ready_path
        self.log_path = log_path or Path(f"/tmp/loadtest-server-{port}.log")
        self.env = child_env(env)
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log.info("starting %s", " ".join(self.command))
        with self.log_path.open("wb") as out:
            # Its own session: stop() signals the whole group (uvicorn workers, LitServe's inference processes).
            self.process = subprocess.Popen(
                self.command, cwd=REPO_ROOT, env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )

    def tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def wait_ready(self, timeout_s: float = 300.0, consecutive: int = 1) -> None:
        """Poll ``ready_path`` until it answers 200 ``consecutive`` times in a row (one per worker, roughly)."""
        deadline = time.monotonic() + timeout_s
        streak = 0
        while time.monotonic() < deadline:
            if self.process is None or self.process.poll() is not None:
                code = None if self.process is None else self.process.returncode
                raise ServerFailed(f"server exited (code {code}) before it was ready:\n{self.tail()}")
            if http_status(self.url + self.ready_path) == 200:
                streak += 1
                if streak >= consecutive:
                    return
                continue
            streak = 0
            time.sleep(0.2)
        raise ServerFailed(f"server not ready after {timeout_s:.0f} s:\n{self.tail()}")

    def stop(self, grace_s: float = 15.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGINT)
        try:
            self.process.wait(grace_s)
        except subprocess.TimeoutExpired:
            log.warning("server %s ignored SIGINT for %.0f s: killing it", self.process.pid, grace_s)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(5)


@contextlib.contextmanager
def running(
    command: Sequence[str],
    port: int,
    ready_path: str = "/readyz",
    log_path: Path | None = None,
    env: Mapping[str, str] | None = None,
    timeout_s: float = 300.0,
    consecutive: int = 1,
) -> Iterator[ServerProcess]:
    server = ServerProcess(command, port, ready_path, log_path, env)
    server.start()
    try:
        server.wait_ready(timeout_s, consecutive)
        yield server
    finally:
        server.stop()


def python() -> str:
    return sys.executable
