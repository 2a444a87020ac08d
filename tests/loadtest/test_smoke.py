"""CPU smoke runs of the load-test tooling against real servers: short, small, and strict about failures."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.service.server_support import REPO, clean_env, running

pytestmark = pytest.mark.slow


def test_locust_run_steps_up_without_failures(small_bundle: Path, tmp_path: Path) -> None:
    serve = ["-m", "service", "--model-dir", str(small_bundle), "--provider", "cpu", "--host", "127.0.0.1"]
    serve += ["--seq-lens", "64,128", "--max-batch-size", "32"]
    out = tmp_path / "run"
    with running(serve, tmp_path / "server.log") as url:
        # --check-torch: the small bundle is the built-in model, so PyTorch gives independent expected values.
        command = [sys.executable, "loadtest/run.py", "--host", url, "--steps", "2,4", "--step-seconds", "5"]
        command += ["--out", str(out), "--check-fraction", "0.5", "--check-torch"]
        result = subprocess.run(command, cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["failures"] == 0 and summary["requests"] > 0
    assert summary["value_checks"]["torch_reference"] > 0
    assert summary["value_checks"]["checked"] > 0 and summary["value_checks"]["mismatched"] == 0
    assert [step["users"] for step in summary["per_step"]] == [2, 4]
    assert all(step["samples_per_s"] > 0 for step in summary["per_step"])
    assert {v["batch_size"] for v in summary["per_request_name"].values()} >= {1, 8}
    assert any(name.startswith("encode oip ") for name in summary["per_request_name"])  # the OIP binary user
    formed = summary["server_batches"]
    assert formed["batches"] > 0 and formed["samples"] >= summary["requests"]
    for name in ("locust_stats.csv", "locust_stats_history.csv", "locust_failures.csv"):
        assert (out / name).stat().st_size > 0
    for name in ("throughput_vs_concurrency.png", "latency_by_batch_size.png", "server_batch_sizes.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_service_benchmark_runs_on_cpu(small_bundle: Path, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    command = [sys.executable, "loadtest/bench_service.py", "--device", "cpu", "--model-dir", str(small_bundle)]
    command += ["--servers", "service,json,echo,naive,litserve", "--concurrency", "2", "--duration", "1.5"]
    command += ["--warmup", "0.5", "--workers", "1", "--clients", "1", "--seq", "64", "--out", str(out)]
    result = subprocess.run(command, cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    document = json.loads(out.read_text())
    points = {r["server"]: r for r in document["results"]}
    assert {"service", "json", "echo", "naive"} <= set(points)
    for point in points.values():
        assert point["errors"] == 0 and point["samples_per_s"] > 0 and point["p50_ms"] > 0
    assert points["service"]["server_batches"]["batches"] > 0
    assert document["targets"][0]["concurrency"] == 2
    assert ("litserve" in points) != ("litserve" in document["skipped"])
    assert "| service | raw | 2 |" in result.stdout


def test_service_benchmark_compares_device_sets_in_one_run(small_bundle: Path, tmp_path: Path) -> None:
    """``--devices A --devices B``: the service runs once per device set (here one and two CPU engine processes)."""
    out = tmp_path / "bench.json"
    command = [sys.executable, "loadtest/bench_service.py", "--device", "cpu", "--model-dir", str(small_bundle)]
    command += ["--servers", "service", "--devices", "cpu", "--devices", "cpu:2", "--concurrency", "4"]
    command += ["--duration", "1.5", "--warmup", "0.5", "--workers", "1", "--clients", "1", "--seq", "64"]
    command += ["--out", str(out)]
    result = subprocess.run(command, cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    document = json.loads(out.read_text())
    points = {r["server"]: r for r in document["results"]}
    assert set(points) == {"service@cpu", "service@cpu:2"}
    assert points["service@cpu"]["server_devices"].keys() == {"cpu"}
    served = points["service@cpu:2"]["server_devices"]
    # Both engine processes served; the first computed (a light load may stay there, see service/engine/routing.py).
    assert served.keys() == {"cpu0", "cpu1"} and served["cpu0"] > 0, served
    (row,) = document["device_scaling"]
    assert (row["server"], row["vs"], row["concurrency"]) == ("service@cpu:2", "service@cpu", 4)
    assert "service@cpu:2 vs service@cpu at 4:" in result.stdout
