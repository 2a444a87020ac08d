from __future__ import annotations

from pathlib import Path

import pytest

from converter.convert import ConvertConfig, convert
from converter.model import EncoderDims

SMALL = EncoderDims(dim=64, heads=4, ffn=128)


@pytest.fixture(scope="session")
def small_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fp32 bundle of the small default model, converted once per test session."""
    out = tmp_path_factory.mktemp("bundles") / "small"
    convert(ConvertConfig(out=out, dims=SMALL, verify_provider="cpu", max_seq_len=256))
    return out
