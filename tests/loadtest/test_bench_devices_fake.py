"""loadtest/bench_devices_fake.py on the CPU: one engine process against two, the fake engine, a short run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.service.server_support import REPO, clean_env

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


def test_one_engine_against_two_reports_batches_per_device_and_a_table(tmp_path: Path) -> None:
    out = tmp_path / "devices.json"
    command = [sys.executable, "loadtest/bench_devices_fake.py", "--devices", "cpu:1", "--devices", "cpu:2"]
    command += ["--concurrency", "4", "--fake-delay-ms", "10", "--duration", "1", "--warmup", "0.3", "--out", str(out)]
    result = subprocess.run(command, cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=220)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    one, two = json.loads(out.read_text())["rows"]
    assert (one["devices"], two["devices"]) == ("cpu:1", "cpu:2")
    assert one["errors"] == two["errors"] == 0 and one["requests_ok"] > 0 and two["requests_ok"] > 0
    assert set(one["engine"]) == {"cpu0"} and set(two["engine"]) == {"cpu0", "cpu1"}
    assert two["engine"]["cpu0"]["samples"] > 0  # a light load is packed onto the first (service/engine/routing.py)
    assert two["workers"]["batches"] > 0 and two["cpu_ms_per_sample"] > 0
    assert "| cpu:2 |" in result.stdout
