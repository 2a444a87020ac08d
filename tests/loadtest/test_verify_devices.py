"""The GPU verification script (loadtest/verify_devices.py), run on the CPU with two CPU engine processes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.service.server_support import REPO, clean_env

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def test_verify_devices_kills_one_engine_under_load_and_reports_a_pass(small_bundle: Path, tmp_path: Path) -> None:
    out = tmp_path / "devices.json"
    command = [sys.executable, "loadtest/verify_devices.py", "--model-dir", str(small_bundle), "--devices", "cpu:2"]
    command += ["--workers", "2", "--seq", "16", "--inputs", "8", "--concurrency", "3", "--max-batch-size", "8"]
    command += ["--duration", "12", "--kill-at", "3", "--ready-timeout", "120", "--out", str(out)]
    result = subprocess.run(command, cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=280)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    document = json.loads(out.read_text())
    equal = document["equal_per_device"]
    assert equal["devices"] == ["cpu0", "cpu1"] and equal["equal"]
    killed = document["kill_under_load"]
    assert killed["passed"] and killed["killed_device"] == "cpu0" and killed["restarts"] == 1
    assert killed["outcomes"]["200"] > 0 and killed["victim_samples_since_kill"] > 0
    assert killed["readyz_named_it_down"] and killed["recovery_s"] is not None
