"""The OIP REST codec: JSON and binary tensor bodies in, JSON and binary answers out, every malformed case a 400."""

from __future__ import annotations

import gzip
import zlib
from typing import Any

import numpy as np
import orjson
import pytest

from service.errors import BadRequest, PayloadTooLarge, UnsupportedMediaType
from service.oip import rest_codec as codec
from service.oip.types import InferResponse, OutputTensor, SharedMemoryRef


def body_of(document: dict[str, Any], *tensors: bytes) -> tuple[bytes, str | None]:
    header = orjson.dumps(document)
    if not tensors:
        return header, None
    return header + b"".join(tensors), str(len(header))


def tensor(shape: list[int], datatype: str = "FP32", **extra: Any) -> dict[str, Any]:
    return {"name": "input", "datatype": datatype, "shape": shape, **extra}


def decode(document: dict[str, Any], *tensors: bytes) -> Any:
    body, length = body_of(document, *tensors)
    return codec.decode_request(body, length, "encoder", None)


def test_json_flat_and_nested_data_decode_to_the_same_values() -> None:
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    flat = decode({"inputs": [tensor([3, 4], data=x.reshape(-1).tolist())]})
    nested = decode({"inputs": [tensor([3, 4], data=x.tolist())], "id": "r1"})
    np.testing.assert_array_equal(flat.inputs[0].data, x.reshape(-1))
    np.testing.assert_array_equal(nested.inputs[0].data, x.reshape(-1))
    assert nested.id == "r1" and nested.model == "encoder" and nested.outputs is None
    assert flat.inputs[0].shape == (3, 4) and flat.inputs[0].datatype == "FP32"


@pytest.mark.parametrize("datatype", ["FP16", "FP32"])
def test_binary_inputs_are_views_of_the_body(datatype: str) -> None:
    dtype = np.float16 if datatype == "FP16" else np.float32
    x = np.random.default_rng(0).standard_normal((2, 3, 4)).astype(dtype)
    raw = x.tobytes()
    request = decode({"inputs": [tensor([2, 3, 4], datatype, parameters={"binary_data_size": len(raw)})]}, raw)
    data = request.inputs[0].data
    assert data.dtype == dtype and not data.flags.owndata  # no copy of the tensor's bytes
    np.testing.assert_array_equal(data, x.reshape(-1))


def test_request_parameters_timeout_and_binary_output() -> None:
    document = {"inputs": [tensor([1], data=[1.0])], "parameters": {"timeout": 2500, "binary_data_output": True}}
    request = decode(document)
    assert request.timeout_ms == 2.5  # Triton's timeout is in microseconds
    assert request.binary_default is True
    outputs = decode(document | {"outputs": [{"name": "output"}]}).outputs
    assert outputs[0].binary is True  # the request-level default applies to an output without binary_data
    explicit = {"name": "output", "parameters": {"binary_data": False}}
    assert decode(document | {"outputs": [explicit]}).outputs[0].binary is False


def test_shared_memory_parameters_become_refs() -> None:
    shm = {"shared_memory_region": "in0", "shared_memory_byte_size": 64, "shared_memory_offset": 8}
    out = {"name": "output", "parameters": {"shared_memory_region": "out0", "shared_memory_byte_size": 64}}
    request = decode({"inputs": [tensor([4, 4], parameters=shm)], "outputs": [out]})
    assert request.inputs[0].shm == SharedMemoryRef("in0", 8, 64) and request.inputs[0].data is None
    assert request.outputs[0].shm == SharedMemoryRef("out0", 0, 64) and not request.outputs[0].binary


FOUR = np.zeros(4, np.float32).tobytes()
MALFORMED: list[tuple[str, bytes, str | None]] = [
    ("empty body", b"", None),
    ("not JSON", b"{", None),
    ("not an object", b"[1]", None),
    ("no inputs", b"{}", None),
    ("empty inputs", b'{"inputs": []}', None),
    ("input not an object", b'{"inputs": [1]}', None),
    ("no name", b'{"inputs": [{"datatype": "FP32", "shape": [1], "data": [1]}]}', None),
    ("no datatype", b'{"inputs": [{"name": "input", "shape": [1], "data": [1]}]}', None),
    ("shape not a list", *body_of({"inputs": [tensor(3, data=[1])]})),  # type: ignore[arg-type]
    ("negative shape", *body_of({"inputs": [tensor([-1], data=[1])]})),
    ("float shape", *body_of({"inputs": [tensor([1.5], data=[1])]})),  # type: ignore[list-item]
    ("bool shape", *body_of({"inputs": [tensor([True], data=[1])]})),  # type: ignore[list-item]
    ("rank 33", *body_of({"inputs": [tensor([1] * 33, data=[1])]})),
    ("no data", *body_of({"inputs": [tensor([1])]})),
    ("data not a list", *body_of({"inputs": [tensor([1], data=1.0)]})),
    ("string data", *body_of({"inputs": [tensor([1], data=["a"])]})),
    ("bool data", *body_of({"inputs": [tensor([1], data=[True])]})),
    ("null data", *body_of({"inputs": [tensor([1], data=[None])]})),
    ("ragged data", *body_of({"inputs": [tensor([2, 2], data=[[1, 2], [3]])]})),
    ("huge integer", b'{"inputs": [{"name": "input", "datatype": "FP32", "shape": [1], "data": [1e999]}]}', None),
    ("data and binary", *body_of({"inputs": [tensor([4], data=[1] * 4, parameters={"binary_data_size": 16})]}, FOUR)),
    ("binary past the body", *body_of({"inputs": [tensor([8], parameters={"binary_data_size": 32})]}, FOUR)),
    ("binary size not a number", *body_of({"inputs": [tensor([4], parameters={"binary_data_size": "16"})]}, FOUR)),
    ("binary size negative", *body_of({"inputs": [tensor([4], parameters={"binary_data_size": -1})]}, FOUR)),
    ("partial value", *body_of({"inputs": [tensor([4], parameters={"binary_data_size": 15})]}, FOUR[:15])),
    ("bytes left over", *body_of({"inputs": [tensor([2], parameters={"binary_data_size": 8})]}, FOUR)),
    ("parameters not an object", *body_of({"inputs": [tensor([1], data=[1])], "parameters": [1]})),
    ("timeout not an integer", *body_of({"inputs": [tensor([1], data=[1])], "parameters": {"timeout": "1"}})),
    ("negative timeout", *body_of({"inputs": [tensor([1], data=[1])], "parameters": {"timeout": -5}})),
    ("binary_data_output not a bool", *body_of({"inputs": [tensor([1], data=[1])], "parameters": {"binary_data_output": 1}})),  # noqa: E501
    ("id not a string", *body_of({"inputs": [tensor([1], data=[1])], "id": 7})),
    ("outputs not a list", *body_of({"inputs": [tensor([1], data=[1])], "outputs": {}})),
    ("output without name", *body_of({"inputs": [tensor([1], data=[1])], "outputs": [{}]})),
    ("classification", *body_of({"inputs": [tensor([1], data=[1])], "outputs": [{"name": "output", "parameters": {"classification": 3}}]})),  # noqa: E501
    ("shm without size", *body_of({"inputs": [tensor([1], parameters={"shared_memory_region": "r"})]})),
    ("shm region not a string", *body_of({"inputs": [tensor([1], parameters={"shared_memory_region": 1, "shared_memory_byte_size": 4})]})),  # noqa: E501
]


@pytest.mark.parametrize(("name", "body", "length"), MALFORMED, ids=[case[0] for case in MALFORMED])
def test_malformed_requests_are_bad_requests(name: str, body: bytes, length: str | None) -> None:
    with pytest.raises(BadRequest):
        codec.decode_request(body, length, "encoder", None)


@pytest.mark.parametrize("length", ["x", "0", "-3", "1000", "1.5"])
def test_bad_header_length_is_a_bad_request(length: str) -> None:
    body, _ = body_of({"inputs": [tensor([4], parameters={"binary_data_size": 16})]}, FOUR)
    with pytest.raises(BadRequest, match="Inference-Header-Content-Length"):
        codec.decode_request(body, length, "encoder", None)


def output(data: np.ndarray, binary: bool, datatype: str = "FP32") -> OutputTensor:
    return OutputTensor("output", datatype, tuple(data.shape), data=data, binary=binary)


def test_json_answer_is_one_document_with_flat_data() -> None:
    y = np.arange(6, dtype=np.float32).reshape(2, 3)
    encoded = codec.encode_response(InferResponse("encoder", [output(y, binary=False)], version="1", id="a"))
    assert encoded.media_type == codec.JSON and not encoded.headers and len(encoded.parts) == 1
    document = orjson.loads(encoded.parts[0])
    assert document == {
        "model_name": "encoder",
        "model_version": "1",
        "id": "a",
        "outputs": [{"name": "output", "datatype": "FP32", "shape": [2, 3], "data": [0, 1, 2, 3, 4, 5]}],
    }


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_binary_answer_is_a_json_header_then_the_bytes(dtype: type) -> None:
    y = np.random.default_rng(1).standard_normal((2, 3, 4)).astype(dtype)
    datatype = "FP16" if dtype is np.float16 else "FP32"
    encoded = codec.encode_response(InferResponse("encoder", [output(y, True, datatype)], version="1"))
    header, raw = encoded.parts
    assert encoded.media_type == codec.BINARY and encoded.headers[codec.HEADER_LENGTH] == str(len(header))
    document = orjson.loads(header)
    assert document["outputs"][0]["parameters"] == {"binary_data_size": y.nbytes} and "id" not in document
    np.testing.assert_array_equal(np.frombuffer(raw, dtype).reshape(y.shape), y)
    assert codec.total_size(encoded.parts) == len(header) + y.nbytes


def test_shared_memory_answer_names_the_region_only() -> None:
    ref = SharedMemoryRef("out", 16, 96)
    out = OutputTensor("output", "FP32", (2, 3, 4), shm=ref)
    encoded = codec.encode_response(InferResponse("encoder", [out], version="1"))
    item = orjson.loads(encoded.parts[0])["outputs"][0]
    expected = {"shared_memory_region": "out", "shared_memory_offset": 16, "shared_memory_byte_size": 96}
    assert item["parameters"] == expected
    assert "data" not in item and encoded.media_type == codec.JSON


def test_compressed_bodies_are_inflated_within_the_limit() -> None:
    body = b'{"inputs": []}' * 10
    assert codec.decompress(gzip.compress(body), "gzip", 1000) == body
    assert codec.decompress(zlib.compress(body), "deflate", 1000) == body
    assert codec.decompress(body, None, 1000) == body
    with pytest.raises(PayloadTooLarge):
        codec.decompress(gzip.compress(b"\0" * 100_000), "gzip", 1000)  # a small body that inflates too far
    with pytest.raises(BadRequest):
        codec.decompress(b"not gzip", "gzip", 1000)
    with pytest.raises(BadRequest):
        codec.decompress(gzip.compress(body)[:-12], "gzip", 1000)
    with pytest.raises(UnsupportedMediaType):
        codec.decompress(body, "br", 1000)
