"""The registry's place in the service: one directory per server for its workers, made and removed by the
supervisor; a private one for a single worker, opened and closed with the app's lifespan."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from service.__main__ import worker_environment
from service.settings import ENV_PREFIX, Settings
from service.shm import SystemSharedMemory
from tests.service.support import serving

VAR = ENV_PREFIX + "SHARED_MEMORY_DIR"


def test_the_supervisor_makes_one_registry_directory_for_its_workers_and_removes_it() -> None:
    with worker_environment(Settings(workers=2, shared_memory="system")):
        path = Path(os.environ[VAR])
        assert path.is_dir() and oct(path.stat().st_mode & 0o777) == "0o700"
        worker = Settings()  # what a worker process builds from the environment
        assert worker.shared_memory_dir == str(path) and "system" in worker.shared_memory_kinds
    assert not path.exists() and VAR not in os.environ


def test_no_registry_directory_without_the_extension() -> None:
    with worker_environment(Settings(workers=2)):
        assert VAR not in os.environ


@pytest.mark.anyio
async def test_a_single_worker_opens_a_private_registry_and_removes_it_at_shutdown() -> None:
    async with serving(shared_memory="system") as (_, app):
        shm = app.state.service.shared_memory
        assert isinstance(shm, SystemSharedMemory)
        path = shm.records.path
        assert path.is_dir()
    assert not path.exists()
    async with serving() as (_, app):
        assert app.state.service.shared_memory is None
