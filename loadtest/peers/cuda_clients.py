"""CUDA shared-memory loads of the service benchmark (``cuda-shm`` over tritonclient.http, ``cuda-shm-grpc`` over
tritonclient.grpc.aio): the tensors stay in GPU memory the client allocated.

Each client process allocates one input region (the fixed input, written once) and one output region per
request in flight, with ``tritonclient.utils.cuda_shared_memory`` (cuda-python), registers them once and names
them in every request: no tensor bytes on the wire. Every answer is checked against the reference as the other
OIP loads check theirs (:class:`loadtest.peers.oip_clients.AnswerCheck`), reading from the device only what is
compared (see :mod:`loadtest.peers.cuda_regions`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Iterator
from typing import Any

import numpy as np

from loadtest.peers.cuda_regions import ClientRegion, allocate
from loadtest.peers.loadgen import ClientReport
from loadtest.peers.oip_clients import OipSpec, Recorder

CUDA_PROTOCOLS = ("cuda-shm", "cuda-shm-grpc")


@contextlib.contextmanager
def cuda_regions(spec: OipSpec, slots: int, client: Any) -> Iterator[tuple[ClientRegion, list[ClientRegion]]]:
    """This process's input region and one output region per slot, registered through ``client`` (sync)."""
    tag = f"bench-cuda-{os.getpid()}-{time.monotonic_ns() % 1_000_000}"
    made: list[ClientRegion] = []
    registered: list[str] = []
    try:
        for i in range(slots + 1):
            made.append(allocate(f"{tag}-{i}", spec.nbytes, spec.cuda_device, fake=spec.cuda_fake))
        made[0].write(spec.inputs)
        for region in made:
            client.register_cuda_shared_memory(region.name, region.raw_handle, region.device, region.size)
            registered.append(region.name)
        yield made[0], made[1:]
    finally:
        for name in registered:
            with contextlib.suppress(Exception):  # the server may be gone already; the memory is freed below
                client.unregister_cuda_shared_memory(name)
        for region in made:
            region.free()


def check(spec: OipSpec, rec: Recorder, region: ClientRegion, declared: int | None) -> str | None:
    """The answer in ``region``: its declared size, then values (all of them now and then, else three rows)."""
    problem = rec.check.size(declared)
    if problem:
        return problem
    shape, dtype = spec.inputs.shape, spec.inputs.dtype
    checker = rec.check
    checker.answers += 1
    full = spec.full_every <= 1 or checker.answers % spec.full_every == 1
    if full:
        got, want = region.read(dtype, shape), spec.expected
    else:
        got, want = region.read_rows(dtype, shape, checker.rows), checker.expected_rows
    checker.counts["values_full" if full else "values_rows"] += 1
    return checker.compare(got.astype(np.float32), want)


def http_loop(spec: OipSpec, inflight: int, window: tuple[float, float]) -> ClientReport:
    import gevent
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    rec = Recorder(spec, window)
    client = httpclient.InferenceServerClient(
        spec.http_url, concurrency=inflight, connection_timeout=30.0, network_timeout=120.0
    )
    with contextlib.ExitStack() as stack:
        stack.callback(client.close)
        inp, outs = stack.enter_context(cuda_regions(spec, inflight, client))
        inputs = [httpclient.InferInput("input", list(spec.inputs.shape), spec.datatype)]
        inputs[0].set_shared_memory(inp.name, spec.nbytes)

        def one(slot: int) -> None:
            output = httpclient.InferRequestedOutput("output", binary_data=True)
            output.set_shared_memory(outs[slot].name, spec.nbytes)
            while time.time() < rec.stop:
                outs[slot].poison_rows(spec.inputs.dtype, spec.inputs.shape, rec.check.rows)
                sent = time.time()
                try:
                    result = client.infer(spec.model, inputs, outputs=[output])
                except (InferenceServerException, OSError) as exc:
                    rec.failed(exc)
                    continue
                params = result.get_response()["outputs"][0].get("parameters", {})
                rec.done(sent, check(spec, rec, outs[slot], params.get("shared_memory_byte_size")))

        gevent.joinall([gevent.spawn(one, slot) for slot in range(inflight)], raise_error=True)
    return rec.finish()


async def _grpc_loop(spec: OipSpec, inflight: int, window: tuple[float, float]) -> ClientReport:
    import tritonclient.grpc as grpcclient
    import tritonclient.grpc.aio as aioclient
    from tritonclient.utils import InferenceServerException

    rec = Recorder(spec, window)
    client = aioclient.InferenceServerClient(spec.grpc_url)
    with contextlib.ExitStack() as stack:
        control = grpcclient.InferenceServerClient(spec.grpc_url)
        stack.callback(control.close)
        inp, outs = stack.enter_context(cuda_regions(spec, inflight, control))
        inputs = [grpcclient.InferInput("input", list(spec.inputs.shape), spec.datatype)]
        inputs[0].set_shared_memory(inp.name, spec.nbytes)

        async def one(slot: int) -> None:
            output = grpcclient.InferRequestedOutput("output")
            output.set_shared_memory(outs[slot].name, spec.nbytes)
            while time.time() < rec.stop:
                outs[slot].poison_rows(spec.inputs.dtype, spec.inputs.shape, rec.check.rows)
                sent = time.time()
                try:
                    result = await client.infer(spec.model, inputs, outputs=[output], client_timeout=120.0)
                except InferenceServerException as exc:
                    rec.failed(exc)
                    continue
                param = result.get_response().outputs[0].parameters.get("shared_memory_byte_size")
                rec.done(sent, check(spec, rec, outs[slot], param.int64_param if param else None))

        try:
            await asyncio.gather(*(one(slot) for slot in range(inflight)))
        finally:
            await client.close()
    return rec.finish()


def grpc_loop(spec: OipSpec, inflight: int, window: tuple[float, float]) -> ClientReport:
    return asyncio.run(_grpc_loop(spec, inflight, window))
