"""The extension in a real server (``python -m service``, FakeEngine, fake device layer): two workers share the
registry, tritonclient.http drives it, and a server that cannot serve CUDA regions refuses to start."""

from __future__ import annotations

import base64
import subprocess
import sys
from pathlib import Path

import numpy as np
import psutil
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from service.cudashm.fake import FakeCudaRegion
from service.engine.fake import fake_output
from tests.service.server_support import REPO, clean_env, running_process
from tests.service.shm.support import shm_infer_body
from tests.service.shm.test_server import connections_on_two_workers

pytestmark = pytest.mark.slow
DIM = 8
CUDA = "/v2/cudasharedmemory"


def server_args(*flags: str) -> list[str]:
    on = ["--shared-memory", "system,cuda", "--cuda-memory", "fake", "--devices", "0"]
    return ["-m", "service", "--engine", "fake", "--host", "127.0.0.1", *on, *flags]


def register(region: FakeCudaRegion) -> dict[str, object]:
    return {"raw_handle": {"b64": base64.b64encode(region.handle).decode()}, "device_id": 0, "byte_size": region.size}


def test_two_workers_share_cuda_regions(tmp_path: Path) -> None:
    x = np.random.default_rng(3).standard_normal((2, 5, DIM)).astype(np.float32)
    inputs, outputs = FakeCudaRegion(x.nbytes), FakeCudaRegion(x.nbytes)
    try:
        inputs.write(x)
        with running_process(server_args("--workers", "2"), tmp_path / "server.log") as (url, server):
            port = int(url.rsplit(":", 1)[1])
            one, two = connections_on_two_workers(port, psutil.Process(server.pid))
            assert one.call("POST", f"{CUDA}/region/in/register", register(inputs))[0] == 200
            assert two.call("POST", f"{CUDA}/region/out/register", register(outputs))[0] == 200
            for conn in (one, two):  # each worker lists both regions, once
                status, listed = conn.call("GET", f"{CUDA}/status")
                assert status == 200 and [r["name"] for r in listed] == ["in", "out"]
            for conn in (one, two, one):  # each worker opens the other's region at its first use
                outputs.write(np.zeros_like(x))
                status, answer = conn.call("POST", "/v2/models/encoder/infer", shm_infer_body(x, "in", "out"))
                assert status == 200, answer
                np.testing.assert_allclose(outputs.array(np.float32, x.shape), fake_output(x), rtol=1e-6)
            assert two.call("POST", f"{CUDA}/region/in/register", register(inputs))[0] == 409
            assert two.call("POST", f"{CUDA}/region/in/unregister")[0] == 200
            status, answer = one.call("POST", "/v2/models/encoder/infer", shm_infer_body(x, "in", "out"))
            assert status == 404 and "'in' is registered" in answer["error"]
            assert [r["name"] for r in one.call("GET", f"{CUDA}/status")[1]] == ["out"]
    finally:
        inputs.free()
        outputs.free()
    assert "Traceback" not in (tmp_path / "server.log").read_text()


def test_tritonclient_http_drives_cuda_shared_memory(tmp_path: Path) -> None:
    x = np.random.default_rng(4).standard_normal((3, 7, DIM)).astype(np.float32)
    inputs, outputs = FakeCudaRegion(x.nbytes), FakeCudaRegion(x.nbytes)
    try:
        inputs.write(x)
        with running_process(server_args(), tmp_path / "server.log") as (url, _):
            client = httpclient.InferenceServerClient(url.removeprefix("http://"))
            assert "cuda_shared_memory" in client.get_server_metadata()["extensions"]
            # get_raw_handle's form: base64 bytes (rapidjson writes them as text)
            client.register_cuda_shared_memory("in", base64.b64encode(inputs.handle), 0, x.nbytes)
            client.register_cuda_shared_memory("out", base64.b64encode(outputs.handle), 0, x.nbytes)
            status = client.get_cuda_shared_memory_status()
            assert status == [
                {"name": "in", "device_id": 0, "byte_size": x.nbytes},
                {"name": "out", "device_id": 0, "byte_size": x.nbytes},
            ]
            tensor = httpclient.InferInput("input", list(x.shape), "FP32")
            tensor.set_shared_memory("in", x.nbytes)
            wanted = httpclient.InferRequestedOutput("output", binary_data=True)
            wanted.set_shared_memory("out", x.nbytes)
            client.infer("encoder", [tensor], outputs=[wanted])
            encoded = client.infer("encoder", [_data_input(x)]).as_numpy("output")  # the same numbers
            np.testing.assert_array_equal(outputs.array(np.float32, x.shape), encoded)
            with pytest.raises(InferenceServerException) as info:
                client.register_cuda_shared_memory("bad", base64.b64encode(b"\0" * 64), 0, 64)
            assert info.value.status() == "422"
            client.unregister_cuda_shared_memory()
            assert client.get_cuda_shared_memory_status() == []
            client.close()
    finally:
        inputs.free()
        outputs.free()


def _data_input(x: np.ndarray) -> httpclient.InferInput:
    tensor = httpclient.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    return tensor


def test_cuda_shared_memory_without_a_gpu_exits_2_before_serving() -> None:
    command = [sys.executable, "-m", "service", "--engine", "fake", "--shared-memory", "cuda", "--devices", "cpu"]
    done = subprocess.run(command, cwd=REPO, env=clean_env(), capture_output=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert b"cannot serve" in done.stderr and b"Traceback" not in done.stderr
