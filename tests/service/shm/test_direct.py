"""The direct path against a real server: engine processes read and write the client's regions themselves."""

from __future__ import annotations

import contextlib
import io
import os
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil
import pytest

from service.engine.fake import fake_output
from tests.service.server_support import running_process
from tests.service.shm.support import ShmObject, shm_infer_body
from tests.service.shm.test_server import DIM, SHM, fake_server_args
from tests.service.support import metric

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]
ENGINE = ("--workers", "2", "--shared-engine", "on", "--max-batch-size", "8", "--max-delay-ms", "2")


JSON_OUTPUT = {"outputs": [{"name": "output", "parameters": {"binary_data": False}}]}  # the answer in the body


def engine_processes(server: psutil.Process) -> list[psutil.Process]:
    return [c for c in server.children(recursive=True) if "service.engine.host" in " ".join(c.cmdline())]


def mapped(process: psutil.Process, obj: ShmObject) -> int:
    """Mappings of ``obj`` in ``process``."""
    lines = Path(f"/proc/{process.pid}/maps").read_text().splitlines()
    return sum(1 for line in lines if line.endswith(str(obj.path)) or line.endswith(f"{obj.path} (deleted)"))


def usage(process: psutil.Process) -> tuple[int, int, int]:
    """(mappings of shared-memory objects, open descriptors other than connections', all mappings) of ``process``.

    Sockets and worker arenas are left out: a worker may open an engine connection, with its arena, after the first
    count (its pool attaches lazily), which is no leak; a region's descriptor is a file of its own."""
    maps = Path(f"/proc/{process.pid}/maps").read_text().splitlines()
    objects = sum(1 for line in maps if "/dev/shm/" in line)
    fds = 0
    for fd in os.listdir(f"/proc/{process.pid}/fd"):
        with contextlib.suppress(OSError):  # closed since the listing
            link = os.readlink(f"/proc/{process.pid}/fd/{fd}")
            fds += not link.startswith(("socket:", "/memfd:encoder-arena"))
    return objects, fds, len(maps)


def wait_attached(engine: psutil.Process, workers: int = 2, connections: int = 2) -> None:
    """Until every worker attached (the server is ready with its first worker): the listener and their sockets."""

    def sockets() -> int:
        links = [os.readlink(f"/proc/{engine.pid}/fd/{fd}") for fd in os.listdir(f"/proc/{engine.pid}/fd")]
        return sum(link.startswith("socket:") for link in links)

    wait_until(lambda: sockets() >= 1 + workers * connections, "every worker to attach to the engine process")


def shm_paths(url: str) -> dict[str, float]:
    page = httpx.get(f"{url}/metrics", timeout=10).text
    return {path: metric(page, "encoder_shm_requests_total", path=path) for path in ("direct", "copied")}


def encode(url: str, x: np.ndarray) -> np.ndarray:
    buffer = io.BytesIO()
    np.save(buffer, x)
    response = httpx.post(f"{url}/encode", content=buffer.getvalue(), headers={"content-type": "application/x-npy"})
    assert response.status_code == 200, response.text
    return np.load(io.BytesIO(response.content))


def register(client: httpx.Client, name: str, obj: ShmObject, size: int | None = None, offset: int = 0) -> None:
    body = {"key": obj.key, "offset": offset, "byte_size": obj.size - offset if size is None else size}
    response = client.post(f"{SHM}/region/{name}/register", json=body)
    assert response.status_code == 200, response.text


def wait_until(condition: Any, what: str, timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.fixture
def objects() -> Iterator[list[ShmObject]]:
    made: list[ShmObject] = []
    yield made
    for obj in made:
        obj.destroy()


def test_direct_answers_equal_encode_and_unbatched_ones_and_the_metric_says_direct(
    tmp_path: Path, objects: list[ShmObject]
) -> None:
    rng = np.random.default_rng(5)
    xs = [rng.standard_normal((b, 6, DIM)).astype(np.float32) for b in (1, 3, 12)]  # 12: two engine batches
    with running_process(fake_server_args(*ENGINE), tmp_path / "server.log") as (url, server):
        objects += [ShmObject(1 << 16), ShmObject(1 << 16)]
        inputs, outputs = objects
        with httpx.Client(base_url=url, timeout=30) as client:
            register(client, "in", inputs, offset=4096)
            register(client, "out", outputs)
            for i, x in enumerate(xs):
                inputs.write(x, offset=4096 + 64 * i)
                body = shm_infer_body(x, "in", "out")
                body["inputs"][0]["parameters"]["shared_memory_offset"] = 64 * i
                body["outputs"][0]["parameters"]["shared_memory_offset"] = 128 * i
                response = client.post("/v2/models/encoder/infer", json=body)
                assert response.status_code == 200, response.text
                answer = outputs.array(np.float32, x.shape, offset=128 * i).copy()
                np.testing.assert_array_equal(answer, encode(url, x))  # bit for bit
                alone = np.concatenate([encode(url, x[j : j + 1]) for j in range(len(x))])
                np.testing.assert_array_equal(answer, alone)
                np.testing.assert_allclose(answer, fake_output(x), rtol=1e-6)
            paths = shm_paths(url)
            assert paths == {"direct": 3, "copied": 0}, paths
            (engine,) = engine_processes(psutil.Process(server.pid))
            assert mapped(engine, inputs) == 1 and mapped(engine, outputs) == 1  # once, for both workers
            assert client.post(f"{SHM}/unregister").status_code == 200
            wait_until(lambda: mapped(engine, inputs) + mapped(engine, outputs) == 0, "the regions to be unmapped")


def test_requests_that_need_a_copy_take_the_copied_path(tmp_path: Path, objects: list[ShmObject]) -> None:
    x = np.random.default_rng(6).standard_normal((2, 4, DIM)).astype(np.float32)
    with running_process(fake_server_args(*ENGINE), tmp_path / "server.log") as (url, _):
        objects += [ShmObject(1 << 12), ShmObject(1 << 12)]
        inputs, outputs = objects
        with httpx.Client(base_url=url, timeout=30) as client:
            register(client, "in", inputs)
            register(client, "out", outputs)
            half = x.astype(np.float16)
            inputs.write(half)
            response = client.post("/v2/models/encoder/infer", json=shm_infer_body(half, "in", "out", datatype="FP16"))
            assert response.status_code == 200, response.text  # FP16 in, FP32 engine: a cast, so a copy
            np.testing.assert_array_equal(outputs.array(np.float16, x.shape), encode(url, half).astype(np.float16))
            inputs.write(x)
            response = client.post("/v2/models/encoder/infer", json=shm_infer_body(x, "in") | JSON_OUTPUT)
            assert response.status_code == 200, response.text  # the answer in the body
            answer = np.asarray(response.json()["outputs"][0]["data"], np.float32).reshape(x.shape)
            np.testing.assert_array_equal(answer, encode(url, x))
        assert shm_paths(url) == {"direct": 0, "copied": 2}


def test_two_hundred_register_use_unregister_cycles_leak_no_mapping_or_descriptor_in_the_engine_process(
    tmp_path: Path, objects: list[ShmObject]
) -> None:
    x = np.random.default_rng(7).standard_normal((2, 4, DIM)).astype(np.float32)
    with running_process(fake_server_args(*ENGINE), tmp_path / "server.log") as (url, server):
        (engine,) = engine_processes(psutil.Process(server.pid))
        with httpx.Client(base_url=url, timeout=30) as client:

            def cycle(i: int) -> None:
                obj = ShmObject(2 * x.nbytes)
                try:
                    obj.write(x + i)
                    register(client, f"r{i}", obj)
                    body = shm_infer_body(x, f"r{i}", f"r{i}")
                    body["outputs"][0]["parameters"]["shared_memory_offset"] = x.nbytes
                    response = client.post("/v2/models/encoder/infer", json=body)
                    assert response.status_code == 200, response.text
                    np.testing.assert_allclose(obj.array(np.float32, x.shape, x.nbytes), fake_output(x + i), rtol=1e-6)
                    assert client.post(f"{SHM}/region/r{i}/unregister").status_code == 200
                finally:
                    obj.destroy()

            wait_attached(engine)
            cycle(0)
            encode(url, x)
            before = usage(engine)
            for i in range(1, 201):
                cycle(i)
            assert shm_paths(url)["direct"] == 201

            def settled() -> bool:
                objects, fds, maps = usage(engine)
                # No region mapped, no descriptor kept; the allocator's own anonymous mappings may vary a little.
                return objects == 0 and fds <= before[1] and maps <= before[2] + 16

            wait_until(settled, f"the engine process to be back to {before}, not {usage(engine)}")


def test_with_two_devices_each_engine_process_maps_the_region_it_computes(
    tmp_path: Path, objects: list[ShmObject]
) -> None:
    x = np.random.default_rng(8).standard_normal((1, 4, DIM)).astype(np.float32)
    with running_process(fake_server_args(*ENGINE, "--devices", "cpu:2"), tmp_path / "server.log") as (url, server):
        engines = engine_processes(psutil.Process(server.pid))
        assert len(engines) == 2
        objects += [ShmObject(1 << 12)]
        (obj,) = objects
        with httpx.Client(base_url=url, timeout=30) as client:
            register(client, "r", obj)
            body = shm_infer_body(x, "r", "r")
            body["outputs"][0]["parameters"]["shared_memory_offset"] = 2048
            for i in range(12):  # sequential batches alternate over the devices (the tie-break)
                obj.write(x + i)
                assert client.post("/v2/models/encoder/infer", json=body).status_code == 200
                np.testing.assert_allclose(obj.array(np.float32, x.shape, 2048), fake_output(x + i), rtol=1e-6)
            assert [mapped(engine, obj) for engine in engines] == [1, 1]
            assert shm_paths(url) == {"direct": 12, "copied": 0}
            assert client.post(f"{SHM}/region/r/unregister").status_code == 200
            wait_until(lambda: sum(mapped(e, obj) for e in engines) == 0, "both engine processes to unmap it")


def test_a_worker_killed_holding_regions_leaves_none_mapped_in_the_engine_process(
    tmp_path: Path, objects: list[ShmObject]
) -> None:
    x = np.random.default_rng(9).standard_normal((1, 4, DIM)).astype(np.float32)
    with running_process(fake_server_args(*ENGINE), tmp_path / "server.log") as (url, server):
        (engine,) = engine_processes(psutil.Process(server.pid))
        wait_attached(engine)
        objects += [ShmObject(1 << 12)]
        (obj,) = objects
        obj.write(x)
        with httpx.Client(base_url=url, timeout=30) as client:  # one kept-alive connection: one worker
            register(client, "r", obj)
            body = shm_infer_body(x, "r", "r")
            body["outputs"][0]["parameters"]["shared_memory_offset"] = 2048
            for _ in range(3):
                assert client.post("/v2/models/encoder/infer", json=body).status_code == 200
        assert mapped(engine, obj) == 1
        workers = [p for p in psutil.Process(server.pid).children() if p.pid != engine.pid]
        (holder,) = [w for w in workers if mapped(w, obj)]  # the worker that served them maps the region too
        holder.send_signal(signal.SIGKILL)
        # Still registered (the registry outlives workers), but no live connection names the region any more.
        wait_until(lambda: mapped(engine, obj) == 0, "the dead worker's regions to be unmapped")
        assert engine.is_running()
        assert httpx.post(f"{url}/v2/models/encoder/infer", json=body, timeout=30).status_code == 200
        np.testing.assert_allclose(obj.array(np.float32, x.shape, 2048), fake_output(x), rtol=1e-6)


def test_non_finite_direct_inputs_get_422_and_invalid_argument_while_their_batch_mates_are_answered(
    tmp_path: Path, objects: list[ShmObject]
) -> None:
    """The engine process refuses a NaN and an Inf it read from the client's region with the host check's message
    (REST 422, gRPC INVALID_ARGUMENT); requests sent while a first one computes (the fake engine takes 400 ms per
    batch) queue in the engine process and usually run as one batch there, and the finite one gets /encode's answer;
    the copied path still refuses on the host. That the requests of one engine batch are refused or answered each
    on its own is shown without timing in tests/service/engine/test_finite_checks.py."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    from tests.service.server_support import free_port

    message = "inputs must be finite numbers within the model's dtype (float32)"
    rng = np.random.default_rng(8)
    xs = [rng.standard_normal((2, 6, DIM)).astype(np.float32) for _ in range(5)]
    xs[1][1, 2, 3] = np.nan
    xs[2][0, 5, 7] = -np.inf
    grpc_port = free_port()
    args = fake_server_args(*ENGINE, "--fake-delay-ms", "400", "--grpc-port", str(grpc_port))
    with running_process(args, tmp_path / "server.log") as (url, _):
        objects += [ShmObject(1 << 14), ShmObject(1 << 14)]
        inputs, outputs = objects
        row = xs[0].nbytes
        with httpx.Client(base_url=url, timeout=30) as client:
            register(client, "in", inputs)
            register(client, "out", outputs)
            for i, x in enumerate(xs):
                inputs.write(x, offset=i * row)

            def post(i: int) -> httpx.Response:
                body = shm_infer_body(xs[i], "in", "out")
                body["inputs"][0]["parameters"]["shared_memory_offset"] = i * row
                body["outputs"][0]["parameters"]["shared_memory_offset"] = i * row
                with httpx.Client(base_url=url, timeout=30) as own:
                    return own.post("/v2/models/encoder/infer", json=body)

            def engine_batches() -> tuple[float, float]:
                page = httpx.get(f"{url}/metrics", timeout=10).text
                return metric(page, "encoder_batch_size_count"), metric(page, "encoder_batch_size_sum")

            with ThreadPoolExecutor(8) as pool:
                # Every engine connection of every worker registers the regions now (a REGISTER waits for its reply,
                # which a computing engine process sends only after its batch): later frames then queue at once.
                for _ in range(3):
                    assert all(r.status_code == 200 for r in pool.map(post, [0, 3, 4, 0, 3, 4, 0, 3]))
                before = engine_batches()
                first = pool.submit(post, 0)
                time.sleep(0.15)  # computing now: what follows queues behind it
                rest = [pool.submit(post, i) for i in (1, 2, 3)]
                responses = [first.result(), *(f.result() for f in rest)]
            after = engine_batches()
            assert after[1] - before[1] == 8 and after[0] - before[0] <= 3  # the later ones (mostly) merged
            for i, response in zip((0, 1, 2, 3), responses, strict=True):
                if i in (1, 2):
                    assert response.status_code == 422, response.text
                    assert response.json() == {"error": message}
                else:
                    assert response.status_code == 200, response.text
                    answer = outputs.array(np.float32, xs[i].shape, offset=i * row).copy()
                    np.testing.assert_array_equal(answer, encode(url, xs[i]))
            assert shm_paths(url) == {"direct": 24 + 2, "copied": 0}  # the refused ones are not counted
            grpc = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}")
            try:
                for i in (1, 2, 4):
                    tensor = grpcclient.InferInput("input", list(xs[i].shape), "FP32")
                    tensor.set_shared_memory("in", row, offset=i * row)
                    wanted = grpcclient.InferRequestedOutput("output")
                    wanted.set_shared_memory("out", row, offset=i * row)
                    if i == 4:
                        grpc.infer("encoder", [tensor], outputs=[wanted])
                        answer = outputs.array(np.float32, xs[i].shape, offset=i * row).copy()
                        np.testing.assert_array_equal(answer, encode(url, xs[i]))
                        continue
                    with pytest.raises(InferenceServerException) as raised:
                        grpc.infer("encoder", [tensor], outputs=[wanted])
                    assert raised.value.status() == "StatusCode.INVALID_ARGUMENT"
                    assert message in raised.value.message()
            finally:
                grpc.close()
            body = shm_infer_body(xs[1], "in") | JSON_OUTPUT  # the answer in the body: the copied path
            body["inputs"][0]["parameters"]["shared_memory_offset"] = row
            copied = client.post("/v2/models/encoder/infer", json=body)
            assert copied.status_code == 422 and copied.json() == {"error": message}
