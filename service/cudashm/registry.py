"""The CUDA shared-memory extension's registry: register, unregister, status, and copies for the data plane.

As for system shared memory (:mod:`service.shm`), registrations are records in a directory every worker reads
(one symbolic link per region, created atomically: duplicates are refused across processes), so a region
registered through any worker serves requests on every worker and status lists it once. A record holds the
client's CUDA IPC handle; each process opens the handle once (the registering worker at registration, so a stale
handle or a wrong device is refused there and then; another worker at its first use) and keeps it open while the
region stays registered.

Lifetimes: a request holds a :class:`Lease` on each region it uses, from before compute until its answer is
written; unregistering drops the registry's claim only, and the handle is closed when the last lease is gone.

Region names are one namespace with system shared memory (as in Triton): a name registered as one kind cannot
be registered as the other. The limits ``--max-shared-memory-regions`` and ``--max-shared-memory-bytes`` apply to
each kind on its own.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import secrets
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from service.cudashm.device import HANDLE_BYTES, DeviceMemory, WrongDevice
from service.errors import Conflict, InvalidInput, LimitExceeded
from service.oip.types import SharedMemoryRef
from service.shm.records import RecordDir
from service.shm.registry import _check_ref, _count, check_name

log = logging.getLogger(__name__)
SWEEP_S = 1.0  # how often a worker closes handles of regions unregistered through another worker


@dataclass(frozen=True)
class CudaRecord:
    """One registered CUDA region: what status shows, the client's handle (base64) and a registration token."""

    name: str
    handle: str
    device_id: int
    byte_size: int
    token: str

    def encode(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"), ensure_ascii=False)

    @classmethod
    def decode(cls, text: str) -> CudaRecord:
        return cls(**json.loads(text))

    def status(self) -> dict[str, Any]:
        """Triton's status entry."""
        return {"name": self.name, "device_id": self.device_id, "byte_size": self.byte_size}

    @property
    def raw_handle(self) -> bytes:
        return base64.b64decode(self.handle)


class OpenRegion:
    """A registered region's handle, open in this process; closed once unregistered and no lease holds it."""

    __slots__ = ("__weakref__", "device", "handle", "leases", "pointer", "raw", "record", "retired")

    def __init__(self, raw: str, record: CudaRecord, pointer: int | None, device: int) -> None:
        self.raw, self.record, self.pointer, self.device = raw, record, pointer, device
        self.handle = record.raw_handle  # what an engine process opens the same memory with
        self.leases = 0
        self.retired = False  # unregistered (or registered again): close when the last lease goes

    @property
    def byte_size(self) -> int:
        return self.record.byte_size


class Lease:
    """One request's hold on ``ref`` (bounds-checked) in an open region: copies in and out of it."""

    def __init__(
        self, registry: CudaSharedMemory, region: OpenRegion, ref: SharedMemoryRef, dtype: np.dtype[Any]
    ) -> None:
        self._registry, self.region, self.ref, self.dtype = registry, region, ref, dtype
        self.device = region.device  # this process's CUDA ordinal
        self._held = True

    def read(self, dtype: np.dtype[Any], shape: tuple[int, ...]) -> np.ndarray:
        """The tensor's values, copied to the host (device to host)."""
        out = np.empty(shape, dtype)
        self._registry.device.to_host(out, self._registry.ensure_open(self.region) + self.ref.offset, self.device)
        return out

    def write(self, values: np.ndarray) -> None:
        """Copy ``values`` (the tensor's shape and datatype, contiguous) into the region (host to device)."""
        assert values.nbytes == self.ref.byte_size, "the data plane checked the size against the reference"
        pointer = self._registry.ensure_open(self.region) + self.ref.offset
        self._registry.device.from_host(pointer, np.ascontiguousarray(values), self.device)

    def release(self) -> None:
        if self._held:
            self._held = False
            self._registry._release(self.region)


class CudaSharedMemory:
    """Registered CUDA regions, shared by the workers through ``directory`` (a private one when None).

    ``devices`` maps the device ids clients name (the service's GPU ordinals, as ``--devices`` numbers them) to
    this process's CUDA ordinals; ``other_kind`` tells whether a name is taken by a system region.
    """

    def __init__(
        self,
        device: DeviceMemory,
        devices: dict[int, int],
        directory: str | Path | None = None,
        max_regions: int = 256,
        max_bytes: int = 4 << 30,
        other_kind: Callable[[str], bool] = lambda name: False,
    ) -> None:
        self._owned = directory is None
        path = Path(tempfile.mkdtemp(prefix="encoder-cudashm-")) if directory is None else Path(directory)
        self.records: RecordDir[CudaRecord] = RecordDir(path, CudaRecord.decode)
        self.device, self.devices = device, dict(devices)
        self.max_regions, self.max_bytes, self.other_kind = max_regions, max_bytes, other_kind
        self._open: dict[str, OpenRegion] = {}
        self._lock = threading.Lock()
        self._opening = threading.Lock()  # opens of regions registered elsewhere, one at a time
        self._next_sweep = time.monotonic() + SWEEP_S

    # -- the extension's control plane ------------------------------------------------------------------------

    def register(self, name: str, raw_handle: object, device_id: object, byte_size: object) -> None:
        """Open the client's allocation ``raw_handle`` on ``device_id`` and register its first ``byte_size``
        bytes as region ``name``, for every worker."""
        check_name(name)
        handle = check_handle(raw_handle)
        device_id = self._served(_count("device_id", device_id, 0))
        byte_size = _count("byte_size", byte_size, 1)
        if byte_size > self.max_bytes:
            raise LimitExceeded(
                f"byte_size {byte_size} is over the limit of {self.max_bytes} bytes of CUDA shared memory"
            )
        record = CudaRecord(name, base64.b64encode(handle).decode(), device_id, byte_size, secrets.token_hex(16))
        region = self._open_region(record.encode(), record)
        try:
            self._sweep()
            self.records.path.mkdir(mode=0o700, parents=True, exist_ok=True)
            with self.records.locked():
                self._admit(record)
        except BaseException:
            self._close(region)
            raise
        with self._lock:
            self._open[name] = region
        log.info("registered CUDA shared-memory region %r: %s bytes on device %s", name, byte_size, device_id)

    def _served(self, device_id: int) -> int:
        if device_id not in self.devices:
            served = ", ".join(str(d) for d in sorted(self.devices)) or "none"
            raise InvalidInput(f"device_id {device_id} is not a device this service serves (it serves: {served})")
        return device_id

    def _admit(self, record: CudaRecord) -> None:
        """The duplicate name (either kind) and the limits, then store: under the registry's lock."""
        registered = self.records.all()
        taken = f"a shared-memory region named {record.name!r} is already registered; unregister it first"
        if any(r.name == record.name for r in registered) or self.other_kind(record.name):
            raise Conflict(taken)
        if len(registered) >= self.max_regions:
            raise LimitExceeded(
                f"{len(registered)} CUDA shared-memory regions are registered (limit {self.max_regions})"
            )
        total = sum(r.byte_size for r in registered)
        if total + record.byte_size > self.max_bytes:
            raise LimitExceeded(
                f"{total} bytes of CUDA shared memory are registered; {record.byte_size} more would pass the limit "
                f"of {self.max_bytes}"
            )
        if not self.records.create(record):
            raise Conflict(taken)

    @contextlib.contextmanager
    def names_locked(self) -> Iterator[None]:
        """Held while a system region is registered, so a name cannot be taken by both kinds at once."""
        self.records.path.mkdir(mode=0o700, parents=True, exist_ok=True)
        with self.records.locked():
            yield

    def has(self, name: str) -> bool:
        return self.records.read_raw(name) is not None

    def unregister(self, name: str | None = None) -> None:
        """Unregister ``name``, or every region; an unknown name is not an error (as in Triton)."""
        names = [r.name for r in self.records.all()] if name is None else [name]
        for each in names:
            if self.records.remove(each):
                log.info("unregistered CUDA shared-memory region %r", each)
        with self._lock:
            dropped = [self._open.pop(n) for n in (list(self._open) if name is None else names) if n in self._open]
        for region in dropped:
            self._retire(region)
        self._sweep()

    def status(self, name: str | None = None) -> list[dict[str, Any]]:
        """Triton's status entries: every region, or the one named (NotFound when it is not registered)."""
        self._sweep()
        return self.records.status(name, "CUDA shared-memory region")

    # -- the data plane ---------------------------------------------------------------------------------------

    def lease(self, ref: SharedMemoryRef, dtype: np.dtype[Any], shape: tuple[int, ...]) -> Lease | None:
        """A hold on the bytes of ``ref`` when it names a CUDA region (None when it names none: maybe a system
        region), bounds-checked against the region and the tensor's own size. Release it when done."""
        if time.monotonic() >= self._next_sweep:
            self._sweep()
        raw = self.records.read_raw(ref.region)  # the one registry read per request
        if raw is None:
            return None
        _check_ref(ref, dtype, shape)
        region = self._acquire(ref.region, raw)
        lease = Lease(self, region, ref, dtype)
        if ref.offset + ref.byte_size > region.record.byte_size:
            lease.release()
            raise InvalidInput(
                f"{ref.byte_size} bytes at offset {ref.offset} go past the end of CUDA shared-memory region "
                f"{ref.region!r} ({region.record.byte_size} bytes)"
            )
        return lease

    def _acquire(self, name: str, raw: str) -> OpenRegion:
        """The region of registration ``raw``, with one more lease. Registered through another worker (or again),
        it is opened here only when a copy needs it (:meth:`ensure_open`): a request the engine process serves
        device to device never opens it in this worker (no CUDA context here at all)."""
        with self._lock:
            region = self._open.get(name)
            if region is not None and region.raw == raw:
                region.leases += 1
                return region
        record = CudaRecord.decode(raw)
        local = self.devices.get(record.device_id)
        if local is None:
            raise InvalidInput(f"CUDA shared-memory region {record.name!r} is on device {record.device_id}, not served")
        fresh = OpenRegion(raw, record, None, local)
        closing = []
        with self._lock:
            current = self._open.get(name)
            if current is not None and current.raw == raw:  # another thread opened it meanwhile: keep one
                closing.append(fresh)
                region = current
            else:
                if current is not None and self._retire_locked(current):
                    closing.append(current)
                self._open[name] = region = fresh
            region.leases += 1
        for each in closing:
            self._close(each)
        return region

    def ensure_open(self, region: OpenRegion) -> int:
        """The region's device address in this process, opening its handle now if it is not yet (the caller
        holds a lease); the domain errors of a handle that cannot be opened (stale, another device)."""
        with self._opening:
            pointer = region.pointer
            if pointer is None:
                pointer = region.pointer = self._open_region(region.raw, region.record).pointer
            assert pointer is not None
            return pointer

    def _open_region(self, raw: str, record: CudaRecord) -> OpenRegion:
        local = self.devices.get(record.device_id)
        if local is None:
            raise InvalidInput(f"CUDA shared-memory region {record.name!r} is on device {record.device_id}, not served")
        try:
            pointer, allocated = self.device.open(record.raw_handle, local)
        except WrongDevice as exc:
            served = {v: k for k, v in self.devices.items()}.get(exc.actual, f"{exc.actual} (not served)")
            raise InvalidInput(
                f"the CUDA IPC handle of region {record.name!r} is for device {served}, not device_id "
                f"{record.device_id}"
            ) from None
        region = OpenRegion(raw, record, pointer, local)
        if record.byte_size > allocated:
            self._close(region)
            raise InvalidInput(
                f"byte_size {record.byte_size} is larger than the CUDA allocation the handle names ({allocated} bytes)"
            )
        return region

    def _release(self, region: OpenRegion) -> None:
        with self._lock:
            region.leases -= 1
            close = region.retired and region.leases == 0
        if close:
            self._close(region)

    def _retire(self, region: OpenRegion) -> None:
        with self._lock:
            close = self._retire_locked(region)
        if close:
            self._close(region)

    def _retire_locked(self, region: OpenRegion) -> bool:
        """Mark ``region`` for closing; True when nothing holds it (the caller closes it, outside the lock)."""
        region.retired = True
        return region.leases == 0

    def _close(self, region: OpenRegion) -> None:
        if region.pointer is None:
            return  # never opened in this process
        try:
            self.device.close(region.pointer, region.device)
        except Exception:  # the handle is gone either way; a failure to unmap is logged, not raised to a client
            log.exception("closing the CUDA IPC handle of region %r failed", region.record.name)

    def _sweep(self) -> None:
        """Close this worker's handles of regions unregistered (or registered again) through another worker."""
        self._next_sweep = time.monotonic() + SWEEP_S
        with self._lock:
            stale = [n for n, r in self._open.items() if self.records.read_raw(n) != r.raw]
            regions = [self._open.pop(n) for n in stale]
            closing = [r for r in regions if self._retire_locked(r)]
        for region in closing:
            self._close(region)

    async def sweep_forever(self) -> None:
        """Every :data:`SWEEP_S`, close the handles of regions unregistered through other workers, also in a
        worker no request reaches: an open handle keeps the client's memory mapped (and, as long as the client
        does not free it, allocated)."""
        while True:
            await asyncio.sleep(SWEEP_S)
            if self._open:
                await asyncio.to_thread(self._sweep)

    @property
    def opened(self) -> int:
        """Regions open in this process (for tests and diagnostics)."""
        return len(self._open)

    def close(self) -> None:
        """Close every handle nothing holds (leases close theirs when released); a private directory is removed."""
        with self._lock:
            regions = list(self._open.values())
            self._open.clear()
            closing = [r for r in regions if self._retire_locked(r)]
        for region in closing:
            self._close(region)
        if self._owned:
            shutil.rmtree(self.records.path, ignore_errors=True)


def check_handle(raw_handle: object) -> bytes:
    """The 64 bytes of a ``cudaIpcMemHandle_t``: given as bytes (gRPC) or base64 text (REST's ``b64``)."""
    if isinstance(raw_handle, str):
        try:
            raw_handle = base64.b64decode(raw_handle, validate=True)
        except (binascii.Error, ValueError):
            raise InvalidInput("raw_handle is not base64 text") from None
    if not isinstance(raw_handle, bytes | bytearray):
        raise InvalidInput(f"raw_handle must be the handle's bytes, got {type(raw_handle).__name__}")
    if len(raw_handle) != HANDLE_BYTES:
        raise InvalidInput(
            f"raw_handle must be a CUDA IPC handle (cudaIpcMemHandle_t, {HANDLE_BYTES} bytes), got {len(raw_handle)} "
            "bytes"
        )
    return bytes(raw_handle)
