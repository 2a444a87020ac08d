"""REGISTER and UNREGISTER frames of one worker connection: its client regions, system or CUDA.

A system region comes with its descriptor (SCM_RIGHTS ahead of the frame) and is mapped and page-locked once for
every connection that names the same memory (:class:`service.engine.regions.RegionTable`); a CUDA region is
opened from the IPC handle in the frame (:class:`service.engine.cuda_regions.CudaRegionTable`). Each reply says
whether the region may be used; the region ids are the connection's own.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import TYPE_CHECKING

from service.engine import ipc
from service.engine.cuda_regions import KIND_CUDA
from service.engine.regions import ClientRegion, RegionRefused

if TYPE_CHECKING:
    from service.engine.connection import WorkerConnection
    from service.engine.host import EngineHost

log = logging.getLogger(__name__)


class Registrar:
    """Registers and unregisters the client regions of ``conn`` in ``host``'s region tables."""

    def __init__(self, conn: WorkerConnection, host: EngineHost) -> None:
        self.conn, self.host = conn, host

    def unregister(self, region_id: int) -> None:
        region = self.conn.regions.pop(region_id, None)
        if region is not None:  # an unknown id is no error: unregistering is idempotent
            self.host.release(region)  # still mapped while a batch computing now uses it

    def register(self, sequence: int, body: bytes) -> None:
        """Map a client region (see :mod:`service.engine.regions`); the reply says whether it may be used."""
        if len(body) >= ipc.REGISTER_HEAD.size and body[4] == KIND_CUDA:  # the kind byte: no descriptor comes
            self._register_cuda(sequence, body)
            return
        conn = self.conn
        fd = conn.take_fd()
        table = self.host.regions
        try:
            if len(body) < ipc.REGISTER_HEAD.size:
                raise RegionRefused(f"a register frame of {len(body)} bytes is too short")
            region_id, kind, offset, byte_size = ipc.REGISTER_HEAD.unpack_from(body)
            if kind != ipc.KIND_SYSTEM:
                raise RegionRefused(f"shared-memory region kind {kind} is not supported")
            if fd < 0:
                raise RegionRefused("a system shared-memory region comes with its descriptor")
            if region_id == ipc.ARENA or region_id in conn.regions:
                raise RegionRefused(f"region id {region_id} is already in use on this connection")
            key = table.identify(fd, offset, byte_size)
            found = table.find(key)
            if found is None:
                table.check_room(byte_size)
        except (RegionRefused, OSError) as exc:
            _close_fd(fd)
            conn.reply(sequence, (ipc.FAILED, str(exc), 0.0, 0.0))
            return
        if found is not None:
            _close_fd(fd)
            self._registered(sequence, region_id, found)
            return
        # Mapping and page-locking a large region is slow: on a thread, this connection paused meanwhile.
        conn.pause()
        opening = asyncio.ensure_future(asyncio.to_thread(table.open, key, fd, offset, byte_size))
        opening.add_done_callback(lambda done: self._opened(sequence, region_id, fd, done))

    def _opened(self, sequence: int, region_id: int, fd: int, opening: asyncio.Future[ClientRegion]) -> None:
        _close_fd(fd)
        if opening.cancelled():
            return  # the loop is ending
        exc = opening.exception()
        if exc is not None:
            if not isinstance(exc, RegionRefused):
                log.warning("mapping a shared-memory region failed", exc_info=exc)
            self.conn.reply(sequence, (ipc.FAILED, str(exc), 0.0, 0.0))
        else:
            region = self.host.regions.install(opening.result())
            if self.conn.closed:
                self.host.regions.release(region)
                return
            self._registered(sequence, region_id, region)
        self.conn.resume()

    def _register_cuda(self, sequence: int, body: bytes) -> None:
        """Open a client's CUDA region from the IPC handle after the frame's head (see
        :mod:`service.engine.cuda_regions`); quick enough for the event loop (one driver call, once per region)."""
        region_id, _, _, byte_size = ipc.REGISTER_HEAD.unpack_from(body)
        table = self.host.cuda_regions
        try:
            if table is None:
                raise RegionRefused("this engine process does not serve CUDA shared memory")
            if region_id == ipc.ARENA or region_id in self.conn.regions:
                raise RegionRefused(f"region id {region_id} is already in use on this connection")
            region = table.open(body[ipc.REGISTER_HEAD.size :], byte_size)
        except RegionRefused as exc:
            self.conn.reply(sequence, (ipc.FAILED, str(exc), 0.0, 0.0))
            return
        self.conn.regions[region_id] = region
        self.conn.reply(sequence, (ipc.OK, "device", 0.0, 0.0))

    def _registered(self, sequence: int, region_id: int, region: ClientRegion) -> None:
        self.conn.regions[region_id] = region
        self.conn.reply(sequence, (ipc.OK, "page-locked" if region.pinned else "", 0.0, 0.0))


def _close_fd(fd: int) -> None:
    if fd >= 0:
        os.close(fd)
