from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

# The service tests' small bundle (the built-in model at 64/4/128, converted once per session), reused here.
from tests.service.conftest import SMALL_DIMS, SMALL_MAX_SEQ_LEN, small_bundle
from tests.service.server_support import REPO

__all__ = ["small_bundle", "small_fp16_bundle"]


@pytest.fixture(scope="session")
def small_fp16_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same model in fp16: the loads' FP16 tensors then take the direct shared-memory paths, as on a GPU."""
    out = tmp_path_factory.mktemp("bundle") / "small-fp16"
    dim, heads, ffn = SMALL_DIMS
    command = [sys.executable, "-m", "converter", "--out", str(out), "--precision", "fp16"]
    command += ["--dim", str(dim), "--heads", str(heads), "--ffn", str(ffn), "--max-seq-len", str(SMALL_MAX_SEQ_LEN)]
    command += ["--verify-provider", "cpu", "--log-level", "WARNING"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    return out
