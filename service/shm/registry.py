"""The system shared-memory extension's registry: register, unregister, status, and views for the data plane.

Registrations live in a directory every worker reads (:mod:`service.shm.records`), so a region registered
through any worker serves requests that land on any worker and status lists it once. Each worker maps a region
once (at registration, or at its first use in another worker) and keeps the mapping while the region stays
registered; a request costs one ``readlink`` (still registered, same registration?) and one ``fstat`` (the
object was not truncated under the mapping, which would turn a read into SIGBUS).

Lifetimes: views are numpy arrays over the mapping and hold it; unregistering only drops the registry's
reference, so a request still using the region finishes with it, and the mapping (and the descriptor the
mapping holds) goes when the last view does. ``mmap.close`` is never called. Each mapped region also keeps a
descriptor of the object while it lives, which engine processes receive to map the region themselves (the
direct path: :mod:`service.engine.regions`); a request on that path holds the region object itself.
"""

from __future__ import annotations

import logging
import math
import mmap
import os
import shutil
import tempfile
import threading
import time
import weakref
from pathlib import Path
from typing import Any

import numpy as np

from service.engine.direct import Span
from service.errors import Conflict, InvalidInput, LimitExceeded, NotFound
from service.oip.types import SharedMemoryRef
from service.shm.objects import DEV_SHM, open_object
from service.shm.records import Record, RecordDir

log = logging.getLogger(__name__)
MAX_NAME_CHARS = 256
SWEEP_S = 1.0  # how often a worker drops mappings of regions unregistered through another worker


class MappedRegion:
    """One registered region mapped in this process (read-write, shared with the client).

    A :class:`service.engine.direct.HostRegion`: ``fd`` (a duplicate of the object's descriptor, closed when
    this object is garbage), ``offset`` and ``byte_size`` let an engine process map the very same bytes."""

    __slots__ = ("__weakref__", "end", "fd", "mapping", "raw", "record", "start")

    def __init__(self, raw: str, record: Record, fd: int) -> None:
        base = record.offset - record.offset % mmap.ALLOCATIONGRANULARITY  # mmap offsets are page-aligned
        self.raw, self.record = raw, record
        self.start = record.offset - base  # where the region starts in the mapping
        self.end = record.offset + record.byte_size  # where it ends in the object
        try:
            # The mapping keeps its own duplicate of fd (CPython's mmap), which size() uses below.
            self.mapping = mmap.mmap(fd, self.start + record.byte_size, offset=base)
        except OSError as exc:
            raise InvalidInput(f"cannot map shared-memory region {record.name!r}: {exc.strerror}") from None
        self.fd = os.dup(fd)
        weakref.finalize(self, os.close, self.fd)

    @property
    def offset(self) -> int:
        return self.record.offset

    @property
    def byte_size(self) -> int:
        return self.record.byte_size

    def array(self, ref: SharedMemoryRef, dtype: np.dtype[Any], shape: tuple[int, ...], writable: bool) -> np.ndarray:
        """The bytes of ``ref`` as ``shape`` x ``dtype``; the array holds the mapping."""
        if ref.offset + ref.byte_size > self.record.byte_size:
            raise InvalidInput(
                f"{ref.byte_size} bytes at offset {ref.offset} go past the end of shared-memory region "
                f"{ref.region!r} ({self.record.byte_size} bytes)"
            )
        size = self.mapping.size()  # fstat: cheap, and a truncated object must not be touched
        if size < self.end:
            raise InvalidInput(
                f"the shared-memory object {self.record.key!r} of region {ref.region!r} shrank to {size} bytes "
                f"after registration (the region needs {self.end}); unregister it and register it again"
            )
        if ref.byte_size == 0:
            return np.zeros(shape, dtype)  # nothing to share (and frombuffer refuses an offset at the very end)
        flat = np.frombuffer(self.mapping, np.uint8, count=ref.byte_size, offset=self.start + ref.offset)
        if not writable:
            flat.flags.writeable = False
        return flat.view(dtype).reshape(shape)


class SystemSharedMemory:
    """Implements :class:`service.oip.types.SharedMemory` over the shared registry directory."""

    def __init__(
        self,
        directory: str | Path | None = None,
        max_regions: int = 256,
        max_bytes: int = 4 << 30,
        root: Path = DEV_SHM,
    ) -> None:
        self._owned = directory is None  # a private registry (one worker): removed on close
        path = Path(tempfile.mkdtemp(prefix="encoder-shm-")) if directory is None else Path(directory)
        self.records = RecordDir(path, Record.decode)
        self.max_regions, self.max_bytes, self.root = max_regions, max_bytes, root
        self._mapped: dict[str, MappedRegion] = {}
        self._lock = threading.Lock()  # the data plane may ask for views from a worker thread
        self._next_sweep = time.monotonic() + SWEEP_S

    # -- the extension's control plane ------------------------------------------------------------------------

    def register(self, name: str, key: str, offset: int, byte_size: int) -> None:
        """Map ``byte_size`` bytes at ``offset`` of the object ``key`` as region ``name``, for every worker."""
        check_name(name)
        offset, byte_size = _count("offset", offset, 0), _count("byte_size", byte_size, 1)
        if byte_size > self.max_bytes:
            raise LimitExceeded(f"byte_size {byte_size} is over the limit of {self.max_bytes} bytes of shared memory")
        fd, st = open_object(key, self.root)
        try:
            if offset + byte_size > st.st_size:
                raise InvalidInput(
                    f"offset {offset} + byte_size {byte_size} go past the end of the shared-memory object {key!r} "
                    f"({st.st_size} bytes)"
                )
            record = Record.new(name, key, offset, byte_size, st)
            region = MappedRegion(record.encode(), record, fd)
        finally:
            os.close(fd)
        self._sweep()
        self.records.path.mkdir(mode=0o700, parents=True, exist_ok=True)  # a /tmp cleaner may have removed it
        with self.records.locked():
            self._admit(record)
        with self._lock:
            self._mapped[name] = region
        log.info("registered shared-memory region %r: %s bytes at %s of %r", name, byte_size, offset, key)

    def _admit(self, record: Record) -> None:
        """Check the duplicate name and the limits, and store: under the registry's lock."""
        registered = self.records.all()
        if any(r.name == record.name for r in registered):
            raise Conflict(f"a shared-memory region named {record.name!r} is already registered; unregister it first")
        if len(registered) >= self.max_regions:
            raise LimitExceeded(f"{len(registered)} shared-memory regions are registered (limit {self.max_regions})")
        total = sum(r.byte_size for r in registered)
        if total + record.byte_size > self.max_bytes:
            raise LimitExceeded(
                f"{total} bytes of shared memory are registered; {record.byte_size} more would pass the limit of "
                f"{self.max_bytes}"
            )
        if not self.records.create(record):  # only if something outside the lock wrote the directory
            raise Conflict(f"a shared-memory region named {record.name!r} is already registered; unregister it first")

    def unregister(self, name: str | None = None) -> None:
        """Unregister ``name``, or every region. Unknown names are not an error (as in Triton: idempotent)."""
        names = [r.name for r in self.records.all()] if name is None else [name]
        for each in names:
            if self.records.remove(each):
                log.info("unregistered shared-memory region %r", each)
        with self._lock:
            for each in list(self._mapped) if name is None else names:
                self._mapped.pop(each, None)  # views in use keep their mapping until they are done
        self._sweep()

    def status(self, name: str | None = None) -> list[dict[str, Any]]:
        """Triton's status entries: every region, or the one named (NotFound when it is not registered)."""
        self._sweep()
        return self.records.status(name, "shared-memory region")

    # -- the data plane's views -------------------------------------------------------------------------------

    def input_array(self, ref: SharedMemoryRef, dtype: np.dtype[Any], shape: tuple[int, ...]) -> np.ndarray:
        return self.input_span(ref, dtype, shape).array

    def output_array(self, ref: SharedMemoryRef, dtype: np.dtype[Any], shape: tuple[int, ...]) -> np.ndarray:
        return self.output_span(ref, dtype, shape).array

    def input_span(self, ref: SharedMemoryRef, dtype: np.dtype[Any], shape: tuple[int, ...]) -> Span:
        region = self._region(ref, dtype, shape)
        return Span(region.array(ref, dtype, shape, writable=False), region, ref.offset)

    def output_span(self, ref: SharedMemoryRef, dtype: np.dtype[Any], shape: tuple[int, ...]) -> Span:
        region = self._region(ref, dtype, shape)
        return Span(region.array(ref, dtype, shape, writable=True), region, ref.offset)

    def _region(self, ref: SharedMemoryRef, dtype: np.dtype[Any], shape: tuple[int, ...]) -> MappedRegion:
        _check_ref(ref, dtype, shape)
        if time.monotonic() >= self._next_sweep:
            self._sweep()
        raw = self.records.read_raw(ref.region)  # the one registry read per request
        with self._lock:
            cached = self._mapped.get(ref.region)
            if raw is not None and cached is not None and cached.raw == raw:
                return cached
            self._mapped.pop(ref.region, None)  # unregistered, or registered again since we mapped it
        if raw is None:
            raise NotFound(f"no shared-memory region {ref.region!r} is registered")
        region = self._map(raw)
        with self._lock:
            self._mapped[ref.region] = region
        return region

    def _map(self, raw: str) -> MappedRegion:
        """Map a region registered through another worker: the same object it was registered with, or refuse."""
        record = Record.decode(raw)
        try:
            fd, st = open_object(record.key, self.root)
        except NotFound:
            raise NotFound(
                f"the shared-memory object {record.key!r} of region {record.name!r} no longer exists"
            ) from None
        try:
            if (st.st_dev, st.st_ino) != (record.device, record.inode):
                raise Conflict(
                    f"the shared-memory object {record.key!r} was replaced after region {record.name!r} was "
                    "registered; unregister it and register it again"
                )
            if st.st_size < record.offset + record.byte_size:
                raise InvalidInput(f"the shared-memory object {record.key!r} is smaller than region {record.name!r}")
            return MappedRegion(raw, record, fd)
        finally:
            os.close(fd)

    def _sweep(self) -> None:
        """Drop this worker's mappings of regions no longer registered as mapped (unregistered elsewhere)."""
        self._next_sweep = time.monotonic() + SWEEP_S
        with self._lock:
            stale = [n for n, r in self._mapped.items() if self.records.read_raw(n) != r.raw]
            for name in stale:
                del self._mapped[name]

    @property
    def mapped(self) -> int:
        """Regions mapped by this process (for tests and diagnostics)."""
        return len(self._mapped)

    def close(self) -> None:
        """Drop every mapping (views in use keep theirs); a private registry directory is removed."""
        with self._lock:
            self._mapped.clear()
        if self._owned:
            shutil.rmtree(self.records.path, ignore_errors=True)


def check_name(name: object) -> None:
    if not isinstance(name, str) or not name:
        raise InvalidInput("a shared-memory region needs a non-empty name")
    if len(name) > MAX_NAME_CHARS:
        raise InvalidInput(f"a shared-memory region name has at most {MAX_NAME_CHARS} characters")
    if "\0" in name:
        raise InvalidInput("a shared-memory region name cannot contain a NUL character")
    try:
        name.encode()
    except UnicodeEncodeError:
        raise InvalidInput("a shared-memory region name must be valid UTF-8 text") from None


def _count(what: str, value: object, least: int) -> int:
    # bool is an int to Python, never to a client
    if not isinstance(value, int) or isinstance(value, bool) or value < least:
        raise InvalidInput(f"{what} must be an integer of at least {least}, got {value!r}")
    return value


def _check_ref(ref: SharedMemoryRef, dtype: np.dtype[Any], shape: tuple[int, ...]) -> None:
    """The tensor's own size against the reference's, before anything is looked up."""
    if type(ref.offset) is not int or ref.offset < 0:  # exact types: bool is an int to Python, never to a client
        raise InvalidInput(f"shared_memory_offset must be an integer of at least 0, got {ref.offset!r}")
    if type(ref.byte_size) is not int or ref.byte_size < 0:
        raise InvalidInput(f"shared_memory_byte_size must be an integer of at least 0, got {ref.byte_size!r}")
    expected = math.prod(shape) * dtype.itemsize  # Python ints: a huge shape cannot wrap around
    if ref.byte_size != expected or min(shape, default=0) < 0:
        if min(shape, default=0) < 0:
            raise InvalidInput(f"shape {list(shape)} has a negative dimension")
        raise InvalidInput(
            f"shared_memory_byte_size {ref.byte_size} does not match shape {list(shape)} x {dtype.name} "
            f"({expected} bytes)"
        )
