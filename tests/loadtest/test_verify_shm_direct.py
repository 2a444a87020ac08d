"""loadtest/verify_shm_direct.py's CPU self-test: an fp16 bundle on the CPU takes the direct path as on a GPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.service.conftest import SMALL_DIMS, SMALL_MAX_SEQ_LEN
from tests.service.server_support import REPO, clean_env

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def small_fp16_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bundle") / "small-fp16"
    dim, heads, ffn = SMALL_DIMS
    command = [sys.executable, "-m", "converter", "--out", str(out), "--precision", "fp16"]
    command += ["--dim", str(dim), "--heads", str(heads), "--ffn", str(ffn), "--max-seq-len", str(SMALL_MAX_SEQ_LEN)]
    command += ["--verify-provider", "cpu", "--log-level", "WARNING"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


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
