"""The transports of the Open Inference Protocol loads (:mod:`loadtest.peers.oip_clients` says what they send and
how answers are checked) and where their tensors travel.

One client process keeps ``inflight`` requests going: greenlets over ``tritonclient.http`` (gevent, one
connection each) or coroutines over ``tritonclient.grpc.aio`` (one channel). A :class:`Placement` says where the
tensors go, the same for both: in the messages (binary tensors), in system shared memory (one input region,
written once, and one output region with a slot per request in flight, registered once: no tensor bytes on the
wire), or in CUDA shared memory (:mod:`loadtest.peers.cuda_clients`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from loadtest.peers.loadgen import ClientReport
from loadtest.peers.oip_clients import OipSpec, Recorder, declared_bytes, message


@dataclass
class Regions:
    """This process's shared-memory regions: the input (written once) and one output slot per request."""

    input_name: str
    output_name: str
    input_handle: Any
    output_handle: Any
    slot_bytes: int


@contextlib.contextmanager
def shm_regions(spec: OipSpec, slots: int, client: Any) -> Iterator[Regions]:
    """Create and register this process's regions (``client``: a sync tritonclient); always cleaned up."""
    import tritonclient.utils.shared_memory as shm

    tag = f"bench-{os.getpid()}-{time.monotonic_ns() % 1_000_000}"
    names = (f"{tag}-in", f"{tag}-out")
    in_handle = shm.create_shared_memory_region(names[0], f"/{names[0]}", spec.nbytes)
    out_handle = shm.create_shared_memory_region(names[1], f"/{names[1]}", spec.nbytes * slots)
    registered: list[str] = []
    try:
        shm.set_shared_memory_region(in_handle, [spec.inputs])
        for name, size in ((names[0], spec.nbytes), (names[1], spec.nbytes * slots)):
            client.register_system_shared_memory(name, f"/{name}", size)
            registered.append(name)
        yield Regions(names[0], names[1], in_handle, out_handle, spec.nbytes)
    finally:
        for name in registered:
            with contextlib.suppress(Exception):  # the server may be gone already; the regions still go below
                client.unregister_system_shared_memory(name)
        shm.destroy_shared_memory_region(in_handle)
        shm.destroy_shared_memory_region(out_handle)


def shm_answer(spec: OipSpec, regions: Regions, slot: int) -> np.ndarray:
    """The slot's answer: a view of the output region (no copy)."""
    import tritonclient.utils.shared_memory as shm

    offset = slot * regions.slot_bytes
    return shm.get_contents_as_numpy(regions.output_handle, spec.inputs.dtype, spec.inputs.shape, offset)


@dataclass
class Placement:
    """Where a load's tensors travel, the same over HTTP and gRPC: in the messages (the defaults), or in regions
    each request names. ``output`` gives a slot's output region and offset; ``poison`` spoils the answer a slot
    holds before its next request (an answer the server never wrote cannot pass as the previous, still correct
    one); ``answer`` judges the answer in a slot's region, given the size the server declared."""

    input_region: str | None = None
    output: Callable[[int], tuple[str, int]] | None = None
    poison: Callable[[int], None] = lambda slot: None
    answer: Callable[[int, int | None], str | None] | None = None


# A load's placement: from the spec, its recorder, the number of slots, a synchronous client to register regions
# through (made on first use) and the stack that undoes the registrations.
Placer = Callable[[OipSpec, Recorder, int, Callable[[], Any], contextlib.ExitStack], Placement]


def in_messages(
    spec: OipSpec, rec: Recorder, slots: int, control: Callable[[], Any], stack: contextlib.ExitStack
) -> Placement:
    """Binary tensors in every request and answer."""
    return Placement()


def in_system_regions(
    spec: OipSpec, rec: Recorder, slots: int, control: Callable[[], Any], stack: contextlib.ExitStack
) -> Placement:
    """System shared memory: one input region, one output region with a slot per request in flight."""
    regions = stack.enter_context(shm_regions(spec, slots, control()))

    def poison(slot: int) -> None:
        shm_answer(spec, regions, slot)[:, rec.check.rows, :] = np.nan

    def answer(slot: int, declared: int | None) -> str | None:
        return rec.check.size(declared) or rec.check(shm_answer(spec, regions, slot))

    return Placement(regions.input_name, lambda slot: (regions.output_name, slot * spec.nbytes), poison, answer)


def _request(
    client_module: Any, spec: OipSpec, placement: Placement, **binary: bool
) -> tuple[Any, Callable[[int], Any]]:
    """The input every request sends, and each slot's requested output, as ``placement`` places them."""
    tensor = client_module.InferInput("input", list(spec.inputs.shape), spec.datatype)
    if placement.input_region is None:
        tensor.set_data_from_numpy(spec.inputs, **binary)
    else:
        tensor.set_shared_memory(placement.input_region, spec.nbytes)

    def output(slot: int) -> Any:
        wanted = client_module.InferRequestedOutput("output", **binary)
        if placement.output is not None:
            region, offset = placement.output(slot)
            wanted.set_shared_memory(region, spec.nbytes, offset=offset)
        return wanted

    return tensor, output


def _http_problem(spec: OipSpec, rec: Recorder, result: Any, placement: Placement, slot: int) -> str | None:
    output = result.get_response()["outputs"][0]
    params = output.get("parameters", {})
    if placement.answer is None:
        return rec.check.size(params.get("binary_data_size")) or rec.check(result.as_numpy("output"))
    declared = declared_bytes(spec, output["datatype"], output["shape"], params.get("shared_memory_byte_size"))
    return placement.answer(slot, declared)


def http_loop(spec: OipSpec, inflight: int, window: tuple[float, float], place: Placer) -> ClientReport:
    """Greenlets over ``tritonclient.http``, one connection each."""
    import gevent
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    rec = Recorder(spec, window)
    client = httpclient.InferenceServerClient(
        spec.http_url, concurrency=inflight, connection_timeout=30.0, network_timeout=120.0
    )
    with contextlib.ExitStack() as stack:
        stack.callback(client.close)
        placement = place(spec, rec, inflight, lambda: client, stack)
        tensor, output_for = _request(httpclient, spec, placement, binary_data=True)

        def one(slot: int) -> None:
            output = output_for(slot)
            while time.time() < rec.stop:
                placement.poison(slot)
                sent = time.time()
                try:
                    result = client.infer(spec.model, [tensor], outputs=[output])
                except (InferenceServerException, OSError) as exc:
                    rec.failed(exc)
                    continue
                rec.done(sent, _http_problem(spec, rec, result, placement, slot))

        gevent.joinall([gevent.spawn(one, slot) for slot in range(inflight)], raise_error=True)
    return rec.finish()


def _grpc_problem(spec: OipSpec, rec: Recorder, result: Any, placement: Placement, slot: int) -> str | None:
    response = result.get_response()
    if placement.answer is None:
        raw = response.raw_output_contents
        return rec.check.size(len(raw[0]) if raw else 0) or rec.check(result.as_numpy("output"))
    output = response.outputs[0]
    param = output.parameters.get("shared_memory_byte_size")
    declared = declared_bytes(spec, output.datatype, list(output.shape), param.int64_param if param else None)
    return placement.answer(slot, declared)


async def _grpc_loop(spec: OipSpec, inflight: int, window: tuple[float, float], place: Placer) -> ClientReport:
    import tritonclient.grpc as grpcclient
    import tritonclient.grpc.aio as aioclient
    from tritonclient.utils import InferenceServerException

    rec = Recorder(spec, window)
    client = aioclient.InferenceServerClient(spec.grpc_url)
    with contextlib.ExitStack() as stack:
        controls: list[Any] = []

        def control() -> Any:  # registrations go through a synchronous client, made only for them
            if not controls:
                controls.append(grpcclient.InferenceServerClient(spec.grpc_url))
                stack.callback(controls[0].close)
            return controls[0]

        placement = place(spec, rec, inflight, control, stack)
        tensor, output_for = _request(grpcclient, spec, placement)

        async def one(slot: int) -> None:
            output = output_for(slot)
            while time.time() < rec.stop:
                placement.poison(slot)
                sent = time.time()
                try:
                    result = await client.infer(spec.model, [tensor], outputs=[output], client_timeout=120.0)
                except InferenceServerException as exc:
                    rec.failed(exc)
                    continue
                rec.done(sent, _grpc_problem(spec, rec, result, placement, slot))

        try:
            await asyncio.gather(*(one(slot) for slot in range(inflight)))
        finally:
            await client.close()
    return rec.finish()


def grpc_loop(spec: OipSpec, inflight: int, window: tuple[float, float], place: Placer) -> ClientReport:
    """Coroutines over ``tritonclient.grpc.aio``, one channel."""
    return asyncio.run(_grpc_loop(spec, inflight, window, place))


def _in_cuda_regions(*args: Any) -> Placement:
    """CUDA shared memory (imported where it runs: it needs cuda-python on a GPU, or the fake layer)."""
    from loadtest.peers.cuda_clients import in_cuda_regions

    return in_cuda_regions(*args)


# Each load: its transport, and where its tensors travel.
LOADS: dict[str, tuple[Callable[[OipSpec, int, tuple[float, float], Placer], ClientReport], Placer]] = {
    "oip-http": (http_loop, in_messages),
    "grpc": (grpc_loop, in_messages),
    "shm-http": (http_loop, in_system_regions),
    "shm-grpc": (grpc_loop, in_system_regions),
    "cuda-shm": (http_loop, _in_cuda_regions),
    "cuda-shm-grpc": (grpc_loop, _in_cuda_regions),
}


def oip_client_main(spec: OipSpec, inflight: int, window: tuple[float, float], out: Any) -> None:
    """A client process's body (``loadgen.drive``'s ``client``): run the loop, hand the report back.

    A client that cannot even start (a refused registration, say) reports that as its error: the point shows
    it and the benchmark goes on to the next one.
    """
    try:
        loop, place = LOADS[spec.protocol]
        report = loop(spec, inflight, window, place)
    except Exception as exc:
        report = ClientReport()
        report.error(f"client failed: {message(exc)}")
    out.put(report)
