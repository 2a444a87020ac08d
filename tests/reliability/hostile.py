"""Hand-written hostile requests for /encode: each is (name, body, headers); none may get a 5xx."""

from __future__ import annotations

import struct

import numpy as np

from tests.reliability.support import DIM, npy

NPY = {"content-type": "application/x-npy"}
RAW = {"content-type": "application/octet-stream"}
JSON = {"content-type": "application/json"}
Hostile = tuple[str, bytes, dict[str, str]]


def npy_with_header(header: dict[str, object], data: bytes = b"") -> bytes:
    """A version 1.0 .npy body whose header says whatever we like (numpy's writer would check it), then ``data``."""
    text = repr(header).encode("latin1")
    text += b" " * (-(len(text) + 11) % 64) + b"\n"  # 10 bytes of preamble; the header ends 64-aligned
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text)) + text + data


def good(seq: int = 4) -> np.ndarray:
    return np.ones((1, seq, DIM), np.float32)


def npy_cases() -> list[Hostile]:
    body = npy(good())
    header = {"descr": "<f4", "fortran_order": False}
    data = good().tobytes()
    with_nan, with_inf = good(), good()
    with_nan[0, 1, 2], with_inf[0, 0, 0] = np.nan, -np.inf
    return [
        ("truncated data", body[:-5], NPY),
        ("truncated header", body[:20], NPY),
        ("magic only", body[:8], NPY),
        ("bad magic", b"\x93NUMPX" + body[6:], NPY),
        ("version 3.0", b"\x93NUMPY\x03\x00" + body[8:], NPY),
        ("header length past the end", body[:8] + struct.pack("<H", 60000) + body[10:], NPY),
        ("lying shape: more", npy_with_header({**header, "shape": (2, 4, DIM)}, data), NPY),
        ("lying shape: less", npy_with_header({**header, "shape": (1, 2, DIM)}, data), NPY),
        ("huge shape", npy_with_header({**header, "shape": (10**12, 10**12, DIM)}, data), NPY),
        ("65 dimensions", npy_with_header({**header, "shape": (1,) * 65}, data[:4]), NPY),
        ("negative shape", npy_with_header({**header, "shape": (-1, 4, DIM)}, data), NPY),
        ("object dtype", npy_with_header({**header, "descr": "|O", "shape": (1, 4, DIM)}, data), NPY),
        ("int32", npy_with_header({**header, "descr": "<i4", "shape": (1, 4, DIM)}, data), NPY),
        ("float64", npy(good().astype(np.float64)), NPY),
        ("structured dtype", npy_with_header({**header, "descr": [("a", "<f4")], "shape": (1, 4, DIM)}, data), NPY),
        ("header is code", body[:10] + b"__import__('os').system('true')".ljust(len(body) - 10), NPY),
        ("NaN", npy(with_nan), NPY),
        ("Inf", npy(with_inf), NPY),
        ("rank 1", npy(np.ones(DIM, np.float32)), NPY),
        ("rank 4", npy(np.ones((1, 1, 4, DIM), np.float32)), NPY),
        ("wrong width", npy(np.ones((1, 4, DIM + 1), np.float32)), NPY),
        ("too long", npy(np.ones((1, 65, DIM), np.float32)), NPY),
        ("empty batch", npy(np.ones((0, 4, DIM), np.float32)), NPY),
        ("empty body", b"", NPY),
    ]


def raw_cases() -> list[Hostile]:
    data = good().tobytes()

    def raw(shape: str, dtype: str = "float32", body: bytes = data) -> dict[str, str]:
        return RAW | {"x-shape": shape, "x-dtype": dtype}

    nan = good()
    nan[0, 0, 0] = np.nan
    return [
        ("lying X-Shape: more", data, raw(f"2,4,{DIM}")),
        ("lying X-Shape: less", data, raw(f"1,3,{DIM}")),
        ("X-Shape with 70 dims", data[:4], raw(",".join(["1"] * 70))),
        ("X-Shape negative", data, raw(f"-1,4,{DIM}")),
        ("X-Shape huge", data, raw(f"99999999999999999999999,{DIM}")),
        ("X-Shape words", data, raw("a,b")),
        ("X-Shape empty part", data, raw(f"1,,{DIM}")),
        ("X-Shape missing", data, RAW | {"x-dtype": "float32"}),
        ("X-Dtype int8", data, raw(f"1,4,{DIM}", "int8")),
        ("X-Dtype float64", data, raw(f"1,2,{DIM}", "float64")),
        ("X-Dtype missing", data, RAW | {"x-shape": f"1,4,{DIM}"}),
        ("odd byte count", data[:-1], raw(f"1,4,{DIM}", "float16")),
        ("NaN", nan.tobytes(), raw(f"1,4,{DIM}")),
        ("fp16 Inf", np.full((4, DIM), np.inf, np.float16).tobytes(), raw(f"4,{DIM}", "float16")),
    ]


def json_cases() -> list[Hostile]:
    deep = b'{"inputs": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    nested = b'{"inputs": ' + b"[" * 60 + b"1" + b"]" * 60 + b"}"
    row = "[" + ",".join(["1"] * DIM) + "]"
    bodies = {
        "deep nesting": deep,
        "nesting 60": nested,
        "strings": b'{"inputs": [["a", "b"]]}',
        "nulls": b'{"inputs": [[null, 1]]}',
        "booleans": b'{"inputs": [[true, false]]}',
        "objects": b'{"inputs": [[{}, {}]]}',
        "ragged": f'{{"inputs": [{row}, [1]]}}'.encode(),
        "NaN literal": f'{{"inputs": [[NaN{",1" * (DIM - 1)}]]}}'.encode(),
        "overflows float32": f'{{"inputs": [[1e39{",1" * (DIM - 1)}]]}}'.encode(),
        "1e400": f'{{"inputs": [[1e400{",1" * (DIM - 1)}]]}}'.encode(),
        "huge integer": f'{{"inputs": [[{10**40}{",1" * (DIM - 1)}]]}}'.encode(),
        "no inputs": b'{"input": [[1]]}',
        "top-level array": f"[{row}]".encode(),
        "inputs a number": b'{"inputs": 3}',
        "inputs empty": b'{"inputs": []}',
        "inputs empty rows": b'{"inputs": [[]]}',
        "not JSON": b"\xff\xfe\x00garbage",
        "truncated": f'{{"inputs": [{row}'.encode(),
        "duplicate keys": f'{{"inputs": 1, "inputs": [{row}]}}'.encode(),
    }
    return [(name, body, JSON) for name, body in bodies.items()]


def header_cases() -> list[Hostile]:
    body = npy(good())
    cases: list[Hostile] = [
        (f"timeout {value}", body, NPY | {"x-request-timeout-ms": value})
        for value in ("nan", "inf", "-1", "0", "abc", "1e309", "1e300", "")
    ]
    cases += [
        (f"accept {value}", body, NPY | {"accept": value})
        for value in ("application/json;q=nan", "*/*;q=abc", "text/html", ";;;,,,", "application/x-npy;q=-1")
    ]
    cases += [
        (f"content-type {value!r}", body, {"content-type": value})
        for value in ("text/plain", "", "application/json; charset=utf-8", "application/x-npy; x=\x01", "*/*")
    ]
    cases.append(("no content-type", body, {}))
    return cases


def all_cases() -> list[Hostile]:
    return npy_cases() + raw_cases() + json_cases() + header_cases()
