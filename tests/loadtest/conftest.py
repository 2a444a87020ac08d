from __future__ import annotations

from pathlib import Path

import pytest

# The service tests' small bundle (the built-in model at 64/4/128, converted once per session), reused here.
from tests.service.conftest import convert_small, small_bundle

__all__ = ["small_bundle", "small_fp16_bundle"]


@pytest.fixture(scope="session")
def small_fp16_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same model in fp16: the loads' FP16 tensors then take the direct shared-memory paths, as on a GPU."""
    return convert_small(tmp_path_factory.mktemp("bundle") / "small-fp16", "fp16")
