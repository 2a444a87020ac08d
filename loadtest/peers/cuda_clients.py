"""Where the CUDA shared-memory loads of the service benchmark put their tensors (``cuda-shm`` and ``cuda-shm-grpc``
run over the HTTP and gRPC loops of :mod:`loadtest.peers.oip_clients`): in GPU memory the client allocated.

Each client process allocates one input region (the fixed input, written once) and one output region per
request in flight, with ``tritonclient.utils.cuda_shared_memory`` (cuda-python), registers them once and names
them in every request: no tensor bytes on the wire. Every answer is checked against the reference as the other
OIP loads check theirs (:class:`loadtest.peers.oip_clients.AnswerCheck`), reading from the device only what is
compared (see :mod:`loadtest.peers.cuda_regions`).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from loadtest.peers.cuda_regions import ClientRegion, allocate
from loadtest.peers.oip_clients import OipSpec, Recorder
from loadtest.peers.oip_loops import Placement

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


def in_cuda_regions(
    spec: OipSpec, rec: Recorder, slots: int, control: Callable[[], Any], stack: contextlib.ExitStack
) -> Placement:
    """The load's placement (see :class:`loadtest.peers.oip_clients.Placement`): the input region, and one output
    region per slot, poisoned on the checked rows before each request whose values are checked (every
    ``spec.cuda_check_every``-th of the slot; the others' sizes only, counted as ``values_unchecked``)."""
    inp, outs = stack.enter_context(cuda_regions(spec, slots, control()))
    sent = [0] * slots

    def checked(slot: int) -> bool:
        return spec.cuda_check_every <= 1 or sent[slot] % spec.cuda_check_every == 1

    def poison(slot: int) -> None:
        sent[slot] += 1
        if checked(slot):
            outs[slot].poison_rows(spec.inputs.dtype, spec.inputs.shape, rec.check.rows)

    def answer(slot: int, declared: int | None) -> str | None:
        if checked(slot):
            return check(spec, rec, outs[slot], declared)
        rec.check.counts["values_unchecked"] = rec.check.counts.get("values_unchecked", 0) + 1
        return rec.check.size(declared)

    return Placement(inp.name, lambda slot: (outs[slot].name, 0), poison, answer)
