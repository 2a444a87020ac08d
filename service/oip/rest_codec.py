"""The Open Inference Protocol's REST wire: JSON bodies and the binary tensor data extension.

A request is a JSON object, optionally followed by raw tensor bytes: ``Inference-Header-Content-Length`` says
where the JSON ends, and each input with a ``binary_data_size`` parameter takes its bytes, in input order, from
what follows. JSON ``data`` may be flat or nested (row-major). An answer with binary outputs is the JSON header,
then the outputs' bytes, with ``Inference-Header-Content-Length`` set. No per-element Python loops: orjson
parses and writes, numpy converts. Anything that does not follow the protocol is a :class:`BadRequest` (400).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from service.errors import BadRequest, PayloadTooLarge, UnsupportedMediaType
from service.oip.types import (
    DATATYPES,
    InferRequest,
    InferResponse,
    InputTensor,
    OutputTensor,
    RequestedOutput,
    SharedMemoryRef,
)

HEADER_LENGTH = "Inference-Header-Content-Length"
JSON = "application/json"
BINARY = "application/octet-stream"
_SHM_REGION = "shared_memory_region"


@dataclass(frozen=True)
class Encoded:
    """An answer: its parts in order (the JSON header, then each binary output's bytes) and its headers."""

    parts: list[bytes | memoryview]
    media_type: str
    headers: dict[str, str]


def decode_request(body: bytes, header_length: str | None, model: str, version: str | None) -> InferRequest:
    """A ``POST .../infer`` body as an :class:`InferRequest` (model and version come from the URL)."""
    if not body:
        raise BadRequest("the request body is empty")
    json_end = _json_length(header_length, len(body))
    document = _load_json(body if json_end == len(body) else memoryview(body)[:json_end])
    binary = memoryview(body)[json_end:]
    parameters = _object(document.get("parameters", {}), "parameters")
    binary_default = _flag(parameters, "binary_data_output", "the request's parameters")
    inputs_json = document.get("inputs")
    if not isinstance(inputs_json, list) or not inputs_json:
        raise BadRequest('the body needs an "inputs" array with at least one input')
    offset = 0
    inputs = []
    for index, item in enumerate(inputs_json):
        tensor, used = _input(_object(item, f"inputs[{index}]"), binary[offset:], index)
        inputs.append(tensor)
        offset += used
    if offset != len(binary):
        raise BadRequest(f"the body holds {len(binary) - offset} bytes after the inputs' binary data")
    outputs = _outputs(document.get("outputs"), binary_default)
    request_id = document.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise BadRequest(f'"id" must be a string, got {type(request_id).__name__}')
    return InferRequest(
        model=model,
        version=version,
        inputs=inputs,
        id=request_id,
        outputs=outputs,
        timeout_ms=_timeout_ms(parameters),
        binary_default=binary_default,
        parameters=parameters,
    )


def _json_length(header: str | None, body_size: int) -> int:
    if header is None:
        return body_size
    try:
        length = int(header)
    except ValueError:
        raise BadRequest(f"{HEADER_LENGTH} must be an integer, got {header!r}") from None
    if not 0 < length <= body_size:
        raise BadRequest(f"{HEADER_LENGTH} is {length} but the body holds {body_size} bytes")
    return length


def _load_json(data: bytes | memoryview) -> dict[str, Any]:
    try:
        document = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"malformed JSON: {exc}") from exc
    return _object(document, "the body")


def _object(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise BadRequest(f"{what} must be a JSON object, got {type(value).__name__}")
    return value


def _string(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise BadRequest(f"{what} must be a string, got {type(value).__name__}")
    return value


def _integer(value: Any, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise BadRequest(f"{what} must be a non-negative integer, got {value!r}")
    return value


def _flag(parameters: dict[str, Any], key: str, where: str, default: bool = False) -> bool:
    value = parameters.get(key, default)
    if not isinstance(value, bool):
        raise BadRequest(f'"{key}" in {where} must be true or false, got {value!r}')
    return value


def _timeout_ms(parameters: dict[str, Any]) -> float | None:
    """Triton's ``timeout`` request parameter is in microseconds; 0 means none."""
    if "timeout" not in parameters:
        return None
    return _integer(parameters["timeout"], 'the "timeout" parameter (microseconds)') / 1000.0


def _input(item: dict[str, Any], binary: memoryview, index: int) -> tuple[InputTensor, int]:
    """One input and how many bytes of the binary section it took."""
    what = f"inputs[{index}]"
    name = _string(item.get("name"), f"{what}.name")
    datatype = _string(item.get("datatype"), f"input {name!r}'s datatype")
    shape = _shape(item.get("shape"), name)
    parameters = _object(item.get("parameters", {}), f"input {name!r}'s parameters")
    tensor = InputTensor(name=name, datatype=datatype, shape=shape)
    sources = ("data" in item) + ("binary_data_size" in parameters) + (_SHM_REGION in parameters)
    if sources != 1:
        raise BadRequest(f"input {name!r} needs exactly one of data, binary_data_size or {_SHM_REGION}")
    if "data" in item:
        tensor.data = json_data(item["data"], name)
        return tensor, 0
    if _SHM_REGION in parameters:
        tensor.shm = shm_ref(parameters, f"input {name!r}")
        return tensor, 0
    size = _integer(parameters["binary_data_size"], f"input {name!r}'s binary_data_size")
    if size > len(binary):
        raise BadRequest(f"input {name!r} declares {size} binary bytes but only {len(binary)} follow the JSON")
    dtype = DATATYPES.get(datatype, np.dtype(np.uint8))  # another datatype is refused by the data plane
    if size % dtype.itemsize:
        raise BadRequest(f"input {name!r}: {size} bytes is not a whole number of {datatype} values")
    tensor.data = np.frombuffer(binary[:size], dtype=dtype)
    return tensor, size


def _shape(value: Any, name: str) -> tuple[int, ...]:
    if not isinstance(value, list) or len(value) > 32:
        raise BadRequest(f"input {name!r}'s shape must be an array of at most 32 integers, got {value!r}"[:300])
    return tuple(_integer(n, f"input {name!r}'s shape") for n in value)


def json_data(data: Any, name: str) -> np.ndarray:
    """JSON ``data`` (flat or nested, row-major) as a flat array of numbers; nothing else is accepted."""
    if not isinstance(data, list):
        raise BadRequest(f"input {name!r}'s data must be an array of numbers")
    try:
        array = np.asarray(data)  # no dtype: booleans, strings and nulls show in the kind instead of converting
    except (ValueError, TypeError) as exc:
        raise BadRequest(f"input {name!r}'s data must be a rectangular array of numbers: {exc}") from exc
    if array.dtype.kind not in "fiu" or (array.size == 0 and array.ndim > 1):
        raise BadRequest(f"input {name!r}'s data must be an array of numbers (found {array.dtype} values)")
    return array.reshape(-1)


def shm_ref(parameters: dict[str, Any], what: str) -> SharedMemoryRef:
    region = _string(parameters[_SHM_REGION], f"{what}'s {_SHM_REGION}")
    if "shared_memory_byte_size" not in parameters:
        raise BadRequest(f"{what} names a shared-memory region but no shared_memory_byte_size")
    size = _integer(parameters["shared_memory_byte_size"], f"{what}'s shared_memory_byte_size")
    offset = _integer(parameters.get("shared_memory_offset", 0), f"{what}'s shared_memory_offset")
    return SharedMemoryRef(region=region, offset=offset, byte_size=size)


def _outputs(value: Any, binary_default: bool) -> list[RequestedOutput] | None:
    if value is None:
        return None
    if not isinstance(value, list):
        raise BadRequest(f'"outputs" must be an array, got {type(value).__name__}')
    outputs = []
    for index, item in enumerate(value):
        item = _object(item, f"outputs[{index}]")
        name = _string(item.get("name"), f"outputs[{index}].name")
        parameters = _object(item.get("parameters", {}), f"output {name!r}'s parameters")
        if "classification" in parameters:
            raise BadRequest("the classification extension is not supported: the model's output is a tensor")
        binary = _flag(parameters, "binary_data", f"output {name!r}'s parameters", binary_default)
        shm = shm_ref(parameters, f"output {name!r}") if _SHM_REGION in parameters else None
        outputs.append(RequestedOutput(name=name, binary=binary and shm is None, shm=shm))
    return outputs


def encode_response(response: InferResponse) -> Encoded:
    """The answer: one JSON document, or the JSON header followed by the binary outputs' bytes."""
    document: dict[str, Any] = {"model_name": response.model, "model_version": response.version or ""}
    if response.id is not None:
        document["id"] = response.id
    document["outputs"] = [_output(output) for output in response.outputs]
    raws = [_raw(output) for output in response.outputs if output.binary and output.data is not None]
    header = orjson.dumps(document, option=orjson.OPT_SERIALIZE_NUMPY)
    if not raws:
        return Encoded([header], JSON, {})
    return Encoded([header, *raws], BINARY, {HEADER_LENGTH: str(len(header))})


def _output(output: OutputTensor) -> dict[str, Any]:
    item: dict[str, Any] = {"name": output.name, "datatype": output.datatype, "shape": list(output.shape)}
    if output.shm is not None:
        ref = output.shm
        item["parameters"] = {
            _SHM_REGION: ref.region,
            "shared_memory_offset": ref.offset,
            "shared_memory_byte_size": ref.byte_size,
        }
    elif output.data is not None and output.binary:
        item["parameters"] = {"binary_data_size": output.data.nbytes}
    elif output.data is not None:
        item["data"] = np.ascontiguousarray(output.data).reshape(-1)  # orjson writes it at C speed
    return item


def _raw(output: OutputTensor) -> memoryview:
    """The output's bytes, little-endian, as a view: the server writes the array's own memory to the socket."""
    assert output.data is not None
    data = output.data
    wire = np.ascontiguousarray(data, dtype=data.dtype.newbyteorder("<"))
    return wire.data.cast("B") if wire.size else memoryview(b"")


def error_body(message: str) -> bytes:
    """The protocol's error answer."""
    return orjson.dumps({"error": message})


def total_size(parts: list[bytes | memoryview]) -> int:
    return sum(len(part) if isinstance(part, bytes) else part.nbytes for part in parts)


def decompress(body: bytes, encoding: str | None, limit: int) -> bytes:
    """A body sent with ``Content-Encoding: gzip`` or ``deflate`` (tritonclient's request compression), inflated to
    at most ``limit`` bytes: a small compressed body cannot make the server hold gigabytes."""
    name = (encoding or "identity").strip().lower()
    if name == "identity":
        return body
    if name not in ("gzip", "deflate"):
        raise UnsupportedMediaType(f"Content-Encoding must be gzip, deflate or identity, got {encoding!r}")
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS if name == "gzip" else zlib.MAX_WBITS)
    try:
        data = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise BadRequest(f"the {name} body cannot be inflated: {exc}") from exc
    if len(data) > limit:
        raise PayloadTooLarge(f"the inflated body is over the limit of {limit} bytes")
    if not inflater.eof:
        raise BadRequest(f"the {name} body is truncated")
    return data
