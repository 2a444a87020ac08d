"""Client shared-memory regions in the engine process: the direct path of system shared memory.

Design. A request whose input and output both lie in registered system shared memory (in the engine's dtype) is
computed straight from and into the client's region: no request body, no copy in the worker. The pieces:

- The worker, at a region's first use on one of its engine connections, sends a REGISTER frame (region id, kind,
  offset and size in the object) with the object's file descriptor (``SCM_RIGHTS``) and waits for the reply.
  This module maps it once per engine process (a region registered by several connections or workers is mapped
  and page-locked once: the table keys it by the object's device, inode, offset and size), page-locks it with
  the engine's ``register_host`` (CUDA only; False elsewhere, where copies are plain host copies) and answers.
  A refusal (too many regions or bytes: the registry's limits; a descriptor that cannot be mapped) is an
  answer too: the worker then serves that request by the copied path.
- A BATCH frame names, per part, (region id, byte offset) for the input and for the output; region 0 is the
  connection's arena, so copied and direct parts mix in one frame. Every range is checked here against the
  region's size and the object's current size (never trusting the worker); a bad part fails its frame (one
  worker batch) only. The engine computes the merged parts with ``run_into(parts, outs)``: views of these
  mappings, copied straight to and from the device when page-locked.
- The worker sends UNREGISTER when its registry dropped the region and no request of its own uses it; closing
  the connection drops every region it registered. Each region counts its references (one per connection that
  registered it, one per queued or running job part), and is unpinned and unmapped with the last one: a region
  unregistered while a batch uses it stays mapped until that batch is done.
- The region's kind is a field of REGISTER (``ipc.KIND_SYSTEM`` now); a CUDA kind (issue #13) adds a kind
  value whose frame carries an IPC handle instead of a descriptor and a region class with the same ``view``.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import stat
from collections.abc import Callable
from typing import Any

import numpy as np

log = logging.getLogger(__name__)
Key = tuple[int, int, int, int]  # the object's device, inode; the region's offset and size in it


class RegionRefused(ValueError):
    """This region cannot be served directly (the worker falls back to copying)."""


class ClientRegion:
    """One client region mapped read-write in this process; views of it are checked against its size."""

    def __init__(self, key: Key, fd: int, offset: int, byte_size: int) -> None:
        base = offset - offset % mmap.ALLOCATIONGRANULARITY  # mmap offsets are page-aligned
        self.key, self.byte_size = key, byte_size
        self.start = offset - base  # where the region starts in the mapping
        self.end = offset + byte_size  # where it ends in the object
        self.mapping = mmap.mmap(fd, self.start + byte_size, offset=base)  # keeps its own duplicate of fd
        self.base = np.frombuffer(self.mapping, np.uint8)
        self.address = int(self.base.__array_interface__["data"][0])
        self.pinned = False
        self.refs = 0

    def view(self, offset: int, shape: tuple[int, ...], dtype: np.dtype[Any]) -> np.ndarray:
        """``shape`` x ``dtype`` at byte ``offset`` of the region; ValueError past its end or the object's."""
        nbytes = int(np.prod(shape)) * dtype.itemsize
        if offset < 0 or offset + nbytes > self.byte_size:
            raise ValueError(f"{nbytes} bytes at offset {offset} go past a region of {self.byte_size} bytes")
        size = self.mapping.size()  # fstat: a truncated object would turn the copy into SIGBUS
        if size < self.end:
            raise ValueError(f"the region's object shrank to {size} bytes (the region needs {self.end})")
        start = self.start + offset
        return self.base[start : start + nbytes].view(dtype).reshape(shape)

    def close(self) -> None:
        self.base = np.empty(0, np.uint8)
        with contextlib.suppress(BufferError):  # a view still alive keeps the mapping until it is garbage
            self.mapping.close()


class RegionTable:
    """Every client region this engine process maps, shared by all connections, within the registry's limits.

    ``register``/``unregister`` page-lock and unpin host memory (the engine's ``register_host`` and
    ``unregister_host``), or are None where the engine copies from pageable memory. Called on the event loop,
    except :meth:`open`, which maps and page-locks (slow for a large region) and runs on a thread.
    """

    def __init__(
        self,
        max_regions: int,
        max_bytes: int,
        register: Callable[[int, int], bool] | None = None,
        unregister: Callable[[int], None] | None = None,
    ) -> None:
        self.max_regions, self.max_bytes = max_regions, max_bytes
        self._register, self._unregister = register, unregister
        self._regions: dict[Key, ClientRegion] = {}

    def __len__(self) -> int:
        return len(self._regions)

    @property
    def bytes(self) -> int:
        return sum(region.byte_size for region in self._regions.values())

    def identify(self, fd: int, offset: int, byte_size: int) -> Key:
        """The key of the region ``fd`` names, after checking it can be one (RegionRefused if not)."""
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise RegionRefused("the region's descriptor is not a regular file")
        if byte_size < 1 or offset < 0 or offset + byte_size > st.st_size:
            raise RegionRefused(f"{byte_size} bytes at offset {offset} do not fit an object of {st.st_size} bytes")
        return (st.st_dev, st.st_ino, offset, byte_size)

    def find(self, key: Key) -> ClientRegion | None:
        """The region already mapped under ``key``, retained for the caller; None when it is not mapped."""
        region = self._regions.get(key)
        if region is not None:
            region.refs += 1
        return region

    def check_room(self, byte_size: int) -> None:
        if len(self._regions) >= self.max_regions:
            raise RegionRefused(f"the engine process maps {len(self._regions)} regions (limit {self.max_regions})")
        if self.bytes + byte_size > self.max_bytes:
            raise RegionRefused(
                f"the engine process maps {self.bytes} bytes of regions; {byte_size} more pass {self.max_bytes}"
            )

    def open(self, key: Key, fd: int, offset: int, byte_size: int) -> ClientRegion:
        """Map and page-lock a new region (blocking: on a thread). The caller still owns ``fd``."""
        try:
            region = ClientRegion(key, fd, offset, byte_size)
        except OSError as exc:
            raise RegionRefused(f"cannot map the region: {exc.strerror}") from None
        if self._register is not None:
            try:
                region.pinned = bool(self._register(region.address, region.start + byte_size))
            except Exception as exc:  # still correct, only slower: copies from pageable memory
                log.warning("cannot page-lock a shared-memory region of %s bytes: %s", byte_size, exc)
        return region

    def install(self, region: ClientRegion) -> ClientRegion:
        """Add a region :meth:`open` mapped; retained for the caller. Another connection may have mapped the same
        region meanwhile: then that one is used and this one closed."""
        found = self.find(region.key)
        if found is not None:
            self._close(region)
            return found
        self._regions[region.key] = region
        region.refs += 1
        return region

    def retain(self, region: ClientRegion) -> None:
        region.refs += 1

    def release(self, region: ClientRegion) -> None:
        """One reference fewer; with the last one the region is unpinned and unmapped."""
        region.refs -= 1
        if region.refs > 0:
            return
        if self._regions.get(region.key) is region:
            del self._regions[region.key]
        self._close(region)

    def _close(self, region: ClientRegion) -> None:
        if region.pinned and self._unregister is not None:
            try:
                self._unregister(region.address)
            except Exception:  # never worth the engine process: the mapping goes anyway
                log.warning("cannot unpin a shared-memory region", exc_info=True)
            region.pinned = False
        region.close()
