"""The system shared-memory RPCs and shared-memory inference over gRPC, with tritonclient's own shm utilities
against the real registry (in-process app, FakeEngine)."""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc.aio as tca
import tritonclient.utils.shared_memory as tshm
from tritonclient.grpc import InferInput

from service.engine.fake import fake_output
from service.shm import SystemSharedMemory
from tests.service.shm.support import grpc_shm_tensors
from tests.service.support import grpc_error, grpc_serving

pytestmark = pytest.mark.anyio
DIM = 8


@contextlib.asynccontextmanager
async def shm_service(registry_dir: Path) -> AsyncIterator[tca.InferenceServerClient]:
    """The app with gRPC and the system shared-memory extension on, its registry in ``registry_dir``."""
    limits = {"max_shared_memory_regions": 4, "max_shared_memory_bytes": 1 << 20}
    shm = {"shared_memory": "system", "shared_memory_dir": str(registry_dir), **limits}
    async with grpc_serving(**shm) as served:
        assert isinstance(served.app.state.service.shared_memory, SystemSharedMemory)
        yield served.client


@contextlib.contextmanager
def region(size: int) -> Iterator[tuple[Any, str]]:
    key = f"/encoder-grpc-test-{secrets.token_hex(6)}"
    handle = tshm.create_shared_memory_region(key[1:], key, size)
    try:
        yield handle, key
    finally:
        tshm.destroy_shared_memory_region(handle)


async def test_inference_through_shared_memory_in_and_out(tmp_path: Path) -> None:
    x = np.random.default_rng(0).standard_normal((4, 5, DIM)).astype(np.float32)
    async with shm_service(tmp_path) as client:
        with region(x.nbytes) as (inp, in_key), region(x.nbytes + 64) as (out, out_key):
            tshm.set_shared_memory_region(inp, [x])
            await client.register_system_shared_memory("in", in_key, x.nbytes)
            await client.register_system_shared_memory("out", out_key, x.nbytes + 64)
            status = await client.get_system_shared_memory_status(as_json=True)
            assert {r["name"] for r in status["regions"].values()} == {"in", "out"}
            assert status["regions"]["in"]["key"] == in_key and status["regions"]["in"]["byte_size"] == str(x.nbytes)
            tensors, wanted = grpc_shm_tensors(x, "in", "out", out_offset=64)
            result = await client.infer("encoder", tensors, outputs=wanted)
            assert result.get_output("output").shape == list(x.shape)
            y = tshm.get_contents_as_numpy(out, np.float32, [x.nbytes // 4 + 16])[16:].reshape(x.shape)
            np.testing.assert_allclose(y, fake_output(x), rtol=1e-6)
            await client.unregister_system_shared_memory("in")
            assert list((await client.get_system_shared_memory_status(as_json=True))["regions"]) == ["out"]
            await client.unregister_system_shared_memory()  # every region
            assert (await client.get_system_shared_memory_status(as_json=True)).get("regions", {}) == {}


async def test_bad_shared_memory_calls_get_their_own_status(tmp_path: Path) -> None:
    async with shm_service(tmp_path) as client:
        missing = await grpc_error(client.register_system_shared_memory("r", "/encoder-no-such-key", 64))
        assert missing == "StatusCode.NOT_FOUND"  # a real Triton answers INTERNAL here
        with region(256) as (_, key):
            link_key = f"/encoder-grpc-link-{secrets.token_hex(4)}"
            Path("/dev/shm" + link_key).symlink_to("/dev/shm" + key)
            try:
                denied = await grpc_error(client.register_system_shared_memory("l", link_key, 64))
            finally:
                Path("/dev/shm" + link_key).unlink()
        assert denied == "StatusCode.PERMISSION_DENIED"  # a symbolic link is not followed
        with region(256) as (_, key):
            await client.register_system_shared_memory("r", key, 256)
            assert await grpc_error(client.register_system_shared_memory("r", key, 256)) == "StatusCode.ALREADY_EXISTS"
            past_end = await grpc_error(client.register_system_shared_memory("r2", key, 512))
            assert past_end == "StatusCode.INVALID_ARGUMENT"
            too_big = await grpc_error(client.register_system_shared_memory("big", key, 2 << 20))
            assert too_big == "StatusCode.RESOURCE_EXHAUSTED"  # over max_bytes
            tensor = InferInput("input", [2, DIM], "FP32")
            tensor.set_shared_memory("r", 2 * DIM * 4, offset=200)  # runs past the 256-byte region
            assert await grpc_error(client.infer("encoder", [tensor])) == "StatusCode.INVALID_ARGUMENT"
            tensor.set_shared_memory("nope", 2 * DIM * 4)
            assert await grpc_error(client.infer("encoder", [tensor])) == "StatusCode.NOT_FOUND"
            unknown = await grpc_error(client.get_system_shared_memory_status("nope"))
            assert unknown == "StatusCode.NOT_FOUND"
            await client.unregister_system_shared_memory()


async def test_cuda_shared_memory_is_a_clear_failed_precondition(tmp_path: Path) -> None:
    async with shm_service(tmp_path) as client:
        code = await grpc_error(client.get_cuda_shared_memory_status())
    assert code == str(grpc.StatusCode.FAILED_PRECONDITION)
