"""gRPC against real ``python -m service`` processes with the real (small, CPU) model, driven by tritonclient.grpc."""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import psutil
import pytest
import tritonclient.grpc as tc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc
from tritonclient.utils import InferenceServerException

from tests.service.conftest import SMALL_DIMS
from tests.service.server_support import clean_env, encode_raw, free_port, running, running_process

pytestmark = pytest.mark.slow
DIM = SMALL_DIMS[0]
SEQ = 16


@contextlib.contextmanager
def grpc_server(bundle: Path, log: Path, *flags: str) -> Iterator[tuple[str, str, Any]]:
    """The service with gRPC on a free port: (HTTP URL, gRPC address, the process)."""
    port = free_port()
    serve = ["-m", "service", "--model-dir", str(bundle), "--provider", "cpu", "--host", "127.0.0.1"]
    serve += ["--seq-lens", str(SEQ), "--max-batch-size", "8", "--grpc-port", str(port), *flags]
    with running_process(serve, log, env=clean_env()) as (url, process):
        yield url, f"127.0.0.1:{port}", process


@pytest.fixture(scope="module")
def server(small_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    with grpc_server(small_bundle, tmp_path_factory.mktemp("grpc") / "server.log") as (url, address, _):
        yield url, address


def sample(seed: int, *shape: int, dtype: Any = np.float32) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def grpc_infer(address: str, x: np.ndarray, model: str = "encoder", **kw: Any) -> np.ndarray:
    client = tc.InferenceServerClient(address)
    try:
        tensor = tc.InferInput("input", list(x.shape), "FP16" if x.dtype == np.float16 else "FP32")
        tensor.set_data_from_numpy(x)
        result = client.infer(model, [tensor], outputs=[tc.InferRequestedOutput("output")], **kw)
        answer = result.as_numpy("output")
        assert answer is not None
        return answer
    finally:
        client.close()


def test_health_and_metadata(server: tuple[str, str]) -> None:
    client = tc.InferenceServerClient(server[1])
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("encoder")
    meta = client.get_model_metadata("encoder", as_json=True)
    assert meta["platform"] == "onnxruntime_onnx" and meta["inputs"][0]["shape"] == ["-1", "-1", str(DIM)]
    assert "statistics" in client.get_server_metadata(as_json=True)["extensions"]
    client.close()


@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_infer_equals_encode_and_the_reference(
    server: tuple[str, str], reference: Callable[[np.ndarray], np.ndarray], batch: int, dtype: Any
) -> None:
    url, address = server
    x = sample(batch, batch, SEQ, DIM, dtype=dtype)
    y = grpc_infer(address, x)
    assert y.dtype == dtype and y.shape == x.shape
    np.testing.assert_array_equal(y, encode_raw(url, x))  # same input, same batcher and engine: the same bits
    tolerance = 1e-4 if dtype == np.float32 else 1e-2
    np.testing.assert_allclose(y.astype(np.float32), reference(x.astype(np.float32)), rtol=tolerance, atol=tolerance)
    if batch > 1:  # batched rows equal the same samples sent alone
        alone = np.concatenate([grpc_infer(address, x[i : i + 1]) for i in range(batch)])
        np.testing.assert_allclose(y, alone, rtol=tolerance, atol=tolerance)


MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"


def serialize(request: pb.ModelInferRequest | bytes) -> bytes:
    return request if isinstance(request, bytes) else request.SerializeToString()


def bad(x: np.ndarray, model: str = "encoder", name: str = "input", datatype: str = "FP32") -> pb.ModelInferRequest:
    msg = pb.ModelInferRequest(model_name=model, raw_input_contents=[x.tobytes()])
    msg.inputs.add(name=name, datatype=datatype, shape=x.shape)
    return msg


def short(msg: pb.ModelInferRequest) -> pb.ModelInferRequest:
    msg.raw_input_contents[0] = msg.raw_input_contents[0][:-1]
    return msg


def with_timeout(msg: pb.ModelInferRequest, microseconds: int) -> pb.ModelInferRequest:
    msg.parameters["timeout"].int64_param = microseconds
    return msg


INVALID = grpc.StatusCode.INVALID_ARGUMENT
BAD_REQUESTS = {
    "wrong shape": (bad(sample(0, 2, SEQ, DIM + 1)), INVALID),
    "wrong rank": (bad(sample(0, DIM)), INVALID),
    "wrong datatype": (bad(sample(0, 1, SEQ, DIM).astype(np.float64), datatype="FP64"), INVALID),
    "unknown model": (bad(sample(0, 1, SEQ, DIM), model="resnet"), grpc.StatusCode.NOT_FOUND),
    "wrong input name": (bad(sample(0, 1, SEQ, DIM), name="x"), INVALID),
    "byte size mismatch": (short(bad(sample(0, 1, SEQ, DIM))), INVALID),
    "not a message": (b"\x0f\x0f", INVALID),
    "timeout too short": (with_timeout(bad(sample(0, 1, SEQ, DIM)), 1), grpc.StatusCode.DEADLINE_EXCEEDED),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_requests_get_their_status_and_the_server_goes_on(server: tuple[str, str], case: str) -> None:
    """Each with its own code (never INTERNAL), and the next good request is answered as before."""
    request, code = BAD_REQUESTS[case]
    with grpc.insecure_channel(server[1]) as channel, pytest.raises(grpc.RpcError) as info:
        call = channel.unary_unary(MODEL_INFER, request_serializer=serialize)  # also bytes that are no message
        call(request, timeout=30)
    assert info.value.code() == code, info.value.details()
    x = sample(7, 1, SEQ, DIM)
    np.testing.assert_array_equal(grpc_infer(server[1], x), encode_raw(server[0], x))


def test_grpc_deadline_too_short(server: tuple[str, str]) -> None:
    with pytest.raises(InferenceServerException, match="DEADLINE_EXCEEDED"):
        grpc_infer(server[1], sample(0, 8, SEQ, DIM), client_timeout=1e-4)
    with pytest.raises(InferenceServerException, match="DEADLINE_EXCEEDED"):
        grpc_infer(server[1], sample(0, 8, SEQ, DIM), timeout=1)  # the protocol's parameter, in microseconds


def grpc_listeners(process: psutil.Process, port: int) -> dict[int, int]:
    """Worker pid -> its established gRPC connections, for each descendant listening on ``port``."""
    found = {}
    for child in process.children(recursive=True):
        with contextlib.suppress(psutil.Error):
            sockets = [c for c in child.net_connections("tcp") if c.laddr and c.laddr.port == port]
            if any(c.status == psutil.CONN_LISTEN for c in sockets):
                found[child.pid] = sum(c.status == psutil.CONN_ESTABLISHED for c in sockets)
    return found


def test_two_workers_both_serve_grpc(small_bundle: Path, tmp_path: Path) -> None:
    with grpc_server(small_bundle, tmp_path / "server.log", "--workers", "2") as (url, address, process):
        port = int(address.rsplit(":", 1)[1])
        # A local subchannel pool per channel: each channel opens its own connection (grpc would share one).
        channels = [grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)]) for _ in range(16)]
        try:
            x = sample(3, 2, SEQ, DIM)
            for channel in channels:
                answer = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(bad(x), timeout=30)
                y = np.frombuffer(answer.raw_output_contents[0], np.float32).reshape(x.shape)
                np.testing.assert_array_equal(y, encode_raw(url, x))
            listeners = grpc_listeners(psutil.Process(process.pid), port)
        finally:
            for channel in channels:
                channel.close()
    # Both workers listen (SO_REUSEPORT) and the kernel gave each some of the 16 connections (all on one: 2^-15).
    assert len(listeners) == 2 and all(count > 0 for count in listeners.values()), listeners


def test_sigterm_finishes_grpc_calls_in_flight(tmp_path: Path) -> None:
    port = free_port()
    serve = ["-m", "service", "--engine", "fake", "--fake-delay-ms", "600", "--host", "127.0.0.1"]
    serve += ["--grpc-port", str(port)]
    with running_process(serve, tmp_path / "server.log") as (_, process):
        answers: list[Any] = []
        x = sample(0, 1, 4, 8)
        worker = threading.Thread(target=lambda: answers.append(grpc_infer(f"127.0.0.1:{port}", x)))
        worker.start()
        time.sleep(0.3)  # the call is computing
        process.send_signal(signal.SIGTERM)
        worker.join(timeout=30)
        assert process.wait(timeout=30) == 0
    assert len(answers) == 1 and answers[0].shape == x.shape


def test_grpc_port_zero_turns_it_off(small_bundle: Path, tmp_path: Path) -> None:
    port = free_port()
    serve = ["-m", "service", "--engine", "fake", "--host", "127.0.0.1", "--grpc-port", "0"]
    with running(serve, tmp_path / "server.log", env=clean_env(ENCODER_GRPC_PORT=str(port))):
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel, pytest.raises(grpc.RpcError) as info:
            pb_grpc.GRPCInferenceServiceStub(channel).ServerLive(pb.ServerLiveRequest(), timeout=2)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE  # nothing listens: the flag won over the variable
