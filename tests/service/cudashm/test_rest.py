"""The CUDA shared-memory extension over REST, in-process (FakeEngine, fake device layer): Triton's endpoints and
bodies, infer reading the input from a CUDA region and writing the answer into one (also mixed with system
shared memory) with /encode's numbers, and every bad request a 4xx in the protocol's form."""

from __future__ import annotations

import base64
from typing import Any

import numpy as np
import orjson
import pytest

from service.cudashm.fake import FakeCudaRegion
from service.engine.fake import FakeEngine, fake_output
from tests.service.cudashm.conftest import MakeRegion
from tests.service.shm.conftest import MakeShm
from tests.service.shm.support import shm_infer_body
from tests.service.support import encode_json, serving

pytestmark = pytest.mark.anyio
DIM = 8
INFER = "/v2/models/encoder/infer"
CUDA = "/v2/cudasharedmemory"
ON = {
    "shared_memory": "system,cuda",
    "cuda_memory": "fake",
    "devices": "0",
    "max_shared_memory_regions": 4,
    "max_shared_memory_bytes": 1 << 20,
}


def register_body(region: FakeCudaRegion, byte_size: int | None = None, device_id: int = 0) -> dict[str, Any]:
    """What tritonclient.http's register_cuda_shared_memory sends."""
    b64 = base64.b64encode(region.handle).decode()
    return {"raw_handle": {"b64": b64}, "device_id": device_id, "byte_size": byte_size or region.size}


async def test_metadata_names_the_extension() -> None:
    async with serving(FakeEngine(dim=DIM), **ON) as (client, _):
        assert (await client.get("/v2")).json()["extensions"][-2:] == ["system_shared_memory", "cuda_shared_memory"]
    async with serving(FakeEngine(dim=DIM), shared_memory="cuda", cuda_memory="fake", devices="0") as (client, _):
        assert "cuda_shared_memory" in (extensions := (await client.get("/v2")).json()["extensions"])
        assert "system_shared_memory" not in extensions
    async with serving(FakeEngine(dim=DIM)) as (client, _):
        assert "cuda_shared_memory" not in (await client.get("/v2")).json()["extensions"]
        off = await client.post(f"{CUDA}/region/a/register", json={})
        assert off.status_code == 400 and "--shared-memory cuda" in off.json()["error"]


async def test_register_status_infer_in_and_out_unregister(make_region: MakeRegion) -> None:
    x = np.random.default_rng(1).standard_normal((3, 5, DIM)).astype(np.float32)
    inputs, outputs = make_region(x.nbytes + 256), make_region(x.nbytes + 512)
    inputs.write(x, offset=256)
    async with serving(FakeEngine(dim=DIM), **ON) as (client, app):
        assert (await client.get(f"{CUDA}/status")).json() == []
        first = await client.post(f"{CUDA}/region/in/register", json=register_body(inputs))
        second = await client.post(f"{CUDA}/region/out%2Fslash/register", json=register_body(outputs))
        assert (first.status_code, first.content, second.status_code) == (200, b"", 200)
        status = (await client.get(f"{CUDA}/status")).json()
        assert status == [
            {"name": "in", "device_id": 0, "byte_size": x.nbytes + 256},
            {"name": "out/slash", "device_id": 0, "byte_size": x.nbytes + 512},
        ]
        assert (await client.get(f"{CUDA}/region/in/status")).json() == status[:1]

        answer = await client.post(INFER, json=shm_infer_body(x, "in", "out/slash", offset=256, out_offset=512))
        assert answer.status_code == 200, answer.text
        out = answer.json()["outputs"][0]
        assert out["parameters"] == {
            "shared_memory_region": "out/slash",
            "shared_memory_offset": 512,
            "shared_memory_byte_size": x.nbytes,
        }
        assert "data" not in out and out["shape"] == list(x.shape)
        written = outputs.array(np.float32, x.shape, offset=512).copy()
        np.testing.assert_array_equal(written, await encode_json(client, x))  # the same numbers as /encode
        np.testing.assert_allclose(written, fake_output(x), rtol=1e-6)

        # Input from the CUDA region, the answer in the body (binary), FP16 too.
        half = x.astype(np.float16)
        inputs.write(half, offset=0)
        answer = await client.post(INFER, json=shm_infer_body(half, "in", offset=0, datatype="FP16"))
        assert answer.status_code == 200, answer.text
        np.testing.assert_array_equal(
            np.asarray(answer.json()["outputs"][0]["data"], np.float16).reshape(x.shape),
            fake_output(half.astype(np.float32)).astype(np.float16),
        )

        assert (await client.post(f"{CUDA}/region/in/unregister")).status_code == 200
        assert [r["name"] for r in (await client.get(f"{CUDA}/status")).json()] == ["out/slash"]
        assert (await client.post(f"{CUDA}/unregister")).status_code == 200
        assert (await client.get(f"{CUDA}/status")).json() == []
        assert app.state.service.cuda_shared_memory.device.opened == 0


async def test_a_request_can_mix_system_and_cuda_regions(make_region: MakeRegion, make_shm: MakeShm) -> None:
    x = np.random.default_rng(2).standard_normal((2, 4, DIM)).astype(np.float32)
    cuda_region, system = make_region(x.nbytes), make_shm(x.nbytes)
    system.write(x)
    async with serving(FakeEngine(dim=DIM), **ON) as (client, _):
        sys_body = {"key": system.key, "offset": 0, "byte_size": x.nbytes}
        assert (await client.post("/v2/systemsharedmemory/region/sys/register", json=sys_body)).status_code == 200
        assert (await client.post(f"{CUDA}/region/gpu/register", json=register_body(cuda_region))).status_code == 200
        answer = await client.post(INFER, json=shm_infer_body(x, "sys", "gpu"))
        assert answer.status_code == 200, answer.text
        np.testing.assert_array_equal(cuda_region.array(np.float32, x.shape), await encode_json(client, x))
        # and the other way round
        cuda_region.write(x * 2)
        answer = await client.post(INFER, json=shm_infer_body(x, "gpu", "sys"))
        assert answer.status_code == 200, answer.text
        np.testing.assert_array_equal(system.array(np.float32, x.shape), await encode_json(client, x * 2))
        # one namespace for both kinds, as in Triton
        taken = await client.post(f"{CUDA}/region/sys/register", json=register_body(cuda_region))
        assert taken.status_code == 409 and "already registered" in taken.json()["error"]
        taken = await client.post("/v2/systemsharedmemory/region/gpu/register", json=sys_body)
        assert taken.status_code == 409 and "already registered" in taken.json()["error"]


async def test_every_bad_request_is_a_4xx_with_a_message(make_region: MakeRegion) -> None:
    x = np.ones((2, 4, DIM), np.float32)
    region, other_device, stale = make_region(x.nbytes), make_region(64, device=1), make_region(64)
    stale.free()
    good = register_body(region)
    cases: list[tuple[str, str, Any, int, str]] = [
        ("not json", "r", b"{", 400, "not JSON"),
        ("no handle", "r", {"device_id": 0, "byte_size": 8}, 400, "raw_handle"),
        ("handle not b64 object", "r", {**good, "raw_handle": "abc"}, 400, '{"b64"'),
        ("bad base64", "r", {**good, "raw_handle": {"b64": "%%%"}}, 422, "not base64"),
        ("short handle", "r", {**good, "raw_handle": {"b64": base64.b64encode(b"x" * 63).decode()}}, 422, "64 bytes"),
        (
            "not a handle",
            "r",
            {**good, "raw_handle": {"b64": base64.b64encode(b"x" * 64).decode()}},
            422,
            "not a handle",
        ),
        ("stale handle", "r", register_body(stale), 422, "stale"),
        ("device not served", "r", {**good, "device_id": 1}, 422, "not a device this service serves"),
        ("handle of another device", "r", register_body(other_device), 422, "is for device 1 (not served)"),
        ("zero size", "r", {**good, "byte_size": 0}, 422, "at least 1"),
        ("negative size", "r", {**good, "byte_size": -1}, 422, "at least 1"),
        ("past the allocation", "r", {**good, "byte_size": x.nbytes + 1}, 422, "larger than the CUDA allocation"),
        ("over the byte limit", "r", {**good, "byte_size": 2 << 20}, 409, "over the limit"),
    ]
    async with serving(FakeEngine(dim=DIM), **ON) as (client, app):
        for what, name, body, status, message in cases:
            content = body if isinstance(body, bytes) else orjson.dumps(body)
            answer = await client.post(f"{CUDA}/region/{name}/register", content=content)
            assert (answer.status_code, message in answer.json()["error"]) == (status, True), (what, answer.text)
        assert (await client.get(f"{CUDA}/status")).json() == []
        assert app.state.service.cuda_shared_memory.device.opened == 0

        assert (await client.post(f"{CUDA}/region/r/register", json=good)).status_code == 200
        again = await client.post(f"{CUDA}/region/r/register", json=good)
        assert again.status_code == 409 and "already registered" in again.json()["error"]
        unknown = await client.get(f"{CUDA}/region/nothing/status")
        assert unknown.status_code == 404 and "nothing" in unknown.json()["error"]
        assert (await client.post(f"{CUDA}/region/nothing/unregister")).status_code == 200  # as in Triton

        infer_cases = [
            ("unknown region", shm_infer_body(x, "nothing"), 404, "no shared-memory region 'nothing'"),
            ("past the region", shm_infer_body(x, "r", offset=4), 422, "go past the end"),
            ("output past the region", shm_infer_body(x, "r", "r", out_offset=8), 422, "go past the end"),
        ]
        wrong_size = shm_infer_body(x, "r")
        wrong_size["inputs"][0]["parameters"]["shared_memory_byte_size"] = x.nbytes - 4
        infer_cases.append(("size not the tensor's", wrong_size, 422, "does not match shape"))
        for what, body, status, message in infer_cases:
            answer = await client.post(INFER, json=body)
            assert (answer.status_code, message in answer.json()["error"]) == (status, True), (what, answer.text)
        assert app.state.service.cuda_shared_memory.device.opened == 1  # the registered region, nothing more
