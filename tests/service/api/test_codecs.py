from __future__ import annotations

import io

import numpy as np
import orjson
import pytest

from service.api import codecs
from service.api.errors import InvalidInput, UnsupportedMediaType


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


@pytest.fixture
def x() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((2, 3, 4)).astype(np.float32)


def test_json_round_trip(x: np.ndarray) -> None:
    decoded = codecs.decode(codecs.JSON, orjson.dumps({"inputs": x.tolist()}), {})
    np.testing.assert_array_equal(decoded.array, x)
    assert decoded.wire_dtype == np.float32
    encoded = codecs.encode(codecs.JSON, x, "m")
    document = orjson.loads(encoded.content)
    assert document["model"] == "m" and document["shape"] == [2, 3, 4]
    np.testing.assert_array_equal(np.asarray(document["outputs"], np.float32), x)
    assert encoded.media_type == codecs.JSON


@pytest.mark.parametrize("dtype", ["float16", "float32", ">f4"])
def test_npy_round_trip(x: np.ndarray, dtype: str) -> None:
    decoded = codecs.decode(codecs.NPY, npy_bytes(x.astype(dtype)), {})
    assert decoded.array.dtype == np.dtype(dtype).newbyteorder("<")
    np.testing.assert_array_equal(decoded.array, x.astype(dtype))
    encoded = codecs.encode(codecs.NPY, decoded.array, "m")
    np.testing.assert_array_equal(np.load(io.BytesIO(encoded.content)), decoded.array)


def test_npy_fortran_order_is_read_correctly(x: np.ndarray) -> None:
    decoded = codecs.decode(codecs.NPY, npy_bytes(np.asfortranarray(x)), {})
    np.testing.assert_array_equal(decoded.array, x)


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_raw_round_trip(x: np.ndarray, dtype: str) -> None:
    data = x.astype(dtype)
    decoded = codecs.decode(
        codecs.RAW, data.astype("<" + data.dtype.str[1:]).tobytes(), {"x-shape": "2,3,4", "x-dtype": dtype}
    )
    np.testing.assert_array_equal(decoded.array, data)
    encoded = codecs.encode(codecs.RAW, decoded.array, "m")
    assert encoded.headers == {"X-Shape": "2,3,4", "X-Dtype": dtype}
    np.testing.assert_array_equal(np.frombuffer(encoded.content, dtype).reshape(2, 3, 4), data)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"{", "malformed JSON"),
        (b"[1, 2]", "object"),
        (b'{"x": []}', "object"),
        (b'{"inputs": 3}', "nested array"),
        (b'{"inputs": [[1, 2], [3]]}', "rectangular"),
        (b'{"inputs": [["a", "b"]]}', "numbers"),
        (b'{"inputs": [[true, false]]}', "numbers"),
        (b'{"inputs": [[null, 1]]}', "numbers"),
    ],
)
def test_bad_json_is_invalid_input(body: bytes, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        codecs.decode(codecs.JSON, body, {})


GOOD_NPY = npy_bytes(np.zeros((2, 3, 4), np.float32))


@pytest.mark.parametrize(
    "body",
    [
        b"hello world, not numpy",
        GOOD_NPY[:-4],  # shorter than its header says
        GOOD_NPY + b"\0\0\0\0",  # longer than its header says
        GOOD_NPY[:20],  # header cut off
        npy_bytes(np.zeros((2, 3, 4), np.int32)),
        npy_bytes(np.zeros((2, 3, 4), np.float64)),
    ],
    ids=["not-npy", "truncated", "trailing", "header-only", "int32", "float64"],
)
def test_bad_npy_is_invalid_input(body: bytes) -> None:
    with pytest.raises(InvalidInput):
        codecs.decode(codecs.NPY, body, {})


@pytest.mark.parametrize(
    ("headers", "size", "message"),
    [
        ({"x-dtype": "float32"}, 96, "X-Shape"),
        ({"x-shape": "2,x,4", "x-dtype": "float32"}, 96, "integers"),
        ({"x-shape": "2,-3,4", "x-dtype": "float32"}, 96, "negative"),
        ({"x-shape": "2,3,4"}, 96, "X-Dtype"),
        ({"x-shape": "2,3,4", "x-dtype": "int8"}, 96, "X-Dtype"),
        ({"x-shape": "2,3,4", "x-dtype": "float32"}, 95, "needs 96"),
        ({"x-shape": "2,3,4", "x-dtype": "float32"}, 97, "needs 96"),
        ({"x-shape": "2,3,4", "x-dtype": "float16"}, 96, "needs 48"),
    ],
)
def test_bad_raw_is_invalid_input(headers: dict[str, str], size: int, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        codecs.decode(codecs.RAW, b"\0" * size, headers)


@pytest.mark.parametrize("fmt", codecs.FORMATS)
def test_empty_body_is_invalid_input(fmt: str) -> None:
    with pytest.raises(InvalidInput, match="empty"):
        codecs.decode(fmt, b"", {"x-shape": "0", "x-dtype": "float32"})


def test_request_format_reads_the_media_type_only() -> None:
    assert codecs.request_format("application/json; charset=utf-8") == codecs.JSON
    assert codecs.request_format("Application/X-NPY") == codecs.NPY
    for bad in (None, "", "text/plain", "multipart/form-data"):
        with pytest.raises(UnsupportedMediaType):
            codecs.request_format(bad)


@pytest.mark.parametrize(
    ("accept", "expected"),
    [
        (None, codecs.JSON),
        ("*/*", codecs.JSON),
        ("application/x-npy", codecs.NPY),
        ("text/html", codecs.JSON),
        ("*/*, application/octet-stream", codecs.RAW),
        ("application/x-npy;q=0.5, application/octet-stream;q=0.9", codecs.RAW),
        ("application/x-npy;q=0", codecs.JSON),
    ],
)
def test_response_format_follows_accept(accept: str | None, expected: str) -> None:
    assert codecs.response_format(accept, codecs.JSON) == expected
