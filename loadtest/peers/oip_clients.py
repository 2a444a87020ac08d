"""Closed-loop Open Inference Protocol clients for the service benchmark: tritonclient's own HTTP and gRPC
clients, with binary tensors or system shared memory, against the service or a real Triton.

One client process keeps ``inflight`` requests going: greenlets over ``tritonclient.http`` (gevent, one
connection each), coroutines over ``tritonclient.grpc.aio`` (one channel), and for shared memory either of
them with every tensor in a region: each process creates one input region (the fixed input, written once) and
one output region with a slot per in-flight request, registers both once, and every request names them (no
tensor bytes on the wire). The same clients drive both servers, so the comparison is the servers'.

Every answer is checked: its size as the server declares it (``binary_data_size``, the raw output's length,
``shared_memory_byte_size``: a Python-backend model can answer 0 bytes), its shape and dtype, and its values
against a reference computed once for the fixed input: three sequence positions of every sample on every
answer, all values on the first answer and every ``full_every``-th one.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from loadtest.peers.loadgen import ClientReport

PROTOCOLS = ("oip-http", "grpc", "shm-http", "shm-grpc", "cuda-shm", "cuda-shm-grpc")
TRITON_DTYPES = {"float16": "FP16", "float32": "FP32"}


@dataclass(frozen=True)
class OipSpec:
    """One request (a (B, S, D) batch), sent again and again, and the answer it must get."""

    protocol: str
    http_url: str  # host:port, as tritonclient takes it
    grpc_url: str
    inputs: np.ndarray
    expected: np.ndarray  # the reference answer, float32, same shape
    model: str = "encoder"
    tolerance: float = 2e-2  # relative L2 error per sample
    full_every: int = 50
    cuda_device: int = 0  # CUDA shared memory: the GPU the client allocates on (the service's ordinal)
    cuda_fake: bool = False  # CUDA shared memory through the service's test-only fake layer (CPU self-test)

    @property
    def samples(self) -> int:
        return int(self.inputs.shape[0])

    @property
    def datatype(self) -> str:
        return TRITON_DTYPES[self.inputs.dtype.name]

    @property
    def nbytes(self) -> int:
        return int(self.inputs.nbytes)


def fixed_inputs(batch: int, seq: int, dim: int, dtype: str = "float16", seed: int = 0) -> np.ndarray:
    """``batch`` different samples; sample 0 is the one the raw /encode load sends (same seed)."""
    rows = [np.random.default_rng(seed).standard_normal((seq, dim))]
    rows += [np.random.default_rng([seed, i]).standard_normal((seq, dim)) for i in range(1, batch)]
    return np.stack(rows).astype(dtype)


def reference_outputs(model_file: str, inputs: np.ndarray, engine_dtype: str, device: str) -> np.ndarray:
    """Each sample run alone through the bundle's ONNX model with plain onnxruntime: the unbatched answers."""
    import onnxruntime as ort

    if device == "cuda":
        if hasattr(ort, "preload_dlls"):
            ort.preload_dlls()
        providers = ["CUDAExecutionProvider"]
    else:
        providers = ["CPUExecutionProvider"]
    session = ort.InferenceSession(model_file, providers=providers)
    if session.get_providers()[0] != providers[0]:
        raise RuntimeError(f"reference runs on {session.get_providers()[0]}, not {providers[0]}")
    name, out = session.get_inputs()[0].name, session.get_outputs()[0].name
    rows = [session.run([out], {name: x[np.newaxis].astype(engine_dtype)})[0][0] for x in inputs]
    return np.stack(rows).astype(np.float32)


class AnswerCheck:
    """Compares answers with the reference (see the module docstring); a message says what is wrong."""

    def __init__(self, spec: OipSpec) -> None:
        self.spec = spec
        seq = spec.expected.shape[1]
        self.rows = sorted({0, seq // 2, seq - 1})
        self.expected_rows = np.ascontiguousarray(spec.expected[:, self.rows, :])
        self.answers = 0
        self.counts = {"values_full": 0, "values_rows": 0}

    def size(self, declared: int | None) -> str | None:
        if declared != self.spec.nbytes:
            return f"answer size {declared} bytes, expected {self.spec.nbytes}"
        return None

    def __call__(self, out: np.ndarray) -> str | None:
        spec = self.spec
        if out.shape != spec.inputs.shape or out.dtype != spec.inputs.dtype:
            return f"answer {out.dtype}{list(out.shape)}, expected {spec.inputs.dtype}{list(spec.inputs.shape)}"
        self.answers += 1
        full = spec.full_every <= 1 or self.answers % spec.full_every == 1
        got = out.astype(np.float32) if full else out[:, self.rows, :].astype(np.float32)
        want = spec.expected if full else self.expected_rows
        self.counts["values_full" if full else "values_rows"] += 1
        return self.compare(got, want)

    def compare(self, got: np.ndarray, want: np.ndarray) -> str | None:
        """float32 answers (all rows, or the checked ones) against the reference's same rows."""
        spec = self.spec
        if not np.isfinite(got).all():
            return "non-finite values in the answer"
        diff = np.linalg.norm((got - want).reshape(len(got), -1), axis=1)
        err = diff / np.maximum(np.linalg.norm(want.reshape(len(want), -1), axis=1), 1e-12)
        if float(err.max()) > spec.tolerance:
            return f"values differ from the reference: rel L2 {float(err.max()):.3g} > {spec.tolerance:g}"
        return None


class RawAnswerCheck:
    """The raw /encode load's value check: the answer to sample 0 of the fixed input, on the checked rows."""

    def __init__(self, expected: np.ndarray, tolerance: float) -> None:
        seq = expected.shape[0]
        self.shape = expected.shape
        self.rows = sorted({0, seq // 2, seq - 1})
        self.want = np.ascontiguousarray(expected[self.rows], dtype=np.float32)
        self.tolerance = tolerance

    def __call__(self, body: bytes) -> str | None:
        got = np.frombuffer(body, dtype="<f2").reshape(self.shape)[self.rows].astype(np.float32)
        if not np.isfinite(got).all():
            return "non-finite values in the answer"
        err = float(np.linalg.norm(got - self.want) / max(float(np.linalg.norm(self.want)), 1e-12))
        if err > self.tolerance:
            return f"values differ from the reference: rel L2 {err:.3g} > {self.tolerance:g}"
        return None


class Recorder:
    """Counts answers completed inside the measured window, as ``loadgen`` does for the raw clients."""

    def __init__(self, spec: OipSpec, window: tuple[float, float]) -> None:
        self.start, self.stop = window
        self.report = ClientReport()
        self.check = AnswerCheck(spec)

    def inside(self) -> bool:
        return self.start <= time.time() <= self.stop

    def done(self, sent: float, problem: str | None) -> None:
        now = time.time()
        if not self.start <= now <= self.stop:
            return
        if problem:
            self.report.error(problem)
            return
        self.report.ok += 1
        self.report.latencies_ms.append((now - sent) * 1e3)

    def failed(self, exc: Exception) -> None:
        if self.inside():
            self.report.error(message(exc))

    def finish(self) -> ClientReport:
        self.report.checks = dict(self.check.counts)
        return self.report


@dataclass
class Regions:
    """This process's shared-memory regions: the input (written once) and one output slot per request."""

    input_name: str
    output_name: str
    input_handle: Any
    output_handle: Any
    slot_bytes: int


@contextlib.contextmanager
def shm_regions(spec: OipSpec, slots: int, client: Any) -> Iterator[Regions]:
    """Create and register this process's regions (``client``: a sync tritonclient); always cleaned up."""
    import tritonclient.utils.shared_memory as shm

    tag = f"bench-{os.getpid()}-{time.monotonic_ns() % 1_000_000}"
    names = (f"{tag}-in", f"{tag}-out")
    in_handle = shm.create_shared_memory_region(names[0], f"/{names[0]}", spec.nbytes)
    out_handle = shm.create_shared_memory_region(names[1], f"/{names[1]}", spec.nbytes * slots)
    registered: list[str] = []
    try:
        shm.set_shared_memory_region(in_handle, [spec.inputs])
        for name, size in ((names[0], spec.nbytes), (names[1], spec.nbytes * slots)):
            client.register_system_shared_memory(name, f"/{name}", size)
            registered.append(name)
        yield Regions(names[0], names[1], in_handle, out_handle, spec.nbytes)
    finally:
        for name in registered:
            with contextlib.suppress(Exception):  # the server may be gone already; the regions still go below
                client.unregister_system_shared_memory(name)
        shm.destroy_shared_memory_region(in_handle)
        shm.destroy_shared_memory_region(out_handle)


def shm_answer(spec: OipSpec, regions: Regions, slot: int) -> np.ndarray:
    """The slot's answer: a view of the output region (no copy)."""
    import tritonclient.utils.shared_memory as shm

    offset = slot * regions.slot_bytes
    return shm.get_contents_as_numpy(regions.output_handle, spec.inputs.dtype, spec.inputs.shape, offset)


def poison(spec: OipSpec, regions: Regions | None, slot: int, rows: list[int]) -> None:
    """NaN into the rows every answer is checked on, so an answer the server never wrote cannot pass as the
    previous request's (still correct) answer in that slot."""
    if regions is not None:
        shm_answer(spec, regions, slot)[:, rows, :] = np.nan


def declared_bytes(spec: OipSpec, datatype: str, shape: list[int], byte_size: int | None) -> int | None:
    """A shared-memory answer's size as the server declares it: the byte size where it says one (the
    service does), else its shape and datatype (Triton answers only those)."""
    if datatype != spec.datatype:
        return None
    return byte_size if byte_size is not None else int(np.prod(shape)) * spec.inputs.dtype.itemsize


def _http_problem(spec: OipSpec, rec: Recorder, result: Any, regions: Regions | None, slot: int) -> str | None:
    output = result.get_response()["outputs"][0]
    params = output.get("parameters", {})
    if regions is None:
        return rec.check.size(params.get("binary_data_size")) or rec.check(result.as_numpy("output"))
    declared = declared_bytes(spec, output["datatype"], output["shape"], params.get("shared_memory_byte_size"))
    return rec.check.size(declared) or rec.check(shm_answer(spec, regions, slot))


def _http_loop(spec: OipSpec, inflight: int, window: tuple[float, float]) -> ClientReport:
    import gevent
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    rec = Recorder(spec, window)
    client = httpclient.InferenceServerClient(
        spec.http_url, concurrency=inflight, connection_timeout=30.0, network_timeout=120.0
    )
    with contextlib.ExitStack() as stack:
        stack.callback(client.close)
        regions = stack.enter_context(shm_regions(spec, inflight, client)) if spec.protocol == "shm-http" else None
        inputs = [httpclient.InferInput("input", list(spec.inputs.shape), spec.datatype)]
        if regions is None:
            inputs[0].set_data_from_numpy(spec.inputs, binary_data=True)
        else:
            inputs[0].set_shared_memory(regions.input_name, spec.nbytes)

        def one(slot: int) -> None:
            output = httpclient.InferRequestedOutput("output", binary_data=True)
            if regions is not None:
                output.set_shared_memory(regions.output_name, spec.nbytes, offset=slot * spec.nbytes)
            while time.time() < rec.stop:
                poison(spec, regions, slot, rec.check.rows)
                sent = time.time()
                try:
                    result = client.infer(spec.model, inputs, outputs=[output])
                except (InferenceServerException, OSError) as exc:
                    rec.failed(exc)
                    continue
                rec.done(sent, _http_problem(spec, rec, result, regions, slot))

        gevent.joinall([gevent.spawn(one, slot) for slot in range(inflight)], raise_error=True)
    return rec.finish()


def _grpc_problem(spec: OipSpec, rec: Recorder, result: Any, regions: Regions | None, slot: int) -> str | None:
    response = result.get_response()
    if regions is None:
        raw = response.raw_output_contents
        return rec.check.size(len(raw[0]) if raw else 0) or rec.check(result.as_numpy("output"))
    output = response.outputs[0]
    param = output.parameters.get("shared_memory_byte_size")
    declared = declared_bytes(spec, output.datatype, list(output.shape), param.int64_param if param else None)
    return rec.check.size(declared) or rec.check(shm_answer(spec, regions, slot))


async def _grpc_loop(spec: OipSpec, inflight: int, window: tuple[float, float]) -> ClientReport:
    import tritonclient.grpc as grpcclient
    import tritonclient.grpc.aio as aioclient
    from tritonclient.utils import InferenceServerException

    rec = Recorder(spec, window)
    client = aioclient.InferenceServerClient(spec.grpc_url)
    with contextlib.ExitStack() as stack:
        regions = None
        if spec.protocol == "shm-grpc":
            control = grpcclient.InferenceServerClient(spec.grpc_url)
            stack.callback(control.close)
            regions = stack.enter_context(shm_regions(spec, inflight, control))
        inputs = [grpcclient.InferInput("input", list(spec.inputs.shape), spec.datatype)]
        if regions is None:
            inputs[0].set_data_from_numpy(spec.inputs)
        else:
            inputs[0].set_shared_memory(regions.input_name, spec.nbytes)

        async def one(slot: int) -> None:
            output = grpcclient.InferRequestedOutput("output")
            if regions is not None:
                output.set_shared_memory(regions.output_name, spec.nbytes, offset=slot * spec.nbytes)
            while time.time() < rec.stop:
                poison(spec, regions, slot, rec.check.rows)
                sent = time.time()
                try:
                    result = await client.infer(spec.model, inputs, outputs=[output], client_timeout=120.0)
                except InferenceServerException as exc:
                    rec.failed(exc)
                    continue
                rec.done(sent, _grpc_problem(spec, rec, result, regions, slot))

        try:
            await asyncio.gather(*(one(slot) for slot in range(inflight)))
        finally:
            await client.close()
    return rec.finish()


LOOPS: dict[str, Callable[[OipSpec, int, tuple[float, float]], ClientReport]] = {
    "oip-http": _http_loop,
    "shm-http": _http_loop,
    "grpc": lambda spec, inflight, window: asyncio.run(_grpc_loop(spec, inflight, window)),
    "shm-grpc": lambda spec, inflight, window: asyncio.run(_grpc_loop(spec, inflight, window)),
    "cuda-shm": lambda spec, inflight, window: _cuda().http_loop(spec, inflight, window),
    "cuda-shm-grpc": lambda spec, inflight, window: _cuda().grpc_loop(spec, inflight, window),
}


def _cuda() -> Any:
    """The CUDA shared-memory loads (imported where they run: they need cuda-python on a GPU)."""
    from loadtest.peers import cuda_clients

    return cuda_clients


def message(exc: BaseException) -> str:
    """``str(exc)``, short; tritonclient's exception cannot always print itself (an answer not in its format)."""
    try:
        text = str(exc)
    except Exception:
        text = repr(getattr(exc, "_msg", None))
    return f"{type(exc).__name__}: {text[:160]}"


def oip_client_main(spec: OipSpec, inflight: int, window: tuple[float, float], out: Any) -> None:
    """A client process's body (``loadgen.drive``'s ``client``): run the loop, hand the report back.

    A client that cannot even start (a refused registration, say) reports that as its error: the point shows
    it and the benchmark goes on to the next one.
    """
    try:
        report = LOOPS[spec.protocol](spec, inflight, window)
    except Exception as exc:
        report = ClientReport()
        report.error(f"client failed: {message(exc)}")
    out.put(report)
