"""The gRPC servicer in-process (the app's lifespan starts it) with a FakeEngine: every RPC and status code."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc.aio as tca
from tritonclient.grpc import InferInput, InferRequestedOutput
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from service.engine.fake import POISON, FakeEngine, fake_output
from tests.service.server_support import free_port
from tests.service.support import grpc_serving, metric, serving

pytestmark = pytest.mark.anyio
DIM = 8
Code = grpc.StatusCode


@contextlib.asynccontextmanager
async def grpc_service(
    engine: FakeEngine | None = None, ready: bool = True, **overrides: Any
) -> AsyncIterator[tuple[tca.InferenceServerClient, pb_grpc.GRPCInferenceServiceStub, Any]]:
    """The app with gRPC on a free port: tritonclient's asyncio client, a bare stub, and the HTTP client."""
    async with grpc_serving(engine, ready, **overrides) as served, grpc.aio.insecure_channel(served.address) as channel:
        yield served.client, pb_grpc.GRPCInferenceServiceStub(channel), served.http


def raw_input(x: np.ndarray, name: str = "input") -> InferInput:
    tensor = InferInput(name, list(x.shape), "FP16" if x.dtype == np.float16 else "FP32")
    tensor.set_data_from_numpy(x)
    return tensor


def raw_request(x: np.ndarray, model: str = "encoder", datatype: str = "FP32", **params: int) -> pb.ModelInferRequest:
    msg = pb.ModelInferRequest(model_name=model, raw_input_contents=[x.tobytes()])
    msg.inputs.add(name="input", datatype=datatype, shape=x.shape)
    for key, value in params.items():
        msg.parameters[key].int64_param = value
    return msg


async def status_of(call: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value.code(), info.value.details() or ""


async def requests_counted(http: httpx.AsyncClient, outcome: str, expected: float, timeout: float = 10.0) -> float:
    """``encoder_requests_total{outcome}`` once it reaches ``expected`` (or the timeout passes). A failed call is
    counted by its handler after the status went out, so the client may ask before the count is there."""
    end = time.monotonic() + timeout
    while (got := metric((await http.get("/metrics")).text, "encoder_requests_total", outcome=outcome)) != expected:
        if time.monotonic() > end:
            break
        await asyncio.sleep(0.005)
    return got


def sample(seed: int, *shape: int, dtype: Any = np.float32) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


async def test_health_metadata_config_and_statistics() -> None:
    async with grpc_service() as (client, _, _http):
        assert await client.is_server_live() and await client.is_server_ready()
        assert await client.is_model_ready("encoder") and await client.is_model_ready("encoder", "1")
        server = await client.get_server_metadata(as_json=True)
        assert server["name"] == "encoder-service" and "statistics" in server["extensions"]
        meta = await client.get_model_metadata("encoder", as_json=True)
        assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": ["-1", "-1", str(DIM)]}]
        assert meta["outputs"][0]["name"] == "output" and meta["versions"] == ["1"]
        config = (await client.get_model_config("encoder", as_json=True))["config"]
        assert config["max_batch_size"] == 8 and config["input"][0]["dims"] == ["-1", str(DIM)]
        await client.infer("encoder", [raw_input(sample(0, 2, 3, DIM))])
        stats = (await client.get_inference_statistics("encoder", as_json=True))["model_stats"][0]
        assert stats["name"] == "encoder" and stats["inference_count"] == "2"


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
@pytest.mark.parametrize("shape", [(5, DIM), (1, 5, DIM), (4, 5, DIM)])
async def test_infer_raw_contents(dtype: Any, shape: tuple[int, ...]) -> None:
    x = sample(1, *shape, dtype=dtype)
    async with grpc_service() as (client, _, _http):
        result = await client.infer("encoder", [raw_input(x)], outputs=[InferRequestedOutput("output")])
    y = result.as_numpy("output")
    assert y.dtype == dtype and y.shape == shape  # answered in the input's datatype, with its shape
    reference = fake_output(x.reshape(-1, *shape[-2:]).astype(np.float32)).reshape(shape)
    np.testing.assert_allclose(y.astype(np.float32), reference, rtol=2e-3 if dtype == np.float16 else 1e-6, atol=2e-3)


async def test_typed_fp32_contents() -> None:
    x = sample(2, 2, 3, DIM)
    msg = pb.ModelInferRequest(model_name="encoder")
    msg.inputs.add(name="input", datatype="FP32", shape=x.shape).contents.fp32_contents.extend(x.ravel().tolist())
    async with grpc_service() as (_, stub, _http):
        answer = await stub.ModelInfer(msg)
    y = np.frombuffer(answer.raw_output_contents[0], np.float32).reshape(answer.outputs[0].shape)
    np.testing.assert_allclose(y, fake_output(x), rtol=1e-6)


def renamed(msg: pb.ModelInferRequest) -> pb.ModelInferRequest:
    msg.inputs[0].name = "pixels"
    return msg


def truncated(msg: pb.ModelInferRequest) -> pb.ModelInferRequest:
    msg.raw_input_contents[0] = msg.raw_input_contents[0][:-4]
    return msg


OUTCOMES = {Code.INVALID_ARGUMENT: "invalid", Code.NOT_FOUND: "invalid", Code.DEADLINE_EXCEEDED: "timeout"}
OUTCOMES[Code.INTERNAL] = "error"


@pytest.mark.parametrize(
    ("request_", "code", "message"),
    [
        (raw_request(sample(0, 2, 3, DIM + 1)), Code.INVALID_ARGUMENT, "last dimension must be 8"),
        (raw_request(sample(0, 1, 2, 3, DIM)), Code.INVALID_ARGUMENT, "expected shape (S, D) or (B, S, D)"),
        (raw_request(sample(0, 3, DIM).astype(np.int32), datatype="INT32"), Code.INVALID_ARGUMENT, "datatype 'INT32'"),
        (renamed(raw_request(sample(0, 3, DIM))), Code.INVALID_ARGUMENT, "unknown input 'pixels'"),
        (truncated(raw_request(sample(0, 3, DIM))), Code.INVALID_ARGUMENT, "92 bytes of raw contents"),
        (raw_request(sample(0, 3, DIM), model="bert"), Code.NOT_FOUND, "unknown model 'bert'"),
        (raw_request(np.full((1, 3, DIM), np.nan, np.float32)), Code.INVALID_ARGUMENT, "finite"),
        (raw_request(sample(0, 3, DIM), timeout=1), Code.DEADLINE_EXCEEDED, "deadline"),
        (raw_request(np.full((1, 3, DIM), POISON, np.float32)), Code.INTERNAL, "poison"),
    ],
)
async def test_bad_requests_get_their_own_status(request_: pb.ModelInferRequest, code: Any, message: str) -> None:
    async with grpc_service(engine=FakeEngine(delay_s=0.01)) as (_, stub, http):
        got, details = await status_of(stub.ModelInfer(request_))
        assert got == code and message in details, details
        assert await requests_counted(http, OUTCOMES[code], 1) == 1


async def test_bytes_that_are_no_message_are_invalid_argument() -> None:
    port = free_port()
    async with serving(grpc_port=port, host="127.0.0.1"), grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")  # bytes in, bytes out
        code, details = await status_of(call(b"\x0f\x0f"))
    assert code == Code.INVALID_ARGUMENT and "not a ModelInferRequest" in details


async def test_grpc_deadline_too_short_is_deadline_exceeded() -> None:
    async with grpc_service(engine=FakeEngine(delay_s=0.2)) as (_, stub, _http):
        busy = asyncio.ensure_future(stub.ModelInfer(raw_request(sample(0, 3, DIM))))  # holds the engine
        await asyncio.sleep(0.05)
        code, _ = await status_of(stub.ModelInfer(raw_request(sample(1, 3, DIM)), timeout=0.05))
        assert code == Code.DEADLINE_EXCEEDED
        await busy


async def test_overload_is_resource_exhausted() -> None:
    async with grpc_service(engine=FakeEngine(delay_s=0.2), max_queue=1, max_batch_size=1) as (_, stub, http):
        calls = [stub.ModelInfer(raw_request(sample(i, 3, DIM))) for i in range(6)]
        results = await asyncio.gather(*calls, return_exceptions=True)
        codes = [r.code() if isinstance(r, grpc.aio.AioRpcError) else Code.OK for r in results]
        refused = codes.count(Code.RESOURCE_EXHAUSTED)
        assert await requests_counted(http, "overloaded", refused) == refused
    assert Code.OK in codes and refused and set(codes) <= {Code.OK, Code.RESOURCE_EXHAUSTED}


async def test_not_ready_is_unavailable_and_reported() -> None:
    async with grpc_service(engine=FakeEngine(warmup_s=1.0), ready=False) as (client, stub, _http):
        assert await client.is_server_live() and not await client.is_server_ready()
        assert not await client.is_model_ready("encoder")
        code, details = await status_of(stub.ModelInfer(raw_request(sample(0, 3, DIM))))
        assert code == Code.UNAVAILABLE and "loading" in details
        code, _ = await status_of(stub.ModelMetadata(pb.ModelMetadataRequest(name="encoder")))
        assert code == Code.UNAVAILABLE


async def test_message_over_max_body_bytes_is_resource_exhausted() -> None:
    async with grpc_service(max_body_bytes=4096) as (_, stub, _http):
        code, _ = await status_of(stub.ModelInfer(raw_request(sample(0, 2, 64, DIM))))  # 4 KiB + framing
        assert code == Code.RESOURCE_EXHAUSTED
        assert (await stub.ModelInfer(raw_request(sample(0, 2, 8, DIM)))).outputs[0].name == "output"


async def test_shared_memory_rpcs_without_the_extension() -> None:
    async with grpc_service() as (_, stub, _http):
        calls = [
            stub.SystemSharedMemoryStatus(pb.SystemSharedMemoryStatusRequest()),
            stub.SystemSharedMemoryRegister(pb.SystemSharedMemoryRegisterRequest(name="r", key="/k", byte_size=8)),
            stub.SystemSharedMemoryUnregister(pb.SystemSharedMemoryUnregisterRequest(name="r")),
            stub.CudaSharedMemoryStatus(pb.CudaSharedMemoryStatusRequest()),
            stub.CudaSharedMemoryUnregister(pb.CudaSharedMemoryUnregisterRequest()),
        ]
        for call in calls:
            code, details = await status_of(call)
            assert code == Code.FAILED_PRECONDITION and "not enabled" in details
        code, _ = await status_of(stub.RepositoryIndex(pb.RepositoryIndexRequest()))
        assert code == Code.UNIMPLEMENTED
