"""Opening a client's POSIX shared-memory object (``shm_open``'s ``/dev/shm/<key>``) without trusting the key.

A key names a file the service will map read-write, so it is held to the rules below before anything is mapped:
one plain name in ``/dev/shm`` (an optional leading ``/``, as ``shm_open`` takes it, and nothing else that could
walk elsewhere: no other ``/``, no ``.``/``..``, no NUL), never followed through a symbolic link
(``O_NOFOLLOW``), a regular file (not a FIFO or device that could block or misbehave when mapped), and owned
by the user the service runs as: whoever can create such a file could already read and write the service's
memory, so accepting it grants nobody anything new. Every check runs on the opened descriptor (``fstat``),
so the file cannot be swapped between the check and the mapping.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from service.errors import Forbidden, InvalidInput, NotFound

DEV_SHM = Path("/dev/shm")
MAX_KEY_BYTES = 255  # NAME_MAX: the longest name a file in /dev/shm can have
_OPEN_FLAGS = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY


def object_name(key: object) -> str:
    """The file name in ``/dev/shm`` that ``key`` stands for; InvalidInput if it is not one plain name."""
    if not isinstance(key, str):
        raise InvalidInput(f"the shared-memory key must be a string, got {type(key).__name__}")
    name = key[1:] if key.startswith("/") else key
    if not name:
        raise InvalidInput("the shared-memory key is empty")
    if "\0" in name:
        raise InvalidInput("the shared-memory key contains a NUL character")
    if "/" in name or name in (".", ".."):
        raise InvalidInput(f"the shared-memory key {key!r} must be one name in /dev/shm (no '/' after the first)")
    try:
        size = len(name.encode())
    except UnicodeEncodeError:
        raise InvalidInput("the shared-memory key is not valid UTF-8 text") from None
    if size > MAX_KEY_BYTES:
        raise InvalidInput(f"the shared-memory key is longer than {MAX_KEY_BYTES} bytes")
    return name


def open_object(key: str, root: Path = DEV_SHM) -> tuple[int, os.stat_result]:
    """Open the shared-memory object ``key`` read-write: its descriptor and ``fstat``, after every check.

    A key that names nothing is NotFound (404: Triton answers 500 here); one that exists but may not be used
    is Forbidden (403); the caller owns the descriptor.
    """
    name = object_name(key)
    try:
        fd = _open_in(root, name)
    except FileNotFoundError:
        raise NotFound(f"no shared-memory object {key!r} ({root / name}): create it first (shm_open)") from None
    except OSError as exc:
        raise _refusal(key, exc) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise Forbidden(f"the shared-memory object {key!r} is not a regular file")
        if st.st_uid != os.geteuid():
            raise Forbidden(
                f"the shared-memory object {key!r} belongs to uid {st.st_uid}; only objects of the service's own "
                f"user (uid {os.geteuid()}) can be registered"
            )
    except BaseException:
        os.close(fd)
        raise
    return fd, st


def _open_in(root: Path, name: str) -> int:
    """``name`` inside ``root``, where ``root`` itself is a directory and not a link to one."""
    try:
        root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise NotFound(f"no shared-memory directory {root}: {exc.strerror}") from None
    try:
        return os.open(name, _OPEN_FLAGS, dir_fd=root_fd)
    finally:
        os.close(root_fd)


def _refusal(key: str, exc: OSError) -> Exception:
    if exc.errno == errno.ELOOP:
        return Forbidden(f"the shared-memory object {key!r} is a symbolic link (not followed)")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return Forbidden(f"the shared-memory object {key!r} cannot be opened for reading and writing")
    if exc.errno == errno.EISDIR:
        return Forbidden(f"the shared-memory object {key!r} is a directory")
    return Forbidden(f"the shared-memory object {key!r} cannot be opened: {exc.strerror}")
