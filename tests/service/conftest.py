from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from tests.service.server_support import REPO

# A small model: converting it takes seconds on a CPU; the same dims give the same weights in PyTorch.
SMALL_DIMS = (64, 4, 128)
SMALL_MAX_SEQ_LEN = 128


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def convert_small(out: Path, precision: str) -> Path:
    """The built-in model at small dims converted into ``out`` by the converter's CLI, verified on the CPU."""
    dim, heads, ffn = SMALL_DIMS
    command = [sys.executable, "-m", "converter", "--out", str(out), "--precision", precision]
    command += ["--dim", str(dim), "--heads", str(heads), "--ffn", str(ffn), "--max-seq-len", str(SMALL_MAX_SEQ_LEN)]
    command += ["--verify-provider", "cpu", "--log-level", "WARNING"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.fixture(scope="session")
def small_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real bundle of the built-in model at small dims, converted once per test session."""
    return convert_small(tmp_path_factory.mktemp("bundle") / "small", "fp32")


@pytest.fixture(scope="session")
def reference() -> Callable[[np.ndarray], np.ndarray]:
    """Unbatched PyTorch results of the small model: one sequence at a time, float32."""
    import torch

    from converter.model import EncoderDims, default_model

    model = default_model(EncoderDims(*SMALL_DIMS))

    def run(x: np.ndarray) -> np.ndarray:
        batch = x if x.ndim == 3 else x[np.newaxis]
        with torch.no_grad():
            outs = [model(torch.from_numpy(np.asarray(s, np.float32)[np.newaxis])).numpy()[0] for s in batch]
        return np.stack(outs).reshape(x.shape)

    return run
