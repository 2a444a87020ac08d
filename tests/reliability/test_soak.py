"""Soak: a locust run at about twice the measured saturation of the small CPU model.

Calibration first (a short closed-loop step run finds the saturated request rate), then paced users offer
twice that rate for ``SOAK_SECONDS`` (default 45; set it higher for a long run). No 5xx, no wrong answer
(the locustfile checks values against PyTorch), 429s expected; the server's RSS, sampled every second,
must be as flat at the end as after warm-up.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.reliability.support import RssSampler
from tests.service.server_support import REPO, clean_env, running_process

pytestmark = pytest.mark.slow
SOAK_SECONDS = float(os.environ.get("SOAK_SECONDS", "45"))
USERS = 24
WARM_UP_S = 10.0
MIB = 1 << 20


def locust(url: str, out: Path, steps: str, seconds: float, **env: str) -> dict[str, Any]:
    command = [sys.executable, "loadtest/run.py", "--host", url, "--steps", steps, "--step-seconds", str(seconds)]
    command += ["--out", str(out), "--check-fraction", "0.2", "--check-torch"]
    # The exit status counts 429s as failures; the summary tells them apart.
    subprocess.run(command, cwd=REPO, env=clean_env(**env), capture_output=True, timeout=seconds * 4 + 300)
    summary: dict[str, Any] = json.loads((out / "summary.json").read_text())
    return summary


def bad_failures(summary: dict[str, Any]) -> dict[str, int]:
    return {kind: n for kind, n in summary["failure_kinds"].items() if "HTTP 429" not in kind}


def test_soak_at_twice_saturation(small_bundle: Path, tmp_path: Path) -> None:
    serve = ["-m", "service", "--model-dir", str(small_bundle), "--provider", "cpu", "--host", "127.0.0.1"]
    serve += ["--seq-lens", "64,128", "--max-batch-size", "32", "--max-queue", "8"]
    with running_process(serve, tmp_path / "server.log") as (url, process):
        calibration = locust(url, tmp_path / "calibrate", "2,4,8", 5)
        saturation = max(step["requests_per_s"] for step in calibration["per_step"])
        assert saturation > 0 and not bad_failures(calibration)
        rate = 2 * saturation
        with RssSampler(psutil.Process(process.pid), period_s=1.0) as rss:
            soak = locust(url, tmp_path / "soak", str(USERS), SOAK_SECONDS, LOCUST_USER_RPS=f"{rate / USERS:.3f}")
    start = rss.samples[0][0] + WARM_UP_S
    values = rss.values_after(start)
    third = max(len(values) // 3, 1)
    first, last = statistics.median(values[:third]), statistics.median(values[-third:])
    checks = soak["value_checks"]
    served = soak["requests"] - sum(soak["failure_kinds"].values())
    report = {
        "saturation_req_per_s": round(saturation, 1),
        "offered_req_per_s": round(rate, 1),
        "soak_seconds": SOAK_SECONDS,
        "requests": soak["requests"],
        "answered_200": served,
        "refused_429": sum(n for k, n in soak["failure_kinds"].items() if "HTTP 429" in k),
        "served_req_per_s": round(served / SOAK_SECONDS, 1),
        "value_checks": checks,
        "rss_first_third_mib": round(first / MIB, 1),
        "rss_last_third_mib": round(last / MIB, 1),
        "rss_peak_mib": round(rss.peak / MIB, 1),
    }
    print("soak:", json.dumps(report))
    (tmp_path / "soak-report.json").write_text(json.dumps(report, indent=2))
    assert not bad_failures(soak), bad_failures(soak)  # no 5xx, no connection errors, no wrong shapes
    assert served > 0 and checks["checked"] > 0 and checks["mismatched"] == 0
    assert last - first <= max(0.15 * first, 30 * MIB), report
