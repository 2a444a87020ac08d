"""System shared memory against a real server with two workers: a region registered through one serves the other."""

from __future__ import annotations

import contextlib
import http.client
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest

from service.engine.fake import fake_output
from tests.service.server_support import running_process
from tests.service.shm.support import ShmObject, shm_infer_body

pytestmark = pytest.mark.slow
DIM = 8  # the fake engine's width
SHM = "/v2/systemsharedmemory"


def fake_server_args(*flags: str) -> list[str]:
    return ["-m", "service", "--engine", "fake", "--host", "127.0.0.1", "--shared-memory", "system", *flags]


class Connection:
    """One keep-alive HTTP connection, and the worker process that accepted it."""

    def __init__(self, port: int, workers: list[psutil.Process]) -> None:
        self.http = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        assert self.call("GET", "/v2/health/ready")[0] == 200  # accepted by a worker by now
        local_port = self.http.sock.getsockname()[1]
        owners = [w.pid for w in workers for c in w.net_connections("tcp") if c.raddr and c.raddr.port == local_port]
        assert len(owners) == 1, owners
        self.worker = owners[0]

    def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        payload = None if body is None else json.dumps(body).encode()
        self.http.request(method, path, body=payload, headers={"content-type": "application/json"})
        response = self.http.getresponse()
        data = response.read()
        return response.status, json.loads(data) if data else None


def connections_on_two_workers(port: int, process: psutil.Process) -> tuple[Connection, Connection]:
    """Open connections until two were accepted by different workers (the kernel picks the worker)."""
    workers = process.children(recursive=True)
    first = Connection(port, workers)
    for _ in range(200):
        conn = Connection(port, workers)
        if conn.worker != first.worker:
            return first, conn
        conn.http.close()
    raise AssertionError("200 connections all landed on the first one's worker")


@contextlib.contextmanager
def shm_object(size: int) -> Iterator[ShmObject]:
    obj = ShmObject(size)
    try:
        yield obj
    finally:
        obj.destroy()


def test_a_region_registered_through_one_worker_serves_requests_on_another(tmp_path: Path) -> None:
    x = np.random.default_rng(3).standard_normal((2, 5, DIM)).astype(np.float32)
    args = fake_server_args("--workers", "2")
    with (
        running_process(args, tmp_path / "server.log") as (url, server),
        shm_object(x.nbytes) as inputs,
        shm_object(x.nbytes) as outputs,
    ):
        inputs.write(x)
        port = int(url.rsplit(":", 1)[1])
        one, two = connections_on_two_workers(port, psutil.Process(server.pid))
        key_in, key_out = inputs.key, outputs.key
        assert (
            one.call("POST", f"{SHM}/region/in/register", {"key": key_in, "offset": 0, "byte_size": x.nbytes})[0] == 200
        )
        assert (
            two.call("POST", f"{SHM}/region/out/register", {"key": key_out, "offset": 0, "byte_size": x.nbytes})[0]
            == 200
        )
        for conn in (one, two):  # each worker lists both regions, once
            status, listed = conn.call("GET", f"{SHM}/status")
            assert status == 200 and [r["name"] for r in listed] == ["in", "out"]
        status, answer = two.call("POST", "/v2/models/encoder/infer", shm_infer_body(x, "in", "out"))
        assert status == 200, answer
        np.testing.assert_allclose(outputs.array(np.float32, x.shape), fake_output(x), rtol=1e-6)
        duplicate = two.call("POST", f"{SHM}/region/in/register", {"key": key_in, "offset": 0, "byte_size": 8})
        assert duplicate[0] == 409
        assert two.call("POST", f"{SHM}/region/in/unregister")[0] == 200
        status, answer = one.call("POST", "/v2/models/encoder/infer", shm_infer_body(x, "in", "out"))
        assert status == 404 and "'in' is registered" in answer["error"]
        assert [r["name"] for r in one.call("GET", f"{SHM}/status")[1]] == ["out"]
        log = (tmp_path / "server.log").read_text()
    assert "Traceback" not in log
