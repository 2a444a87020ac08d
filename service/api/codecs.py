"""Wire formats for /encode: JSON, ``.npy`` and raw little-endian bytes. No per-element Python loops:
orjson parses, numpy converts, and each format is validated against its own declared shape."""

from __future__ import annotations

import io
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
from numpy.lib import format as npy_format

from service.api.errors import InvalidInput, UnsupportedMediaType

JSON = "application/json"
NPY = "application/x-npy"
RAW = "application/octet-stream"
FORMATS = (JSON, NPY, RAW)
WIRE_DTYPES: dict[str, np.dtype[Any]] = {"float16": np.dtype("<f2"), "float32": np.dtype("<f4")}
MAX_RANK = 32  # far above any valid input (rank 2 or 3), below numpy's own limit of 64
_NPY_READERS = {(1, 0): npy_format.read_array_header_1_0, (2, 0): npy_format.read_array_header_2_0}


@dataclass(frozen=True)
class Decoded:
    """A request's array and the dtype its answer should use (JSON answers in float32)."""

    array: np.ndarray
    wire_dtype: np.dtype[Any]


@dataclass(frozen=True)
class Encoded:
    content: bytes | memoryview  # a raw answer is the output array's own memory (see encode)
    media_type: str
    headers: dict[str, str]


def media_type(header: str | None) -> str:
    return (header or "").split(";", 1)[0].strip().lower()


def request_format(content_type: str | None) -> str:
    fmt = media_type(content_type)
    if fmt not in FORMATS:
        raise UnsupportedMediaType(f"Content-Type must be one of {', '.join(FORMATS)}; got {fmt or 'none'!r}")
    return fmt


def _q(params: list[str]) -> float:
    for param in params:
        key, _, value = param.partition("=")
        if key.strip().lower() == "q":
            try:
                return float(value)
            except ValueError:
                return 0.0
    return 1.0


def response_format(accept: str | None, request_fmt: str) -> str:
    """The answer's format: the best supported type in ``Accept``, else the request's own format.

    Wildcards mean "the request's format"; an Accept naming only unsupported types is not refused (406)
    but answered in the request's format, which every client of this API can read.
    """
    best, best_rank = request_fmt, (0.0, False)
    for part in (accept or "").split(","):
        media, *params = (p.strip() for p in part.split(";"))
        media = media.lower()
        if media in FORMATS:
            candidate, specific = media, True
        elif media in ("*/*", "application/*"):
            candidate, specific = request_fmt, False
        else:
            continue
        rank = (_q(params), specific)
        if rank[0] > 0 and rank > best_rank:
            best, best_rank = candidate, rank
    return best


def decode(fmt: str, body: bytes, headers: Mapping[str, str]) -> Decoded:
    if not body:
        raise InvalidInput("the request body is empty")
    if fmt == JSON:
        return Decoded(decode_json(body), WIRE_DTYPES["float32"])
    if fmt == NPY:
        array = decode_npy(body)
        return Decoded(array, array.dtype)
    array = decode_raw(body, headers.get("x-shape"), headers.get("x-dtype"))
    return Decoded(array, array.dtype)


def decode_json(body: bytes) -> np.ndarray:
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(f"malformed JSON: {exc}") from exc
    if not isinstance(document, dict) or "inputs" not in document:
        raise InvalidInput('the JSON body must be an object with an "inputs" array')
    inputs = document["inputs"]
    if not isinstance(inputs, list):
        raise InvalidInput('"inputs" must be a nested array of numbers, (S, D) or (B, S, D)')
    try:
        array = np.asarray(inputs)  # no dtype: nulls, strings and booleans show in the kind instead of converting
    except (ValueError, TypeError) as exc:
        raise InvalidInput(f'"inputs" must be a rectangular array of numbers: {exc}') from exc
    if array.dtype.kind not in "fiu":
        raise InvalidInput(f'"inputs" must be a rectangular array of numbers (found {array.dtype} values)')
    return array.astype(np.float32, copy=False)


def _check_float(dtype: np.dtype[Any]) -> np.dtype[Any]:
    if dtype.kind != "f" or dtype.itemsize not in (2, 4):
        raise InvalidInput(f"dtype must be float16 or float32, got {dtype}")
    return dtype.newbyteorder("<")


def decode_npy(body: bytes) -> np.ndarray:
    """Read ``numpy.save`` bytes strictly: the data must be exactly as long as the header says."""
    stream = io.BytesIO(body)
    try:
        version = npy_format.read_magic(stream)
        reader = _NPY_READERS.get(version)
        if reader is None:
            raise InvalidInput(f".npy format version {version} is not supported (1.0 and 2.0 are)")
        shape, fortran_order, dtype = reader(stream)
    except InvalidInput:
        raise
    except (ValueError, EOFError, OSError, SyntaxError) as exc:
        raise InvalidInput(f"not a valid .npy body: {exc}") from exc
    wire = _check_float(dtype)
    data = memoryview(body)[stream.tell() :]
    return _from_bytes(data, shape, dtype, wire, fortran_order)


def _parse_shape(header: str | None) -> tuple[int, ...]:
    if not header:
        raise InvalidInput("raw bodies need an X-Shape header, e.g. 'X-Shape: 4,196,768'")
    try:
        shape = tuple(int(part) for part in header.split(","))
    except ValueError as exc:
        raise InvalidInput(f"X-Shape must be comma-separated integers, got {header!r}") from exc
    if any(n < 0 for n in shape):
        raise InvalidInput(f"X-Shape must not be negative, got {header!r}")
    return shape


def decode_raw(body: bytes, shape_header: str | None, dtype_header: str | None) -> np.ndarray:
    shape = _parse_shape(shape_header)
    name = (dtype_header or "").strip().lower()
    if name not in WIRE_DTYPES:
        raise InvalidInput(f"X-Dtype must be float16 or float32, got {dtype_header!r}")
    dtype = WIRE_DTYPES[name]
    return _from_bytes(memoryview(body), shape, dtype, dtype, False)


def _from_bytes(
    data: memoryview, shape: tuple[int, ...], dtype: np.dtype[Any], wire: np.dtype[Any], fortran: bool
) -> np.ndarray:
    expected = math.prod(shape) * dtype.itemsize
    if len(data) != expected:
        raise InvalidInput(f"the body holds {len(data)} data bytes but shape {list(shape)} of {dtype} needs {expected}")
    if len(shape) > MAX_RANK:  # numpy refuses more than 64 dimensions with a ValueError: a 422, not a 500
        raise InvalidInput(f"at most {MAX_RANK} dimensions, got {len(shape)}")
    array = np.frombuffer(data, dtype=dtype).reshape(shape, order="F" if fortran else "C")
    return array.astype(wire, copy=False) if array.dtype != wire else array


def encode(fmt: str, output: np.ndarray, model: str) -> Encoded:
    if fmt == JSON:
        out = np.ascontiguousarray(output, dtype=np.float32)
        document = {"outputs": out, "model": model, "shape": list(out.shape)}
        return Encoded(orjson.dumps(document, option=orjson.OPT_SERIALIZE_NUMPY), JSON, {})
    if fmt == NPY:
        buffer = io.BytesIO()
        np.save(buffer, np.ascontiguousarray(output), allow_pickle=False)
        return Encoded(buffer.getvalue(), NPY, {})
    wire = output.dtype.newbyteorder("<")
    # A byte view, not .tobytes(): the server writes the array's memory to the socket, one 300 kB copy less per
    # request. Safe because the engine's output is owned by this request (Engine.run's contract) and the view
    # keeps it alive until written.
    raw = np.ascontiguousarray(output, dtype=wire).data.cast("B")
    headers = {"X-Shape": ",".join(str(n) for n in output.shape), "X-Dtype": wire.name}
    return Encoded(raw, RAW, headers)
