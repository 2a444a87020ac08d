"""Shared pieces of the docker/ tests: the repository paths, the Prometheus tools, the small bundle."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

# The same session fixture the converter tests use (a fp32 bundle at dim 64, converted once per session):
# reused rather than duplicated, so there is one definition of "the small model".
from tests.converter.conftest import small_bundle

__all__ = ["DOCKER", "REPO", "require_tool", "small_bundle"]

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"
INSTALL_HINT = (
    "`make test` installs it as root with apt-get (scripts/test_deps.py: Debian's prometheus package ships both "
    "prometheus and promtool); otherwise `sudo apt-get install prometheus`, or put the binaries of a release from "
    "https://prometheus.io/download/ on PATH"
)


def require_tool(name: str) -> str:
    """The tool's path; a failure (not a skip) when it is missing, since CI always has it."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"`{name}` is not on PATH. {INSTALL_HINT}", pytrace=False)
    return path
