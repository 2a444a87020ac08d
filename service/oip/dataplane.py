"""The Open Inference Protocol's data plane, written once for every transport (REST, gRPC).

An adapter decodes its wire message into an :class:`~service.oip.types.InferRequest`, admits it with
:func:`service.dataplane.admitted` (before reading a body) and awaits :func:`infer`; the metadata, readiness and
statistics answers are plain dicts in the protocol's JSON shape (the gRPC adapter maps them onto its messages).
Nothing here imports FastAPI or grpc. Errors are the domain errors of :mod:`service.errors` (404 for an unknown
model, 400 for a request the protocol does not allow, 422 for values the model cannot take).

Answers come in the input's datatype, as ``/encode`` answers in the request's dtype: FP32 in, FP32 out, whatever
precision the engine computes in.

System shared memory: a request whose input and output both lie in registered regions, in the engine's precision,
is computed straight from and into the regions when engine processes serve (the direct path: no copy in this
process, :mod:`service.engine.direct`); any other shared-memory request is copied into the engine's batch and its
answer into the output region. ``encoder_shm_requests_total{path}`` counts which path served.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from typing import TYPE_CHECKING, Any

import numpy as np

from service import dataplane
from service.engine.direct import COPIED, DIRECT, Span, direct_job
from service.errors import BadRequest, Conflict, InvalidInput, NotFound
from service.oip import cuda_path
from service.oip.types import (
    DATATYPES,
    KNOWN_DATATYPES,
    InferRequest,
    InferResponse,
    InputTensor,
    OutputTensor,
    RequestedOutput,
    SharedMemory,
    SharedMemoryRef,
    datatype_of,
)
from service.settings import Settings
from service.state import ServiceState

if TYPE_CHECKING:
    from service.shm import SystemSharedMemory

log = logging.getLogger(__name__)
SERVER_NAME = "encoder-service"
SERVER_VERSION = "0.1.0"
MODEL_VERSION = "1"  # one model, one version: what a Triton model repository with a single "1/" directory says
PLATFORM = "onnxruntime_onnx"
INPUT = "input"
OUTPUT = "output"
MAX_RANK = 32  # far above any valid input (2 or 3); bounds the work of checking a hostile shape


def extensions(settings: Settings) -> list[str]:
    """The protocol extensions this server implements (server metadata)."""
    names = ["binary_tensor_data", "statistics"]
    if "system" in settings.shared_memory_kinds:
        names.append("system_shared_memory")
    if "cuda" in settings.shared_memory_kinds:
        names.append("cuda_shared_memory")
    return names


def server_metadata(settings: Settings) -> dict[str, Any]:
    return {"name": SERVER_NAME, "version": SERVER_VERSION, "extensions": extensions(settings)}


def check_model(settings: Settings, name: str, version: str | None) -> None:
    """NotFound (404) unless ``name`` (and ``version``, when given) is the served model."""
    if name != settings.model_name:
        raise NotFound(f"unknown model {name!r}: this server serves {settings.model_name!r}")
    if version not in (None, "", MODEL_VERSION):
        raise NotFound(f"unknown version {version!r} of model {name!r}: the only version is {MODEL_VERSION!r}")


def server_live(state: ServiceState) -> str | None:
    """Why the server is not live (it can never serve again), or None."""
    return state.fatal_error()


def server_ready(state: ServiceState) -> str | None:
    """Why the server is not ready (loading, draining, dead), or None: as ``/readyz``."""
    return state.not_ready_reason()


def model_ready(state: ServiceState, name: str, version: str | None) -> str | None:
    """Why the model is not ready, or None; NotFound for a model this server does not serve."""
    check_model(state.settings, name, version)
    return state.not_ready_reason()


def model_metadata(state: ServiceState, name: str, version: str | None) -> dict[str, Any]:
    """Name, versions, platform and the tensors: (batch, sequence, width) in the engine's precision.

    The engine's precision is what the model computes in; FP16 and FP32 inputs are both accepted (and answered in
    their own datatype), so a client may always send FP32.
    """
    check_model(state.settings, name, version)
    engine, _ = state.ready_parts()
    datatype = datatype_of(engine.dtype)
    shape = [-1, -1, engine.dim]
    return {
        "name": name,
        "versions": [MODEL_VERSION],
        "platform": PLATFORM,
        "inputs": [{"name": INPUT, "datatype": datatype, "shape": shape}],
        "outputs": [{"name": OUTPUT, "datatype": datatype, "shape": shape}],
    }


def model_config(state: ServiceState, name: str, version: str | None) -> dict[str, Any]:
    """Triton's model configuration (not part of KServe's protocol; perf_analyzer and Triton's tools read it).

    Triton's convention: with ``max_batch_size`` > 0 the dims leave out the batch dimension, so (S, D) per sample.
    Larger client batches are still served (split into engine batches), unlike Triton.
    """
    check_model(state.settings, name, version)
    engine, batcher = state.ready_parts()
    data_type = "TYPE_" + datatype_of(engine.dtype)
    dims = [-1, engine.dim]
    return {
        "name": name,
        "platform": PLATFORM,
        "backend": "onnxruntime",
        "max_batch_size": batcher.config.max_batch_size,
        "input": [{"name": INPUT, "data_type": data_type, "dims": dims}],
        "output": [{"name": OUTPUT, "data_type": data_type, "dims": dims}],
        "dynamic_batching": {"max_queue_delay_microseconds": int(state.settings.max_delay_ms * 1000)},
    }


def model_stats(state: ServiceState, name: str | None, version: str | None) -> dict[str, Any]:
    """The statistics extension's answer; ``name`` None or empty: every model (this server has one)."""
    if name:
        check_model(state.settings, name, version)
    return {"model_stats": [state.oip_stats.as_json(state.settings.model_name, MODEL_VERSION)]}


def request_deadline(deadline: float, timeout_ms: float | None, arrived: float) -> float:
    """The earlier of the transport's deadline and the protocol's ``timeout`` (0 or absent: none, as Triton)."""
    if timeout_ms is None or timeout_ms == 0:
        return deadline
    if not math.isfinite(timeout_ms) or timeout_ms < 0:
        raise BadRequest(f"the timeout parameter must be a non-negative number, got {timeout_ms!r}")
    return min(deadline, arrived + timeout_ms / 1000.0)


async def infer(
    state: ServiceState,
    request: InferRequest,
    shm: SharedMemory | None,
    deadline: float,
    arrived: float | None = None,
) -> InferResponse:
    """Check, batch with every other request (any protocol), answer in the input's datatype.

    ``deadline`` is the transport's (``X-Request-Timeout-Ms``, gRPC's deadline or the default) as a
    ``time.monotonic()`` instant; the request's ``timeout`` parameter counts from ``arrived`` (default: now) and
    the earlier one wins. ``shm`` is the shared-memory registry, None when no extension is enabled. Every request
    that names the served model is counted in the statistics extension, as a success or a failure.
    """
    check_model(state.settings, request.model, request.version)
    started = time.perf_counter()
    stats = state.oip_stats
    try:
        response = await _infer(state, request, shm, deadline, time.monotonic() if arrived is None else arrived)
    except BaseException:
        stats.record_failure(time.perf_counter() - started)
        raise
    samples = response.outputs[0].shape[0] if len(response.outputs[0].shape) == 3 else 1
    stats.record_success(time.perf_counter() - started, response.queue_s, response.compute_s, samples)
    return response


async def _infer(
    state: ServiceState, request: InferRequest, shm: SharedMemory | None, deadline: float, arrived: float
) -> InferResponse:
    engine, batcher = state.ready_parts()
    tensor = the_input(request.inputs)
    wanted = requested_output(request)
    with contextlib.ExitStack() as leases:
        # CUDA regions (named like system ones): each is held from here until its answer is written.
        dtype, shape = DATATYPES[tensor.datatype], check_shape(tensor.shape)
        cuda_in = cuda_path.cuda_lease(state, tensor.shm, dtype, shape, leases)
        if cuda_in is not None and tensor.data is not None:
            raise BadRequest(f"input {tensor.name!r} has both data and a shared-memory region")
        cuda_out = cuda_path.cuda_lease(state, wanted.shm, dtype, shape, leases)  # the answer has the input's shape
        deadline = request_deadline(deadline, request.timeout_ms, arrived)
        if cuda_in is not None and cuda_out is not None:
            served = await cuda_path.device_to_device(engine, batcher, cuda_in, cuda_out, shape, deadline)
            if served is not None:  # computed by the engine process straight from and into the client's memory
                state.metrics.observe_shm_request(DIRECT)
                out = OutputTensor(OUTPUT, tensor.datatype, shape, shm=wanted.shm, binary=wanted.binary)
                return InferResponse(request.model, [out], MODEL_VERSION, request.id, served.queue_s, served.compute_s)
        source: np.ndarray | Span
        if cuda_in is not None:
            source = await asyncio.to_thread(cuda_in.read, dtype, shape)  # the copied path: to the host and back
        else:
            source = input_source(tensor, system_regions(state, shm))
        array = source.array if isinstance(source, Span) else source
        # An output region is resolved before computing: a bad one costs no engine time, and the view (and the
        # span's region) holds the mapping, so unregistering the region while this request computes cannot take
        # its destination away.
        target = None
        if wanted.shm is not None and cuda_out is None:
            target = _shm(system_regions(state, shm)).output_span(wanted.shm, array.dtype, array.shape)
        job = direct_job(engine, source, target) if isinstance(source, Span) and target is not None else None
        if job is not None:  # both in system shared memory, in the engine's dtype: computed where they lie
            result = await dataplane.infer_placed(engine, batcher, job, deadline)
        else:
            result = await dataplane.infer(engine, batcher, array, deadline)
        output = result.output if array.ndim == 3 else result.output[0]
        out = OutputTensor(name=OUTPUT, datatype=tensor.datatype, shape=tuple(output.shape), binary=wanted.binary)
        if cuda_out is not None:
            await asyncio.to_thread(cuda_out.write, output.astype(array.dtype, copy=False))
            out.shm = wanted.shm
        elif target is not None:
            if job is None:  # the answer has the input's shape; one pass, cast included
                np.copyto(target.array, output, casting="same_kind")
            out.shm = wanted.shm
        else:
            out.data = output.astype(array.dtype, copy=False)
    if tensor.shm is not None or wanted.shm is not None:
        state.metrics.observe_shm_request(COPIED if job is None else job.served.path)
    return InferResponse(
        model=request.model,
        version=MODEL_VERSION,
        id=request.id,
        outputs=[out],
        queue_s=result.queue_s,
        compute_s=result.compute_s,
    )


def the_input(inputs: list[InputTensor]) -> InputTensor:
    """The one input, named ``input``, of a datatype the model takes."""
    if len(inputs) != 1:
        raise InvalidInput(f"the model takes exactly one input ({INPUT!r}), got {len(inputs)}")
    tensor = inputs[0]
    if tensor.name != INPUT:
        raise InvalidInput(f"unknown input {tensor.name!r}: the model's input is {INPUT!r}")
    if tensor.datatype not in DATATYPES:
        known = "unsupported" if tensor.datatype in KNOWN_DATATYPES else "unknown"
        raise InvalidInput(f"{known} datatype {tensor.datatype!r} for input {INPUT!r}: FP16 or FP32 are accepted")
    return tensor


def requested_output(request: InferRequest) -> RequestedOutput:
    """The one output and how to answer it; every output (the one) when the request names none."""
    if not request.outputs:
        return RequestedOutput(OUTPUT, binary=request.binary_default)
    names = [output.name for output in request.outputs]
    unknown = [name for name in names if name != OUTPUT]
    if unknown:
        raise InvalidInput(f"unknown output {unknown[0]!r}: the model's output is {OUTPUT!r}")
    if len(names) > 1:
        raise BadRequest(f"output {OUTPUT!r} is requested {len(names)} times")
    return request.outputs[0]


def input_array(tensor: InputTensor, shm: SharedMemory | None) -> np.ndarray:
    """The input's values in its datatype and declared shape, from ``data`` or from a shared-memory region."""
    source = input_source(tensor, shm)
    return source.array if isinstance(source, Span) else source


def input_source(tensor: InputTensor, shm: SharedMemory | None) -> np.ndarray | Span:
    """:func:`input_array`, as a :class:`Span` (the view and where it lies) when it is in a shared-memory region."""
    shape = check_shape(tensor.shape)
    dtype = DATATYPES[tensor.datatype]
    if tensor.shm is not None:
        if tensor.data is not None:
            raise BadRequest(f"input {tensor.name!r} has both data and a shared-memory region")
        return _shm(shm).input_span(tensor.shm, dtype, shape)
    if tensor.data is None:
        raise BadRequest(f"input {tensor.name!r} has no data")
    data = tensor.data
    count = math.prod(shape)
    if data.size != count:
        raise BadRequest(f"input {tensor.name!r} has {data.size} values but shape {list(shape)} holds {count}")
    if data.dtype != dtype:
        if data.dtype.kind not in "fiu":
            raise BadRequest(f"input {tensor.name!r} must hold numbers, got {data.dtype} values")
        with np.errstate(over="ignore", invalid="ignore"):  # out of FP16's range: Inf, refused as a 422 later
            data = data.astype(dtype)
    return data.reshape(shape)


def check_shape(shape: tuple[int, ...] | list[int]) -> tuple[int, ...]:
    if len(shape) > MAX_RANK:
        raise InvalidInput(f"at most {MAX_RANK} dimensions, got {len(shape)}")
    if any(not isinstance(n, int) or isinstance(n, bool) or n < 0 for n in shape):
        raise BadRequest(f"a shape holds non-negative integers, got {list(shape)}")
    return tuple(shape)


def system_regions(state: ServiceState, shm: SharedMemory | None) -> SharedMemory | None:
    """``shm``, the system registry; with CUDA shared memory on and system off, a name that is no CUDA region is
    no region at all (404), not a disabled extension."""
    if shm is None and state.cuda_shared_memory is not None:
        return _NoSystemRegions()
    return shm


class _NoSystemRegions:
    def input_array(self, ref: SharedMemoryRef, dtype: np.dtype[Any], shape: tuple[int, ...]) -> np.ndarray:
        raise NotFound(f"no shared-memory region {ref.region!r} is registered")

    def input_span(self, ref: SharedMemoryRef, dtype: np.dtype[Any], shape: tuple[int, ...]) -> Span:
        raise NotFound(f"no shared-memory region {ref.region!r} is registered")

    output_array = input_array
    output_span = input_span


def register_system_region(
    state: ServiceState, registry: SystemSharedMemory, name: str, key: str, offset: int, byte_size: int
) -> None:
    """Register a system region under a name no CUDA region has (one namespace for both kinds, as in Triton)."""
    cuda = state.cuda_shared_memory
    if cuda is None:
        registry.register(name, key, offset, byte_size)
        return
    with cuda.names_locked():
        if cuda.has(name):
            raise Conflict(f"a shared-memory region named {name!r} is already registered; unregister it first")
        registry.register(name, key, offset, byte_size)


def _shm(shm: SharedMemory | None) -> SharedMemory:
    if shm is None:
        raise BadRequest("shared memory is not enabled on this server (start it with --shared-memory system or cuda)")
    return shm
