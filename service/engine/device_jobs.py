"""The worker's side of CUDA shared memory served device to device (issue #13).

A request whose input and output both lie in client CUDA regions of one GPU becomes a :class:`DeviceJob`: which
GPU, and where its input and its answer lie (region, byte offset). Like a system shared-memory
:class:`~service.engine.direct.DirectJob` it goes through the worker's batcher as an opaque placed payload, so it
gets the same deadline, admission (429), queue metrics and batching as every other request, and its rows join
engine batches with any other requests of the same sequence length. The engine connection
(:mod:`service.engine.remote`) names the regions in its batch frame (each registered once per connection by its
IPC handle); the GPU's engine process copies device to device between them and its captured graph
(:mod:`service.engine.cuda_regions`). The router (:mod:`service.engine.router`) sends the job to the engine process
of its GPU, the only one that can read the memory.

Nothing here knows the registry the regions came from (:class:`~service.engine.cuda_regions.DeviceRegion` is a
handle and a size) nor the protocol the request came by.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from service.engine.cuda_regions import DeviceRegion


@dataclass(eq=False)
class DeviceJob:
    """A ``shape`` (B, S, D) ``dtype`` tensor at ``source`` (region, byte offset) whose answer goes to ``target``,
    both on the served GPU ``device``: the batcher's opaque payload."""

    device: str
    source: tuple[DeviceRegion, int]
    target: tuple[DeviceRegion, int]
    shape: tuple[int, int, int]
    dtype: np.dtype[Any]

    @property
    def output(self) -> np.ndarray:
        """A host stand-in of the answer's shape (zero strides, no memory, read-only): the answer itself is written
        into the target region on the device, and nothing in this process reads it."""
        return np.broadcast_to(np.zeros((), self.dtype), self.shape)

    @property
    def row_bytes(self) -> int:
        return self.shape[1] * self.shape[2] * self.dtype.itemsize

    def __getitem__(self, rows: slice) -> DeviceJob:
        """Rows ``rows`` of the tensor (the batcher's chunks), at their own offsets in both regions."""
        start, stop, _ = rows.indices(self.shape[0])
        shift = start * self.row_bytes
        source = (self.source[0], self.source[1] + shift)
        target = (self.target[0], self.target[1] + shift)
        return DeviceJob(self.device, source, target, (max(0, stop - start), *self.shape[1:]), self.dtype)


def device_job(
    engine: Any,
    device: str,
    source: tuple[DeviceRegion, int],
    target: tuple[DeviceRegion, int],
    shape: tuple[int, int, int],
    dtype: np.dtype[Any],
) -> DeviceJob | None:
    """A job for the device-to-device path when ``engine`` serves one on ``device`` (an engine process of that GPU
    computes what it is given there) and the tensor is in the engine's dtype; else None (the copied path)."""
    serves = getattr(engine, "serves_device", None)
    if serves is None or dtype != engine.dtype or not serves(device):
        return None
    return DeviceJob(device, source, target, shape, dtype)
