"""CUDA shared memory in the Open Inference Protocol's data plane (issue #13): which regions a request names,
and the device-to-device path.

A request whose input and output both lie in CUDA regions of one GPU, in the engine's precision, becomes a
:class:`~service.engine.device_jobs.DeviceJob` and goes through the batcher like every other request (deadline,
admission, queue metrics, batches shared with other requests); the GPU's engine process copies its rows device
to device (no host copy, and this worker never reads them). Where that path does not apply (an engine in this
process, another datatype, two GPUs, a region the engine process refused) the caller copies through the host.
"""

from __future__ import annotations

import contextlib
import logging
from typing import TYPE_CHECKING, Any

import numpy as np

from service import dataplane
from service.batching.batcher import BatchResult
from service.engine.device_jobs import device_job
from service.engine.regions import RegionRefused
from service.oip.types import SharedMemoryRef
from service.state import ServiceState

if TYPE_CHECKING:
    from service.batching.batcher import Batcher
    from service.cudashm import Lease

log = logging.getLogger(__name__)


def cuda_lease(
    state: ServiceState,
    ref: SharedMemoryRef | None,
    dtype: np.dtype[Any],
    shape: tuple[int, ...],
    leases: contextlib.ExitStack,
) -> Lease | None:
    """A hold on ``ref`` when it names a CUDA region (released with ``leases``); None for anything else."""
    cuda = state.cuda_shared_memory
    if ref is None or cuda is None:
        return None
    lease = cuda.lease(ref, dtype, shape)
    if lease is not None:
        leases.callback(lease.release)
    return lease


async def device_to_device(
    engine: Any, batcher: Batcher, source: Lease, target: Lease, shape: tuple[int, ...], deadline: float
) -> BatchResult | None:
    """Serve a request whose input and output both lie in CUDA regions of one GPU through the batcher, computed by
    that GPU's engine process straight from and into the client's memory: the batcher's result (its output is a
    shape-only stand-in: the answer is in the target region); None where that path does not apply, and the caller
    copies instead. NaN/Inf inputs are refused by the engine process, which reads them on the device (422)."""
    records = source.region.record, target.region.record
    if records[0].device_id != records[1].device_id:
        return None
    stand_in = np.broadcast_to(np.zeros((), source.dtype), shape)
    samples, seq, dim = dataplane.as_batch(stand_in, engine).shape  # rank, width, length: 422s before queueing
    at_source, at_target = (source.region, source.ref.offset), (target.region, target.ref.offset)
    job = device_job(engine, str(records[0].device_id), at_source, at_target, (samples, seq, dim), source.dtype)
    if job is None:
        return None
    try:
        return await batcher.submit(job, deadline)
    except RegionRefused as exc:  # the engine process cannot open it now (its limits, a restart): copy
        log.info("CUDA region %r served by copying: %s", records[0].name, exc)
        return None
