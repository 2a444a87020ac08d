"""The engine board: what the supervisor tells every worker about the engine processes, in one directory.

``engines.json`` (written once, before any worker starts) lists the devices and their sockets; ``board`` is a
small shared-memory table with one slot per device: up or down, a generation that changes with every
(re)start, and the restart count. The supervisor is its only writer; workers map it read-only and poll it, so
every worker's /readyz, /metrics and routing agree on which engines serve, also a worker that sent nothing to a
dead engine, and a worker reconnects when a restarted engine's generation appears.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from dataclasses import dataclass
from typing import Any

from service.engine.devices import DeviceStatus

SLOT = struct.Struct("<BxxxII")  # up, generation, restarts: aligned words, each written whole
INDEX = "engines.json"
TABLE = "board"


@dataclass(frozen=True)
class Slot:
    up: bool
    generation: int
    restarts: int


class EngineBoard:
    """Open an existing board with :meth:`open`; the supervisor makes one with :meth:`create`."""

    def __init__(self, directory: str, writable: bool = False) -> None:
        self.directory = directory
        with open(os.path.join(directory, INDEX)) as index:
            listing: dict[str, Any] = json.load(index)
        self.devices: list[str] = [str(d) for d in listing["devices"]]
        self.sockets: list[str] = [os.path.join(directory, s) for s in listing["sockets"]]
        flags = os.O_RDWR if writable else os.O_RDONLY
        fd = os.open(os.path.join(directory, TABLE), flags)
        try:
            access = mmap.ACCESS_WRITE if writable else mmap.ACCESS_READ
            self._map = mmap.mmap(fd, SLOT.size * len(self.devices), access=access)
        finally:
            os.close(fd)  # the mapping stays valid without the descriptor

    @classmethod
    def create(cls, directory: str, devices: list[str], sockets: list[str] | None = None) -> EngineBoard:
        """A board with every device down; ``sockets`` (names inside ``directory``) default to ``engine-<i>.sock``."""
        names = sockets or [f"engine-{i}.sock" for i in range(len(devices))]
        with open(os.path.join(directory, TABLE), "wb") as table:
            table.write(bytes(SLOT.size * len(devices)))
        staging = os.path.join(directory, INDEX + ".new")
        with open(staging, "w") as index:
            json.dump({"devices": devices, "sockets": names}, index)
        os.rename(staging, os.path.join(directory, INDEX))  # readers never see half an index
        return cls(directory, writable=True)

    def read(self, index: int) -> Slot:
        up, generation, restarts = SLOT.unpack_from(self._map, index * SLOT.size)
        return Slot(bool(up), generation, restarts)

    def write(self, index: int, slot: Slot) -> None:
        SLOT.pack_into(self._map, index * SLOT.size, int(slot.up), slot.generation, slot.restarts)

    def status(self) -> list[DeviceStatus]:
        return [DeviceStatus(device, s.up, s.restarts) for device, s in zip(self.devices, self.slots(), strict=True)]

    def slots(self) -> list[Slot]:
        return [self.read(i) for i in range(len(self.devices))]

    def close(self) -> None:
        self._map.close()
