"""ModelInferRequest/Response <-> the OIP types, with messages built the way tritonclient.grpc builds them."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as tc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc._utils import _get_inference_request

from service.errors import InvalidInput
from service.oip import grpc_codec as codec
from service.oip.types import InferResponse, OutputTensor, SharedMemoryRef


def client_request(
    inputs: list[tc.InferInput], outputs: list[tc.InferRequestedOutput] | None = None, **kw: Any
) -> pb.ModelInferRequest:
    """Exactly the message tritonclient.grpc sends for ``client.infer("encoder", inputs, ...)``."""
    args = dict(model_version="", request_id="", sequence_id=0, sequence_start=False, sequence_end=False)
    args |= dict(priority=0, timeout=None, parameters=None) | kw
    return _get_inference_request(model_name="encoder", inputs=inputs, outputs=outputs, **args)


def raw_input(x: np.ndarray, name: str = "input") -> tc.InferInput:
    tensor = tc.InferInput(name, list(x.shape), {np.float16: "FP16", np.float32: "FP32"}[x.dtype.type])
    tensor.set_data_from_numpy(x)
    return tensor


def wire(msg: pb.ModelInferRequest) -> pb.ModelInferRequest:
    """Through the wire format and back, as the server sees it."""
    return pb.ModelInferRequest.FromString(msg.SerializeToString())


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_raw_contents_become_the_same_array(dtype: Any) -> None:
    x = np.random.default_rng(0).standard_normal((4, 7, 8)).astype(dtype)
    req = codec.infer_request(wire(client_request([raw_input(x)], request_id="r1")))
    assert req.model == "encoder" and req.id == "r1" and req.version is None and req.outputs is None
    [tensor] = req.inputs
    datatype = {np.float16: "FP16", np.float32: "FP32"}[dtype]
    assert (tensor.name, tensor.datatype, tensor.shape, tensor.shm) == ("input", datatype, x.shape, None)
    assert tensor.data is not None and tensor.data.dtype == x.dtype
    np.testing.assert_array_equal(tensor.data, x)


def test_typed_fp32_contents() -> None:
    x = np.arange(24, dtype=np.float32).reshape(2, 3, 4) / 7
    msg = pb.ModelInferRequest(model_name="encoder")
    tensor = msg.inputs.add(name="input", datatype="FP32", shape=x.shape)
    tensor.contents.fp32_contents.extend(x.ravel().tolist())
    [decoded] = codec.infer_request(wire(msg)).inputs
    assert decoded.data is not None
    np.testing.assert_array_equal(decoded.data, x)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda m: m.raw_input_contents.__setitem__(0, m.raw_input_contents[0][:-2]), "bytes of raw contents"),
        (lambda m: setattr(m.inputs[0], "datatype", "INT32"), "unsupported datatype 'INT32'"),
        (lambda m: setattr(m.inputs[0], "datatype", "FLOAT"), "unknown datatype 'FLOAT'"),
        (lambda m: m.inputs[0].shape.__setitem__(0, -1), "negative dimension"),
        (lambda m: m.raw_input_contents.append(b"1234"), "2 raw_input_contents for 1 inputs"),
        (lambda m: m.ClearField("raw_input_contents"), "has no data"),
        (lambda m: m.inputs[0].contents.fp32_contents.append(1.0), "cannot be mixed with raw_input_contents"),
    ],
)
def test_malformed_inputs_are_invalid_input(mutate: Any, message: str) -> None:
    msg = wire(client_request([raw_input(np.ones((1, 2, 8), np.float32))]))
    mutate(msg)
    with pytest.raises(InvalidInput, match=message):
        codec.infer_request(msg)


def test_fp16_has_no_typed_contents() -> None:
    msg = pb.ModelInferRequest(model_name="encoder")
    msg.inputs.add(name="input", datatype="FP16", shape=[1]).contents.fp32_contents.append(1.0)
    with pytest.raises(InvalidInput, match="FP16 has no typed contents"):
        codec.infer_request(msg)


def test_typed_contents_count_must_match_the_shape() -> None:
    msg = pb.ModelInferRequest(model_name="encoder")
    msg.inputs.add(name="input", datatype="FP32", shape=[2, 2]).contents.fp32_contents.extend([1.0, 2.0])
    with pytest.raises(InvalidInput, match="2 values in contents, but shape"):
        codec.infer_request(msg)


def test_timeout_parameter_is_microseconds() -> None:
    msg = client_request([raw_input(np.ones((1, 8), np.float32))], timeout=2500)
    assert codec.infer_request(wire(msg)).timeout_ms == 2.5
    assert codec.infer_request(wire(client_request([raw_input(np.ones((1, 8), np.float32))]))).timeout_ms is None


@pytest.mark.parametrize("value", ["soon", -5, True])
def test_bad_timeout_parameter_is_invalid_input(value: Any) -> None:
    msg = client_request([raw_input(np.ones((1, 8), np.float32))])
    param = msg.parameters["timeout"]
    field = {str: "string_param", int: "int64_param", bool: "bool_param"}[type(value)]
    setattr(param, field, value)
    with pytest.raises(InvalidInput, match="'timeout' parameter"):
        codec.infer_request(wire(msg))


def test_shared_memory_inputs_and_outputs() -> None:
    tensor = tc.InferInput("input", [2, 8], "FP32")
    tensor.set_shared_memory("in_region", 64, offset=128)
    out = tc.InferRequestedOutput("output")
    out.set_shared_memory("out_region", 64)
    req = codec.infer_request(wire(client_request([tensor], [out])))
    assert req.inputs[0].shm == SharedMemoryRef("in_region", 128, 64) and req.inputs[0].data is None
    assert req.outputs is not None and req.outputs[0].shm == SharedMemoryRef("out_region", 0, 64)


def test_bad_shared_memory_parameters_are_invalid_input() -> None:
    tensor = tc.InferInput("input", [2, 8], "FP32")
    tensor.set_shared_memory("in_region", 64, offset=0)
    msg = client_request([tensor])
    msg.inputs[0].parameters["shared_memory_offset"].int64_param = -1
    with pytest.raises(InvalidInput, match="'shared_memory_offset' must be a non-negative integer"):
        codec.infer_request(wire(msg))
    msg.inputs[0].parameters["shared_memory_region"].string_param = ""
    with pytest.raises(InvalidInput, match="must be a region name"):
        codec.infer_request(wire(msg))


def test_requested_outputs_and_request_parameters() -> None:
    msg = client_request([raw_input(np.ones((1, 8), np.float32))], [tc.InferRequestedOutput("output")])
    msg.parameters["custom"].string_param = "x"
    req = codec.infer_request(wire(msg))
    assert req.outputs is not None and [o.name for o in req.outputs] == ["output"] and req.outputs[0].binary
    assert req.parameters == {"custom": "x"}


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.dtype(">f4")])
def test_response_reads_back_with_tritonclient(dtype: Any) -> None:
    y = np.random.default_rng(1).standard_normal((3, 5, 8)).astype(dtype)
    resp = InferResponse(model="encoder", version="1", id="r", outputs=[OutputTensor("output", "FP32", y.shape, y)])
    resp.outputs[0].datatype = "FP16" if np.dtype(dtype) == np.float16 else "FP32"
    msg = pb.ModelInferResponse.FromString(codec.infer_response(resp).SerializeToString())
    assert (msg.model_name, msg.model_version, msg.id) == ("encoder", "1", "r")
    result = tc.InferResult(msg)
    np.testing.assert_array_equal(result.as_numpy("output"), y)
    assert result.as_numpy("output").dtype == np.dtype(dtype).newbyteorder("<")


def test_response_output_in_shared_memory_carries_no_bytes() -> None:
    ref = SharedMemoryRef("out_region", 16, 96)
    resp = InferResponse(model="encoder", outputs=[OutputTensor("output", "FP32", (3, 8), shm=ref)])
    msg = codec.infer_response(resp)
    assert list(msg.raw_output_contents) == [] and list(msg.outputs[0].shape) == [3, 8]
    assert msg.outputs[0].parameters["shared_memory_region"].string_param == "out_region"
    assert msg.outputs[0].parameters["shared_memory_offset"].int64_param == 16


def test_metadata_and_statistics_from_the_rest_json_shape() -> None:
    meta: dict[str, Any] = {"name": "encoder", "versions": ["1"], "platform": "onnxruntime_onnx"}
    meta |= {"inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, -1, 64]}], "outputs": []}
    msg = codec.model_metadata(meta)
    assert msg.name == "encoder" and list(msg.inputs[0].shape) == [-1, -1, 64]
    server = codec.server_metadata({"name": "encoder-service", "version": "0.1.0", "extensions": ["statistics"]})
    assert list(server.extensions) == ["statistics"]
    batch = {"batch_size": 4, "compute_infer": {"count": 1, "ns": 10}}
    stats = codec.model_statistics({"model_stats": [{"name": "encoder", "inference_count": 4, "batch_stats": [batch]}]})
    assert stats.model_stats[0].batch_stats[0].compute_infer.ns == 10
    with pytest.raises(Exception, match="no_such_field"):
        codec.model_metadata({"no_such_field": 1})


def test_shared_memory_status_keys_each_region_by_its_name() -> None:
    regions = [{"name": "a", "key": "/a", "offset": 0, "byte_size": 64}, {"name": "b/c", "key": "/b", "byte_size": 8}]
    system = codec.system_shm_status(regions)
    assert sorted(system.regions) == ["a", "b/c"]
    assert (system.regions["b/c"].key, system.regions["b/c"].byte_size) == ("/b", 8)
    cuda = codec.cuda_shm_status([{"name": "g", "device_id": 1, "byte_size": 256}])
    assert (cuda.regions["g"].name, cuda.regions["g"].device_id, cuda.regions["g"].byte_size) == ("g", 1, 256)
    assert not codec.cuda_shm_status([]).regions


def full_parse_equals(msg: pb.ModelInferRequest) -> None:
    """The zero-copy deserializer sees exactly what protobuf sees: the same fields, the same raw contents."""
    data = msg.SerializeToString()
    parsed = codec.parse_infer_request(data)
    assert parsed.error is None
    reference = pb.ModelInferRequest.FromString(data)
    assert [bytes(raw) for raw in parsed.raw] == list(reference.raw_input_contents)
    reference.ClearField("raw_input_contents")
    assert parsed.message == reference


def test_zero_copy_parse_matches_protobuf() -> None:
    x = np.random.default_rng(2).standard_normal((2, 3, 8)).astype(np.float16)
    shm = tc.InferInput("in_shm", [2, 8], "FP32")
    shm.set_shared_memory("region", 64, offset=8)
    empty = tc.InferInput("empty", [0, 8], "FP32")
    empty.set_data_from_numpy(np.zeros((0, 8), np.float32))
    outputs = [tc.InferRequestedOutput("output")]
    for msg in (
        client_request([raw_input(x)], outputs, request_id="id-1", timeout=100, parameters={"k": 1.5}),
        client_request([raw_input(x), shm, empty, raw_input(x[:1], "second")], outputs),
        client_request([shm]),
        pb.ModelInferRequest(),
    ):
        full_parse_equals(msg)
    # Unknown fields of other wire types (a newer client) survive as protobuf would keep them.
    data = client_request([raw_input(x)]).SerializeToString() + bytes([0x78, 0x96, 0x01, 0x85, 0x01, 1, 2, 3, 4])
    parsed = codec.parse_infer_request(data)
    assert parsed.error is None and parsed.message.SerializeToString().endswith(bytes([1, 2, 3, 4]))


def test_raw_contents_are_views_of_the_received_bytes() -> None:
    x = np.arange(16, dtype=np.float32).reshape(2, 8)
    data = client_request([raw_input(x)]).SerializeToString()
    parsed = codec.parse_infer_request(data)
    [tensor] = codec.infer_request(parsed.message, parsed.raw).inputs
    assert tensor.data is not None and np.shares_memory(tensor.data, np.frombuffer(data, np.uint8))
    np.testing.assert_array_equal(tensor.data, x)


@pytest.mark.parametrize(
    "data",
    [b"\x0a\x05abc", b"\x3a\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01", b"\x0f", b"\x0a", b"\x80"],
    ids=["short string", "huge varint", "wire type 7", "no length", "truncated key"],
)
def test_malformed_bytes_are_an_error_not_an_exception(data: bytes) -> None:
    parsed = codec.parse_infer_request(data)
    assert parsed.error is not None and "not a ModelInferRequest" in parsed.error


def test_many_top_level_fields_fall_back_to_protobuf() -> None:
    msg = client_request([raw_input(np.ones((1, 8), np.float32))])
    for i in range(codec.MAX_SCANNED_FIELDS + 10):
        msg.inputs.add(name=f"i{i}", datatype="FP32", shape=[1])
    assert codec.split_field(msg.SerializeToString(), codec.RAW_INPUT_FIELD) is None
    full_parse_equals(msg)


@pytest.mark.parametrize("sizes", [[], [0], [4 * 196 * 768], [3, 0, 200]])
def test_serialized_response_is_the_protobuf_message(sizes: list[int]) -> None:
    outputs = [OutputTensor(f"o{i}", "FP32", (n,), np.arange(n, dtype=np.float32)) for i, n in enumerate(sizes)]
    resp = InferResponse(model="encoder", version="1", id="x", outputs=outputs)
    data = codec.serialize_infer_response(codec.encode_infer_response(resp))
    reference = pb.ModelInferResponse(model_name="encoder", model_version="1", id="x")
    for out in outputs:
        reference.outputs.add(name=out.name, datatype="FP32", shape=out.shape)
    if any(sizes):
        assert out.data is not None
        reference.raw_output_contents.extend([o.data.tobytes() for o in outputs if o.data is not None])
    assert pb.ModelInferResponse.FromString(data) == reference
    assert data == reference.SerializeToString()  # field order as protobuf writes it
