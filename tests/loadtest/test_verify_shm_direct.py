"""loadtest/verify_shm_direct.py's CPU self-test: an fp16 bundle on the CPU takes the direct path as on a GPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.service.server_support import REPO, clean_env

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def test_the_verification_script_passes_on_the_cpu(small_fp16_bundle: Path, tmp_path: Path) -> None:
    out = tmp_path / "verify.json"
    command = [sys.executable, "loadtest/verify_shm_direct.py", "--provider", "cpu", "--model-dir"]
    command += [str(small_fp16_bundle), "--seq", "64", "--batches", "1,4", "--cycles", "20", "--out", str(out)]
    result = subprocess.run(command, cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    checks = json.loads(out.read_text())["checks"]
    assert all(check["ok"] for check in checks.values()) and len(checks) == 9, checks
    assert checks["every request took the direct path"]["detail"] == {"direct": 4, "copied": 0}
    assert checks["answer x4 grpc"]["detail"]["bit_exact"]
