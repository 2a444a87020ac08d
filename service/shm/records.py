"""The registry of shared-memory regions that every worker process reads: one directory, one entry per region.

Each entry is a symbolic link whose *target* is the region's record (JSON: name, key, offset, size, the
object's device and inode, a random token). A link is created atomically with its whole content by one
``symlink()``, which fails if the name is taken (duplicate detection across processes with no lock), and read
back whole by one ``readlink()``: the per-request check that a region is still registered is that one system
call, and the token tells a re-registration under the same name from the registration a worker mapped before,
exactly (a file's inode or mtime can repeat within one clock tick). The link is never followed. Register takes
an ``flock`` on the directory so the count and byte limits hold across workers; reads take no lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import os
import secrets
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

from service.errors import NotFound

_PREFIX = "region-"
_LOCK = ".lock"


@dataclass(frozen=True)
class Record:
    """One registered region: what status shows, plus the identity of the object it was registered with."""

    name: str
    key: str
    offset: int
    byte_size: int
    device: int
    inode: int
    token: str

    @classmethod
    def new(cls, name: str, key: str, offset: int, byte_size: int, st: os.stat_result) -> Record:
        return cls(name, key, offset, byte_size, st.st_dev, st.st_ino, secrets.token_hex(16))

    def encode(self) -> str:
        # Not ASCII-escaped: a name of 256 characters stays under the 4 KiB a link can hold.
        return json.dumps(asdict(self), separators=(",", ":"), ensure_ascii=False)

    @classmethod
    def decode(cls, text: str) -> Record:
        return cls(**json.loads(text))

    def status(self) -> dict[str, Any]:
        """Triton's status entry."""
        return {"name": self.name, "key": self.key, "offset": self.offset, "byte_size": self.byte_size}


@functools.lru_cache(maxsize=1024)  # looked up on every request; bounded, since names come from clients
def entry_name(name: str) -> str:
    """A hash, not the name: region names are arbitrary strings ('/', '..', 200 characters are all names)."""
    return _PREFIX + hashlib.sha256(name.encode()).hexdigest()


class Stored(Protocol):
    """What the directory stores: a named record that encodes to text and back, and its Triton status entry."""

    @property
    def name(self) -> str: ...

    def encode(self) -> str: ...

    def status(self) -> dict[str, Any]: ...


R = TypeVar("R", bound=Stored)


class RecordDir(Generic[R]):
    """The registry directory (shared by the workers of one server); ``decode`` reads its records back
    (:meth:`Record.decode` for system regions; CUDA regions have records of their own)."""

    def __init__(self, path: Path, decode: Callable[[str], R]) -> None:
        self.path = path
        self._decode = decode
        self._prefix = f"{path}/"  # plain string joins: pathlib's cost 6 us of the per-request lookup

    def _entry(self, name: str) -> str:
        return self._prefix + entry_name(name)

    def read_raw(self, name: str) -> str | None:
        """The record of ``name`` as stored (compare it to tell registrations apart), None when not registered."""
        try:
            return os.readlink(self._entry(name))
        except FileNotFoundError:
            return None

    def read(self, name: str) -> R | None:
        raw = self.read_raw(name)
        return None if raw is None else self._decode(raw)

    def create(self, record: R) -> bool:
        """Store ``record``; False if its name is taken."""
        try:
            os.symlink(record.encode(), self._entry(record.name))
        except FileExistsError:
            return False
        return True

    def remove(self, name: str) -> bool:
        """Drop the record of ``name``; False if there was none."""
        try:
            os.unlink(self._entry(name))
        except FileNotFoundError:
            return False
        return True

    def status(self, name: str | None, what: str) -> list[dict[str, Any]]:
        """Triton's status entries: every record, or the one named (NotFound, naming ``what``, when it is not)."""
        if name is None:
            return [r.status() for r in self.all()]
        record = self.read(name)
        if record is None:
            raise NotFound(f"no {what} {name!r} is registered")
        return [record.status()]

    def all(self) -> list[R]:
        """Every registered region, by name."""
        records = []
        try:
            entries = os.listdir(self.path)
        except FileNotFoundError:  # removed under us (a /tmp cleaner): nothing is registered
            return []
        for entry in entries:
            if not entry.startswith(_PREFIX):
                continue
            with contextlib.suppress(FileNotFoundError):  # unregistered while we listed
                records.append(self._decode(os.readlink(self.path / entry)))
        return sorted(records, key=lambda r: r.name)

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Exclusive across processes: the check-then-create of a registration under the limits."""
        fd = os.open(self.path / _LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # also releases the lock
