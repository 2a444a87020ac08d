from __future__ import annotations

from collections.abc import Iterator

import psutil
import pytest

from tests.service.engine.processes import engine_children, use_env


@pytest.fixture
def fake_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Engine processes started by the test serve the fake engine (they read the ``ENCODER_*`` environment)."""
    use_env(monkeypatch, ENCODER_ENGINE="fake", ENCODER_MAX_BATCH_SIZE="8", ENCODER_LOG_LEVEL="warning")


@pytest.fixture
def no_engine_left() -> Iterator[None]:
    before = {p.pid for p in engine_children()}
    yield
    left = [p for p in engine_children() if p.pid not in before and p.status() != psutil.STATUS_ZOMBIE]
    for process in left:
        process.kill()
    assert not left, "an engine process outlived its context"
