"""The one-command CUDA shared-memory script (verification, then the benchmark), run on the CPU with SMOKE=1: the
service's fake CUDA layer, a small fp16 bundle, tiny durations."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from loadtest.peers import profile
from tests.service.server_support import REPO, clean_env

pytestmark = pytest.mark.slow


def test_script_verifies_then_benchmarks_and_leaves_its_files(small_fp16_bundle: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    env = clean_env(SMOKE="1", BUNDLE=str(small_fp16_bundle), PYTHON=sys.executable, PROTOCOLS="shm-http,cuda-shm")
    env["PYTHONPATH"] = str(REPO)
    command = ["bash", "loadtest/gpu_cudashm_run.sh", str(out)]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert {"verify.json", "verify.log", "bench.json", "bench.log"} <= {p.name for p in out.iterdir()}
    verified = json.loads((out / "verify.json").read_text())
    assert verified["passed"] and verified["checks"]["x1 fp16 took the device-to-device path"]["ok"]
    document = json.loads((out / "bench.json").read_text())
    points = {r["format"]: r for r in document["results"] if r.get("protocol")}
    assert {"shm-http", "shm-http x4", "cuda-shm", "cuda-shm x4"} <= set(points)
    for point in points.values():
        assert point["errors"] == 0 and point["shm_paths"]["copied"] == 0 and point["shm_paths"]["direct"] > 0
    profiled = points["cuda-shm"]["profile"]
    if profile.py_spy() is not None and "error" not in profiled:
        assert "client" in {p["role"] for p in profiled["processes"]}  # the load's clients, beside the service
