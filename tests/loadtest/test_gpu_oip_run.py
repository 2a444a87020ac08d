"""The one-command GPU benchmark script, run on the CPU with SMOKE=1 (tiny durations, a small bundle)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from loadtest.peers import profile
from loadtest.peers.triton.server import unavailable
from tests.service.server_support import REPO, clean_env

pytestmark = pytest.mark.slow


def test_script_runs_the_whole_benchmark_and_leaves_its_files(small_bundle: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    env = clean_env(SMOKE="1", BUNDLE=str(small_bundle), PROTOCOLS="raw,oip-http", PYTHON=sys.executable)
    env["PROFILE_POINTS"] = "oip-http:4"  # py-spy over the service and its engine process at that load
    env["PYTHONPATH"] = str(REPO)
    result = subprocess.run(
        ["bash", "loadtest/gpu_oip_run.sh", str(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert {"env.txt", "bench.json", "bench.log", "bench-service.log"} <= {p.name for p in out.iterdir()}
    assert "python 3." in (out / "env.txt").read_text()
    document = json.loads((out / "bench.json").read_text())
    formats = {(r["server"], r["format"]) for r in document["results"]}
    assert {("service", "raw"), ("service", "oip-http"), ("service", "oip-http x4")} <= formats
    for point in document["results"]:
        assert point["errors"] == 0 and point["value_checks"]
    (profiled,) = [r for r in document["results"] if "profile" in r]
    assert (profiled["server"], profiled["format"]) == ("service", "oip-http x4")
    if profile.py_spy() is not None and "error" not in profiled["profile"]:
        roles = {p["role"] for p in profiled["profile"]["processes"]}
        assert "main" in roles and profiled["profile"]["samples"] > 0
        assert Path(profiled["profile"]["stacks"]).is_file()
    if unavailable() is None:
        assert {("triton", "oip-http"), ("triton", "oip-http x4")} <= formats
        assert "service vs Triton" in result.stdout
    else:
        assert "triton" in document["skipped"]
