from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import psutil
import pytest

from service.engine.fake import fake_output
from service.engine.process import EngineProcess, engine_process
from tests.service.engine.support import remotes, sample, wait_until
from tests.service.server_support import clean_env

pytestmark = pytest.mark.timeout(60)


def use_env(monkeypatch: pytest.MonkeyPatch, **extra: str) -> None:
    """The engine process inherits ``os.environ``: make it the clean service environment plus ``extra``."""
    wanted = clean_env(**extra)
    for name in list(os.environ):
        if name not in wanted:
            monkeypatch.delenv(name)
    for name, value in wanted.items():
        monkeypatch.setenv(name, value)


@pytest.fixture
def fake_env(monkeypatch: pytest.MonkeyPatch) -> None:
    use_env(monkeypatch, ENCODER_ENGINE="fake", ENCODER_MAX_BATCH_SIZE="8", ENCODER_LOG_LEVEL="warning")


def engine_children() -> list[psutil.Process]:
    found = []
    for child in psutil.Process().children(recursive=True):
        try:
            if "service.engine.host" in " ".join(child.cmdline()):
                found.append(child)
        except psutil.Error:  # exited (or a zombie) meanwhile
            continue
    return found


@pytest.fixture
def no_engine_left() -> Iterator[None]:
    before = {p.pid for p in engine_children()}
    yield
    left = [p for p in engine_children() if p.pid not in before and p.status() != psutil.STATUS_ZOMBIE]
    for process in left:
        process.kill()
    assert not left, "an engine process outlived its context"


@pytest.mark.usefixtures("fake_env", "no_engine_left")
def test_engine_process_yields_a_ready_process_that_workers_can_use() -> None:
    with engine_process() as process:
        assert os.path.exists(process.path) and process.path.startswith(process.directory)
        (child,) = engine_children()
        assert os.getsid(child.pid) != os.getsid(0)  # its own session: a terminal's Ctrl-C reaches only us
        with remotes(process.path, 2) as (first, second):
            assert first.buckets == (1, 2, 4, 8) and first.describe()["engine_process"]["socket"] == process.path
            for i, remote in enumerate((first, second, first)):
                x = sample(i, batch=1 + i)
                np.testing.assert_allclose(remote.run(x), fake_output(x), rtol=1e-6)
        directory = process.directory
    assert process.died_with is None  # stopped on purpose: not reported as a death
    assert not os.path.exists(directory)
    assert not child.is_running()
    assert not engine_children()


@pytest.mark.usefixtures("no_engine_left")
def test_a_start_that_fails_raises_and_leaves_nothing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    empty = tmp_path / "model"
    empty.mkdir()
    use_env(monkeypatch, ENCODER_ENGINE="onnx", ENCODER_MODEL_DIR=str(empty), ENCODER_LOG_LEVEL="critical")
    process = EngineProcess()
    process.start()
    try:
        with pytest.raises(RuntimeError, match="exited with status"):
            process.wait_ready()
    finally:
        process.stop()
    assert not os.path.exists(process.directory)

    scratch = tempfile.mkdtemp(prefix="ep-", dir="/tmp")  # short: a socket path under it stays usable
    try:
        monkeypatch.setattr(tempfile, "tempdir", scratch)  # where the context manager's directory goes
        with pytest.raises(RuntimeError, match="before it was ready"), engine_process():
            pytest.fail("the body must not run")
        assert os.listdir(scratch) == []
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


@contextlib.contextmanager
def sigterm_recorded() -> Iterator[list[int]]:
    """SIGTERMs to this process are recorded instead of ending it (the watcher sends one to its supervisor)."""
    received: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda signum, _: received.append(signum))
    try:
        yield received
    finally:
        signal.signal(signal.SIGTERM, previous)


@pytest.mark.usefixtures("fake_env", "no_engine_left")
def test_an_engine_process_that_dies_is_recorded_and_stops_the_supervisor() -> None:
    with sigterm_recorded() as received, engine_process() as process:
        (child,) = engine_children()
        child.kill()
        wait_until(lambda: process.died_with is not None and bool(received), "the watcher to notice")
        assert process.died_with == -signal.SIGKILL
        assert received == [signal.SIGTERM]  # the supervisor stops itself: uvicorn then stops the workers


@pytest.mark.usefixtures("fake_env", "no_engine_left")
def test_stopping_does_not_count_as_dying() -> None:
    with sigterm_recorded() as received:
        with engine_process() as process:
            pass
        time.sleep(0.2)  # the watcher thread has seen the exit by now
    assert process.died_with is None and received == []
