"""The engine supervisor: one engine process per device, restarted with backoff, the service stopped when one
keeps dying. Real engine processes (the fake engine), pinned to made-up GPUs."""

from __future__ import annotations

import os
import shutil
import signal
import stat
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from service.engine.board import Slot
from service.engine.devices import Device
from service.engine.fake import fake_output
from service.engine.process import EngineProcess
from service.engine.supervisor import EngineSupervisor, RestartPolicy, supervised
from tests.service.engine.processes import engine_children, sigterm_recorded, use_env
from tests.service.engine.support import remotes, sample, wait_until

pytestmark = pytest.mark.timeout(60)


FAST = RestartPolicy(limit=3, window_s=60.0, backoff_s=0.05, backoff_max_s=0.2)
TWO_GPUS = (Device("0", "3"), Device("1", "5"))  # the fake engine runs anywhere: the pinning is what is checked


def answers(path: str, seed: int) -> None:
    with remotes(path) as (remote,):
        x = sample(seed, batch=2)
        np.testing.assert_allclose(remote.run(x), fake_output(x), rtol=1e-6)


def by_device(children: list[psutil.Process]) -> dict[str, psutil.Process]:
    return {child.cmdline()[child.cmdline().index("--device") + 1]: child for child in children}


@pytest.mark.usefixtures("fake_env", "no_engine_left")
def test_one_engine_process_per_device_each_seeing_only_its_gpu() -> None:
    with supervised(TWO_GPUS, FAST) as supervisor:
        children = by_device(engine_children())
        assert sorted(children) == ["0", "1"]
        assert children["0"].environ()["CUDA_VISIBLE_DEVICES"] == "3"
        assert children["1"].environ()["CUDA_VISIBLE_DEVICES"] == "5"
        for child in children.values():
            assert os.getsid(child.pid) != os.getsid(0)  # its own session: a terminal's Ctrl-C reaches only us
        assert supervisor.board.slots() == [Slot(True, 1, 0), Slot(True, 1, 0)]
        for i, path in enumerate(supervisor.board.sockets):
            assert path.startswith(supervisor.directory)
            answers(path, i)
        directory = supervisor.directory
    assert supervisor.gave_up is None
    assert not os.path.exists(directory)
    assert not any(child.is_running() for child in children.values())


@pytest.mark.usefixtures("fake_env", "no_engine_left")
def test_a_killed_engine_process_is_restarted_on_its_device_and_counted() -> None:
    with sigterm_recorded() as received, supervised(TWO_GPUS, FAST) as supervisor:
        before = by_device(engine_children())
        before["1"].kill()
        wait_until(lambda: supervisor.board.read(1) == Slot(True, 2, 1), "the restarted engine")
        after = by_device(engine_children())
        assert after["1"].pid != before["1"].pid and after["1"].environ()["CUDA_VISIBLE_DEVICES"] == "5"
        assert after["0"].pid == before["0"].pid and supervisor.board.read(0) == Slot(True, 1, 0)  # untouched
        answers(supervisor.board.sockets[1], 7)  # the new process serves on the same socket path
    assert received == [] and supervisor.gave_up is None


@pytest.mark.usefixtures("fake_env", "no_engine_left")
def test_an_engine_that_keeps_dying_makes_the_supervisor_stop_the_service() -> None:
    policy = RestartPolicy(limit=1, window_s=60.0, backoff_s=0.05, backoff_max_s=0.05)
    with sigterm_recorded() as received, supervised(TWO_GPUS[:1], policy) as supervisor:
        engine_children()[0].kill()
        wait_until(lambda: supervisor.board.read(0) == Slot(True, 2, 1), "the first restart")
        engine_children()[0].kill()  # the second death within the window: over the limit of one restart
        wait_until(lambda: bool(received), "the supervisor to stop the service")
        assert received == [signal.SIGTERM]
        assert supervisor.gave_up is not None and "died 2 times within 60 s" in supervisor.gave_up
        assert supervisor.board.read(0) == Slot(False, 2, 1)  # down, not restarted again
        time.sleep(0.2)
        assert engine_children() == []


@pytest.mark.usefixtures("no_engine_left")
def test_restarts_that_fail_before_ready_count_towards_the_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    use_env(monkeypatch, ENCODER_ENGINE="fake", ENCODER_LOG_LEVEL="critical")
    policy = RestartPolicy(limit=2, window_s=60.0, backoff_s=0.01, backoff_max_s=0.01)
    with sigterm_recorded() as received, supervised(TWO_GPUS[:1], policy) as supervisor:
        # From now on a start fails (a model directory without a bundle): each restart dies before it is ready.
        monkeypatch.setenv("ENCODER_ENGINE", "onnx")
        monkeypatch.setenv("ENCODER_MODEL_DIR", "/nonexistent-model-dir")
        engine_children()[0].kill()
        wait_until(lambda: bool(received), "the supervisor to give up", timeout=60)
        assert supervisor.gave_up is not None and "died 3 times" in supervisor.gave_up
        assert supervisor.board.read(0) == Slot(False, 1, 2)  # two restarts tried, neither came up


@pytest.mark.usefixtures("no_engine_left")
def test_a_start_that_fails_raises_and_leaves_nothing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    empty = tmp_path / "model"
    empty.mkdir()
    use_env(monkeypatch, ENCODER_ENGINE="onnx", ENCODER_MODEL_DIR=str(empty), ENCODER_LOG_LEVEL="critical")
    scratch = tempfile.mkdtemp(prefix="ep-", dir="/tmp")  # short: a socket path under it stays usable
    try:
        monkeypatch.setattr(tempfile, "tempdir", scratch)  # where the supervisor's directory goes
        with pytest.raises(RuntimeError, match=r"device 0 exited with status .* before it was ready"):
            EngineSupervisor(TWO_GPUS).start()
        assert os.listdir(scratch) == []
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


@pytest.mark.usefixtures("fake_env", "no_engine_left")
def test_a_stale_socket_is_not_mistaken_for_a_ready_engine(tmp_path: Path) -> None:
    directory = tempfile.mkdtemp(prefix="ep-", dir="/tmp")
    try:
        path = os.path.join(directory, "s")
        open(path, "w").close()  # what a killed engine process leaves behind
        process = EngineProcess(path, Device("cpu", None))
        process.start()
        assert process.wait_ready()
        assert stat.S_ISSOCK(os.stat(path).st_mode)  # the engine's socket, not the stale file
        answers(path, 3)
        process.stop()
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.mark.usefixtures("fake_env", "no_engine_left")
def test_stopping_does_not_count_as_dying() -> None:
    with sigterm_recorded() as received:
        with supervised(TWO_GPUS, FAST) as supervisor:
            pass
        time.sleep(0.2)  # the watchers have seen the exits by now
    assert received == [] and supervisor.gave_up is None


def test_the_backoff_doubles_with_recent_deaths_up_to_its_bound() -> None:
    policy = RestartPolicy(limit=5, window_s=60.0, backoff_s=0.5, backoff_max_s=3.0)
    assert [policy.delay(n) for n in (1, 2, 3, 4, 5)] == [0.5, 1.0, 2.0, 3.0, 3.0]
