"""The system shared-memory extension over REST, in-process (FakeEngine): Triton's endpoints, and infer with
inputs and outputs in shared memory giving /encode's numbers; every bad request a 4xx in the protocol's form."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from service.engine.fake import FakeEngine
from tests.service.batching.support import eventually
from tests.service.shm.conftest import MakeShm
from tests.service.shm.support import ShmObject, shm_infer_body
from tests.service.support import encode_json, metric, serving

pytestmark = pytest.mark.anyio
DIM = 8
INFER = "/v2/models/encoder/infer"
SHM = "/v2/systemsharedmemory"
ON = {"shared_memory": "system", "max_shared_memory_regions": 4, "max_shared_memory_bytes": 1 << 20}


def register_body(obj: ShmObject, offset: int = 0, byte_size: int | None = None) -> dict[str, Any]:
    return {"key": obj.key, "offset": offset, "byte_size": obj.size - offset if byte_size is None else byte_size}


async def test_register_status_unregister_in_tritons_shapes(make_shm: MakeShm) -> None:
    a, b = make_shm(4096), make_shm(8192)
    async with serving(FakeEngine(dim=DIM), **ON) as (client, _):
        assert (await client.get(f"{SHM}/status")).json() == []
        first = await client.post(f"{SHM}/region/a/register", json=register_body(a, 0, 1024))
        second = await client.post(f"{SHM}/region/with%2Fslash/register", json=register_body(b, 4096))
        assert (first.status_code, first.content, second.status_code) == (200, b"", 200)
        everything = (await client.get(f"{SHM}/status")).json()
        one = (await client.get(f"{SHM}/region/with%2Fslash/status")).json()
        assert (await client.post(f"{SHM}/region/a/unregister")).status_code == 200
        assert (await client.post(f"{SHM}/region/a/unregister")).status_code == 200  # idempotent, as Triton
        left = (await client.get(f"{SHM}/status")).json()
        assert (await client.post(f"{SHM}/unregister")).status_code == 200
        gone = await client.get(f"{SHM}/region/a/status")
        assert (await client.get(f"{SHM}/status")).json() == []
    assert everything == [
        {"name": "a", "key": a.key, "offset": 0, "byte_size": 1024},
        {"name": "with/slash", "key": b.key, "offset": 4096, "byte_size": 4096},
    ]
    assert one == [everything[1]] and left == [everything[1]]
    assert gone.status_code == 404 and gone.json() == {"error": "no shared-memory region 'a' is registered"}


async def test_infer_with_input_and_output_in_shared_memory_equals_encode(make_shm: MakeShm) -> None:
    x = np.random.default_rng(0).standard_normal((3, 5, DIM)).astype(np.float32)
    inputs, outputs = make_shm(x.nbytes), make_shm(4096 + x.nbytes)
    inputs.write(x)
    async with serving(FakeEngine(dim=DIM), **ON) as (client, _):
        await client.post(f"{SHM}/region/in/register", json=register_body(inputs))
        await client.post(f"{SHM}/region/out/register", json=register_body(outputs))
        response = await client.post(INFER, json=shm_infer_body(x, "in", "out", out_offset=4096))
        json_answer = await client.post(INFER, json=shm_infer_body(x, "in"))  # output as JSON data
        reference = await encode_json(client, x)
    assert response.status_code == 200, response.text
    (out,) = response.json()["outputs"]
    assert "data" not in out and out["shape"] == [3, 5, DIM]
    assert out["parameters"]["shared_memory_region"] == "out"
    np.testing.assert_array_equal(outputs.array(np.float32, x.shape, offset=4096), reference)
    assert json_answer.status_code == 200, json_answer.text
    np.testing.assert_array_equal(
        np.asarray(json_answer.json()["outputs"][0]["data"], np.float32).reshape(x.shape), reference
    )


async def test_bad_registrations_get_4xx_with_a_clear_message(make_shm: MakeShm, tmp_path: Path) -> None:
    obj = make_shm(4096)
    other_user = make_shm(64)
    os.chown(other_user.path, 65534, 65534) if os.geteuid() == 0 else None
    link = Path("/dev/shm") / f"{obj.name}-link"
    os.symlink(obj.path, link)
    cases: list[tuple[str, str, Any, int, str]] = [
        ("missing key", "r", {"key": "/encoder-test-missing", "byte_size": 8}, 404, "create it first"),
        ("path in key", "r", {"key": "/../etc/passwd", "byte_size": 8}, 422, "one name"),
        ("symlink", "r", {"key": "/" + link.name, "byte_size": 8}, 403, "symbolic link"),
        ("past the object", "r", register_body(obj, 0, 4097), 422, "past the end"),
        ("negative offset", "r", {"key": obj.key, "offset": -1, "byte_size": 8}, 422, "offset"),
        ("string size", "r", {"key": obj.key, "byte_size": "8"}, 422, "byte_size"),
        ("no key", "r", {"byte_size": 8}, 400, "JSON object"),
        ("not an object", "r", [1, 2], 400, "JSON object"),
        ("duplicate", "taken", register_body(obj), 409, "already registered"),
        ("too many bytes", "r", {"key": obj.key, "byte_size": (1 << 20) + 1}, 409, "limit"),
    ]
    if os.geteuid() == 0:
        cases.append(("other user", "r", {"key": other_user.key, "byte_size": 8}, 403, "belongs to uid 65534"))
    try:
        async with serving(FakeEngine(dim=DIM), **ON) as (client, _):
            await client.post(f"{SHM}/region/taken/register", json=register_body(obj))
            for what, name, body, status, message in cases:
                response = await client.post(f"{SHM}/region/{name}/register", json=body)
                assert response.status_code == status, (what, response.text)
                assert list(response.json()) == ["error"] and message in response.json()["error"], what
            malformed = await client.post(f"{SHM}/region/r/register", content=b"{")
            for i in range(3):  # the count limit (4): 'taken' and three more
                assert (
                    await client.post(f"{SHM}/region/r{i}/register", json=register_body(obj, 0, 8))
                ).status_code == 200
            fifth = await client.post(f"{SHM}/region/r9/register", json=register_body(obj, 0, 8))
            status = (await client.get(f"{SHM}/status")).json()
    finally:
        link.unlink()
    assert malformed.status_code == 400 and "not JSON" in malformed.json()["error"]
    assert fifth.status_code == 409 and "limit 4" in fifth.json()["error"]
    assert [s["name"] for s in status] == ["r0", "r1", "r2", "taken"]


async def test_bad_shared_memory_references_in_infer_get_4xx(make_shm: MakeShm) -> None:
    x = np.ones((2, DIM), np.float32)
    obj = make_shm(4096)
    params = {"shared_memory_region": "r", "shared_memory_byte_size": x.nbytes}

    def body(**override: Any) -> dict[str, Any]:
        item = {"name": "input", "datatype": "FP32", "shape": [2, DIM], "parameters": params | override}
        return {"inputs": [item]}

    cases = [
        ("unknown region", body(shared_memory_region="nope"), 404, "'nope' is registered"),
        ("size mismatch", body(shared_memory_byte_size=60), 422, "does not match shape"),
        ("past the region", body(shared_memory_offset=1000), 422, "past the end of shared-memory region 'r'"),
        ("output past the region", shm_infer_body(x, "r", "r", out_offset=1000), 422, "past the end"),
        ("output unknown", shm_infer_body(x, "r", "nope"), 404, "'nope' is registered"),
    ]
    async with serving(FakeEngine(dim=DIM), **ON) as (client, _):
        await client.post(f"{SHM}/region/r/register", json=register_body(obj, 0, 1024))
        for what, request, status, message in cases:
            response = await client.post(INFER, json=request)
            assert response.status_code == status, (what, response.text)
            assert message in response.json()["error"], what
        fine = await client.post(INFER, json=body())
        text = (await client.get("/metrics")).text
    assert fine.status_code == 200
    assert metric(text, "encoder_requests_total", outcome="invalid") == len(cases)


async def test_the_extension_is_off_by_default() -> None:
    async with serving(FakeEngine(dim=DIM)) as (client, _):
        responses = [
            await client.get(f"{SHM}/status"),
            await client.post(f"{SHM}/region/r/register", json={"key": "/x", "byte_size": 8}),
            await client.post(f"{SHM}/unregister"),
        ]
        extensions = (await client.get("/v2")).json()["extensions"]
    assert [r.status_code for r in responses] == [400, 400, 400]
    assert all("--shared-memory system" in r.json()["error"] for r in responses)
    assert "system_shared_memory" not in extensions


async def test_unregistering_while_a_request_computes_is_safe(make_shm: MakeShm) -> None:
    x = np.random.default_rng(1).standard_normal((2, DIM)).astype(np.float32)
    inputs, outputs = make_shm(4096), make_shm(4096)
    inputs.write(x)
    engine = FakeEngine(dim=DIM, delay_s=0.3)
    async with serving(engine, max_delay_ms=0, **ON) as (client, _):
        await client.post(f"{SHM}/region/in/register", json=register_body(inputs))
        await client.post(f"{SHM}/region/out/register", json=register_body(outputs))
        reference = await encode_json(client, x)
        busy = asyncio.ensure_future(client.post(INFER, json=shm_infer_body(x, "in", "out")))
        await eventually(lambda: len(engine.batches) == 2)  # the request is computing now
        assert (await client.post(f"{SHM}/unregister")).status_code == 200
        response = await busy
        after = await client.post(INFER, json=shm_infer_body(x, "in", "out"))
    assert response.status_code == 200, response.text
    np.testing.assert_array_equal(outputs.array(np.float32, x.shape), reference)  # written after the unregister
    assert after.status_code == 404
