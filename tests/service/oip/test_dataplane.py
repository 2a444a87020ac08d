"""The transport-neutral OIP data plane against a running service state (FakeEngine, real batcher)."""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

from service import dataplane
from service.batching.errors import DeadlineExceeded, EngineFailed
from service.engine.direct import DirectJob, Span
from service.engine.fake import POISON, FakeEngine, fake_output
from service.engine.remote import RemotePool
from service.errors import BadRequest, InvalidInput, NotFound
from service.oip import dataplane as oip
from service.oip.types import InferRequest, InputTensor, RequestedOutput, SharedMemoryRef
from service.state import ServiceState
from tests.service.engine.regions_support import Region
from tests.service.engine.support import hosting
from tests.service.support import metric, serving, settings

pytestmark = pytest.mark.anyio
DIM = 8


@contextlib.asynccontextmanager
async def running(engine: FakeEngine | None = None, **overrides: Any) -> AsyncIterator[ServiceState]:
    async with serving(engine or FakeEngine(), **overrides) as (_, app):
        yield app.state.service


def sample(seed: int, *shape: int, dtype: str = "float32") -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def expected(x: np.ndarray) -> np.ndarray:
    return fake_output(x if x.ndim == 3 else x[np.newaxis]).reshape(x.shape)


def request_for(x: np.ndarray, datatype: str = "FP32", **fields: Any) -> InferRequest:
    tensor = InputTensor("input", datatype, tuple(x.shape), data=x.reshape(-1))
    return InferRequest(model="encoder", inputs=[tensor], **fields)


async def answer(state: ServiceState, request: InferRequest, shm: Any = None, timeout_s: float = 30.0) -> Any:
    return await oip.infer(state, request, shm, time.monotonic() + timeout_s)


async def test_metadata_names_the_model_its_tensors_and_extensions() -> None:
    async with running(FakeEngine(dtype="float16")) as state:
        meta = oip.model_metadata(state, "encoder", "1")
        server = oip.server_metadata(state.settings)
    tensor = {"datatype": "FP16", "shape": [-1, -1, DIM]}
    assert meta == {
        "name": "encoder",
        "versions": ["1"],
        "platform": "onnxruntime_onnx",
        "inputs": [{"name": "input", **tensor}],
        "outputs": [{"name": "output", **tensor}],
    }
    assert server["extensions"] == ["binary_tensor_data", "statistics"]
    assert "system_shared_memory" in oip.extensions(settings(shared_memory="system"))


async def test_unknown_models_and_versions_are_not_found() -> None:
    async with running(model_name="bert") as state:
        assert oip.model_ready(state, "bert", None) is None
        assert oip.model_ready(state, "bert", "1") is None
        for name, version in (("encoder", None), ("bert", "2"), ("", None)):
            with pytest.raises(NotFound):
                oip.model_metadata(state, name, version)
            with pytest.raises(NotFound):
                await answer(state, InferRequest(model=name, version=version, inputs=[]))


@pytest.mark.parametrize("shape", [(5, DIM), (3, 5, DIM)])
async def test_json_values_are_answered_as_the_fake_model_computes(shape: tuple[int, ...]) -> None:
    x = sample(1, *shape)
    async with running() as state:
        response = await answer(state, request_for(x.astype(np.float64), id="q"))  # JSON numbers: float64
    (out,) = response.outputs
    assert (response.model, response.version, response.id) == ("encoder", "1", "q")
    assert out.name == "output" and out.datatype == "FP32" and out.shape == shape and out.data.dtype == np.float32
    np.testing.assert_allclose(out.data, expected(x), rtol=1e-6)
    assert response.compute_s > 0 and response.queue_s >= 0


@pytest.mark.parametrize(("engine_dtype", "datatype"), [("float16", "FP32"), ("float32", "FP16"), ("float16", "FP16")])
async def test_answers_come_in_the_inputs_datatype(engine_dtype: str, datatype: str) -> None:
    x = sample(2, 2, 4, DIM, dtype="float16" if datatype == "FP16" else "float32")
    async with running(FakeEngine(dtype=engine_dtype)) as state:
        response = await answer(state, request_for(x, datatype, outputs=[RequestedOutput("output", binary=True)]))
    (out,) = response.outputs
    assert out.datatype == datatype and out.data.dtype == x.dtype and out.binary
    np.testing.assert_allclose(out.data.astype(np.float32), expected(x.astype(np.float16)), rtol=2e-3, atol=2e-3)


def bad(x: np.ndarray, **changes: Any) -> InferRequest:
    request = request_for(x)
    for key, value in changes.items():
        setattr(request.inputs[0], key, value)
    return request


X = sample(3, 4, DIM)
INVALID: list[tuple[str, InferRequest, type[Exception]]] = [
    ("no input", InferRequest(model="encoder", inputs=[]), InvalidInput),
    ("two inputs", InferRequest(model="encoder", inputs=request_for(X).inputs * 2), InvalidInput),
    ("wrong name", bad(X, name="x"), InvalidInput),
    ("INT32", bad(X, datatype="INT32"), InvalidInput),
    ("unknown datatype", bad(X, datatype="FP8"), InvalidInput),
    ("count mismatch", bad(X, shape=(5, DIM)), BadRequest),
    ("negative shape", bad(X, shape=(-4, -DIM)), BadRequest),
    ("no data", bad(X, data=None), BadRequest),
    ("string data", bad(X, data=np.array(["a"] * X.size)), BadRequest),
    ("rank 1", bad(X, shape=(4 * DIM,)), InvalidInput),
    ("rank 4", bad(X, shape=(1, 1, 4, DIM)), InvalidInput),
    ("wrong width", bad(X, shape=(DIM, 4)), InvalidInput),
    ("too long", bad(sample(4, 65, DIM), shape=(65, DIM)), InvalidInput),
    ("empty", bad(X[:0], shape=(0, DIM)), InvalidInput),
    ("NaN", request_for(np.full((2, DIM), np.nan, np.float32)), InvalidInput),
    ("FP16 overflow", request_for(np.full((2, DIM), 1e6), "FP16"), InvalidInput),
    ("unknown output", request_for(X, outputs=[RequestedOutput("logits")]), InvalidInput),
    ("output twice", request_for(X, outputs=[RequestedOutput("output")] * 2), BadRequest),
    ("shm without registry", bad(X, data=None, shm=SharedMemoryRef("r", 0, X.nbytes)), BadRequest),
    ("bad timeout", request_for(X, timeout_ms=-1.0), BadRequest),
]


async def test_invalid_requests_get_domain_errors_and_count_as_failures() -> None:
    async with running() as state:
        for name, request, error in INVALID:
            with pytest.raises(error):
                await answer(state, request)
            assert name
        stats = state.oip_stats.as_json("encoder", "1")
        after = await answer(state, request_for(X))  # nothing above harmed the service
    assert stats["inference_stats"]["fail"]["count"] == len(INVALID)
    assert stats["inference_stats"]["success"]["count"] == 0
    np.testing.assert_allclose(after.outputs[0].data, expected(X), rtol=1e-6)


async def test_the_earlier_of_the_timeout_parameter_and_the_transport_deadline_wins() -> None:
    assert oip.request_deadline(10.0, None, 5.0) == 10.0
    assert oip.request_deadline(10.0, 0.0, 5.0) == 10.0  # 0: no timeout, as Triton
    assert oip.request_deadline(10.0, 2000.0, 5.0) == 7.0
    assert oip.request_deadline(6.0, 2000.0, 5.0) == 6.0
    for bad_value in (-1.0, math.inf, math.nan):
        with pytest.raises(BadRequest):
            oip.request_deadline(10.0, bad_value, 5.0)
    async with running(FakeEngine(delay_s=0.4)) as state:
        busy = asyncio.create_task(answer(state, request_for(sample(6, 4, DIM))))
        await asyncio.sleep(0.05)  # that batch now keeps the engine busy
        started = time.monotonic()
        with pytest.raises(DeadlineExceeded):
            await answer(state, request_for(X, timeout_ms=50.0))
        assert time.monotonic() - started < 0.35
        await busy


class FakeRegions:
    """A SharedMemory over plain byte arrays, bounds-checked like the real registry (which has its own tests)."""

    def __init__(self, **regions: int) -> None:
        self.regions = {name: bytearray(size) for name, size in regions.items()}

    def _view(self, ref: SharedMemoryRef, dtype: np.dtype[Any], shape: tuple[int, ...]) -> np.ndarray:
        if ref.region not in self.regions:
            raise NotFound(f"no region {ref.region!r}")
        region = self.regions[ref.region]
        if ref.byte_size != math.prod(shape) * dtype.itemsize or ref.offset + ref.byte_size > len(region):
            raise InvalidInput("bad range")
        view = memoryview(region)[ref.offset : ref.offset + ref.byte_size]
        return np.frombuffer(view, dtype).reshape(shape)

    def input_array(self, ref: SharedMemoryRef, dtype: np.dtype[Any], shape: tuple[int, ...]) -> np.ndarray:
        view = self._view(ref, dtype, shape)
        view.flags.writeable = False
        return view

    def output_array(self, ref: SharedMemoryRef, dtype: np.dtype[Any], shape: tuple[int, ...]) -> np.ndarray:
        return self._view(ref, dtype, shape)

    def input_span(self, ref: SharedMemoryRef, dtype: np.dtype[Any], shape: tuple[int, ...]) -> Span:
        return Span(self.input_array(ref, dtype, shape), FakeRegion(ref.region), ref.offset)

    def output_span(self, ref: SharedMemoryRef, dtype: np.dtype[Any], shape: tuple[int, ...]) -> Span:
        return Span(self.output_array(ref, dtype, shape), FakeRegion(ref.region), ref.offset)


@dataclass(frozen=True)
class FakeRegion:
    """Where a span lies, as far as these tests need (no engine process maps it)."""

    name: str
    fd: int = -1
    offset: int = 0
    byte_size: int = 0


class PlacingEngine(FakeEngine):
    """An engine that computes direct jobs where they lie (as engine processes do), recording what it got."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.placed: list[list[str]] = []

    def run_placed(self, parts: Sequence[np.ndarray | DirectJob]) -> tuple[list[np.ndarray], float]:
        self.placed.append([type(p).__name__ for p in parts])
        answers = []
        for part in parts:
            if isinstance(part, DirectJob):
                part.output[...] = self.run(part.source.array)
                answers.append(part.output)
            else:
                answers.append(self.run(part))
        return answers, 0.0


async def test_shared_memory_inputs_and_outputs_go_through_the_registry() -> None:
    x = sample(5, 2, 3, DIM)
    regions = FakeRegions(inputs=4096, outputs=4096)
    regions.regions["inputs"][64 : 64 + x.nbytes] = x.tobytes()
    tensor = InputTensor("input", "FP32", x.shape, shm=SharedMemoryRef("inputs", 64, x.nbytes))
    out_ref = SharedMemoryRef("outputs", 128, x.nbytes)
    request = InferRequest(model="encoder", inputs=[tensor], outputs=[RequestedOutput("output", shm=out_ref)])
    async with running() as state:
        response = await answer(state, request, regions)
        with pytest.raises(NotFound):
            await answer(state, InferRequest(model="encoder", inputs=[InputTensor("input", "FP32", x.shape,
                shm=SharedMemoryRef("nope", 0, x.nbytes))]), regions)  # fmt: skip
    (out,) = response.outputs
    assert out.shm == out_ref and out.data is None and out.shape == x.shape
    written = np.frombuffer(bytes(regions.regions["outputs"][128 : 128 + x.nbytes]), np.float32).reshape(x.shape)
    np.testing.assert_allclose(written, expected(x), rtol=1e-6)


def shm_request(x: np.ndarray, datatype: str, out_at: int | None) -> InferRequest:
    tensor = InputTensor("input", datatype, x.shape, shm=SharedMemoryRef("inputs", 64, x.nbytes))
    if out_at is None:
        return InferRequest(model="encoder", inputs=[tensor])
    out_ref = SharedMemoryRef("outputs", out_at, x.nbytes)
    return InferRequest(model="encoder", inputs=[tensor], outputs=[RequestedOutput("output", shm=out_ref)])


async def test_shared_memory_in_and_out_in_the_engines_dtype_goes_to_the_engine_as_a_direct_job() -> None:
    engine = PlacingEngine()
    x = sample(6, 3, 4, DIM)
    regions = FakeRegions(inputs=4096, outputs=4096)
    inputs = regions.regions["inputs"]
    async with running(engine) as state:
        inputs[64 : 64 + x.nbytes] = x.tobytes()
        await answer(state, shm_request(x, "FP32", 256), regions)
        half = x.astype(np.float16)
        inputs[64 : 64 + half.nbytes] = half.tobytes()
        await answer(state, shm_request(half, "FP16", 256), regions)  # a cast: copied
        inputs[64 : 64 + x.nbytes] = x.tobytes()
        await answer(state, shm_request(x, "FP32", None), regions)  # the answer in the body: copied
        direct = await answer(state, shm_request(x[0], "FP32", 512), regions)  # (S, D): one sample, direct
        with pytest.raises(InvalidInput):
            bad = x.copy()
            bad[0, 0, 0] = np.nan
            regions.regions["inputs"][64 : 64 + x.nbytes] = bad.tobytes()
            await answer(state, shm_request(x, "FP32", 256), regions)  # checked where it lies, as any input
        page = state.metrics.render().decode()
    assert direct.outputs[0].shape == x[0].shape
    written = np.frombuffer(bytes(regions.regions["outputs"][512 : 512 + x[0].nbytes]), np.float32)
    np.testing.assert_allclose(written.reshape(x[0].shape), expected(x[0]), rtol=1e-6)
    assert engine.placed == [["DirectJob"], ["DirectJob"]]  # the copied requests went the usual way, stacked
    assert (
        metric(page, "encoder_shm_requests_total", path="direct"),
        metric(page, "encoder_shm_requests_total", path="copied"),
    ) == (2, 2)


async def test_statistics_count_successes_failures_and_executions() -> None:
    async with running() as state:
        for seed in range(3):
            await answer(state, request_for(sample(seed, 2, 4, DIM)))
        poisoned = sample(9, 4, DIM)
        poisoned[0, 0] = POISON
        with pytest.raises(EngineFailed):
            await answer(state, request_for(poisoned))
        stats = oip.model_stats(state, "encoder", None)["model_stats"][0]
        every = oip.model_stats(state, None, None)
    inference = stats["inference_stats"]
    assert (inference["success"]["count"], inference["fail"]["count"]) == (3, 1)
    assert inference["success"]["ns"] > inference["compute_infer"]["ns"] > 0
    assert inference["queue"]["count"] == 3
    assert stats["inference_count"] == 6 and stats["execution_count"] == 3  # one batch each; the failed one not
    assert sum(b["compute_infer"]["count"] for b in stats["batch_stats"]) == 3
    assert stats["last_inference"] > 0 and every["model_stats"][0]["name"] == "encoder"


async def test_the_triton_model_config_describes_samples_and_the_batch_limit() -> None:
    async with running(FakeEngine(dtype="float16"), max_batch_size=4, max_delay_ms=2) as state:
        config = oip.model_config(state, "encoder", None)
        with pytest.raises(NotFound):
            oip.model_config(state, "encoder", "3")
    assert config["max_batch_size"] == 4 and config["platform"] == "onnxruntime_onnx"
    assert config["input"] == [{"name": "input", "data_type": "TYPE_FP16", "dims": [-1, DIM]}]
    assert config["output"][0]["name"] == "output"
    assert config["dynamic_batching"] == {"max_queue_delay_microseconds": 2000}


class MemfdRegions(FakeRegions):
    """FakeRegions whose spans lie in memfd regions an engine process can map (``regions_support.Region``)."""

    def __init__(self, **regions: int) -> None:
        self.memfd = {name: Region(size) for name, size in regions.items()}
        self.regions = {name: region.mapping for name, region in self.memfd.items()}  # type: ignore[misc]

    def input_span(self, ref: SharedMemoryRef, dtype: np.dtype[Any], shape: tuple[int, ...]) -> Span:
        return Span(self.input_array(ref, dtype, shape), self.memfd[ref.region], ref.offset)

    def output_span(self, ref: SharedMemoryRef, dtype: np.dtype[Any], shape: tuple[int, ...]) -> Span:
        return Span(self.output_array(ref, dtype, shape), self.memfd[ref.region], ref.offset)


async def test_with_an_engine_process_that_checks_direct_inputs_the_worker_never_reads_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Direct jobs on a real engine-process connection: NaN/Inf refused by the engine process with the host check's
    message, finite ones answered, and this worker's ``all_finite`` never called for them (the copied path still
    calls it)."""
    calls: list[tuple[int, ...]] = []
    host_check = dataplane.all_finite

    def counted(x: np.ndarray) -> bool:
        calls.append(x.shape)
        return host_check(x)

    monkeypatch.setattr(dataplane, "all_finite", counted)
    x = sample(7, 2, 4, DIM)
    regions = MemfdRegions(inputs=4096, outputs=4096)
    inputs = regions.regions["inputs"]
    message = "inputs must be finite numbers within the model's dtype (float32)"
    with hosting(FakeEngine()) as host, contextlib.closing(RemotePool(host.path)) as pool:
        assert pool.checks_finite
        async with running(pool) as state:  # type: ignore[arg-type]
            inputs[64 : 64 + x.nbytes] = x.tobytes()
            await answer(state, shm_request(x, "FP32", 256), regions)
            written = np.frombuffer(regions.regions["outputs"], np.float32, x.size, offset=256).reshape(x.shape)
            np.testing.assert_allclose(written, expected(x), rtol=1e-6)
            for bad in (np.nan, np.inf):
                spoiled = x.copy()
                spoiled[1, 3, 2] = bad
                inputs[64 : 64 + x.nbytes] = spoiled.tobytes()
                with pytest.raises(InvalidInput, match=re.escape(message)):
                    await answer(state, shm_request(x, "FP32", 256), regions)
            assert calls == []  # the direct requests: never read by this worker
            with pytest.raises(InvalidInput, match=re.escape(message)):
                await answer(state, shm_request(x, "FP32", None), regions)  # the answer in the body: copied
            assert calls == [x.shape]  # ... and checked here, as before
            page = state.metrics.render().decode()
    assert metric(page, "encoder_shm_requests_total", path="direct") == 1  # counted once answered
