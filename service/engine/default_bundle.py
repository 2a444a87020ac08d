"""The built-in default model: converted once with ``python -m converter`` into a cache, then reused.

The conversion runs in a subprocess because the converter needs PyTorch, which the service never imports.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

from converter.bundle import load_bundle
from converter.devices import cuda_device_count
from converter.errors import BundleError
from converter.providers import CUDA
from converter.session import available_providers

log = logging.getLogger(__name__)


class DefaultModelError(RuntimeError):
    """The default model could not be converted or its cache cannot be used."""


def default_precision(provider: str) -> str:
    """fp16 when a CUDA GPU can run it (and the CPU was not asked for), else fp32."""
    if provider == "cpu" or CUDA not in available_providers():
        return "fp32"
    return "fp16" if cuda_device_count() > 0 else "fp32"


def default_cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "encoder-service"


def ensure_default_bundle(provider: str, cache_root: Path | None = None) -> Path:
    """Return the cached default bundle for this machine, converting it first when needed."""
    precision = default_precision(provider)
    target = (cache_root or default_cache_root()) / f"default-{precision}"
    try:
        bundle = load_bundle(target)
    except BundleError as exc:
        if target.exists():
            log.warning("cached default model at %s is unusable (%s): converting again", target, exc)
    else:
        if bundle.precision == precision:
            log.info("reusing the default model converted at %s", target)
            return target
    convert_default(target, precision)
    return target


def convert_default(target: Path, precision: str) -> None:
    """Convert into a temporary sibling, then swap it in, so a crash never leaves a half-written cache."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    command = [sys.executable, "-m", "converter", "--out", str(staging), "--precision", precision]
    log.info("converting the default model (%s), once: %s", precision, " ".join(command))
    try:
        result = subprocess.run(command, check=False)
        if result.returncode != 0:
            raise DefaultModelError(f"converting the default model failed (exit {result.returncode})")
        try:
            load_bundle(staging)
        except BundleError as exc:
            raise DefaultModelError(f"the converter wrote an unusable bundle: {exc}") from exc
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            target.rename(old)
            shutil.rmtree(old, ignore_errors=True)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
