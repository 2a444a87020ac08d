"""``inference.GRPCInferenceService`` messages <-> the protocol's transport-neutral types.

Pure functions, no grpc server, no service state: the servicer (:mod:`service.oip.grpc_server`) calls them on
each side of the data plane. Tensors stay bytes until here and become arrays without a per-element step: raw
contents through ``np.frombuffer``, answers through the array's own bytes into ``raw_output_contents``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
from google.protobuf import json_format
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.grpc import service_pb2 as pb

from service.errors import InvalidInput
from service.oip.types import (
    DATATYPES,
    KNOWN_DATATYPES,
    InferRequest,
    InferResponse,
    InputTensor,
    RequestedOutput,
    SharedMemoryRef,
)

SHM_REGION, SHM_OFFSET, SHM_BYTE_SIZE = "shared_memory_region", "shared_memory_offset", "shared_memory_byte_size"
# Typed contents by datatype: the field of InferTensorContents that carries it (FP16 has none, as in Triton).
CONTENTS_FIELDS = {"FP32": "fp32_contents", "FP64": "fp64_contents", "INT32": "int_contents"}
CONTENTS_FIELDS |= {"INT64": "int64_contents", "UINT32": "uint_contents", "UINT64": "uint64_contents"}
CONTENTS_FIELDS |= {"BOOL": "bool_contents", "BYTES": "bytes_contents"}


def parameter_value(param: pb.InferParameter) -> Any:
    """An ``InferParameter``'s value as a Python value (the one field of its oneof that is set)."""
    which = param.WhichOneof("parameter_choice")
    return None if which is None else getattr(param, which)


def parameters(params: Mapping[str, pb.InferParameter]) -> dict[str, Any]:
    return {key: parameter_value(value) for key, value in params.items()}


def timeout_ms(params: dict[str, Any]) -> float | None:
    """The protocol's ``timeout`` parameter (microseconds, as Triton and tritonclient define it) in ms; 0 means
    none, as in Triton (the data plane applies it)."""
    value = params.get("timeout")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < math.inf:
        raise InvalidInput(f"the 'timeout' parameter must be a non-negative number of microseconds, got {value!r}")
    return float(value) / 1000.0


def shm_ref(params: Mapping[str, pb.InferParameter], what: str) -> SharedMemoryRef | None:
    """The shared-memory extension's parameters of an input or output, if it names a region."""
    if SHM_REGION not in params:
        return None
    region = parameter_value(params[SHM_REGION])
    if not isinstance(region, str) or not region:
        raise InvalidInput(f"{what}: '{SHM_REGION}' must be a region name")
    offset = parameter_value(params[SHM_OFFSET]) if SHM_OFFSET in params else 0
    size = parameter_value(params[SHM_BYTE_SIZE]) if SHM_BYTE_SIZE in params else None
    for key, value in ((SHM_OFFSET, offset), (SHM_BYTE_SIZE, size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise InvalidInput(f"{what}: '{key}' must be a non-negative integer, got {value!r}")
    assert isinstance(size, int)
    return SharedMemoryRef(region=region, offset=int(offset), byte_size=size)


def checked_shape(dims: Any, what: str) -> tuple[int, ...]:
    shape = tuple(int(d) for d in dims)
    if any(d < 0 for d in shape):
        raise InvalidInput(f"{what}: shape {list(shape)} has a negative dimension")
    return shape


def tensor_dtype(datatype: str, what: str) -> np.dtype[Any]:
    """The numpy dtype the bytes of ``datatype`` decode as; only the model's float types are accepted."""
    dtype = DATATYPES.get(datatype)
    if dtype is None:
        kind = "unsupported" if datatype in KNOWN_DATATYPES else "unknown"
        raise InvalidInput(f"{what}: {kind} datatype {datatype!r}; the model takes {' or '.join(DATATYPES)}")
    return dtype


def raw_array(raw: bytes, datatype: str, shape: tuple[int, ...], what: str) -> np.ndarray:
    """Raw little-endian bytes -> a read-only array over the same memory (no copy, no per-element work)."""
    dtype = tensor_dtype(datatype, what)
    expected = math.prod(shape) * dtype.itemsize
    if len(raw) != expected:
        raise InvalidInput(
            f"{what}: {len(raw)} bytes of raw contents, but shape {list(shape)} of {datatype} needs {expected}"
        )
    return np.frombuffer(raw, dtype=dtype).reshape(shape)


def contents_array(tensor: pb.ModelInferRequest.InferInputTensor, shape: tuple[int, ...], what: str) -> np.ndarray:
    """Typed ``contents`` (the slow, non-raw form): FP32 values; FP16 has no typed field, it travels raw."""
    dtype = tensor_dtype(tensor.datatype, what)
    field = CONTENTS_FIELDS.get(tensor.datatype)
    if field is None:
        raise InvalidInput(f"{what}: {tensor.datatype} has no typed contents field; send it as raw_input_contents")
    values = getattr(tensor.contents, field)
    if len(values) != math.prod(shape):
        count = math.prod(shape)
        raise InvalidInput(f"{what}: {len(values)} values in contents, but shape {list(shape)} holds {count}")
    # One C-level conversion of the repeated field (no Python loop over the values).
    return np.asarray(values, dtype=dtype).reshape(shape)


def infer_request(msg: pb.ModelInferRequest) -> InferRequest:
    """A ``ModelInferRequest`` as the protocol's :class:`InferRequest`.

    As in Triton, ``raw_input_contents`` hold one entry per input that is neither in shared memory nor given as
    typed ``contents``, in input order, and raw and typed contents are not mixed.
    """
    params = parameters(msg.parameters)
    raw = msg.raw_input_contents
    inputs: list[InputTensor] = []
    next_raw = 0
    for tensor in msg.inputs:
        what = f"input {tensor.name!r}"
        shape = checked_shape(tensor.shape, what)
        item = InputTensor(name=tensor.name, datatype=tensor.datatype, shape=shape)
        item.shm = shm_ref(tensor.parameters, what)
        if item.shm is None and tensor.HasField("contents"):
            if len(raw):
                raise InvalidInput(f"{what}: typed contents cannot be mixed with raw_input_contents")
            item.data = contents_array(tensor, shape, what)
        elif item.shm is None:
            if next_raw >= len(raw):
                raise InvalidInput(f"{what} has no data: no raw_input_contents, contents or shared memory for it")
            item.data = raw_array(raw[next_raw], tensor.datatype, shape, what)
            next_raw += 1
        inputs.append(item)
    if next_raw != len(raw):
        raise InvalidInput(f"{len(raw)} raw_input_contents for {next_raw} inputs that take raw contents")
    return InferRequest(
        model=msg.model_name,
        version=msg.model_version or None,
        id=msg.id or None,
        inputs=inputs,
        outputs=[requested_output(out) for out in msg.outputs] or None,
        timeout_ms=timeout_ms(params),
        binary_default=True,  # gRPC answers carry raw_output_contents: the binary form is its only form
        parameters=params,
    )


def requested_output(out: pb.ModelInferRequest.InferRequestedOutputTensor) -> RequestedOutput:
    return RequestedOutput(name=out.name, binary=True, shm=shm_ref(out.parameters, f"output {out.name!r}"))


def infer_response(resp: InferResponse) -> pb.ModelInferResponse:
    """The answer with each output's bytes in ``raw_output_contents`` (outputs written to shared memory carry
    shape and datatype only, and an empty entry so tritonclient's positional lookup of the others still works)."""
    msg = pb.ModelInferResponse(model_name=resp.model, model_version=resp.version or "", id=resp.id or "")
    raw: list[bytes] = []
    for out in resp.outputs:
        tensor = msg.outputs.add(name=out.name, datatype=out.datatype, shape=out.shape)
        if out.shm is not None:
            tensor.parameters[SHM_REGION].string_param = out.shm.region
            tensor.parameters[SHM_BYTE_SIZE].int64_param = out.shm.byte_size
            if out.shm.offset:
                tensor.parameters[SHM_OFFSET].int64_param = out.shm.offset
            raw.append(b"")
        else:
            assert out.data is not None, f"output {out.name!r} has neither data nor shared memory"
            raw.append(little_endian_bytes(out.data))
    if any(raw):
        msg.raw_output_contents.extend(raw)
    return msg


def little_endian_bytes(array: np.ndarray) -> bytes:
    """The array's values as raw little-endian bytes, row-major: one copy (``tobytes``), none if it is a view."""
    if array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("<"))
    return array.tobytes(order="C")


def from_dict(message: Any, values: Mapping[str, Any]) -> Any:
    """A metadata/statistics message from the data plane's dict, which has the protocol's REST JSON shape
    (field names as in the .proto, so one dict serves both transports). Unknown keys are an error: a silent
    drop would hide a mismatch between the two."""
    return json_format.ParseDict(dict(values), message)


def server_metadata(values: Mapping[str, Any]) -> pb.ServerMetadataResponse:
    return from_dict(pb.ServerMetadataResponse(), values)


def model_metadata(values: Mapping[str, Any]) -> pb.ModelMetadataResponse:
    return from_dict(pb.ModelMetadataResponse(), values)


def model_statistics(values: Mapping[str, Any]) -> pb.ModelStatisticsResponse:
    return from_dict(pb.ModelStatisticsResponse(), values)


def model_config(metadata: Mapping[str, Any], max_batch_size: int) -> pb.ModelConfigResponse:
    """Triton's model configuration, derived from the model's metadata: as in Triton, a model that batches
    states ``max_batch_size`` and its tensors' dims without the batch dimension."""
    config = mc.ModelConfig(
        name=metadata["name"],
        platform=metadata["platform"],
        max_batch_size=max_batch_size,
        dynamic_batching=mc.ModelDynamicBatching(),
    )
    for spec, tensors in ((metadata["inputs"], config.input), (metadata["outputs"], config.output)):
        for tensor in spec:
            tensors.add(name=tensor["name"], data_type=mc.DataType.Value(f"TYPE_{tensor['datatype']}"))
            tensors[-1].dims.extend(tensor["shape"][1:])
    return pb.ModelConfigResponse(config=config)
