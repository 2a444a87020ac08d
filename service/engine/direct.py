"""The worker's side of the direct shared-memory path (see :mod:`service.engine.regions` for the design).

A request whose input and output both lie in client shared memory becomes a :class:`DirectJob`: where its input
and its output lie (the worker's view, the region, the byte offset there). The batcher carries it as an opaque
payload (it counts its rows, batches it, hands it to the engine's ``run_placed``); the engine process connection
(:mod:`service.engine.remote`) names the region and offsets in its batch frame instead of copying the tensor into
its arena, after passing the region's descriptor once (:class:`SharedRegions`). Nothing here knows the protocol
the request came by, nor the registry the region came from: a region is anything with a descriptor, an offset
and a size (:class:`HostRegion`).
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

DIRECT, COPIED = "direct", "copied"


class HostRegion(Protocol):
    """A client region as a worker maps it: enough for an engine process to map the very same bytes.

    Implementations must be weak-referenceable: an engine connection forgets the region when it is garbage."""

    @property
    def fd(self) -> int:
        """A descriptor of the object, open as long as this region object lives."""
        ...

    @property
    def offset(self) -> int:
        """Where the region starts in the object."""
        ...

    @property
    def byte_size(self) -> int: ...


@dataclass(frozen=True)
class Span:
    """A tensor in a client region: the worker's view of it, the region, and its byte offset in the region."""

    array: np.ndarray
    region: HostRegion
    offset: int

    def rows(self, start: int, stop: int) -> Span:
        """Rows ``start:stop`` of a (B, ...) tensor."""
        row_bytes = int(self.array[0].nbytes) if self.array.shape[0] else 0
        return Span(self.array[start:stop], self.region, self.offset + start * row_bytes)


@dataclass
class Served:
    """How a request's chunks were served: ``copied`` once any of them went through the arena after all."""

    copied: bool = False

    @property
    def path(self) -> str:
        return COPIED if self.copied else DIRECT


@dataclass(eq=False)
class DirectJob:
    """A (B, S, D) input and its answer's place, both in client regions: the batcher's opaque payload."""

    source: Span
    target: Span
    served: Served = field(default_factory=Served)  # shared by the chunks of one request

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.source.array.shape)

    @property
    def output(self) -> np.ndarray:
        """Where the answer is written (the answer, once computed)."""
        return self.target.array

    def __getitem__(self, rows: slice) -> DirectJob:
        start, stop, _ = rows.indices(self.shape[0])
        return DirectJob(self.source.rows(start, stop), self.target.rows(start, stop), self.served)


def direct_job(engine: Any, source: Span, target: Span) -> DirectJob | None:
    """A job for the direct path when ``engine`` serves one (an engine process computes it) and the tensors can go
    as they are: the engine's dtype, C-contiguous, answer as large as the input; else None (the copied path)."""
    if getattr(engine, "run_placed", None) is None or getattr(engine, "fixed_shapes", True):
        return None
    x, out = source.array, target.array
    if x.dtype != engine.dtype or out.dtype != x.dtype or out.shape != x.shape:
        return None
    if not (x.flags.c_contiguous and out.flags.c_contiguous):
        return None
    if x.ndim == 2:  # one sample, (S, D): the same bytes as (1, S, D)
        source = Span(x[np.newaxis], source.region, source.offset)
        target = Span(out[np.newaxis], target.region, target.offset)
    return DirectJob(source, target)


class SharedRegions:
    """One engine connection's region ids: each region is registered once on it, and unregistered when garbage.

    A region that is garbage is queued by :meth:`forget` (from whichever thread dropped it last) and sent as
    UNREGISTER by the connection's next holder of its lock (:meth:`take_gone`).
    """

    def __init__(self) -> None:
        self._ids: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()
        self._finalizers: list[weakref.finalize] = []
        self._gone: list[int] = []
        # Reentrant: a finalizer may run inside take_gone itself (the cyclic GC runs at any allocation).
        self._gone_lock = threading.RLock()
        self._next = 1  # 0 is the arena

    def get(self, region: HostRegion) -> int | None:
        return self._ids.get(region)

    def reserve(self) -> int:
        """The next unused id (registered only once the engine process accepted it)."""
        region_id = self._next
        self._next += 1
        return region_id

    def add(self, region: HostRegion, region_id: int, forget: Callable[[int], None]) -> None:
        """``region`` is ``region_id`` now; ``forget(region_id)`` runs when the region is garbage."""
        self._ids[region] = region_id
        self._finalizers.append(weakref.finalize(region, forget, region_id))
        if len(self._finalizers) > 2 * len(self._ids) + 16:
            self._finalizers = [f for f in self._finalizers if f.alive]

    def forget(self, region_id: int) -> None:
        with self._gone_lock:
            self._gone.append(region_id)

    @property
    def pending(self) -> bool:
        return bool(self._gone)

    def take_gone(self) -> list[int]:
        with self._gone_lock:
            gone, self._gone = self._gone, []
        return gone

    def close(self) -> None:
        for finalizer in self._finalizers:
            finalizer.detach()
        self._finalizers.clear()
        self._ids = weakref.WeakKeyDictionary()
        self.take_gone()
