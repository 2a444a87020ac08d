from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from service.engine import default_bundle
from service.engine.default_bundle import DefaultModelError, ensure_default_bundle


@pytest.fixture
def fake_converter(monkeypatch: pytest.MonkeyPatch, small_bundle: Path) -> list[list[str]]:
    """Stands in for `python -m converter`: copies the small bundle to --out and records the command."""
    calls: list[list[str]] = []

    def run(command: list[str], check: bool = False) -> subprocess.CompletedProcess[str]:
        calls.append(command)
        shutil.copytree(small_bundle, command[command.index("--out") + 1])
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(default_bundle.subprocess, "run", run)
    return calls


def test_cpu_gets_fp32() -> None:
    assert default_bundle.default_precision("cpu") == "fp32"


def test_converts_once_then_reuses_the_cache(tmp_path: Path, fake_converter: list[list[str]]) -> None:
    first = ensure_default_bundle("cpu", tmp_path)
    assert first == tmp_path / "default-fp32" and (first / "manifest.json").is_file()
    (command,) = fake_converter
    assert command[1:3] == ["-m", "converter"] and command[command.index("--precision") + 1] == "fp32"
    assert ensure_default_bundle("cpu", tmp_path) == first
    assert len(fake_converter) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["default-fp32"]  # no staging left behind


def test_a_damaged_cache_is_converted_again(tmp_path: Path, fake_converter: list[list[str]]) -> None:
    target = ensure_default_bundle("cpu", tmp_path)
    with (target / "model.onnx").open("ab") as fh:
        fh.write(b"tampered")
    assert ensure_default_bundle("cpu", tmp_path) == target
    assert len(fake_converter) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["default-fp32"]


def test_a_failed_conversion_leaves_no_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(command: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        Path(command[command.index("--out") + 1]).mkdir()
        return subprocess.CompletedProcess(command, 2)

    monkeypatch.setattr(default_bundle.subprocess, "run", fail)
    with pytest.raises(DefaultModelError, match="exit 2"):
        ensure_default_bundle("cpu", tmp_path)
    assert list(tmp_path.iterdir()) == []
