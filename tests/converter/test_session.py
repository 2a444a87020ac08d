from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from converter.bundle import load_bundle
from converter.errors import ProviderError
from converter.providers import CPU, SessionOptions
from converter.session import EncoderSession


def gpu_usable() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def test_cpu_session_reports_cpu(small_bundle: Path) -> None:
    session = EncoderSession(load_bundle(small_bundle), SessionOptions(provider="cpu"))
    assert session.provider == CPU and not session.on_gpu
    assert session.describe()["provider"] == CPU
    shapes = session.warmup()
    assert shapes == [(b, 196) for b in SessionOptions().batch_buckets]


def test_rejects_wrong_shapes(small_bundle: Path) -> None:
    session = EncoderSession(load_bundle(small_bundle), SessionOptions(provider="cpu"))
    with pytest.raises(ValueError, match="expected"):
        session.run(np.zeros((2, 3, 65), np.float32))


@pytest.mark.skipif(gpu_usable(), reason="this machine has a usable GPU")
@pytest.mark.parametrize("provider", ["cuda", "tensorrt"])
def test_explicit_gpu_without_gpu_is_an_error(small_bundle: Path, provider: str) -> None:
    # onnxruntime-gpu lists the GPU providers even where they cannot start; we must refuse, not fall back.
    with pytest.raises(ProviderError, match=provider if provider == "cuda" else "TensorrtExecutionProvider"):
        EncoderSession(load_bundle(small_bundle), SessionOptions(provider=provider))


@pytest.mark.skipif(gpu_usable(), reason="this machine has a usable GPU")
def test_auto_falls_back_to_cpu_loudly(small_bundle: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="converter.session"):
        session = EncoderSession(load_bundle(small_bundle), SessionOptions(provider="auto"))
    assert session.provider == CPU
    assert "running on the CPU" in caplog.text


def test_explicit_provider_missing_from_build(small_bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ort, "get_available_providers", lambda: [CPU])
    with pytest.raises(ProviderError, match="not available in this onnxruntime build"):
        EncoderSession(load_bundle(small_bundle), SessionOptions(provider="cuda"))
