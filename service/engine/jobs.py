"""The engine process's unit of work: a worker's batch frame as a :class:`Job`, and computing merged jobs.

:func:`read_job` turns a BATCH frame into checked views of the worker's arena or its client regions (never
trusting the worker: every range against its region); :func:`run_parts` computes the parts of many jobs as one
batch; :func:`refused_parts` says which parts of each job held a NaN or an infinity.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from converter.device_rows import DeviceRows, Placed
from converter.finite import finite_rows
from service.batching.batcher import pad_size, run_batch
from service.engine import ipc
from service.engine.base import Engine
from service.engine.cuda_regions import CudaRegion
from service.engine.regions import ClientRegion

if TYPE_CHECKING:
    from service.engine.connection import WorkerConnection


@dataclass(eq=False)
class Job:
    """One worker batch: its parts (in the worker's arena or in client regions) and where each answer goes."""

    worker: WorkerConnection
    sequence: int
    parts: list[Placed]
    outs: list[Placed]
    samples: int
    seq: int
    arrived: float
    held: list[ClientRegion | CudaRegion] = field(default_factory=list)  # client regions it uses, until done
    # Per part: read from a client region (the direct paths), so no worker checked its values: this process does,
    # on the batch (the graph's flags output; CUDA regions' inputs of an engine without it are checked when the
    # frame is read instead, see DeviceFinite).
    checked: list[bool] = field(default_factory=list)
    refused: list[int] = field(default_factory=list)  # parts in CUDA regions found holding a NaN or an Inf

    @property
    def all_refused(self) -> bool:
        """Every part was refused when the frame was read: nothing worth computing."""
        return len(self.refused) == len(self.parts)


class DeviceFinite:
    """The NaN/Inf check of inputs in client CUDA regions where the engine's batches cannot flag them (no flags
    output in its graph): one run of its own per part, made at the first such part (on this GPU)."""

    def __init__(self, dtype: np.dtype[Any]) -> None:
        self.dtype = dtype
        self._check: Any = None  # converter.finite.FiniteCheck

    def __call__(self, part: Placed) -> bool:
        """Whether every value of ``part`` is finite (else the worker answers its request 422)."""
        if isinstance(part, np.ndarray):  # the test-only fake layer: host memory
            finite = bool(np.isfinite(part).all())
        else:
            if self._check is None:
                from converter.finite import FiniteCheck

                self._check = FiniteCheck(self.dtype, "CUDAExecutionProvider", 0)
            finite = bool(self._check.device(part.pointer, part.shape).all())
        return finite


def read_job(worker: WorkerConnection, sequence: int, body: bytes, engine: Engine, check: DeviceFinite) -> Job:
    """The frame's parts as checked views; ValueError for a bad frame (that job only). Parts in CUDA regions holding
    a NaN or an Inf are ``job.refused`` (only their requests fail, not the frame: it holds other requests too). The
    job does not hold its regions yet: the caller retains ``job.held``."""
    seq, specs = ipc.parse_batch(body)
    parts: list[Placed] = []
    outs: list[Placed] = []
    held: dict[int, ClientRegion | CudaRegion] = {}
    checked: list[bool] = []
    refused: list[int] = []
    flagged = bool(getattr(engine, "flags_device_rows", False))  # its batches flag device rows too
    for index, (samples, source, source_offset, target, target_offset) in enumerate(specs):
        if samples < 1 or not 1 <= seq <= engine.max_seq_len:
            raise ValueError(f"invalid batch shape ({samples}, {seq})")
        shape = (samples, seq, engine.dim)
        parts.append(worker.view(source, source_offset, shape, engine.dtype))
        region = worker.regions.get(source)
        # No worker has seen the values of a client region: flagged with the batch, or checked here and now.
        now = isinstance(region, CudaRegion) and isinstance(parts[-1], DeviceRows) and not flagged
        if now and not check(parts[-1]):
            refused.append(index)
        outs.append(worker.view(target, target_offset, shape, engine.dtype))
        checked.append(isinstance(region, ClientRegion | CudaRegion) and not now)
        for region_id in (source, target):
            if region_id != ipc.ARENA:
                held[region_id] = worker.regions[region_id]
    samples = sum(int(part.shape[0]) for part in parts)
    return Job(worker, sequence, parts, outs, samples, seq, time.monotonic(), list(held.values()), checked, refused)


def take(jobs: deque[Job], max_batch_size: int) -> tuple[list[Job], deque[Job]]:
    """(the next batch, the jobs left): FIFO jobs of the first job's sequence length, up to ``max_batch_size``
    samples (at least one job)."""
    seq = jobs[0].seq
    taken: list[Job] = []
    kept: deque[Job] = deque()
    samples = 0
    for job in jobs:
        size = job.samples
        if job.seq == seq and (not taken or samples + size <= max_batch_size):
            taken.append(job)
            samples += size
        else:
            kept.append(job)
    return taken, kept


def run_parts(
    engine: Engine,
    parts: Sequence[Placed],
    outs: Sequence[Placed] | None = None,
    finite: np.ndarray | None = None,
) -> tuple[int, float]:
    """Compute ``parts`` as one batch, each answer written into its ``out`` (default: over the part itself);
    (batch size run, seconds). ``finite`` (one flag per row of the parts) is filled with each row's finiteness:
    by the engine's ``run_into`` (on the device, where it has one), else on the host before the answers land."""
    started = time.perf_counter()
    outs = parts if outs is None else outs
    if any(isinstance(item, DeviceRows) for item in (*parts, *outs)):  # client CUDA regions: device to device
        run_device_into = getattr(engine, "run_device_into", None)
        if run_device_into is None:
            raise RuntimeError("this engine cannot read device memory (CUDA shared memory needs the CUDA engine)")
        if finite is None:
            return int(run_device_into(parts, outs)), time.perf_counter() - started
        return int(run_device_into(parts, outs, finite=finite)), time.perf_counter() - started
    arrays = [p for p in parts if isinstance(p, np.ndarray)]
    targets = [o for o in outs if isinstance(o, np.ndarray)]
    run_into = getattr(engine, "run_into", None)
    if run_into is not None:  # the ONNX engine copies each part straight to and from the device
        padded = int(run_into(arrays, targets) if finite is None else run_into(arrays, targets, finite=finite))
    else:
        if finite is not None:
            finite[:] = np.concatenate([finite_rows(part) for part in arrays])
        samples = sum(int(part.shape[0]) for part in arrays)
        padded = pad_size(samples, engine.buckets if engine.fixed_shapes else None)
        answer, _ = run_batch(engine, arrays, padded)
        offset = 0
        for out in targets:
            np.copyto(out, answer[offset : offset + out.shape[0]])
            offset += out.shape[0]
    return padded, time.perf_counter() - started


def refused_parts(batch: Sequence[Job], finite: np.ndarray | None) -> list[list[int]]:
    """Per job, the indices of its parts holding a non-finite row: found when its frame was read (CUDA regions), or
    in the batch's row flags ``finite`` (the checked parts). A refused part was computed all the same (its answer
    written where its request said), like the others of its batch; its request is refused."""
    refused: list[list[int]] = []
    row = 0
    for job in batch:
        bad = list(job.refused)
        for index, (part, checked) in enumerate(zip(job.parts, job.checked, strict=True)):
            rows = int(part.shape[0])
            if finite is not None and checked and not finite[row : row + rows].all():
                bad.append(index)
            row += rows
        refused.append(sorted(bad))
    return refused
