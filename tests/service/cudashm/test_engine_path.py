"""The device-to-device path through a real engine process (``--shared-engine on``, FakeEngine, fake device layer):
a request whose input and output both lie in CUDA regions is batched by its worker and computed by the engine
process straight from and into them, NaN inputs are refused there (422), and unregistering closes the engine's
handles."""

from __future__ import annotations

import base64
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from service.cudashm.fake import FakeCudaRegion
from service.engine.fake import fake_output
from tests.service.server_support import running_process
from tests.service.shm.support import shm_infer_body
from tests.service.shm.test_server import Connection, connections_on_two_workers

pytestmark = pytest.mark.slow
DIM = 8
CUDA = "/v2/cudasharedmemory"


def register(region: FakeCudaRegion) -> dict[str, object]:
    return {"raw_handle": {"b64": base64.b64encode(region.handle).decode()}, "device_id": 0, "byte_size": region.size}


def engine_process(server: psutil.Process) -> psutil.Process:
    found = [p for p in server.children(recursive=True) if "service.engine.host" in " ".join(p.cmdline())]
    assert len(found) == 1, found
    return found[0]


def test_cuda_regions_are_computed_device_to_device_by_the_engine_process(tmp_path: Path) -> None:
    x = np.random.default_rng(5).standard_normal((3, 5, DIM)).astype(np.float32)
    flags = ["--workers", "2", "--shared-engine", "on", "--devices", "0", "--max-batch-size", "2"]
    flags += ["--shared-memory", "cuda", "--cuda-memory", "fake"]
    args = ["-m", "service", "--engine", "fake", "--host", "127.0.0.1", *flags]
    inputs, outputs = FakeCudaRegion(x.nbytes), FakeCudaRegion(x.nbytes)
    try:
        inputs.write(x)
        with running_process(args, tmp_path / "server.log") as (url, server):
            port = int(url.rsplit(":", 1)[1])
            engine = engine_process(psutil.Process(server.pid))
            conns = [*connections_on_two_workers(port, psutil.Process(server.pid))]  # both attached to the engine
            conns += [Connection(port, psutil.Process(server.pid).children(recursive=True)) for _ in range(2)]
            fds = engine.num_fds()
            assert conns[0].call("POST", f"{CUDA}/region/in/register", register(inputs))[0] == 200
            assert conns[1].call("POST", f"{CUDA}/region/out/register", register(outputs))[0] == 200
            for conn in conns:  # whichever worker each landed on
                outputs.write(np.zeros_like(x))
                status, answer = conn.call("POST", "/v2/models/encoder/infer", shm_infer_body(x, "in", "out"))
                assert status == 200, answer
                np.testing.assert_allclose(outputs.array(np.float32, x.shape), fake_output(x), rtol=1e-6)
            # Through the workers' batchers (3 samples: batches of 2 + 1), device to device (conns 0 and 1 are
            # on the two workers, whose statistics are their own).
            stats = [c.call("GET", "/v2/models/encoder/stats")[1]["model_stats"][0] for c in conns[:2]]
            assert sum(s["inference_count"] for s in stats) == 12, stats
            assert sum(s["execution_count"] for s in stats) == 8, stats
            metrics = conns[0].http
            metrics.request("GET", "/metrics")
            text = metrics.getresponse().read().decode()
            assert 'encoder_shm_requests_total{path="direct"} 4.0' in text

            bad = x.copy()
            bad[1, 2, 3] = np.nan
            inputs.write(bad)
            status, answer = conns[2].call("POST", "/v2/models/encoder/infer", shm_infer_body(x, "in", "out"))
            assert status == 422 and "finite" in answer["error"], answer

            assert conns[3].call("POST", f"{CUDA}/unregister")[0] == 200
            deadline = time.monotonic() + 10
            while engine.num_fds() > fds and time.monotonic() < deadline:  # workers sweep, then unregister
                time.sleep(0.1)
            assert engine.num_fds() == fds  # the engine process closed every handle it opened
            for conn in conns:
                conn.http.close()
        log = (tmp_path / "server.log").read_text()
    finally:
        inputs.free()
        outputs.free()
    assert "Traceback" not in log
    assert "serves a CUDA region by copying" not in log
