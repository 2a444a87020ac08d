"""tritonclient's own calls against a real server: register, status, infer in and out of shared memory, unregister,
and every bad shared-memory request a 4xx, through tritonclient.http."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.http as httpclient
import tritonclient.utils.shared_memory as shm
from tritonclient.utils import InferenceServerException

from service.engine.fake import fake_output
from tests.service.server_support import running_process
from tests.service.shm.test_server import fake_server_args

pytestmark = pytest.mark.slow
DIM = 8  # the fake engine's width


@contextlib.contextmanager
def region(name: str, size: int) -> Iterator[Any]:
    handle = shm.create_shared_memory_region(name, f"/encoder-test-{name}", size)
    try:
        yield handle
    finally:
        shm.destroy_shared_memory_region(handle)


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
