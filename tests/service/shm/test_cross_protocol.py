"""One registry for both transports and every worker: a region registered over REST through one worker serves a
gRPC request on another, and a gRPC unregister is seen over REST."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import psutil
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from service.engine.fake import fake_output
from tests.service.server_support import free_port, running_process
from tests.service.shm.support import ShmObject, grpc_shm_tensors, shm_infer_body
from tests.service.shm.test_server import SHM, Connection, fake_server_args

pytestmark = pytest.mark.slow
DIM = 8


def grpc_worker(client: grpcclient.InferenceServerClient, port: int, workers: list[psutil.Process]) -> int:
    """The worker serving ``client``'s channel (found from this process's side of the connection)."""
    assert client.is_server_live()  # connected by now
    mine = [c.laddr.port for c in psutil.Process().net_connections("tcp") if c.raddr and c.raddr.port == port]
    owners = {w.pid for w in workers for c in w.net_connections("tcp") if c.raddr and c.raddr.port in mine}
    assert len(owners) == 1, owners
    return owners.pop()


@contextlib.contextmanager
def grpc_client_on_another_worker(
    port: int, workers: list[psutil.Process], avoid: int
) -> Iterator[grpcclient.InferenceServerClient]:
    for _ in range(100):
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{port}")
        if grpc_worker(client, port, workers) != avoid:
            try:
                yield client
            finally:
                client.close()
            return
        client.close()
    raise AssertionError("100 gRPC channels all landed on the REST connection's worker")


def test_rest_registration_serves_grpc_on_another_worker(tmp_path: Path) -> None:
    x = np.random.default_rng(5).standard_normal((2, 3, DIM)).astype(np.float32)
    inputs, outputs = ShmObject(x.nbytes), ShmObject(x.nbytes)
    inputs.write(x)
    grpc_port = free_port()
    args = fake_server_args("--workers", "2", "--grpc-port", str(grpc_port))
    try:
        with running_process(args, tmp_path / "server.log") as (url, server):
            workers = psutil.Process(server.pid).children(recursive=True)
            rest = Connection(int(url.rsplit(":", 1)[1]), workers)
            for name, obj in (("in", inputs), ("out", outputs)):
                body = {"key": obj.key, "offset": 0, "byte_size": x.nbytes}
                assert rest.call("POST", f"{SHM}/region/{name}/register", body)[0] == 200
            with grpc_client_on_another_worker(grpc_port, workers, avoid=rest.worker) as client:
                assert sorted(client.get_system_shared_memory_status(as_json=True)["regions"]) == ["in", "out"]
                tensors, wanted = grpc_shm_tensors(x, "in", "out")
                client.infer("encoder", tensors, outputs=wanted)
                np.testing.assert_allclose(outputs.array(np.float32, x.shape), fake_output(x), rtol=1e-6)
                client.unregister_system_shared_memory("in")
                with pytest.raises(InferenceServerException) as raised:
                    client.infer("encoder", tensors, outputs=wanted)
                assert "'in' is registered" in raised.value.message()
            assert [r["name"] for r in rest.call("GET", f"{SHM}/status")[1]] == ["out"]
            status, answer = rest.call("POST", "/v2/models/encoder/infer", shm_infer_body(x, "in", "out"))
            assert status == 404, answer
    finally:
        inputs.destroy()
        outputs.destroy()
