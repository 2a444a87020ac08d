from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from service.settings import Settings


def test_environment_variables_use_the_encoder_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ENCODER_MAX_BATCH_SIZE", "16")
    monkeypatch.setenv("ENCODER_SEQ_LENS", "128,196")
    monkeypatch.setenv("ENCODER_MODEL_DIR", "/models/a")
    settings = Settings()
    assert settings.max_batch_size == 16 and settings.seq_lens == (128, 196)
    assert settings.model_dir == Path("/models/a")
    assert Settings(max_batch_size=4).max_batch_size == 4  # explicit values win over the environment


def test_to_env_round_trips(monkeypatch: pytest.MonkeyPatch) -> None:
    original = Settings(port=9001, model_dir=Path("/m"), seq_lens=(64, 196), cuda_graphs=False, max_delay_ms=2.5)
    for key, value in original.to_env().items():
        monkeypatch.setenv(key, value)
    assert Settings() == original


@pytest.mark.parametrize(
    "bad", [{"max_batch_size": 0}, {"provider": "gpu"}, {"seq_lens": "0"}, {"request_timeout_ms": 0}, {"port": -1}]
)
def test_invalid_values_are_refused(bad: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        Settings(**bad)  # type: ignore[arg-type]
