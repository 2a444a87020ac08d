"""The CUDA shared-memory RPCs and inference through CUDA regions over gRPC, with tritonclient.grpc's own calls
(in-process app, FakeEngine, fake device layer): the codes each bad call gets."""

from __future__ import annotations

import base64
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc.aio as tca
from tritonclient.grpc import InferInput

from service.engine.fake import FakeEngine, fake_output
from tests.service.cudashm.conftest import MakeRegion
from tests.service.shm.support import grpc_shm_tensors
from tests.service.support import grpc_error, grpc_serving

pytestmark = pytest.mark.anyio
DIM = 8


@contextlib.asynccontextmanager
async def cuda_service() -> AsyncIterator[tuple[tca.InferenceServerClient, Any]]:
    on = {"shared_memory": "cuda", "cuda_memory": "fake", "devices": "0", "max_shared_memory_bytes": 1 << 20}
    async with grpc_serving(FakeEngine(dim=DIM), **on) as served:
        yield served.client, served.app


def b64(handle: bytes) -> bytes:
    """What tritonclient.utils.cuda_shared_memory.get_raw_handle gives (the client decodes it for gRPC)."""
    return base64.b64encode(handle)


async def test_register_status_infer_unregister(make_region: MakeRegion) -> None:
    x = np.random.default_rng(0).standard_normal((4, 5, DIM)).astype(np.float32)
    inputs, outputs = make_region(x.nbytes), make_region(x.nbytes + 64)
    inputs.write(x)
    async with cuda_service() as (client, app):
        metadata = await client.get_server_metadata(as_json=True)
        assert "cuda_shared_memory" in metadata["extensions"]
        await client.register_cuda_shared_memory("in", b64(inputs.handle), 0, x.nbytes)
        await client.register_cuda_shared_memory("out", b64(outputs.handle), 0, x.nbytes + 64)
        status = await client.get_cuda_shared_memory_status(as_json=True)
        assert status["regions"]["in"] == {"name": "in", "byte_size": str(x.nbytes)}  # device_id 0: the default
        assert status["regions"]["out"]["byte_size"] == str(x.nbytes + 64)
        one = await client.get_cuda_shared_memory_status("out", as_json=True)
        assert list(one["regions"]) == ["out"]

        tensors, wanted = grpc_shm_tensors(x, "in", "out", out_offset=64)
        result = await client.infer("encoder", tensors, outputs=wanted)
        assert result.get_output("output").shape == list(x.shape)
        np.testing.assert_allclose(outputs.array(np.float32, x.shape, offset=64), fake_output(x), rtol=1e-6)

        await client.unregister_cuda_shared_memory("in")
        assert list((await client.get_cuda_shared_memory_status(as_json=True))["regions"]) == ["out"]
        await client.unregister_cuda_shared_memory()
        assert (await client.get_cuda_shared_memory_status(as_json=True)).get("regions", {}) == {}
        assert app.state.service.cuda_shared_memory.device.opened == 0


async def test_bad_calls_get_their_own_status(make_region: MakeRegion) -> None:
    region, on_one, stale = make_region(256), make_region(256, device=1), make_region(256)
    stale.free()
    invalid = "StatusCode.INVALID_ARGUMENT"
    async with cuda_service() as (client, app):
        register = client.register_cuda_shared_memory
        assert await grpc_error(register("r", base64.b64encode(b"x" * 63), 0, 64)) == invalid  # not 64 bytes
        assert await grpc_error(register("r", b64(stale.handle), 0, 64)) == invalid  # stale
        assert await grpc_error(register("r", b64(region.handle), 3, 64)) == invalid  # device not served
        assert await grpc_error(register("r", b64(on_one.handle), 0, 64)) == invalid  # another device's memory
        assert await grpc_error(register("r", b64(region.handle), 0, 0)) == invalid  # empty
        assert await grpc_error(register("r", b64(region.handle), 0, 257)) == invalid  # past the allocation
        assert await grpc_error(register("r", b64(region.handle), 0, 2 << 20)) == "StatusCode.RESOURCE_EXHAUSTED"
        await register("r", b64(region.handle), 0, 256)
        assert await grpc_error(register("r", b64(region.handle), 0, 256)) == "StatusCode.ALREADY_EXISTS"
        assert await grpc_error(client.get_cuda_shared_memory_status("nope")) == "StatusCode.NOT_FOUND"

        tensor = InferInput("input", [2, DIM], "FP32")
        tensor.set_shared_memory("r", 2 * DIM * 4, offset=200)  # runs past the 256-byte region
        assert await grpc_error(client.infer("encoder", [tensor])) == invalid
        tensor.set_shared_memory("r", 2 * DIM * 4 - 4)  # not the tensor's size
        assert await grpc_error(client.infer("encoder", [tensor])) == invalid
        tensor.set_shared_memory("nope", 2 * DIM * 4)
        assert await grpc_error(client.infer("encoder", [tensor])) == "StatusCode.NOT_FOUND"
        await client.unregister_cuda_shared_memory()
        assert app.state.service.cuda_shared_memory.device.opened == 0
