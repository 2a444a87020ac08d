"""Helpers for tests that start real engine processes (the fake engine) from the test process."""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator

import psutil
import pytest

from tests.service.server_support import clean_env


def use_env(monkeypatch: pytest.MonkeyPatch, **extra: str) -> None:
    """The engine process inherits ``os.environ``: make it the clean service environment plus ``extra``."""
    wanted = clean_env(**extra)
    for name in list(os.environ):
        if name not in wanted:
            monkeypatch.delenv(name)
    for name, value in wanted.items():
        monkeypatch.setenv(name, value)


def engine_children() -> list[psutil.Process]:
    found = []
    for child in psutil.Process().children(recursive=True):
        try:
            if "service.engine.host" in " ".join(child.cmdline()):
                found.append(child)
        except psutil.Error:  # exited (or a zombie) meanwhile
            continue
    return found


@contextlib.contextmanager
def sigterm_recorded() -> Iterator[list[int]]:
    """SIGTERMs to this process are recorded instead of ending it (the watcher sends one to its supervisor)."""
    received: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda signum, _: received.append(signum))
    try:
        yield received
    finally:
        signal.signal(signal.SIGTERM, previous)
