"""Running the service as a real process on a free port, for the slow tests."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def encode_raw(url: str, x: np.ndarray) -> np.ndarray:
    """The server's /encode answer for ``x``, raw bytes both ways in the input's dtype: the reference an OIP or
    gRPC answer is compared with, bit for bit."""
    headers = {"content-type": "application/octet-stream", "x-shape": ",".join(map(str, x.shape))}
    response = httpx.post(f"{url}/encode", content=x.tobytes(), headers=headers | {"x-dtype": x.dtype.name}, timeout=30)
    assert response.status_code == 200, response.text
    return np.frombuffer(response.content, x.dtype).reshape(x.shape)


def clean_env(**extra: str) -> dict[str, str]:
    """The environment without ``ENCODER_*`` settings; gRPC off (``extra`` may turn it on), so parallel test
    servers never compete for its default port."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ENCODER_") and k != "PROMETHEUS_MULTIPROC_DIR"}
    return env | {"ENCODER_GRPC_PORT": "0"} | extra


@contextlib.contextmanager
def running(args: list[str], log: Path, env: dict[str, str] | None = None, timeout: float = 120.0) -> Iterator[str]:
    """Start ``python <args> --port P``, wait for /readyz, yield its base URL; SIGTERM it afterwards."""
    with running_process(args, log, env, timeout) as (url, _):
        yield url


@contextlib.contextmanager
def running_process(
    args: list[str], log: Path, env: dict[str, str] | None = None, timeout: float = 120.0
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """:func:`running`, also yielding the process (its pid, or to signal it; an exit before the end is fine)."""
    port = free_port()
    command = [sys.executable, *args, "--port", str(port)]
    with log.open("wb") as out:
        process = subprocess.Popen(command, cwd=REPO, env=env or clean_env(), stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, process, log, timeout)
        yield url, process
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            code = process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            raise AssertionError(f"the server ignored SIGTERM:\n{log.read_text()[-3000:]}") from None
    # A single worker exits 0 after a graceful shutdown; other uvicorn setups re-raise SIGTERM on the way out.
    assert code in (0, -signal.SIGTERM), f"exit {code}:\n{log.read_text()[-3000:]}"
    assert "Application shutdown complete" in log.read_text()


def wait_ready(url: str, process: subprocess.Popen[bytes], log: Path, timeout: float) -> None:
    wait_http(f"{url}/readyz", process, log, timeout)


def wait_http(url: str, process: subprocess.Popen[bytes], log: Path, timeout: float) -> None:
    """Poll ``url`` until it answers 200; fail with the log's tail if the process exits or time runs out."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if process.poll() is not None:
            raise AssertionError(f"{process.args} exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=2).status_code == 200:
                return
        time.sleep(0.1)
    raise AssertionError(f"{url} was not ready within {timeout} s:\n{log.read_text()[-3000:]}")


def send_raw_request(port: int, body: bytes, content_type: str) -> socket.socket:
    """Send a whole POST /encode over a bare socket and return it unread (to close it early)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    head = f"POST /encode HTTP/1.1\r\nHost: test\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n\r\n"
    sock.sendall(head.encode() + body)
    return sock
