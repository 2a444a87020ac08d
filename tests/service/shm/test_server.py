"""System shared memory against real servers: two workers sharing regions, and tritonclient's own calls."""

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
import tritonclient.http as httpclient
import tritonclient.utils.shared_memory as shm
from tritonclient.utils import InferenceServerException

from service.engine.fake import fake_output
from tests.service.server_support import running_process

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
def region(name: str, size: int) -> Iterator[Any]:
    handle = shm.create_shared_memory_region(name, f"/encoder-test-{name}", size)
    try:
        yield handle
    finally:
        shm.destroy_shared_memory_region(handle)


def infer_body(x: np.ndarray, in_region: str, out_region: str) -> dict[str, Any]:
    size = x.nbytes
    inputs = [
        {
            "name": "input",
            "datatype": "FP32",
            "shape": list(x.shape),
            "parameters": {"shared_memory_region": in_region, "shared_memory_byte_size": size},
        }
    ]
    outputs = [{"name": "output", "parameters": {"shared_memory_region": out_region, "shared_memory_byte_size": size}}]
    return {"inputs": inputs, "outputs": outputs}


def test_a_region_registered_through_one_worker_serves_requests_on_another(tmp_path: Path) -> None:
    x = np.random.default_rng(3).standard_normal((2, 5, DIM)).astype(np.float32)
    args = fake_server_args("--workers", "2")
    with (
        running_process(args, tmp_path / "server.log") as (url, server),
        region("two-in", x.nbytes) as inputs,
        region("two-out", x.nbytes) as outputs,
    ):
        shm.set_shared_memory_region(inputs, [x])
        port = int(url.rsplit(":", 1)[1])
        one, two = connections_on_two_workers(port, psutil.Process(server.pid))
        key_in, key_out = "/encoder-test-two-in", "/encoder-test-two-out"
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
        status, answer = two.call("POST", "/v2/models/encoder/infer", infer_body(x, "in", "out"))
        assert status == 200, answer
        np.testing.assert_allclose(shm.get_contents_as_numpy(outputs, np.float32, x.shape), fake_output(x), rtol=1e-6)
        duplicate = two.call("POST", f"{SHM}/region/in/register", {"key": key_in, "offset": 0, "byte_size": 8})
        assert duplicate[0] == 409
        assert two.call("POST", f"{SHM}/region/in/unregister")[0] == 200
        status, answer = one.call("POST", "/v2/models/encoder/infer", infer_body(x, "in", "out"))
        assert status == 404 and "'in' is registered" in answer["error"]
        assert [r["name"] for r in one.call("GET", f"{SHM}/status")[1]] == ["out"]
        log = (tmp_path / "server.log").read_text()
    assert "Traceback" not in log


def test_tritonclient_http_drives_system_shared_memory(tmp_path: Path) -> None:
    x = np.random.default_rng(4).standard_normal((3, 7, DIM)).astype(np.float32)
    with (
        running_process(fake_server_args(), tmp_path / "server.log") as (url, _),
        region("tc-in", x.nbytes) as inputs,
        region("tc-out", x.nbytes) as outputs,
    ):
        client = httpclient.InferenceServerClient(url.removeprefix("http://"))
        assert "system_shared_memory" in client.get_server_metadata()["extensions"]
        shm.set_shared_memory_region(inputs, [x])
        client.unregister_system_shared_memory()
        client.register_system_shared_memory("tc-in", "/encoder-test-tc-in", x.nbytes)
        client.register_system_shared_memory("tc-out", "/encoder-test-tc-out", x.nbytes)
        status = client.get_system_shared_memory_status()
        assert {r["name"]: (r["key"], r["offset"], r["byte_size"]) for r in status} == {
            "tc-in": ("/encoder-test-tc-in", 0, x.nbytes),
            "tc-out": ("/encoder-test-tc-out", 0, x.nbytes),
        }
        assert client.get_system_shared_memory_status("tc-in") == [status[0]]

        infer_input = httpclient.InferInput("input", list(x.shape), "FP32")
        infer_input.set_shared_memory("tc-in", x.nbytes)
        requested = httpclient.InferRequestedOutput("output", binary_data=True)
        requested.set_shared_memory("tc-out", x.nbytes)
        result = client.infer("encoder", [infer_input], outputs=[requested])
        out = result.get_output("output")
        assert out["parameters"]["shared_memory_region"] == "tc-out" and out["shape"] == list(x.shape)
        answer = shm.get_contents_as_numpy(outputs, np.float32, x.shape).copy()
        encoded = httpclient_encode(url, x)
        np.testing.assert_array_equal(answer, encoded)  # the same numbers as /encode
        np.testing.assert_allclose(answer, fake_output(x), rtol=1e-6)

        errors = tritonclient_errors(client, x)
        client.unregister_system_shared_memory("tc-in")
        assert [r["name"] for r in client.get_system_shared_memory_status()] == ["tc-out"]
        client.unregister_system_shared_memory()
        assert client.get_system_shared_memory_status() == []
        client.close()
    assert errors == {
        "missing key": "404",
        "path in key": "422",
        "duplicate": "409",
        "past the object": "422",
        "unknown region": "404",
        "wrong byte size": "422",
        "past the region": "422",
        "status of unknown": "404",
    }


def httpclient_encode(url: str, x: np.ndarray) -> np.ndarray:
    import httpx

    response = httpx.post(f"{url}/encode", json={"inputs": x.tolist()}, timeout=30)
    assert response.status_code == 200, response.text
    return np.asarray(response.json()["outputs"], np.float32)


def tritonclient_errors(client: httpclient.InferenceServerClient, x: np.ndarray) -> dict[str, str]:
    """Each bad request through tritonclient's own calls: the HTTP status it raised with."""

    def infer(region_name: str, byte_size: int, offset: int = 0) -> None:
        infer_input = httpclient.InferInput("input", list(x.shape), "FP32")
        infer_input.set_shared_memory(region_name, byte_size, offset)
        client.infer("encoder", [infer_input])

    calls = {
        "missing key": lambda: client.register_system_shared_memory("r", "/encoder-test-missing", 8),
        "path in key": lambda: client.register_system_shared_memory("r", "/../etc/passwd", 8),
        "duplicate": lambda: client.register_system_shared_memory("tc-in", "/encoder-test-tc-in", 8),
        "past the object": lambda: client.register_system_shared_memory("r", "/encoder-test-tc-in", x.nbytes + 1),
        "unknown region": lambda: infer("nope", x.nbytes),
        "wrong byte size": lambda: infer("tc-in", x.nbytes - 4),
        "past the region": lambda: infer("tc-in", x.nbytes, offset=4),
        "status of unknown": lambda: client.get_system_shared_memory_status("nope"),
    }
    statuses = {}
    for name, call in calls.items():
        with pytest.raises(InferenceServerException) as raised:
            call()
        statuses[name] = raised.value.status()
        assert raised.value.message(), name
    return statuses
