"""``inference.GRPCInferenceService`` messages <-> the protocol's transport-neutral types.

Pure functions, no grpc server, no service state: the servicer (:mod:`service.oip.grpc_server`) calls them on
each side of the data plane. Tensors stay bytes until here and become arrays without a per-element step: raw
contents through ``np.frombuffer``, answers through the array's own bytes into ``raw_output_contents``.

``ModelInfer`` has its own (de)serializer (:func:`parse_infer_request`, :func:`serialize_infer_response`):
protobuf copies a bytes field into its arena when it parses and again on every access, and an answer's bytes
twice more on the way out; for a 301 KB tensor those copies (and the page faults of fresh 301 KB buffers) were
most of what gRPC cost beyond HTTP. The tensors' fields are found in the wire format at the top level only and
handed over as views; every other field is still parsed by the generated message.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
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

RAW_INPUT_FIELD = 7  # ModelInferRequest.raw_input_contents
RAW_OUTPUT_FIELD = 6  # ModelInferResponse.raw_output_contents
MAX_SCANNED_FIELDS = 1024  # a message of more top-level fields is parsed by protobuf alone (no Python loop)
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


def raw_array(raw: bytes | memoryview, datatype: str, shape: tuple[int, ...], what: str) -> np.ndarray:
    """Raw little-endian bytes -> a read-only array over the same memory (no copy, no per-element work)."""
    dtype = tensor_dtype(datatype, what)
    expected = math.prod(shape) * dtype.itemsize
    if len(raw) != expected:  # a view of the message: one byte per item, as bytes
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


@dataclass
class ParsedInfer:
    """A ``ModelInferRequest`` as :func:`parse_infer_request` leaves it: the message without its raw contents,
    those contents as views of the received bytes, or why the bytes are no such message."""

    message: pb.ModelInferRequest
    raw: Sequence[bytes | memoryview]
    error: str | None = None


@dataclass
class EncodedInfer:
    """A ``ModelInferResponse`` without its raw contents, and the arrays whose bytes are those contents."""

    message: pb.ModelInferResponse
    raw: list[np.ndarray]


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[pos]  # IndexError past the end: a truncated message
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise ValueError("a varint longer than 10 bytes")


def split_field(data: bytes, field: int) -> tuple[bytes, list[memoryview]] | None:
    """``data`` without the length-delimited top-level ``field``, and that field's values as views of ``data``.

    A walk over the top-level fields only (a request has a handful); None past :data:`MAX_SCANNED_FIELDS`.
    Raises ValueError or IndexError for bytes that are not a protocol buffer.
    """
    view = memoryview(data)
    rest: list[memoryview] = []
    values: list[memoryview] = []
    pos, end = 0, len(data)
    while pos < end:
        if len(rest) > MAX_SCANNED_FIELDS:
            return None
        start = pos
        key, pos = _varint(data, pos)
        wire_type = key & 7
        if wire_type == 2:
            length, pos = _varint(data, pos)
            if pos + length > end:
                raise ValueError("a field runs past the end of the message")
            if key >> 3 == field:
                values.append(view[pos : pos + length])
                pos += length
                continue
            pos += length
        elif wire_type == 0:
            _, pos = _varint(data, pos)
        elif wire_type in (1, 5):
            pos += 8 if wire_type == 1 else 4
        else:
            raise ValueError(f"wire type {wire_type} is not a field")
        rest.append(view[start:pos])
    if pos != end:
        raise ValueError("the last field runs past the end of the message")
    return b"".join(rest), values


def parse_infer_request(data: bytes) -> ParsedInfer:
    """grpc's request deserializer for ``ModelInfer``. Never raises: grpc would answer INTERNAL to a bad message,
    so the error travels to the servicer, which answers INVALID_ARGUMENT."""
    try:
        split = split_field(data, RAW_INPUT_FIELD)
        if split is None:
            message = pb.ModelInferRequest.FromString(data)
            raw = list(message.raw_input_contents)
            message.ClearField("raw_input_contents")
            return ParsedInfer(message, raw)
        return ParsedInfer(pb.ModelInferRequest.FromString(split[0]), split[1])
    except Exception as exc:  # DecodeError, or the walk's ValueError/IndexError
        return ParsedInfer(pb.ModelInferRequest(), [], f"the request is not a ModelInferRequest: {exc}")


def serialize_infer_response(answer: EncodedInfer) -> bytes:
    """grpc's response serializer for ``ModelInfer``: the message, then each array's bytes as one more
    ``raw_output_contents`` entry (the field with the highest number, so this is also protobuf's own order),
    copied once, into the answer."""
    parts: list[bytes | memoryview] = [answer.message.SerializeToString()]
    for array in answer.raw:
        parts += [_key_and_length(RAW_OUTPUT_FIELD, array.nbytes), array.data.cast("B")]
    return b"".join(parts)


def _key_and_length(field: int, length: int) -> bytes:
    out = bytearray([field << 3 | 2])
    while True:
        byte = length & 0x7F
        length >>= 7
        if not length:
            out.append(byte)
            return bytes(out)
        out.append(byte | 0x80)


def infer_request(msg: pb.ModelInferRequest, raw: Sequence[bytes | memoryview] | None = None) -> InferRequest:
    """A ``ModelInferRequest`` as the protocol's :class:`InferRequest`; ``raw``: its raw contents, when they
    were taken out of the message (:func:`parse_infer_request`).

    As in Triton, ``raw_input_contents`` hold one entry per input that is neither in shared memory nor given as
    typed ``contents``, in input order, and raw and typed contents are not mixed.
    """
    params = parameters(msg.parameters)
    if raw is None:
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
    """The whole answer as one message (see :func:`encode_infer_response` for the server's form)."""
    encoded = encode_infer_response(resp)
    return pb.ModelInferResponse.FromString(serialize_infer_response(encoded))


def encode_infer_response(resp: InferResponse) -> EncodedInfer:
    """The answer, each output's values to go into ``raw_output_contents`` as they are (outputs written to
    shared memory carry shape and datatype only, and an empty entry so tritonclient's positional lookup of the
    others still works)."""
    msg = pb.ModelInferResponse(model_name=resp.model, model_version=resp.version or "", id=resp.id or "")
    raw: list[np.ndarray] = []
    for out in resp.outputs:
        tensor = msg.outputs.add(name=out.name, datatype=out.datatype, shape=out.shape)
        if out.shm is not None:
            tensor.parameters[SHM_REGION].string_param = out.shm.region
            tensor.parameters[SHM_BYTE_SIZE].int64_param = out.shm.byte_size
            if out.shm.offset:
                tensor.parameters[SHM_OFFSET].int64_param = out.shm.offset
            raw.append(EMPTY)
        else:
            assert out.data is not None, f"output {out.name!r} has neither data nor shared memory"
            raw.append(little_endian(out.data))
    if all(array.nbytes == 0 for array in raw):
        raw = []
    return EncodedInfer(msg, raw)


EMPTY = np.empty(0, np.uint8)


def little_endian(array: np.ndarray) -> np.ndarray:
    """The array as little-endian, row-major values (itself when it already is: no copy)."""
    return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))


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


def model_config(values: Mapping[str, Any]) -> pb.ModelConfigResponse:
    """Triton's model configuration, from the data plane's dict (the ``model_config.proto`` JSON shape)."""
    return pb.ModelConfigResponse(config=from_dict(mc.ModelConfig(), values))


def _regions(regions: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """A registry's status list as the responses' ``regions`` map, keyed by region name."""
    return {"regions": {region["name"]: region for region in regions}}


def system_shm_status(regions: Iterable[Mapping[str, Any]]) -> pb.SystemSharedMemoryStatusResponse:
    return from_dict(pb.SystemSharedMemoryStatusResponse(), _regions(regions))


def cuda_shm_status(regions: Iterable[Mapping[str, Any]]) -> pb.CudaSharedMemoryStatusResponse:
    return from_dict(pb.CudaSharedMemoryStatusResponse(), _regions(regions))
