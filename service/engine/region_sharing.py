"""Passing client regions to the engine process over one worker connection (the direct shared-memory paths).

A system region goes once per connection with its descriptor (SCM_RIGHTS), a CUDA region with its IPC handle;
the engine process maps or opens it and answers whether it serves it. Accepted regions get a connection-local id
that batch frames name; when the worker's region object is garbage, an UNREGISTER frame goes at the next chance
(whichever thread holds the connection then). A region the engine process refused is not offered again for
:data:`REFUSED_RETRY_S`: requests using it meanwhile are copied.

:class:`RegionSharing` is a part of :class:`service.engine.remote.RemoteEngine` (the connection's socket, lock and
request counter are the engine's).
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator

from service.engine import ipc
from service.engine.base import EngineUnreached
from service.engine.cuda_regions import KIND_CUDA, DeviceRegion
from service.engine.device_jobs import DeviceJob
from service.engine.direct import HostRegion, SharedRegions

log = logging.getLogger(__name__)
REFUSED_RETRY_S = 1.0  # a client region the engine process refused is not offered again for this long


class RegionSharing:
    """The client regions of one engine connection (a mixin of the connection: it uses its socket and lock)."""

    _sock: socket.socket
    _lock: threading.Lock
    _sequence: int
    _shared: SharedRegions
    _refused: dict[int, float]  # id(region) -> until when it is not offered again

    def _reply(self) -> tuple[int, str, float]:
        raise NotImplementedError

    def _share(self, region: HostRegion) -> int | None:
        """This connection's id of ``region``, registered with the engine process at its first use; None when the
        engine process refused it (then it is offered again only after REFUSED_RETRY_S)."""

        def send(region_id: int) -> None:
            frame = ipc.register_frame(self._sequence, region_id, ipc.KIND_SYSTEM, region.offset, region.byte_size)
            sent = socket.send_fds(self._sock, [frame], [region.fd])  # type: ignore[arg-type]
            if sent < len(frame):
                self._sock.sendall(frame[sent:])

        return self._register(region, send, "a shared-memory region")

    def _device_spec(self, job: DeviceJob) -> ipc.Part | None:
        """The frame part of a device job (its regions registered on this connection at their first use), or None
        when the engine process refused a region (it cannot read device memory, or its limits)."""
        source, target = self._share_device(job.source[0]), self._share_device(job.target[0])
        if source is None or target is None:
            return None
        return (job.shape[0], source, job.source[1], target, job.target[1])

    def _share_device(self, region: DeviceRegion) -> int | None:
        """:meth:`_share` for a CUDA region: the frame carries its IPC handle, no descriptor."""

        def send(region_id: int) -> None:
            frame = ipc.register_frame(self._sequence, region_id, KIND_CUDA, 0, region.byte_size, region.handle)
            self._sock.sendall(frame)

        return self._register(region, send, "a CUDA region")

    def _register(self, region: HostRegion | DeviceRegion, send: Callable[[int], None], what: str) -> int | None:
        """:meth:`_share`'s work for either kind of region; ``send(region_id)`` sends its REGISTER frame."""
        region_id = self._shared.get(region)  # type: ignore[arg-type]  # any weak-referenceable region works
        if region_id is not None:
            return region_id
        if time.monotonic() < self._refused.get(id(region), 0.0):
            return None
        region_id = self._shared.reserve()
        self._sequence = (self._sequence + 1) & 0xFFFFFFFF
        try:
            send(region_id)
        except OSError as exc:
            raise EngineUnreached(f"the engine process is gone: {exc}") from exc
        status, message, _ = self._reply()
        if status != ipc.OK:
            log.warning("the engine process serves %s by copying: %s", what, message)
            self._refused = {k: t for k, t in self._refused.items() if t > time.monotonic()}
            self._refused[id(region)] = time.monotonic() + REFUSED_RETRY_S
            return None
        self._shared.add(region, region_id, self._forget)  # type: ignore[arg-type]
        return region_id

    def _forget(self, region_id: int) -> None:
        """``region_id``'s region is garbage (any thread): unregister it now if the connection is free."""
        self._shared.forget(region_id)
        self._flush_if_free()

    def _flush_if_free(self) -> None:
        if self._shared.pending and self._lock.acquire(blocking=False):
            try:
                self._flush_gone()
            finally:
                self._lock.release()

    def _flush_gone(self) -> None:
        """Send the queued UNREGISTER frames (lock held); a connection that broke drops them all anyway."""
        gone = self._shared.take_gone()
        if gone:
            with contextlib.suppress(OSError):
                self._sock.sendall(b"".join(ipc.unregister_frame(region_id) for region_id in gone))

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """The connection, for one exchange; regions that became garbage meanwhile are unregistered first."""
        with self._lock:
            self._flush_gone()
            try:
                yield
            finally:
                self._flush_gone()
        self._flush_if_free()
